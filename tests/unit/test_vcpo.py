"""VCPO pure parts (METHODS.md s.10): ESS fraction, ESS lr multiplier, the lr hook (Adam cancels a
loss scale but not an lr scale), and the off-policy minimum-variance baseline on a 4x3 batch."""

from __future__ import annotations

import math

import pytest
import torch

from opd.objectives.vcpo import (
    LearningRateScale,
    ess_fraction,
    ess_lr_scale,
    min_variance_baseline_BT,
)

# ---------------------------------------------------------------- ESS fraction and lr multiplier


def test_ess_fraction_hand_values():
    # w = [1, 1, 2]: (1 + 1 + 2)^2 / (3 * (1 + 1 + 4)) = 16 / 18.
    assert ess_fraction(torch.log(torch.tensor([1.0, 1.0, 2.0]))) == pytest.approx(16 / 18)
    # Equal weights: (N w)^2 / (N * N w^2) = 1, whatever w.
    assert ess_fraction(torch.full((5,), -3.7)) == pytest.approx(1.0)
    # One weight carries everything (others are 0): 1 / (N * 1) = 1/4.
    lw = torch.tensor([0.0, -math.inf, -math.inf, -math.inf])
    assert ess_fraction(lw) == pytest.approx(0.25)
    assert ess_fraction(torch.empty(0)) == 1.0
    assert ess_fraction(torch.full((3,), -math.inf)) == 0.0


def test_ess_fraction_is_stable_for_extreme_log_weights():
    # Log weights [800, 800, 801] (exact in fp32; exp(800) overflows even fp64), i.e. weights
    # e^800 * [1, 1, e]: rho = (2 + e)^2 / (3 * (2 + e^2)) = 22.2622 / 28.1672 = 0.79036.
    expected = (2 + math.e) ** 2 / (3 * (2 + math.e**2))
    assert ess_fraction(torch.tensor([800.0, 800.0, 801.0])) == pytest.approx(expected)
    assert ess_fraction(torch.tensor([-800.0, -800.0, -799.0])) == pytest.approx(expected)


def test_ess_lr_scale_sqrt_default_monotone_and_clamped():
    # Authors' default: sqrt(rho), capped at 1, no floor.
    assert ess_lr_scale(0.25) == pytest.approx(0.5)  # sqrt(0.25)
    assert ess_lr_scale(0.01) == pytest.approx(0.1)  # sqrt(0.01)
    assert ess_lr_scale(1.0) == 1.0
    assert ess_lr_scale(1.0 + 1e-7) == 1.0  # round-off above 1 is clamped
    assert ess_lr_scale(0.0) == 0.0
    rhos = [0.0, 0.01, 0.1, 0.3, 0.5, 0.9, 1.0]
    scales = [ess_lr_scale(rho) for rho in rhos]
    assert scales == sorted(scales)
    # "linear" rule (power 1) and a floor: max(0.2, 0.01) = 0.2, max(0.2, 0.5) = 0.5.
    assert ess_lr_scale(0.01, power=1.0, min_scale=0.2) == pytest.approx(0.2)
    assert ess_lr_scale(0.5, power=1.0, min_scale=0.2) == pytest.approx(0.5)
    # sqrt with a floor: max(0.3, sqrt(0.04) = 0.2) = 0.3.
    assert ess_lr_scale(0.04, min_scale=0.3) == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("rho", "kwargs"),
    [(-0.1, {}), (1.1, {}), (math.nan, {}), (0.5, {"power": -1.0}), (0.5, {"min_scale": 1.5})],
)
def test_ess_lr_scale_rejects_out_of_range(rho, kwargs):
    with pytest.raises(ValueError):
        ess_lr_scale(rho, **kwargs)


# ---------------------------------------------------------------- lr, not loss: the Adam test


def _linear_pair(seed: int = 0) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    torch.manual_seed(seed)
    first = torch.nn.Linear(3, 2)
    second = torch.nn.Linear(3, 2)
    second.load_state_dict(first.state_dict())
    return first, second


def _adam_update(model: torch.nn.Linear, loss_scale: float, lr_scale: float | None) -> torch.Tensor:
    """Parameter change of one Adam step (lr 1e-2) on loss_scale * L, optionally lr-scaled."""
    x_B3 = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1]])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    hook = LearningRateScale(optimizer)
    if lr_scale is not None:
        hook.scale = lr_scale
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    loss = loss_scale * (model(x_B3) ** 2).sum()
    loss.backward()
    optimizer.step()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return after - before


def test_adam_cancels_a_loss_scale_but_not_an_lr_scale():
    reference, loss_scaled = _linear_pair()
    update = _adam_update(reference, loss_scale=1.0, lr_scale=None)
    # First Adam step: m_hat = g, v_hat = g^2, update = -lr * g / (|g| + eps) ≈ -lr * sign(g):
    # scaling the loss by 0.1 scales g and |g| alike, so the update moves only by eps / |g|.
    update_loss_scaled = _adam_update(loss_scaled, loss_scale=0.1, lr_scale=None)
    torch.testing.assert_close(update_loss_scaled, update, rtol=1e-5, atol=1e-8)
    assert torch.allclose(update.abs(), torch.full_like(update, 1e-2), rtol=1e-4)
    # Scaling the lr by 0.1 scales that same update by exactly 0.1 (same g, lr * 0.1); the
    # tolerance is the fp32 rounding of the parameters (|p| < 1, ulp 6e-8) in after - before.
    _, lr_scaled = _linear_pair()
    update_lr_scaled = _adam_update(lr_scaled, loss_scale=1.0, lr_scale=0.1)
    torch.testing.assert_close(update_lr_scaled, 0.1 * update, rtol=0.0, atol=2e-7)
    assert not torch.allclose(update_lr_scaled, update, rtol=0.5)


# ---------------------------------------------------------------- LearningRateScale hook


def _sgd_on_fixed_gradient(lr: float = 1.0):
    """A parameter w whose loss (w * g).sum() has gradient g = [1, -2], and SGD on it."""
    w_2 = torch.nn.Parameter(torch.zeros(2))
    g_2 = torch.tensor([1.0, -2.0])
    optimizer = torch.optim.SGD([w_2], lr=lr)

    def step() -> torch.Tensor:
        optimizer.zero_grad()
        (w_2 * g_2).sum().backward()
        before = w_2.detach().clone()
        optimizer.step()
        return w_2.detach() - before

    return optimizer, step


def test_lr_scale_applies_then_restores_lr():
    optimizer, step = _sgd_on_fixed_gradient(lr=0.5)
    scale = LearningRateScale(optimizer)
    scale.scale = 0.1
    # SGD update = -lr_applied * g = -(0.5 * 0.1) * [1, -2] = [-0.05, 0.1].
    torch.testing.assert_close(step(), torch.tensor([-0.05, 0.1]))
    assert optimizer.param_groups[0]["lr"] == 0.5
    # A second step applies the same 0.05, not 0.5 * 0.1 * 0.1: the scale never compounds.
    torch.testing.assert_close(step(), torch.tensor([-0.05, 0.1]))
    assert optimizer.param_groups[0]["lr"] == 0.5


def test_lr_scale_with_a_lambda_lr_scheduler():
    optimizer, step = _sgd_on_fixed_gradient(lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch)
    scale = LearningRateScale(optimizer)
    # step k: scheduled lr 0.5^k, scale s_k, applied lr 0.5^k * s_k, update -applied * [1, -2].
    for k, s_k in enumerate([0.1, 0.4, 1.0]):
        scale.scale = s_k
        applied = 0.5**k * s_k
        torch.testing.assert_close(step(), torch.tensor([-applied, 2.0 * applied]))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5**k)
        scheduler.step()
    # Scheduler unaffected: after 3 steps its lr is 0.5^3.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.125)
    assert scheduler.get_last_lr() == [pytest.approx(0.125)]


def test_lr_scale_scales_every_param_group():
    a_2 = torch.nn.Parameter(torch.zeros(2))
    b_1 = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [a_2], "lr": 1.0}, {"params": [b_1], "lr": 0.2}])
    LearningRateScale(optimizer).scale = 0.5
    (a_2.sum() + 3.0 * b_1.sum()).backward()  # grads [1, 1] and [3]
    optimizer.step()
    # a: -(1.0 * 0.5) * 1 = -0.5; b: -(0.2 * 0.5) * 3 = -0.3.
    torch.testing.assert_close(a_2.detach(), torch.tensor([-0.5, -0.5]))
    torch.testing.assert_close(b_1.detach(), torch.tensor([-0.3]))
    assert [group["lr"] for group in optimizer.param_groups] == [1.0, 0.2]


def test_lr_scale_remove_detaches_hooks():
    optimizer, step = _sgd_on_fixed_gradient(lr=0.5)
    scale = LearningRateScale(optimizer)
    scale.scale = 0.1
    scale.remove()
    # Full lr: -0.5 * [1, -2].
    torch.testing.assert_close(step(), torch.tensor([-0.5, 1.0]))
    assert not optimizer._optimizer_step_pre_hooks
    assert not optimizer._optimizer_step_post_hooks


# ---------------------------------------------------------------- minimum-variance baseline

# Two groups of 2 rows x 3 tokens; token (3, 2) is masked, and its reward 100 and NaN log weight
# must not leak into group 1's baseline.
REWARDS_BT = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 9.0], [0.0, 1.0, 0.0], [2.0, -1.0, 100.0]])
WEIGHTS_BT = torch.tensor([[1.0, 1.0, 2.0], [2.0, 1.0, 1.0], [1.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
LOG_WEIGHTS_BT = torch.log(WEIGHTS_BT).index_put(
    (torch.tensor(3), torch.tensor(2)), torch.tensor(math.nan)
)
MASK_BT = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0]])


def test_min_variance_baseline_hand_example():
    # Group 0: w^2 = [1, 1, 4, 4, 1, 1], sum 12; sum w^2 r = 1 + 2 + 12 + 16 + 5 + 9 = 45;
    #          b = 45 / 12 = 3.75 (w instead of w^2 would give 31 / 8 = 3.875, the mean 4).
    # Group 1: w^2 = [1, 4, 1, 1, 1] (5 valid), sum 8; sum w^2 r = 0 + 4 + 0 + 2 - 1 = 5;
    #          b = 5 / 8 = 0.625 (w: 3 / 6 = 0.5, the mean 0.4); 0 on the masked token.
    b_BT = min_variance_baseline_BT(REWARDS_BT, LOG_WEIGHTS_BT, MASK_BT, group_size=2)
    expected_BT = torch.tensor(
        [[3.75, 3.75, 3.75], [3.75, 3.75, 3.75], [0.625, 0.625, 0.625], [0.625, 0.625, 0.0]]
    )
    torch.testing.assert_close(b_BT, expected_BT)
    # Whole batch: (45 + 5) / (12 + 8) = 2.5.
    b_all_BT = min_variance_baseline_BT(REWARDS_BT, LOG_WEIGHTS_BT, MASK_BT)
    torch.testing.assert_close(b_all_BT, 2.5 * MASK_BT.float())


def test_min_variance_baseline_equal_weights_is_masked_mean():
    lw_BT = torch.full_like(REWARDS_BT, 0.3)
    b_BT = min_variance_baseline_BT(REWARDS_BT, lw_BT, MASK_BT, group_size=2)
    # Group 0 mean (1+2+3+4+5+9)/6 = 4; group 1 mean (0+1+0+2-1)/5 = 0.4.
    expected_BT = torch.tensor([[4.0] * 3, [4.0] * 3, [0.4] * 3, [0.4, 0.4, 0.0]])
    torch.testing.assert_close(b_BT, expected_BT)
    plain = (REWARDS_BT * MASK_BT).sum() / MASK_BT.sum()
    torch.testing.assert_close(
        min_variance_baseline_BT(REWARDS_BT, lw_BT, MASK_BT), plain * MASK_BT.float()
    )


def test_min_variance_baseline_minimises_the_weighted_second_moment():
    # With equal gradient norms the estimator's second moment is sum_i w_i^2 (r_i - b)^2; its
    # derivative in b must vanish at the returned b (autograd check on random inputs).
    torch.manual_seed(0)
    r_N = torch.randn(7)
    lw_N = torch.randn(7)
    b = min_variance_baseline_BT(r_N[None], lw_N[None], torch.ones(1, 7))[0, 0]
    b_var = b.clone().requires_grad_(True)
    second_moment = (torch.exp(2.0 * lw_N) * (r_N - b_var) ** 2).sum()
    (grad_b,) = torch.autograd.grad(second_moment, b_var)
    assert abs(grad_b.item()) < 1e-4


def test_min_variance_baseline_is_shift_invariant_detached_and_safe_when_empty():
    # Adding 500 to every log weight (exp(1000) overflows) leaves b unchanged; the tolerance is
    # the fp32 rounding of log 2 + 500 (ulp 3e-5).
    shifted = min_variance_baseline_BT(REWARDS_BT, LOG_WEIGHTS_BT + 500.0, MASK_BT, group_size=2)
    base = min_variance_baseline_BT(REWARDS_BT, LOG_WEIGHTS_BT, MASK_BT, group_size=2)
    torch.testing.assert_close(shifted, base, rtol=0.0, atol=1e-4)
    rewards_BT = REWARDS_BT.clone().requires_grad_(True)
    lw_BT = torch.zeros(4, 3, requires_grad=True)
    assert not min_variance_baseline_BT(rewards_BT, lw_BT, MASK_BT).requires_grad
    # A group with no valid token gets 0, not NaN.
    mask_BT = MASK_BT.clone()
    mask_BT[2:] = 0
    b_BT = min_variance_baseline_BT(REWARDS_BT, LOG_WEIGHTS_BT, mask_BT, group_size=2)
    torch.testing.assert_close(b_BT[2:], torch.zeros(2, 3))
    torch.testing.assert_close(b_BT[:2], torch.full((2, 3), 3.75))


def test_min_variance_baseline_rejects_bad_group_size():
    with pytest.raises(ValueError, match="divisor"):
        min_variance_baseline_BT(REWARDS_BT, LOG_WEIGHTS_BT, MASK_BT, group_size=3)
