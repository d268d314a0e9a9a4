"""Triton softmax statistics of student logits: logsumexp, entropy and candidate gathers per row.

Contract: `softmax_stats(logits_NV, cand_ids_NB, temperature=T, keep_N=keep)` returns float32
`(lse_N, entropy_N, z_cand_NB)` of `z = logits / T`, differentiable w.r.t. `logits` (gradient in
the logits' dtype). Rows with `keep = False` give 0 and receive exactly 0 gradient; their
contents (NaN, garbage ids) are never read. Kept rows need candidate ids in `[0, V)`; an id
outside gives `z_cand = 0` and no gradient rather than an out-of-bounds access. Building block of
`opd.kernels.triton_ops` (sampled logprob, entropy, top-k divergence, fused linear path).

Test: `TRITON_INTERPRET=1 pytest -q tests/kernels -k triton` (CPU, Triton's interpreter).
"""

# Maths, per row, with `z = logits / T`, `p = softmax(z)`:
#   lse = log sum_v e^{z_v}
#   H   = -sum_v p_v log p_v = lse - sum_v p_v z_v
#   z_cand[b] = z[cand[b]]
# Forward, one pass over V with a running max m (online softmax):
#   s = sum_v e^{z_v - m},   a = sum_v e^{z_v - m} (z_v - m)
#   when m grows to m': s <- e^{m - m'} s,  a <- e^{m - m'} (a + s (m - m'))
#   lse = m + log s,  H = log s - a / s
# (a is kept relative to m, not as sum e^{z-m} z, so H does not lose digits when |z| >> H.)
# Backward, with upstream gradients g_lse, g_H, g_cand[b]:
#   d lse / d z_v = p_v
#   d H / d z_v   = -p_v (log p_v + H)
#   d z_cand[b] / d z_v = [v == cand[b]]         (duplicate ids: their gradients add)
#   d logits_v = (g_lse p_v - g_H p_v (log p_v + H) + sum_{b: cand[b] = v} g_cand[b]) / T
# Entries with z_v = -inf have p_v = 0 and contribute 0 value and 0 gradient (0 log 0 = 0).

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _stats_grad(z, lse, ent, g_lse, g_ent):
    """`g_lse d lse/dz + g_H dH/dz` (before the 1/T), exactly 0 where z = -inf."""
    live = z > float("-inf")
    log_p = tl.where(live, z - lse, 0.0)
    p = tl.where(live, tl.exp(log_p), 0.0)
    return tl.where(live, g_lse * p - g_ent * p * (log_p + ent), 0.0)


@triton.jit
def _softmax_stats_fwd_kernel(
    logits_ptr,
    stride_logits,
    cand_ptr,
    stride_cand,
    keep_ptr,
    lse_ptr,
    ent_ptr,
    z_cand_ptr,
    stride_z_cand,
    V,
    B,
    temperature,
    BLOCK_V: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2^31 on large batches
    keep = tl.load(keep_ptr + row) != 0
    row_ptr = logits_ptr + row * stride_logits
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)
    # Masked rows sweep nothing: their contents are never read.
    n_cols = tl.where(keep, V, 0)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        z = z / temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # A block (or row prefix) of -inf: shift by 0 so that no -inf - -inf appears.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.exp(m - m_ref)
        a = scale * (a + s * tl.where(s > 0, m - m_ref, 0.0))
        s = scale * s
        shifted = z - m_ref  # m_ref is finite, so -inf entries stay -inf and give e = 0
        e = tl.exp(shifted)
        s += tl.sum(e, axis=0)
        a += tl.sum(e * tl.where(e > 0, shifted, 0.0), axis=0)
        m = m_new
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    s = tl.where(keep, s, 1.0)  # masked rows: s = 0, whose log would only be discarded
    log_s = tl.log(s)
    tl.store(lse_ptr + row, tl.where(keep, m_ref + log_s, 0.0))
    tl.store(ent_ptr + row, tl.where(keep, log_s - a / s, 0.0))

    offs_b = tl.arange(0, BLOCK_B)
    # keep folds into the bound (masks are built from vectors only: the interpreter mistypes a
    # scalar bool broadcast into a vector mask).
    live_b = offs_b < tl.where(keep, B, 0)
    ids = tl.load(cand_ptr + row * stride_cand + offs_b, mask=live_b, other=0)
    ok = live_b & (ids >= 0) & (ids < V)
    z_b = tl.load(row_ptr + ids, mask=ok, other=0.0).to(tl.float32) / temperature
    tl.store(z_cand_ptr + row * stride_z_cand + offs_b, tl.where(ok, z_b, 0.0), mask=offs_b < B)


@triton.jit
def _softmax_stats_bwd_kernel(
    logits_ptr,  # the [N, V] logits and their gradient first: the sweep reads one, writes the other
    stride_logits,
    dlogits_ptr,
    stride_dlogits,
    cand_ptr,
    stride_cand,
    keep_ptr,
    lse_ptr,
    ent_ptr,
    g_lse_ptr,
    g_ent_ptr,
    g_cand_ptr,
    stride_g_cand,
    V,
    B,
    temperature,
    BLOCK_V: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    keep = tl.load(keep_ptr + row) != 0
    row_ptr = logits_ptr + row * stride_logits
    d_row_ptr = dlogits_ptr + row * stride_dlogits
    out_dtype = dlogits_ptr.dtype.element_ty
    lse = tl.load(lse_ptr + row)
    ent = tl.load(ent_ptr + row)
    g_lse = tl.where(keep, tl.load(g_lse_ptr + row), 0.0)
    g_ent = tl.where(keep, tl.load(g_ent_ptr + row), 0.0)
    # The whole row is written (zeros on masked rows); masked rows' logits are never loaded.
    n_read = tl.where(keep, V, 0)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_v = offs < V
        z = tl.load(row_ptr + offs, mask=offs < n_read, other=float("-inf")).to(tl.float32)
        dz = _stats_grad(z / temperature, lse, ent, g_lse, g_ent) / temperature
        tl.store(d_row_ptr + offs, dz.to(out_dtype), mask=in_v)
    # The candidate stores below must land after the sweep's stores to the same entries, which
    # other threads of this program may have made.
    tl.debug_barrier()

    # Candidates: recompute the sweep's value in fp32 and add the candidates' gradients, summed
    # over buckets sharing an id (duplicates then all store the same value, so the order of the
    # lanes' stores does not matter, and the result is rounded to the output dtype once).
    offs_b = tl.arange(0, BLOCK_B)
    live_b = offs_b < tl.where(keep, B, 0)
    ids = tl.load(cand_ptr + row * stride_cand + offs_b, mask=live_b, other=0)
    ok = live_b & (ids >= 0) & (ids < V)
    g_b = tl.load(g_cand_ptr + row * stride_g_cand + offs_b, mask=ok, other=0.0)
    g_b = tl.where(ok, g_b, 0.0)
    same = (ids[:, None] == ids[None, :]) & ok[None, :]
    g_sum = tl.sum(tl.where(same, g_b[None, :], 0.0), axis=1)
    z_b = tl.load(row_ptr + ids, mask=ok, other=float("-inf")).to(tl.float32) / temperature
    d_b = (_stats_grad(z_b, lse, ent, g_lse, g_ent) + g_sum) / temperature
    tl.store(d_row_ptr + ids, d_b.to(out_dtype), mask=ok)


def _blocks(vocab: int, buckets: int) -> dict[str, int]:
    """Launch sizes: fixed, no autotune (it fails under the interpreter). Big blocks also make
    the interpreter, whose cost is per op per block, fast; 8 warps keep a 4096-wide fp32 block
    at 16 values per thread (4 warps would double the registers per thread)."""
    block_v = min(4096, triton.next_power_of_2(vocab))
    block_b = triton.next_power_of_2(max(buckets, 1))
    return {"BLOCK_V": block_v, "BLOCK_B": block_b, "num_warps": 8 if block_v >= 2048 else 4}


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def softmax_stats_fwd(
    logits_NV: torch.Tensor, cand_ids_NB: torch.Tensor, temperature: float, keep_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward pass of the softmax statistics (no autograd).

    Args:
        logits_NV: `[N, V]` logits, any float dtype.
        cand_ids_NB: `[N, B]` int64 candidate ids (`[0, V)` on kept rows).
        temperature: divides the logits.
        keep_N: `[N]` bool, False = masked row.

    Returns:
        `(lse_N, entropy_N, z_cand_NB)`, float32, 0 on masked rows.
    """
    logits_NV = _rows_contiguous(logits_NV)
    cand_ids_NB = cand_ids_NB.to(torch.int64).contiguous()
    n, vocab = logits_NV.shape
    buckets = cand_ids_NB.shape[1]
    lse_N = torch.empty(n, dtype=torch.float32, device=logits_NV.device)
    entropy_N = torch.empty_like(lse_N)
    z_cand_NB = torch.empty(n, buckets, dtype=torch.float32, device=logits_NV.device)
    if n == 0:
        return lse_N, entropy_N, z_cand_NB
    _softmax_stats_fwd_kernel[(n,)](
        logits_NV, logits_NV.stride(0), cand_ids_NB, cand_ids_NB.stride(0),
        keep_N.to(torch.int32), lse_N, entropy_N, z_cand_NB, z_cand_NB.stride(0),
        vocab, buckets, float(temperature), **_blocks(vocab, buckets),
    )  # fmt: skip
    return lse_N, entropy_N, z_cand_NB


def softmax_stats_bwd(
    logits_NV: torch.Tensor,
    cand_ids_NB: torch.Tensor,
    temperature: float,
    keep_N: torch.Tensor,
    lse_N: torch.Tensor,
    entropy_N: torch.Tensor,
    g_lse_N: torch.Tensor,
    g_entropy_N: torch.Tensor,
    g_cand_NB: torch.Tensor,
) -> torch.Tensor:
    """Gradient of `g_lse . lse + g_H . H + g_cand . z_cand` w.r.t. the logits.

    Args:
        logits_NV: `[N, V]` logits of the forward, any float dtype.
        cand_ids_NB: `[N, B]` int64 candidate ids of the forward.
        temperature: the forward's temperature.
        keep_N: `[N]` bool, False = masked row (gradient exactly 0).
        lse_N: `[N]` float32 logsumexp from the forward.
        entropy_N: `[N]` float32 entropy from the forward.
        g_lse_N: `[N]` gradient w.r.t. `lse`.
        g_entropy_N: `[N]` gradient w.r.t. the entropy.
        g_cand_NB: `[N, B]` gradient w.r.t. `z_cand`.

    Returns:
        `[N, V]` gradient w.r.t. the logits, in the logits' dtype.
    """
    logits_NV = _rows_contiguous(logits_NV)
    cand_ids_NB = cand_ids_NB.to(torch.int64).contiguous()
    n, vocab = logits_NV.shape
    buckets = cand_ids_NB.shape[1]
    dlogits_NV = torch.empty_like(logits_NV)
    if n == 0:
        return dlogits_NV
    g_cand_NB = g_cand_NB.float().contiguous()
    _softmax_stats_bwd_kernel[(n,)](
        logits_NV, logits_NV.stride(0), dlogits_NV, dlogits_NV.stride(0),
        cand_ids_NB, cand_ids_NB.stride(0), keep_N.to(torch.int32),
        lse_N.float().contiguous(), entropy_N.float().contiguous(),
        g_lse_N.float().contiguous(), g_entropy_N.float().contiguous(), g_cand_NB,
        g_cand_NB.stride(0), vocab, buckets, float(temperature), **_blocks(vocab, buckets),
    )  # fmt: skip
    return dlogits_NV


class SoftmaxStatsFunction(torch.autograd.Function):
    """Autograd wrapper: `(lse, entropy, z_cand)` of `logits / T`, gradient to the logits."""

    @staticmethod
    def forward(ctx, logits_NV, cand_ids_NB, temperature, keep_N):
        lse_N, entropy_N, z_cand_NB = softmax_stats_fwd(logits_NV, cand_ids_NB, temperature, keep_N)
        ctx.save_for_backward(logits_NV, cand_ids_NB, keep_N, lse_N, entropy_N)
        ctx.temperature = temperature
        return lse_N, entropy_N, z_cand_NB

    @staticmethod
    def backward(ctx, g_lse_N, g_entropy_N, g_cand_NB):
        logits_NV, cand_ids_NB, keep_N, lse_N, entropy_N = ctx.saved_tensors
        dlogits_NV = softmax_stats_bwd(
            logits_NV, cand_ids_NB, ctx.temperature, keep_N, lse_N, entropy_N,
            g_lse_N, g_entropy_N, g_cand_NB,
        )  # fmt: skip
        return dlogits_NV, None, None, None


def softmax_stats(
    logits_NV: torch.Tensor,
    cand_ids_NB: torch.Tensor,
    *,
    temperature: float,
    keep_N: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logsumexp, entropy and candidate logits of `logits / T` per row (differentiable).

    Args:
        logits_NV: `[N, V]` student logits, any float dtype (maths in float32).
        cand_ids_NB: `[N, B]` int64 candidate ids (duplicates allowed; ignored on masked rows).
        temperature: divides the logits.
        keep_N: `[N]` bool, True = keep; masked rows give 0 and receive exactly 0 gradient.

    Returns:
        `(lse_N, entropy_N, z_cand_NB)`: float32 `[N]`, `[N]`, `[N, B]`, with `z_cand` the
        tempered logits `z = logits / T` at the candidate ids.
    """
    return SoftmaxStatsFunction.apply(logits_NV, cand_ids_NB, float(temperature), keep_N)


__all__ = ["SoftmaxStatsFunction", "softmax_stats", "softmax_stats_bwd", "softmax_stats_fwd"]
