"""The teacher wire format: round trips, `[B, T]` <-> ragged conversion, and every rejection.

Pure functions on hand-built inputs; no model, no server. Run:
`.venv/bin/pytest tests/unit/test_wire.py`.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as safetensors_save

from opd.teacher import wire_header
from opd.teacher.wire import (
    MIN_TEMPERATURE,
    RESPONSE_HEADER_BYTES,
    RequestLimits,
    ScoreRequest,
    SequenceScores,
    WireError,
    decode_request,
    decode_scores,
    encode_request,
    encode_scores,
    estimated_response_bytes,
    make_request,
    request_from_batch,
    scores_from_sequences,
)
from opd.teacher.wire_header import MAX_HEADER_BYTES
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
        "context_ids has dtype int16 (I16), expected int32 (I32) or int64 (I64)",
        400,
    ),
    (
        _body(completion_ids=torch.tensor([6.0, 7.0, 8.0])),
        "completion_ids has dtype float32 (F32), expected int32 (I32) or int64 (I64)",
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
    (_body({"top_k": "two"}), "metadata top_k='two' is not an integer", 400),
    (_body({"top_k": "1e3"}), "metadata top_k='1e3' is not an integer", 400),
    (_body({"temperature": "warm"}), "metadata temperature='warm' is not a number", 400),
    (_body({"temperature": "0"}), "temperature must be a finite number >= 0.01", 400),
    (_body({"temperature": "-0"}), "got -0.0", 400),
    (_body({"temperature": "nan"}), "got nan", 400),
    (_body({"temperature": "inf"}), "got inf", 400),
    # Positive but tiny: logits / temperature overflows float32 and every score was NaN.
    (_body({"temperature": "1e-45"}), "temperature must be a finite number >= 0.01", 400),
    (_body({"temperature": "0.0099"}), "got 0.0099", 400),
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


# ------------------------------------------------------------------------------------------------
# The safetensors header is checked before safetensors reads the body
# ------------------------------------------------------------------------------------------------


def _blob(entries: list[tuple[str, str, list[int], bytes]], metadata: dict | None = None) -> bytes:
    """A safetensors blob written by hand: (name, dtype, shape, data) laid out back to back."""
    header: dict = {"__metadata__": metadata} if metadata is not None else {}
    offset = 0
    for name, dtype, shape, data in entries:
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    return _framed(json.dumps(header).encode(), b"".join(entry[3] for entry in entries))


def _framed(header_text: bytes, data: bytes = b"") -> bytes:
    return len(header_text).to_bytes(8, "little") + header_text + data


def _valid_header() -> tuple[dict, bytes]:
    """The JSON header and data of the valid request `_body()`, to break one field at a time."""
    body = _body()
    length = int.from_bytes(body[:8], "little")
    return json.loads(body[8 : 8 + length]), body[8 + length :]


def _with(edit) -> bytes:
    header, data = _valid_header()
    edit(header)
    return _framed(json.dumps(header).encode(), data)


@pytest.mark.parametrize(
    ("dtype", "named"),
    [
        ("F4", "F4"),
        ("F6_E2M3", "F6_E2M3"),
        ("F8_E8M0", "F8_E8M0"),  # safetensors knows it, torch does not: was a KeyError (500)
        ("F8_E4M3", "F8_E4M3"),
        ("BOOL", "bool (BOOL)"),
        ("I8", "int8 (I8)"),
        ("U16", "U16"),
        ("F16", "float16 (F16)"),
        ("BF16", "bfloat16 (BF16)"),
        ("F64", "float64 (F64)"),
        ("C64", "C64"),
        ("i64", "i64"),
    ],
)
def test_decode_request_names_a_refused_dtype(dtype, named):
    # A consistent blob: 3 one-byte elements, so only the dtype is wrong.
    body = _blob(
        [
            ("context_ids", dtype, [3], b"\x01\x02\x03"),
            ("context_lengths", "I64", [2], torch.tensor([2, 1]).numpy().tobytes()),
            ("completion_ids", "I64", [3], torch.tensor([6, 7, 8]).numpy().tobytes()),
            ("completion_lengths", "I64", [2], torch.tensor([1, 2]).numpy().tobytes()),
        ]
    )
    with pytest.raises(WireError) as caught:
        decode_request(body, LIMITS)
    assert str(caught.value) == (
        f"context_ids has dtype {named}, expected int32 (I32) or int64 (I64)"
    )
    assert caught.value.status == 400


def _set(tensor: str, key: str, value):
    return lambda header: header[tensor].__setitem__(key, value)


NOT_ST = "the body is not a valid safetensors blob: "
DEEP = b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"
HEADER_REJECTIONS = {
    "short body": (b"\x01\x02", NOT_ST + "it has 2 byte(s), less than its 8-byte header length"),
    "length past the body": (
        (100).to_bytes(8, "little") + b"{}",
        NOT_ST + "its header length is 100 bytes but only 2 bytes follow",
    ),
    "huge header": (_framed(b"{}" + b" " * MAX_HEADER_BYTES), f"over {MAX_HEADER_BYTES}"),
    "not utf-8": (_framed(b"{\xff}"), NOT_ST + "its header is not JSON ('utf-8' codec"),
    "bad JSON": (_framed(b'{"a": '), NOT_ST + "its header is not JSON (Expecting value"),
    "NaN constant": (_framed(b'{"a": NaN}'), "its header holds NaN, which JSON does not allow"),
    "duplicate key": (_framed(b'{"a": 1, "a": 2}'), "key 'a' appears twice in its header"),
    "deep nesting": (_framed(DEEP), NOT_ST + "its header is not JSON (maximum recursion"),
    "lone surrogate": (
        _framed(b'{"__metadata__": {"top_k": "\\ud800"}}'),
        NOT_ST + "its header holds '\\ud800', not Unicode",
    ),
    "a list": (_framed(b"[]"), NOT_ST + "its header is not a JSON object"),
    "leading space": (_framed(b" {}"), NOT_ST + "its header is not a JSON object"),
    "metadata list": (_framed(b'{"__metadata__": []}'), "__metadata__ must be an object of"),
    "metadata number": (
        _framed(b'{"__metadata__": {"top_k": 3}}'),
        NOT_ST + "__metadata__ 'top_k' must be a string, got int",
    ),
    "entry not an object": (_with(lambda h: h.update(context_ids=[1])), "needs exactly the keys"),
    "missing shape": (
        _with(lambda h: h["context_ids"].pop("shape")),
        NOT_ST + "tensor 'context_ids' needs exactly the keys dtype, shape and data_offsets",
    ),
    "extra key": (_with(_set("context_ids", "x", 1)), "needs exactly the keys"),
    "dtype not a string": (_with(_set("context_ids", "dtype", 8)), "has dtype <int>, expected"),
    "dtype a nested list": (_with(_set("context_ids", "dtype", [[["I64"]]])), "dtype <list>, exp"),
    "negative dim": (_with(_set("context_ids", "shape", [-3])), "has a shape that is not a list"),
    "bool dim": (_with(_set("context_ids", "shape", [True])), "has a shape that is not a list"),
    "float dim": (_with(_set("context_ids", "shape", [3.0])), "has a shape that is not a list"),
    "huge dim": (_with(_set("context_ids", "shape", [2**62, 0])), "at most 8 integers in [0, 80]"),
    "9 dims": (_with(_set("context_ids", "shape", [1] * 9)), "has a shape that is not a list"),
    "offsets past the data": (
        _with(_set("context_ids", "data_offsets", [0, 10**30])),
        NOT_ST
        + "tensor 'context_ids' needs data_offsets [begin, end] with 0 <= begin <= end <= 80",
    ),
    "offsets reversed": (_with(_set("context_ids", "data_offsets", [8, 0])), "needs data_offsets"),
    "offsets strings": (_with(_set("context_ids", "data_offsets", ["0", "8"])), "data_offsets"),
    "shape vs offsets": (
        _with(_set("context_ids", "shape", [2])),
        "tensor 'context_ids' has shape [2] of I64 (16 bytes) but its data_offsets [40, 64] span "
        "24 bytes",
    ),
    "overlap": (
        _with(_set("context_lengths", "data_offsets", [48, 64])),
        "tensor 'context_lengths' starts at byte 48 and overlaps the tensor before it",
    ),
    "gap": (
        _with(
            lambda h: h.update(context_ids={"dtype": "I64", "shape": [], "data_offsets": [40, 48]})
        ),
        "tensor 'context_lengths' starts at byte 64 and leaves a gap",
    ),
    "data past the tensors": (
        _body() + b"\x00" * 8,
        NOT_ST + "its tensors cover 80 of the 88 data bytes",
    ),
}


@pytest.mark.parametrize("case", list(HEADER_REJECTIONS))
def test_decode_request_rejects_a_bad_header(case):
    body, message = HEADER_REJECTIONS[case]
    with pytest.raises(WireError) as caught:
        decode_request(body, LIMITS)
    assert message in str(caught.value)
    assert caught.value.status == 400


def test_client_text_in_messages_is_ascii_and_short():
    # A lone surrogate cannot be encoded into the JSON error body; a huge name is not echoed.
    body = _with(lambda h: h.update({"\ud800" + "x" * 10_000: h.pop("context_ids")}))
    with pytest.raises(WireError) as caught:
        decode_request(body, LIMITS)
    message = str(caught.value)
    assert message.startswith(NOT_ST + "its header holds '\\ud800xxx") and message.isascii()
    assert message.endswith("...', not Unicode") and len(message) < 150
    body = _with(lambda h: h.update({"é" * 10_000: h.pop("context_ids")}))
    with pytest.raises(WireError) as caught:
        decode_request(body, LIMITS)
    message = str(caught.value)
    assert message.startswith("unknown tensors ['\\xe9\\xe9") and message.isascii()
    assert len(message) < 500


def test_loader_failures_left_after_the_header_checks_are_wire_errors(monkeypatch):
    """Defence in depth. No body known to us gets past the header checks and then fails in
    safetensors (that is the point of the checks), so the loader is replaced by one that fails
    the way `F8_E8M0` used to (a KeyError)."""

    def failing_load(body):
        raise KeyError("F8_E8M0")

    monkeypatch.setattr(wire_header, "safetensors_load", failing_load)
    with pytest.raises(WireError, match="not a valid safetensors blob: 'F8_E8M0'") as caught:
        decode_request(_body(), LIMITS)
    assert caught.value.status == 400


def test_decode_request_accepts_the_temperature_floor():
    decoded = decode_request(_body({"temperature": repr(MIN_TEMPERATURE)}), LIMITS)
    assert decoded.temperature == MIN_TEMPERATURE


# ------------------------------------------------------------------------------------------------
# Response size (amplification): refused before anything is scored
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [0, 5])
def test_estimated_response_bytes_bounds_the_real_response(top_k):
    request = make_request([[1, 2], [3]], [[4, 5, 6], [7] * 40], top_k=top_k)
    num_tokens = 43
    scores = SequenceScores(
        completion_lengths_B=request.completion_lengths_B,
        sampled_logprobs_M=torch.zeros(num_tokens),
        topk_ids_MK=torch.zeros(num_tokens, top_k, dtype=torch.int64) if top_k else None,
        topk_logprobs_MK=torch.zeros(num_tokens, top_k) if top_k else None,
    )
    teacher_id = "/models/" + "a-long-teacher-name" * 20
    actual = len(encode_scores(scores, teacher_id=teacher_id, temperature=0.7))
    estimate = estimated_response_bytes(request)
    assert actual <= estimate <= actual + RESPONSE_HEADER_BYTES
    assert estimate - RESPONSE_HEADER_BYTES == num_tokens * (4 + 8 * top_k) + 8 * 2


def test_decode_request_refuses_a_response_over_the_limit():
    body = _body({"top_k": "8"})  # 3 completion tokens, 2 sequences
    estimate = 3 * (4 + 8 * 8) + 8 * 2 + RESPONSE_HEADER_BYTES
    at_limit = RequestLimits(vocab_size=50, max_top_k=8, max_response_bytes=estimate)
    assert decode_request(body, at_limit).top_k == 8
    below = RequestLimits(vocab_size=50, max_top_k=8, max_response_bytes=estimate - 1)
    with pytest.raises(WireError) as caught:
        decode_request(body, below)
    assert caught.value.status == 413
    assert str(caught.value) == (
        f"the response would be about {estimate} bytes (3 completion tokens at top_k=8), above "
        f"the server's limit of {estimate - 1} bytes (--max_response_bytes); lower top_k or send "
        "fewer sequences per request (teacher_batch_size)"
    )


def _chunk_body(num_sequences: int, completion_tokens: int, top_k: int) -> bytes:
    return encode_request(
        ScoreRequest(
            context_ids_N=torch.ones(num_sequences, dtype=torch.int64),
            context_lengths_B=torch.ones(num_sequences, dtype=torch.int64),
            completion_ids_M=torch.ones(num_sequences * completion_tokens, dtype=torch.int64),
            completion_lengths_B=torch.full((num_sequences,), completion_tokens),
            top_k=top_k,
        )
    )


def test_default_response_limit_fits_the_default_client_chunk():
    """256 MiB: the client's default chunk (16 sequences) at top_k=128 passes with 16000-token
    completions; 16384-token ones (a 1 MiB body asking for 257 MiB back) are refused."""
    limits = RequestLimits(vocab_size=50, max_sequence_tokens=1 << 20)
    assert limits.max_response_bytes == 256 * 1024 * 1024
    assert decode_request(_chunk_body(16, 16_000, top_k=128), limits).num_sequences == 16
    with pytest.raises(WireError, match="lower top_k or send fewer sequences") as caught:
        decode_request(_chunk_body(16, 16_384, top_k=128), limits)
    assert caught.value.status == 413
