"""Argument handling shared by the three paths of `opd.kernels`: the spec (`reference.py`), the
torch path (`torch_ops.py`) and the Triton path (`triton_ops.py`).

Contract: only the checks and clean-ups of the public arguments live here (the choices of `kind`
and `support`, `beta`'s range, the keep mask, masked rows and padded top-k entries made harmless,
the teacher given as hidden states or as top-k), plus the keys of the fused functions' returned
dict, so that the three paths accept, reject and answer the same calls. The maths of each path
stays in its own module: the reference is an independent spec, not a caller of the fast paths'
helpers. Tested through every path by tests/kernels/test_parity.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KINDS = ("reverse_kl", "forward_kl", "jsd")
SUPPORTS = ("teacher", "student", "union")
NEG_INF = -math.inf
MIN_TAIL = 1e-10
"""Floor of a tail mass (`log(1 - e^x)` with `x <= -MIN_TAIL`): a top-k support whose mass rounds
to 1 in float32 would otherwise give log 0 and an infinite gradient. Part of the contract: every
path floors at the same value."""


def check_options(kind: str, beta: float, support: str = "teacher") -> None:
    """Raise `ValueError` naming the bad option and the accepted values."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if support not in SUPPORTS:
        raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


def keep_mask(mask: Tensor | None, n: int, device: torch.device) -> Tensor:
    """`[N]` bool, True where the row is computed (all rows when `mask` is None)."""
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return mask.to(device=device, dtype=torch.bool)


def divergence_keep(
    student_logits: Tensor, mask: Tensor | None, kind: str, beta: float, support: str = "teacher"
) -> Tensor:
    """Checked options of a divergence on `[N, V]` logits, and its `[N]` keep mask."""
    check_options(kind, beta, support)
    return keep_mask(mask, student_logits.shape[0], student_logits.device)


def sampled_inputs(logits: Tensor, ids: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """`(keep, clean ids)` of `sampled_logprob_entropy` on `[N, V]` logits."""
    keep = keep_mask(mask, logits.shape[0], logits.device)
    return keep, clean_ids(ids, keep)


def clean_ids(ids: Tensor, keep: Tensor) -> Tensor:
    """int64 sampled ids with masked rows set to 0 (theirs may be padding such as -100)."""
    return torch.where(keep, ids.long(), 0)


def clean_rows(x: Tensor, keep: Tensor) -> Tensor:
    """float32 copy with masked rows zeroed (so they produce finite values and zero gradient)."""
    return torch.where(keep.view(-1, *([1] * (x.dim() - 1))), x.float(), 0.0)


def clean_topk(ids: Tensor, logprobs: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Detached float32 teacher top-k with NaN logprobs read as `-inf` padding, padding ids set to
    0, and masked rows replaced by a valid one-hot row (id 0 with logprob 0)."""
    lp = logprobs.detach().float()
    one_hot_row = torch.full_like(lp, NEG_INF)
    one_hot_row[:, 0] = 0.0
    lp = torch.where(keep[:, None], lp, one_hot_row)
    lp = torch.where(lp.isnan(), NEG_INF, lp)
    ids = torch.where(lp > NEG_INF, ids.long(), 0)
    return ids, lp


def require_teacher(teacher_hidden: Tensor | None, teacher_topk_ids: Tensor | None) -> None:
    """A divergence loss needs a teacher: raise `ValueError` when neither kind is given."""
    if teacher_hidden is None and teacher_topk_ids is None:
        raise ValueError("a divergence loss needs a teacher: hidden and weight, or its top-k")


def teacher_inputs(th, tw, t_ids, t_lp, keep):
    """`(mode, hidden, weight, topk_ids, topk_logprobs)`, mode in none / full / topk, detached.

    Args:
        th, tw: teacher hidden `[N, H_t]` and lm_head weight `[V, H_t]` (full-vocabulary teacher).
        t_ids, t_lp: teacher top-k ids and logprobs `[N, K]` (cleaned by `clean_topk`).
        keep: `[N]` bool keep mask.
    """
    if th is not None and t_ids is not None:
        raise ValueError("give either teacher_hidden/teacher_weight or the teacher top-k, not both")
    if th is not None:
        if tw is None:
            raise ValueError("teacher_hidden needs teacher_weight")
        return "full", th.detach(), tw.detach(), None, None
    if t_ids is not None:
        if t_lp is None:
            raise ValueError("teacher_topk_ids needs teacher_topk_logprobs")
        return "topk", None, None, *clean_topk(t_ids, t_lp, keep)
    return "none", None, None, None, None


def fused_inputs(hidden: Tensor, ids: Tensor | None, mask, kind: str, beta: float, teacher):
    """Checked arguments of a fused function: `(keep, clean ids or None, teacher_inputs(...))`.

    Args:
        hidden: `[N, H]` student hidden states (their row count and device).
        ids: `[N]` sampled token ids, or None (a divergence loss has none).
        mask, kind, beta: as the public functions.
        teacher: `(teacher_hidden, teacher_weight, teacher_topk_ids, teacher_topk_logprobs)`.
    """
    check_options(kind, beta)
    keep = keep_mask(mask, hidden.shape[0], hidden.device)
    safe_ids = None if ids is None else clean_ids(ids, keep)
    return keep, safe_ids, teacher_inputs(*teacher, keep)


def loss_inputs(hidden: Tensor, weight: Tensor | None, mask, kind: str, beta: float, teacher):
    """Checked arguments of `fused_linear_divergence_loss`: `(keep, row weights, teacher_inputs)`
    with the weights detached (default 1); raises when no teacher is given."""
    require_teacher(teacher[0], teacher[2])
    keep, _, teacher_in = fused_inputs(hidden, None, mask, kind, beta, teacher)
    weight = torch.ones(hidden.shape[0], device=hidden.device) if weight is None else weight
    return keep, weight.detach(), teacher_in


def token_stats_output(logprob: Tensor, entropy: Tensor, divergence, t_mode: str):
    """The dict `fused_linear_token_stats` returns: `divergence` only when a teacher was given."""
    out = {"logprob": logprob, "entropy": entropy}
    if t_mode != "none":
        out["divergence"] = divergence
    return out
