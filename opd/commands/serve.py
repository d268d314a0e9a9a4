"""`opd teacher serve`: load a teacher and serve its per-token scores over HTTP.

    opd teacher serve --model PATH|NAME [--backend transformers|vllm] [--host 127.0.0.1]
        [--port 8000] [--api_key KEY] [--max_top_k 128] ...

Arguments are `ServeArguments` fields, parsed by `opd.cli` with transformers' `HfArgumentParser`
(so both `--max_top_k` and `--max-top-k` work; `--help` lists them). `--model` takes what `opd
distill` takes: a local folder, a hub id, or a name opd builds itself (`demo:teacher`, `pypi:*`,
resolved by `opd.models.resolve_model_name`). The server answers with the model's name
(`served_model_name`), never the absolute path of its weights.

The transformers backend is `LocalTeacher` (the same forward as `teacher_mode=local`); the vLLM
backend is `opd.teacher.vllm_backend.VLLMSequenceScorer`, imported only when asked for. The app
is `opd.teacher.server.create_app`; `build_backend` / `build_app` / `build_uvicorn_config` build
exactly what `run` serves, so tests serve the same thing in-process.

Exposure: without an API key the server only binds loopback unless `--insecure_no_auth` says so;
a header block over `--max_header_bytes` is cut off by h11 while it arrives (or, when it came in
one read, refused with a 431 by the app, as are more than `--max_headers` headers); `/docs` and
the OpenAPI schema exist only with `--docs`.

Test: `.venv/bin/pytest tests/integration/test_teacher_server.py
tests/integration/test_teacher_hostile.py`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from opd.arguments import ConfigError, help_field
from opd.models import served_model_name
from opd.teacher.http import API_KEY_ENV

DTYPES = ("float32", "bfloat16", "float16")
# Used only when neither the flag nor the model tells a context length.
FALLBACK_MAX_SEQUENCE_TOKENS = 32768
# A tokenizer without a known limit reports a huge placeholder (transformers uses 1e30).
SANE_MODEL_MAX_LENGTH = 10_000_000

PROG = "opd teacher serve"
DESCRIPTION = "Serve a teacher's per-token scores over HTTP (opd wire format)."
logger = logging.getLogger(__name__)


@dataclass
class ServeArguments:
    """What `opd teacher serve` loads and the limits it enforces on requests."""

    model: str = help_field(
        help="The teacher: a local model folder, a hub id, demo:teacher or pypi:<name>."
    )
    backend: Literal["transformers", "vllm"] = help_field(
        "transformers", "'transformers': an HF forward (any device); 'vllm': vLLM's engine."
    )
    host: str = help_field("127.0.0.1", "Interface to listen on.")
    port: int = help_field(8000, "TCP port to listen on.")
    api_key: str | None = help_field(
        None,
        f"Require `Authorization: Bearer KEY` on /info and /v1/score (default: "
        f"${API_KEY_ENV}; unset: no auth, loopback only unless --insecure_no_auth).",
    )
    insecure_no_auth: bool = help_field(
        False, "Allow a non-loopback --host without an API key (anyone may use it)."
    )
    docs: bool = help_field(
        False, "Serve /docs, /redoc and /openapi.json (open: they need no key)."
    )
    device: str = help_field(
        "auto", "Device for the transformers backend; 'auto': cuda if available."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = help_field(
        "float32", "Weights dtype (logprobs are computed in float32)."
    )
    batch_size: int = help_field(16, "Sequences per forward pass (transformers backend).")
    max_top_k: int = help_field(128, "Largest top_k a request may ask.")
    max_candidates: int = help_field(
        256,
        "Most candidate token ids per position a request may ask logprobs of (transformers "
        "backend; 0 refuses candidate sets; vllm cannot score them).",
    )
    max_sequence_tokens: int | None = help_field(
        None,
        "Most tokens (context + completion) per sequence. Default: the teacher's "
        "context length (vllm: its engine's max_model_len - 1); a larger value is capped "
        "to it.",
    )
    max_sequences: int = help_field(4096, "Most sequences per request.")
    max_batch_tokens: int = help_field(
        65536,
        "Token budget of one backend call; for transformers it counts padding "
        "(sequences x longest), and caps max_sequence_tokens.",
    )
    max_body_bytes: int = help_field(64 * 1024 * 1024, "Largest request body accepted (bytes).")
    max_response_bytes: int | None = help_field(
        None,
        "Largest answer a request may ask for (bytes, estimated before scoring; "
        "413 above). Default: opd.teacher.wire.RequestLimits' default.",
    )
    max_header_bytes: int = help_field(
        16384, "Largest request line + headers (bytes); larger: HTTP 431 or cut off."
    )
    max_headers: int = help_field(100, "Most request headers; more: HTTP 431.")
    log_level: str = help_field("info", "debug, info, warning or error (debug: one line/batch).")


def run(args: ServeArguments) -> None:
    """Check the arguments, load the backend, and serve until interrupted."""
    problem = check_arguments(args)
    if problem:
        raise ConfigError(problem)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        backend = build_backend(args)
    except (OSError, ValueError) as error:  # no model in the folder; an unknown pypi: name
        raise ConfigError(f"cannot load {args.model!r}: {error}") from error
    app = build_app(args, backend)
    import uvicorn

    name = served_model_name(args.model)
    print(f"{PROG}: {name} ({args.backend}) on http://{args.host}:{args.port}")
    sys.stdout.flush()
    uvicorn.Server(build_uvicorn_config(args, app)).run()


def check_arguments(args: ServeArguments) -> str | None:
    """What is wrong with the arguments, in words, or None."""
    path = Path(args.model).expanduser()
    # A hub id ("org/name") may legitimately not exist on disk; a path-looking one must.
    looks_like_path = path.is_absolute() or args.model.startswith((".", "~")) or "\\" in args.model
    if not path.exists() and (looks_like_path or args.model.count("/") > 1):
        return f"model path {args.model!r} does not exist"
    if args.dtype not in DTYPES:
        return f"dtype={args.dtype!r} is not one of {', '.join(DTYPES)}"
    positive = ("batch_size", "max_sequence_tokens", "max_sequences", "max_batch_tokens")
    sizes = ("max_body_bytes", "max_response_bytes", "max_header_bytes", "max_headers")
    for name in (*positive, *sizes):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return f"{name} must be >= 1, got {getattr(args, name)}"
    for name in ("max_top_k", "max_candidates"):
        if getattr(args, name) < 0:
            return f"{name} must be >= 0, got {getattr(args, name)}"
    has_key = bool(args.api_key or os.environ.get(API_KEY_ENV))
    if not has_key and not args.insecure_no_auth and not is_loopback(args.host):
        return (
            f"refusing to serve on --host {args.host} without an API key (anyone who reaches "
            f"the port could use the teacher): set --api_key or ${API_KEY_ENV}, bind "
            "--host 127.0.0.1, or pass --insecure_no_auth"
        )
    return None


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a hostname: it may resolve to any interface
        return False


# ------------------------------------------------------------------------------------------------
# Backend, app, uvicorn
# ------------------------------------------------------------------------------------------------


def build_backend(args: ServeArguments):
    """The scoring backend named by `args.backend` (the model is resolved and loaded here)."""
    import torch

    from opd.models import resolve_model_name  # the resolver of every command that loads a model

    model_path = str(resolve_model_name(args.model))
    dtype = getattr(torch, args.dtype)
    if args.backend == "vllm":
        from opd.teacher.vllm_backend import VLLMSequenceScorer

        return VLLMSequenceScorer(
            model_path,
            dtype=args.dtype,
            # vLLM scores at most max_model_len - 1 prompt tokens (it must generate one).
            max_model_len=None
            if args.max_sequence_tokens is None
            else args.max_sequence_tokens + 1,
            max_top_k=args.max_top_k,
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.teacher.local import LocalTeacher

    device = (
        args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model.to(torch.device(device))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return LocalTeacher(model, batch_size=args.batch_size, tokenizer=tokenizer)


def build_app(args: ServeArguments, backend):
    """The FastAPI app serving `backend` under the limits in `args`."""
    from opd.teacher.server import create_app
    from opd.teacher.wire import RequestLimits

    optional = {}
    if args.max_response_bytes is not None:
        optional["max_response_bytes"] = args.max_response_bytes
    limits = RequestLimits(
        vocab_size=int(backend.vocab_size),
        max_top_k=args.max_top_k,
        max_candidates=args.max_candidates,
        max_sequence_tokens=max_sequence_tokens(args, backend),
        max_sequences=args.max_sequences,
        **optional,
    )
    return create_app(
        backend,
        model_name=served_model_name(args.model),
        limits=limits,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_batch_tokens=args.max_batch_tokens,
        pads_batches=args.backend == "transformers",
        max_body_bytes=args.max_body_bytes,
        max_headers=args.max_headers,
        max_header_bytes=args.max_header_bytes,
        backend_name=args.backend,
        docs=args.docs,
    )


def build_uvicorn_config(args: ServeArguments, app):
    """The uvicorn configuration `run` serves `app` with (tests serve with it too)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        # h11, not httptools (uvicorn's pick when installed): httptools has no header size
        # limit, so a 64 MiB header was buffered and parsed while every client waited. h11
        # refuses a request line + header block over max_incomplete_event_size and closes.
        http="h11",
        h11_max_incomplete_event_size=args.max_header_bytes,
    )


def max_sequence_tokens(args: ServeArguments, backend) -> int:
    """The per-sequence token limit: the teacher's context length, capped by the flag; for a
    padding backend also by `max_batch_tokens` (one sequence must fit one backend call)."""
    if args.backend == "vllm":
        context = int(backend.max_sequence_tokens)  # the engine's max_model_len - 1
    else:
        context = transformers_context_length(backend.model.config, backend.tokenizer)
    limit = context or FALLBACK_MAX_SEQUENCE_TOKENS
    if args.max_sequence_tokens is not None:
        if context and args.max_sequence_tokens > context:
            logger.warning(
                "max_sequence_tokens=%d is above the teacher's context length %d: using %d",
                args.max_sequence_tokens, context, context,
            )  # fmt: skip
        limit = min(limit, args.max_sequence_tokens)
    if args.backend == "transformers" and limit > args.max_batch_tokens:
        logger.warning(
            "max_sequence_tokens lowered from %d to max_batch_tokens=%d (one sequence must fit "
            "one backend call); raise --max_batch_tokens to score longer sequences",
            limit, args.max_batch_tokens,
        )  # fmt: skip
        limit = args.max_batch_tokens
    return limit


def transformers_context_length(config, tokenizer) -> int | None:
    """The model's context length: `max_position_embeddings`, else a sane tokenizer limit."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        return int(positions)
    model_max_length = getattr(tokenizer, "model_max_length", None)
    if model_max_length and model_max_length < SANE_MODEL_MAX_LENGTH:
        return int(model_max_length)
    return None
