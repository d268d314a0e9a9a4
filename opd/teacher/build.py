"""Build the teacher named by a config's `teacher_*` fields (one `match`, no registry).

Used by `opd distill` (an `OPDConfig`) and `opd teacher precompute` (its own arguments, which
carry the same `teacher_*` field names). Every teacher is checked against the student's tokenizer
before it is returned, so a mismatch fails before any model or engine is loaded for training.
An in-process (`local`) teacher loads in `teacher_dtype` where `teacher_device_map` says (default:
the student's precision, on this process's device) and logs its parameter memory once.
"""

from __future__ import annotations

import copy
from typing import Any

from opd.arguments import ConfigError
from opd.teacher.http import RetryPolicy
from opd.teacher.protocol import TeacherScorer
from opd.types import DIRECT_TEACHER_MODES


def build_teacher(args: Any, student_tokenizer=None) -> TeacherScorer:
    """The teacher for `args.teacher_mode`; checked against `student_tokenizer` when given.

    With `args.teacher_routes` (MOPD), a `RoutedTeacher` over one such teacher per route.
    """
    if getattr(args, "teacher_routes", None):
        return _build_routed_teacher(args, student_tokenizer)
    if getattr(args, "teacher_cross_tokenizer", False) and args.teacher_mode != "offline":
        return _build_cross_tokenizer_teacher(args, student_tokenizer)
    match args.teacher_mode:
        case "local":
            return _build_local_teacher(args, student_tokenizer)
        case "server":
            teacher = _build_server_teacher(args)
        case "vllm":
            from opd.teacher.vllm_client import VLLMTeacher

            teacher = VLLMTeacher(
                args.teacher_urls, model=args.teacher_model_name_or_path, **_http_kwargs(args)
            )
        case "offline":
            from opd.teacher.offline import OfflineTeacher

            teacher = OfflineTeacher(
                args.teacher_shards,
                expected_model=args.teacher_model_name_or_path,
                top_k=args.teacher_top_k,
                temperature=args.teacher_temperature,
            )
            teacher.check_cross_tokenizer_mode(bool(getattr(args, "teacher_cross_tokenizer", 0)))
        case other:
            raise ValueError(f"teacher_mode={other!r} is not one of local, server, vllm, offline.")
    if student_tokenizer is not None:
        teacher.check_student_tokenizer(_text_tokenizer(student_tokenizer))
    return teacher


# Modes a route can use: its TEACHER is a model name/path (local) or a URL (server, vllm).
ROUTED_MODES = DIRECT_TEACHER_MODES


def _build_routed_teacher(args: Any, student_tokenizer) -> TeacherScorer:
    """One teacher per route, each built (and tokenizer-checked) like a single teacher.

    Each route's teacher comes from a shallow copy of `args` with its own model (local) or URL
    (server, vllm). Remote routes drop `teacher_model_name_or_path`: routes serve different
    models, so one expected name would reject all but one of them; each server reports its own.
    """
    from opd.teacher.routed import RoutedTeacher

    if args.teacher_mode not in ROUTED_MODES:
        raise ConfigError(
            f"teacher_routes with teacher_mode={args.teacher_mode!r}: routing supports "
            f"{', '.join(ROUTED_MODES)}; use one of those or leave teacher_routes empty."
        )
    teachers = {}
    for name, target in parse_teacher_routes(args.teacher_routes, args.teacher_mode).items():
        route_args = copy.copy(args)
        route_args.teacher_routes = []
        if args.teacher_mode == "local":
            route_args.teacher_model_name_or_path = target
        else:
            route_args.teacher_urls = [target]
            route_args.teacher_model_name_or_path = None
        teachers[name] = build_teacher(route_args, student_tokenizer)
    return RoutedTeacher(teachers)


def parse_teacher_routes(entries: list[str], teacher_mode: str) -> dict[str, str]:
    """`["NAME=TEACHER", ...]` as `{NAME: TEACHER}`, rejecting malformed and duplicate names.

    Splits at the first `=` only, so a URL with a query string stays whole.
    """
    routes: dict[str, str] = {}
    for entry in entries:
        name, equals, target = entry.partition("=")
        name, target = name.strip(), target.strip()
        if not equals or not name or not target:
            raise ConfigError(
                f"teacher_routes entry {entry!r} is not NAME=TEACHER "
                "(e.g. math=Qwen/Qwen3-8B, or code=http://host:8000)."
            )
        if name in routes:
            raise ConfigError(f"teacher_routes names the route {name!r} twice: {entries}.")
        if teacher_mode != "local" and not target.startswith(("http://", "https://")):
            raise ConfigError(
                f"teacher_routes entry {entry!r}: with teacher_mode={teacher_mode!r} TEACHER "
                "is a URL starting with http:// or https://."
            )
        routes[name] = target
    return routes


def _build_cross_tokenizer_teacher(args: Any, student_tokenizer) -> TeacherScorer:
    """A teacher of another tokenizer (`opd/teacher/cross_tokenizer.py`): the inner teacher is
    checked against the teacher's own tokenizer (a server must tokenize like the tokenizer the
    completions are re-tokenized with), the pair by what must still match. Offline shards
    written in cross-tokenizer mode are already on the student's positions (no wrapper)."""
    import copy

    from opd.teacher.cross_tokenizer import (
        CrossTokenizerTeacher,
        LocalTeacherTokens,
        ServedTeacherTokens,
    )

    if student_tokenizer is None:
        raise ValueError("teacher_cross_tokenizer needs the student's tokenizer to align with.")
    student_tokenizer = _text_tokenizer(student_tokenizer)
    inner_args = copy.copy(args)
    inner_args.teacher_cross_tokenizer = False
    inner = build_teacher(inner_args, None)
    name = args.teacher_tokenizer_name_or_path or (
        args.teacher_model_name_or_path if args.teacher_mode == "local" else None
    )
    if name is None and args.teacher_mode == "vllm":
        tokens = ServedTeacherTokens(inner, student_tokenizer)
    elif name is None:
        raise ConfigError(
            "teacher_cross_tokenizer with teacher_mode='server': set "
            "teacher_tokenizer_name_or_path to the served teacher's tokenizer (the client "
            "re-tokenizes the completions with it)."
        )
    else:
        teacher_tokenizer = getattr(inner, "tokenizer", None) or _load_tokenizer(name)
        inner.check_student_tokenizer(teacher_tokenizer)  # the server tokenizes like it
        tokens = LocalTeacherTokens(teacher_tokenizer, name=name)
    teacher = CrossTokenizerTeacher(inner, tokens, student_tokenizer, rule=args.teacher_span_rule)
    teacher.check_student_tokenizer(student_tokenizer)
    return teacher


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    from opd.models import resolve_model_name

    try:
        return AutoTokenizer.from_pretrained(resolve_model_name(name))
    except OSError as error:
        raise ConfigError(
            f"cannot load the teacher tokenizer from {name!r} ({error}); check "
            "teacher_tokenizer_name_or_path."
        ) from error


def _build_server_teacher(args: Any) -> TeacherScorer:
    """An `opd teacher serve` client; in hidden-state mode when the method needs the teacher's
    full distribution (the server sends hidden states, the client applies the teacher's head)."""
    kwargs = {"expected_model": args.teacher_model_name_or_path, **_http_kwargs(args)}
    if getattr(args, "needs_full_teacher_distribution", False):
        from opd.teacher.hidden_client import HiddenStateServerTeacher

        teacher = HiddenStateServerTeacher(
            args.teacher_urls,
            hidden_dtype=str(args.teacher_hidden_dtype),
            device=_student_device(args),
            **kwargs,
        )
        teacher.hidden_info()  # a server that cannot send hidden states fails here
        return teacher
    from opd.teacher.client import ServerTeacher

    return ServerTeacher(args.teacher_urls, **kwargs)


def _http_kwargs(args: Any) -> dict[str, Any]:
    """What both HTTP clients (`server`, `vllm`) take from the config."""
    return {
        "api_key": args.teacher_api_key,
        "timeout_s": args.teacher_timeout_s,
        "retry": RetryPolicy(budget_s=float(args.teacher_retry_budget_s)),
        "temperature": args.teacher_temperature,
        "batch_size": args.teacher_batch_size,
    }


def _build_local_teacher(args: Any, student_tokenizer) -> TeacherScorer:
    """Compare tokenizers before loading the teacher's weights (the slow, large part)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.teacher.consistency import check_same_tokenizer
    from opd.teacher.local import LocalTeacher

    name = args.teacher_model_name_or_path
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as error:
        raise ConfigError(
            f"cannot load the teacher tokenizer from {name!r} ({error}); check "
            "teacher_model_name_or_path."
        ) from error
    if student_tokenizer is not None:
        check_same_tokenizer(
            _text_tokenizer(student_tokenizer), teacher_tokenizer, teacher_name=name
        )
    dtype = resolve_teacher_dtype(args)
    device_map = getattr(args, "teacher_device_map", None)
    init_kwargs = dict(getattr(args, "teacher_model_init_kwargs", None) or {})
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, device_map=device_map, **init_kwargs
        )
    except OSError as error:
        raise ConfigError(
            f"cannot load the teacher model from {name!r} ({error}); check "
            "teacher_model_name_or_path."
        ) from error
    if device_map is None:  # beside the student: this process's device
        model = model.to(_student_device(args))
    print(f"opd: teacher {name} loaded in {describe_placement(model)}")
    return LocalTeacher(
        model,
        temperature=args.teacher_temperature,
        batch_size=args.teacher_batch_size,
        tokenizer=teacher_tokenizer,
    )


def resolve_teacher_dtype(args: Any):
    """`teacher_dtype` as a torch dtype; 'auto' is the trainer's precision (an 8B teacher is
    16 GB in bf16, 32 GB in fp32)."""
    import torch

    name = getattr(args, "teacher_dtype", "auto")
    if name == "auto":
        if getattr(args, "bf16", False):
            return torch.bfloat16
        return torch.float16 if getattr(args, "fp16", False) else torch.float32
    return getattr(torch, name)


def describe_placement(model) -> str:
    """'bfloat16 on cpu: 123.4 MiB': the dtype(s), device(s) and parameter memory of `model`."""
    params = list(model.parameters())
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    devices = sorted({str(p.device) for p in params})
    mib = sum(p.numel() * p.element_size() for p in params) / 2**20
    return f"{', '.join(dtypes)} on {', '.join(devices)}: {mib:.1f} MiB"


def _student_device(args: Any):
    """The device this process trains on (`TrainingArguments.device`: `cuda:<local rank>` under
    several processes); a config without one (`opd teacher precompute`): cuda if present."""
    import torch

    device = getattr(args, "device", None)
    if device is not None:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _text_tokenizer(tokenizer):
    """A processor's text tokenizer, or the tokenizer itself."""
    return getattr(tokenizer, "tokenizer", tokenizer)
