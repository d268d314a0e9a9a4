"""Off-policy traces replace the last member of each group (LUFFY, StableOPD anchors)."""

from __future__ import annotations

import math

from opd.rollout.traces import inject_traces, trace_rows


class CharTokenizer:
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(char) for char in text]


def test_trace_rows_are_the_last_member_of_each_global_group():
    assert trace_rows(8, group_size=4, first_global_index=0) == [3, 7]
    # a process whose slice starts mid-group (global rows 6..9 with groups of 4): rows 1 and 5
    assert trace_rows(4, group_size=4, first_global_index=6) == [1]


def test_inject_traces_replaces_ids_text_and_logprobs():
    generated = ([[1], [1]], [[5, 6], [7, 0]], None, ["ab", "c"], [[-0.1, -0.2], [-0.3, -0.4]],
                 {}, None, [])  # fmt: skip
    updated, offpolicy = inject_traces(
        generated, ["ignored", "xyz"], [1], tokenizer=CharTokenizer(), max_completion_length=3,
        conversational=False,
    )  # fmt: skip
    _, completion_ids, _, completions, logprobs, *_ = updated
    assert offpolicy == [False, True]
    # "xyz" truncated to max_len - 1 = 2 tokens plus EOS
    assert completion_ids == [[5, 6], [ord("x"), ord("y"), 0]]
    assert completions == ["ab", "xyz"]
    assert logprobs[0] == [-0.1, -0.2] and all(math.isnan(x) for x in logprobs[1])
    assert len(logprobs[1]) == 3


def test_empty_trace_leaves_the_row_on_policy_and_chat_form_is_kept():
    generated = ([[1]], [[5]], None, [[{"role": "assistant", "content": "a"}]], None, {}, None, [])
    updated, offpolicy = inject_traces(
        generated, [""], [0], tokenizer=CharTokenizer(), max_completion_length=4,
        conversational=True,
    )  # fmt: skip
    assert offpolicy == [False] and updated[1] == [[5]]
    updated, offpolicy = inject_traces(
        generated, ["hi"], [0], tokenizer=CharTokenizer(), max_completion_length=4,
        conversational=True,
    )  # fmt: skip
    assert offpolicy == [True]
    assert updated[3] == [[{"role": "assistant", "content": "hi"}]]
