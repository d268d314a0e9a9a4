"""Vanilla on-policy distillation advantage (METHODS.md section 1; Thinking Machines, tinker).

    d_t = lp_old[t] - lp_teacher[t]            sampled-token reverse-KL estimate (k1), detached
    A_t = w * A_outcome[i] - c * d_t           A_outcome: group-normalised outcome reward (RLVR)
    A_t <- sum_{u >= t} gamma^(u - t) A_u       optional discount over the completion (gamma = 0)

The trainer hands `A_t` to the GRPO surrogate `-exp(lp_s - lp_old) * A_t`, whose gradient is
`-A_t * grad lp_s` at the sampled token: the student is pushed up where the teacher likes its token
more than the student did, and down where it likes it less.

Test: `pytest tests/unit/test_vanilla_opd.py`.
"""

from __future__ import annotations

import torch


def vanilla_opd_advantage(
    student_old_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    completion_mask_BT: torch.Tensor,
    *,
    kl_coef: float = 1.0,
    outcome_advantage_B: torch.Tensor | None = None,
    outcome_weight: float = 0.0,
    discount: float = 0.0,
) -> torch.Tensor:
    """Per-token advantage of vanilla OPD.

    Args:
        student_old_logprobs_BT: float [B, T] behaviour-policy logprob of each sampled token.
        teacher_logprobs_BT: float [B, T] teacher logprob of the same tokens.
        completion_mask_BT: [B, T] 1 on tokens that count, 0 elsewhere.
        kl_coef: c, the weight of the distillation term.
        outcome_advantage_B: float [B] outcome advantage per completion (None: no outcome term).
        outcome_weight: w, the weight of the outcome term.
        discount: gamma in [0, 1); 0 keeps the advantage per token.

    Returns:
        float32 [B, T] detached advantages, 0 where the mask is 0.
    """
    mask_BT = completion_mask_BT.float()
    reverse_kl_BT = (student_old_logprobs_BT.float() - teacher_logprobs_BT.float()).detach()
    advantages_BT = -kl_coef * reverse_kl_BT
    if outcome_advantage_B is not None and outcome_weight != 0.0:
        advantages_BT = advantages_BT + outcome_weight * outcome_advantage_B.float()[:, None]
    advantages_BT = advantages_BT * mask_BT
    if discount > 0.0:
        advantages_BT = discounted_future_sum(advantages_BT, discount) * mask_BT
    return advantages_BT


def discounted_future_sum(values_BT: torch.Tensor, discount: float) -> torch.Tensor:
    """`out[t] = sum_{u >= t} discount^(u - t) * values[u]` along the last dimension."""
    out_BT = torch.zeros_like(values_BT)
    running_B = torch.zeros_like(values_BT[:, 0])
    for t in range(values_BT.shape[1] - 1, -1, -1):
        running_B = values_BT[:, t] + discount * running_B
        out_BT[:, t] = running_B
    return out_BT


def masked_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    mask_BT = mask_BT.float()
    return float((values_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1.0))
