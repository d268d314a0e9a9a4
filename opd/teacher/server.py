"""The teacher scoring server: a FastAPI app around any `score_sequences` backend.

`create_app(backend, ...)` serves:

- `GET /health` -> `{"status": "ok"}` (no auth: load balancers and start-up probes use it);
- `GET /info` -> model, backend, vocabulary size, tokenizer fingerprint, EOS ids, the request
  limits, the wire format, the opd version and served-traffic `stats`;
- `POST /v1/score` -> a `ScoreRequest` safetensors blob in (`opd.teacher.wire.CONTENT_TYPE`),
  a `SequenceScores` blob out: sampled logprobs, and as asked the top-k, the final hidden states
  (hidden-state mode: the client applies the head) and the logprobs at candidate ids;
- `GET /v1/output_head` -> the teacher's lm_head weight as a safetensors blob, once per client
  (`opd.teacher.output_head`; `/info` announces its shape, dtype and sha256).

What a backend can do is read from it (`backend_limits`): hidden states and candidate sets need
the transformers backend; vLLM's answer is a 422 naming that.

Every request is validated at the boundary (`decode_request`): a bad body is a 4xx naming what
is wrong, never a crash. Concurrent requests are batched by `opd.teacher.batching.ScoreBatcher`
within `max_batch_tokens` (padded tokens for a backend that pads, `pads_batches`). A backend
failure is a 500 for that batch only.

Exposure: no docs or OpenAPI schema unless `docs=True` (they need no key); no slash redirects
(their Location is built from the client's Host header); more than `max_headers` request headers,
or more than `max_header_bytes` of them, is a 431 (uvicorn's h11, configured in
`opd.commands.serve`, cuts off a larger header block while it arrives).

`backend` is duck-typed: `vocab_size`, `tokenizer` (or None) and
`score_sequences(ScoreRequest) -> SequenceScores` (`LocalTeacher` for transformers,
`VLLMSequenceScorer` for vLLM). `opd teacher serve` (opd/commands/serve.py) builds both; answers
carry `model_name`, the model's name, never its local path.

Test: `.venv/bin/pytest tests/integration/test_teacher_server.py
tests/integration/test_teacher_hostile.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import logging
import time
from dataclasses import asdict
from importlib.metadata import version
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from opd.teacher.batching import ScoreBatcher
from opd.teacher.consistency import tokenizer_fingerprint
from opd.teacher.output_head import HEAD_HASH_KEY, encode_head, head_digest, head_info
from opd.teacher.wire import (
    CONTENT_TYPE,
    SERVER_SECONDS_HEADER,
    RequestLimits,
    WireError,
    decode_request,
    encode_scores,
)

logger = logging.getLogger(__name__)

OPD_VERSION = version("opd")


# ------------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------------


def create_app(
    backend,
    *,
    model_name: str,
    limits: RequestLimits,
    api_key: str | None,
    max_batch_tokens: int,
    max_body_bytes: int,
    pads_batches: bool = False,
    max_headers: int = 100,
    max_header_bytes: int = 16384,
    backend_name: str = "",
    docs: bool = False,
) -> FastAPI:
    """The scoring app; `api_key` (when set) is required as a bearer token except on /health.

    `model_name` is what `/info` and every answer call the teacher (a name, not a local path).
    """
    batcher = ScoreBatcher(backend, max_batch_tokens=max_batch_tokens, pads_batches=pads_batches)
    limits = backend_limits(backend, limits, backend_name)
    head = served_head(backend) if limits.hidden_size else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await batcher.close()

    # The docs pages and the schema need no key; `redirect_slashes` would answer /v1/score/ with
    # a redirect whose Location comes from the client's Host header.
    app = FastAPI(
        title="opd teacher",
        version=OPD_VERSION,
        lifespan=lifespan,
        redirect_slashes=False,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.add_middleware(HeaderLimits, max_headers=max_headers, max_header_bytes=max_header_bytes)
    authorized = Depends(_bearer_check(api_key))
    info = {
        "model": model_name,
        **_static_info(backend, backend_name, limits, max_batch_tokens, max_body_bytes),
        "hidden_states": None
        if head is None
        else {"hidden_size": limits.hidden_size, "output_head": head_info(*head)},
        "max_candidates": limits.max_candidates,
        "max_headers": max_headers,
        "max_header_bytes": max_header_bytes,
    }

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info", dependencies=[authorized])
    async def get_info() -> dict[str, Any]:
        return {**info, "stats": asdict(batcher.stats)}

    @app.get("/v1/output_head", dependencies=[authorized])
    async def output_head() -> Response:
        if head is None:
            raise HTTPException(
                status_code=404,
                detail=f"this server's backend ({info['backend']}) serves no output head: it "
                "cannot return hidden states (serve with --backend transformers)",
            )
        weight_VH, digest = head
        return Response(content=encode_head(weight_VH, digest), media_type=CONTENT_TYPE)

    @app.post("/v1/score", dependencies=[authorized])
    async def score(request: Request) -> Response:
        _check_content_type(request)
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
        # Hidden states are only meaningful with the head they feed: name it in every answer.
        head_hash = {HEAD_HASH_KEY: head[1]} if head and score_request.hidden_dtype else {}
        content = encode_scores(
            scores, teacher_id=model_name, temperature=score_request.temperature, metadata=head_hash
        )
        # Queueing + scoring + encoding: the client's round trip minus this is the HTTP cost.
        headers = {SERVER_SECONDS_HEADER: f"{time.perf_counter() - start:.6f}"}
        return Response(content=content, media_type=CONTENT_TYPE, headers=headers)

    return app


def backend_limits(backend, limits: RequestLimits, backend_name: str) -> RequestLimits:
    """`limits` with what the backend can do: hidden states (a backend with `hidden_size` and
    `output_weight`, e.g. transformers' `LocalTeacher`) and candidate sets (`scores_candidates`);
    vLLM's prompt logprobs give neither."""
    hidden_size = int(getattr(backend, "hidden_size", 0) or 0)
    scores_candidates = bool(getattr(backend, "scores_candidates", False))
    return dataclasses.replace(
        limits,
        hidden_size=hidden_size if hasattr(backend, "output_weight") else 0,
        max_candidates=limits.max_candidates if scores_candidates else 0,
        backend_name=backend_name or type(backend).__name__,
    )


def served_head(backend) -> tuple[Any, str]:
    """The backend's output head and its hash, computed once at start-up (a 152k x 4096 float32
    head hashes in a few seconds)."""
    weight_VH = backend.output_weight.detach()
    return weight_VH, head_digest(weight_VH)


class HeaderLimits:
    """ASGI middleware: more than `max_headers` headers, or a request line and headers over
    `max_header_bytes`, is a 431 before any route runs.

    uvicorn's h11 refuses a header block that grows past the same byte limit while it arrives
    (so a huge one is never buffered), but only checks between socket reads: a block that comes
    in one read (up to 256 KiB) reaches the app whole and is refused here.
    """

    def __init__(self, app, *, max_headers: int, max_header_bytes: int):
        self.app = app
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope, receive, send) -> None:
        problem = self._problem(scope) if scope["type"] == "http" else None
        if problem is None:
            await self.app(scope, receive, send)
            return
        response = JSONResponse(status_code=431, content={"detail": problem})
        await response(scope, receive, send)

    def _problem(self, scope) -> str | None:
        headers = scope["headers"]
        if len(headers) > self.max_headers:
            return (
                f"{len(headers)} request headers; the limit is {self.max_headers} "
                "(the server's --max_headers)"
            )
        # As on the wire: "METHOD PATH?QUERY HTTP/1.1\r\n" and "name: value\r\n" per header.
        line = len(scope["method"]) + len(scope.get("raw_path") or b"") + 12
        size = line + len(scope["query_string"]) + sum(len(k) + len(v) + 4 for k, v in headers)
        if size > self.max_header_bytes:
            return (
                f"the request line and headers are {size} bytes; the limit is "
                f"{self.max_header_bytes} (the server's --max_header_bytes)"
            )
        return None


def _check_content_type(request: Request) -> None:
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != CONTENT_TYPE:
        raise HTTPException(
            status_code=415,
            detail=f"Content-Type {media_type or '(none)'!r} is not {CONTENT_TYPE!r}: send the "
            "body as opd.teacher.wire.encode_request writes it",
        )


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
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:  # chunked uploads declare no length: count what arrives
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect as error:  # nobody to answer: one line, not a stack trace
        logger.info("a client disconnected after sending %d bytes of its request body", size)
        raise HTTPException(status_code=400, detail="the client disconnected") from error
    return b"".join(chunks)


def _static_info(
    backend, backend_name: str, limits: RequestLimits, max_batch_tokens: int, max_body_bytes: int
) -> dict[str, Any]:
    tokenizer = backend.tokenizer
    return {
        "backend": backend_name or type(backend).__name__,
        "vocab_size": int(backend.vocab_size),
        "tokenizer": tokenizer_fingerprint(tokenizer) if tokenizer is not None else {},
        "eos_token_ids": eos_token_ids(backend),
        "max_top_k": limits.max_top_k,
        "max_sequence_tokens": limits.max_sequence_tokens,
        "max_sequences": limits.max_sequences,
        "max_response_bytes": limits.max_response_bytes,
        "max_body_bytes": max_body_bytes,
        "max_batch_tokens": max_batch_tokens,
        "wire_format": CONTENT_TYPE,
        "version": OPD_VERSION,
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
