"""Fused per-token kernels over the vocabulary, and the one rule that picks Triton or torch.

This folder ships as `opd.kernels` (see pyproject.toml's `package-dir`); it is never a top-level
`kernels` package, a name that belongs to Hugging Face's `kernels` library. Import it as
`from opd.kernels import use_triton`.

Public API (argument order fixed): `sampled_logprob_entropy`, `topk_divergence`, `full_divergence`,
`fused_linear_token_stats`. Each asks `use_triton(*tensors)` which implementation runs, nothing
else decides: `triton_ops.py` (Triton kernels in `softmax_stats.py`, `full_divergence_kernel.py`)
or `torch_ops.py` (chunked torch, what CPU users run). The spec of both is the plain-autograd
`opd.kernels.reference` (`reference.py`), which tests and benchmarks import; the three share only
their argument handling (`_inputs.py`). The rule:

1. `override_impl("torch" | "triton")` (tests) or the env var `OPD_KERNELS=torch|triton` forces
   one. Forcing Triton where it cannot run raises `RuntimeError` saying why: there is no silent
   fallback when the user asked for Triton.
2. Otherwise Triton when Triton imports AND (any tensor is on CUDA OR `TRITON_INTERPRET=1`).
3. Otherwise torch.

`TRITON_INTERPRET=1` runs the Triton kernels in Triton's CPU interpreter (slow; for parity tests on
CPU). Triton reads it when a kernel is decorated, so set it before importing a kernel module.

Test: `pytest tests/kernels/test_dispatch.py`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any, Literal

import torch
from torch import Tensor

Impl = Literal["torch", "triton"]
IMPLS: tuple[Impl, ...] = ("torch", "triton")
ENV_VAR = "OPD_KERNELS"

try:
    import triton  # noqa: F401  # imported to prove it works (~0.3 s after torch)

    TRITON_AVAILABLE = True
except ImportError:
    TRITON_AVAILABLE = False
"""Whether Triton imports here (its kernels still need a CUDA tensor or TRITON_INTERPRET=1)."""

# Values Triton itself reads as true (triton._C.libtriton.getenv_bool), so that we agree with it
# on whether kernels run in the interpreter.
_TRUE_VALUES = frozenset({"1", "true", "on", "yes", "y"})

_override: Impl | None = None


def _check_impl(name: str, source: str) -> Impl:
    if name not in IMPLS:
        raise ValueError(f"{source}={name!r} is not a kernel implementation; use one of {IMPLS}")
    return name  # type: ignore[return-value]  # narrowed by the membership check above


def triton_interpret() -> bool:
    """Whether `TRITON_INTERPRET` asks Triton to run kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE_VALUES


def _forced_impl() -> Impl | None:
    if _override is not None:
        return _override
    value = os.environ.get(ENV_VAR, "").strip()
    return _check_impl(value, ENV_VAR) if value else None


def _why_triton_cannot_run(on_cuda: bool) -> str | None:
    if not TRITON_AVAILABLE:
        return "Triton does not import here; install it (`pip install triton`, or opd's gpu extra)"
    if not (on_cuda or triton_interpret()):
        return (
            "the tensors are not on a CUDA device and TRITON_INTERPRET is not set; move them to "
            "CUDA, or set TRITON_INTERPRET=1 to run the kernels in Triton's (slow) CPU interpreter"
        )
    return None


def use_triton(*tensors: torch.Tensor) -> bool:
    """The one dispatch rule: True to run the Triton kernel, False for the torch reference.

    Args:
        *tensors: the op's input tensors; their devices decide (any CUDA tensor means CUDA).

    Returns:
        True when Triton is forced, or when it is not forced to torch and Triton is installed and
        (a tensor is on CUDA or TRITON_INTERPRET=1); False otherwise.

    Raises:
        ValueError: `OPD_KERNELS` holds something other than "torch" or "triton".
        RuntimeError: Triton is forced but cannot run here (the message says why and what to do).
    """
    on_cuda = any(tensor.is_cuda for tensor in tensors)
    forced = _forced_impl()
    if forced == "torch":
        return False
    reason = _why_triton_cannot_run(on_cuda)
    if forced == "triton" and reason is not None:
        source = "override_impl('triton')" if _override is not None else f"{ENV_VAR}=triton"
        raise RuntimeError(
            f"{source} asks for the Triton kernels, but {reason}; or use the torch path with "
            f"{ENV_VAR}=torch (or unset {ENV_VAR} to choose automatically)."
        )
    return reason is None


@contextlib.contextmanager
def override_impl(name: Impl | None) -> Iterator[None]:
    """Force `use_triton` to pick `name` inside the block, above `OPD_KERNELS` (for tests).

    `None` restores the automatic rule (`OPD_KERNELS` still applies). Forcing "triton" where it
    cannot run raises when `use_triton` is called, as the env var does.
    """
    global _override
    if name is not None:
        _check_impl(name, "override_impl")
    previous = _override
    _override = name
    try:
        yield
    finally:
        _override = previous


def _ops(*tensors: torch.Tensor) -> ModuleType:
    """The module holding the chosen implementation (imported on first use, so that a
    `TRITON_INTERPRET` set by the caller before the first call is what Triton sees)."""
    name = "triton_ops" if use_triton(*tensors) else "torch_ops"
    return importlib.import_module(f"{__name__}.{name}")


def sampled_logprob_entropy(
    logits: Tensor,
    ids: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    **options: Any,
) -> tuple[Tensor, Tensor]:
    """Student log-prob of the sampled token and entropy per row: float32 `([N], [N])`.

    Args:
        logits: `[N, V]` student logits (any float dtype; receives gradient).
        ids: `[N]` int64 sampled token ids.
        temperature: divides the logits.
        mask: optional `[N]` bool, True = keep; masked rows give 0 and get 0 gradient.
        **options: implementation keywords (`chunk_rows` for the torch path).

    Maths and conventions: `opd.kernels.reference.sampled_logprob_entropy` (the spec).
    """
    impl = _ops(logits)
    return impl.sampled_logprob_entropy(logits, ids, temperature=temperature, mask=mask, **options)


def topk_divergence(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    *,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    support: str = "teacher",
    tail: bool = True,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    **options: Any,
) -> Tensor:
    """Student/teacher divergence on a top-k support per row: float32 `[N]`.

    Args:
        student_logits: `[N, V]` student logits (receives gradient).
        teacher_topk_ids: `[N, K]` int64 teacher top-k ids.
        teacher_topk_logprobs: `[N, K]` their log-probs, `-inf` = padding (constant).
        kind: "reverse_kl", "forward_kl" or "jsd"; beta: JSD weight (0 = forward, 1 = reverse KL).
        support: "teacher", "student" or "union"; tail: tail bucket (True) or renormalise.
        temperature: divides the student logits; mask: optional `[N]` bool, True = keep.
        **options: `student_top_k`; implementation keywords (`chunk_rows` for the torch path).

    Maths and conventions: `opd.kernels.reference.topk_divergence` (the spec).
    """
    impl = _ops(student_logits)
    return impl.topk_divergence(
        student_logits, teacher_topk_ids, teacher_topk_logprobs, kind=kind, beta=beta,
        support=support, tail=tail, temperature=temperature, mask=mask, **options,
    )  # fmt: skip


def full_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    **options: Any,
) -> Tensor:
    """Student/teacher divergence over the full vocabulary per row: float32 `[N]`.

    Args:
        student_logits: `[N, V]` (receives gradient); teacher_logits: `[N, V]` (constant).
        kind: "reverse_kl", "forward_kl" or "jsd"; beta: JSD weight (0 = forward, 1 = reverse KL).
        temperature: divides both; mask: optional `[N]` bool, True = keep.
        **options: implementation keywords (`chunk_rows` for the torch path).

    Maths and conventions: `opd.kernels.reference.full_divergence` (the spec).
    """
    impl = _ops(student_logits, teacher_logits)
    return impl.full_divergence(
        student_logits, teacher_logits, kind=kind, beta=beta, temperature=temperature,
        mask=mask, **options,
    )  # fmt: skip


def fused_linear_token_stats(
    student_hidden: Tensor,
    student_weight: Tensor,
    ids: Tensor,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    **options: Any,
) -> dict[str, Tensor]:
    """Logprob, entropy and divergence from hidden states, never holding `[N, V]` logits.

    Args:
        student_hidden: `[N, H]` and student_weight: `[V, H]` (both receive gradient).
        ids: `[N]` int64 sampled token ids.
        teacher_hidden, teacher_weight: `[N, H_t]`, `[V, H_t]` for a full-vocabulary divergence;
            or teacher_topk_ids, teacher_topk_logprobs: `[N, K]` for a top-k one (constants).
        kind, beta, temperature, mask: as `full_divergence`.
        **options: `tail` (top-k), `chunk_rows`, `chunk_vocab`.

    Returns:
        dict of float32 `[N]`: `logprob`, `entropy`, and `divergence` when a teacher is given.

    Maths and conventions: `opd.kernels.reference.fused_linear_token_stats` (the spec).
    """
    if student_hidden.shape[0] == 0:  # e.g. a TIP selection that kept nothing
        empty = _empty_rows(student_hidden, student_weight)
        has_teacher = teacher_hidden is not None or teacher_topk_ids is not None
        names = ("logprob", "entropy", "divergence") if has_teacher else ("logprob", "entropy")
        return dict.fromkeys(names, empty)
    impl = _ops(student_hidden, student_weight)
    return impl.fused_linear_token_stats(
        student_hidden, student_weight, ids, teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight, teacher_topk_ids=teacher_topk_ids,
        teacher_topk_logprobs=teacher_topk_logprobs, kind=kind, beta=beta,
        temperature=temperature, mask=mask, **options,
    )  # fmt: skip


def fused_linear_divergence_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    weight: Tensor | None = None,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    **options: Any,
) -> tuple[Tensor, Tensor]:
    """Scalar `sum_r weight_r D_r` of the `fused_linear_token_stats` divergence, with its
    gradient computed chunk by chunk in the forward (no recomputation in the backward).

    Use it for a supervised divergence term whose per-token weights are known before the forward
    (GKD-style distillation loss); use `fused_linear_token_stats` when the coefficients depend on
    the outputs (policy-gradient terms).

    Args:
        student_hidden, student_weight, teacher_*, kind, beta, temperature, mask: as
            `fused_linear_token_stats` (a teacher is required).
        weight: optional `[N]` per-row weights (constant), default 1.
        **options: `tail` (top-k), `chunk_rows`.

    Returns:
        `(loss, divergence)`: float32 scalar (differentiable) and `[N]` divergence (detached).

    Maths and conventions: `opd.kernels.reference.fused_linear_divergence_loss` (the spec).
    """
    if student_hidden.shape[0] == 0:
        empty = _empty_rows(student_hidden, student_weight)
        return empty.sum(), empty.detach()
    impl = _ops(student_hidden, student_weight)
    return impl.fused_linear_divergence_loss(
        student_hidden, student_weight, teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight, teacher_topk_ids=teacher_topk_ids,
        teacher_topk_logprobs=teacher_topk_logprobs, weight=weight, kind=kind, beta=beta,
        temperature=temperature, mask=mask, **options,
    )  # fmt: skip


def _empty_rows(hidden: Tensor, weight: Tensor) -> Tensor:
    """Float32 `[0]`, attached to both inputs' graphs so that a backward still runs (zero grads)."""
    return ((hidden.sum() + weight.sum()) * 0.0).float().expand(0)


__all__ = [
    "IMPLS",
    "TRITON_AVAILABLE",
    "full_divergence",
    "fused_linear_divergence_loss",
    "fused_linear_token_stats",
    "override_impl",
    "sampled_logprob_entropy",
    "topk_divergence",
    "triton_interpret",
    "use_triton",
]
