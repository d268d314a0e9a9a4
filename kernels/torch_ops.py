"""The torch path of `opd.kernels`: what CPU users run, chunked so memory stays bounded.

Contract: the functions have the signatures and values of `opd.kernels.reference` (the spec;
read its module docstring for the maths, masking and `-inf` conventions), plus one keyword,
`chunk_rows`, and are differentiable w.r.t. the student inputs.

- `sampled_logprob_entropy`, `topk_divergence`, `full_divergence` take logits that already exist
  as `[N, V]` and run the same chunk code as the fused path below, on a float32 copy of one row
  chunk instead of a matmul: float32 temporaries exist for one chunk, and the only `[N, V]`
  tensor created is the gradient. (Top-k on the "student"/"union" supports runs the bucket maths
  of `_topk_buckets.py` per chunk, recomputed under autograd in the backward.)
- `fused_linear_token_stats` never builds `[N, V]` logits. Per chunk of rows it computes the
  student (and full-vocabulary teacher) logits with one matmul each, reduces them to per-row
  statistics, and keeps only those; the backward recomputes the chunk's logits and forms
  `dz = g_lp (onehot(y) - p) - g_ent p (log p + H) + g_div (t - p sum t)` in place, then
  `dX = dz W` and `dW += dz^T X`. Per row chunk the vocabulary is one block (no second pass, no
  online rescaling): on CPU the matmuls need wide row chunks to run near peak anyway, so memory
  is bounded by `chunk_rows` alone (`chunk_vocab`, the Triton path's block, is ignored here).

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

from opd.kernels import _topk_buckets as buckets
from opd.kernels._inputs import (
    clean_rows,
    clean_topk,
    divergence_keep,
    fused_inputs,
    loss_inputs,
    sampled_inputs,
    token_stats_output,
)

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


def _chunked(fn, logits: Tensor, row_args: tuple, keep: Tensor, rows: int):
    """`fn(logits, *row_args, mask=keep)` computed per row chunk (see `_RowChunked`)."""

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
    """`reference.sampled_logprob_entropy`, one row chunk at a time (module docstring)."""
    keep, safe_ids = sampled_inputs(logits, ids, mask)
    opts = ("reverse_kl", 0.5, float(temperature), True)
    rows = _rows_per_chunk(logits.shape[-1], chunk_rows)
    lp, ent, _ = _LogitsTokenStats.apply(
        logits, safe_ids, keep, None, None, None, "none", opts, rows
    )
    return lp, ent


def _support_rows(
    logits, t_ids, t_lp, *, kind, beta, support, tail, temperature, student_top_k, mask
) -> Tensor:
    """`[R]` top-k divergence of one row chunk on the "student" or "union" support, through the
    bucket maths of `_topk_buckets.py` (plain autograd; `_RowChunked` recomputes it)."""
    ls = torch.log_softmax(clean_rows(logits, mask) / temperature, -1)
    t_ids, t_lp = clean_topk(t_ids, t_lp, mask)
    cand, live = buckets.support_candidates(ls, t_ids, t_lp, support, student_top_k)
    div = buckets.support_divergence(
        ls.gather(-1, cand), cand, live, t_ids, t_lp, ls.shape[-1], kind, beta, tail
    )
    return torch.where(mask, div, 0.0)


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
    """`reference.topk_divergence`, one row chunk at a time (module docstring).

    The teacher support runs the chunked statistics code; the "student" and "union" supports
    (which rank the student's own top-k per chunk) run `_support_rows` per chunk.
    """
    keep = divergence_keep(student_logits, mask, kind, beta, support)
    rows = _rows_per_chunk(student_logits.shape[-1], chunk_rows)
    if support != "teacher":
        fn = partial(
            _support_rows, kind=kind, beta=beta, support=support, tail=tail,
            temperature=temperature, student_top_k=student_top_k,
        )  # fmt: skip
        row_args = (teacher_topk_ids, teacher_topk_logprobs)
        return _chunked(fn, student_logits, row_args, keep, rows)
    t_ids, t_lp = clean_topk(teacher_topk_ids, teacher_topk_logprobs, keep)
    ids = torch.zeros(student_logits.shape[0], dtype=torch.long, device=student_logits.device)
    opts = (kind, beta, float(temperature), tail)
    _, _, div = _LogitsTokenStats.apply(
        student_logits, ids, keep, None, t_ids, t_lp, "topk", opts, rows
    )
    return div


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
    """`reference.full_divergence`, one row chunk at a time (module docstring)."""
    keep = divergence_keep(student_logits, mask, kind, beta)
    ids = torch.zeros(student_logits.shape[0], dtype=torch.long, device=student_logits.device)
    opts = (kind, beta, float(temperature), True)
    rows = _rows_per_chunk(student_logits.shape[-1], chunk_rows)
    _, _, div = _LogitsTokenStats.apply(
        student_logits, ids, keep, teacher_logits.detach(), None, None, "full", opts, rows
    )
    return div


# ---------------------------------------------------------------------------------------------
# fused_linear_token_stats
# ---------------------------------------------------------------------------------------------


class _Scratch:
    """Named `[rows, V]` float32 buffers reused by every chunk of one call.

    Why: glibc serves blocks below its mmap threshold (which it raises up to 32 MiB after a
    large tensor is freed) from a heap it rarely returns, so allocating fresh 16 MiB chunks per
    step left 2 GiB of RSS at 4k x 32k; reusing a few buffers keeps RSS at the live size.
    """

    def __init__(self, rows: int, vocab: int, device: torch.device) -> None:
        self.rows, self.vocab, self.device = rows, vocab, device
        self.buffers: dict[str, Tensor] = {}

    def __call__(self, name: str, rows: int) -> Tensor:
        if name not in self.buffers:
            self.buffers[name] = torch.empty(self.rows, self.vocab, device=self.device)
        return self.buffers[name][:rows]


def _log_softmax_(z_RV: Tensor, p_out_RV: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """In place `z <- log softmax(z)`; `p_out <- softmax(z)`. Returns `(log p, p, lse)`.

    One exp pass serves both the logsumexp and the probabilities (`p = e^(z - m) / s`)."""
    max_R1 = z_RV.amax(-1, keepdim=True)
    p_RV = torch.sub(z_RV, max_R1, out=p_out_RV).exp_()
    sum_R1 = p_RV.sum(-1, keepdim=True)
    lse_R1 = max_R1 + sum_R1.log()
    return z_RV.sub_(lse_R1), p_RV.div_(sum_R1), lse_R1.squeeze(-1)


def _rowdot(a_RV: Tensor, b_RV: Tensor) -> Tensor:
    """`sum_v a * b` per row, without a `[R, V]` temporary."""
    return torch.bmm(a_RV[:, None, :], b_RV[:, :, None]).view(-1)


def _full_terms(ls_RV, lt_RV, ps_RV, pt_RV, kind: str, beta: float) -> tuple[Tensor, Tensor]:
    """`(D [R], t [R, V])`: the divergence and its partials `t = dD/d log p_s` (before lse).

    `t` is written over `pt_RV` (the teacher probabilities are not needed after this). The
    teacher log-probs come from finite teacher logits (a matmul), so no entry is `-inf` and
    `p log p` needs no `0 log 0` guard: an underflowed probability times a finite log is 0.
    """
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "reverse_kl":
        t_RV = torch.sub(ls_RV, lt_RV, out=pt_RV).mul_(ps_RV)  # p_s (ls - lt)
        div_R = t_RV.sum(-1)
        return div_R, t_RV.add_(ps_RV)  # d/dls of p_s (ls - lt) = p_s (ls - lt + 1)
    if kind == "forward_kl":
        div_R = _rowdot(pt_RV, lt_RV) - _rowdot(pt_RV, ls_RV)
        return div_R, pt_RV.neg_()
    lm_RV = torch.logaddexp(lt_RV + math.log(beta), ls_RV + math.log1p(-beta))
    div_R = beta * (_rowdot(pt_RV, lt_RV) - _rowdot(pt_RV, lm_RV))
    t_RV = torch.sub(ls_RV, lm_RV, out=pt_RV).mul_(ps_RV)  # p_s (ls - lm)
    div_R += (1.0 - beta) * t_RV.sum(-1)
    return div_R, t_RV.mul_(1.0 - beta)  # (1 - b) p_s (ls - lm)


def _topk_partials(ls_RV: Tensor, t_ids: Tensor, t_lp: Tensor, opts) -> tuple[Tensor, Tensor]:
    """Top-k divergence (teacher support) and its gradient w.r.t. the gathered log-probs."""
    kind, beta, _, tail = opts
    return buckets.topk_grad(ls_RV.gather(-1, t_ids), t_lp, kind, beta, tail)


def _matmul_into(x_RH: Tensor, w_VH: Tensor, out_RV: Tensor) -> Tensor:
    return torch.mm(x_RH, w_VH.T, out=out_RV)


def _copy_into(z_RV: Tensor, keep_R: Tensor, clamp: bool, out_RV: Tensor) -> Tensor:
    """float32 copy of logits with masked rows zeroed; `clamp` makes teacher `-inf` entries the
    most negative float, so that `p = 0` entries give `0 * finite = 0` without guards (a
    reverse KL over such an entry is then ~3e38 * p_s instead of inf)."""
    out_RV.copy_(z_RV).masked_fill_(~keep_R[:, None], 0.0)
    return out_RV.clamp_(min=torch.finfo(torch.float32).min) if clamp else out_RV


def _chunk_forward(student_z, ids_R, teacher, opts, scratch):
    """Per-row outputs `(lp, ent, div)` and saved state `(lse, ent, lse_t, tsum, gk)`.

    `student_z(out)` / the teacher's `teacher_z(out)` write the chunk's raw logits into `out`
    (a matmul in the fused path, a copy in the logits path)."""
    t_mode, teacher_z, t_ids, t_lp = teacher
    kind, beta, temp, _ = opts
    rows = ids_R.shape[0]
    z_RV = student_z(scratch("z", rows)).div_(temp)
    ls_RV, ps_RV, lse_R = _log_softmax_(z_RV, scratch("p", rows))
    ent_R = -_rowdot(ps_RV, ls_RV)
    lp_R = ls_RV.gather(-1, ids_R[:, None]).squeeze(-1)
    div_R, lse_t_R, tsum_R = (torch.zeros_like(lp_R) for _ in range(3))
    gk_RK = ls_RV.new_zeros(rows, 0)
    if t_mode == "full":
        zt_RV = teacher_z(scratch("zt", rows)).div_(temp)
        lt_RV, pt_RV, lse_t_R = _log_softmax_(zt_RV, scratch("t", rows))
        div_R, t_RV = _full_terms(ls_RV, lt_RV, ps_RV, pt_RV, kind, beta)
        tsum_R = t_RV.sum(-1)
    if t_mode == "topk":
        div_R, gk_RK = _topk_partials(ls_RV, t_ids, t_lp, opts)
    return (lp_R, ent_R, div_R), (lse_R, ent_R, lse_t_R, tsum_R, gk_RK)


def _chunk_grad_logits(student_z, ids_R, teacher, opts, saved, grads, scratch) -> Tensor:
    """`dz [R, V]` (w.r.t. the tempered logits, before the 1/T) of `sum g * stats` for a chunk."""
    t_mode, teacher_z, t_ids, _ = teacher
    kind, beta, temp, _ = opts
    lse_R, ent_R, lse_t_R, tsum_R, gk_RK = saved
    g_lp, g_ent, g_div = (g[:, None] for g in grads)
    rows = ids_R.shape[0]
    ls_RV = student_z(scratch("z", rows)).div_(temp).sub_(lse_R[:, None])
    ps_RV = torch.exp(ls_RV, out=scratch("p", rows))
    # -g_ent p (ls + H) - g_lp p  ==  p * (-g_ent * ls + (-g_ent H - g_lp))
    coef_R1 = -g_ent * ent_R[:, None] - g_lp
    if t_mode == "topk":
        coef_R1 = coef_R1 - g_div * gk_RK.sum(-1, keepdim=True)
    if t_mode == "full":
        lt_RV = teacher_z(scratch("zt", rows)).div_(temp).sub_(lse_t_R[:, None])
        pt_RV = torch.exp(lt_RV, out=scratch("t", rows))
        _, t_RV = _full_terms(ls_RV, lt_RV, ps_RV, pt_RV, kind, beta)
        coef_R1 = coef_R1 - g_div * tsum_R[:, None]
    gz_RV = ls_RV.mul_(-g_ent).add_(coef_R1).mul_(ps_RV)
    if t_mode == "full":
        gz_RV.add_(t_RV.mul_(g_div))
    if t_mode == "topk":
        gz_RV.scatter_add_(-1, t_ids, g_div * gk_RK)
    return gz_RV.scatter_add_(-1, ids_R[:, None], g_lp)


def _float_inputs(x, w, th, tw, keep):
    """float32 `(x, w, teacher hidden, teacher weight)`, masked rows of the hiddens zeroed."""
    th32 = None if th is None else clean_rows(th, keep)
    tw32 = None if tw is None else tw.float()
    return clean_rows(x, keep), w.float(), th32, tw32


def _backprop_chunk(gz_RV, x_RH, w_VH, temp, grad_x_RH, grad_w_VH) -> None:
    """From `dz` w.r.t. the tempered logits: `grad_x <- dz W / T`, `grad_w += dz^T x / T`."""
    gz_RV.div_(temp)
    torch.mm(gz_RV, w_VH, out=grad_x_RH)
    grad_w_VH.addmm_(gz_RV.T, x_RH)


def _stats_over_chunks(n: int, chunk_rows: int, chunk_forward):
    """`chunk_forward(r)` for each row chunk `r`, concatenated: `(lp, ent, div)` and state."""
    outs, saved = [], []
    for r0 in range(0, n, chunk_rows):
        out, sv = chunk_forward(slice(r0, r0 + chunk_rows))
        outs.append(out)
        saved.append(sv)
    stats = tuple(torch.cat([o[i] for o in outs]) for i in range(3))
    return stats, [torch.cat([sv[i] for sv in saved]) for i in range(5)]


def _fused_teacher(t_mode, th32, tw32, t_ids, t_lp, r):
    """The chunk's teacher: `(mode, teacher_z, topk_ids, topk_logprobs)`."""
    if t_mode == "full":
        return t_mode, partial(_matmul_into, th32[r], tw32), None, None
    if t_mode == "topk":
        return t_mode, None, t_ids[r], t_lp[r]
    return t_mode, None, None, None


class _FusedLinearTokenStats(torch.autograd.Function):
    """Row-chunked forward/backward of `fused_linear_token_stats` (one vocabulary block)."""

    @staticmethod
    def forward(ctx, x, w, ids, keep, th, tw, t_ids, t_lp, t_mode, opts, chunk_rows):
        x32, w32, th32, tw32 = _float_inputs(x, w, th, tw, keep)
        scratch = _Scratch(min(chunk_rows, x.shape[0]), w.shape[0], x.device)

        def chunk_forward(r: slice):
            teacher = _fused_teacher(t_mode, th32, tw32, t_ids, t_lp, r)
            student_z = partial(_matmul_into, x32[r], w32)
            return _chunk_forward(student_z, ids[r], teacher, opts, scratch)

        (lp, ent, div), sv = _stats_over_chunks(x.shape[0], chunk_rows, chunk_forward)
        ctx.save_for_backward(x, w, ids, keep, th, tw, t_ids, t_lp, *sv)
        ctx.t_mode, ctx.opts, ctx.chunk_rows = t_mode, opts, chunk_rows
        return tuple(torch.where(keep, o, 0.0) for o in (lp, ent, div))

    @staticmethod
    def backward(ctx, g_lp, g_ent, g_div):
        x, w, ids, keep, th, tw, t_ids, t_lp, *sv = ctx.saved_tensors
        # Inputs are re-cast here rather than saved as float32 copies: for bf16 weights that
        # keeps the saved state at the caller's size between forward and backward.
        x32, w32, th32, tw32 = _float_inputs(x, w, th, tw, keep)
        grads = [torch.where(keep, g.float(), 0.0) for g in (g_lp, g_ent, g_div)]
        gx32, gw32 = torch.empty_like(x32), torch.zeros_like(w32)
        temp = ctx.opts[2]
        scratch = _Scratch(min(ctx.chunk_rows, x.shape[0]), w.shape[0], x.device)
        for r0 in range(0, x.shape[0], ctx.chunk_rows):
            r = slice(r0, r0 + ctx.chunk_rows)
            teacher = _fused_teacher(ctx.t_mode, th32, tw32, t_ids, t_lp, r)
            saved_r = [s[r] for s in sv]
            grads_r = [g[r] for g in grads]
            student_z = partial(_matmul_into, x32[r], w32)
            gz_RV = _chunk_grad_logits(
                student_z, ids[r], teacher, ctx.opts, saved_r, grads_r, scratch
            )
            _backprop_chunk(gz_RV, x32[r], w32, temp, gx32[r], gw32)
        gx32 = torch.where(keep[:, None], gx32, 0.0)
        return (gx32.to(x.dtype), gw32.to(w.dtype), *([None] * 9))


class _LogitsTokenStats(torch.autograd.Function):
    """The chunk code of the fused path on given `[N, V]` logits: the forward keeps per-row
    state only; the backward recomputes each chunk's statistics and writes its gradient into one
    `[N, V]` buffer."""

    @staticmethod
    def forward(ctx, logits, ids, keep, teacher_logits, t_ids, t_lp, t_mode, opts, chunk_rows):
        scratch = _Scratch(min(chunk_rows, logits.shape[0]), logits.shape[1], logits.device)

        def chunk_forward(r: slice):
            teacher = _logits_teacher(t_mode, teacher_logits, t_ids, t_lp, keep, r)
            student_z = partial(_copy_into, logits[r], keep[r], False)
            return _chunk_forward(student_z, ids[r], teacher, opts, scratch)

        (lp, ent, div), sv = _stats_over_chunks(logits.shape[0], chunk_rows, chunk_forward)
        ctx.save_for_backward(logits, ids, keep, teacher_logits, t_ids, t_lp, *sv)
        ctx.t_mode, ctx.opts, ctx.chunk_rows = t_mode, opts, chunk_rows
        return tuple(torch.where(keep, o, 0.0) for o in (lp, ent, div))

    @staticmethod
    def backward(ctx, g_lp, g_ent, g_div):
        logits, ids, keep, teacher_logits, t_ids, t_lp, *sv = ctx.saved_tensors
        grads = [torch.where(keep, g.float(), 0.0) for g in (g_lp, g_ent, g_div)]
        grad_logits = torch.empty_like(logits)
        scratch = _Scratch(min(ctx.chunk_rows, logits.shape[0]), logits.shape[1], logits.device)
        for r0 in range(0, logits.shape[0], ctx.chunk_rows):
            r = slice(r0, r0 + ctx.chunk_rows)
            teacher = _logits_teacher(ctx.t_mode, teacher_logits, t_ids, t_lp, keep, r)
            student_z = partial(_copy_into, logits[r], keep[r], False)
            saved_r, grads_r = [s[r] for s in sv], [g[r] for g in grads]
            gz_RV = _chunk_grad_logits(
                student_z, ids[r], teacher, ctx.opts, saved_r, grads_r, scratch
            )
            grad_logits[r] = gz_RV.div_(ctx.opts[2])
        return grad_logits, *([None] * 8)


def _logits_teacher(t_mode, teacher_logits, t_ids, t_lp, keep, r):
    """The chunk's teacher for the logits path: `(mode, teacher_z, topk_ids, topk_logprobs)`."""
    if t_mode == "full":
        return t_mode, partial(_copy_into, teacher_logits[r], keep[r], True), None, None
    if t_mode == "topk":
        return t_mode, None, t_ids[r], t_lp[r]
    return t_mode, None, None, None


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
    `chunk_vocab` is accepted for the Triton path's sake and ignored (one vocabulary block).
    """
    teacher = (teacher_hidden, teacher_weight, teacher_topk_ids, teacher_topk_logprobs)
    keep, safe_ids, (t_mode, th, tw, t_ids, t_lp) = fused_inputs(
        student_hidden, ids, mask, kind, beta, teacher
    )
    rows = _rows_per_chunk(student_weight.shape[0], chunk_rows)
    opts = (kind, beta, float(temperature), tail)
    lp, ent, div = _FusedLinearTokenStats.apply(
        student_hidden, student_weight, safe_ids, keep, th, tw, t_ids, t_lp, t_mode, opts, rows
    )
    return token_stats_output(lp, ent, div, t_mode)


# ---------------------------------------------------------------------------------------------
# fused_linear_divergence_loss: a weighted sum of per-row divergences, gradient in the forward.
# ---------------------------------------------------------------------------------------------


def _chunk_divergence_grad(student_z, teacher, opts, weight_R, scratch):
    """`(D [R], dz [R, V])` with `dz = d(sum_r weight_r D_r)/dz` (tempered logits, before 1/T)."""
    t_mode, teacher_z, t_ids, t_lp = teacher
    kind, beta, temp, _ = opts
    rows = weight_R.shape[0]
    z_RV = student_z(scratch("z", rows)).div_(temp)
    ls_RV, ps_RV, _ = _log_softmax_(z_RV, scratch("p", rows))
    if t_mode == "full":
        zt_RV = teacher_z(scratch("zt", rows)).div_(temp)
        lt_RV, pt_RV, _ = _log_softmax_(zt_RV, scratch("t", rows))
        div_R, t_RV = _full_terms(ls_RV, lt_RV, ps_RV, pt_RV, kind, beta)
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
        x32, w32, th32, tw32 = _float_inputs(x, w, th, tw, keep)
        weight32 = torch.where(keep, weight.float(), 0.0)
        gx32, gw32 = torch.empty_like(x32), torch.zeros_like(w32)
        divs = []
        scratch = _Scratch(min(chunk_rows, x.shape[0]), w.shape[0], x.device)
        for r0 in range(0, x.shape[0], chunk_rows):
            r = slice(r0, r0 + chunk_rows)
            teacher = _fused_teacher(t_mode, th32, tw32, t_ids, t_lp, r)
            student_z = partial(_matmul_into, x32[r], w32)
            div_R, gz_RV = _chunk_divergence_grad(student_z, teacher, opts, weight32[r], scratch)
            _backprop_chunk(gz_RV, x32[r], w32, opts[2], gx32[r], gw32)
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
    teacher = (teacher_hidden, teacher_weight, teacher_topk_ids, teacher_topk_logprobs)
    keep, weight, (t_mode, th, tw, t_ids, t_lp) = loss_inputs(
        student_hidden, weight, mask, kind, beta, teacher
    )
    rows = _rows_per_chunk(student_weight.shape[0], chunk_rows)
    opts = (kind, beta, float(temperature), tail)
    return _FusedLinearDivergenceLoss.apply(
        student_hidden, student_weight, weight, keep, th, tw, t_ids, t_lp, t_mode, opts, rows
    )
