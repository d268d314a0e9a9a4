"""The O(N K) top-k bucket maths of the fast paths (`torch_ops.py`, `triton_ops.py`), in torch.

Contract: once a fast path has the student's log-probs at a few candidate ids per row (gathered
from a chunk of logits, or by the `softmax_stats` kernel), these functions give the top-k
divergence of `opd.kernels.reference.topk_divergence` on those candidates, differentiable by
autograd: the support's candidates, the teacher's completed log-prob of each, the tail bucket or
renormalisation, and the per-bucket divergence terms. `[N, K]`-sized, so plain torch is fast
enough here; the `[N, V]` sweeps are the paths' own. The spec (`reference.py`) does not use this
module: it computes the same values its own, unchunked way, and the parity tests compare them.

Test: `pytest -q tests/kernels/test_parity.py -k "topk and (torch or triton)"`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opd.kernels._inputs import MIN_TAIL, NEG_INF


def plogp_diff(lp: Tensor, lq: Tensor) -> Tensor:
    """Per entry `exp(lp) * (lp - lq)`, exactly 0 (value and gradient) where `lp = -inf`."""
    live = lp > NEG_INF
    lp0 = torch.where(live, lp, 0.0)
    lq0 = torch.where(live, lq, 0.0)
    return torch.where(live, lp0.exp() * (lp0 - lq0), 0.0)


def entry_divergence(ls: Tensor, lt: Tensor, kind: str, beta: float) -> Tensor:
    """Per-entry divergence terms (sum over the last dim gives D) from log-probs `ls`, `lt`."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return plogp_diff(lt, ls)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return plogp_diff(ls, lt)
    both_dead = (ls == NEG_INF) & (lt == NEG_INF)
    ls0 = torch.where(both_dead, 0.0, ls)
    lt0 = torch.where(both_dead, 0.0, lt)
    lm = torch.logaddexp(lt0 + math.log(beta), ls0 + math.log1p(-beta))
    return beta * plogp_diff(lt, lm) + (1.0 - beta) * plogp_diff(ls, lm)


def log1mexp(x: Tensor) -> Tensor:
    """`log(1 - exp(x))` for `x <= 0`, stable at both ends; `x` clamped to `<= -MIN_TAIL`."""
    x = x.clamp(max=-MIN_TAIL)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def bucket_divergence(ls_b: Tensor, lt_b: Tensor, kind: str, beta: float, tail: bool) -> Tensor:
    """`[N]` divergence on support buckets (`-inf` = not in the support), plus tail or renorm."""
    lse_s = torch.logsumexp(ls_b, -1, keepdim=True)
    lse_t = torch.logsumexp(lt_b, -1, keepdim=True)
    if tail:
        ls_b = torch.cat([ls_b, log1mexp(lse_s)], -1)
        lt_b = torch.cat([lt_b, log1mexp(lse_t)], -1)
    else:
        ls_b, lt_b = ls_b - lse_s, lt_b - lse_t
    return entry_divergence(ls_b, lt_b, kind, beta).sum(-1)


def teacher_lookup(cand: Tensor, t_ids: Tensor, t_lp: Tensor, vocab: int) -> Tensor:
    """Teacher log-prob of each candidate id: its returned top-k value, else the uniform share
    `log((1 - sum_k p_t) / (V - K_valid))` of the tail mass over the ids it did not return."""
    valid = t_lp > NEG_INF
    match = (cand[:, :, None] == t_ids[:, None, :]) & valid[:, None, :]
    matched = torch.where(match, t_lp[:, None, :], NEG_INF).amax(-1)
    n_missing = (vocab - valid.sum(-1)).clamp_min(1).float()
    log_rest = log1mexp(torch.logsumexp(t_lp, -1)) - torch.log(n_missing)
    return torch.where(match.any(-1), matched, log_rest[:, None])


def support_candidates(scores: Tensor, t_ids: Tensor, t_lp: Tensor, support: str, k: int | None):
    """Candidate ids `[N, B]` and liveness `[N, B]` of the chosen support (no duplicates).

    `scores` `[N, V]` only rank the student's ids (its top-k): raw logits rank as log-probs do.
    """
    valid_t = t_lp > NEG_INF
    if support == "teacher":
        return t_ids, valid_t
    k = min(k if k is not None else t_ids.shape[-1], scores.shape[-1])
    s_ids = scores.detach().topk(k, -1).indices
    if support == "student":
        return s_ids, torch.ones_like(s_ids, dtype=torch.bool)
    dup = ((s_ids[:, :, None] == t_ids[:, None, :]) & valid_t[:, None, :]).any(-1)
    return torch.cat([t_ids, s_ids], -1), torch.cat([valid_t, ~dup], -1)


def support_divergence(ls_cand, cand, live, t_ids, t_lp, vocab: int, kind, beta, tail) -> Tensor:
    """`[N]` divergence on the support `(cand, live)` from the student's log-probs `ls_cand` at
    the candidates (`-inf` where not live) and the teacher's completed log-probs there."""
    ls_b = torch.where(live, ls_cand, NEG_INF)
    lt_b = torch.where(live, teacher_lookup(cand, t_ids, t_lp, vocab), NEG_INF)
    return bucket_divergence(ls_b, lt_b, kind, beta, tail)


def topk_grad(ls_t: Tensor, t_lp: Tensor, kind: str, beta: float, tail: bool):
    """Top-k divergence (teacher support) and its gradient w.r.t. the gathered log-probs."""
    with torch.enable_grad():
        leaf = ls_t.detach().requires_grad_(True)
        live = t_lp > NEG_INF
        div = bucket_divergence(torch.where(live, leaf, NEG_INF), t_lp, kind, beta, tail)
        (grad,) = torch.autograd.grad(div.sum(), leaf)
    return div.detach(), grad
