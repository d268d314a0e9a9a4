"""Plain-torch reference implementations ("the spec") of the four kernel functions of issue 3.

Purpose: exact, readable definitions of the per-token statistics every OPD method needs (the
student's logprob of the sampled token, its entropy, and a student/teacher divergence on a top-k
support or the full vocabulary). The Triton kernels must match these; tests and benchmarks import
them. `fused_linear_token_stats` is also the memory-bounded torch path CPU users run.

Contract (all functions):
- `N` rows (flattened tokens), vocabulary `V`, hidden `H`, top-k `K`. Inputs of any float dtype;
  all maths in float32; outputs float32 `[N]`, differentiable w.r.t. the student inputs. Teacher
  inputs are constants (never receive gradient).
- `temperature` divides the student logits and the teacher logits. Teacher *top-k logprobs* are
  used as given (assumed already at the intended temperature: tempering a truncated distribution
  would need the teacher's full-vocabulary normaliser, which a top-k teacher does not return).
- `mask [N]` bool (True = keep): masked rows return exactly 0 and receive exactly 0 gradient,
  whatever they contain (NaN, -inf, out-of-range ids are all tolerated there).
- Divergences, with `p_s` the student and `p_t` the teacher distribution on the same buckets:
  reverse_kl `KL(p_s||p_t) = sum p_s (log p_s - log p_t)`; forward_kl `KL(p_t||p_s)`;
  jsd (generalised, GKD / TRL / Liger convention) `beta KL(p_t||m) + (1-beta) KL(p_s||m)`,
  `m = beta p_t + (1-beta) p_s`, with the special cases `beta=0 -> forward KL(p_t||p_s)` and
  `beta=1 -> reverse KL(p_s||p_t)` (as TRL's `generalized_jsd_loss` and Liger's JSD, where
  "beta=1 is reverse KL"). Note the formula itself tends to 0 at both ends: these two values are
  the convention, not limits. `0 * log 0 = 0` throughout.

How to test: `pytest -q tests/kernels/test_reference.py` (CPU, seconds): hand-computed values on a
2 x 4 example and float64 parity, forward and backward, on odd shapes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KINDS = ("reverse_kl", "forward_kl", "jsd")
SUPPORTS = ("teacher", "student", "union")
NEG_INF = -math.inf
# Tail masses below this are floored (log(1 - e^x) with x clamped to <= -_MIN_TAIL): a top-k
# support whose mass rounds to 1 in float32 would otherwise give log 0 and an infinite gradient.
_MIN_TAIL = 1e-10


def _check(kind: str, beta: float, support: str = "teacher") -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if support not in SUPPORTS:
        raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


def _keep(mask: Tensor | None, n: int, device: torch.device) -> Tensor:
    """`[N]` bool, True where the row is computed."""
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return mask.to(device=device, dtype=torch.bool)


def _clean_rows(x: Tensor, keep: Tensor) -> Tensor:
    """float32 copy with masked rows zeroed (so they produce finite values and zero gradient)."""
    return torch.where(keep.view(-1, *([1] * (x.dim() - 1))), x.float(), 0.0)


def _clean_topk(ids: Tensor, logprobs: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Teacher top-k with padding ids set to 0 and masked rows replaced by a valid 1-hot row."""
    lp = logprobs.detach().float()
    one_hot_row = torch.full_like(lp, NEG_INF)
    one_hot_row[:, 0] = 0.0
    lp = torch.where(keep[:, None], lp, one_hot_row)
    lp = torch.where(lp.isnan(), NEG_INF, lp)
    ids = torch.where(lp > NEG_INF, ids.long(), 0)
    return ids, lp


def _plogp_diff(lp: Tensor, lq: Tensor) -> Tensor:
    """Per entry `exp(lp) * (lp - lq)`, exactly 0 (value and gradient) where `lp = -inf`."""
    live = lp > NEG_INF
    lp0 = torch.where(live, lp, 0.0)
    lq0 = torch.where(live, lq, 0.0)
    return torch.where(live, lp0.exp() * (lp0 - lq0), 0.0)


def _entry_divergence(ls: Tensor, lt: Tensor, kind: str, beta: float) -> Tensor:
    """Per-entry divergence terms (sum over the last dim gives D) from log-probs `ls`, `lt`."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _plogp_diff(lt, ls)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _plogp_diff(ls, lt)
    both_dead = (ls == NEG_INF) & (lt == NEG_INF)
    ls0 = torch.where(both_dead, 0.0, ls)
    lt0 = torch.where(both_dead, 0.0, lt)
    lm = torch.logaddexp(lt0 + math.log(beta), ls0 + math.log1p(-beta))
    return beta * _plogp_diff(lt, lm) + (1.0 - beta) * _plogp_diff(ls, lm)


def _log1mexp(x: Tensor) -> Tensor:
    """`log(1 - exp(x))` for `x <= 0`, stable at both ends; `x` clamped to `<= -_MIN_TAIL`."""
    x = x.clamp(max=-_MIN_TAIL)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _bucket_divergence(ls_b: Tensor, lt_b: Tensor, kind: str, beta: float, tail: bool) -> Tensor:
    """`[N]` divergence on support buckets (`-inf` = not in the support), plus tail or renorm."""
    lse_s = torch.logsumexp(ls_b, -1, keepdim=True)
    lse_t = torch.logsumexp(lt_b, -1, keepdim=True)
    if tail:
        ls_b = torch.cat([ls_b, _log1mexp(lse_s)], -1)
        lt_b = torch.cat([lt_b, _log1mexp(lse_t)], -1)
    else:
        ls_b, lt_b = ls_b - lse_s, lt_b - lse_t
    return _entry_divergence(ls_b, lt_b, kind, beta).sum(-1)


def _teacher_lookup(cand: Tensor, t_ids: Tensor, t_lp: Tensor, vocab: int) -> Tensor:
    """Teacher log-prob of each candidate id: its returned top-k value, else the uniform share
    `log((1 - sum_k p_t) / (V - K_valid))` of the tail mass over the ids it did not return."""
    valid = t_lp > NEG_INF
    match = (cand[:, :, None] == t_ids[:, None, :]) & valid[:, None, :]
    matched = torch.where(match, t_lp[:, None, :], NEG_INF).amax(-1)
    n_missing = (vocab - valid.sum(-1)).clamp_min(1).float()
    log_rest = _log1mexp(torch.logsumexp(t_lp, -1)) - torch.log(n_missing)
    return torch.where(match.any(-1), matched, log_rest[:, None])


def _support(ls: Tensor, t_ids: Tensor, t_lp: Tensor, support: str, k: int | None):
    """Candidate ids `[N, B]` and liveness `[N, B]` of the chosen support (no duplicates)."""
    valid_t = t_lp > NEG_INF
    if support == "teacher":
        return t_ids, valid_t
    k = min(k if k is not None else t_ids.shape[-1], ls.shape[-1])
    s_ids = ls.detach().topk(k, -1).indices
    if support == "student":
        return s_ids, torch.ones_like(s_ids, dtype=torch.bool)
    dup = ((s_ids[:, :, None] == t_ids[:, None, :]) & valid_t[:, None, :]).any(-1)
    return torch.cat([t_ids, s_ids], -1), torch.cat([valid_t, ~dup], -1)


def sampled_logprob_entropy(
    logits: Tensor, ids: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Log-prob of the sampled token and entropy of the student, per row.

    `log p(y) = z_y / T - logsumexp(z / T)`, `H = -sum_v p(v) log p(v)` with `p = softmax(z / T)`.

    Args:
        logits: `[N, V]` student logits, any float dtype.
        ids: `[N]` int64 sampled token ids (ignored on masked rows).
        temperature: divides the logits.
        mask: optional `[N]` bool, True = keep; masked rows give 0 and receive 0 gradient.

    Returns:
        `(logprob, entropy)`, each float32 `[N]`.
    """
    keep = _keep(mask, logits.shape[0], logits.device)
    ls = torch.log_softmax(_clean_rows(logits, keep) / temperature, -1)
    safe_ids = torch.where(keep, ids.long(), 0)
    logprob = ls.gather(-1, safe_ids[:, None]).squeeze(-1)
    entropy = -_plogp_diff(ls, torch.zeros_like(ls)).sum(-1)
    return torch.where(keep, logprob, 0.0), torch.where(keep, entropy, 0.0)


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
) -> Tensor:
    """Student/teacher divergence on a top-k support, per row.

    Support `S`: "teacher" = the teacher's returned ids with finite logprob (`-inf` = padding);
    "student" = the student's own top-k ids (`k = student_top_k`, default the teacher's `K`);
    "union" = both. The teacher is completed to a full distribution: ids it did not return share
    its tail mass `1 - sum_k p_t` uniformly, `p_t(v) = (1 - sum_k p_t) / (V - K_valid)` (only
    used by "student"/"union"). `p_s = softmax(z / T)`; teacher logprobs used as given.
    `tail=True`: buckets `S + {tail}` with tail mass `1 - sum_S p` for each distribution;
    `tail=False`: both renormalised on `S`. Then `D = sum_b term(p_s(b), p_t(b))` (module doc).

    Args:
        student_logits: `[N, V]` student logits.
        teacher_topk_ids: `[N, K]` int64 teacher top-k ids.
        teacher_topk_logprobs: `[N, K]` teacher log-probs of those ids (`-inf` = padding).
        kind: "reverse_kl", "forward_kl" or "jsd".
        beta: JSD weight (`0` = forward KL, `1` = reverse KL).
        support: "teacher", "student" or "union".
        tail: add the tail bucket (True) or renormalise on the support (False).
        temperature: divides the student logits.
        mask: optional `[N]` bool, True = keep.
        student_top_k: k of the student support (default `K`).

    Returns:
        float32 `[N]` divergence.
    """
    _check(kind, beta, support)
    keep = _keep(mask, student_logits.shape[0], student_logits.device)
    ls = torch.log_softmax(_clean_rows(student_logits, keep) / temperature, -1)
    t_ids, t_lp = _clean_topk(teacher_topk_ids, teacher_topk_logprobs, keep)
    cand, live = _support(ls, t_ids, t_lp, support, student_top_k)
    ls_b = torch.where(live, ls.gather(-1, cand), NEG_INF)
    lt_b = torch.where(live, _teacher_lookup(cand, t_ids, t_lp, ls.shape[-1]), NEG_INF)
    div = _bucket_divergence(ls_b, lt_b, kind, beta, tail)
    return torch.where(keep, div, 0.0)


def full_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Student/teacher divergence over the full vocabulary, per row.

    `p_s = softmax(z_s / T)`, `p_t = softmax(z_t / T)`; reverse KL `sum p_s (log p_s - log p_t)`,
    forward KL `sum p_t (log p_t - log p_s)`, JSD as in the module docstring.

    Args:
        student_logits: `[N, V]` student logits.
        teacher_logits: `[N, V]` teacher logits (constant; `-inf` entries allowed).
        kind: "reverse_kl", "forward_kl" or "jsd".
        beta: JSD weight (`0` = forward KL, `1` = reverse KL).
        temperature: divides both sets of logits.
        mask: optional `[N]` bool, True = keep.

    Returns:
        float32 `[N]` divergence.
    """
    _check(kind, beta)
    keep = _keep(mask, student_logits.shape[0], student_logits.device)
    ls = torch.log_softmax(_clean_rows(student_logits, keep) / temperature, -1)
    lt = torch.log_softmax(_clean_rows(teacher_logits.detach(), keep) / temperature, -1)
    div = _entry_divergence(ls, lt, kind, beta).sum(-1)
    return torch.where(keep, div, 0.0)


# ---------------------------------------------------------------------------------------------
# fused_linear_token_stats: chunked over rows and vocabulary, custom chunked backward.
#
# Per row, with `z = x W^T / T`, `l = z - lse(z)`, `p = e^l` and any statistic of the form
# `S = sum_v f(l_v, lt_v)`, the gradient is `dS/dz_v = t_v - p_v sum_u t_u` with `t = df/dl`
# (the `- p_v sum_u t_u` term is the derivative through `lse`). Entropy: `t = -p (l + 1)`, so
# `dH/dz = -p (l + H)`; sampled logprob: `onehot(y) - p`; top-k divergence: `t` is the gradient
# of the bucket divergence w.r.t. the gathered `l` at the teacher ids (scattered back). Forward:
# pass 1 = online logsumexp (+ gathers), pass 2 = entropy and full-vocabulary divergence (and
# `sum_u t_u`). Backward recomputes each `[chunk_rows, chunk_vocab]` block of logits once.
# ---------------------------------------------------------------------------------------------


def _block(x_r: Tensor, weight: Tensor, v0: int, v1: int, temperature: float) -> Tensor:
    return (x_r @ weight[v0:v1].float().T) / temperature


def _gather_chunk(z: Tensor, ids: Tensor, v0: int, v1: int, into: Tensor) -> Tensor:
    """`into` with the entries of `z` (vocab columns v0:v1) at `ids` filled in."""
    inside = (ids >= v0) & (ids < v1)
    picked = z.gather(-1, (ids - v0).clamp(0, v1 - v0 - 1))
    return torch.where(inside, picked, into)


def _scatter_chunk(vals: Tensor, ids: Tensor, v0: int, v1: int) -> Tensor:
    """`[rows, v1 - v0]` block with `vals` added at the columns `ids` that fall in v0:v1."""
    inside = (ids >= v0) & (ids < v1)
    out = torch.zeros(vals.shape[0], v1 - v0, dtype=vals.dtype, device=vals.device)
    return out.scatter_add_(-1, (ids - v0).clamp(0, v1 - v0 - 1), torch.where(inside, vals, 0.0))


def _entry_grad(ls: Tensor, lt: Tensor, kind: str, beta: float) -> tuple[Tensor, Tensor]:
    """Per-entry divergence terms and their partials `t = d term / d ls` (rows independent)."""
    with torch.enable_grad():
        leaf = ls.detach().requires_grad_(True)
        terms = _entry_divergence(leaf, lt, kind, beta)
        (grad,) = torch.autograd.grad(terms.sum(), leaf)
    return terms.detach(), grad


def _topk_grad(ls_t: Tensor, t_lp: Tensor, kind: str, beta: float, tail: bool):
    """Top-k divergence (teacher support) and its gradient w.r.t. the gathered log-probs."""
    with torch.enable_grad():
        leaf = ls_t.detach().requires_grad_(True)
        live = t_lp > NEG_INF
        div = _bucket_divergence(torch.where(live, leaf, NEG_INF), t_lp, kind, beta, tail)
        (grad,) = torch.autograd.grad(div.sum(), leaf)
    return div.detach(), grad


def _fused_forward_rows(x_r, w, ids_r, teacher, opts):
    """Forward of one row chunk: logprob, entropy, divergence and what backward needs."""
    t_mode, th_r, tw, t_ids, t_lp = teacher
    kind, beta, temp, tail, cv = opts
    rows, vocab = x_r.shape[0], w.shape[0]
    lse = torch.full((rows,), NEG_INF, device=x_r.device)
    lse_t, z_y = lse.clone(), torch.zeros(rows, device=x_r.device)
    z_t = torch.zeros(rows, 0 if t_ids is None else t_ids.shape[1], device=x_r.device)
    for v0 in range(0, vocab, cv):  # pass 1: online logsumexp and gathers
        v1 = min(v0 + cv, vocab)
        z = _block(x_r, w, v0, v1, temp)
        lse = torch.logaddexp(lse, torch.logsumexp(z, -1))
        z_y = _gather_chunk(z, ids_r[:, None], v0, v1, z_y[:, None]).squeeze(-1)
        if t_mode == "topk":
            z_t = _gather_chunk(z, t_ids, v0, v1, z_t)
        if t_mode == "full":
            lse_t = torch.logaddexp(lse_t, torch.logsumexp(_block(th_r, tw, v0, v1, temp), -1))
    ent, div, tsum = (torch.zeros(rows, device=x_r.device) for _ in range(3))
    gk = torch.zeros_like(z_t)
    for v0 in range(0, vocab, cv):  # pass 2: entropy and full-vocabulary divergence
        v1 = min(v0 + cv, vocab)
        ls = _block(x_r, w, v0, v1, temp) - lse[:, None]
        ent -= _plogp_diff(ls, torch.zeros_like(ls)).sum(-1)
        if t_mode == "full":
            lt = _block(th_r, tw, v0, v1, temp) - lse_t[:, None]
            terms, t = _entry_grad(ls, lt, kind, beta)
            div, tsum = div + terms.sum(-1), tsum + t.sum(-1)
    if t_mode == "topk":
        div, gk = _topk_grad(z_t - lse[:, None], t_lp, kind, beta, tail)
    return z_y - lse, ent, div, (lse, lse_t, ent, tsum, gk)


def _fused_backward_rows(x_r, w, ids_r, teacher, opts, saved, grads):
    """Gradient of one row chunk: returns `(grad_x_r, grad_w)` in float32."""
    t_mode, th_r, tw, t_ids, _ = teacher
    kind, beta, temp, _, cv = opts
    lse, lse_t, ent, tsum, gk = saved
    g_lp, g_ent, g_div = (g[:, None] for g in grads)
    gx = torch.zeros_like(x_r)
    gw = torch.zeros(w.shape, dtype=torch.float32, device=x_r.device)
    for v0 in range(0, w.shape[0], cv):
        v1 = min(v0 + cv, w.shape[0])
        ls = _block(x_r, w, v0, v1, temp) - lse[:, None]
        ps = ls.exp()
        gz = g_lp * (_scatter_chunk(torch.ones_like(g_lp), ids_r[:, None], v0, v1) - ps)
        gz = gz - g_ent * ps * (ls + ent[:, None])
        if t_mode == "full":
            lt = _block(th_r, tw, v0, v1, temp) - lse_t[:, None]
            _, t = _entry_grad(ls, lt, kind, beta)
            gz = gz + g_div * (t - ps * tsum[:, None])
        if t_mode == "topk":
            gz = gz + g_div * (_scatter_chunk(gk, t_ids, v0, v1) - ps * gk.sum(-1, keepdim=True))
        gz = gz / temp
        gx += gz @ w[v0:v1].float()
        gw[v0:v1] += gz.T @ x_r
    return gx, gw


class _FusedLinearTokenStats(torch.autograd.Function):
    """Chunked forward/backward of `fused_linear_token_stats` (gradients to hidden and weight)."""

    @staticmethod
    def forward(ctx, x, w, ids, keep, th, tw, t_ids, t_lp, t_mode, opts, chunk_rows):
        xf = _clean_rows(x, keep)
        thf = None if th is None else _clean_rows(th, keep)
        outs, saved = [], []
        for r0 in range(0, x.shape[0], chunk_rows):
            r = slice(r0, r0 + chunk_rows)
            teacher = _teacher_rows(t_mode, thf, tw, t_ids, t_lp, r)
            *out, sv = _fused_forward_rows(xf[r], w, ids[r], teacher, opts)
            outs.append(out)
            saved.append(sv)
        lp, ent, div = (torch.cat([o[i] for o in outs]) for i in range(3))
        sv = [torch.cat([s[i] for s in saved]) for i in range(5)]
        ctx.save_for_backward(xf, w, ids, keep, thf, tw, t_ids, t_lp, *sv)
        ctx.t_mode, ctx.opts, ctx.chunk_rows, ctx.x_dtype = t_mode, opts, chunk_rows, x.dtype
        return tuple(torch.where(keep, o, 0.0) for o in (lp, ent, div))

    @staticmethod
    def backward(ctx, g_lp, g_ent, g_div):
        xf, w, ids, keep, thf, tw, t_ids, t_lp, *sv = ctx.saved_tensors
        grads = [torch.where(keep, g.float(), 0.0) for g in (g_lp, g_ent, g_div)]
        gx, gw = torch.zeros_like(xf), torch.zeros(w.shape, device=w.device)
        for r0 in range(0, xf.shape[0], ctx.chunk_rows):
            r = slice(r0, r0 + ctx.chunk_rows)
            teacher = _teacher_rows(ctx.t_mode, thf, tw, t_ids, t_lp, r)
            saved_r = [s[r] for s in sv]
            grads_r = [g[r] for g in grads]
            gx_r, gw_r = _fused_backward_rows(xf[r], w, ids[r], teacher, ctx.opts, saved_r, grads_r)
            gx[r] = gx_r
            gw += gw_r
        return (gx.to(ctx.x_dtype), gw.to(w.dtype), *([None] * 9))


def _teacher_rows(t_mode, th, tw, t_ids, t_lp, r):
    if t_mode == "full":
        return t_mode, th[r], tw, None, None
    if t_mode == "topk":
        return t_mode, None, None, t_ids[r], t_lp[r]
    return t_mode, None, None, None, None


def _teacher_inputs(th, tw, t_ids, t_lp, keep):
    """`(mode, hidden, weight, topk_ids, topk_logprobs)`, mode in none / full / topk, detached."""
    if th is not None and t_ids is not None:
        raise ValueError("give either teacher_hidden/teacher_weight or the teacher top-k, not both")
    if th is not None:
        if tw is None:
            raise ValueError("teacher_hidden needs teacher_weight")
        return "full", th.detach(), tw.detach(), None, None
    if t_ids is not None:
        if t_lp is None:
            raise ValueError("teacher_topk_ids needs teacher_topk_logprobs")
        return "topk", None, None, *_clean_topk(t_ids, t_lp, keep)
    return "none", None, None, None, None


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
    chunk_rows: int = 1024,
    chunk_vocab: int = 8192,
) -> dict[str, Tensor]:
    """Logprob, entropy and divergence from hidden states, without the full logits tensor.

    Student logits `z = student_hidden @ student_weight.T / T` are computed one
    `[chunk_rows, chunk_vocab]` block at a time with an online logsumexp; the backward recomputes
    each block (see the comment above `_block`), so peak memory is one block plus `O(N K + V H)`.
    Values equal `sampled_logprob_entropy` and `full_divergence` (teacher logits
    `teacher_hidden @ teacher_weight.T`) or `topk_divergence(..., support="teacher")`.

    Args:
        student_hidden: `[N, H]` student final hidden states (receives gradient).
        student_weight: `[V, H]` student lm_head weight (receives gradient).
        ids: `[N]` int64 sampled token ids.
        teacher_hidden: optional `[N, H_t]` teacher hidden states (full-vocabulary divergence).
        teacher_weight: `[V, H_t]` teacher lm_head weight, with `teacher_hidden`.
        teacher_topk_ids: optional `[N, K]` teacher top-k ids (top-k divergence).
        teacher_topk_logprobs: `[N, K]` their log-probs (`-inf` = padding), used as given.
        kind: "reverse_kl", "forward_kl" or "jsd".
        beta: JSD weight (`0` = forward KL, `1` = reverse KL).
        temperature: divides student and teacher logits.
        mask: optional `[N]` bool, True = keep.
        tail: top-k only: tail bucket (True) or renormalise on the support (False).
        chunk_rows: rows per block.
        chunk_vocab: vocabulary columns per block.

    Returns:
        dict of float32 `[N]` tensors: `logprob`, `entropy`, and `divergence` if a teacher is given.
    """
    _check(kind, beta)
    keep = _keep(mask, student_hidden.shape[0], student_hidden.device)
    safe_ids = torch.where(keep, ids.long(), 0)
    t_mode, th, tw, t_ids, t_lp = _teacher_inputs(
        teacher_hidden, teacher_weight, teacher_topk_ids, teacher_topk_logprobs, keep
    )
    opts = (kind, beta, float(temperature), tail, int(chunk_vocab))
    lp, ent, div = _FusedLinearTokenStats.apply(
        student_hidden, student_weight, safe_ids, keep, th, tw, t_ids, t_lp, t_mode,
        opts, int(chunk_rows),
    )  # fmt: skip
    out = {"logprob": lp, "entropy": ent}
    if t_mode != "none":
        out["divergence"] = div
    return out


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
    chunk_rows: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Weighted sum of the per-row divergences of `fused_linear_token_stats`, as a scalar loss.

    `loss = sum_r weight_r D_r` (masked rows count 0). This is the distillation loss of a
    supervised divergence term (GKD-style); the kernels compute its gradient during the forward.

    Args:
        student_hidden, student_weight, teacher_*, kind, beta, temperature, mask, tail:
            as `fused_linear_token_stats` (a teacher is required).
        weight: optional `[N]` per-row weights (constant), default 1.
        chunk_rows: rows per block.

    Returns:
        `(loss, divergence)`: float32 scalar and the float32 `[N]` divergence (detached).
    """
    if teacher_hidden is None and teacher_topk_ids is None:
        raise ValueError("a divergence loss needs a teacher: hidden and weight, or its top-k")
    out = fused_linear_token_stats(
        student_hidden, student_weight, torch.zeros(student_hidden.shape[0], dtype=torch.long,
        device=student_hidden.device), teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight, teacher_topk_ids=teacher_topk_ids,
        teacher_topk_logprobs=teacher_topk_logprobs, kind=kind, beta=beta,
        temperature=temperature, mask=mask, tail=tail, chunk_rows=chunk_rows,
    )  # fmt: skip
    div = out["divergence"]
    w = torch.ones_like(div) if weight is None else weight.detach().float()
    return (div * w).sum(), div.detach()
