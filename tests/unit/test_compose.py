"""Hand-computed advantages of the composer for each family-A method (METHODS.md s.1, 2, 4, 6, 8).

One tiny batch throughout: 2 sequences x 3 tokens, the last token of row 1 masked.
"""

from __future__ import annotations

import pytest
import torch

from opd.objectives.compose import TermMasks, compose_advantage, opd_term
from opd.objectives.vanilla import vanilla_opd_advantage

OLD_BT = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -1.5, -3.0]])  # lp_old
TEACHER_BT = torch.tensor([[-0.5, -2.5, -0.5], [-1.2, -1.0, -9.0]])  # lp_t
REFERENCE_BT = torch.tensor([[-1.5, -1.0, -0.5], [-0.7, -2.0, -1.0]])  # lp_ref
MASK_BT = torch.tensor([[1, 1, 1], [1, 1, 0]])


def _compose(**kwargs) -> torch.Tensor:
    term = opd_term(OLD_BT, TEACHER_BT, lam=kwargs.pop("lam", 1.0),
                    reference_logprobs_BT=kwargs.pop("reference", None))  # fmt: skip
    return compose_advantage(term, MASK_BT, **kwargs)


def test_vanilla_opd_is_teacher_minus_behaviour_logprob():
    # A = lp_t - lp_old = [[0.5, -0.5, 0], [-1.0, 0.5, (masked) 0]]
    expected = torch.tensor([[0.5, -0.5, 0.0], [-1.0, 0.5, 0.0]])
    torch.testing.assert_close(_compose(), expected)


def test_lightning_offline_opd_is_the_same_advantage_on_recomputed_logprobs():
    # Lightning OPD: A = lp_t - lp_old with lp_old recomputed by the current student; the
    # composer is unchanged, only its input differs. lp_old' = lp_old + 0.25 lowers A by 0.25.
    term = opd_term(OLD_BT + 0.25, TEACHER_BT)
    expected = torch.tensor([[0.25, -0.75, -0.25], [-1.25, 0.25, 0.0]])
    torch.testing.assert_close(compose_advantage(term, MASK_BT), expected)


def test_exopd_lambda_one_reproduces_vanilla_exactly():
    # lam = 1: lam * (lp_t - lp_ref) - (lp_old - lp_ref) = lp_t - lp_old, bit for bit, whatever
    # the reference (it cancels and is not read).
    vanilla = vanilla_opd_advantage(OLD_BT, TEACHER_BT, MASK_BT)
    for reference in (None, REFERENCE_BT, torch.randn(2, 3) * 100):
        assert torch.equal(_compose(lam=1.0, reference=reference), vanilla)


def test_gopd_extrapolation_lambda_1_25():
    # A = 1.25 * (lp_t - lp_ref) - (lp_old - lp_ref)
    # row 0: 1.25*(-0.5+1.5) - (-1.0+1.5) = 1.25 - 0.5 = 0.75
    #        1.25*(-2.5+1.0) - (-2.0+1.0) = -1.875 + 1.0 = -0.875
    #        1.25*(-0.5+0.5) - (-0.5+0.5) = 0
    # row 1: 1.25*(-1.2+0.7) - (-0.2+0.7) = -0.625 - 0.5 = -1.125
    #        1.25*(-1.0+2.0) - (-1.5+2.0) = 1.25 - 0.5 = 0.75 ; masked: 0
    expected = torch.tensor([[0.75, -0.875, 0.0], [-1.125, 0.75, 0.0]])
    torch.testing.assert_close(_compose(lam=1.25, reference=REFERENCE_BT), expected)


def test_gopd_interpolation_lambda_half():
    # A = 0.5 * (lp_t - lp_ref) - (lp_old - lp_ref)
    # row 0: 0.5*1.0 - 0.5 = 0 ; 0.5*(-1.5) + 1.0 = 0.25 ; 0
    # row 1: 0.5*(-0.5) - 0.5 = -0.75 ; 0.5*1.0 - 0.5 = 0 ; masked 0
    expected = torch.tensor([[0.0, 0.25, 0.0], [-0.75, 0.0, 0.0]])
    torch.testing.assert_close(_compose(lam=0.5, reference=REFERENCE_BT), expected)


def test_gopd_without_reference_is_refused():
    try:
        opd_term(OLD_BT, TEACHER_BT, lam=1.25)
    except ValueError as error:
        assert "lp_ref" in str(error)
    else:
        raise AssertionError("lam != 1 without a reference must raise")


def test_vopd_baseline_adds_the_kl():
    # vOPD: A = (lp_t - lp_old) - V_t with V_t = -KL_t; KL = [[0.3, 0.1, 0.2], [1.0, 0.4, 7.0]]
    # row 0: 0.5+0.3 = 0.8 ; -0.5+0.1 = -0.4 ; 0+0.2 = 0.2
    # row 1: -1.0+1.0 = 0 ; 0.5+0.4 = 0.9 ; masked 0
    kl_BT = torch.tensor([[0.3, 0.1, 0.2], [1.0, 0.4, 7.0]])
    expected = torch.tensor([[0.8, -0.4, 0.2], [0.0, 0.9, 0.0]])
    torch.testing.assert_close(_compose(baseline_BT=-kl_BT), expected)


def test_dgrpo_outcome_advantage_minus_beta_kl():
    # dGRPO / RLVR + OPD: A = A_grpo[i] - beta * (lp_old - lp_t), beta = 0.1, A_grpo = [1, -1]
    # row 0: 1 + 0.1*[0.5, -0.5, 0] = [1.05, 0.95, 1.0]
    # row 1: -1 + 0.1*[-1.0, 0.5] = [-1.1, -0.95], masked 0
    expected = torch.tensor([[1.05, 0.95, 1.0], [-1.1, -0.95, 0.0]])
    advantages = _compose(
        kl_coef=0.1, outcome_advantage_B=torch.tensor([1.0, -1.0]), outcome_weight=1.0
    )
    torch.testing.assert_close(advantages, expected)


def test_composer_output_is_detached():
    old = OLD_BT.clone().requires_grad_(True)
    advantages = compose_advantage(opd_term(old, TEACHER_BT), MASK_BT)
    assert not advantages.requires_grad


# ----- TRACE: one mask per loss term (METHODS.md s.11) -----


def test_all_ones_term_masks_give_the_single_mask_composer_bit_for_bit():
    term = opd_term(OLD_BT, TEACHER_BT)
    ones = torch.ones(2, 3)
    outcome_B = torch.tensor([0.3, -0.7])
    for kwargs in ({}, {"baseline_BT": -REFERENCE_BT.abs()}, {"discount": 0.5}):
        plain = compose_advantage(term, MASK_BT, outcome_advantage_B=outcome_B,
                                  outcome_weight=0.25, kl_coef=0.5, **kwargs)  # fmt: skip
        routed = compose_advantage(term, MASK_BT, outcome_advantage_B=outcome_B,
                                   outcome_weight=0.25, kl_coef=0.5,
                                   term_masks=TermMasks(ones, ones, ones), **kwargs)  # fmt: skip
        assert torch.equal(plain, routed)


def test_three_term_masks_on_a_hand_computed_2x3_example():
    """outcome A = [1, -2] (w_rl 1), distillation term lp_t - lp_old (w_opd 1):

        opd_t   = [[0.5, -0.5, 0], [-1, 0.5, -6]]    (row 1, token 2 masked)
        outcome = [[1, 0, 1], [0, 1, 1]]   reverse = [[0, 1, 0], [1, 0, 0]]
        A_t     = opd_t * reverse + A_i * outcome = [[1, -0.5, 1], [-1, -2, 0]]

    and the forward-KL channel weights the loss phase's divergence per token: with a 2-token
    vocabulary, the student uniform and the teacher at [0.8, 0.2] on every token, KL(p_t||p_s)
    = 0.8 ln 1.6 + 0.2 ln 0.4 = 0.192745 per token, so the term over the kept tokens with
    forward = [[1, 0, 0], [0, 0, 1]] (the last one masked) is 0.192745 * 1 / 5 tokens."""
    from opd.kernels import fused_linear_divergence_loss

    masks = TermMasks(
        outcome_BT=torch.tensor([[1.0, 0, 1], [0, 1, 1]]),
        reverse_kl_BT=torch.tensor([[0.0, 1, 0], [1, 0, 0]]),
        forward_kl_BT=torch.tensor([[1.0, 0, 0], [0, 0, 1]]),
    )
    advantages = compose_advantage(
        opd_term(OLD_BT, TEACHER_BT), MASK_BT, outcome_advantage_B=torch.tensor([1.0, -2.0]),
        outcome_weight=1.0, term_masks=masks,
    )  # fmt: skip
    torch.testing.assert_close(advantages, torch.tensor([[1.0, -0.5, 1.0], [-1.0, -2.0, 0.0]]))
    keep = MASK_BT.bool()
    num_kept = int(keep.sum())  # 5
    student_hidden_NH = torch.zeros(num_kept, 2)  # identity lm_head: logits 0, p_s uniform
    teacher_hidden_NH = torch.log(torch.tensor([0.8, 0.2])).expand(num_kept, 2)
    loss, kl_N = fused_linear_divergence_loss(
        student_hidden_NH, torch.eye(2), teacher_hidden=teacher_hidden_NH,
        teacher_weight=torch.eye(2), weight=masks.forward_kl_BT[keep] / num_kept,
        kind="forward_kl",
    )  # fmt: skip
    torch.testing.assert_close(kl_N, torch.full((5,), 0.192745), atol=1e-6, rtol=0)
    assert float(loss) == pytest.approx(0.192745 / 5, abs=1e-6)
