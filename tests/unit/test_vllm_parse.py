"""vLLM prompt logprobs -> `SequenceScores` on hand-built outputs (`opd/teacher/vllm_parse.py`).

The in-process outputs are `SimpleNamespace` fakes with vLLM's `Logprob` fields and the server's
answers plain dicts of its JSON shape: the parsers are pure, and the real engine and server are
exercised against a transformers forward in `tests/integration/test_teacher_vllm.py`.

Test: `pytest tests/unit/test_vllm_parse.py`.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from opd.teacher.vllm_parse import (
    VLLMOutputError,
    scores_from_completion_response,
    scores_from_request_outputs,
    sequence_scores,
    vocab_size_from_error,
)
from opd.teacher.wire import make_request

NEG_INF = -math.inf


def _logprob(value: float, rank: int = 1) -> SimpleNamespace:
    return SimpleNamespace(logprob=value, rank=rank, decoded_token="x")


def _position(entries: dict[int, float]) -> dict[int, SimpleNamespace]:
    return {token: _logprob(value) for token, value in entries.items()}


# Sequence 0: context [5, 6], completion [7, 8]. Position 2 predicts 7, position 3 predicts 8.
# At position 2 the actual token 7 is outside the top 2: vLLM returns k + 1 = 3 entries, actual
# token first (its insertion order). At position 3 token 8 is in the top 2: k = 2 entries.
SEQ0_POSITIONS = [
    None,
    {6: -0.1, 1: -3.0, 2: -4.0},  # context position: never read
    {7: -2.5, 3: -0.5, 4: -1.0},
    {4: -2.0, 8: -0.3},
]
# Sequence 1: context [9], completion [3]; 3 is the best token.
SEQ1_POSITIONS = [None, {3: -0.2, 4: -1.7}]


def _request(top_k: int):
    return make_request([[5, 6], [9]], [[7, 8], [3]], top_k=top_k)


def test_request_outputs_k_and_k_plus_one_entries():
    outputs = [
        SimpleNamespace(prompt_logprobs=[None if p is None else _position(p) for p in positions])
        for positions in (SEQ0_POSITIONS, SEQ1_POSITIONS)
    ]
    scores = scores_from_request_outputs(outputs, _request(top_k=2))
    assert scores.completion_lengths_B.tolist() == [2, 1]
    torch.testing.assert_close(scores.sampled_logprobs_M, torch.tensor([-2.5, -0.3, -0.2]))
    assert scores.topk_ids_MK.dtype == torch.int64
    assert scores.topk_ids_MK.tolist() == [[3, 4], [8, 4], [3, 4]]
    torch.testing.assert_close(
        scores.topk_logprobs_MK, torch.tensor([[-0.5, -1.0], [-0.3, -2.0], [-0.2, -1.7]])
    )


def test_top_k_zero_returns_only_sampled_logprobs():
    outputs = [
        SimpleNamespace(prompt_logprobs=[None, {6: _logprob(-0.1)}, {7: _logprob(-2.5)}]),
    ]
    scores = scores_from_request_outputs(outputs, make_request([[5, 6]], [[7]], top_k=0))
    assert scores.topk_ids_MK is None and scores.topk_logprobs_MK is None
    assert scores.sampled_logprobs_M.tolist() == [-2.5]


def test_fewer_entries_than_k_are_padded():
    # A vocabulary of 2: asking for top 4 yields 2 entries; pad with id 0 and -inf like
    # LocalTeacher.
    sampled_T, ids_TK, logprobs_TK = sequence_scores(
        [None, {1: -0.7, 0: -0.69}], context_length=1, completion=[1], top_k=4
    )
    assert sampled_T.tolist() == pytest.approx([-0.7])
    assert ids_TK.tolist() == [[0, 1, 0, 0]]
    assert logprobs_TK[0, :2].tolist() == pytest.approx([-0.69, -0.7])
    assert logprobs_TK[0, 2:].tolist() == [NEG_INF, NEG_INF]


def test_missing_completion_token_names_sequence_and_position():
    outputs = [SimpleNamespace(prompt_logprobs=[None, {6: _logprob(-0.1)}, {3: _logprob(-0.5)}])]
    with pytest.raises(VLLMOutputError, match=r"sequence 0, position 2: .* token 7"):
        scores_from_request_outputs(outputs, make_request([[5, 6]], [[7]], top_k=1))


def test_wrong_number_of_positions_or_outputs():
    request = make_request([[5, 6]], [[7]], top_k=1)
    with pytest.raises(VLLMOutputError, match="cover 2 positions, expected 3"):
        scores_from_request_outputs(
            [SimpleNamespace(prompt_logprobs=[None, {7: _logprob(-0.1)}])], request
        )
    with pytest.raises(VLLMOutputError, match="2 outputs for 1 sequences"):
        scores_from_request_outputs([SimpleNamespace(prompt_logprobs=[])] * 2, request)
    with pytest.raises(VLLMOutputError, match="no prompt_logprobs"):
        scores_from_request_outputs([SimpleNamespace(prompt_logprobs=None)], request)


def test_positive_values_are_logits_not_logprobs():
    outputs = [SimpleNamespace(prompt_logprobs=[None, {7: _logprob(3.2), 1: _logprob(1.0)}])]
    with pytest.raises(VLLMOutputError, match="logprobs_mode"):
        scores_from_request_outputs(outputs, make_request([[5]], [[7]], top_k=1))


def _json_choice(index: int, positions) -> dict:
    return {
        "index": index,
        "text": "",
        "prompt_logprobs": [
            None
            if p is None
            else {str(t): {"logprob": v, "rank": 1, "decoded_token": "x"} for t, v in p.items()}
            for p in positions
        ],
    }


def test_completion_response_matches_choices_by_index():
    # The server lists choices in prompt order today; the parser must not depend on it.
    payload = {"choices": [_json_choice(1, SEQ1_POSITIONS), _json_choice(0, SEQ0_POSITIONS)]}
    scores = scores_from_completion_response(payload, _request(top_k=2))
    torch.testing.assert_close(scores.sampled_logprobs_M, torch.tensor([-2.5, -0.3, -0.2]))
    assert scores.topk_ids_MK.tolist() == [[3, 4], [8, 4], [3, 4]]


def test_completion_response_maps_clamped_minus_inf_back():
    # JSON has no -inf: the server writes -9999.0.
    payload = {"choices": [_json_choice(0, [None, {7: -0.0, 1: -9999.0}])]}
    scores = scores_from_completion_response(payload, make_request([[5]], [[7]], top_k=3))
    assert scores.sampled_logprobs_M.tolist() == [0.0]
    assert scores.topk_ids_MK.tolist() == [[7, 1, 0]]
    assert scores.topk_logprobs_MK.tolist() == [[0.0, NEG_INF, NEG_INF]]


def test_completion_response_errors():
    request = _request(top_k=2)
    with pytest.raises(VLLMOutputError, match="1 choices for 2 prompts"):
        scores_from_completion_response({"choices": [_json_choice(0, SEQ0_POSITIONS)]}, request)
    duplicated = [_json_choice(0, SEQ0_POSITIONS), _json_choice(0, SEQ1_POSITIONS)]
    with pytest.raises(VLLMOutputError, match="indices"):
        scores_from_completion_response({"choices": duplicated}, request)
    no_logprobs = [_json_choice(0, SEQ0_POSITIONS), {"index": 1, "prompt_logprobs": None}]
    with pytest.raises(VLLMOutputError, match="choice 1 has no prompt_logprobs"):
        scores_from_completion_response({"choices": no_logprobs}, request)
    missing = [_json_choice(0, SEQ0_POSITIONS), _json_choice(1, [None, {4: -0.1}])]
    with pytest.raises(VLLMOutputError, match=r"sequence 1, position 1: .* token 3"):
        scores_from_completion_response({"choices": missing}, request)


def test_vocab_size_from_a_rejected_logit_bias():
    message = (
        "teacher at http://h/v1/completions rejected the request (HTTP 400): token_id(s) "
        "[2147483647] in logit_bias contain out-of-vocab token ids. Vocabulary size: 49 "
        "(parameter=logit_bias, value=[2147483647])"
    )
    assert vocab_size_from_error(message) == 49
    assert vocab_size_from_error("some other 400") is None


def _flat(positions) -> SimpleNamespace:
    """vLLM's `FlatLogprobs`: flat lists plus per-position [start, end) ranges; unlike the dicts
    it keeps a duplicate when the actual token is also in the top k (actual token first)."""
    flat = SimpleNamespace(start_indices=[], end_indices=[], token_ids=[], logprobs=[])
    for entries in positions:
        flat.start_indices.append(len(flat.token_ids))
        for token, value in entries:
            flat.token_ids.append(token)
            flat.logprobs.append(value)
        flat.end_indices.append(len(flat.token_ids))
    return flat


def test_flat_logprobs_with_the_actual_token_repeated():
    seq0 = [[], [(6, -0.1), (6, -0.1), (1, -3.0)], [(7, -2.5), (3, -0.5), (4, -1.0)]]
    seq0.append([(8, -0.3), (8, -0.3), (4, -2.0)])  # 8 is the actual token and the best
    seq1 = [[], [(3, -0.2), (3, -0.2), (4, -1.7)]]
    outputs = [SimpleNamespace(prompt_logprobs=_flat(p)) for p in (seq0, seq1)]
    scores = scores_from_request_outputs(outputs, _request(top_k=2))
    torch.testing.assert_close(scores.sampled_logprobs_M, torch.tensor([-2.5, -0.3, -0.2]))
    assert scores.topk_ids_MK.tolist() == [[3, 4], [8, 4], [3, 4]]
    torch.testing.assert_close(
        scores.topk_logprobs_MK, torch.tensor([[-0.5, -1.0], [-0.3, -2.0], [-0.2, -1.7]])
    )
