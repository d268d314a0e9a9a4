"""The policy-gradient surrogate of family A, per kept token, and its reduction to a scalar.

    on-policy tokens:   plain  -exp(lp_s - lp_old) * A                  (OPD default, unclipped)
                        ppo    -min(rho * A, clip(rho, 1 - eps_lo, 1 + eps_hi) * A)
                               (TRL's `delta`: rho in the first term capped at delta, which
                               bounds the loss of a negative advantage: two-sided clipping)
                        cispo  -sg(min(rho, eps_hi)) * A * lp_s
    off-policy tokens:  -f(p) * A,  f(p) = p / (p + gamma),  p = exp(lp_s)   (LUFFY, never clipped)

Every form has gradient `-A * grad lp_s` at rho = 1. LUFFY's shaping replaces the ratio on tokens
of a trace the student did not sample (its behaviour probability is taken as 1): `f'(p) =
gamma / (p + gamma)^2` lifts the gradient of low-probability tokens, which the plain ratio would
almost ignore. Tokens arrive flattened (`_N`): only the positions the loss keeps (TIP) exist.

Test: `pytest tests/unit/test_surrogate.py`.
"""

from __future__ import annotations

import torch

from opd.types import Ratio


def policy_loss_N(
    logprobs_N: torch.Tensor,
    old_logprobs_N: torch.Tensor,
    advantages_N: torch.Tensor,
    *,
    ratio: Ratio = Ratio.PLAIN,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    offpolicy_N: torch.Tensor | None = None,
    trace_gamma: float = 0.1,
) -> torch.Tensor:
    """Per-token surrogate loss [N] (differentiable through `logprobs_N` only).

    `delta` (ppo only) is TRL's two-sided clipping: `-min(min(rho, delta) * A, clip(rho) * A)`.
    """
    advantages_N = advantages_N.detach()
    rho_N = torch.exp(logprobs_N - old_logprobs_N.detach())
    if ratio == Ratio.PLAIN:
        loss_N = -rho_N * advantages_N
    elif ratio == Ratio.PPO:
        clipped_N = rho_N.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
        capped_N = rho_N if delta is None else rho_N.clamp(max=delta)
        loss_N = -torch.minimum(capped_N * advantages_N, clipped_N * advantages_N)
    elif ratio == Ratio.CISPO:
        loss_N = -rho_N.clamp(max=epsilon_high).detach() * advantages_N * logprobs_N
    else:
        raise ValueError(f"ratio={ratio!r} is not one of {', '.join(Ratio)}")
    if offpolicy_N is not None and bool(offpolicy_N.any()):
        shaped_N = luffy_shaped_loss_N(logprobs_N, advantages_N, gamma=trace_gamma)
        loss_N = torch.where(offpolicy_N.bool(), shaped_N, loss_N)
    return loss_N


def luffy_shaped_loss_N(
    logprobs_N: torch.Tensor, advantages_N: torch.Tensor, *, gamma: float
) -> torch.Tensor:
    """LUFFY's loss of trace tokens: `-f(p) * A`, `f(p) = p / (p + gamma)`, never clipped."""
    prob_N = torch.exp(logprobs_N)
    return -(prob_N / (prob_N + gamma)) * advantages_N.detach()


def reference_kl_N(
    logprobs_N: torch.Tensor,
    reference_logprobs_N: torch.Tensor,
    old_logprobs_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """k3 estimate of KL(pi_s || pi_ref) per token (TRL's `beta` term; StableOPD's anchor).

    With `old_logprobs_N` (TRL's `use_bias_correction_kl`) the estimate is multiplied by the
    importance ratio `exp(lp_s - lp_old)`, not detached, as TRL does.
    """
    delta_N = reference_logprobs_N.detach() - logprobs_N
    kl_N = torch.exp(delta_N) - delta_N - 1.0
    if old_logprobs_N is not None:
        kl_N = kl_N * torch.exp(logprobs_N - old_logprobs_N.detach())
    return kl_N


def reduce_loss(
    loss_N: torch.Tensor,
    row_N: torch.Tensor,
    num_rows: int,
    *,
    loss_type: str,
    max_completion_length: int,
    token_normalizer: float | None = None,
) -> torch.Tensor:
    """Scalar loss with TRL's normalisation for `loss_type` (per optimizer micro-batch).

    grpo: mean over each row's kept tokens, then over rows. bnpo: mean over kept tokens, or
    sum / `token_normalizer` when given (the kept tokens of the micro-batch on all processes).
    dr_grpo: sum / (rows * max_completion_length) (LUFFY's "divided by the max length").
    dapo / cispo: sum / `token_normalizer` (the kept tokens of the whole generation batch,
    scaled to one micro-batch as TRL does), so every token weighs the same across micro-batches.
    """
    if loss_type == "grpo":
        sums_B = torch.zeros(num_rows, dtype=loss_N.dtype, device=loss_N.device)
        counts_B = torch.zeros_like(sums_B)
        sums_B = sums_B.index_add(0, row_N, loss_N)
        counts_B = counts_B.index_add(0, row_N, torch.ones_like(loss_N))
        return (sums_B / counts_B.clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        if token_normalizer is not None:  # the micro-batch's kept tokens on all processes
            return loss_N.sum() / token_normalizer
        return loss_N.sum() / max(loss_N.numel(), 1)
    if loss_type == "dr_grpo":
        return loss_N.sum() / (num_rows * max_completion_length)
    if loss_type in ("dapo", "cispo"):
        if token_normalizer is None:
            raise ValueError("loss_type dapo/cispo needs the batch token count")
        return loss_N.sum() / token_normalizer  # > 0: the caller clamps the count first
    raise ValueError(
        f"loss_type={loss_type!r} is not supported by opd's loss; use grpo, bnpo, dr_grpo, dapo "
        "or cispo."
    )
