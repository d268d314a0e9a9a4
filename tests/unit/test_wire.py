"""The teacher wire format: round trips, `[B, T]` <-> ragged conversion, and every rejection.

Pure functions on hand-built inputs; no model, no server. Run:
`.venv/bin/pytest tests/unit/test_wire.py`.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save as safetensors_save

from opd.teacher.wire import (
    RequestLimits,
    SequenceScores,
    WireError,
    decode_request,
    decode_scores,
    encode_request,
    encode_scores,
    make_request,
    request_from_batch,
    scores_from_sequences,
)
from opd.types import RolloutBatch

LIMITS = RequestLimits(vocab_size=50, max_top_k=8, max_sequence_tokens=16, max_sequences=4)
INF = float("inf")


def _request_tensors(**overrides) -> dict[str, torch.Tensor]:
    """A valid two-sequence request's tensors (contexts [3, 4] and [5]; completions [6] and
    [7, 8]), with some replaced."""
    tensors = {
        "context_ids": torch.tensor([3, 4, 5]),
        "context_lengths": torch.tensor([2, 1]),
        "completion_ids": torch.tensor([6, 7, 8]),
        "completion_lengths": torch.tensor([1, 2]),
    }
    tensors.update(overrides)
    return {name: tensor for name, tensor in tensors.items() if tensor is not None}


def _body(metadata: dict[str, str] | None = None, **overrides) -> bytes:
    return safetensors_save(_request_tensors(**overrides), metadata=metadata)


def test_request_round_trip():
    request = make_request([[1, 2, 3], [4]], [[5], [6, 7]], top_k=5, temperature=0.7)
    decoded = decode_request(encode_request(request), LIMITS)
    assert decoded.contexts() == [[1, 2, 3], [4]]
    assert decoded.completions() == [[5], [6, 7]]
    assert decoded.top_k == 5 and decoded.temperature == 0.7
    assert decoded.num_sequences == 2 and decoded.num_tokens == 7


def test_request_defaults_without_metadata():
    decoded = decode_request(_body(), LIMITS)
    assert decoded.top_k == 0 and decoded.temperature == 1.0
    assert decoded.contexts() == [[3, 4], [5]] and decoded.completions() == [[6], [7, 8]]


@pytest.mark.parametrize("with_topk", [False, True])
def test_scores_round_trip(with_topk):
    scores = SequenceScores(
        completion_lengths_B=torch.tensor([2, 1]),
        sampled_logprobs_M=torch.tensor([-0.5, -1.25, -3.0]),
        topk_ids_MK=torch.tensor([[1, 2], [3, 4], [5, 0]]) if with_topk else None,
        topk_logprobs_MK=torch.tensor([[-0.1, -2.0], [-0.2, -3.0], [-0.3, -INF]])
        if with_topk
        else None,
    )
    decoded, metadata = decode_scores(encode_scores(scores, teacher_id="t/1", temperature=0.5))
    assert metadata == {"teacher_id": "t/1", "temperature": "0.5"}
    assert torch.equal(decoded.completion_lengths_B, scores.completion_lengths_B)
    assert torch.equal(decoded.sampled_logprobs_M, scores.sampled_logprobs_M)
    if with_topk:
        assert torch.equal(decoded.topk_ids_MK, scores.topk_ids_MK)
        assert torch.equal(decoded.topk_logprobs_MK, scores.topk_logprobs_MK)
    else:
        assert decoded.topk_ids_MK is None and decoded.topk_logprobs_MK is None


def test_sequence_scores_concat_keeps_order():
    first = SequenceScores(torch.tensor([1]), torch.tensor([-1.0]))
    second = SequenceScores(torch.tensor([2]), torch.tensor([-2.0, -3.0]))
    joined = SequenceScores.concat([first, second])
    assert joined.completion_lengths_B.tolist() == [1, 2]
    assert joined.sampled_logprobs_M.tolist() == [-1.0, -2.0, -3.0]


def _batch_with_holes() -> RolloutBatch:
    """Row 0: a masked token inside the completion (a tool output); row 1: all masked."""
    return RolloutBatch(
        prompt_ids=[[1, 2], [3], [4, 5, 6]],
        completion_ids_BT=torch.tensor([[7, 8, 9, 10], [11, 12, 13, 14], [15, 16, 17, 18]]),
        completion_mask_BT=torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]),
        teacher_prompt_ids=[[20, 21, 22], [3], [4, 5, 6]],  # row 0: privileged context
    )


def test_request_from_batch_skips_empty_rows_and_keeps_holes():
    request, rows = request_from_batch(_batch_with_holes(), top_k=3, temperature=0.9)
    assert rows == [0, 2]
    assert request.contexts() == [[20, 21, 22], [4, 5, 6]]
    # Row 0 is sent up to its last unmasked token; the masked 8 stays as context for the 9.
    assert request.completions() == [[7, 8, 9], [15, 16, 17, 18]]
    assert request.top_k == 3 and request.temperature == 0.9


def test_scores_from_sequences_scatters_back():
    batch = _batch_with_holes()
    _, rows = request_from_batch(batch, top_k=2)
    # 3 tokens for row 0 and 4 for row 2; the server returned a top-1 only (padded to 2 here).
    scores = SequenceScores(
        completion_lengths_B=torch.tensor([3, 4]),
        sampled_logprobs_M=torch.tensor([-0.1, -0.2, -0.3, -1.0, -2.0, -3.0, -4.0]),
        topk_ids_MK=torch.tensor([[30], [31], [32], [33], [34], [35], [36]]),
        topk_logprobs_MK=-torch.tensor([[0.01], [0.02], [0.03], [0.04], [0.05], [0.06], [0.07]]),
    )
    result = scores_from_sequences(
        scores, batch, rows, teacher_id="t", temperature=0.9, top_k=2, metrics={"m": 1.0}
    )
    expected_sampled_BT = torch.tensor(
        [[-0.1, 0.0, -0.3, 0.0], [0.0, 0.0, 0.0, 0.0], [-1.0, -2.0, -3.0, -4.0]]
    )
    assert torch.equal(result.sampled_logprobs_BT, expected_sampled_BT)
    assert result.topk_ids_BTK[:, :, 0].tolist() == [[30, 0, 32, 0], [0, 0, 0, 0], [33, 34, 35, 36]]
    assert torch.equal(result.topk_ids_BTK[:, :, 1], torch.zeros(3, 4, dtype=torch.int64))
    expected_top1_BT = torch.tensor(
        [[-0.01, -INF, -0.03, -INF], [-INF] * 4, [-0.04, -0.05, -0.06, -0.07]]
    )
    assert torch.equal(result.topk_logprobs_BTK[:, :, 0], expected_top1_BT)
    assert torch.isneginf(result.topk_logprobs_BTK[:, :, 1]).all()
    assert result.teacher_id == "t" and result.temperature == 0.9 and result.metrics == {"m": 1.0}


def test_scores_from_sequences_masks_a_neg_inf_score_without_nan():
    batch = _batch_with_holes()
    _, rows = request_from_batch(batch)
    scores = SequenceScores(
        completion_lengths_B=torch.tensor([3, 4]),
        sampled_logprobs_M=torch.tensor([-0.1, -INF, -0.3, -1.0, -2.0, -3.0, -4.0]),
    )
    result = scores_from_sequences(scores, batch, rows, teacher_id="t", temperature=1.0, top_k=0)
    assert torch.equal(result.sampled_logprobs_BT[0], torch.tensor([-0.1, 0.0, -0.3, 0.0]))
    assert result.topk_ids_BTK is None


def test_scores_from_sequences_needs_topk_when_asked():
    batch = _batch_with_holes()
    _, rows = request_from_batch(batch)
    scores = SequenceScores(torch.tensor([3, 4]), torch.zeros(7))
    with pytest.raises(WireError, match="returned no top-k although top_k=2"):
        scores_from_sequences(scores, batch, rows, teacher_id="t", temperature=1.0, top_k=2)


BIG = 2**63 - 1
REJECTIONS = [
    # (body, expected message, expected status)
    (b"", "empty body", 400),
    (b"\x00garbage that is not safetensors", "not a valid safetensors blob", 400),
    (_body(context_lengths=None), "missing tensor 'context_lengths'", 400),
    (_body(extra=torch.zeros(1)), "unknown tensors ['extra']", 400),
    (
        _body(context_ids=torch.tensor([3, 4, 5], dtype=torch.int16)),
        "dtype int16, expected int32 or int64",
        400,
    ),
    (
        _body(completion_ids=torch.tensor([6.0, 7.0, 8.0])),
        "dtype float32, expected int32 or int64",
        400,
    ),
    (_body(context_ids=torch.tensor([[3, 4, 5]])), "shape (1, 3), expected 1 dimension", 400),
    (_body(context_ids=torch.tensor([3, -4, 5])), "context token id -4 is outside", 400),
    (_body(completion_ids=torch.tensor([6, 50, 8])), "completion token id 50 is outside", 400),
    (_body(context_lengths=torch.tensor([3, 0])), "sequence 1 has an empty context", 400),
    (
        _body(completion_lengths=torch.tensor([0, 3]), completion_ids=torch.tensor([6, 7, 8])),
        "sequence 0 has an empty completion",
        400,
    ),
    (_body(completion_lengths=torch.tensor([1, 3])), "completion_lengths sum to 4", 400),
    (_body(context_lengths=torch.tensor([2, 1, 1])), "3 context lengths but 2 completion", 400),
    (
        _body(context_ids=torch.zeros(0, dtype=torch.int64), context_lengths=torch.tensor([0, 0])),
        "sequence 0 has an empty context",
        400,
    ),
    # Lengths whose int64 sum wraps around to the number of ids sent must not pass.
    (
        _body(
            context_ids=torch.zeros(0, dtype=torch.int64),
            context_lengths=torch.tensor([BIG, 1]),
            completion_lengths=torch.tensor([1, 2]),
        ),
        f"sequence 0 has {BIG} tokens; the limit is 16",
        413,
    ),
    (
        _body(context_ids=torch.ones(17, dtype=torch.int64), context_lengths=torch.tensor([16, 1])),
        "sequence 0 has 17 tokens; the limit is 16 (the server's --max-sequence-tokens)",
        413,
    ),
    (
        _body(
            context_ids=torch.ones(5, dtype=torch.int64),
            context_lengths=torch.ones(5, dtype=torch.int64),
            completion_ids=torch.ones(5, dtype=torch.int64),
            completion_lengths=torch.ones(5, dtype=torch.int64),
        ),
        "5 sequences in one request; the limit is 4",
        413,
    ),
    (
        _body(
            context_ids=torch.zeros(0, dtype=torch.int64),
            context_lengths=torch.zeros(0, dtype=torch.int64),
        ),
        "the request holds no sequences",
        400,
    ),
    (_body({"top_k": "9"}), "top_k=9 is outside [0, 8]", 400),
    (_body({"top_k": "-1"}), "top_k=-1 is outside [0, 8]", 400),
    (_body({"top_k": "two"}), "metadata top_k='two' is not a number", 400),
    (_body({"temperature": "0"}), "temperature must be a finite number > 0, got 0.0", 400),
    (_body({"temperature": "nan"}), "temperature must be a finite number > 0, got nan", 400),
    (_body({"temperature": "inf"}), "temperature must be a finite number > 0, got inf", 400),
]


@pytest.mark.parametrize(("body", "message", "status"), REJECTIONS)
def test_decode_request_rejects(body, message, status):
    with pytest.raises(WireError) as caught:
        decode_request(body, LIMITS)
    assert message in str(caught.value)
    assert caught.value.status == status


def test_decode_request_accepts_a_sequence_at_the_token_limit():
    body = _body(
        context_ids=torch.ones(16, dtype=torch.int64), context_lengths=torch.tensor([15, 1])
    )
    assert decode_request(body, LIMITS).contexts()[0] == [1] * 15


def test_decode_scores_rejects_a_request_blob():
    with pytest.raises(WireError, match="missing tensor 'sampled_logprobs'"):
        decode_scores(_body())


def test_sequence_scores_checks_shapes():
    with pytest.raises(WireError, match=r"expected \(3,\) for completion lengths summing to 3"):
        SequenceScores(torch.tensor([1, 2]), torch.zeros(2))
    with pytest.raises(WireError, match="come together"):
        SequenceScores(torch.tensor([1]), torch.zeros(1), topk_ids_MK=torch.zeros(1, 2))
