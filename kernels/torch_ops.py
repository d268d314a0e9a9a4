"""The torch path of `opd.kernels`: what CPU users run, chunked so memory stays bounded.

Contract: the four functions have the signatures and values of `opd.losses.reference` (the spec;
read its module docstring for the maths, masking and `-inf` conventions), plus one keyword,
`chunk_rows`, and are differentiable w.r.t. the student inputs.

- `sampled_logprob_entropy`, `topk_divergence`, `full_divergence` take logits that already exist
  as `[N, V]`. The reference runs one row chunk at a time, without autograd in the forward and
  recomputed under autograd in the backward, so its float32 temporaries (log-softmax,
  probabilities, per-entry terms) exist for one chunk at a time instead of for all `N` rows.
- `fused_linear_token_stats` never builds `[N, V]` logits. Per chunk of rows it computes the
  student (and full-vocabulary teacher) logits with one matmul each, reduces them to per-row
  statistics, and keeps only those; the backward recomputes the chunk's logits and forms
  `dz = g_lp (onehot(y) - p) - g_ent p (log p + H) + g_div (t - p sum t)` in place, then
  `dX = dz W` and `dW += dz^T X`. Per row chunk the vocabulary is one block (no second pass, no
  online rescaling): on CPU the matmuls need wide row chunks to run near peak anyway. A
  `chunk_vocab` smaller than `V` switches to the reference's two-pass vocabulary-chunked code.

Cost: the fused path does 2 + 2 x (teacher matmuls) forward/recomputed matmuls plus the 2
gradient matmuls; full logits in float32 need 1 + 1 + 2. It trades those recomputations for
memory that does not grow with `N x V` (per-row outputs with arbitrary `grad_output` do not allow
computing the gradient inside the forward, as a scalar loss such as Liger's does).

Test: `pytest tests/kernels/test_parity.py -k torch`; benchmark: `python scripts/bench_kernels.py`.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from opd.losses import reference

# Elements of one float32 chunk of logits (16 MiB): rows per chunk = this // V, at least
# _MIN_CHUNK_ROWS so the chunk matmuls stay compute-bound (each chunk re-reads the weight).
_CHUNK_ELEMENTS = 1 << 22
_MIN_CHUNK_ROWS = 32


def _rows_per_chunk(vocab: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        return int(chunk_rows)
    return max(_MIN_CHUNK_ROWS, _CHUNK_ELEMENTS // max(vocab, 1))


class _RowChunked(torch.autograd.Function):
    """`fn` over row chunks of `[N, V]` logits: the forward keeps no autograd graph; the backward
    recomputes one chunk at a time under autograd and writes its gradient into one `[N, V]`
    buffer (slicing a graph per chunk would make every chunk's backward build a full-size
    zero gradient: quadratic in the number of chunks)."""

    @staticmethod
    def forward(ctx, fn, rows, logits, *row_args):
        chunks = range(0, logits.shape[0], rows)
        with torch.no_grad():
            outs = [fn(logits[r0 : r0 + rows], *(a[r0 : r0 + rows] for a in row_args))
                    for r0 in chunks]  # fmt: skip
        ctx.save_for_backward(logits, *row_args)
        ctx.fn, ctx.rows = fn, rows
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))

    @staticmethod
    def backward(ctx, *grads):
        logits, *row_args = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for r0 in range(0, logits.shape[0], ctx.rows):
            r = slice(r0, r0 + ctx.rows)
            with torch.enable_grad():
                leaf = logits[r].detach().requires_grad_(True)
                outs = ctx.fn(leaf, *(a[r] for a in row_args))
                (grad_logits[r],) = torch.autograd.grad(outs, leaf, [g[r] for g in grads])
        return None, None, grad_logits, *([None] * len(row_args))


def _chunked(fn, logits: Tensor, row_args: tuple, mask: Tensor | None, chunk_rows: int | None):
    """`fn(logits, *row_args, mask=mask)` computed per row chunk (see `_RowChunked`)."""
    keep = reference._keep(mask, logits.shape[0], logits.device)
    rows = _rows_per_chunk(logits.shape[-1], chunk_rows)

    def fn_tuple(z: Tensor, keep_r: Tensor, *args: Tensor) -> tuple[Tensor, ...]:
        out = fn(z, *args, mask=keep_r)
        return out if isinstance(out, tuple) else (out,)

    outs = _RowChunked.apply(fn_tuple, rows, logits, keep, *row_args)
    return outs if len(outs) > 1 else outs[0]


def sampled_logprob_entropy(
    logits: Tensor,
    ids: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """`reference.sampled_logprob_entropy`, one checkpointed row chunk at a time."""
    fn = partial(reference.sampled_logprob_entropy, temperature=temperature)
    return _chunked(fn, logits, (ids,), mask, chunk_rows)


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
    """`reference.topk_divergence`, one checkpointed row chunk at a time."""
    reference._check(kind, beta, support)
    fn = partial(
        reference.topk_divergence, kind=kind, beta=beta, support=support, tail=tail,
        temperature=temperature, student_top_k=student_top_k,
    )  # fmt: skip
    row_args = (teacher_topk_ids, teacher_topk_logprobs)
    return _chunked(fn, student_logits, row_args, mask, chunk_rows)


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
    """`reference.full_divergence`, one checkpointed row chunk at a time."""
    reference._check(kind, beta)
    fn = partial(reference.full_divergence, kind=kind, beta=beta, temperature=temperature)
    return _chunked(fn, student_logits, (teacher_logits,), mask, chunk_rows)


# ---------------------------------------------------------------------------------------------
# fused_linear_token_stats
# ---------------------------------------------------------------------------------------------


def _log_softmax_(z_RV: Tensor) -> tuple[Tensor, Tensor]:
    """In place: `z <- z - logsumexp(z)`; returns `(log p, lse)`."""
    lse_R = torch.logsumexp(z_RV, -1)
    return z_RV.sub_(lse_R[:, None]), lse_R


def _rowdot(a_RV: Tensor, b_RV: Tensor) -> Tensor:
    """`sum_v a * b` per row, without a `[R, V]` temporary."""
    return torch.bmm(a_RV[:, None, :], b_RV[:, :, None]).view(-1)


def _full_terms(ls_RV: Tensor, lt_RV: Tensor, ps_RV: Tensor, kind: str, beta: float):
    """`(D [R], t [R, V])`: the divergence and its partials `t = dD/d log p_s` (before lse).

    The teacher log-probs here come from finite teacher logits (a matmul), so no entry is
    `-inf` and `p log p` needs no `0 log 0` guard: an underflowed probability multiplies a finite
    log and gives 0.
    """
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "reverse_kl":
        t_RV = torch.sub(ls_RV, lt_RV).mul_(ps_RV)  # p_s (ls - lt)
        div_R = t_RV.sum(-1)
        return div_R, t_RV.add_(ps_RV)  # d/dls of p_s (ls - lt) = p_s (ls - lt + 1)
    pt_RV = lt_RV.exp()
    if kind == "forward_kl":
        return _rowdot(pt_RV, lt_RV - ls_RV), pt_RV.neg_()
    lm_RV = torch.logaddexp(lt_RV + math.log(beta), ls_RV + math.log1p(-beta))
    div_R = beta * _rowdot(pt_RV, lt_RV - lm_RV)
    t_RV = torch.sub(ls_RV, lm_RV).mul_(ps_RV)  # p_s (ls - lm)
    div_R += (1.0 - beta) * t_RV.sum(-1)
    return div_R, t_RV.mul_(1.0 - beta)  # (1 - b) p_s (ls - lm)


def _topk_partials(ls_RV: Tensor, t_ids: Tensor, t_lp: Tensor, opts) -> tuple[Tensor, Tensor]:
    """Top-k divergence (teacher support) and its gradient w.r.t. the gathered log-probs."""
    kind, beta, _, tail = opts
    return reference._topk_grad(ls_RV.gather(-1, t_ids), t_lp, kind, beta, tail)


def _chunk_forward(x_RH, w_VH, ids_R, teacher, opts):
    """Per-row outputs `(lp, ent, div)` and saved state `(lse, ent, lse_t, tsum, gk)`."""
    t_mode, th_RH, tw_VH, t_ids, t_lp = teacher
    kind, beta, temp, _ = opts
    ls_RV, lse_R = _log_softmax_(torch.mm(x_RH, w_VH.T).div_(temp))
    ps_RV = ls_RV.exp()
    ent_R = -_rowdot(ps_RV, ls_RV)
    lp_R = ls_RV.gather(-1, ids_R[:, None]).squeeze(-1)
    empty = ls_RV.new_zeros(ls_RV.shape[0], 0)
    div_R, lse_t_R, tsum_R, gk_RK = torch.zeros_like(lp_R), torch.zeros_like(lp_R), None, empty
    if t_mode == "full":
        lt_RV, lse_t_R = _log_softmax_(torch.mm(th_RH, tw_VH.T).div_(temp))
        div_R, t_RV = _full_terms(ls_RV, lt_RV, ps_RV, kind, beta)
        tsum_R = t_RV.sum(-1)
    if t_mode == "topk":
        div_R, gk_RK = _topk_partials(ls_RV, t_ids, t_lp, opts)
    tsum_R = torch.zeros_like(lp_R) if tsum_R is None else tsum_R
    return (lp_R, ent_R, div_R), (lse_R, ent_R, lse_t_R, tsum_R, gk_RK)


def _chunk_grad_logits(x_RH, w_VH, ids_R, teacher, opts, saved, grads) -> Tensor:
    """`dz [R, V]` (w.r.t. the tempered logits, before the 1/T) of `sum g * stats` for a chunk."""
    t_mode, th_RH, tw_VH, t_ids, _ = teacher
    kind, beta, temp, _ = opts
    lse_R, ent_R, lse_t_R, tsum_R, gk_RK = saved
    g_lp, g_ent, g_div = (g[:, None] for g in grads)
    ls_RV = torch.mm(x_RH, w_VH.T).div_(temp).sub_(lse_R[:, None])
    ps_RV = ls_RV.exp()
    # -g_ent p (ls + H) - g_lp p  ==  p * (-g_ent * ls + (-g_ent H - g_lp))
    coef_R1 = -g_ent * ent_R[:, None] - g_lp
    if t_mode == "topk":
        coef_R1 = coef_R1 - g_div * gk_RK.sum(-1, keepdim=True)
    if t_mode == "full":
        lt_RV = torch.mm(th_RH, tw_VH.T).div_(temp).sub_(lse_t_R[:, None])
        _, t_RV = _full_terms(ls_RV, lt_RV, ps_RV, kind, beta)
        del lt_RV
        coef_R1 = coef_R1 - g_div * tsum_R[:, None]
    gz_RV = ls_RV.mul_(-g_ent).add_(coef_R1).mul_(ps_RV)
    if t_mode == "full":
        gz_RV.add_(t_RV.mul_(g_div))
    if t_mode == "topk":
        gz_RV.scatter_add_(-1, t_ids, g_div * gk_RK)
    return gz_RV.scatter_add_(-1, ids_R[:, None], g_lp)


class _FusedLinearTokenStats(torch.autograd.Function):
    """Row-chunked forward/backward of `fused_linear_token_stats` (one vocabulary block)."""

    @staticmethod
    def forward(ctx, x, w, ids, keep, th, tw, t_ids, t_lp, t_mode, opts, chunk_rows):
        x32, w32 = reference._clean_rows(x, keep), w.float()
        th32 = None if th is None else reference._clean_rows(th, keep)
        tw32 = None if tw is None else tw.float()
        outs, saved = [], []
        for r0 in range(0, x.shape[0], chunk_rows):
            r = slice(r0, r0 + chunk_rows)
            teacher = reference._teacher_rows(t_mode, th32, tw32, t_ids, t_lp, r)
            out, sv = _chunk_forward(x32[r], w32, ids[r], teacher, opts)
            outs.append(out)
            saved.append(sv)
        lp, ent, div = (torch.cat([o[i] for o in outs]) for i in range(3))
        sv = [torch.cat([s[i] for s in saved]) for i in range(5)]
        ctx.save_for_backward(x, w, ids, keep, th, tw, t_ids, t_lp, *sv)
        ctx.t_mode, ctx.opts, ctx.chunk_rows = t_mode, opts, chunk_rows
        return tuple(torch.where(keep, o, 0.0) for o in (lp, ent, div))

    @staticmethod
    def backward(ctx, g_lp, g_ent, g_div):
        x, w, ids, keep, th, tw, t_ids, t_lp, *sv = ctx.saved_tensors
        # Inputs are re-cast here rather than saved as float32 copies: for bf16 weights that
        # keeps the saved state at the caller's size between forward and backward.
        x32, w32 = reference._clean_rows(x, keep), w.float()
        th32 = None if th is None else reference._clean_rows(th, keep)
        tw32 = None if tw is None else tw.float()
        grads = [torch.where(keep, g.float(), 0.0) for g in (g_lp, g_ent, g_div)]
        gx32, gw32 = torch.empty_like(x32), torch.zeros_like(w32)
        temp = ctx.opts[2]
        for r0 in range(0, x.shape[0], ctx.chunk_rows):
            r = slice(r0, r0 + ctx.chunk_rows)
            teacher = reference._teacher_rows(ctx.t_mode, th32, tw32, t_ids, t_lp, r)
            saved_r = [s[r] for s in sv]
            gz_RV = _chunk_grad_logits(
                x32[r], w32, ids[r], teacher, ctx.opts, saved_r, [g[r] for g in grads]
            )
            gz_RV.div_(temp)
            torch.mm(gz_RV, w32, out=gx32[r])
            gw32.addmm_(gz_RV.T, x32[r])
        gx32 = torch.where(keep[:, None], gx32, 0.0)
        return (gx32.to(x.dtype), gw32.to(w.dtype), *([None] * 9))


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
    chunk_rows: int | None = None,
    chunk_vocab: int | None = None,
) -> dict[str, Tensor]:
    """`reference.fused_linear_token_stats` without `[N, V]` logits (see the module docstring).

    `chunk_rows=None` picks about 16 MiB of float32 logits per chunk (at least 32 rows).
    `chunk_vocab` below `V` runs the reference's vocabulary-chunked two-pass code instead.
    """
    vocab = student_weight.shape[0]
    rows = _rows_per_chunk(vocab, chunk_rows)
    if chunk_vocab is not None and chunk_vocab < vocab:
        return reference.fused_linear_token_stats(
            student_hidden, student_weight, ids, teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight, teacher_topk_ids=teacher_topk_ids,
            teacher_topk_logprobs=teacher_topk_logprobs, kind=kind, beta=beta,
            temperature=temperature, mask=mask, tail=tail, chunk_rows=rows,
            chunk_vocab=chunk_vocab,
        )  # fmt: skip
    reference._check(kind, beta)
    keep = reference._keep(mask, student_hidden.shape[0], student_hidden.device)
    safe_ids = torch.where(keep, ids.long(), 0)
    t_mode, th, tw, t_ids, t_lp = reference._teacher_inputs(
        teacher_hidden, teacher_weight, teacher_topk_ids, teacher_topk_logprobs, keep
    )
    opts = (kind, beta, float(temperature), tail)
    lp, ent, div = _FusedLinearTokenStats.apply(
        student_hidden, student_weight, safe_ids, keep, th, tw, t_ids, t_lp, t_mode, opts, rows
    )
    out = {"logprob": lp, "entropy": ent}
    if t_mode != "none":
        out["divergence"] = div
    return out


# ---------------------------------------------------------------------------------------------
# fused_linear_divergence_loss: a weighted sum of per-row divergences, gradient in the forward.
# ---------------------------------------------------------------------------------------------


def _chunk_divergence_grad(x_RH, w_VH, teacher, opts, weight_R) -> tuple[Tensor, Tensor]:
    """`(D [R], dz [R, V])` with `dz = d(sum_r weight_r D_r)/dz` (tempered logits, before 1/T)."""
    t_mode, th_RH, tw_VH, t_ids, t_lp = teacher
    kind, beta, temp, _ = opts
    ls_RV, _ = _log_softmax_(torch.mm(x_RH, w_VH.T).div_(temp))
    ps_RV = ls_RV.exp()
    if t_mode == "full":
        lt_RV, _ = _log_softmax_(torch.mm(th_RH, tw_VH.T).div_(temp))
        div_R, t_RV = _full_terms(ls_RV, lt_RV, ps_RV, kind, beta)
        del lt_RV, ls_RV
        tsum_R1 = t_RV.sum(-1, keepdim=True)
        gz_RV = ps_RV.mul_(tsum_R1).neg_().add_(t_RV).mul_(weight_R[:, None])
        return div_R, gz_RV
    div_R, gk_RK = _topk_partials(ls_RV, t_ids, t_lp, opts)
    gk_RK = gk_RK * weight_R[:, None]
    gz_RV = ps_RV.mul_(-gk_RK.sum(-1, keepdim=True))
    return div_R, gz_RV.scatter_add_(-1, t_ids, gk_RK)


class _FusedLinearDivergenceLoss(torch.autograd.Function):
    """Scalar loss whose gradients are computed chunk by chunk in the forward (4 matmuls with
    a full teacher, 3 with a top-k one: no recomputation) and scaled by `grad_output` after."""

    @staticmethod
    def forward(ctx, x, w, weight, keep, th, tw, t_ids, t_lp, t_mode, opts, chunk_rows):
        x32, w32 = reference._clean_rows(x, keep), w.float()
        th32 = None if th is None else reference._clean_rows(th, keep)
        tw32 = None if tw is None else tw.float()
        weight32 = torch.where(keep, weight.float(), 0.0)
        gx32, gw32 = torch.empty_like(x32), torch.zeros_like(w32)
        divs = []
        for r0 in range(0, x.shape[0], chunk_rows):
            r = slice(r0, r0 + chunk_rows)
            teacher = reference._teacher_rows(t_mode, th32, tw32, t_ids, t_lp, r)
            div_R, gz_RV = _chunk_divergence_grad(x32[r], w32, teacher, opts, weight32[r])
            gz_RV.div_(opts[2])
            torch.mm(gz_RV, w32, out=gx32[r])
            gw32.addmm_(gz_RV.T, x32[r])
            divs.append(div_R)
        div = torch.where(keep, torch.cat(divs), 0.0)
        ctx.save_for_backward(torch.where(keep[:, None], gx32, 0.0).to(x.dtype), gw32.to(w.dtype))
        ctx.mark_non_differentiable(div)
        return (div * weight32).sum(), div

    @staticmethod
    def backward(ctx, g_loss, _g_div):
        gx, gw = ctx.saved_tensors
        return (gx * g_loss.to(gx.dtype), gw * g_loss.to(gw.dtype), *([None] * 9))


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
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """`sum_r weight_r D_r` from hidden states, its gradient computed in the forward.

    `D_r` is `fused_linear_token_stats(...)["divergence"]`; the loss is a scalar, so the
    gradient w.r.t. hidden and weight is known up to the scalar `grad_output` during the
    forward and no logits are recomputed (the per-row function cannot do that: its backward
    needs the per-row `grad_output`).

    Returns:
        `(loss, divergence)`: float32 scalar (differentiable) and `[N]` (not differentiable).
    """
    reference._check(kind, beta)
    n = student_hidden.shape[0]
    keep = reference._keep(mask, n, student_hidden.device)
    weight = torch.ones(n, device=student_hidden.device) if weight is None else weight.detach()
    t_mode, th, tw, t_ids, t_lp = reference._teacher_inputs(
        teacher_hidden, teacher_weight, teacher_topk_ids, teacher_topk_logprobs, keep
    )
    if t_mode == "none":
        raise ValueError("a divergence loss needs a teacher: hidden and weight, or its top-k")
    rows = _rows_per_chunk(student_weight.shape[0], chunk_rows)
    opts = (kind, beta, float(temperature), tail)
    return _FusedLinearDivergenceLoss.apply(
        student_hidden, student_weight, weight, keep, th, tw, t_ids, t_lp, t_mode, opts, rows
    )
