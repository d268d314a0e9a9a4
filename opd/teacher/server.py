"""The teacher scoring server: a FastAPI app around any `score_sequences` backend.

`create_app(backend, ...)` serves:

- `GET /health` -> `{"status": "ok"}` (no auth: load balancers and start-up probes use it);
- `GET /info` -> model, backend, vocabulary size, tokenizer fingerprint, EOS ids, the request
  limits, the wire format, the opd version and served-traffic `stats`;
- `POST /v1/score` -> a `ScoreRequest` safetensors blob in (`opd.teacher.wire.CONTENT_TYPE`),
  a `SequenceScores` blob out.

Every request is validated at the boundary (`decode_request`): a bad body is a 4xx naming what
is wrong, never a crash. Concurrent requests are batched: handlers put requests on a queue and
one worker takes as many as fit in `max_batch_tokens`, runs one backend call per
`(top_k, temperature)` group in a thread (one at a time: the model is never used concurrently)
and hands each request its slice of the scores. A backend failure is a 500 for that batch only.

`backend` is duck-typed: `teacher_id`, `vocab_size`, `tokenizer` (or None) and
`score_sequences(ScoreRequest) -> SequenceScores` (`LocalTeacher` for transformers,
`VLLMSequenceScorer` for vLLM). `opd teacher serve` (opd/teacher/serve.py) builds both.

Test: `.venv/bin/pytest tests/integration/test_teacher_server.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse

import opd
from opd.teacher.consistency import tokenizer_fingerprint
from opd.teacher.wire import (
    CONTENT_TYPE,
    SERVER_SECONDS_HEADER,
    RequestLimits,
    ScoreRequest,
    SequenceScores,
    WireError,
    decode_request,
    encode_scores,
)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Merge and split (pure)
# ------------------------------------------------------------------------------------------------


def merge_requests(requests: list[ScoreRequest]) -> ScoreRequest:
    """Requests with the same `top_k` and `temperature` as one request, sequences in order."""
    assert len({(r.top_k, r.temperature) for r in requests}) == 1, "merge one group at a time"
    return ScoreRequest(
        context_ids_N=torch.cat([r.context_ids_N for r in requests]),
        context_lengths_B=torch.cat([r.context_lengths_B for r in requests]),
        completion_ids_M=torch.cat([r.completion_ids_M for r in requests]),
        completion_lengths_B=torch.cat([r.completion_lengths_B for r in requests]),
        top_k=requests[0].top_k,
        temperature=requests[0].temperature,
    )


def split_scores(scores: SequenceScores, num_sequences: list[int]) -> list[SequenceScores]:
    """Undo `merge_requests` on the scores: one `SequenceScores` per request, in order."""
    lengths_B = scores.completion_lengths_B
    assert lengths_B.numel() == sum(num_sequences), "the backend lost or added sequences"
    lengths_per_request = list(lengths_B.split(num_sequences))
    tokens_per_request = [int(lengths.sum()) for lengths in lengths_per_request]

    def split(values: torch.Tensor | None) -> list[torch.Tensor] | list[None]:
        if values is None:
            return [None] * len(num_sequences)
        return list(values.split(tokens_per_request))

    return [
        SequenceScores(lengths, sampled_M, topk_ids_MK, topk_logprobs_MK)
        for lengths, sampled_M, topk_ids_MK, topk_logprobs_MK in zip(
            lengths_per_request,
            scores.sampled_logprobs_M.split(tokens_per_request),
            split(scores.topk_ids_MK),
            split(scores.topk_logprobs_MK),
            strict=True,
        )
    ]


def group_requests(requests: list[ScoreRequest]) -> list[list[int]]:
    """Indices of the requests that can share a backend call (same top-k and temperature)."""
    groups: dict[tuple[int, float], list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault((request.top_k, request.temperature), []).append(index)
    return list(groups.values())


# ------------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------------


@dataclass
class ServeStats:
    """Traffic served since start-up (exposed in `/info`)."""

    requests: int = 0
    sequences: int = 0
    tokens: int = 0
    batches: int = 0


@dataclass
class _Pending:
    request: ScoreRequest
    future: asyncio.Future = field(repr=False)


class ScoreBatcher:
    """Queue of pending requests and the one worker task that scores them in token-budget batches.

    The worker starts with the first request (on the serving event loop) and is cancelled by
    `close()`.
    """

    def __init__(self, backend, *, max_batch_tokens: int):
        self.backend = backend
        self.max_batch_tokens = max_batch_tokens
        self.stats = ServeStats()
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._carry: _Pending | None = None  # taken from the queue but over the last budget
        self._worker: asyncio.Task | None = None
        # One dedicated thread for every backend call: torch's OpenMP pool belongs to the thread
        # that calls it, and `asyncio.to_thread` rotates over threads, each call then paying for
        # (and spinning against) another pool. Measured: +17% per batch on 2 cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-teacher")

    async def score(self, request: ScoreRequest) -> SequenceScores:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run())
        pending = _Pending(request, asyncio.get_running_loop().create_future())
        await self._queue.put(pending)
        return await pending.future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                await self._score_batch(batch)
            except Exception as error:  # a bug outside the backend: fail this batch, keep serving
                logger.exception("scoring a batch failed")
                _fail([p.future for p in batch], error)

    async def _next_batch(self) -> list[_Pending]:
        """The oldest request plus the queued ones after it that fit in the token budget."""
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, num_tokens = [first], first.request.num_tokens
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if num_tokens + pending.request.num_tokens > self.max_batch_tokens:
                self._carry = pending
                break
            batch.append(pending)
            num_tokens += pending.request.num_tokens
        return batch

    async def _score_batch(self, batch: list[_Pending]) -> None:
        start = time.perf_counter()
        requests = [pending.request for pending in batch]
        for group in group_requests(requests):
            futures = [batch[i].future for i in group]
            merged = merge_requests([requests[i] for i in group])
            try:
                scores = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.backend.score_sequences, merged
                )
                parts = split_scores(scores, [requests[i].num_sequences for i in group])
            except WireError as error:  # the backend's own limit: the clients' fault, no trace
                logger.info("the backend refused %d requests: %s", len(group), error)
                _fail(futures, error)
                continue
            except Exception as error:
                logger.exception("the backend failed on %d sequences", merged.num_sequences)
                _fail(futures, error)
                continue
            for future, part in zip(futures, parts, strict=True):
                if not future.done():  # done: the client went away and the handler was cancelled
                    future.set_result(part)
        self._count(requests)
        logger.debug(
            "scored %d requests, %d sequences, %d tokens in %.1f ms",
            len(requests),
            sum(r.num_sequences for r in requests),
            sum(r.num_tokens for r in requests),
            1000 * (time.perf_counter() - start),
        )

    def _count(self, requests: list[ScoreRequest]) -> None:
        self.stats.batches += 1
        self.stats.requests += len(requests)
        self.stats.sequences += sum(r.num_sequences for r in requests)
        self.stats.tokens += sum(r.num_tokens for r in requests)


def _fail(futures: list[asyncio.Future], error: Exception) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(error)


# ------------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------------


def create_app(
    backend,
    *,
    limits: RequestLimits,
    api_key: str | None,
    max_batch_tokens: int,
    max_body_bytes: int,
    backend_name: str = "",
) -> FastAPI:
    """The scoring app; `api_key` (when set) is required as a bearer token except on /health."""
    batcher = ScoreBatcher(backend, max_batch_tokens=max_batch_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await batcher.close()

    app = FastAPI(title="opd teacher", version=opd.__version__, lifespan=lifespan)
    authorized = Depends(_bearer_check(api_key))
    info = _static_info(backend, backend_name, limits, max_batch_tokens, max_body_bytes)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info", dependencies=[authorized])
    async def get_info() -> dict[str, Any]:
        return {**info, "stats": asdict(batcher.stats)}

    @app.post("/v1/score", dependencies=[authorized])
    async def score(request: Request) -> Response:
        body = await _read_body(request, max_body_bytes)
        start = time.perf_counter()
        try:
            score_request = decode_request(body, limits)
        except WireError as error:
            raise HTTPException(status_code=error.status, detail=str(error)) from error
        try:
            scores = await batcher.score(score_request)
        except WireError as error:  # a backend's own limit (e.g. vLLM: temperature 1 only)
            raise HTTPException(status_code=error.status, detail=str(error)) from error
        except Exception as error:
            return JSONResponse(
                status_code=500,
                content={"detail": f"the teacher backend failed: {type(error).__name__}: {error}"},
            )
        content = encode_scores(
            scores, teacher_id=backend.teacher_id, temperature=score_request.temperature
        )
        # Queueing + scoring + encoding: the client's round trip minus this is the HTTP cost.
        headers = {SERVER_SECONDS_HEADER: f"{time.perf_counter() - start:.6f}"}
        return Response(content=content, media_type=CONTENT_TYPE, headers=headers)

    return app


def _bearer_check(api_key: str | None):
    """A FastAPI dependency that rejects requests without `Authorization: Bearer <api_key>`."""

    async def check(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(
                status_code=401,
                detail="missing bearer token: this teacher needs `Authorization: Bearer <key>` "
                "(set teacher_api_key or $OPD_TEACHER_API_KEY)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        # Constant-time comparison: response timing must not reveal how much of a guess matched.
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise HTTPException(
                status_code=401,
                detail="wrong API key for this teacher",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


async def _read_body(request: Request, max_body_bytes: int) -> bytes:
    """The body, refused with 413 as soon as it (or its declared length) passes the limit."""
    too_big = HTTPException(
        status_code=413,
        detail=f"request body is larger than {max_body_bytes} bytes (the server's "
        "--max-body-bytes); send fewer sequences per request (teacher_batch_size)",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body_bytes:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:  # chunked uploads declare no length: count what arrives
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _static_info(
    backend, backend_name: str, limits: RequestLimits, max_batch_tokens: int, max_body_bytes: int
) -> dict[str, Any]:
    tokenizer = backend.tokenizer
    return {
        "model": backend.teacher_id,
        "backend": backend_name or type(backend).__name__,
        "vocab_size": int(backend.vocab_size),
        "tokenizer": tokenizer_fingerprint(tokenizer) if tokenizer is not None else {},
        "eos_token_ids": eos_token_ids(backend),
        "max_top_k": limits.max_top_k,
        "max_sequence_tokens": limits.max_sequence_tokens,
        "max_sequences": limits.max_sequences,
        "max_body_bytes": max_body_bytes,
        "max_batch_tokens": max_batch_tokens,
        "wire_format": CONTENT_TYPE,
        "version": opd.__version__,
    }


def eos_token_ids(backend) -> list[int]:
    """The tokenizer's EOS id plus the model's generation-config EOS ids (chat models add some)."""
    ids: set[int] = set()
    if backend.tokenizer is not None and backend.tokenizer.eos_token_id is not None:
        ids.add(int(backend.tokenizer.eos_token_id))
    # The transformers backend keeps the model (`.model`); a backend may also expose the
    # generation config directly. Either may be absent: the tokenizer's EOS is then all we know.
    generation_config = getattr(backend, "generation_config", None) or getattr(
        getattr(backend, "model", None), "generation_config", None
    )
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is not None:
        ids.update(int(i) for i in (eos if isinstance(eos, list | tuple) else [eos]))
    return sorted(ids)
