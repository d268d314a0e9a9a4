"""The one advantage composer every family-A method is a configuration of (METHODS.md s.1-4, 8).

    opd_t = lam * (lp_t - lp_ref) - (lp_old - lp_ref)      G-OPD; lam = 1 is vanilla OPD
    A_t   = w_rl * A_outcome[i] + w_opd * (opd_t - V_t)     V_t: vOPD baseline (-KL_t), else 0
    A_t  <- sum_{u>=t} gamma^(u-t) A_u                      optional discount
    A_t  <- A_t * weight_t * m_t                            token weights (SOD, ...) and mask

Per-sample weightings that need correctness (SCOPE, Uni-OPD) act on `opd_t` between the two
functions (`opd/objectives/weightings.py`); token selection (TIP) acts on the loss mask, not here.
Everything is detached: advantages are constants of the surrogate `-rho_t * A_t`.

Per-term masks (TRACE, METHODS.md s.11): `TermMasks` routes each token to the terms that train
it: the outcome policy gradient (`w_rl * A_outcome`), the sampled-token distillation term (the
reverse-KL channel, `w_opd * (opd_t - V_t)`) and the family-B divergence of the loss phase (the
forward-KL channel, weighted per token by `forward_kl_BT`). Without them every term uses the one
mask `m_t`; all-ones term masks give bit-identical advantages.

Test: `pytest tests/unit/test_compose.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.objectives.vanilla import discounted_future_sum


def opd_term(
    student_old_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    *,
    lam: float = 1.0,
    reference_logprobs_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """`lam * (lp_t - lp_ref) - (lp_old - lp_ref)`, float32 [B, T], detached.

    With lam = 1 the reference cancels and is not needed: the result is exactly `lp_t - lp_old`,
    computed without it so that G-OPD at lam = 1 is bit-identical to vanilla OPD.
    """
    old_BT = student_old_logprobs_BT.detach().float()
    teacher_BT = teacher_logprobs_BT.detach().float()
    if lam == 1.0:
        return teacher_BT - old_BT
    if reference_logprobs_BT is None:
        raise ValueError("opd_lambda != 1 needs the reference model's logprobs (lp_ref).")
    reference_BT = reference_logprobs_BT.detach().float()
    return lam * (teacher_BT - reference_BT) - (old_BT - reference_BT)


@dataclass(frozen=True)
class TermMasks:
    """Float `[B, T]` weights in [0, 1] per loss term (TRACE's token routing); each is also
    multiplied by the completion mask."""

    outcome_BT: torch.Tensor
    """Where the outcome policy gradient (GRPO's advantage) trains."""
    reverse_kl_BT: torch.Tensor
    """Where the sampled-token distillation term (reverse KL, `opd_t - V_t`) trains."""
    forward_kl_BT: torch.Tensor
    """Where the family-B divergence term trains (the loss phase's per-token weight)."""


def compose_advantage(
    opd_term_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    kl_coef: float = 1.0,
    baseline_BT: torch.Tensor | None = None,
    outcome_advantage_B: torch.Tensor | None = None,
    outcome_weight: float = 0.0,
    discount: float = 0.0,
    token_weight_BT: torch.Tensor | None = None,
    term_masks: TermMasks | None = None,
) -> torch.Tensor:
    """Per-token advantage, float32 [B, T], detached, 0 where the mask is 0.

    Args:
        opd_term_BT: the distillation reward per token (`opd_term`, possibly reweighted).
        mask_BT: 1 on tokens that count.
        kl_coef: w_opd, the weight of the distillation term.
        baseline_BT: V_t, a state-only value subtracted from the distillation term (vOPD:
            V_t = -KL_t). Any detached state-only baseline leaves the expected gradient unchanged.
        outcome_advantage_B: group-normalised outcome advantage per completion (RLVR).
        outcome_weight: w_rl.
        discount: gamma in [0, 1).
        token_weight_BT: multiplies the final advantage (SOD step weights, ...).
        term_masks: TRACE: the distillation term trains where `reverse_kl_BT` says, the outcome
            term where `outcome_BT` says (the forward-KL channel is the loss phase's). The
            discount, if any, runs over the routed sum.
    """
    mask_BT = mask_BT.float()
    distill_BT = opd_term_BT.detach().float()
    if baseline_BT is not None:
        distill_BT = distill_BT - baseline_BT.detach().float()
    advantages_BT = kl_coef * distill_BT
    if term_masks is not None:
        advantages_BT = advantages_BT * term_masks.reverse_kl_BT.float()
    if outcome_advantage_B is not None and outcome_weight != 0.0:
        outcome_BT = outcome_weight * outcome_advantage_B.detach().float()[:, None]
        if term_masks is not None:
            outcome_BT = outcome_BT * term_masks.outcome_BT.float()
        advantages_BT = advantages_BT + outcome_BT
    advantages_BT = advantages_BT * mask_BT
    if discount > 0.0:
        advantages_BT = discounted_future_sum(advantages_BT, discount) * mask_BT
    if token_weight_BT is not None:
        advantages_BT = advantages_BT * token_weight_BT.detach().float()
    return advantages_BT
