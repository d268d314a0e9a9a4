"""Plain-torch reference implementations ("the spec") of the kernel functions of `opd.kernels`.

Purpose: exact, readable definitions of the per-token statistics every OPD method needs (the
student's logprob of the sampled token, its entropy, and a student/teacher divergence on a top-k
support or the full vocabulary). The torch path (`torch_ops.py`) and the Triton kernels
(`triton_ops.py`) must match these; tests and benchmarks import them. Plain autograd torch on
whole `[N, V]` tensors: no chunking, no hand-written backward, memory is not a concern here. Only
the argument handling (`_inputs.py`) is shared with the fast paths, never their maths.

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
- Tail masses `1 - sum p` are floored at `MIN_TAIL` (`_inputs.py`).

How to test: `pytest -q tests/kernels/test_parity.py -k reference` (CPU, seconds): hand-computed
values on a 2 x 4 example and float64 parity, forward and backward, on odd shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opd.kernels._inputs import (
    MIN_TAIL,
    NEG_INF,
    clean_rows,
    clean_topk,
    divergence_keep,
    fused_inputs,
    require_teacher,
    sampled_inputs,
    token_stats_output,
)


def _logprobs(logits: Tensor, keep: Tensor, temperature: float) -> Tensor:
    """float32 `log softmax(z / T)` over the last dim, masked rows zeroed first."""
    return torch.log_softmax(clean_rows(logits, keep) / temperature, -1)


def _kl_terms(lp: Tensor, lq: Tensor) -> Tensor:
    """Per bucket `p (log p - log q)`, `p = e^lp`: exactly 0, value and gradient, where p = 0."""
    p_zero = lp == NEG_INF
    lp, lq = lp.masked_fill(p_zero, 0.0), lq.masked_fill(p_zero, 0.0)
    return torch.where(p_zero, 0.0, lp.exp() * (lp - lq))


def _divergence(ls: Tensor, lt: Tensor, kind: str, beta: float) -> Tensor:
    """`D(p_s, p_t)` summed over the buckets (last dim), from log-probs (module docstring)."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl_terms(lt, ls).sum(-1)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl_terms(ls, lt).sum(-1)
    m = beta * lt.exp() + (1.0 - beta) * ls.exp()
    lm = torch.log(torch.where(m > 0, m, 1.0))  # m = 0 only where p_s = p_t = 0: terms are 0
    return (beta * _kl_terms(lt, lm) + (1.0 - beta) * _kl_terms(ls, lm)).sum(-1)


def _log_one_minus(log_mass: Tensor) -> Tensor:
    """`log(1 - mass)` from `log mass`, the mass floored so that `1 - mass >= MIN_TAIL`."""
    return torch.log(-torch.expm1(log_mass.clamp(max=-MIN_TAIL)))


def _completed_teacher(t_ids: Tensor, t_lp: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """`[N, V]` teacher log-probs and `[N, V]` bool "returned": the returned top-k values, and at
    every other id the uniform share `log((1 - sum_k p_t) / (V - K_valid))` of the rest."""
    # amax: padding entries (id 0, -inf after `clean_topk`) never overwrite a returned id 0.
    lt = t_lp.new_full((t_ids.shape[0], vocab), NEG_INF).scatter_reduce(-1, t_ids, t_lp, "amax")
    returned = lt > NEG_INF
    n_other = (vocab - (t_lp > NEG_INF).sum(-1, keepdim=True)).clamp_min(1)
    share = _log_one_minus(torch.logsumexp(t_lp, -1, keepdim=True)) - n_other.float().log()
    return torch.where(returned, lt, share), returned


def _support_mask(ls: Tensor, teacher_returned: Tensor, support: str, k: int) -> Tensor:
    """`[N, V]` bool: the ids in the support (the teacher's returned ids, the student's top-k
    ids, or both)."""
    if support == "teacher":
        return teacher_returned
    student_top = ls.detach().topk(min(k, ls.shape[-1]), -1).indices
    in_student = torch.zeros_like(teacher_returned).scatter_(-1, student_top, True)
    return in_student if support == "student" else in_student | teacher_returned


def _buckets(lp_support: Tensor, tail: bool) -> Tensor:
    """Log-probs on the support's buckets (`-inf` off the support): plus the tail bucket
    `log(1 - sum_S p)`, or renormalised on the support."""
    log_mass = torch.logsumexp(lp_support, -1, keepdim=True)
    if tail:
        return torch.cat([lp_support, _log_one_minus(log_mass)], -1)
    return lp_support - log_mass


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
    keep, ids = sampled_inputs(logits, ids, mask)
    ls = _logprobs(logits, keep, temperature)
    logprob = ls.gather(-1, ids[:, None]).squeeze(-1)
    entropy = -_kl_terms(ls, torch.zeros_like(ls)).sum(-1)  # -sum p (log p - 0)
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
    keep = divergence_keep(student_logits, mask, kind, beta, support)
    ls = _logprobs(student_logits, keep, temperature)
    t_ids, t_lp = clean_topk(teacher_topk_ids, teacher_topk_logprobs, keep)
    lt, returned = _completed_teacher(t_ids, t_lp, ls.shape[-1])
    k = student_top_k if student_top_k is not None else t_ids.shape[-1]
    in_support = _support_mask(ls, returned, support, k)
    ls_b = _buckets(ls.masked_fill(~in_support, NEG_INF), tail)
    lt_b = _buckets(lt.masked_fill(~in_support, NEG_INF), tail)
    return torch.where(keep, _divergence(ls_b, lt_b, kind, beta), 0.0)


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
    keep = divergence_keep(student_logits, mask, kind, beta)
    ls = _logprobs(student_logits, keep, temperature)
    lt = _logprobs(teacher_logits.detach(), keep, temperature)
    return torch.where(keep, _divergence(ls, lt, kind, beta), 0.0)


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
    """Logprob, entropy and divergence from hidden states: the functions above on the logits.

    Student logits `z = student_hidden @ student_weight.T` (float32); the values are
    `sampled_logprob_entropy(z, ids)` and `full_divergence(z, teacher_hidden @ teacher_weight.T)`
    or `topk_divergence(z, teacher top-k, support="teacher")`. The fast paths compute the same
    without ever holding the `[N, V]` logits; the spec holds them.

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
        chunk_rows, chunk_vocab: the fast paths' block sizes; accepted and ignored here.

    Returns:
        dict of float32 `[N]` tensors: `logprob`, `entropy`, and `divergence` if a teacher is given.
    """
    teacher = (teacher_hidden, teacher_weight, teacher_topk_ids, teacher_topk_logprobs)
    keep, ids, (t_mode, th, tw, t_ids, t_lp) = fused_inputs(
        student_hidden, ids, mask, kind, beta, teacher
    )
    logits = clean_rows(student_hidden, keep) @ student_weight.float().T
    options = {"kind": kind, "beta": beta, "temperature": temperature, "mask": keep}
    logprob, entropy = sampled_logprob_entropy(logits, ids, temperature=temperature, mask=keep)
    divergence = None
    if t_mode == "full":
        divergence = full_divergence(logits, clean_rows(th, keep) @ tw.float().T, **options)
    if t_mode == "topk":
        divergence = topk_divergence(logits, t_ids, t_lp, tail=tail, **options)
    return token_stats_output(logprob, entropy, divergence, t_mode)


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
    supervised divergence term (GKD-style); the fast paths compute its gradient in the forward.

    Args:
        student_hidden, student_weight, teacher_*, kind, beta, temperature, mask, tail:
            as `fused_linear_token_stats` (a teacher is required).
        weight: optional `[N]` per-row weights (constant), default 1.
        chunk_rows: the fast paths' block size; accepted and ignored here.

    Returns:
        `(loss, divergence)`: float32 scalar and the float32 `[N]` divergence (detached).
    """
    require_teacher(teacher_hidden, teacher_topk_ids)
    no_ids = torch.zeros(student_hidden.shape[0], dtype=torch.long, device=student_hidden.device)
    div = fused_linear_token_stats(
        student_hidden, student_weight, no_ids, teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight, teacher_topk_ids=teacher_topk_ids,
        teacher_topk_logprobs=teacher_topk_logprobs, kind=kind, beta=beta,
        temperature=temperature, mask=mask, tail=tail,
    )["divergence"]  # fmt: skip
    w = torch.ones_like(div) if weight is None else weight.detach().float()
    return (div * w).sum(), div.detach()
