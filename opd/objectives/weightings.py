"""Per-sample and per-token weightings of the OPD term: SCOPE, SOD, Uni-OPD (METHODS.md s.9).

Each function is pure torch on detached inputs and returns float32 [B, T], 0 where the completion
mask is 0. Rows are grouped as the GRPO sampler lays them out: rows [g*G, (g+1)*G) are the G
completions of prompt g (G = group_size), so a per-group statistic is a `view(-1, G)` reduction.
Group sizes are checked at this boundary (ValueError); shapes are asserted.

    SCOPE    A_t = w_i                      correct sample i    (MLE), w_i ∝ ppl_s(i)^(1/tau)
             A_t = w_i (lp_t[t] - lp_old[t]) incorrect sample i (OPD), w_i ∝ ppl_t(i)^(-1/tau)
    SOD      w_t = min((d_1 + eps) / (d_k + eps), 1 + delta)  for t in step k,
             d_k = mean_{t in k} |lp_old[t] - lp_t[t]|
    Uni-OPD  A_t += max(0, delta - gap)  on correct samples of a mixed group,
             gap = mean_correct(mean_t A) - mean_incorrect(mean_t A)

Rows with no valid token take no part in a group's statistics.

Test: `pytest tests/unit/test_weightings.py`.
"""

from __future__ import annotations

import torch


def scope_advantage(
    student_old_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    correct_B: torch.Tensor,
    *,
    group_size: int,
    tau: float = 1.0,
) -> torch.Tensor:
    """SCOPE advantage: route each sample by correctness.

    Correct sample i: `A_t = w_i`. Under the surrogate `-rho_t * A_t` this is weighted MLE on the
    sampled tokens, `w_i = ppl_s(i)^(1/tau)` with `ppl_s(i) = exp(-mean_t lp_old[t])`: the
    completions the student found hardest to produce, yet got right, are reinforced most.
    Incorrect sample i: `A_t = w_i * (lp_t[t] - lp_old[t])`, the vanilla OPD advantage, weighted
    by `w_i = ppl_t(i)^(-1/tau)` with `ppl_t(i) = exp(-mean_t lp_t[t])`: the teacher's signal is
    trusted more on completions the teacher itself finds plausible.

    Normalisation (left open by the paper; this is the reading chosen): within each group the
    weights of the correct samples are divided by their mean, and separately those of the
    incorrect samples by theirs, so each kind has mean weight 1 in its group and the two terms
    keep their scales. Means are over valid tokens; the division is done in log space
    (`w_i = n * exp(log w_i - logsumexp log w)`), which cannot overflow for long completions.

    Args:
        student_old_logprobs_BT: float [B, T] behaviour-policy logprob of each sampled token.
        teacher_logprobs_BT: float [B, T] teacher logprob of the same tokens.
        mask_BT: [B, T] 1 on completion tokens, 0 elsewhere.
        correct_B: bool [B] whether each completion is correct.
        group_size: G; B must be a multiple of it.
        tau: temperature of the perplexity weights (> 0).

    Returns:
        float32 [B, T] detached advantages, 0 where the mask is 0.
    """
    _check_groups(mask_BT.shape[0], group_size)
    if tau <= 0.0:
        raise ValueError(f"SCOPE tau must be > 0, got {tau}")
    assert student_old_logprobs_BT.shape == teacher_logprobs_BT.shape == mask_BT.shape
    assert correct_B.shape == mask_BT.shape[:1], "correct_B must be [B]"
    valid_BT = mask_BT.bool()
    student_old_BT = student_old_logprobs_BT.detach().float()
    teacher_BT = teacher_logprobs_BT.detach().float()
    correct_B = correct_B.bool()
    has_tokens_B = valid_BT.any(-1)
    # log ppl_s^(1/tau) = -mean lp_old / tau;  log ppl_t^(-1/tau) = +mean lp_t / tau.
    log_weight_B = torch.where(
        correct_B,
        -_row_mean(student_old_BT, valid_BT) / tau,
        _row_mean(teacher_BT, valid_BT) / tau,
    )
    weight_B = _normalise_in_group(
        log_weight_B, correct_B & has_tokens_B, group_size
    ) + _normalise_in_group(log_weight_B, ~correct_B & has_tokens_B, group_size)
    signal_BT = torch.where(correct_B[:, None], 1.0, teacher_BT - student_old_BT)
    return torch.where(valid_BT, weight_B[:, None] * signal_BT, 0.0)


def sod_step_weights(
    student_old_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    step_end_BT: torch.Tensor,
    *,
    delta: float = 0.5,
    eps: float = 1e-6,
) -> torch.Tensor:
    """SOD per-token weights: down-weight steps where student and teacher diverge most.

    Steps split each row's valid tokens: a step ends (inclusively) at a valid token whose
    `step_end_BT` is True, and the last step ends at the last valid token. With
    `d_k = mean_{t in k} |lp_old[t] - lp_t[t]|`, step k gets `w_k = min((d_1 + eps) / (d_k + eps),
    1 + delta)`: the first step, before any tool output, sets the scale, later steps that drift
    further from the teacher (often after a surprising tool result) count less, and steps that
    agree better are boosted at most to 1 + delta. A row with a single step gets weight 1.

    Step ends on masked tokens are ignored (steps are spans of valid tokens): mark the last
    generated token before a tool call, not the tool's output.

    Args:
        student_old_logprobs_BT: float [B, T] behaviour-policy logprob of each sampled token.
        teacher_logprobs_BT: float [B, T] teacher logprob of the same tokens.
        mask_BT: [B, T] 1 on completion tokens, 0 elsewhere.
        step_end_BT: bool [B, T] True on the last token of a step.
        delta: the cap is 1 + delta (>= 0).
        eps: smoothing of the ratio (> 0), so that d = 0 steps get a finite weight.

    Returns:
        float32 [B, T] detached weights, 0 where the mask is 0.
    """
    if delta < 0.0 or eps <= 0.0:
        raise ValueError(f"SOD needs delta >= 0 and eps > 0, got delta={delta}, eps={eps}")
    assert (
        student_old_logprobs_BT.shape
        == teacher_logprobs_BT.shape
        == mask_BT.shape
        == step_end_BT.shape
    )
    valid_BT = mask_BT.bool()
    gap_BT = (student_old_logprobs_BT.detach().float() - teacher_logprobs_BT.detach().float()).abs()
    gap_BT = torch.where(valid_BT, gap_BT, 0.0)
    end_BT = (step_end_BT.bool() & valid_BT).long()
    # Exclusive cumulative count of ends: a step's end token still belongs to that step.
    step_BT = end_BT.cumsum(-1) - end_BT
    # At most T steps per row, so a [B, T] buffer indexed by step (K = T) holds every step.
    gap_sum_BK = torch.zeros_like(gap_BT).scatter_add(1, step_BT, gap_BT)
    count_BK = torch.zeros_like(gap_BT).scatter_add(1, step_BT, valid_BT.float())
    divergence_BK = gap_sum_BK / count_BK.clamp(min=1.0)
    weight_BK = ((divergence_BK[:, :1] + eps) / (divergence_BK + eps)).clamp(max=1.0 + delta)
    return torch.where(valid_BT, weight_BK.gather(1, step_BT), 0.0)


def uni_opd_shift(
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    correct_B: torch.Tensor,
    *,
    group_size: int,
    delta: float = 0.1,
) -> torch.Tensor:
    """Uni-OPD: keep correct samples at least `delta` above incorrect ones in each group.

    Per group, `gap = mean_{i correct} a_i - mean_{i incorrect} a_i` with `a_i` the mean
    advantage over sample i's valid tokens. OPD advantages only say how teacher-like a token is,
    so a wrong answer in a fluent style can out-score a right one; when the group holds both kinds
    and `gap < delta`, every valid token advantage of its correct samples is raised by
    `delta - gap`, which makes the gap exactly `delta`. Otherwise nothing changes.

    Args:
        advantages_BT: float [B, T] per-token OPD advantages.
        mask_BT: [B, T] 1 on completion tokens, 0 elsewhere.
        correct_B: bool [B] whether each completion is correct.
        group_size: G; B must be a multiple of it.
        delta: the minimum gap.

    Returns:
        float32 [B, T] detached shifted advantages, 0 where the mask is 0.
    """
    _check_groups(mask_BT.shape[0], group_size)
    assert advantages_BT.shape == mask_BT.shape
    assert correct_B.shape == mask_BT.shape[:1], "correct_B must be [B]"
    valid_BT = mask_BT.bool()
    advantages_BT = torch.where(valid_BT, advantages_BT.detach().float(), 0.0)
    correct_B = correct_B.bool()
    has_tokens_B = valid_BT.any(-1)
    sample_mean_B = _row_mean(advantages_BT, valid_BT)
    correct_mean_G, n_correct_G = _mean_in_group(
        sample_mean_B, correct_B & has_tokens_B, group_size
    )
    wrong_mean_G, n_wrong_G = _mean_in_group(sample_mean_B, ~correct_B & has_tokens_B, group_size)
    mixed_G = (n_correct_G > 0) & (n_wrong_G > 0)
    shift_G = torch.where(mixed_G, (delta - (correct_mean_G - wrong_mean_G)).clamp(min=0.0), 0.0)
    shift_B = shift_G.repeat_interleave(group_size)
    return advantages_BT + torch.where(valid_BT & correct_B[:, None], shift_B[:, None], 0.0)


def _row_mean(values_BT: torch.Tensor, valid_BT: torch.Tensor) -> torch.Tensor:
    """Float [B] mean over each row's valid tokens (0 for an empty row); ignores masked values,
    even -inf or nan ones."""
    total_B = torch.where(valid_BT, values_BT, 0.0).sum(-1)
    return total_B / valid_BT.sum(-1).clamp(min=1)


def _mean_in_group(
    values_B: torch.Tensor, member_B: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [n_groups] mean of `values_B` over each group's members (0 if none), and the counts."""
    member_GS = member_B.view(-1, group_size)
    count_G = member_GS.sum(-1)
    total_G = torch.where(member_GS, values_B.view(-1, group_size), 0.0).sum(-1)
    return total_G / count_G.clamp(min=1), count_G


def _normalise_in_group(
    log_weight_B: torch.Tensor, member_B: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Float [B] weights `exp(log_weight)` divided by their mean over each group's members; 0 for
    non-members. Computed as `n * softmax(log_weight)` over the members of each group."""
    member_GS = member_B.view(-1, group_size)
    log_weight_GS = log_weight_B.view(-1, group_size).masked_fill(~member_GS, float("-inf"))
    # A group with no member has logsumexp -inf and nan weights; torch.where discards them.
    log_total_G1 = torch.logsumexp(log_weight_GS, dim=-1, keepdim=True)
    weight_GS = torch.exp(log_weight_GS - log_total_G1) * member_GS.sum(-1, keepdim=True)
    return torch.where(member_GS, weight_GS, 0.0).view(-1)


def _check_groups(batch_size: int, group_size: int) -> None:
    if group_size < 1 or batch_size % group_size != 0:
        raise ValueError(
            f"batch size {batch_size} is not a multiple of group_size {group_size}: rows "
            "[g*G, (g+1)*G) must be the G completions of prompt g (set group_size to "
            "num_generations)"
        )
