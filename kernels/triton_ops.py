"""The per-token functions of `opd.kernels.reference`, run with the Triton kernels.

Contract: each function here (the four kernel functions and `fused_linear_divergence_loss`) has
exactly the signature, options, validation errors and values of its namesake in
`opd.kernels.reference` (the spec; read its module docstring for the maths, the masking and the
`-inf` conventions): float32 `[N]` outputs, gradients to the student inputs in their dtypes,
masked rows 0 with exactly 0 gradient whatever they hold. The O(N V) sweeps run in two kernels,
`softmax_stats.py` (logsumexp, entropy, candidate gathers) and `full_divergence_kernel.py`; the
O(N K) top-k bucket maths is `_topk_buckets.py`, plain torch with autograd (shared with the torch
path). The fused functions compute the logits one row chunk at a time with torch matmuls and sweep
each chunk with the kernels; `fused_linear_token_stats` recomputes the chunk in backward.

Kernels run on CUDA tensors, or on CPU under `TRITON_INTERPRET=1`, which must be set before
`triton` is first imported (Triton's own `tl.sum`/`tl.max` are decorated then; `opd.kernels`
imports triton). Test: `TRITON_INTERPRET=1 pytest -q tests/kernels -k triton`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from opd.kernels import _inputs
from opd.kernels._topk_buckets import support_candidates, support_divergence, topk_grad
from opd.kernels.full_divergence_kernel import (
    FullDivergenceFunction,
    full_divergence_bwd,
    full_divergence_fwd,
)
from opd.kernels.softmax_stats import softmax_stats, softmax_stats_bwd, softmax_stats_fwd


def sampled_logprob_entropy(
    logits: Tensor,
    ids: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """`opd.kernels.reference.sampled_logprob_entropy` with one `softmax_stats` sweep per row.

    `chunk_rows` is accepted for the torch path's sake and ignored (one program per row).
    """
    keep, safe_ids = _inputs.sampled_inputs(logits, ids, mask)
    lse, entropy, z_cand = softmax_stats(
        logits, safe_ids[:, None], temperature=temperature, keep_N=keep
    )
    return torch.where(keep, z_cand[:, 0] - lse, 0.0), torch.where(keep, entropy, 0.0)


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
    student_top_k: int | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    """`opd.kernels.reference.topk_divergence`: one `softmax_stats` sweep gathers the support's
    logits, then the `O(N K)` bucket maths of `_topk_buckets.py`.

    `chunk_rows` is accepted for the torch path's sake and ignored (one program per row).
    """
    keep = _inputs.divergence_keep(student_logits, mask, kind, beta, support)
    t_ids, t_lp = _inputs.clean_topk(teacher_topk_ids, teacher_topk_logprobs, keep)
    # The raw logits rank the student's ids as log_softmax(z / T) does, without an [N, V]
    # float32 copy.
    cand, live = support_candidates(student_logits, t_ids, t_lp, support, student_top_k)
    lse, _, z_cand = softmax_stats(student_logits, cand, temperature=temperature, keep_N=keep)
    div = support_divergence(
        z_cand - lse[:, None], cand, live, t_ids, t_lp, student_logits.shape[-1], kind, beta, tail
    )
    return torch.where(keep, div, 0.0)


def full_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    """`opd.kernels.reference.full_divergence` with the `full_divergence_kernel.py` sweeps.

    `chunk_rows` is accepted for the torch path's sake and ignored (one program per row).
    """
    keep = _inputs.divergence_keep(student_logits, mask, kind, beta)
    div = FullDivergenceFunction.apply(
        student_logits, teacher_logits.detach(), kind, float(beta), float(temperature), keep
    )
    return torch.where(keep, div, 0.0)


# ---------------------------------------------------------------------------------------------
# fused_linear_token_stats / fused_linear_divergence_loss. Per row chunk r: z_r = x_r W^T
# (float32, one [chunk_rows, V] block; teacher: z_t,r = x_t,r W_t^T), swept by the kernels:
# softmax_stats over the candidates [y, teacher top-k] and, with a full teacher, full_divergence.
# Saved per row: lse, entropy, full_divergence's (lse_s, lse_t, tsum) and the top-k bucket
# gradient gk = dD/dls at the teacher ids. Gradient w.r.t. z_r (ls = z / T - lse): logprob
# g_cand = g_lp, g_lse = -g_lp; top-k g_cand += g_D gk, g_lse -= g_D sum(gk); full: the
# full_divergence backward kernel adds in. Then dx_r = dz W and dW += dz^T x_r. The token-stats
# backward recomputes z_r; the scalar loss knows its row weights, so it forms dz in the forward.
# ---------------------------------------------------------------------------------------------
_CHUNK_ELEMENTS = 1 << 26  # chunk_rows=None: about 256 MiB of float32 logits per chunk


def _chunk_sizes(vocab: int, chunk_rows: int | None, chunk_vocab: int | None) -> tuple[int, int]:
    rows = max(32, _CHUNK_ELEMENTS // max(vocab, 1)) if chunk_rows is None else int(chunk_rows)
    if rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return rows, max(1, int(chunk_vocab or 8192))


def _logits_rows(x_r: Tensor, weight: Tensor, cv: int) -> Tensor:
    """`[R, V]` float32 `x_r @ weight.T` for float32 `x_r`; a low-precision `weight` is upcast
    `cv` rows at a time (never a float32 copy of the whole weight)."""
    if weight.dtype == torch.float32:
        return x_r @ weight.T
    z_r = torch.empty(x_r.shape[0], weight.shape[0], dtype=torch.float32, device=x_r.device)
    for v0 in range(0, weight.shape[0], cv):
        z_r[:, v0 : v0 + cv] = x_r @ weight[v0 : v0 + cv].float().T
    return z_r


def _linear_grads(dz_r: Tensor, x_r: Tensor, weight: Tensor, grad_w: Tensor | None, cv: int):
    """`dz_r @ weight` (float32 `[R, H]`), adding `dz_r.T @ x_r` into `grad_w` when given."""
    step = weight.shape[0] if weight.dtype == torch.float32 else cv
    grad_x_r = torch.zeros_like(x_r)
    for v0 in range(0, weight.shape[0], step):
        dz_c = dz_r[:, v0 : v0 + step]
        grad_x_r.addmm_(dz_c, weight[v0 : v0 + step].float())
        if grad_w is not None:
            grad_w[v0 : v0 + step].addmm_(dz_c.T, x_r)
    return grad_x_r


def _rows(x: Tensor | None, keep_r: Tensor, r: slice) -> Tensor | None:
    """float32 rows `r` of `x`, masked rows zeroed (their NaN must not reach `dz^T x`)."""
    return None if x is None else torch.where(keep_r[:, None], x[r].float(), 0.0)


class _FusedTensors(NamedTuple):
    """The tensors a fused function reads (saved as they are for the backward)."""

    x: Tensor  # [N, H] student hidden states
    w: Tensor  # [V, H] student lm_head weight
    th: Tensor | None  # [N, H_t] teacher hidden states (full-vocabulary teacher only)
    tw: Tensor | None  # [V, H_t] teacher lm_head weight (full-vocabulary teacher only)
    ids: Tensor | None  # [N] clean sampled ids (None in the loss, which has no logprob)
    t_ids: Tensor | None  # [N, K] clean teacher top-k ids (top-k teacher only)
    t_lp: Tensor | None  # [N, K] their log-probs
    keep: Tensor  # [N] bool keep mask


def _chunk(t_mode: str, inputs: _FusedTensors, r: slice, cv: int):
    """Row chunk `r` of `inputs`: `(x_r, keep_r, z_r, zt_r, cand, t_lp_r)` with the chunk's
    student and teacher logits."""
    x, w, th, tw, ids, t_ids, t_lp, keep = inputs
    keep_r = keep[r]
    x_r = _rows(x, keep_r, r)
    zt_r = _logits_rows(_rows(th, keep_r, r), tw, cv) if t_mode == "full" else None
    cand = [] if ids is None else [ids[r, None]]
    cand += [t_ids[r]] if t_mode == "topk" else []
    t_lp_r = t_lp[r] if t_mode == "topk" else None
    cand_r = torch.cat(cand, 1) if cand else None
    return x_r, keep_r, _logits_rows(x_r, w, cv), zt_r, cand_r, t_lp_r


def _forward_rows(z_r, zt_r, cand, keep_r, t_lp_r, n_ids, opts):
    """One chunk's `(logprob, entropy, divergence)` and backward state; `n_ids` (0 or 1)
    leading columns of `cand` are sampled ids, the rest teacher top-k ids."""
    kind, beta, temp, tail, _ = opts
    lse = ent = div = lse_s = lse_t = tsum = torch.zeros_like(keep_r, dtype=torch.float32)
    z_cand = lse[:, None]
    if cand is not None:
        lse, ent, z_cand = softmax_stats_fwd(z_r, cand, temp, keep_r)
    gk = z_cand[:, :0]  # [R, 0]: no top-k teacher, no bucket gradient
    if t_lp_r is not None:
        div, gk = topk_grad(z_cand[:, n_ids:] - lse[:, None], t_lp_r, kind, beta, tail)
    if zt_r is not None:
        div, lse_s, lse_t, tsum = full_divergence_fwd(
            z_r, zt_r, kind=kind, beta=beta, temperature=temp, keep_N=keep_r
        )
    return (z_cand[:, 0] - lse, ent, div), (lse, ent, lse_s, lse_t, tsum, gk)


def _grad_logits_rows(z_r, zt_r, cand, keep_r, state_r, grads_r, n_ids, opts) -> Tensor:
    """float32 `[R, V]` gradient w.r.t. `z_r` of `g_lp . logprob + g_ent . H + g_div . D`."""
    kind, beta, temp, _, _ = opts
    lse, ent, lse_s, lse_t, tsum, gk = state_r
    g_lp, g_ent, g_div = grads_r
    dz_r = None
    if cand is not None:
        g_cand = torch.cat([g_lp[:, None]] * n_ids + [g_div[:, None] * gk], 1)
        g_lse = -g_cand.sum(-1)  # ls = z / T - lse at every candidate
        dz_r = softmax_stats_bwd(z_r, cand, temp, keep_r, lse, ent, g_lse, g_ent, g_cand)
    if zt_r is not None:
        dz_r = full_divergence_bwd(
            z_r, zt_r, lse_s, lse_t, tsum, g_div, kind=kind, beta=beta, temperature=temp,
            keep_N=keep_r, dlogits_NV=dz_r,
        )  # fmt: skip
    return dz_r


class _FusedLinearTokenStats(torch.autograd.Function):
    """Row-chunked forward/backward of `fused_linear_token_stats` (grads to hidden and weight)."""

    @staticmethod
    def forward(ctx, x, w, ids, keep, th, tw, t_ids, t_lp, t_mode, opts, chunk_rows):
        n_ids, cv = 1, opts[-1]
        inputs = _FusedTensors(x, w, th, tw, ids, t_ids, t_lp, keep)
        outs, states = [], []
        for r0 in range(0, x.shape[0], chunk_rows):
            r = slice(r0, r0 + chunk_rows)
            _, keep_r, z_r, zt_r, cand, t_lp_r = _chunk(t_mode, inputs, r, cv)
            out, state = _forward_rows(z_r, zt_r, cand, keep_r, t_lp_r, n_ids, opts)
            outs.append(out)
            states.append(state)
        lp, ent, div = (torch.cat([o[i] for o in outs]) for i in range(3))
        state = [torch.cat([s[i] for s in states]) for i in range(6)]
        ctx.save_for_backward(*inputs, *state)
        ctx.t_mode, ctx.opts, ctx.chunk_rows = t_mode, opts, chunk_rows
        return tuple(torch.where(keep, o, 0.0) for o in (lp, ent, div))

    @staticmethod
    def backward(ctx, g_lp, g_ent, g_div):
        n_inputs = len(_FusedTensors._fields)
        inputs, state = _FusedTensors(*ctx.saved_tensors[:n_inputs]), ctx.saved_tensors[n_inputs:]
        x, w, keep, cv = inputs.x, inputs.w, inputs.keep, ctx.opts[-1]
        grads = [torch.where(keep, g.float(), 0.0) for g in (g_lp, g_ent, g_div)]
        grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for r0 in range(0, x.shape[0], ctx.chunk_rows):
            r = slice(r0, r0 + ctx.chunk_rows)
            x_r, keep_r, z_r, zt_r, cand, _ = _chunk(ctx.t_mode, inputs, r, cv)
            state_r, grads_r = [s[r] for s in state], [g[r] for g in grads]
            dz_r = _grad_logits_rows(z_r, zt_r, cand, keep_r, state_r, grads_r, 1, ctx.opts)
            del z_r, zt_r  # one chunk of logits at a time
            grad_x[r] = _linear_grads(dz_r, x_r, w, grad_w, cv)
        return (grad_x.to(x.dtype), grad_w.to(w.dtype), *([None] * 9))


class _FusedLinearDivergenceLoss(torch.autograd.Function):
    """Scalar `sum_r weight_r D_r`: its gradients are formed chunk by chunk in the forward (no
    recomputation) and scaled by `grad_output` in the backward."""

    @staticmethod
    def forward(ctx, x, w, weight, keep, th, tw, t_ids, t_lp, t_mode, opts, chunk_rows):
        cv, inputs = opts[-1], _FusedTensors(x, w, th, tw, None, t_ids, t_lp, keep)
        weight = torch.where(keep, weight.float(), 0.0)
        grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        divs = []
        for r0 in range(0, x.shape[0], chunk_rows):
            r = slice(r0, r0 + chunk_rows)
            x_r, keep_r, z_r, zt_r, cand, t_lp_r = _chunk(t_mode, inputs, r, cv)
            (_, _, div_r), state_r = _forward_rows(z_r, zt_r, cand, keep_r, t_lp_r, 0, opts)
            zeros_r = torch.zeros_like(div_r)
            grads_r = (zeros_r, zeros_r, weight[r])
            dz_r = _grad_logits_rows(z_r, zt_r, cand, keep_r, state_r, grads_r, 0, opts)
            del z_r, zt_r
            grad_x[r] = _linear_grads(dz_r, x_r, w, grad_w, cv)
            divs.append(div_r)
        div = torch.where(keep, torch.cat(divs), 0.0)
        ctx.save_for_backward(grad_x.to(x.dtype), grad_w.to(w.dtype))
        ctx.mark_non_differentiable(div)
        return (div * weight).sum(), div

    @staticmethod
    def backward(ctx, g_loss, _g_div):
        grad_x, grad_w = ctx.saved_tensors
        return (grad_x * g_loss.to(grad_x.dtype), grad_w * g_loss.to(grad_w.dtype), *[None] * 9)


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
    tail: bool = True,
    chunk_rows: int | None = 1024,
    chunk_vocab: int | None = 8192,
) -> dict[str, Tensor]:
    """`opd.kernels.reference.fused_linear_token_stats`, one row chunk of logits at a time.

    Same values and gradients as the reference. Peak memory: about three `[chunk_rows, V]`
    float32 blocks (student logits, their gradient, teacher logits) plus a float32 `[V, H]`
    weight-gradient accumulator and `O(N K)` saved state.

    Args:
        chunk_rows: rows per chunk of logits (None: about 256 MiB of float32 logits).
        chunk_vocab: weight rows upcast to float32 at a time when the weights are not float32.
        The other arguments: as the reference.
    """
    teacher = (teacher_hidden, teacher_weight, teacher_topk_ids, teacher_topk_logprobs)
    keep, safe_ids, (t_mode, th, tw, t_ids, t_lp) = _inputs.fused_inputs(
        student_hidden, ids, mask, kind, beta, teacher
    )
    rows, cv = _chunk_sizes(student_weight.shape[0], chunk_rows, chunk_vocab)
    opts = (kind, float(beta), float(temperature), tail, cv)
    lp, ent, div = _FusedLinearTokenStats.apply(
        student_hidden, student_weight, safe_ids, keep, th, tw, t_ids, t_lp, t_mode, opts, rows
    )
    return _inputs.token_stats_output(lp, ent, div, t_mode)


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
    tail: bool = True,
    chunk_rows: int | None = 1024,
) -> tuple[Tensor, Tensor]:
    """`opd.kernels.reference.fused_linear_divergence_loss`, its gradient formed in the forward.

    `chunk_rows`: rows per chunk of logits (None: about 256 MiB of float32 logits); the other
    arguments as the reference.
    """
    teacher = (teacher_hidden, teacher_weight, teacher_topk_ids, teacher_topk_logprobs)
    keep, weight, (t_mode, th, tw, t_ids, t_lp) = _inputs.loss_inputs(
        student_hidden, weight, mask, kind, beta, teacher
    )
    rows, cv = _chunk_sizes(student_weight.shape[0], chunk_rows, None)
    opts = (kind, float(beta), float(temperature), tail, cv)
    return _FusedLinearDivergenceLoss.apply(
        student_hidden, student_weight, weight, keep, th, tw, t_ids, t_lp, t_mode, opts, rows
    )


__all__ = [
    "full_divergence",
    "fused_linear_divergence_loss",
    "fused_linear_token_stats",
    "sampled_logprob_entropy",
    "topk_divergence",
]
