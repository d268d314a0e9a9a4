"""SCOPE, SOD and Uni-OPD weightings (METHODS.md s.9): hand-computed values on 2x3 batches."""

from __future__ import annotations

import math

import pytest
import torch

from opd.objectives.weightings import scope_advantage, sod_step_weights, uni_opd_shift

E = math.e
MASK_BT = torch.tensor([[1, 1, 1], [1, 1, 0]])
# Row means over valid tokens: lp_old [-2, -1], lp_t [-1, -3]. Masked values are garbage.
STUDENT_OLD_BT = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, float("nan")]])
TEACHER_BT = torch.tensor([[-0.5, -1.0, -1.5], [-2.0, -4.0, float("-inf")]])


def scope(correct, *, group_size=2, tau=1.0):
    correct_B = torch.tensor(correct)
    return scope_advantage(
        STUDENT_OLD_BT, TEACHER_BT, MASK_BT, correct_B, group_size=group_size, tau=tau
    )


def test_scope_correct_samples_get_normalised_student_perplexity():
    # ppl_s = exp(-mean lp_old) = [e^2, e^1]; divided by their mean (e^2 + e) / 2:
    # w = [2e / (e + 1), 2 / (e + 1)] = [1.46212, 0.53788]; A_t = w on valid tokens.
    w0, w1 = 2 * E / (E + 1), 2 / (E + 1)
    expected = torch.tensor([[w0, w0, w0], [w1, w1, 0.0]])
    torch.testing.assert_close(scope([True, True]), expected)


def test_scope_tau_flattens_the_weights():
    # tau = 2: ppl_s^(1/2) = [e, e^0.5]; w = [2e / (e + e^0.5), 2e^0.5 / (e + e^0.5)]
    # = [1.24492, 0.75508].
    w0, w1 = 2 * E / (E + E**0.5), 2 * E**0.5 / (E + E**0.5)
    expected = torch.tensor([[w0, w0, w0], [w1, w1, 0.0]])
    torch.testing.assert_close(scope([True, True], tau=2.0), expected)


def test_scope_incorrect_samples_get_weighted_opd_advantage():
    # ppl_t^(-1) = exp(mean lp_t) = [e^-1, e^-3]; divided by their mean:
    # w = [2 / (1 + e^-2), 2 / (1 + e^2)] = [1.76159, 0.23841].
    # lp_t - lp_old: row 0 [0.5, 1.0, 1.5], row 1 [-1.5, -2.5, masked].
    w0, w1 = 2 / (1 + E**-2), 2 / (1 + E**2)
    expected = torch.tensor([[0.5 * w0, 1.0 * w0, 1.5 * w0], [-1.5 * w1, -2.5 * w1, 0.0]])
    torch.testing.assert_close(scope([False, False]), expected)


def test_scope_mixed_group_normalises_each_kind_separately():
    # One correct and one incorrect sample: each is alone in its kind, so w = 1 for both.
    expected = torch.tensor([[1.0, 1.0, 1.0], [-1.5, -2.5, 0.0]])
    torch.testing.assert_close(scope([True, False]), expected)


def test_scope_groups_are_separate():
    # group_size = 1: each correct sample is alone in its group, w = 1.
    expected = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    torch.testing.assert_close(scope([True, True], group_size=1), expected)


def test_scope_empty_row_takes_no_part_in_the_group():
    # Row 1 has no valid token: row 0 is alone among the correct samples, so w = 1, not 2e/(e+1).
    mask_BT = torch.tensor([[1, 1, 1], [0, 0, 0]])
    out = scope_advantage(
        STUDENT_OLD_BT, TEACHER_BT, mask_BT, torch.tensor([True, True]), group_size=2
    )
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))


def test_sod_weights_with_a_step_boundary():
    # |lp_old - lp_t|: row 0 [0.5, 0.5, 0.0], row 1 [1.0, 2.0, masked].
    # Row 0 ends a step at t = 1: d_1 = 0.5, d_2 = 0.0 -> w_2 = min(0.5 / eps, 1.5) = 1.5.
    # Row 1 ends a step at t = 0: d_1 = 1.0, d_2 = 2.0 (masked t = 2 excluded) -> w_2 = 0.5.
    student_old_BT = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -1.5, -3.0]])
    teacher_BT = torch.tensor([[-0.5, -2.5, -0.5], [-1.2, -3.5, -9.0]])
    step_end_BT = torch.tensor([[False, True, False], [True, False, False]])
    expected = torch.tensor([[1.0, 1.0, 1.5], [1.0, 0.5, 0.0]])
    out = sod_step_weights(student_old_BT, teacher_BT, MASK_BT, step_end_BT)
    torch.testing.assert_close(out, expected)
    # delta = 0.2 lowers the cap: row 0's second step gets 1.2.
    out = sod_step_weights(student_old_BT, teacher_BT, MASK_BT, step_end_BT, delta=0.2)
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0, 1.2], [1.0, 0.5, 0.0]]))


def test_sod_single_step_rows_weigh_one():
    # A boundary at the last valid token (row 0) or on a masked token (row 1) opens no new step.
    step_end_BT = torch.tensor([[False, False, True], [False, False, True]])
    out = sod_step_weights(STUDENT_OLD_BT, TEACHER_BT, MASK_BT, step_end_BT)
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]))


def test_uni_opd_shifts_correct_samples_when_the_gap_is_small():
    # Sample means: row 0 (0.3 - 0.1 + 0.4) / 3 = 0.2, row 1 (0.2 + 0.0) / 2 = 0.1 (5.0 masked).
    # gap = 0.2 - 0.1 = 0.1 < delta = 0.5: the correct row 0 gains 0.5 - 0.1 = 0.4.
    advantages_BT = torch.tensor([[0.3, -0.1, 0.4], [0.2, 0.0, 5.0]])
    correct_B = torch.tensor([True, False])
    out = uni_opd_shift(advantages_BT, MASK_BT, correct_B, group_size=2, delta=0.5)
    torch.testing.assert_close(out, torch.tensor([[0.7, 0.3, 0.8], [0.2, 0.0, 0.0]]))


def test_uni_opd_leaves_a_large_gap_alone():
    # gap = 0.1 >= delta = 0.05: unchanged (the masked 5.0 still becomes 0).
    advantages_BT = torch.tensor([[0.3, -0.1, 0.4], [0.2, 0.0, 5.0]])
    correct_B = torch.tensor([True, False])
    out = uni_opd_shift(advantages_BT, MASK_BT, correct_B, group_size=2, delta=0.05)
    torch.testing.assert_close(out, torch.tensor([[0.3, -0.1, 0.4], [0.2, 0.0, 0.0]]))


def test_uni_opd_needs_both_kinds_in_a_group():
    # group_size = 1: no group holds both a correct and an incorrect sample, nothing shifts.
    advantages_BT = torch.tensor([[0.3, -0.1, 0.4], [0.2, 0.0, 5.0]])
    correct_B = torch.tensor([True, False])
    out = uni_opd_shift(advantages_BT, MASK_BT, correct_B, group_size=1, delta=0.5)
    torch.testing.assert_close(out, torch.tensor([[0.3, -0.1, 0.4], [0.2, 0.0, 0.0]]))


def test_uni_opd_groups_are_separate():
    # Group 0 = rows 0, 1 (gap 0.1, shift 0.4 on row 0); group 1 = rows 2, 3 with the roles
    # swapped: correct row 3 mean 0.1, incorrect row 2 mean 0.2, gap -0.1, shift 0.6 on row 3.
    advantages_BT = torch.tensor([[0.3, -0.1, 0.4], [0.2, 0.0, 5.0]]).repeat(2, 1)
    mask_BT = MASK_BT.repeat(2, 1)
    correct_B = torch.tensor([True, False, False, True])
    out = uni_opd_shift(advantages_BT, mask_BT, correct_B, group_size=2, delta=0.5)
    expected = torch.tensor([[0.7, 0.3, 0.8], [0.2, 0.0, 0.0], [0.3, -0.1, 0.4], [0.8, 0.6, 0.0]])
    torch.testing.assert_close(out, expected)


def test_masked_tokens_are_zero_and_do_not_leak():
    generator = torch.Generator().manual_seed(0)
    mask_BT = torch.rand(4, 9, generator=generator) > 0.3
    student_old_BT = -torch.rand(4, 9, generator=generator) * 3
    teacher_BT = -torch.rand(4, 9, generator=generator) * 3
    step_end_BT = torch.rand(4, 9, generator=generator) > 0.6
    correct_B = torch.tensor([True, False, True, True])

    def run_all(student_old_BT, teacher_BT):
        return [
            scope_advantage(student_old_BT, teacher_BT, mask_BT, correct_B, group_size=2),
            sod_step_weights(student_old_BT, teacher_BT, mask_BT, step_end_BT),
            uni_opd_shift(teacher_BT - student_old_BT, mask_BT, correct_B, group_size=2),
        ]

    clean = run_all(student_old_BT, teacher_BT)
    # Garbage on masked positions changes nothing.
    noisy = run_all(
        torch.where(mask_BT, student_old_BT, -1e4), torch.where(mask_BT, teacher_BT, 1e4)
    )
    for out_BT, noisy_BT in zip(clean, noisy, strict=True):
        assert out_BT.dtype == torch.float32
        assert torch.all(out_BT[~mask_BT] == 0)
        torch.testing.assert_close(out_BT, noisy_BT)


def test_inputs_are_detached():
    student_old_BT = STUDENT_OLD_BT.nan_to_num(0.0).requires_grad_()
    out = scope_advantage(
        student_old_BT, TEACHER_BT, MASK_BT, torch.tensor([False, False]), group_size=2
    )
    assert not out.requires_grad


@pytest.mark.parametrize("group_size", [0, 3])
def test_group_size_mismatch_raises(group_size):
    correct_B = torch.tensor([True, False])
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        scope_advantage(STUDENT_OLD_BT, TEACHER_BT, MASK_BT, correct_B, group_size=group_size)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        uni_opd_shift(TEACHER_BT, MASK_BT, correct_B, group_size=group_size)
