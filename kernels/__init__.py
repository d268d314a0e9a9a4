"""Fused per-token kernels over the vocabulary, and the one rule that picks Triton or torch.

This folder ships as `opd.kernels` (see pyproject.toml's `package-dir`); it is never a top-level
`kernels` package, a name that belongs to Hugging Face's `kernels` library. Import it as
`from opd.kernels import use_triton`.

Each op lives in `<op>.py` with a Triton kernel and a torch reference of the same signature. Every
host function asks `use_triton(*tensors)` which one to run; nothing else decides. The rule:

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
import os
from collections.abc import Iterator
from typing import Literal

import torch

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


__all__ = ["IMPLS", "TRITON_AVAILABLE", "override_impl", "triton_interpret", "use_triton"]
