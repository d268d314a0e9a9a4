"""The off-policy ratio forms (TOPR, DISPO, MinPRO, CTPO, SAPO, BAPO) and the IS statistics.

Hand-computed on one 2 x 3 batch whose last token of row 1 is masked (its logprobs are garbage):
p_s = [[0.5, 0.25, 0.8], [0.2, 0.6, -]], rho = [[2, 0.5, 1.5], [0.5, 4, -]],
A = [[1, -1, -2], [-0.5, 2, -]], correct = [True, False]. Gradients are d loss.sum() / d lp_s.
"""

from __future__ import annotations

import math

import pytest
import torch

from opd.objectives.offpolicy import (
    RatioSettings,
    bapo_clip_bounds,
    effective_sample_size,
    importance_stats,
    offpolicy_surrogate_BT,
)
from opd.types import Ratio

OFFPOLICY = [Ratio.TOPR, Ratio.DISPO, Ratio.MINPRO, Ratio.CTPO, Ratio.SAPO, Ratio.BAPO]
LN = math.log
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
ADVANTAGES = torch.tensor([[1.0, -1.0, -2.0], [-0.5, 2.0, 7.0]])
CORRECT = torch.tensor([True, False])


def _run(ratio, settings=None, correct=CORRECT):
    """The hand batch: lp_s = log p_s, lp_old = lp_s - log rho; garbage under the mask."""
    probs = torch.tensor([[0.5, 0.25, 0.8], [0.2, 0.6, 1.0]])
    rho = torch.tensor([[2.0, 0.5, 1.5], [0.5, 4.0, 1.0]])
    logprobs = torch.log(probs)
    logprobs[1, 2] = -math.inf  # padding: must touch neither values nor gradients
    behaviour = torch.log(probs) - torch.log(rho)
    behaviour[1, 2] = math.nan
    logprobs.requires_grad_(True)
    terms = offpolicy_surrogate_BT(logprobs, behaviour, ADVANTAGES, MASK, correct, ratio=ratio,
                                   settings=settings or RatioSettings())  # fmt: skip
    terms.loss_BT.sum().backward()
    return terms, logprobs.grad


def _check(terms, grad, loss, grad_expected, weight, clipped):
    torch.testing.assert_close(terms.loss_BT.detach(), torch.tensor(loss))
    torch.testing.assert_close(grad, torch.tensor(grad_expected))
    torch.testing.assert_close(terms.weight_BT, torch.tensor(weight))
    assert terms.clipped_BT.tolist() == clipped


def test_topr_hand_example():
    # w = 1 for A >= 0, clip(rho, 0, 1) for A < 0: [[1, 0.5, min(1.5, 1) = 1], [0.5, 1, -]]
    # loss = -w A lp_s: [[-ln .5, 0.5 ln .25, 2 ln .8], [0.25 ln .2, -2 ln .6, 0]]
    # grad = -w A: [[-1, 0.5, 2], [0.25, -2, 0]]; only (0, 2) was truncated (1.5 -> 1)
    terms, grad = _run(Ratio.TOPR)
    _check(terms, grad,
           [[-LN(0.5), 0.5 * LN(0.25), 2 * LN(0.8)], [0.25 * LN(0.2), -2 * LN(0.6), 0.0]],
           [[-1.0, 0.5, 2.0], [0.25, -2.0, 0.0]],
           [[1.0, 0.5, 1.0], [0.5, 1.0, 0.0]],
           [[False, False, True], [False, False, False]])  # fmt: skip


def test_dispo_hand_example_four_regimes():
    # correct rows: w in [1 - 0.2, 1 + 0.5] = [0.8, 1.5]; incorrect: [1 - 0.4, 1 + 1] = [0.6, 2]
    # row 0 (correct): rho [2, 0.5, 1.5] -> [1.5 (up-clip), 0.8 (down-clip), 1.5]
    # row 1 (incorrect): rho [0.5, 4] -> [0.6 (down-clip), 2 (up-clip)]
    # loss = -w A lp_s: [[-1.5 ln .5, 0.8 ln .25, 3 ln .8], [0.3 ln .2, -4 ln .6, 0]]
    settings = RatioSettings(dispo_pos_low=0.2, dispo_pos_high=0.5, dispo_neg_low=0.4,
                             dispo_neg_high=1.0)  # fmt: skip
    terms, grad = _run(Ratio.DISPO, settings)
    _check(terms, grad,
           [[-1.5 * LN(0.5), 0.8 * LN(0.25), 3.0 * LN(0.8)], [0.3 * LN(0.2), -4 * LN(0.6), 0.0]],
           [[-1.5, 0.8, 3.0], [0.3, -4.0, 0.0]],
           [[1.5, 0.8, 1.5], [0.6, 2.0, 0.0]],
           [[True, True, False], [True, True, False]])  # fmt: skip
    # without correct_B the split is the sign of A: A = [[+, -, -], [-, +]]
    # -> w = [[1.5, max(0.5, 0.6) = 0.6, 1.5], [0.6, min(4, 1.5) = 1.5]]
    terms, _ = _run(Ratio.DISPO, settings, correct=None)
    torch.testing.assert_close(terms.weight_BT, torch.tensor([[1.5, 0.6, 1.5], [0.6, 1.5, 0.0]]))


def test_dispo_defaults_are_the_reported_paper_values():
    # [0.8, 11] for correct, [0, 101] for incorrect: only (0, 1) (rho 0.5 < 0.8) is clipped
    terms, _ = _run(Ratio.DISPO)
    torch.testing.assert_close(terms.weight_BT, torch.tensor([[2.0, 0.8, 1.5], [0.5, 4.0, 0.0]]))


def test_minpro_hand_example():
    # w = running min of rho: [[2, min(2, .5) = .5, .5], [.5, .5, -]]; loss = -w A (value = plain's
    # form with the weight), grad = -w A: [[-2, 0.5, 1], [0.25, -1, 0]]
    # clipped where an earlier token set the weight: (0, 2) and (1, 1)
    terms, grad = _run(Ratio.MINPRO)
    _check(terms, grad,
           [[-2.0, 0.5, 1.0], [0.25, -1.0, 0.0]],
           [[-2.0, 0.5, 1.0], [0.25, -1.0, 0.0]],
           [[2.0, 0.5, 0.5], [0.5, 0.5, 0.0]],
           [[False, False, True], [False, True, False]])  # fmt: skip


def test_minpro_weight_is_the_running_minimum():
    log_ratio = torch.tensor([[0.3, -0.2, 0.5, -0.7, 0.1], [-0.1, 0.4, -0.3, 0.2, -0.5]])
    logprobs = torch.full((2, 5), -1.0)
    terms = offpolicy_surrogate_BT(logprobs, logprobs - log_ratio, torch.ones(2, 5),
                                   torch.ones(2, 5), None, ratio=Ratio.MINPRO,
                                   settings=RatioSettings())  # fmt: skip
    expected = torch.exp(torch.cummin(log_ratio, dim=1).values)  # exp(min) = min(exp)
    torch.testing.assert_close(terms.weight_BT, expected)
    torch.testing.assert_close(
        terms.weight_BT[0], torch.exp(torch.tensor([0.3, -0.2, -0.2, -0.7, -0.7]))
    )


def test_ctpo_hand_example_clips_by_position():
    # cumulative log R: row 0 [ln 2, ln 2 + ln .5 = 0, ln 1.5], row 1 [-ln 2, -ln 2 + ln 4 = ln 2]
    # t = [1, 2, 3]; bases 0.5 (low, high), 0.6 (dual); window at t: [-0.5 sqrt t, 0.5 sqrt t]
    # (0,0) A=1, ln 2 = .693 > .5: clipped, value -e^.5, no grad
    # (0,1) A=-1, 0 in [-.707, dual .6 sqrt 2 = .849]: value 1, grad -A R = 1
    # (0,2) A=-2, ln 1.5 = .405 < dual .6 sqrt 3 = 1.039: value 3, grad 3
    # (1,0) A=-.5, -.693 < -.5: clipped at e^-.5, value .5 e^-.5, no grad
    # (1,1) A=2, ln 2 = .693 <= .5 sqrt 2 = .707: kept at t=2 (clipped at t=1): value -4, grad -4
    settings = RatioSettings(ctpo_log_clip_low=0.5, ctpo_log_clip_high=0.5, ctpo_log_clip_dual=0.6)
    terms, grad = _run(Ratio.CTPO, settings)
    _check(terms, grad,
           [[-math.exp(0.5), 1.0, 3.0], [0.5 * math.exp(-0.5), -4.0, 0.0]],
           [[0.0, 1.0, 3.0], [0.0, -4.0, 0.0]],
           [[0.0, 1.0, 1.5], [0.0, 2.0, 0.0]],
           [[True, False, False], [True, False, False]])  # fmt: skip


def test_ctpo_default_windows_are_tight_at_the_first_token():
    # defaults 0.025 / 0.05 / 0.05: every |log R| here but (0, 1)'s 0 passes 0.05 sqrt(t) <= 0.087
    terms, _ = _run(Ratio.CTPO)
    assert terms.clipped_BT.tolist() == [[True, False, True], [True, True, False]]


def test_sapo_hand_example():
    # f = (4 / tau) sigmoid(tau (rho - 1)), tau = 1 for A > 0, 1.05 otherwise; loss = -f A
    # w = f'(rho) rho = 4 s (1 - s) rho, s = sigmoid(tau (rho - 1)); grad = -w A
    def s(x):
        return 1.0 / (1.0 + math.exp(-x))

    cells = [
        (2.0, 1.0, 1.0),
        (0.5, -1.0, 1.05),
        (1.5, -2.0, 1.05),
        (0.5, -0.5, 1.05),
        (4.0, 2.0, 1.0),
    ]
    loss, grad, weight = [], [], []
    for rho, advantage, tau in cells:
        gate = s(tau * (rho - 1.0))
        loss.append(-4.0 / tau * gate * advantage)
        weight.append(4.0 * gate * (1.0 - gate) * rho)
        grad.append(-weight[-1] * advantage)
    terms, grads = _run(Ratio.SAPO)
    _check(terms, grads, [loss[:3], [*loss[3:], 0.0]], [grad[:3], [*grad[3:], 0.0]],
           [weight[:3], [*weight[3:], 0.0]],
           # gated when 4 s (1 - s) < 0.5: only rho = 4 (tau (rho - 1) = 3, 4 s (1 - s) = 0.18)
           [[False, False, False], [False, True, False]])  # fmt: skip


BAPO_SETTINGS = RatioSettings(bapo_target=0.5, bapo_low_step=0.1, bapo_high_max=1.6,
                              bapo_high_step=0.2)  # fmt: skip


def test_bapo_bounds_rise_until_positive_tokens_carry_the_target_share():
    # path: (.6, 1.2), (.6, 1.4), (.6, 1.6), (.7, 1.6), (.8, 1.6), (.9, 1.6)
    # |contribution| = |A| min(rho, c_high) for A > 0, |A| max(rho, c_low) for A < 0
    # (.6, 1.2): pos 1 * 1.2 + 2 * 1.2 = 3.6, neg .6 + 3 + .3 = 3.9 -> 3.6 / 7.5 = .48 < .5
    # (.6, 1.4): pos 1.4 + 2.8 = 4.2, neg 3.9 -> 4.2 / 8.1 = .519 >= .5: chosen
    # PPO window [.6, 1.4]: (0,0) rho 2 > 1.4, A > 0: clipped, value -1.4; (0,1) .5 < .6, A < 0:
    # clipped, value .6; (0,2) 1.5 with A < 0: kept, value 3 and grad 3; (1,0) clipped, value .3;
    # (1,1) 4 > 1.4, A > 0: clipped, value -2.8
    terms, grad = _run(Ratio.BAPO, BAPO_SETTINGS, correct=None)
    _check(terms, grad,
           [[-1.4, 0.6, 3.0], [0.3, -2.8, 0.0]],
           [[0.0, 0.0, 3.0], [0.0, 0.0, 0.0]],
           [[0.0, 0.0, 1.5], [0.0, 0.0, 0.0]],
           [[True, True, False], [True, True, False]])  # fmt: skip


def test_bapo_bounds_end_at_the_last_pair_or_split_by_correctness():
    log_ratio = torch.log(torch.tensor([[2.0, 0.5, 1.5], [0.5, 4.0, 1.0]]))
    keep, positive = MASK.bool(), ADVANTAGES > 0
    assert bapo_clip_bounds(log_ratio, ADVANTAGES, MASK, positive, BAPO_SETTINGS) == (0.6, 1.4)
    # target .6 is never met (shares .48, .519, .552, .542, .533, .525): the path's last pair
    unreachable = RatioSettings(bapo_target=0.6, bapo_low_step=0.1, bapo_high_max=1.6,
                                bapo_high_step=0.2)  # fmt: skip
    assert bapo_clip_bounds(log_ratio, ADVANTAGES, MASK, positive, unreachable) == (0.9, 1.6)
    # split by correctness: row 0 is "positive": 1.2 + .6 + 3 = 4.8 vs .3 + 2.4 = 2.7 -> .64
    by_row = CORRECT[:, None].expand_as(keep)
    assert bapo_clip_bounds(log_ratio, ADVANTAGES, MASK, by_row, BAPO_SETTINGS) == (0.6, 1.2)
    # the paper's defaults: c_high steps by .05 from 1.2 (s.5.1)
    assert bapo_clip_bounds(log_ratio, ADVANTAGES, MASK, positive, RatioSettings()) == (0.6, 1.2)


@pytest.mark.parametrize("ratio", OFFPOLICY)
def test_every_form_has_the_plain_gradient_on_policy(ratio):
    generator = torch.Generator().manual_seed(3)
    logprobs = (-torch.rand(4, 7, generator=generator) * 3).requires_grad_(True)
    advantages = torch.randn(4, 7, generator=generator)
    mask = (torch.rand(4, 7, generator=generator) > 0.3).float()
    correct = torch.tensor([True, False, True, False])
    terms = offpolicy_surrogate_BT(logprobs, logprobs.detach().clone(), advantages, mask, correct,
                                   ratio=ratio, settings=RatioSettings())  # fmt: skip
    terms.loss_BT.sum().backward()
    torch.testing.assert_close(logprobs.grad, -advantages * mask)  # plain: d(-rho A)/d lp = -A
    torch.testing.assert_close(terms.weight_BT, mask)
    assert not terms.clipped_BT.any()
    tau = torch.where(advantages > 0, 1.0, 1.05)
    value = {Ratio.TOPR: -advantages * logprobs, Ratio.DISPO: -advantages * logprobs,
             Ratio.SAPO: -2.0 / tau * advantages}.get(ratio, -advantages)  # fmt: skip
    torch.testing.assert_close(terms.loss_BT.detach(), (value * mask).detach())


def test_topr_truncates_negatives_and_keeps_positives_without_is():
    log_ratio = torch.log(torch.tensor([[3.0, 1.5, 0.25, 10.0]]))
    advantages = torch.tensor([[-1.0, -2.0, -1.0, 1.0]])
    logprobs = torch.full((1, 4), -2.0)
    terms = offpolicy_surrogate_BT(logprobs, logprobs - log_ratio, advantages, torch.ones(1, 4),
                                   None, ratio=Ratio.TOPR, settings=RatioSettings())  # fmt: skip
    # negatives with rho > 1 are truncated to exactly 1; rho .25 stays; the positive ignores rho 10
    torch.testing.assert_close(terms.weight_BT, torch.tensor([[1.0, 1.0, 0.25, 1.0]]))
    assert terms.clipped_BT.tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("ratio", OFFPOLICY)
def test_masked_tokens_do_not_move_later_tokens(ratio):
    generator = torch.Generator().manual_seed(5)
    logprobs = -torch.rand(1, 6, generator=generator) * 2
    # log-ratios above 0 before the masked token: a masked ratio of 1 would lower MinPRO's minimum
    log_ratio = torch.tensor([[0.3, 0.2, -0.6, 0.4, -0.1, 0.5]])
    behaviour = logprobs - log_ratio
    advantages = torch.randn(1, 6, generator=generator)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0, 1.0]])
    garbage = logprobs.clone()
    garbage[0, 2] = -math.inf  # masked: value and presence must not matter
    kept = [0, 1, 3, 4, 5]
    settings = RatioSettings()
    with_mask = offpolicy_surrogate_BT(garbage, behaviour, advantages, mask, None, ratio=ratio,
                                       settings=settings)  # fmt: skip
    removed = offpolicy_surrogate_BT(logprobs[:, kept], behaviour[:, kept], advantages[:, kept],
                                     torch.ones(1, 5), None, ratio=ratio,
                                     settings=settings)  # fmt: skip
    torch.testing.assert_close(with_mask.weight_BT[:, kept], removed.weight_BT)
    torch.testing.assert_close(with_mask.loss_BT[:, kept], removed.loss_BT)
    assert with_mask.loss_BT[0, 2] == 0 and with_mask.weight_BT[0, 2] == 0


@pytest.mark.parametrize("ratio", [Ratio.PLAIN, Ratio.PPO, Ratio.CISPO])
def test_on_policy_forms_are_refused(ratio):
    zeros = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="policy_loss_N"):
        offpolicy_surrogate_BT(zeros, zeros, zeros, zeros + 1, None, ratio=ratio,
                               settings=RatioSettings())  # fmt: skip


def test_settings_from_mapping_validates_keys_types_and_ranges():
    assert RatioSettings.from_mapping(None) == RatioSettings()
    settings = RatioSettings.from_mapping({"sapo_tau_neg": 2, "dispo_pos_high": 4.0})
    assert settings.sapo_tau_neg == 2.0 and isinstance(settings.sapo_tau_neg, float)
    with pytest.raises(ValueError, match=r"'sapo_tau_nag'.*valid keys: topr_neg_low"):
        RatioSettings.from_mapping({"sapo_tau_nag": 1.0})
    with pytest.raises(ValueError, match="bapo_target="):
        RatioSettings.from_mapping({"bapo_target": "0.4"})
    with pytest.raises(ValueError, match="topr_neg_high="):
        RatioSettings.from_mapping({"topr_neg_high": True})
    with pytest.raises(ValueError, match=r"sapo_tau_pos=0.0: must be > 0"):
        RatioSettings.from_mapping({"sapo_tau_pos": 0.0})
    with pytest.raises(ValueError, match=r"bapo_high_start=0.9: must be in \[1"):
        RatioSettings(bapo_high_start=0.9)  # rho = 1 would be clipped: no plain reduction


def test_importance_stats_hand_example():
    # kept ratios [1, 1, 2] (the masked 100 is ignored): ESS = (1 + 1 + 2)^2 / (1 + 1 + 4) = 16/6
    # quantiles (linear): p05 at .1 -> 1, p50 at 1 -> 1, p95 at 1.9 -> 1 + .9 (2 - 1) = 1.9
    # A = [1, -1, 2] with clipped [T, F, F]: A > 0 -> 1 of 2 clipped, A < 0 -> 0 of 1
    log_ratio = torch.log(torch.tensor([[1.0, 1.0, 2.0, 100.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages = torch.tensor([[1.0, -1.0, 2.0, -3.0]])
    clipped = torch.tensor([[True, False, False, True]])
    stats = importance_stats(log_ratio, mask, advantages, clipped)
    expected = {"ess": 16 / 6, "ess_fraction": 16 / 18, "ratio_p05": 1.0, "ratio_p50": 1.0,
                "ratio_p95": 1.9, "clip_fraction_pos": 0.5, "clip_fraction_neg": 0.0}  # fmt: skip
    assert stats.keys() == expected.keys()
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value), key
    assert effective_sample_size(torch.tensor([1.0, 1.0, 2.0])) == pytest.approx(16 / 6)
    assert math.isnan(effective_sample_size(torch.tensor([])))
    empty = importance_stats(log_ratio, torch.zeros(1, 4), advantages)
    assert all(math.isnan(value) for value in empty.values())
    assert math.isnan(importance_stats(log_ratio, mask, advantages)["clip_fraction_pos"])


def test_topr_does_not_count_float_noise_around_1_as_clipped():
    # lp_s - lp_old = -8e-7, +8e-7, +0.5 on negative-advantage tokens: only the last is truncated
    logprobs_BT = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    behaviour_BT = logprobs_BT.detach() - torch.tensor([[-8e-7, 8e-7, 0.5]])
    terms = offpolicy_surrogate_BT(
        logprobs_BT, behaviour_BT, -torch.ones(1, 3), torch.ones(1, 3), None,
        ratio=Ratio.TOPR, settings=RatioSettings(),
    )  # fmt: skip
    assert terms.clipped_BT.tolist() == [[False, False, True]]
