"""`opd teacher serve`: load a teacher and serve its per-token scores over HTTP.

    opd teacher serve --model PATH [--backend transformers|vllm] [--host 127.0.0.1]
        [--port 8000] [--api_key KEY] [--max_top_k 128] ...

Arguments are `ServeArguments` fields, parsed by transformers' `HfArgumentParser` (so both
`--max_top_k` and `--max-top-k` work; `--help` lists them). The transformers backend is
`LocalTeacher` (the same forward as `teacher_mode=local`); the vLLM backend is
`opd.teacher.vllm_backend.VLLMSequenceScorer`, imported only when asked for. The app itself is
`opd.teacher.server.create_app`; `build_backend` / `build_app` let tests build it in-process.

Test: `.venv/bin/pytest tests/integration/test_teacher_server.py`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from opd.teacher.http import API_KEY_ENV

DTYPES = ("float32", "bfloat16", "float16")


DEFAULT_MAX_SEQUENCE_TOKENS = 32768


@dataclass
class ServeArguments:
    """What `opd teacher serve` loads and the limits it enforces on requests."""

    model: str = field(metadata={"help": "The teacher: a local model folder or a hub id."})
    backend: Literal["transformers", "vllm"] = field(
        default="transformers",
        metadata={"help": "'transformers': an HF forward (any device); 'vllm': vLLM's engine."},
    )
    host: str = field(default="127.0.0.1", metadata={"help": "Interface to listen on."})
    port: int = field(default=8000, metadata={"help": "TCP port to listen on."})
    api_key: str | None = field(
        default=None,
        metadata={
            "help": f"Require `Authorization: Bearer KEY` on /info and /v1/score (default: "
            f"${API_KEY_ENV}; unset: no auth)."
        },
    )
    device: str = field(
        default="auto",
        metadata={"help": "Device for the transformers backend; 'auto': cuda if available."},
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "Weights dtype (logprobs are computed in float32)."}
    )
    batch_size: int = field(
        default=16, metadata={"help": "Sequences per forward pass (transformers backend)."}
    )
    max_top_k: int = field(default=128, metadata={"help": "Largest top_k a request may ask."})
    max_sequence_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Most tokens (context + completion) per sequence. Default: 32768 for "
            "transformers; the model's context length for vllm (which also sizes its engine)."
        },
    )
    max_sequences: int = field(default=4096, metadata={"help": "Most sequences per request."})
    max_batch_tokens: int = field(
        default=65536,
        metadata={"help": "Token budget of one server-side batch of concurrent requests."},
    )
    max_body_bytes: int = field(
        default=64 * 1024 * 1024, metadata={"help": "Largest request body accepted (bytes)."}
    )
    log_level: str = field(
        default="info", metadata={"help": "debug, info, warning or error (debug: one line/batch)."}
    )


def serve_main(argv: list[str]) -> int:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(ServeArguments, prog="opd teacher serve")
    parser.description = "Serve a teacher's per-token scores over HTTP (opd wire format)."
    try:
        (args,) = parser.parse_args_into_dataclasses(argv)
    except SystemExit as exit_:  # --help, or argparse's own usage error (already printed)
        return int(exit_.code or 0)
    problem = check_arguments(args)
    if problem:
        print(f"opd teacher serve: error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        backend = build_backend(args)
    except OSError as error:  # what transformers raises for a folder that holds no model
        print(f"opd teacher serve: error: cannot load {args.model!r}: {error}", file=sys.stderr)
        return 2
    app = build_app(args, backend)
    import uvicorn

    print(f"opd teacher serve: {args.model} ({args.backend}) on http://{args.host}:{args.port}")
    sys.stdout.flush()
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0


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
    for name in (*positive, "max_body_bytes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return f"{name} must be >= 1, got {getattr(args, name)}"
    if args.max_top_k < 0:
        return f"max_top_k must be >= 0, got {args.max_top_k}"
    return None


def build_backend(args: ServeArguments):
    """The scoring backend named by `args.backend` (the model is loaded here)."""
    import torch

    dtype = getattr(torch, args.dtype)
    if args.backend == "vllm":
        from opd.teacher.vllm_backend import VLLMSequenceScorer

        return VLLMSequenceScorer(
            args.model,
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
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model.to(torch.device(device))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    return LocalTeacher(model, batch_size=args.batch_size, tokenizer=tokenizer)


def build_app(args: ServeArguments, backend):
    """The FastAPI app serving `backend` under the limits in `args`."""
    from opd.teacher.server import create_app
    from opd.teacher.wire import RequestLimits

    limits = RequestLimits(
        vocab_size=int(backend.vocab_size),
        max_top_k=args.max_top_k,
        # vLLM needs room for one generated token: its backend accepts max_model_len - 1 tokens.
        max_sequence_tokens=min(
            args.max_sequence_tokens or DEFAULT_MAX_SEQUENCE_TOKENS,
            getattr(backend, "max_sequence_tokens", DEFAULT_MAX_SEQUENCE_TOKENS),
        ),
        max_sequences=args.max_sequences,
    )
    return create_app(
        backend,
        limits=limits,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_batch_tokens=args.max_batch_tokens,
        max_body_bytes=args.max_body_bytes,
        backend_name=args.backend,
    )
