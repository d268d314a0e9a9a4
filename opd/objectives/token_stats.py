"""Per-token quantities over the vocabulary for the advantage phase (no gradient).

One pass over the student's completion positions gives a `TokenStats` (`opd/types.py`), per
token: the sampled-token logprob, the entropy `H_t`, the reverse KL to the teacher (exact `KL_t`
when the teacher runs in this process and its hidden states are given; top-k with a tail bucket
otherwise), the vOPD baseline's KL (full, or on the student's top-k renormalised: exact with the
teacher's logits or its scores at the student's top-k ids, `opd/objectives/candidates.py`), the
JSD that TIP ranks tokens by, and the student's mass on the teacher's top-k support. Logits exist
one chunk of rows at a time, and the per-row maths is `opd.kernels` (Triton on GPU, chunked torch
on CPU).

Test: `pytest tests/unit/test_token_stats.py`.
"""

from __future__ import annotations

import torch

from opd.kernels import full_divergence, sampled_logprob_entropy, topk_divergence
from opd.types import Baseline, TeacherScores, TokenStats


@torch.no_grad()
def completion_token_stats(
    student_hidden_NH: torch.Tensor,
    student_weight_VH: torch.Tensor,
    ids_N: torch.Tensor,
    *,
    temperature: float = 1.0,
    teacher_topk_ids_NK: torch.Tensor | None = None,
    teacher_topk_logprobs_NK: torch.Tensor | None = None,
    teacher_hidden_NH: torch.Tensor | None = None,
    teacher_weight_VH: torch.Tensor | None = None,
    teacher_temperature: float = 1.0,
    teacher_support_ids_NK: torch.Tensor | None = None,
    teacher_support_logprobs_NK: torch.Tensor | None = None,
    baseline: Baseline = Baseline.NONE,
    baseline_top_k: int = 100,
    jsd: bool = False,
    chunk_rows: int = 512,
) -> TokenStats:
    """Float32 `[N]` stats of N > 0 completion positions.

    Args:
        student_hidden_NH, student_weight_VH: final hidden states and lm_head weight; the
            student's logits at the sampling `temperature` are `hidden @ weight.T / temperature`.
        ids_N: the sampled token ids.
        teacher_topk_ids_NK, teacher_topk_logprobs_NK: the teacher's top-k (any teacher mode).
        teacher_hidden_NH, teacher_weight_VH: an in-process teacher's hidden states and lm_head
            (exact full-vocabulary quantities); logits divided by `teacher_temperature`.
        teacher_support_ids_NK, teacher_support_logprobs_NK: the student's top-k ids (at least
            `baseline_top_k` of them; -1 / -inf padding) and the teacher's exact logprobs there,
            from a teacher that scores candidates: the top-k baseline uses them when the
            teacher's logits are not given, instead of its top-k plus a uniform tail share.
        baseline: vOPD's V_t = -KL_t on that support (`baseline_kl`), or none.
        jsd: also return `jsd` (TIP's divergence axis).

    Returns:
        `logprob`, `entropy`; with a teacher `reverse_kl`; with top-k `topk_mass`; `baseline_kl`
        unless baseline is none; `jsd` when asked.
    """
    assert ids_N.shape[0] > 0, "no positions to score: callers skip empty chunks"
    has_full = teacher_hidden_NH is not None
    has_topk = teacher_topk_ids_NK is not None and teacher_topk_ids_NK.shape[-1] > 0
    has_support = teacher_support_ids_NK is not None
    if baseline == Baseline.FULL and not has_full:
        raise ValueError("the full vOPD baseline needs the teacher's hidden states")
    if baseline == Baseline.TOPK and not (has_full or has_topk or has_support):
        raise ValueError(
            "the top-k vOPD baseline needs the teacher's top-k, hidden states or scores at the "
            "student's top-k ids"
        )
    chunks_N: list[TokenStats] = []
    for lo in range(0, ids_N.shape[0], chunk_rows):
        rows = slice(lo, lo + chunk_rows)
        student_logits = (
            student_hidden_NH[rows].float() @ student_weight_VH.float().T
        ) / temperature
        teacher_logits = None
        if has_full:
            teacher_logits = teacher_hidden_NH[rows].float() @ teacher_weight_VH.float().T
            teacher_logits = teacher_logits / teacher_temperature
        topk = (
            (teacher_topk_ids_NK[rows].long(), teacher_topk_logprobs_NK[rows].float())
            if has_topk
            else None
        )
        support = (
            (teacher_support_ids_NK[rows].long(), teacher_support_logprobs_NK[rows].float())
            if has_support
            else None
        )
        baseline_inputs = (teacher_logits, topk, support, baseline_top_k)
        stats_N = _chunk_stats(
            student_logits, ids_N[rows].long(), teacher_logits, topk, baseline, baseline_inputs, jsd
        )
        chunks_N.append(stats_N)
    return TokenStats.cat(chunks_N)


def _chunk_stats(
    student_logits, ids, teacher_logits, topk, baseline, baseline_inputs, jsd
) -> TokenStats:
    logprob, entropy = sampled_logprob_entropy(student_logits, ids)
    reverse_kl = topk_mass = baseline_kl = jsd_values = None
    if teacher_logits is not None:
        reverse_kl = full_divergence(student_logits, teacher_logits, kind="reverse_kl")
    elif topk is not None:
        reverse_kl = topk_divergence(student_logits, *topk, kind="reverse_kl", tail=True)
    if topk is not None:
        topk_mass = _support_mass(student_logits, *topk)
    if baseline == Baseline.FULL:
        baseline_kl = reverse_kl
    elif baseline == Baseline.TOPK:
        baseline_kl = _student_topk_kl(student_logits, *baseline_inputs)
    if jsd:
        jsd_values = (
            full_divergence(student_logits, teacher_logits, kind="jsd", beta=0.5)
            if teacher_logits is not None
            else topk_divergence(student_logits, *topk, kind="jsd", beta=0.5, tail=False)
        )
    return TokenStats(
        logprob=logprob, entropy=entropy, reverse_kl=reverse_kl, topk_mass=topk_mass,
        baseline_kl=baseline_kl, jsd=jsd_values,
    )  # fmt: skip


def _student_topk_kl(student_logits, teacher_logits, topk, support, k):
    """KL on the student's top-k, both distributions renormalised there (vOPD's top-k V_t).

    With the teacher's logits at hand, or its scores at the student's top-k ids (`support`, from
    a teacher that scores candidates), its values on the student's ids are exact; otherwise a
    remote teacher only returned its own top-k, and ids outside it share its tail mass uniformly.
    """
    k = min(k, student_logits.shape[-1])
    if teacher_logits is None and support is not None:
        support_ids, support_logprobs = support
        assert support_ids.shape[-1] >= k, "the support holds the student's top baseline_top_k"
        return topk_divergence(
            student_logits, support_ids[:, :k], support_logprobs[:, :k], kind="reverse_kl",
            tail=False,
        )  # fmt: skip
    if teacher_logits is None:
        return topk_divergence(
            student_logits, *topk, kind="reverse_kl", support="student", tail=False,
            student_top_k=k,
        )  # fmt: skip
    support_ids = student_logits.topk(k, dim=-1).indices
    teacher_at_support = torch.log_softmax(teacher_logits, -1).gather(-1, support_ids)
    return topk_divergence(
        student_logits, support_ids, teacher_at_support, kind="reverse_kl", tail=False
    )


def _support_mass(student_logits, topk_ids, topk_logprobs):
    """The student's probability mass on the teacher's (valid) top-k ids."""
    logprobs = torch.log_softmax(student_logits, -1).gather(-1, topk_ids)
    logprobs = logprobs.masked_fill(torch.isinf(topk_logprobs), float("-inf"))
    return torch.logsumexp(logprobs, -1).exp()


def teacher_topk_at(scores: TeacherScores, rows: slice, keep: torch.Tensor, device):
    """The teacher's top-k at the kept positions of `rows`, or (None, None)."""
    if scores.top_k == 0:
        return None, None
    keep = keep.cpu()
    ids = scores.topk_ids_BTK[rows][keep].to(device)
    return ids, scores.topk_logprobs_BTK[rows][keep].to(device)
