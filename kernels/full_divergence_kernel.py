"""Triton full-vocabulary divergence between student and teacher logits, per row.

Contract: `FullDivergenceFunction.apply(student_logits_NV, teacher_logits_NV, kind, beta,
temperature, keep_N)` returns the float32 `[N]` divergence of `opd.kernels.reference.
full_divergence` (reverse_kl, forward_kl or generalised JSD with `beta`; `beta = 0` is forward KL
and `beta = 1` reverse KL by convention), differentiable w.r.t. the student logits (gradient in
their dtype). The teacher is a constant and may hold `-inf`. Rows with `keep = False` give 0 and
receive exactly 0 gradient; their contents are never read. `full_divergence_fwd`/`_bwd` are also
used per row chunk by `opd.kernels.triton_ops.fused_linear_token_stats`.

Test: `TRITON_INTERPRET=1 pytest -q tests/kernels -k triton` (CPU, Triton's interpreter).
"""

# Maths, per row, with ls = log_softmax(z_s / T), lt = log_softmax(z_t / T), D = sum_v f(ls, lt):
#   reverse KL: f = e^ls (ls - lt),                          df/dls = e^ls (ls - lt + 1)
#   forward KL: f = e^lt (lt - ls),                          df/dls = -e^lt
#   JSD(beta):  lm = log(beta e^lt + (1 - beta) e^ls),
#               f = beta e^lt (lt - lm) + (1 - beta) e^ls (ls - lm),
#               df/dls = (1 - beta) e^ls (ls - lm)           (the lm terms cancel)
# 0 log 0 = 0: an entry whose probability is 0 (ls or lt = -inf) contributes 0 value and 0 partial
# through that probability (never -inf - -inf = NaN).
# Through the log_softmax, with p = e^ls and t_v = df/dls_v:
#   dD/dz_v = (t_v - p_v sum_u t_u) / T
# Forward: pass 1 = online logsumexp of both rows; pass 2 = D and tsum = sum_u t_u (saved).
# Backward: one pass, dz_v = g (t_v - p_v tsum) / T.

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

REVERSE_KL, FORWARD_KL, MIXED_JSD = 0, 1, 2


@triton.jit
def _online_lse(m, s, z):
    """One block of an online logsumexp: running max `m` and `s = sum e^(z - m)`."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: no -inf - -inf
    s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref), axis=0)
    return m_new, s


@triton.jit
def _div_terms(ls, lt, beta, log_beta, log1m_beta, MODE: tl.constexpr):
    """Per-entry divergence terms `f` and partials `t = df/dls` (0 where the weight is 0)."""
    s_live = ls > float("-inf")
    t_live = lt > float("-inf")
    ls0 = tl.where(s_live, ls, 0.0)
    lt0 = tl.where(t_live, lt, 0.0)
    ps = tl.where(s_live, tl.exp(ls0), 0.0)
    pt = tl.where(t_live, tl.exp(lt0), 0.0)
    if MODE == 0:  # reverse KL (also JSD beta = 1)
        lt_s = tl.where(s_live, lt, 0.0)  # where ps = 0, so that no 0 * inf is formed
        f = ps * (ls0 - lt_s)
        t = ps * (ls0 - lt_s + 1.0)
    elif MODE == 1:  # forward KL (also JSD beta = 0)
        f = pt * (lt0 - tl.where(t_live, ls, 0.0))
        t = -pt
    else:
        a = tl.where(t_live, lt0 + log_beta, float("-inf"))
        b = tl.where(s_live, ls0 + log1m_beta, float("-inf"))
        mx = tl.maximum(a, b)
        mx0 = tl.where(mx > float("-inf"), mx, 0.0)
        # Both dead: lm = 0 (log 1), and every term below is 0.
        lm = mx0 + tl.log(tl.where(mx > float("-inf"), tl.exp(a - mx0) + tl.exp(b - mx0), 1.0))
        t = (1.0 - beta) * ps * (ls0 - lm)
        f = beta * pt * (lt0 - lm) + t
    return f, t


@triton.jit
def _row_start(keep_ptr, student_ptr, stride_student, teacher_ptr, stride_teacher, V):
    """This program's row, whether it is kept, where its student and teacher logits start, and
    how many entries to read (none on a masked row: its contents are never read)."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2^31 on large batches
    keep = tl.load(keep_ptr + row) != 0
    s_row = student_ptr + row * stride_student
    t_row = teacher_ptr + row * stride_teacher
    return row, keep, s_row, t_row, tl.where(keep, V, 0)


@triton.jit
def _tempered_block(s_row, t_row, offs, live, temperature):
    """float32 student and teacher logits `/ T` at `offs`, `-inf` where not `live`."""
    zs = tl.load(s_row + offs, mask=live, other=float("-inf")).to(tl.float32) / temperature
    zt = tl.load(t_row + offs, mask=live, other=float("-inf")).to(tl.float32) / temperature
    return zs, zt


@triton.jit
def _full_divergence_fwd_kernel(
    student_ptr,
    stride_student,
    teacher_ptr,
    stride_teacher,
    keep_ptr,
    div_ptr,
    student_lse_ptr,
    teacher_lse_ptr,
    tsum_ptr,
    V,
    temperature,
    beta,
    log_beta,
    log1m_beta,
    MODE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row, keep, s_row, t_row, n_read = _row_start(
        keep_ptr, student_ptr, stride_student, teacher_ptr, stride_teacher, V
    )
    m_s = tl.full((), float("-inf"), tl.float32)
    m_t = tl.full((), float("-inf"), tl.float32)
    sum_s = tl.zeros((), tl.float32)
    sum_t = tl.zeros((), tl.float32)
    for start in range(0, n_read, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        zs, zt = _tempered_block(s_row, t_row, offs, offs < V, temperature)
        m_s, sum_s = _online_lse(m_s, sum_s, zs)
        m_t, sum_t = _online_lse(m_t, sum_t, zt)
    # Masked rows: log 1 = 0 instead of log 0, only to keep -inf out of values discarded below.
    lse_s = tl.where(m_s == float("-inf"), 0.0, m_s) + tl.log(tl.where(keep, sum_s, 1.0))
    lse_t = tl.where(m_t == float("-inf"), 0.0, m_t) + tl.log(tl.where(keep, sum_t, 1.0))

    div = tl.zeros((), tl.float32)
    tsum = tl.zeros((), tl.float32)
    for start in range(0, n_read, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        zs, zt = _tempered_block(s_row, t_row, offs, offs < V, temperature)
        f, t = _div_terms(zs - lse_s, zt - lse_t, beta, log_beta, log1m_beta, MODE)
        div += tl.sum(f, axis=0)
        tsum += tl.sum(t, axis=0)
    tl.store(div_ptr + row, tl.where(keep, div, 0.0))
    tl.store(student_lse_ptr + row, tl.where(keep, lse_s, 0.0))
    tl.store(teacher_lse_ptr + row, tl.where(keep, lse_t, 0.0))
    tl.store(tsum_ptr + row, tl.where(keep, tsum, 0.0))


@triton.jit
def _full_divergence_bwd_kernel(
    student_ptr,
    stride_student,
    teacher_ptr,
    stride_teacher,
    keep_ptr,
    student_lse_ptr,
    teacher_lse_ptr,
    tsum_ptr,
    g_ptr,
    dlogits_ptr,
    stride_dlogits,
    V,
    temperature,
    beta,
    log_beta,
    log1m_beta,
    MODE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row, keep, s_row, t_row, n_read = _row_start(
        keep_ptr, student_ptr, stride_student, teacher_ptr, stride_teacher, V
    )
    d_row = dlogits_ptr + row * stride_dlogits
    out_dtype = dlogits_ptr.dtype.element_ty
    lse_s = tl.load(student_lse_ptr + row)
    lse_t = tl.load(teacher_lse_ptr + row)
    tsum = tl.load(tsum_ptr + row)
    g = tl.where(keep, tl.load(g_ptr + row), 0.0)
    # Accumulating leaves masked rows as they are; writing fills them with zeros.
    n_write = n_read if ACCUMULATE else V
    for start in range(0, n_write, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_v = offs < V
        live_v = offs < n_read
        zs, zt = _tempered_block(s_row, t_row, offs, live_v, temperature)
        ls = zs - lse_s
        _, t = _div_terms(ls, zt - lse_t, beta, log_beta, log1m_beta, MODE)
        p = tl.where(ls > float("-inf"), tl.exp(ls), 0.0)
        dz = tl.where(live_v, g * (t - p * tsum) / temperature, 0.0)
        if ACCUMULATE:
            dz += tl.load(d_row + offs, mask=in_v, other=0.0).to(tl.float32)
        tl.store(d_row + offs, dz.to(out_dtype), mask=in_v)


def divergence_mode(kind: str, beta: float) -> int:
    """The kernel's `MODE` for `(kind, beta)`: JSD with beta 0 / 1 is forward / reverse KL."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return FORWARD_KL
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return REVERSE_KL
    if kind != "jsd":
        raise ValueError(f"kind must be reverse_kl, forward_kl or jsd, got {kind!r}")
    return MIXED_JSD


def _mode_args(kind: str, beta: float) -> tuple[int, float, float, float]:
    mode = divergence_mode(kind, beta)
    if mode != MIXED_JSD:  # beta's logs are unused (and may be log 0)
        return mode, float(beta), 0.0, 0.0
    return mode, float(beta), math.log(beta), math.log1p(-beta)


def _blocks(vocab: int) -> dict[str, int]:
    """Launch sizes: fixed, no autotune (it fails under the interpreter, whose cost is per op per
    block); 8 warps keep a 4096-wide fp32 block at 16 values per thread."""
    block_v = min(4096, triton.next_power_of_2(vocab))
    return {"BLOCK_V": block_v, "num_warps": 8 if block_v >= 2048 else 4}


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def full_divergence_fwd(
    student_logits_NV: torch.Tensor,
    teacher_logits_NV: torch.Tensor,
    *,
    kind: str,
    beta: float,
    temperature: float,
    keep_N: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward pass of the full-vocabulary divergence (no autograd).

    Args:
        student_logits_NV: `[N, V]` student logits, any float dtype.
        teacher_logits_NV: `[N, V]` teacher logits, any float dtype (`-inf` allowed).
        kind: "reverse_kl", "forward_kl" or "jsd".
        beta: JSD weight (`0` = forward KL, `1` = reverse KL).
        temperature: divides both sets of logits.
        keep_N: `[N]` bool, False = masked row.

    Returns:
        float32 `[N]` tensors `(divergence, student_lse, teacher_lse, tsum)`, 0 on masked rows;
        the last three (logsumexps of `z / T`, and `sum_v df/dls_v`) are what backward needs.
    """
    student_logits_NV = _rows_contiguous(student_logits_NV)
    teacher_logits_NV = _rows_contiguous(teacher_logits_NV)
    n, vocab = student_logits_NV.shape
    assert teacher_logits_NV.shape == (n, vocab), "student and teacher logits differ in shape"
    out = [torch.empty(n, dtype=torch.float32, device=student_logits_NV.device) for _ in range(4)]
    if n == 0:
        return tuple(out)  # type: ignore[return-value]  # four tensors
    mode, beta, log_beta, log1m_beta = _mode_args(kind, beta)
    _full_divergence_fwd_kernel[(n,)](
        student_logits_NV, student_logits_NV.stride(0), teacher_logits_NV,
        teacher_logits_NV.stride(0), keep_N.to(torch.int32), *out,
        vocab, float(temperature), beta, log_beta, log1m_beta,
        MODE=mode, **_blocks(vocab),
    )  # fmt: skip
    return tuple(out)  # type: ignore[return-value]  # four tensors


def full_divergence_bwd(
    student_logits_NV: torch.Tensor,
    teacher_logits_NV: torch.Tensor,
    student_lse_N: torch.Tensor,
    teacher_lse_N: torch.Tensor,
    tsum_N: torch.Tensor,
    g_N: torch.Tensor,
    *,
    kind: str,
    beta: float,
    temperature: float,
    keep_N: torch.Tensor,
    dlogits_NV: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of `g . divergence` w.r.t. the student logits.

    Args:
        student_logits_NV: `[N, V]` student logits of the forward.
        teacher_logits_NV: `[N, V]` teacher logits of the forward.
        student_lse_N: `[N]` float32, from `full_divergence_fwd`.
        teacher_lse_N: `[N]` float32, from `full_divergence_fwd`.
        tsum_N: `[N]` float32, from `full_divergence_fwd`.
        g_N: `[N]` gradient w.r.t. the divergence.
        kind: as in the forward.
        beta: as in the forward.
        temperature: as in the forward.
        keep_N: `[N]` bool, False = masked row (gradient exactly 0).
        dlogits_NV: optional contiguous `[N, V]` buffer to add the gradient into (masked rows
            left as they are); by default a new one in the student logits' dtype.

    Returns:
        `[N, V]` gradient w.r.t. the student logits (`dlogits_NV` when given).
    """
    student_logits_NV = _rows_contiguous(student_logits_NV)
    teacher_logits_NV = _rows_contiguous(teacher_logits_NV)
    n, vocab = student_logits_NV.shape
    accumulate = dlogits_NV is not None
    if dlogits_NV is None:
        dlogits_NV = torch.empty_like(student_logits_NV)
    assert dlogits_NV.shape == (n, vocab) and dlogits_NV.stride(-1) == 1
    if n == 0:
        return dlogits_NV
    mode, beta, log_beta, log1m_beta = _mode_args(kind, beta)
    _full_divergence_bwd_kernel[(n,)](
        student_logits_NV, student_logits_NV.stride(0), teacher_logits_NV,
        teacher_logits_NV.stride(0), keep_N.to(torch.int32), student_lse_N.contiguous(),
        teacher_lse_N.contiguous(), tsum_N.contiguous(), g_N.float().contiguous(),
        dlogits_NV, dlogits_NV.stride(0), vocab, float(temperature), beta, log_beta, log1m_beta,
        MODE=mode, ACCUMULATE=accumulate, **_blocks(vocab),
    )  # fmt: skip
    return dlogits_NV


class FullDivergenceFunction(torch.autograd.Function):
    """Autograd wrapper: `[N]` divergence, gradient to the student logits only."""

    @staticmethod
    def forward(ctx, student_logits_NV, teacher_logits_NV, kind, beta, temperature, keep_N):
        div_N, *stats = full_divergence_fwd(
            student_logits_NV, teacher_logits_NV, kind=kind, beta=beta,
            temperature=temperature, keep_N=keep_N,
        )  # fmt: skip
        ctx.save_for_backward(student_logits_NV, teacher_logits_NV, keep_N, *stats)
        ctx.opts = (kind, beta, temperature)
        return div_N

    @staticmethod
    def backward(ctx, g_N):
        student_logits_NV, teacher_logits_NV, keep_N, *stats = ctx.saved_tensors
        kind, beta, temperature = ctx.opts
        dlogits_NV = full_divergence_bwd(
            student_logits_NV, teacher_logits_NV, *stats, g_N, kind=kind, beta=beta,
            temperature=temperature, keep_N=keep_N,
        )  # fmt: skip
        return dlogits_NV, None, None, None, None, None


__all__ = [
    "FullDivergenceFunction",
    "divergence_mode",
    "full_divergence_bwd",
    "full_divergence_fwd",
]
