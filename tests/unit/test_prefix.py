"""Prefix-guided rollouts (POPE, PrefixRL, Prefix-RFT): schedule, guided rows, prefix cutting,
the `failed` gate, the prefix source read from a real `opd rollout` shard set, and the move of a
prefix from the prompt into the completion, on hand-computed values.

Run: `pytest -n 0 tests/unit/test_prefix.py`.
"""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from opd.demo.tiny import build_char_tokenizer
from opd.rollout.prefix import (
    PREFIX_GATES,
    PrefixSchedule,
    cut_prefix_ids,
    gated_prompts,
    guided_rows,
    prefix_fraction,
    prefix_into_completion,
    prefix_source_mask,
    successful_rollout_traces,
)
from opd.rollout.trace_gate import PromptLedger, prompt_key
from opd.shards import ShardSetWriter

NAN = "nan"  # NaN stand-in for list comparisons (NaN != NaN)


def _nan_as_str(value):
    if isinstance(value, list):
        return [_nan_as_str(item) for item in value]
    return NAN if isinstance(value, float) and math.isnan(value) else value


# ------------------------------------------------------------------------------------------------
# Schedule
# ------------------------------------------------------------------------------------------------


def test_decreasing_schedule_is_linear_then_flat():
    schedule = PrefixSchedule(start=0.8, end=0.2, ramp_steps=4)
    # 0.8 - 0.15 * step until step 4, then 0.2
    expected = [0.8, 0.65, 0.5, 0.35, 0.2, 0.2, 0.2]
    got = [prefix_fraction(step, schedule) for step in [0, 1, 2, 3, 4, 5, 100]]
    assert got == pytest.approx(expected, abs=1e-12)


def test_zero_ramp_is_end_at_once_and_increasing_works():
    assert prefix_fraction(0, PrefixSchedule(start=0.9, end=0.3, ramp_steps=0)) == 0.3
    increasing = PrefixSchedule(start=0.0, end=1.0, ramp_steps=2)
    assert [prefix_fraction(s, increasing) for s in range(3)] == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="step must be >= 0"):
        prefix_fraction(-1, increasing)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"start": 1.5, "end": 0.5, "ramp_steps": 1}, "start"),
        ({"start": -0.1, "end": 0.5, "ramp_steps": 1}, "start"),
        ({"start": math.nan, "end": 0.5, "ramp_steps": 1}, "start"),
        ({"start": 0.5, "end": 1.01, "ramp_steps": 1}, "end"),
        ({"start": 0.5, "end": 0.5, "ramp_steps": -1}, "ramp_steps"),
    ],
)
def test_schedule_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"prefix schedule {field} must be") as error:
        PrefixSchedule(**kwargs)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------
# Rows, cutting, gate
# ------------------------------------------------------------------------------------------------


def test_guided_rows_are_the_first_of_each_global_group():
    assert guided_rows(8, group_size=4, first_global_index=0, guided_per_group=2) == [0, 1, 4, 5]
    # global rows 6..11, groups of 4: positions 2, 3 | 0, 1, 2, 3 -> local rows 2 and 3
    assert guided_rows(6, group_size=4, first_global_index=6, guided_per_group=2) == [2, 3]
    # global rows 6..9, one guided row per group: only global row 8 (local 2)
    assert guided_rows(4, group_size=4, first_global_index=6, guided_per_group=1) == [2]
    assert guided_rows(4, group_size=4, first_global_index=6, guided_per_group=0) == []
    assert guided_rows(3, group_size=4, first_global_index=6, guided_per_group=4) == [0, 1, 2]


@pytest.mark.parametrize("guided", [-1, 5])
def test_guided_rows_rejects_out_of_range_counts(guided):
    with pytest.raises(ValueError, match=r"guided_per_group must be in \[0, group_size=4\]"):
        guided_rows(4, group_size=4, first_global_index=0, guided_per_group=guided)


def test_cut_prefix_ids_edge_cases():
    source = list(range(10, 20))  # 10 tokens
    assert cut_prefix_ids(source, 0.0, max_tokens=100) == []
    assert cut_prefix_ids(source, 0.35, max_tokens=100) == [10, 11, 12]  # floor(3.5)
    assert cut_prefix_ids(source, 0.99, max_tokens=100) == source[:9]  # floor(9.9), strict
    assert cut_prefix_ids(source, math.nextafter(1.0, 0.0), max_tokens=100) == source[:9]
    assert cut_prefix_ids(source, 1.0, max_tokens=100) == source  # fraction 1: the whole source
    assert cut_prefix_ids(source, 1.0, max_tokens=2) == [10, 11]  # the cap
    assert cut_prefix_ids(source, 0.5, max_tokens=0) == []
    assert cut_prefix_ids([], 1.0, max_tokens=5) == []
    assert cut_prefix_ids([7], 0.9, max_tokens=5) == []  # floor(0.9)


@pytest.mark.parametrize(
    ("fraction", "max_tokens", "message"),
    [(1.5, 1, "fraction must be in"), (-0.1, 1, "fraction must be in"), (0.5, -1, "max_tokens")],
)
def test_cut_prefix_ids_validates(fraction, max_tokens, message):
    with pytest.raises(ValueError, match=message):
        cut_prefix_ids([1, 2], fraction, max_tokens=max_tokens)


def test_failed_gate_follows_the_ledger():
    ledger = PromptLedger()
    # a: 3 failures; b: 1 success, 2 failures; d: 3 successes; c: never seen
    ledger.update(
        ["a", "b", "d"],
        torch.tensor([[False, False, False], [True, False, False], [True, True, True]]),
        cache_successes=False,
    )
    keys = ["a", "b", "c", "d"]
    assert gated_prompts("failed", keys, ledger) == [True, False, False, False]
    assert gated_prompts("always", keys, None) == [True] * 4
    # one later success takes `a` out of the hard set; a fresh failure brings `c` in
    ledger.update(
        ["a", "c"], torch.tensor([[True, False, False], [False, False, False]]),
        cache_successes=False,
    )  # fmt: skip
    assert gated_prompts("failed", keys, ledger) == [False, False, True, False]


def test_gate_errors():
    with pytest.raises(ValueError, match="'failed' needs a PromptLedger"):
        gated_prompts("failed", ["a"], None)
    with pytest.raises(ValueError, match="unknown prefix gate 'all_fail'") as error:
        gated_prompts("all_fail", ["a"], PromptLedger())
    assert all(gate in str(error.value) for gate in PREFIX_GATES)


# ------------------------------------------------------------------------------------------------
# Prefix source from an `opd rollout` set
# ------------------------------------------------------------------------------------------------

TOKENIZER = build_char_tokenizer()
EOS = TOKENIZER.eos_token_id


def _ids(text: str) -> list[int]:
    return [*TOKENIZER.encode(text, add_special_tokens=False), EOS]


def _shard(rows: list[tuple], prompts: list, answers: list[str] | None) -> pa.Table:
    """Rollout rows `(prompt_index, sample_index, completion_text)` in the given order."""
    columns = {
        "prompt_index": pa.array([r[0] for r in rows], pa.int64()),
        "sample_index": pa.array([r[1] for r in rows], pa.int64()),
        "prompt_ids": pa.array([[1, r[0]] for r in rows], pa.list_(pa.int32())),
        "teacher_prompt_ids": pa.array([[1, r[0]] for r in rows], pa.list_(pa.int32())),
        "completion_ids": pa.array([_ids(r[2]) for r in rows], pa.list_(pa.int32())),
        "sampler_logprobs": pa.array(
            [[-0.5] * len(_ids(r[2])) for r in rows], pa.list_(pa.float32())
        ),
        "stop_reason": pa.array(["stop"] * len(rows)),
    }
    if prompts is not None:
        columns["prompt"] = pa.array([prompts[r[0]] for r in rows])
    if answers is not None:
        columns["answer"] = pa.array([answers[r[0]] for r in rows])
    return pa.table(columns)


def _write_set(folder, shards: list[pa.Table]) -> str:
    num_rows = sum(table.num_rows for table in shards)
    plan = dict(kind="rollouts", num_rows=num_rows, num_shards=len(shards), shard_size=4)
    writer = ShardSetWriter(folder, plan, rerun_hint="opd rollout")
    writer.start()
    for index, table in enumerate(shards):
        writer.write_shard(index, table)
    writer.close()
    return str(folder)


class ExactAnswer:
    """1.0 where the stripped completion equals the answer; records what it was called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, completion_ids, answer, **kwargs):
        call = dict(prompts=prompts, completions=completions, completion_ids=completion_ids)
        self.calls.append(call | {"answer": answer, "kwargs": kwargs})
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [
            None if gold == "?" else float(text.strip() == gold)
            for text, gold in zip(texts, answer, strict=True)
        ]


def test_successful_rollout_traces_keeps_the_first_success_per_prompt(tmp_path):
    prompts = ["1+4=", "2+2=", "3+3=", "2+2=", "9+0="]
    answers = ["5", "4", "6", "4", "?"]  # "?": unscorable (reward None)
    shard0 = _shard([(0, 0, "6"), (0, 1, "5"), (1, 1, " 4"), (1, 0, "4")], prompts, answers)
    # prompt 2 never succeeds; prompt 3 repeats prompt 1's text (the earlier index wins);
    # prompt 4's reward is None
    shard1 = _shard([(2, 0, "7"), (2, 1, "66"), (3, 0, "4 "), (4, 0, "9")], prompts, answers)
    folder = _write_set(tmp_path / "rollouts", [shard0, shard1])
    reward = ExactAnswer()
    traces = successful_rollout_traces(folder, reward, TOKENIZER)
    # prompt 1: sample 0 ("4") comes before sample 1 (" 4") although the shard lists it second
    assert traces == {prompt_key("1+4="): "5", prompt_key("2+2="): "4"}
    (call,) = reward.calls
    # graded in (prompt_index, sample_index) order, EOS dropped from the text but not the ids
    assert call["completions"] == ["6", "5", "4", " 4", "7", "66", "4 ", "9"]
    assert call["prompts"] == ["1+4=", "1+4=", "2+2=", "2+2=", "3+3=", "3+3=", "2+2=", "9+0="]
    assert call["completion_ids"][0] == [TOKENIZER.convert_tokens_to_ids("6"), EOS]
    assert call["answer"] == ["5", "5", "4", "4", "6", "6", "4", "?"]
    assert call["kwargs"] == {}  # no `prompt`, no rollout columns


def test_chat_prompts_are_graded_with_chat_completions(tmp_path):
    chat = [[{"role": "user", "content": "1+4="}], [{"role": "user", "content": "2+2="}]]
    shard = _shard([(0, 0, "5"), (1, 0, "3")], chat, ["5", "4"])
    reward = ExactAnswer()
    traces = successful_rollout_traces(_write_set(tmp_path / "chat", [shard]), reward, TOKENIZER)
    assert traces == {prompt_key(chat[0]): "5"}
    assert reward.calls[0]["completions"][0] == [{"role": "assistant", "content": "5"}]


def test_successful_rollout_traces_errors_name_the_folder(tmp_path):
    no_prompt = _write_set(tmp_path / "no_prompt", [_shard([(0, 0, "5")], None, ["5"])])
    with pytest.raises(ValueError, match=r"no_prompt has no 'prompt' column") as error:
        successful_rollout_traces(no_prompt, ExactAnswer(), TOKENIZER)
    assert "\n" not in str(error.value)
    failed = _write_set(tmp_path / "all_wrong", [_shard([(0, 0, "6")], ["1+4="], ["5"])])
    with pytest.raises(ValueError, match=r"all_wrong has no completion with reward >= 0.5"):
        successful_rollout_traces(failed, ExactAnswer(), TOKENIZER)


# ------------------------------------------------------------------------------------------------
# Prefix-RFT: the prefix moves into the completion
# ------------------------------------------------------------------------------------------------

PROMPTS = [[1, 10, 11, 20, 21], [1, 10], [1, 12, 30], [1, 13]]
COMPLETIONS = [[22, 23, 2], [40, 41, 2], [31], [50]]
PREFIXES = [[20, 21], None, [30], []]


def test_prefix_moves_into_completion_with_flat_logprobs():
    logprobs = [[-0.1, -0.2, -0.3], [-0.4, -0.5, -0.6], [-0.7], [-0.8]]
    prompts, completions, new_logprobs, prefix_len_B = prefix_into_completion(
        PROMPTS, COMPLETIONS, logprobs, PREFIXES, max_completion_length=4
    )
    assert prompts == [[1, 10, 11], [1, 10], [1, 12], [1, 13]]
    # row 0: [20, 21] + [22, 23, 2] cut to 4; rows 1 and 3 unguided (None, empty)
    assert completions == [[20, 21, 22, 23], [40, 41, 2], [30, 31], [50]]
    assert _nan_as_str(new_logprobs) == [
        [NAN, NAN, -0.1, -0.2], [-0.4, -0.5, -0.6], [NAN, -0.7], [-0.8],
    ]  # fmt: skip
    assert prefix_len_B == [2, 0, 1, 0]
    # the inputs are not modified
    assert PROMPTS[0] == [1, 10, 11, 20, 21] and logprobs[0] == [-0.1, -0.2, -0.3]


def test_prefix_moves_into_completion_with_nested_logprobs():
    logprobs = [
        [[-0.1, -1.1], [-0.2, -1.2], [-0.3, -1.3]],
        [[-0.4, -1.4], [-0.5, -1.5], [-0.6, -1.6]],
        [[-0.7, -1.7]],
        [[-0.8, -1.8]],
    ]
    _, _, new_logprobs, _ = prefix_into_completion(
        PROMPTS, COMPLETIONS, logprobs, PREFIXES, max_completion_length=4
    )
    assert _nan_as_str(new_logprobs) == [
        [[NAN, NAN], [NAN, NAN], [-0.1, -1.1], [-0.2, -1.2]],
        logprobs[1],
        [[NAN, NAN], [-0.7, -1.7]],
        logprobs[3],
    ]


def test_prefix_longer_than_the_cap_and_no_logprobs():
    prompts, completions, logprobs, prefix_len_B = prefix_into_completion(
        [[1, 5, 6, 7]], [[8]], None, [[5, 6, 7]], max_completion_length=2
    )
    assert (prompts, completions, logprobs, prefix_len_B) == ([[1]], [[5, 6]], None, [2])
    _, _, logprobs, _ = prefix_into_completion(
        [[1, 5, 6, 7]], [[8]], [[-0.3]], [[5, 6, 7]], max_completion_length=2
    )
    assert _nan_as_str(logprobs) == [[NAN, NAN]]


def test_prefix_must_end_the_prompt():
    with pytest.raises(AssertionError, match="row 0: prompt_ids does not end with its prefix"):
        prefix_into_completion([[1, 5, 6]], [[8]], None, [[5]], max_completion_length=4)


def test_prefix_source_mask():
    mask_BT = prefix_source_mask([2, 0, 1], 3)
    assert mask_BT.dtype == torch.bool
    assert mask_BT.tolist() == [[True, True, False], [False, False, False], [True, False, False]]
    with pytest.raises(AssertionError, match="must be in"):
        prefix_source_mask([4], 3)


def test_cosine_schedule_is_prefix_rfts_half_cosine_decay():
    schedule = PrefixSchedule(start=0.95, end=0.05, ramp_steps=4, shape="cosine")
    values = [prefix_fraction(step, schedule) for step in range(6)]
    # 0.05 + 0.9 * (1 + cos(pi * s / 4)) / 2: s = 1 -> 0.05 + 0.9 * 0.853553 = 0.818198
    assert values == pytest.approx([0.95, 0.818198, 0.5, 0.181802, 0.05, 0.05], abs=1e-6)
    with pytest.raises(ValueError, match="shape must be one of"):
        PrefixSchedule(start=0.5, end=0.5, ramp_steps=0, shape="step")


def test_schedule_round_off_does_not_drop_a_token():
    fraction = prefix_fraction(
        1, PrefixSchedule(start=0.95, end=0.05, ramp_steps=2, shape="cosine")
    )
    assert fraction < 0.5  # 0.49999999999999994
    assert cut_prefix_ids([7, 8], fraction, max_tokens=10) == [7]
