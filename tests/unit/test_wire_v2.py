"""The wire format's teacher-v2 options: hidden states and candidate sets, and the server's
batching of requests that ask for them. Run: `.venv/bin/pytest tests/unit/test_wire_v2.py`."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from opd.teacher.batching import group_requests, merge_requests, select_sequences, split_scores
from opd.teacher.wire import (
    RequestLimits,
    SequenceScores,
    WireError,
    decode_request,
    decode_scores,
    encode_request,
    encode_scores,
    estimated_response_bytes,
    make_request,
    request_from_batch,
    scatter_to_batch,
)
from opd.types import RolloutBatch

LIMITS = RequestLimits(vocab_size=50, max_top_k=8, hidden_size=6, max_candidates=4)
VLLM_LIKE = dataclasses.replace(LIMITS, hidden_size=0, max_candidates=0, backend_name="vllm")


def _request(**options):
    request = make_request([[1, 2], [3]], [[4, 5, 6], [7, 8]], top_k=2)
    return dataclasses.replace(request, **options)


def _candidates(rows=5, width=3) -> torch.Tensor:
    ids = torch.arange(rows * width).reshape(rows, width) % 50
    ids[0, -1] = -1  # padding
    return ids


def test_request_round_trip_with_hidden_states_and_candidates():
    request = _request(hidden_dtype="bfloat16", candidate_ids_MC=_candidates())
    decoded = decode_request(encode_request(request), LIMITS)
    assert decoded.hidden_dtype == "bfloat16" and decoded.top_k == 2
    assert torch.equal(decoded.candidate_ids_MC, request.candidate_ids_MC)
    assert decoded.group_key == (2, 1.0, "bfloat16", 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scores_round_trip_with_hidden_states_and_candidates(dtype):
    scores = SequenceScores(
        completion_lengths_B=torch.tensor([3, 2]),
        sampled_logprobs_M=-torch.rand(5),
        hidden_MH=torch.randn(5, 6).to(dtype),
        candidate_logprobs_MC=torch.tensor([[-1.0, -2.0, -torch.inf]] * 5),
    )
    decoded, metadata = decode_scores(encode_scores(scores, metadata={"output_head_sha256": "ab"}))
    assert metadata["output_head_sha256"] == "ab"
    assert decoded.hidden_MH.dtype == dtype and torch.equal(decoded.hidden_MH, scores.hidden_MH)
    assert torch.equal(decoded.candidate_logprobs_MC, scores.candidate_logprobs_MC)
    assert decoded.topk_ids_MK is None


@pytest.mark.parametrize(
    ("options", "limits", "message", "status"),
    [
        ({"hidden_dtype": "float16"}, LIMITS, "hidden_dtype='float16' is not one of", 400),
        ({"hidden_dtype": "float32"}, VLLM_LIKE, r"\(vllm\) cannot return hidden states", 422),
        ({"candidate_ids_MC": _candidates()}, VLLM_LIKE, r"\(vllm\) cannot score candidate", 422),
        ({"candidate_ids_MC": _candidates(width=5)}, LIMITS, "5 candidate ids per position", 400),
        ({"candidate_ids_MC": _candidates(rows=4)}, LIMITS, "candidate_ids has 4 rows", 400),
        ({"candidate_ids_MC": _candidates() - 2}, LIMITS, "candidate token id -2 is outside", 400),
        ({"candidate_ids_MC": _candidates() + 40}, LIMITS, "candidate token id 50 is outside", 400),
    ],
)  # fmt: skip
def test_decode_request_refuses_bad_options(options, limits, message, status):
    with pytest.raises(WireError, match=message) as error:
        decode_request(encode_request(_request(**options)), limits)
    assert error.value.status == status


def test_estimated_response_bytes_counts_hidden_states_and_candidates():
    """The estimate is an upper bound of the real blob, within its header allowance."""
    request = _request(hidden_dtype="float32", candidate_ids_MC=_candidates())
    scores = SequenceScores(
        completion_lengths_B=torch.tensor([3, 2]),
        sampled_logprobs_M=torch.zeros(5),
        topk_ids_MK=torch.zeros(5, 2, dtype=torch.int32),
        topk_logprobs_MK=torch.zeros(5, 2),
        hidden_MH=torch.zeros(5, 6),
        candidate_logprobs_MC=torch.zeros(5, 3),
    )
    actual = len(encode_scores(scores, metadata={"output_head_sha256": "0" * 64}))
    estimate = estimated_response_bytes(request, hidden_size=6)
    assert actual <= estimate <= actual + 4096
    assert estimate - estimated_response_bytes(_request(), hidden_size=6) == 5 * (6 * 4 + 3 * 4)


def test_batching_keeps_hidden_and_candidate_requests_apart_and_in_order():
    plain, wide = _request(), _request(candidate_ids_MC=_candidates())
    other = _request(candidate_ids_MC=_candidates(width=2))
    hidden = _request(hidden_dtype="float32")
    assert group_requests([plain, wide, hidden, wide, other]) == [[0], [1, 3], [2], [4]]
    merged = merge_requests([wide, wide])
    assert torch.equal(merged.candidate_ids_MC, torch.cat([_candidates(), _candidates()]))
    picked = select_sequences(merged, [3, 0])
    assert torch.equal(picked.candidate_ids_MC, torch.cat([_candidates()[3:], _candidates()[:3]]))
    assert [c.candidate_ids_MC.shape[0] for c in merged.chunks(3)] == [8, 2]


def test_split_scores_splits_every_per_token_field():
    scores = SequenceScores(
        completion_lengths_B=torch.tensor([3, 2, 1]),
        sampled_logprobs_M=torch.arange(6.0),
        hidden_MH=torch.arange(12.0).reshape(6, 2),
        candidate_logprobs_MC=torch.arange(6.0)[:, None],
    )
    first, second = split_scores(scores, [1, 2])
    assert first.hidden_MH.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert second.candidate_logprobs_MC.flatten().tolist() == [3, 4, 5]
    assert SequenceScores.concat([first, second]).hidden_MH.equal(scores.hidden_MH)


def test_candidates_travel_for_the_sent_positions_and_come_back_in_place():
    """A masked row is not sent, a row is cut after its last unmasked token, and the answer is
    scattered back with -inf at every masked position (tool outputs inside a row included)."""
    mask_BT = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0]])
    batch = RolloutBatch(
        prompt_ids=[[1], [2], [3]],
        completion_ids_BT=torch.ones(3, 4, dtype=torch.long),
        completion_mask_BT=mask_BT,
    )
    candidates_BTC = torch.arange(24).reshape(3, 4, 2)
    request, rows = request_from_batch(batch, candidate_ids_BTC=candidates_BTC)
    assert rows == [0, 2]
    assert request.candidate_ids_MC.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7], [16, 17], [18, 19]]
    values_BTC = scatter_to_batch(
        request.candidate_ids_MC.float(), batch, rows, request.completion_lengths_B,
        fill=-torch.inf,
    )  # fmt: skip
    keep_BTC = mask_BT.bool()[..., None].expand(-1, -1, 2)
    assert torch.equal(values_BTC[keep_BTC], candidates_BTC[keep_BTC].float())
    assert torch.isinf(values_BTC[~keep_BTC]).all()
