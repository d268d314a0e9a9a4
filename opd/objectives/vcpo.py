"""VCPO, the pure parts: ESS-scaled learning rate and the off-policy minimum-variance baseline.

VCPO (Variance Controlled Policy Optimization; Huang, Zhang, Hu, Yang, Han, "Stable Asynchrony:
Variance-Controlled Off-Policy RL for LLMs", arXiv:2602.17616; authors' code
github.com/mit-han-lab/vcpo) stabilises training on stale rollouts with two controls
(METHODS.md s.10). With importance weights w_i = pi_theta(x_i) / pi_sampler(x_i) of the N samples
of one optimizer step:

1. ESS-guided step size. The normalised effective sample size

       rho_ess = ESS / N = (sum_i w_i)^2 / (N * sum_i w_i^2)        in (0, 1]

   (1 for equal weights, 1/N when one sample carries all the weight) scales the LEARNING RATE:

       lr_eff = lr * max(min_scale, min(1, rho_ess) ** power),   power = 0.5, min_scale = 0

   The square root is the authors' default (README: "following sqrt scaling for AdamW-style
   optimizers", i.e. Adam's square-root batch-size rule, Malladi et al. arXiv:2205.10287; code:
   `verl/workers/actor/megatron_actor.py::_optimizer_step_with_buffer`, config
   `ess_scaling.scaling_rule: sqrt`, "linear" is the alternative, i.e. power = 1). Their code caps
   the multiplier at 1 (`min(1, rho_ess / base_ess_ratio)`, `base_ess_ratio: 1.0`) and has no
   floor, hence min_scale = 0 here; a floor is offered because a step with rho_ess -> 0 is
   otherwise skipped. Their rho_ess uses the unclipped sequence weights over the whole minibatch
   (`ess_scaling.use_clipped: false`). The lr, not the loss, is scaled: Adam divides the first
   moment by the root of the second, so a constant factor on the loss cancels (up to eps), while
   a factor on the lr moves the update by exactly that factor. `LearningRateScale` applies the
   factor through optimizer step hooks, as the authors set `param_group["lr"]` before `step()` and
   restore it after.

2. Off-policy optimal baseline (OPOB). For the IS-weighted score-function estimator
   g_hat = (1/N) sum_i w_i (R_i - b) grad log pi(x_i), the constant b minimising its variance
   (second moment sum_i w_i^2 (R_i - b)^2 ||grad log pi(x_i)||^2) is, in the authors' form
   (README; `recipe/fully_async_policy/staleness_utils.py::compute_opob_baseline`),

       b* = sum_i w_i^2 ||g_i||^2 R_i / sum_i w_i^2 ||g_i||^2.

   The per-sample gradient norms ||g_i||^2 need one backward pass per sample; this module takes
   them equal (the brief's simplification), which leaves

       b = sum_i w_i^2 R_i / sum_i w_i^2,

   computed per group of `group_size` rows (the authors' default scope is the prompt group,
   `grad_baselining.scope: group`) or over the whole batch. For the dense per-token reward of
   OPD each valid token is one sample i (its own w_t, r_t); pass a sequence-level log weight
   broadcast over the row's tokens for the authors' trajectory weights. With equal weights b
   reduces to the plain masked mean (the GRPO/vOPD group-mean baseline).

Not here (needs the trainer): logging rho_ess each step, per-sample gradient norms.

Test: `pytest -n 0 tests/unit/test_vcpo.py`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# Tolerance above 1 accepted (and clamped) for an ESS fraction computed in floating point.
_ESS_ROUNDOFF = 1e-6


def ess_fraction(log_weights_N: torch.Tensor) -> float:
    """Normalised effective sample size rho = (sum w)^2 / (N * sum w^2) of w = exp(log_weights).

    Computed in log space, log rho = 2 * logsumexp(lw) - logsumexp(2 lw) - log N, so weights
    that overflow or underflow in linear space (sequence ratios exp(sum of token log ratios))
    are handled; rho is invariant to a common factor on the weights.

    Args:
        log_weights_N: float [N] (any shape; flattened) log importance weights; -inf is a zero
            weight, NaN and +inf are rejected.

    Returns:
        rho in (0, 1]; 1.0 for N = 0 (no evidence against the step); 0.0 when every weight is 0.
    """
    lw_N = log_weights_N.detach().flatten().double()
    n = lw_N.numel()
    if n == 0:
        return 1.0
    assert not torch.isnan(lw_N).any(), "NaN log importance weight"
    assert not torch.isposinf(lw_N).any(), "+inf log importance weight"
    if torch.isneginf(lw_N).all():
        return 0.0
    log_rho = 2.0 * torch.logsumexp(lw_N, 0) - torch.logsumexp(2.0 * lw_N, 0) - math.log(n)
    return min(1.0, math.exp(log_rho.item()))


def ess_lr_scale(ess_fraction: float, *, power: float = 0.5, min_scale: float = 0.0) -> float:
    """Learning-rate multiplier max(min_scale, min(1, rho) ** power) for an ESS fraction rho.

    Defaults are the authors': power 0.5 ("sqrt" rule; 1.0 is their "linear" rule) and no floor.

    Args:
        ess_fraction: rho in [0, 1] from `ess_fraction` (values up to 1 + 1e-6 are round-off).
        power: exponent on rho, >= 0 (0 disables the scaling).
        min_scale: floor of the multiplier, in [0, 1].

    Returns:
        The multiplier, in [min_scale, 1], non-decreasing in rho.

    Raises:
        ValueError: rho, power or min_scale out of range.
    """
    if not 0.0 <= ess_fraction <= 1.0 + _ESS_ROUNDOFF:
        raise ValueError(f"ess_fraction must lie in [0, 1], got {ess_fraction}")
    if not power >= 0.0:
        raise ValueError(f"ESS lr power must be >= 0, got {power}")
    if not 0.0 <= min_scale <= 1.0:
        raise ValueError(f"ESS lr min_scale must lie in [0, 1], got {min_scale}")
    return max(min_scale, min(1.0, ess_fraction) ** power)


def min_variance_baseline_BT(
    rewards_BT: torch.Tensor,
    log_weights_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    group_size: int | None = None,
) -> torch.Tensor:
    """Detached off-policy minimum-variance baseline of each token (gradient norms taken equal).

        b_g = sum_{(b,t) in g, mask=1} w_bt^2 r_bt / sum_{(b,t) in g, mask=1} w_bt^2,
        w_bt = exp(log_weights_BT[b, t]),

    over the masked tokens of each group g of `group_size` consecutive rows (None: one group,
    the whole batch), broadcast to those tokens. Weights are shifted by the group's largest log
    weight before exponentiating (b is invariant to a common factor), so no overflow.

    Args:
        rewards_BT: float [B, T] per-token reward r_t (OPD: the dense teacher-student reward).
        log_weights_BT: float [B, T] log importance weights log w_t (values where mask is 0 are
            ignored, even NaN or inf).
        mask_BT: [B, T] 1 on completion tokens, 0 elsewhere.
        group_size: rows per group (e.g. completions per prompt); must divide B.

    Returns:
        float [B, T] (rewards' dtype), detached: b of the token's group; 0 where mask is 0 and
        in a group with no masked-in token.

    Raises:
        ValueError: group_size not a positive divisor of B.
    """
    assert rewards_BT.shape == log_weights_BT.shape == mask_BT.shape, "baseline inputs differ"
    n_rows, n_cols = rewards_BT.shape
    rows = n_rows if group_size is None else group_size
    if rows <= 0 or n_rows % rows != 0:
        raise ValueError(f"group_size must be a positive divisor of the batch {n_rows}, got {rows}")
    valid_GN = mask_BT.detach().bool().reshape(-1, rows * n_cols)
    r_GN = rewards_BT.detach().reshape(-1, rows * n_cols)
    # -inf on masked-out tokens: they drop out of the max and get weight exp(-inf) = 0, and a
    # NaN/inf written there by padding cannot leak in (NaN * 0 would).
    lw_GN = torch.where(valid_GN, log_weights_BT.detach().reshape(valid_GN.shape), -math.inf)
    lw_max_G1 = lw_GN.amax(dim=1, keepdim=True).clamp_min(torch.finfo(lw_GN.dtype).min)
    w2_GN = torch.exp(2.0 * (lw_GN - lw_max_G1))
    r_GN = torch.where(valid_GN, r_GN, 0.0)
    w2_sum_G = w2_GN.sum(dim=1)
    b_G = (w2_GN * r_GN).sum(dim=1) / w2_sum_G.clamp_min(torch.finfo(w2_GN.dtype).tiny)
    b_GN = torch.where(valid_GN, b_G[:, None].to(rewards_BT.dtype), 0.0)
    return b_GN.reshape(n_rows, n_cols)


class LearningRateScale:
    """Scales every param group's lr of a torch optimizer by `scale` for the optimizer steps
    taken while it is set, through optimizer step pre/post hooks (register_step_pre_hook /
    register_step_post_hook): lr is multiplied before step() and restored after, so an LR
    scheduler that later rewrites lr is not disturbed and the scale never compounds.

    Use: `lr_scale = LearningRateScale(optimizer)`; each step, `lr_scale.scale =
    ess_lr_scale(ess_fraction(log_weights_N))` before `optimizer.step()`. The optimizer's
    `param_groups` (and so its state_dict and the scheduler) only ever see the unscaled lr.
    A step that raises leaves the scaled lr in place (the post hook does not run).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.scale = 1.0
        # The lr of each param group as it was before the current step; None outside a step.
        self._saved_lrs: list[Any] | None = None
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._saved_lrs = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * self.scale

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        assert self._saved_lrs is not None, "step post hook without its pre hook"
        for group, lr in zip(optimizer.param_groups, self._saved_lrs, strict=True):
            group["lr"] = lr
        self._saved_lrs = None

    def remove(self) -> None:
        """Detach both hooks; later steps use the optimizer's lr unscaled."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
