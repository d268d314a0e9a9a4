"""The per-token surrogate (plain, PPO, CISPO, LUFFY shaping), TRL's reductions and the k3 KL.

Hand-computed on 2 sequences x 3 tokens, flattened to the kept tokens (`_N`).
"""

from __future__ import annotations

import math

import pytest
import torch

from opd.objectives.surrogate import policy_loss_N, reduce_loss, reference_kl_N

ADVANTAGES_N = torch.tensor([0.5, -0.5, 1.0, -1.0, 0.5])
ROWS_N = torch.tensor([0, 0, 0, 1, 1])  # row 1's third token is masked (not kept)


def test_plain_ratio_at_the_first_update_has_gradient_minus_advantage():
    logprobs = torch.log(torch.tensor([0.5, 0.25, 0.8, 0.1, 0.9])).requires_grad_(True)
    loss = policy_loss_N(logprobs, logprobs.detach(), ADVANTAGES_N)
    torch.testing.assert_close(loss.detach(), -ADVANTAGES_N)  # rho = 1
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, -ADVANTAGES_N)  # d(-rho A)/d lp = -rho A


def test_ppo_ratio_is_clipped_in_the_direction_of_the_advantage():
    # rho = [1.5, 0.5]: with A = +1 the clip caps 1.5 at 1.2 (loss -1.2, no gradient);
    # with A = -1, rho 0.5 is below 0.8: min(-0.5, -0.8) = -0.8 -> loss 0.8, no gradient.
    old = torch.zeros(2)
    logprobs = torch.log(torch.tensor([1.5, 0.5])).requires_grad_(True)
    loss = policy_loss_N(logprobs, old, torch.tensor([1.0, -1.0]), ratio="ppo")
    torch.testing.assert_close(loss.detach(), torch.tensor([-1.2, 0.8]))
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.zeros(2))


def test_cispo_uses_the_detached_clamped_ratio_times_logprob():
    # rho = [2.0, 0.5], eps_high = 1.2: weight = [1.2, 0.5]; loss = -w * A * lp
    old = torch.zeros(2)
    logprobs = torch.log(torch.tensor([2.0, 0.5])).requires_grad_(True)
    advantages = torch.tensor([1.0, 2.0])
    loss = policy_loss_N(logprobs, old, advantages, ratio="cispo", epsilon_high=1.2)
    expected = torch.tensor([-1.2 * math.log(2.0), -0.5 * 2.0 * math.log(0.5)])
    torch.testing.assert_close(loss.detach(), expected)
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([-1.2, -1.0]))


@pytest.mark.parametrize("ratio", ["plain", "ppo", "cispo"])
def test_luffy_offpolicy_tokens_get_gamma_over_p_plus_gamma_squared_gradients(ratio):
    # Off-policy tokens: loss = -A * p / (p + gamma), so d loss / d p = -A * gamma / (p + gamma)^2
    # whatever the on-policy ratio form, and no clipping even far from rho = 1.
    gamma = 0.1
    probs = torch.tensor([0.01, 0.3, 0.9, 0.05, 0.6], requires_grad=True)
    offpolicy = torch.tensor([True, True, True, False, False])
    old = torch.full((5,), -5.0)  # rho far from 1: would be clipped for ppo on-policy tokens
    loss = policy_loss_N(torch.log(probs), old, ADVANTAGES_N, ratio=ratio,
                         offpolicy_N=offpolicy, trace_gamma=gamma)  # fmt: skip
    loss.sum().backward()
    p = probs.detach()[:3]
    torch.testing.assert_close(probs.grad[:3], -ADVANTAGES_N[:3] * gamma / (p + gamma) ** 2)
    # hand value for the first token: -0.5 * 0.1 / 0.11^2 = -4.1322...
    assert probs.grad[0].item() == pytest.approx(-0.5 * 0.1 / 0.11**2)
    torch.testing.assert_close(loss.detach()[:3], -ADVANTAGES_N[:3] * p / (p + gamma))


def test_unknown_ratio_is_refused():
    with pytest.raises(ValueError, match="plain"):
        policy_loss_N(torch.zeros(1), torch.zeros(1), torch.zeros(1), ratio="clip")


LOSS_N = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0])


def test_grpo_reduction_is_mean_of_row_means():
    # row 0: (1+2+3)/3 = 2 ; row 1: (4+6)/2 = 5 ; mean = 3.5
    loss = reduce_loss(LOSS_N, ROWS_N, 2, loss_type="grpo", max_completion_length=3)
    assert loss.item() == pytest.approx(3.5)


def test_bnpo_reduction_is_token_mean():
    loss = reduce_loss(LOSS_N, ROWS_N, 2, loss_type="bnpo", max_completion_length=3)
    assert loss.item() == pytest.approx(16.0 / 5)


def test_dr_grpo_reduction_divides_by_rows_times_max_length():
    # LUFFY: sum / (B * L_max) = 16 / (2 * 4) = 2
    loss = reduce_loss(LOSS_N, ROWS_N, 2, loss_type="dr_grpo", max_completion_length=4)
    assert loss.item() == pytest.approx(2.0)


def test_dapo_reduction_divides_by_the_batch_token_count():
    loss = reduce_loss(LOSS_N, ROWS_N, 2, loss_type="dapo", max_completion_length=3,
                       token_normalizer=8.0)  # fmt: skip
    assert loss.item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="token count"):
        reduce_loss(LOSS_N, ROWS_N, 2, loss_type="dapo", max_completion_length=3)


def test_stable_opd_reference_kl_is_k3():
    # k3 = exp(ref - lp) - (ref - lp) - 1; lp = log 0.5, ref = log 0.25: 0.5 + log 2 - 1
    lp = torch.log(torch.tensor([0.5, 0.5]))
    ref = torch.log(torch.tensor([0.25, 0.5]))
    expected = torch.tensor([0.5 + math.log(2.0) - 1.0, 0.0])
    torch.testing.assert_close(reference_kl_N(lp, ref), expected)


def test_ppo_delta_caps_the_ratio_of_negative_advantages():
    """TRL's two-sided clipping on 2 sequences x 3 tokens (eps 0.2, delta 2.5), flattened.

    loss = -min(min(rho, delta) * A, clip(rho, 0.8, 1.2) * A):
    rho 0.5, A -1: min(-0.5, -0.8) -> 0.8 (clipped, no gradient)
    rho 1.0, A -1: -1 both -> 1.0 (gradient -A*rho = 1)
    rho 1.5, A -1: min(-1.5, -1.2) -> 1.5 (gradient 1.5)
    rho 2.0, A +1: min(2.0, 1.2) -> -1.2 (clipped)
    rho 3.0, A -1: min(-2.5, -1.2) -> 2.5 (capped at delta: no gradient; 3.0 without delta)
    rho 4.0, A -.5: min(-1.25, -0.6) -> 1.25 (capped; 2.0 without delta)
    """
    rho = torch.tensor([[0.5, 1.0, 1.5], [2.0, 3.0, 4.0]])
    advantages = torch.tensor([[-1.0, -1.0, -1.0], [1.0, -1.0, -0.5]]).flatten()
    logprobs = torch.log(rho).flatten().requires_grad_(True)
    loss = policy_loss_N(logprobs, torch.zeros(6), advantages, ratio="ppo", delta=2.5)
    torch.testing.assert_close(loss.detach(), torch.tensor([0.8, 1.0, 1.5, -1.2, 2.5, 1.25]))
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([0.0, 1.0, 1.5, 0.0, 0.0, 0.0]))
    without = policy_loss_N(logprobs.detach(), torch.zeros(6), advantages, ratio="ppo")
    torch.testing.assert_close(without, torch.tensor([0.8, 1.0, 1.5, -1.2, 3.0, 2.0]))


def test_bias_corrected_reference_kl_is_k3_times_the_ratio():
    """TRL's use_bias_correction_kl on 2 x 3 tokens with lp_old = lp_ref, r = exp(lp - lp_old):
    k3 = 1/r + ln r - 1, corrected r * k3 = 1 + r ln r - r, gradient d/dlp = r ln r."""
    r = torch.tensor([[0.5, 1.0, 2.0], [4.0, 0.25, 1.0]]).flatten()
    old = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.1, 0.2, 0.3]))
    logprobs = (old + torch.log(r)).requires_grad_(True)
    plain = reference_kl_N(logprobs.detach(), old)
    ln2 = math.log(2.0)
    torch.testing.assert_close(
        plain, torch.tensor([1 - ln2, 0.0, ln2 - 0.5, 2 * ln2 - 0.75, 3 - 2 * ln2, 0.0])
    )
    corrected = reference_kl_N(logprobs, old, old)
    expected = [1 - 0.5 * ln2 - 0.5, 0.0, 2 * ln2 - 1, 8 * ln2 - 3, 0.75 - 0.5 * ln2, 0.0]
    torch.testing.assert_close(corrected.detach(), torch.tensor(expected))
    corrected.sum().backward()
    grad = [-0.5 * ln2, 0.0, 2 * ln2, 8 * ln2, -0.5 * ln2, 0.0]
    torch.testing.assert_close(logprobs.grad, torch.tensor(grad))
