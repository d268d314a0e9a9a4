"""CHORD and DYPO imitation pieces (METHODS.md s.10): hand-computed schedule values, phi weights,
NLL gradients, the (1 - mu) / mu combination and the per-prompt gate."""

from __future__ import annotations

import math

import pytest
import torch

from opd.objectives.imitation import (
    ImitationSchedule,
    dypo_gate_B,
    expert_token_weight_N,
    imitation_coefficient,
    imitation_loss_N,
)

# Warm-up 0 -> 1 over 4 steps, cosine 1 -> 0 over the next 4: the coefficient's two endpoints.
RAMP = ImitationSchedule(peak=1.0, valley=0.0, warmup_steps=4, decay_steps=4)


def test_defaults_are_chord_mu():
    # CHORD-mu in Trinity-RFT's mix_chord.yaml: peak 0.9, valley 0.05, warmup 0, decay 200.
    assert ImitationSchedule() == ImitationSchedule(
        peak=0.9, valley=0.05, warmup_steps=0, decay_steps=200
    )


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),  # warm-up starts at 0
        (2, 0.5),  # 1 * 2 / 4
        (4, 1.0),  # decay starts at the peak: cos(0) = 1
        (5, 0.5 * (1 + math.cos(math.pi / 4))),  # 0.5 * (1 + 0.70711) = 0.85355
        (6, 0.5),  # 0.5 * (1 + cos(pi / 2)) = 0.5
        (8, 0.0),  # warmup + decay: the valley
        (100, 0.0),
    ],
)
def test_warmup_then_cosine_decay(step, expected):
    assert imitation_coefficient(step, RAMP) == pytest.approx(expected, abs=1e-12)


def test_default_schedule_values():
    # mu(0) = 0.9 (no warm-up); mu(100) = 0.05 + 0.85 * 0.5 * (1 + cos(pi / 2)) = 0.475;
    # mu(200) = mu(10_000) = 0.05.
    schedule = ImitationSchedule()
    assert imitation_coefficient(0, schedule) == pytest.approx(0.9)
    assert imitation_coefficient(100, schedule) == pytest.approx(0.475)
    assert imitation_coefficient(200, schedule) == pytest.approx(0.05)
    assert imitation_coefficient(10_000, schedule) == pytest.approx(0.05)


def test_constant_schedule_for_chord_phi():
    # CHORD-phi: peak = valley = 0.1, no warm-up or decay -> 0.1 at every step.
    schedule = ImitationSchedule(peak=0.1, valley=0.1, warmup_steps=0, decay_steps=0)
    assert [imitation_coefficient(s, schedule) for s in (0, 1, 500)] == [0.1, 0.1, 0.1]


@pytest.mark.parametrize(
    "kwargs",
    [{"peak": 1.5}, {"valley": -0.1}, {"warmup_steps": -1}, {"decay_steps": -2}],
)
def test_schedule_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="CHORD"):
        ImitationSchedule(**kwargs)


def test_coefficient_rejects_negative_step():
    with pytest.raises(ValueError, match="step"):
        imitation_coefficient(-1, RAMP)


def test_phi_weight_values_and_detached():
    # p = [0.5, 1.0, 0.1, 0.2]: p (1 - p) = [0.25, 0.0, 0.09, 0.16].
    logprobs_N = torch.log(torch.tensor([0.5, 1.0, 0.1, 0.2])).requires_grad_()
    weight_N = expert_token_weight_N(logprobs_N, kind="phi")
    torch.testing.assert_close(weight_N, torch.tensor([0.25, 0.0, 0.09, 0.16]))
    assert not weight_N.requires_grad


def test_none_weight_is_ones():
    logprobs_N = torch.tensor([-0.3, -2.0], requires_grad=True)
    weight_N = expert_token_weight_N(logprobs_N, kind="none")
    torch.testing.assert_close(weight_N, torch.ones(2))
    assert not weight_N.requires_grad


def test_unknown_weight_kind():
    with pytest.raises(ValueError, match="phi"):
        expert_token_weight_N(torch.zeros(2), kind="dft")


def test_imitation_loss_values_and_gradient_is_minus_weight():
    # loss = -w * lp = [-1 * -0.5, -0.25 * -1, -0.5 * -2] = [0.5, 0.25, 1.0]; d/dlp = -w.
    logprobs_N = torch.tensor([-0.5, -1.0, -2.0], requires_grad=True)
    weight_N = torch.tensor([1.0, 0.25, 0.5], requires_grad=True)
    loss_N = imitation_loss_N(logprobs_N, weight_N)
    torch.testing.assert_close(loss_N, torch.tensor([0.5, 0.25, 1.0]))
    loss_N.sum().backward()
    torch.testing.assert_close(logprobs_N.grad, torch.tensor([-1.0, -0.25, -0.5]))
    assert weight_N.grad is None  # the weight is a stop-gradient coefficient


def test_phi_loss_gradient_stops_through_the_weight():
    # p = 0.2: w = 0.16, so the gradient is -0.16. Had phi not been detached, the gradient would
    # be -(w + lp * dw/dlp) = -(0.16 + ln(0.2) * (p - 2 p^2)) = -(0.16 - 1.60944 * 0.12) = +0.0331.
    logprobs_N = torch.log(torch.tensor([0.2])).requires_grad_()
    weight_N = expert_token_weight_N(logprobs_N, kind="phi")
    imitation_loss_N(logprobs_N, weight_N).sum().backward()
    torch.testing.assert_close(logprobs_N.grad, torch.tensor([-0.16]))


def test_combination_reduces_to_rl_and_to_nll_at_the_endpoints():
    # rl = 0.7; expert lp = [-0.5, -1.5], w = 1 -> token-mean NLL = (0.5 + 1.5) / 2 = 1.0.
    # mu(0) = 0 -> 0.7; mu(4) = 1 -> 1.0; mu(2) = 0.5 -> 0.5 * 0.7 + 0.5 * 1.0 = 0.85.
    rl_loss = torch.tensor(0.7)
    logprobs_N = torch.tensor([-0.5, -1.5], requires_grad=True)
    weight_N = expert_token_weight_N(logprobs_N, kind="none")
    nll = imitation_loss_N(logprobs_N, weight_N).mean()

    def combine(step):
        mu = imitation_coefficient(step, RAMP)
        return (1.0 - mu) * rl_loss + mu * nll

    torch.testing.assert_close(combine(0), rl_loss)
    torch.testing.assert_close(combine(4), nll)
    torch.testing.assert_close(combine(2), torch.tensor(0.85))
    # With mu = 0 the expert tokens get no gradient at all.
    combine(0).backward()
    torch.testing.assert_close(logprobs_N.grad, torch.zeros(2))


def test_dypo_gate_two_groups():
    # G = 3. Group 0: 0 / 3 correct (hard); group 1: 1 / 3 correct (partial).
    correct_B = torch.tensor([False, False, False, True, False, False])
    all_fail = dypo_gate_B(correct_B, group_size=3)
    assert all_fail.tolist() == [True, True, True, False, False, False]
    any_fail = dypo_gate_B(correct_B, group_size=3, rule="any_fail")
    assert any_fail.tolist() == [True] * 6


def test_dypo_gate_all_pass_group_never_imitates_and_accepts_floats():
    # 0/1 rewards as floats. Group 0: 2 / 2 correct (easy); group 1: 1 / 2 correct.
    correct_B = torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert dypo_gate_B(correct_B, group_size=2).tolist() == [False] * 4
    assert dypo_gate_B(correct_B, group_size=2, rule="any_fail").tolist() == [
        False,
        False,
        True,
        True,
    ]


def test_dypo_gate_rejects_bad_groups_and_rules():
    with pytest.raises(ValueError, match="multiple of group_size"):
        dypo_gate_B(torch.zeros(5, dtype=torch.bool), group_size=2)
    with pytest.raises(ValueError, match="all_fail"):
        dypo_gate_B(torch.zeros(4, dtype=torch.bool), group_size=2, rule="half")
