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

import dataclasses
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
# Optional request tensor: token ids to score at each completion position (-1 pads a row).
CANDIDATE_TENSOR = "candidate_ids"
# Dtypes a client may ask the final hidden states in ("": none), with their bytes per value.
HIDDEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
    hidden_dtype: str = ""
    """"float32" or "bfloat16": also return the final hidden state predicting each completion
    token (the client applies the teacher's output head); "" for none."""
    candidate_ids_MC: torch.Tensor | None = None
    """int64 [M, C] token ids whose teacher logprobs to return at each completion position; -1
    pads a position's row (its logprob comes back as -inf)."""

    @property
    def num_candidates(self) -> int:
        return 0 if self.candidate_ids_MC is None else int(self.candidate_ids_MC.shape[1])

    @property
    def group_key(self) -> tuple[int, float, str, int]:
        """Requests with the same key ask for the same things and can share a backend call."""
        return (self.top_k, self.temperature, self.hidden_dtype, self.num_candidates)

    def with_sequences(self, **tensors: torch.Tensor | None) -> ScoreRequest:
        """This request's options with other sequences (the four id/length tensors and the
        candidate ids, when it has any)."""
        return dataclasses.replace(self, **tensors)

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
            tokens = slice(completion_ends[lo], completion_ends[hi])
            parts.append(
                self.with_sequences(
                    context_ids_N=self.context_ids_N[context_ends[lo] : context_ends[hi]],
                    context_lengths_B=self.context_lengths_B[lo:hi],
                    completion_ids_M=self.completion_ids_M[tokens],
                    completion_lengths_B=self.completion_lengths_B[lo:hi],
                    candidate_ids_MC=None
                    if self.candidate_ids_MC is None
                    else self.candidate_ids_MC[tokens],
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
    hidden_MH: torch.Tensor | None = None
    """float32/bfloat16 [M, H] the final hidden state predicting each completion token."""
    candidate_logprobs_MC: torch.Tensor | None = None
    """float32 [M, C] the teacher's logprobs at the request's candidate ids (-inf at -1)."""

    def __post_init__(self):
        num_tokens = int(self.completion_lengths_B.sum())
        if tuple(self.sampled_logprobs_M.shape) != (num_tokens,):
            raise WireError(
                f"sampled_logprobs has shape {tuple(self.sampled_logprobs_M.shape)}, "
                f"expected ({num_tokens},) for completion lengths summing to {num_tokens}"
            )
        if (self.topk_ids_MK is None) != (self.topk_logprobs_MK is None):
            raise WireError("topk_ids and topk_logprobs come together")
        if self.topk_ids_MK is not None and self.topk_logprobs_MK.shape != self.topk_ids_MK.shape:
            raise WireError(
                f"top-k arrays have shapes {tuple(self.topk_ids_MK.shape)} and "
                f"{tuple(self.topk_logprobs_MK.shape)}"
            )
        for name, values in self.per_token().items():
            if values.ndim != (1 if name == "sampled_logprobs_M" else 2):
                raise WireError(f"{name} has shape {tuple(values.shape)}")
            if values.shape[0] != num_tokens:
                raise WireError(
                    f"{name} has {values.shape[0]} rows, expected {num_tokens} (one per "
                    "completion token)"
                )

    def per_token(self) -> dict[str, torch.Tensor]:
        """The present per-token tensors (rows = completion tokens), by field name."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "completion_lengths_B" and getattr(self, f.name) is not None
        }

    @staticmethod
    def empty(request: ScoreRequest, hidden_size: int = 0) -> SequenceScores:
        """Scores of no sequences (a batch whose every row is masked), with the fields that
        `request`'s options ask for."""
        top_k, num_candidates = request.top_k, request.num_candidates
        dtype = HIDDEN_DTYPES.get(request.hidden_dtype)
        return SequenceScores(
            completion_lengths_B=torch.zeros(0, dtype=torch.int64),
            sampled_logprobs_M=torch.zeros(0),
            topk_ids_MK=torch.zeros(0, top_k, dtype=torch.int64) if top_k else None,
            topk_logprobs_MK=torch.zeros(0, top_k) if top_k else None,
            hidden_MH=None if dtype is None else torch.zeros(0, hidden_size, dtype=dtype),
            candidate_logprobs_MC=torch.zeros(0, num_candidates) if num_candidates else None,
        )

    @staticmethod
    def concat(parts: list[SequenceScores]) -> SequenceScores:
        """Scores of consecutive requests, in order, as one."""
        names = parts[0].per_token()
        return SequenceScores(
            completion_lengths_B=torch.cat([p.completion_lengths_B for p in parts]),
            **{name: torch.cat([p.per_token()[name] for p in parts]) for name in names},
        )

    def split(self, num_sequences: list[int]) -> list[SequenceScores]:
        """Consecutive runs of `num_sequences` sequences, each as its own scores."""
        assert self.completion_lengths_B.numel() == sum(num_sequences), "lost or added sequences"
        lengths_per_part = list(self.completion_lengths_B.split(num_sequences))
        tokens_per_part = [int(lengths.sum()) for lengths in lengths_per_part]
        columns = {name: values.split(tokens_per_part) for name, values in self.per_token().items()}
        return [
            SequenceScores(lengths, **{name: parts[i] for name, parts in columns.items()})
            for i, lengths in enumerate(lengths_per_part)
        ]


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
    batch: RolloutBatch,
    *,
    top_k: int = 0,
    temperature: float = 1.0,
    hidden_dtype: str = "",
    candidate_ids_BTC: torch.Tensor | None = None,
) -> tuple[ScoreRequest, list[int]]:
    """The batch's non-empty rows as a request, and which rows those are.

    A row's completion is sent up to its last unmasked token (masked tokens inside it, e.g. tool
    outputs, are still context for the tokens after them). All-masked rows are not sent.
    `candidate_ids_BTC` (-1 pads) travel for the same positions.
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
    candidates_MC = None
    if candidate_ids_BTC is not None:
        candidate_ids_BTC = candidate_ids_BTC.cpu().long()
        width = candidate_ids_BTC.shape[-1]
        rows_ids = [candidate_ids_BTC[row, : int(lengths_B[row])] for row in rows]
        candidates_MC = torch.cat(rows_ids) if rows_ids else torch.zeros(0, width).long()
    return dataclasses.replace(
        request, hidden_dtype=hidden_dtype, candidate_ids_MC=candidates_MC
    ), rows


def scatter_to_batch(
    values_M: torch.Tensor, batch: RolloutBatch, rows: list[int], lengths_B: torch.Tensor, *, fill
) -> torch.Tensor:
    """Per-token values of `rows` (flat, `lengths_B` tokens each) in the batch's `[B, T, ...]`
    layout; `fill` on padding and on masked tokens inside a completion (tool outputs, scored as
    context only)."""
    mask_BT = batch.completion_mask_BT.bool().cpu()
    shape = (*mask_BT.shape, *values_M.shape[1:])
    values_BT = torch.full(shape, fill, dtype=values_M.dtype)
    offset = 0
    for row, length in zip(rows, lengths_B.tolist(), strict=True):
        values_BT[row, :length] = values_M[offset : offset + length]
        offset += length
    keep = mask_BT.view(*mask_BT.shape, *([1] * (values_M.ndim - 1)))
    # `where`, not a product: a -inf score must never become NaN.
    return torch.where(keep, values_BT, torch.tensor(fill, dtype=values_M.dtype))


def score_batch(
    score_sequences: Callable[[ScoreRequest], SequenceScores],
    batch: RolloutBatch,
    *,
    top_k: int,
    temperature: float,
    teacher_id: str,
) -> TeacherScores:
    """`batch` scored by any teacher's ragged `score_sequences`, with `teacher/latency_s`."""
    scores, _ = score_batch_with_extras(
        score_sequences, batch, top_k=top_k, temperature=temperature, teacher_id=teacher_id
    )
    return scores


def score_batch_with_extras(
    score_sequences: Callable[[ScoreRequest], SequenceScores],
    batch: RolloutBatch,
    *,
    top_k: int,
    temperature: float,
    teacher_id: str,
    hidden_dtype: str = "",
    candidate_ids_BTC: torch.Tensor | None = None,
    hidden_size: int = 0,
) -> tuple[TeacherScores, dict[str, torch.Tensor]]:
    """`score_batch`, plus what the request's options asked for in the batch's layout:
    `hidden_BTH` (0 where masked) with `hidden_dtype`, `candidate_logprobs_BTC` (-inf where
    masked or padded) with `candidate_ids_BTC`."""
    start = time.perf_counter()
    request, rows = request_from_batch(
        batch, top_k=top_k, temperature=temperature, hidden_dtype=hidden_dtype,
        candidate_ids_BTC=candidate_ids_BTC,
    )  # fmt: skip
    sequences = score_sequences(request) if rows else SequenceScores.empty(request, hidden_size)
    scores = scores_from_sequences(
        sequences,
        batch,
        rows,
        teacher_id=teacher_id,
        temperature=temperature,
        top_k=top_k,
        metrics={"teacher/latency_s": time.perf_counter() - start},
    )
    lengths_B = sequences.completion_lengths_B
    extras = {}
    if hidden_dtype:
        if sequences.hidden_MH is None:
            raise WireError("the teacher returned no hidden states although they were requested")
        extras["hidden_BTH"] = scatter_to_batch(sequences.hidden_MH, batch, rows, lengths_B, fill=0)
    if candidate_ids_BTC is not None:
        if sequences.candidate_logprobs_MC is None:
            raise WireError("the teacher returned no candidate logprobs although they were asked")
        extras["candidate_logprobs_BTC"] = scatter_to_batch(
            sequences.candidate_logprobs_MC, batch, rows, lengths_B, fill=-torch.inf
        )
    return scores, extras


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


def candidate_logprobs_with(
    teacher: SequenceTeacher,
    batch: RolloutBatch,
    candidate_ids_BTC: torch.Tensor,
    *,
    temperature: float | None = None,
) -> torch.Tensor:
    """float32 `[B, T, C]` the teacher's logprobs at `candidate_ids_BTC` (-1 pads; -inf there
    and where masked), through its own `score_sequences`: the body of `score_candidates`."""
    _, extras = score_batch_with_extras(
        teacher.score_sequences,
        batch,
        top_k=0,
        temperature=teacher.temperature if temperature is None else temperature,
        teacher_id=teacher.teacher_id,
        candidate_ids_BTC=candidate_ids_BTC,
    )
    return extras["candidate_logprobs_BTC"]


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
    lengths_B = scores.completion_lengths_B
    topk_ids_BTK = topk_logprobs_BTK = None
    if top_k:
        width = min(top_k, scores.topk_ids_MK.shape[1])
        ids_MK = torch.zeros(scores.topk_ids_MK.shape[0], top_k, dtype=torch.int64)
        ids_MK[:, :width] = scores.topk_ids_MK[:, :width]
        logprobs_MK = torch.full((ids_MK.shape[0], top_k), -torch.inf)
        logprobs_MK[:, :width] = scores.topk_logprobs_MK[:, :width]
        topk_ids_BTK = scatter_to_batch(ids_MK, batch, rows, lengths_B, fill=0)
        topk_logprobs_BTK = scatter_to_batch(logprobs_MK, batch, rows, lengths_B, fill=-torch.inf)
    sampled_M = scores.sampled_logprobs_M.float()
    return TeacherScores(
        sampled_logprobs_BT=scatter_to_batch(sampled_M, batch, rows, lengths_B, fill=0.0),
        completion_mask_BT=batch.completion_mask_BT.cpu(),
        topk_ids_BTK=topk_ids_BTK,
        topk_logprobs_BTK=topk_logprobs_BTK,
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
    if request.candidate_ids_MC is not None:
        tensors[CANDIDATE_TENSOR] = request.candidate_ids_MC.to(torch.int32).contiguous()
    metadata = {"top_k": str(request.top_k), "temperature": repr(request.temperature)}
    if request.hidden_dtype:
        metadata["hidden_dtype"] = request.hidden_dtype
    return safetensors_save(tensors, metadata=metadata)


# Field of `SequenceScores` -> tensor name on the wire (the optional ones after the first).
_SCORES_TENSORS = {
    "completion_lengths_B": "completion_lengths",
    "sampled_logprobs_M": "sampled_logprobs",
    "topk_ids_MK": "topk_ids",
    "topk_logprobs_MK": "topk_logprobs",
    "hidden_MH": "hidden_states",
    "candidate_logprobs_MC": "candidate_logprobs",
}


def encode_scores(
    scores: SequenceScores,
    *,
    teacher_id: str = "",
    temperature=1.0,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """The scores blob; `metadata` adds strings to the header (e.g. the output head's hash)."""
    tensors = {"completion_lengths": scores.completion_lengths_B.contiguous()}
    for name, values in scores.per_token().items():
        # top-k ids as int32 on the wire; hidden states in the dtype the client asked
        tensors[_SCORES_TENSORS[name]] = (
            values.to(torch.int32) if name == "topk_ids_MK" else values
        ).contiguous()
    header = {"teacher_id": teacher_id, "temperature": repr(float(temperature)), **(metadata or {})}
    return safetensors_save(tensors, metadata=header)


def decode_scores(body: bytes) -> tuple[SequenceScores, dict[str, str]]:
    """A server's response; raises `WireError` when it is not a scores blob."""
    tensors, metadata = load_checked(body, SCORES_DTYPES)
    for name, dtype in (("completion_lengths", torch.int64), ("sampled_logprobs", torch.float32)):
        _expect(tensors, name, dtype, ndim=1)
    optional = {
        "topk_ids": (torch.int32, torch.int64),
        "topk_logprobs": torch.float32,
        "hidden_states": tuple(HIDDEN_DTYPES.values()),
        "candidate_logprobs": torch.float32,
    }
    for name, dtype in optional.items():
        if name in tensors:
            _expect(tensors, name, dtype, ndim=2)
    fields = {field: tensors.get(name) for field, name in _SCORES_TENSORS.items()}
    return SequenceScores(**fields), metadata


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
    hidden_size: int = 0
    """Width of the hidden states the backend returns; 0: it cannot (422 when asked)."""
    max_candidates: int = 256
    """Most candidate ids per position a request may carry; 0: the backend cannot score them."""
    backend_name: str = ""
    """Named in the 422 for what the backend cannot do."""


def estimated_response_bytes(request: ScoreRequest, hidden_size: int = 0) -> int:
    """Bytes of the scores blob answering `request` (tensors plus a header allowance)."""
    num_tokens = int(request.completion_ids_M.numel())
    per_token = 4 + 8 * request.top_k  # sampled float32; top-k int32 ids + float32 logprobs
    per_token += 4 * request.num_candidates  # float32 logprob per candidate
    if request.hidden_dtype:
        per_token += hidden_size * HIDDEN_DTYPES[request.hidden_dtype].itemsize
    return num_tokens * per_token + 8 * request.num_sequences + RESPONSE_HEADER_BYTES


def decode_request(body: bytes, limits: RequestLimits) -> ScoreRequest:
    """Parse and validate a client's request body; raises `WireError` (4xx) on anything wrong."""
    tensors, metadata = load_checked(
        body, REQUEST_DTYPES, names=(*REQUEST_TENSORS, CANDIDATE_TENSOR)
    )
    for name in REQUEST_TENSORS:
        _expect(tensors, name, (torch.int32, torch.int64), ndim=1)
        tensors[name] = tensors[name].to(torch.int64)
    top_k = _metadata_number(metadata, "top_k", int, default=0)
    temperature = _metadata_number(metadata, "temperature", float, default=1.0)
    _check_sampling(top_k, temperature, limits)
    hidden_dtype = metadata.get("hidden_dtype", "")
    _check_hidden(hidden_dtype, limits)
    candidates_MC = None
    if CANDIDATE_TENSOR in tensors:
        _expect(tensors, CANDIDATE_TENSOR, (torch.int32, torch.int64), ndim=2)
        candidates_MC = tensors[CANDIDATE_TENSOR].to(torch.int64)
    request = ScoreRequest(
        context_ids_N=tensors["context_ids"],
        context_lengths_B=tensors["context_lengths"],
        completion_ids_M=tensors["completion_ids"],
        completion_lengths_B=tensors["completion_lengths"],
        top_k=top_k,
        temperature=temperature,
        hidden_dtype=hidden_dtype,
        candidate_ids_MC=candidates_MC,
    )
    _check_request(request, limits)
    _check_candidates(request, limits)
    _check_response_size(request, limits)
    return request


def _check_hidden(hidden_dtype: str, limits: RequestLimits) -> None:
    if hidden_dtype and hidden_dtype not in HIDDEN_DTYPES:
        raise WireError(
            f"metadata hidden_dtype={quoted(hidden_dtype)} is not one of {list(HIDDEN_DTYPES)}"
        )
    if hidden_dtype and not limits.hidden_size:
        raise WireError(
            f"this teacher server's backend ({limits.backend_name or 'unknown'}) cannot return "
            "hidden states: serve the teacher with `opd teacher serve --backend transformers`",
            status=422,
        )


def _check_candidates(request: ScoreRequest, limits: RequestLimits) -> None:
    """Candidate ids: one row per completion token, at most `max_candidates` wide, each a
    vocabulary id or -1 (padding)."""
    candidates_MC = request.candidate_ids_MC
    if candidates_MC is None:
        return
    if not limits.max_candidates:
        raise WireError(
            f"this teacher server's backend ({limits.backend_name or 'unknown'}) cannot score "
            "candidate sets: serve the teacher with `opd teacher serve --backend transformers`",
            status=422,
        )
    num_tokens, width = candidates_MC.shape
    if num_tokens != request.completion_ids_M.numel():
        raise WireError(
            f"candidate_ids has {num_tokens} rows, expected {request.completion_ids_M.numel()} "
            "(one per completion token)"
        )
    if not 1 <= width <= limits.max_candidates:
        raise WireError(
            f"{width} candidate ids per position; the limit is [1, {limits.max_candidates}] "
            "(the server's --max_candidates)"
        )
    if candidates_MC.numel() and (
        int(candidates_MC.min()) < -1 or int(candidates_MC.max()) >= limits.vocab_size
    ):
        bad = int(candidates_MC[(candidates_MC < -1) | (candidates_MC >= limits.vocab_size)][0])
        raise WireError(
            f"candidate token id {bad} is outside the teacher's vocabulary [0, "
            f"{limits.vocab_size}) (and is not -1, the padding id)"
        )


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
    estimate = estimated_response_bytes(request, limits.hidden_size)
    if estimate > limits.max_response_bytes:
        asked = f"{request.completion_ids_M.numel()} completion tokens at top_k={request.top_k}"
        if request.num_candidates:
            asked += f", {request.num_candidates} candidates"
        if request.hidden_dtype:
            asked += f", {request.hidden_dtype} hidden states"
        raise WireError(
            f"the response would be about {estimate} bytes ({asked}), "
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
