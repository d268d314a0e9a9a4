"""Ragged score requests/responses and their binary wire format.

Every teacher (in-process, our HTTP server, stock vLLM, offline shards) scores the same thing:
for each sequence, the teacher's context ids and the completion ids after it. Here that is a
`ScoreRequest` of flat int64 arrays plus per-sequence lengths, and the answer a `SequenceScores`
of flat per-token arrays. No padding travels: a batch of short and long completions costs only
its real tokens.

On the wire both are safetensors blobs (`safetensors.torch.save`): named tensors with explicit
dtypes and shapes, and a small string metadata header (`top_k`, `temperature`, `teacher_id`).
Parsing never unpickles anything. The JSON header is checked field by field (allow-listed
dtypes, shapes, offsets that tile the data, string metadata) before safetensors reads the bytes,
and `decode_request` checks every field a client controls, down to a temperature floor
(`MIN_TEMPERATURE`: scores stay finite) and the size of the answer asked for
(`RequestLimits.max_response_bytes`, checked before the model runs). So a bad body becomes a
`WireError` (HTTP 4xx) naming what is wrong, never a server crash.

`request_from_batch` / `scores_from_sequences` convert to and from the trainer's `[B, T]`
`RolloutBatch` / `TeacherScores`.

Test: `pytest tests/unit/test_wire.py tests/unit/test_wire_fuzz.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from safetensors.torch import save as safetensors_save

# CONTENT_TYPE and WireError are part of this module's interface; they live with the header checks.
from opd.teacher.wire_header import CONTENT_TYPE as CONTENT_TYPE
from opd.teacher.wire_header import (
    REQUEST_DTYPES,
    SCORES_DTYPES,
    WireError,
    load_checked,
    quoted,
)
from opd.types import MIN_TEMPERATURE, RolloutBatch, TeacherScores

# Response header: seconds the server spent on the request (queue + scoring + encoding).
SERVER_SECONDS_HEADER = "X-OPD-Server-Seconds"
REQUEST_TENSORS = ("context_ids", "context_lengths", "completion_ids", "completion_lengths")


@dataclass(frozen=True)
class ScoreRequest:
    """Sequences to score: sequence i is `context_i + completion_i`; only completions are scored."""

    context_ids_N: torch.Tensor
    """int64, every context concatenated."""
    context_lengths_B: torch.Tensor
    """int64 [B] tokens of each context (>= 1: a completion token needs a token before it)."""
    completion_ids_M: torch.Tensor
    """int64, every completion concatenated."""
    completion_lengths_B: torch.Tensor
    """int64 [B] tokens of each completion (>= 1)."""
    top_k: int = 0
    temperature: float = 1.0

    @property
    def num_sequences(self) -> int:
        return int(self.context_lengths_B.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.context_ids_N.numel() + self.completion_ids_M.numel())

    def contexts(self) -> list[list[int]]:
        return [c.tolist() for c in self.context_ids_N.split(self.context_lengths_B.tolist())]

    def completions(self) -> list[list[int]]:
        return [c.tolist() for c in self.completion_ids_M.split(self.completion_lengths_B.tolist())]

    def chunks(self, num_sequences: int) -> list[ScoreRequest]:
        """Consecutive requests of at most `num_sequences` sequences each (client chunking).

        Slices of the flat arrays: no ids go through Python lists.
        """
        context_ends = [0, *self.context_lengths_B.cumsum(0).tolist()]
        completion_ends = [0, *self.completion_lengths_B.cumsum(0).tolist()]
        parts = []
        for lo in range(0, self.num_sequences, num_sequences):
            hi = min(lo + num_sequences, self.num_sequences)
            parts.append(
                ScoreRequest(
                    context_ids_N=self.context_ids_N[context_ends[lo] : context_ends[hi]],
                    context_lengths_B=self.context_lengths_B[lo:hi],
                    completion_ids_M=self.completion_ids_M[
                        completion_ends[lo] : completion_ends[hi]
                    ],
                    completion_lengths_B=self.completion_lengths_B[lo:hi],
                    top_k=self.top_k,
                    temperature=self.temperature,
                )
            )
        return parts


@dataclass(frozen=True)
class SequenceScores:
    """The teacher's judgement of every completion token of a `ScoreRequest`, flat."""

    completion_lengths_B: torch.Tensor
    """int64 [B] as in the request: splits the flat arrays back into sequences."""
    sampled_logprobs_M: torch.Tensor
    """float32 [M] the teacher's logprob of each completion token."""
    topk_ids_MK: torch.Tensor | None = None
    """int32/int64 [M, K] the teacher's top-k ids at each position (int32 on the wire)."""
    topk_logprobs_MK: torch.Tensor | None = None
    """float32 [M, K] their logprobs, descending, -inf padded."""

    def __post_init__(self):
        num_tokens = int(self.completion_lengths_B.sum())
        if tuple(self.sampled_logprobs_M.shape) != (num_tokens,):
            raise WireError(
                f"sampled_logprobs has shape {tuple(self.sampled_logprobs_M.shape)}, "
                f"expected ({num_tokens},) for completion lengths summing to {num_tokens}"
            )
        if (self.topk_ids_MK is None) != (self.topk_logprobs_MK is None):
            raise WireError("topk_ids and topk_logprobs come together")
        if self.topk_ids_MK is not None:
            shape = tuple(self.topk_ids_MK.shape)
            if len(shape) != 2 or shape[0] != num_tokens or self.topk_logprobs_MK.shape != shape:
                raise WireError(
                    f"top-k arrays have shapes {shape} and "
                    f"{tuple(self.topk_logprobs_MK.shape)}, expected ({num_tokens}, K)"
                )

    @staticmethod
    def empty(top_k: int) -> SequenceScores:
        """Scores of no sequences (a batch whose every row is masked)."""
        return SequenceScores(
            completion_lengths_B=torch.zeros(0, dtype=torch.int64),
            sampled_logprobs_M=torch.zeros(0),
            topk_ids_MK=torch.zeros(0, top_k, dtype=torch.int64) if top_k else None,
            topk_logprobs_MK=torch.zeros(0, top_k) if top_k else None,
        )

    @staticmethod
    def concat(parts: list[SequenceScores]) -> SequenceScores:
        """Scores of consecutive requests, in order, as one."""
        has_topk = parts[0].topk_ids_MK is not None
        return SequenceScores(
            completion_lengths_B=torch.cat([p.completion_lengths_B for p in parts]),
            sampled_logprobs_M=torch.cat([p.sampled_logprobs_M for p in parts]),
            topk_ids_MK=torch.cat([p.topk_ids_MK for p in parts]) if has_topk else None,
            topk_logprobs_MK=torch.cat([p.topk_logprobs_MK for p in parts]) if has_topk else None,
        )


def make_request(
    contexts: list[list[int]], completions: list[list[int]], *, top_k: int = 0, temperature=1.0
) -> ScoreRequest:
    def flat(rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor([i for row in rows for i in row], dtype=torch.int64)

    return ScoreRequest(
        context_ids_N=flat(contexts),
        context_lengths_B=torch.tensor([len(c) for c in contexts], dtype=torch.int64),
        completion_ids_M=flat(completions),
        completion_lengths_B=torch.tensor([len(c) for c in completions], dtype=torch.int64),
        top_k=int(top_k),
        temperature=float(temperature),
    )


# ------------------------------------------------------------------------------------------------
# [B, T] batches <-> ragged requests
# ------------------------------------------------------------------------------------------------


def request_from_batch(
    batch: RolloutBatch, *, top_k: int = 0, temperature: float = 1.0
) -> tuple[ScoreRequest, list[int]]:
    """The batch's non-empty rows as a request, and which rows those are.

    A row's completion is sent up to its last unmasked token (masked tokens inside it, e.g. tool
    outputs, are still context for the tokens after them). All-masked rows are not sent.
    """
    mask_BT = batch.completion_mask_BT.bool().cpu()
    num_tokens = mask_BT.shape[1]
    positions_T = torch.arange(1, num_tokens + 1)
    lengths_B = (mask_BT * positions_T).amax(dim=1) if num_tokens else torch.zeros(len(mask_BT))
    rows = [row for row, length in enumerate(lengths_B.tolist()) if length > 0]
    contexts = batch.teacher_context_ids
    completion_ids_BT = batch.completion_ids_BT.cpu()
    request = make_request(
        [list(contexts[row]) for row in rows],
        [completion_ids_BT[row, : int(lengths_B[row])].tolist() for row in rows],
        top_k=top_k,
        temperature=temperature,
    )
    return request, rows


def score_batch(
    score_sequences: Callable[[ScoreRequest], SequenceScores],
    batch: RolloutBatch,
    *,
    top_k: int,
    temperature: float,
    teacher_id: str,
) -> TeacherScores:
    """`batch` scored by any teacher's ragged `score_sequences`, with `teacher/latency_s`."""
    start = time.perf_counter()
    request, rows = request_from_batch(batch, top_k=top_k, temperature=temperature)
    scores = score_sequences(request) if rows else SequenceScores.empty(top_k)
    return scores_from_sequences(
        scores,
        batch,
        rows,
        teacher_id=teacher_id,
        temperature=temperature,
        top_k=top_k,
        metrics={"teacher/latency_s": time.perf_counter() - start},
    )


class SequenceTeacher(Protocol):
    """A teacher that scores ragged requests itself, at one temperature, under one name."""

    teacher_id: str
    temperature: float

    def score_sequences(self, request: ScoreRequest) -> SequenceScores: ...


def score_batch_with(teacher: SequenceTeacher, batch: RolloutBatch, *, top_k: int) -> TeacherScores:
    """`score_batch` through the teacher's own `score_sequences`: the body of its `score`."""
    return score_batch(
        teacher.score_sequences,
        batch,
        top_k=top_k,
        temperature=teacher.temperature,
        teacher_id=teacher.teacher_id,
    )


def scores_from_sequences(
    scores: SequenceScores,
    batch: RolloutBatch,
    rows: list[int],
    *,
    teacher_id: str,
    temperature: float,
    top_k: int,
    metrics: dict[str, float] | None = None,
) -> TeacherScores:
    """Scatter ragged scores back to the batch's `[B, T]` layout (0 / -inf where masked)."""
    if top_k and scores.topk_ids_MK is None:
        raise WireError(f"the teacher returned no top-k although top_k={top_k} was requested")
    mask_BT = batch.completion_mask_BT.cpu()
    num_rows, num_tokens = mask_BT.shape
    sampled_BT = torch.zeros(num_rows, num_tokens, dtype=torch.float32)
    topk_ids_BTK = torch.zeros(num_rows, num_tokens, top_k, dtype=torch.int64)
    topk_logprobs_BTK = torch.full((num_rows, num_tokens, top_k), -torch.inf)
    lengths = scores.completion_lengths_B.tolist()
    offset = 0
    for row, length in zip(rows, lengths, strict=True):
        sampled_BT[row, :length] = scores.sampled_logprobs_M[offset : offset + length]
        if top_k:
            width = min(top_k, scores.topk_ids_MK.shape[1])
            topk_ids_BTK[row, :length, :width] = scores.topk_ids_MK[
                offset : offset + length, :width
            ]
            topk_logprobs_BTK[row, :length, :width] = scores.topk_logprobs_MK[
                offset : offset + length, :width
            ]
        offset += length
    # Masked tokens inside a completion (tool outputs) were scored as context only: they get the
    # same 0 / -inf as padding (`where`, not a product, so a -inf score never becomes NaN).
    valid_BT = mask_BT.bool()
    return TeacherScores(
        sampled_logprobs_BT=torch.where(valid_BT, sampled_BT, 0.0),
        completion_mask_BT=mask_BT,
        topk_ids_BTK=torch.where(valid_BT[..., None], topk_ids_BTK, 0) if top_k else None,
        topk_logprobs_BTK=(
            torch.where(valid_BT[..., None], topk_logprobs_BTK, -torch.inf) if top_k else None
        ),
        teacher_id=teacher_id,
        temperature=temperature,
        metrics=dict(metrics or {}),
    )


# ------------------------------------------------------------------------------------------------
# Binary encoding
# ------------------------------------------------------------------------------------------------


def encode_request(request: ScoreRequest) -> bytes:
    # int32 on the wire (vocabularies and lengths fit): half the bytes of int64.
    tensors = {
        name: getattr(request, _field(name)).to(torch.int32).contiguous()
        for name in REQUEST_TENSORS
    }
    metadata = {"top_k": str(request.top_k), "temperature": repr(request.temperature)}
    return safetensors_save(tensors, metadata=metadata)


def encode_scores(scores: SequenceScores, *, teacher_id: str = "", temperature=1.0) -> bytes:
    tensors = {
        "completion_lengths": scores.completion_lengths_B.contiguous(),
        "sampled_logprobs": scores.sampled_logprobs_M.contiguous(),
    }
    if scores.topk_ids_MK is not None:
        tensors["topk_ids"] = scores.topk_ids_MK.to(torch.int32).contiguous()
        tensors["topk_logprobs"] = scores.topk_logprobs_MK.contiguous()
    metadata = {"teacher_id": teacher_id, "temperature": repr(float(temperature))}
    return safetensors_save(tensors, metadata=metadata)


def decode_scores(body: bytes) -> tuple[SequenceScores, dict[str, str]]:
    """A server's response; raises `WireError` when it is not a scores blob."""
    tensors, metadata = load_checked(body, SCORES_DTYPES)
    for name, dtype in (("completion_lengths", torch.int64), ("sampled_logprobs", torch.float32)):
        _expect(tensors, name, dtype, ndim=1)
    if "topk_ids" in tensors:
        _expect(tensors, "topk_ids", (torch.int32, torch.int64), ndim=2)
        _expect(tensors, "topk_logprobs", torch.float32, ndim=2)
    scores = SequenceScores(
        completion_lengths_B=tensors["completion_lengths"],
        sampled_logprobs_M=tensors["sampled_logprobs"],
        topk_ids_MK=tensors.get("topk_ids"),
        topk_logprobs_MK=tensors.get("topk_logprobs"),
    )
    return scores, metadata


# ------------------------------------------------------------------------------------------------
# Request validation (the server's boundary)
# ------------------------------------------------------------------------------------------------


# A response carries, per completion token, its sampled logprob (float32) and with top_k its
# top-k ids (int32) and logprobs (float32): 4 + 8 * top_k bytes, so a request of 4-byte ids can
# ask for ~260x its own size back (top_k=128). The estimate is checked before the model runs.
# 256 MiB: the server holds a response a few times over (score tensors, the encoded blob, the
# HTTP buffer), about 1 GiB per request at the limit, yet the client's default chunk
# (teacher_batch_size=16 sequences) fits with completions up to 16k tokens at top_k=128 (32k
# tokens at top_k=64).
DEFAULT_MAX_RESPONSE_BYTES = 256 * 1024 * 1024
# The response's safetensors header (4 tensor entries, teacher id, temperature), rounded up.
RESPONSE_HEADER_BYTES = 4096


@dataclass(frozen=True)
class RequestLimits:
    """What a server accepts; each violation is a 4xx naming the limit."""

    vocab_size: int
    max_top_k: int = 128
    max_sequence_tokens: int = 32768
    max_sequences: int = 4096
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    """Largest `estimated_response_bytes` of a request (413 above it)."""


def estimated_response_bytes(request: ScoreRequest) -> int:
    """Bytes of the scores blob answering `request` (tensors plus a header allowance)."""
    num_tokens = int(request.completion_ids_M.numel())
    per_token = 4 + 8 * request.top_k  # sampled float32; top-k int32 ids + float32 logprobs
    return num_tokens * per_token + 8 * request.num_sequences + RESPONSE_HEADER_BYTES


def decode_request(body: bytes, limits: RequestLimits) -> ScoreRequest:
    """Parse and validate a client's request body; raises `WireError` (4xx) on anything wrong."""
    tensors, metadata = load_checked(body, REQUEST_DTYPES, names=REQUEST_TENSORS)
    for name in REQUEST_TENSORS:
        _expect(tensors, name, (torch.int32, torch.int64), ndim=1)
        tensors[name] = tensors[name].to(torch.int64)
    top_k = _metadata_number(metadata, "top_k", int, default=0)
    temperature = _metadata_number(metadata, "temperature", float, default=1.0)
    _check_sampling(top_k, temperature, limits)
    request = ScoreRequest(
        context_ids_N=tensors["context_ids"],
        context_lengths_B=tensors["context_lengths"],
        completion_ids_M=tensors["completion_ids"],
        completion_lengths_B=tensors["completion_lengths"],
        top_k=top_k,
        temperature=temperature,
    )
    _check_request(request, limits)
    _check_response_size(request, limits)
    return request


def _check_sampling(top_k: int, temperature: float, limits: RequestLimits) -> None:
    if not 0 <= top_k <= limits.max_top_k:
        raise WireError(
            f"top_k={top_k} is outside [0, {limits.max_top_k}] (the server's --max-top-k)"
        )
    # Written so that NaN fails too.
    if not (MIN_TEMPERATURE <= temperature < float("inf")):
        raise WireError(
            f"temperature must be a finite number >= {MIN_TEMPERATURE} (below it logits / "
            f"temperature overflow float32), got {temperature}"
        )


def _check_request(request: ScoreRequest, limits: RequestLimits) -> None:
    num_sequences = request.num_sequences
    if num_sequences == 0:
        raise WireError("the request holds no sequences")
    if num_sequences > limits.max_sequences:
        raise WireError(
            f"{num_sequences} sequences in one request; the limit is {limits.max_sequences}",
            status=413,
        )
    if request.completion_lengths_B.numel() != num_sequences:
        raise WireError(
            f"{num_sequences} context lengths but "
            f"{request.completion_lengths_B.numel()} completion lengths"
        )
    # Lengths are bounded before anything adds them: huge client-sent lengths could otherwise
    # overflow int64 sums and pass the checks below.
    _check_sequence_tokens(request.context_lengths_B, limits)
    _check_sequence_tokens(request.completion_lengths_B, limits)
    for name, ids, lengths in (
        ("context", request.context_ids_N, request.context_lengths_B),
        ("completion", request.completion_ids_M, request.completion_lengths_B),
    ):
        if int(lengths.min()) < 1:
            row = int((lengths < 1).nonzero()[0])
            raise WireError(f"sequence {row} has an empty {name} (each needs >= 1 token)")
        if int(lengths.sum()) != ids.numel():
            raise WireError(
                f"{name}_lengths sum to {int(lengths.sum())} but {name}_ids holds {ids.numel()} ids"
            )
        if int(ids.min()) < 0 or int(ids.max()) >= limits.vocab_size:
            bad = int(ids[(ids < 0) | (ids >= limits.vocab_size)][0])
            raise WireError(
                f"{name} token id {bad} is outside the teacher's vocabulary "
                f"[0, {limits.vocab_size})"
            )
    _check_sequence_tokens(request.context_lengths_B + request.completion_lengths_B, limits)


def _check_sequence_tokens(tokens_B: torch.Tensor, limits: RequestLimits) -> None:
    if int(tokens_B.max()) > limits.max_sequence_tokens:
        row = int(tokens_B.argmax())
        raise WireError(
            f"sequence {row} has {int(tokens_B[row])} tokens; the limit is "
            f"{limits.max_sequence_tokens} (the server's --max-sequence-tokens)",
            status=413,
        )


def _check_response_size(request: ScoreRequest, limits: RequestLimits) -> None:
    estimate = estimated_response_bytes(request)
    if estimate > limits.max_response_bytes:
        raise WireError(
            f"the response would be about {estimate} bytes "
            f"({request.completion_ids_M.numel()} completion tokens at top_k={request.top_k}), "
            f"above the server's limit of {limits.max_response_bytes} bytes "
            "(--max_response_bytes); lower top_k or send fewer sequences per request "
            "(teacher_batch_size)",
            status=413,
        )


def _metadata_number(metadata: dict[str, str], key: str, kind, *, default):
    if key not in metadata:
        return default
    try:
        return kind(metadata[key])
    except ValueError as error:
        expected = "an integer" if kind is int else "a number"
        raise WireError(f"metadata {key}={quoted(metadata[key])} is not {expected}") from error


def _expect(tensors, name: str, dtype, *, ndim: int) -> None:
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if name not in tensors:
        raise WireError(f"missing tensor {name!r}")
    tensor = tensors[name]
    if tensor.dtype not in dtypes:
        expected = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise WireError(
            f"{name} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected {expected}"
        )
    if tensor.ndim != ndim:
        raise WireError(f"{name} has shape {tuple(tensor.shape)}, expected {ndim} dimension(s)")


def _field(tensor_name: str) -> str:
    suffix = (
        "_N" if tensor_name == "context_ids" else "_M" if tensor_name == "completion_ids" else "_B"
    )
    return tensor_name + suffix
