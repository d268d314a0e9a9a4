"""Cross-tokenizer teachers, hand-computed (opd/objectives/cross_vocab.py).

The span batch (B=2, T=6), spans marked by |, `.` padding:

    row 0: [0] | [1 2] | [3 4 5]        sizes 1, 2, 3
    row 1: [0 1 2] | [3] | . .          sizes 3, 1, padding

Values are multiples of 1/4 (exact in float32) except the single-token spans' teacher totals
(-0.1), chosen so that the naive `s + (T - s) / 1` does NOT round back to T.

Test: `pytest -n 0 -q tests/unit/test_cross_vocab.py`.
"""

from __future__ import annotations

import math

import pytest
import torch

from opd.objectives.cross_vocab import (
    map_topk,
    span_sizes_BT,
    span_teacher_logprobs,
    student_matched_mask,
    uld_sorted_l1,
    unmatched_topk,
    vocabulary_map,
)

NEG_INF = float("-inf")
SPANS = [[[0], [1, 2], [3, 4, 5]], [[0, 1, 2], [3]]]  # row -> spans -> positions
MASK_BT = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
START_BT = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 0, 0]], dtype=torch.bool)
STUDENT_BT = torch.tensor(
    [[-0.5, -1.0, -0.25, -2.0, -0.5, -1.5], [-0.75, -0.25, -1.0, -3.0, 9.0, 9.0]]
)
# Span totals at each span's last token; padding holds garbage that must be ignored.
TEACHER_BT = torch.tensor([[-0.1, 0.0, -2.0, 0.0, 0.0, -4.75], [0.0, 0.0, -2.75, -0.1, 7.0, 7.0]])
TEACHER_TOTALS = [[-0.1, -2.0, -4.75], [-2.75, -0.1]]  # float64, per span
EXPECTED = {
    # all: each token gets the span's reward r_S = T_S - sum_S = -0.75 (spans of 2 and 3).
    "all": [[-0.1, -1.75, -1.0, -2.75, -1.25, -2.25], [-1.5, -1.0, -1.75, -0.1, 0.0, 0.0]],
    # last: others keep the student's logprob; last = T_S - (others' sum).
    "last": [[-0.1, -1.0, -1.0, -2.0, -0.5, -2.25], [-0.75, -0.25, -1.75, -0.1, 0.0, 0.0]],
    # spread: (T_S - sum_S) / |S| = -0.75/2, -0.75/3 in row 0; -0.75/3 in row 1.
    "spread": [[-0.1, -1.375, -0.625, -2.25, -0.75, -1.75], [-1.0, -0.5, -1.25, -0.1, 0.0, 0.0]],
}  # fmt: skip


def test_span_sizes():
    expected = [[1, 2, 2, 3, 3, 3], [3, 3, 3, 1, 0, 0]]
    sizes_BT = span_sizes_BT(START_BT, MASK_BT)
    assert sizes_BT.dtype == torch.long
    assert sizes_BT.tolist() == expected


@pytest.mark.parametrize("rule", ["all", "last", "spread"])
def test_span_teacher_logprobs_hand_values(rule):
    out_BT = span_teacher_logprobs(TEACHER_BT, START_BT, STUDENT_BT, MASK_BT, rule=rule)
    assert out_BT.dtype == torch.float32
    torch.testing.assert_close(out_BT, torch.tensor(EXPECTED[rule]), rtol=0, atol=1e-6)
    # The span's reward r_S = T_S - sum_S student: summed over the span ("last", "spread"), or
    # on each of its tokens ("all").
    for b, spans in enumerate(SPANS):
        for span, total in zip(spans, TEACHER_TOTALS[b], strict=True):
            reward = total - float(STUDENT_BT[b, span].sum())
            advantages = (out_BT[b, span] - STUDENT_BT[b, span]).tolist()
            if rule == "all":
                assert advantages == pytest.approx([reward] * len(span), abs=1e-6)
            else:
                assert sum(advantages) == pytest.approx(reward, abs=1e-6)
    # Single-token spans give T_S bit for bit, where the naive formula would not.
    for b, t in [(0, 0), (1, 3)]:
        assert torch.equal(out_BT[b, t], TEACHER_BT[b, t])
        naive = STUDENT_BT[b, t] + (TEACHER_BT[b, t] - STUDENT_BT[b, t]) / 1
        assert not torch.equal(naive, TEACHER_BT[b, t])
    assert torch.equal(out_BT[1, 4:], torch.zeros(2))


@pytest.mark.parametrize("rule", ["all", "last", "spread"])
def test_span_teacher_logprobs_all_single_token_spans_are_bit_exact(rule):
    generator = torch.Generator().manual_seed(0)
    teacher_BT = -torch.rand(3, 7, generator=generator) * 5
    student_BT = -torch.rand(3, 7, generator=generator) * 5
    mask_BT = torch.arange(7) < torch.tensor([[7], [4], [1]])
    out_BT = span_teacher_logprobs(teacher_BT, mask_BT.clone(), student_BT, mask_BT, rule=rule)
    assert torch.equal(out_BT[mask_BT], teacher_BT[mask_BT])
    assert torch.equal(out_BT[~mask_BT], torch.zeros(int((~mask_BT).sum())))


def test_span_teacher_logprobs_rejects_unknown_rule():
    with pytest.raises(ValueError, match="span rule must be one of"):
        span_teacher_logprobs(TEACHER_BT, START_BT, STUDENT_BT, MASK_BT, rule="first")


STUDENT_VOCAB = {"a": 0, "b": 1, "c": 2, "ab": 3}
# Teacher id 3 and 5 have no string; "c" at id 7 is past the teacher's size and ignored.
TEACHER_VOCAB = {"b": 0, "x": 1, "a": 2, "ab": 4, "c": 7}
MAP_V = torch.tensor([1, -1, 0, -1, 3, -1])


def test_vocabulary_map():
    map_V = vocabulary_map(STUDENT_VOCAB, TEACHER_VOCAB, teacher_vocab_size=6)
    assert map_V.dtype == torch.long
    assert map_V.tolist() == MAP_V.tolist()


def test_student_matched_mask():
    assert student_matched_mask(MAP_V, 5).tolist() == [True, True, False, True, False]


def test_map_topk_drops_unmatched_pads_and_out_of_range_then_resorts():
    # Row 0: teacher id 1 (the best) is unmatched, so the mapped row must be re-sorted.
    # Row 1: id 3 unmatched, id 9 out of range, id 0 is a -inf pad, id 4 -> student 3.
    ids_NK = torch.tensor([[1, 0, 4, 2], [3, 9, 0, 4]], dtype=torch.int32)
    logprobs_NK = torch.tensor([[-0.1, -0.5, -1.0, -2.0], [-0.2, -0.3, NEG_INF, -0.9]])
    ids, logprobs = map_topk(ids_NK, logprobs_NK, MAP_V)
    assert ids.dtype == torch.long
    assert ids.tolist() == [[1, 3, 0, 0], [3, 0, 0, 0]]
    expected = torch.tensor([[-0.5, -1.0, -2.0, NEG_INF], [-0.9, NEG_INF, NEG_INF, NEG_INF]])
    assert torch.equal(logprobs, expected)
    # Any leading shape.
    ids_3d, logprobs_3d = map_topk(ids_NK.view(1, 2, 4), logprobs_NK.view(1, 2, 4), MAP_V)
    assert torch.equal(ids_3d, ids.view(1, 2, 4))
    assert torch.equal(logprobs_3d, logprobs.view(1, 2, 4))


def test_unmatched_topk():
    # Unmatched: id 3 (-2.0), id 1 (-1.0); matched id 0 dropped; id 5 a -inf pad; id 9 invalid.
    ids_NK = torch.tensor([[3, 0, 1, 5], [9, 2, 5, 1]])
    logprobs_NK = torch.tensor([[-2.0, -0.5, -1.0, NEG_INF], [-0.1, -0.2, -0.7, -1.5]])
    out_NK = unmatched_topk(ids_NK, logprobs_NK, MAP_V)
    expected = torch.tensor([[-1.0, -2.0, NEG_INF, NEG_INF], [-0.7, -1.5, NEG_INF, NEG_INF]])
    assert torch.equal(out_NK, expected)


def test_uld_sorted_l1_hand_values():
    # Student id 1 is matched. Token 0: p = [1/8, 1/4, 1/8, 1/2] -> unmatched top-2 [1/2, 1/8];
    # teacher [1/4, 1/4]: |1/2 - 1/4| + |1/8 - 1/4| = 3/8.
    # Token 1: p = 1/4 each -> [1/4, 1/4]; teacher [1/4, 0 (-inf)]: 0 + 1/4 = 1/4.
    matched_V = torch.tensor([False, True, False, False])
    probs_NV = torch.tensor([[0.125, 0.25, 0.125, 0.5], [0.25, 0.25, 0.25, 0.25]])
    teacher_NK = torch.tensor([[math.log(0.25), math.log(0.25)], [math.log(0.25), NEG_INF]])
    expected = torch.tensor([0.375, 0.25])
    torch.testing.assert_close(uld_sorted_l1(probs_NV.log(), matched_V, teacher_NK), expected)
    # The same probabilities at temperature 2.
    logits_NV = 2 * probs_NV.log()
    torch.testing.assert_close(
        uld_sorted_l1(logits_NV, matched_V, teacher_NK, temperature=2.0), expected
    )


def test_uld_sorted_l1_zero_distance():
    # p = [1/6, 2/6, 3/6] and [1/4, 1/4, 1/2]; student id 0 matched. The teacher holds the
    # student's unmatched probabilities, unsorted, with K = 3 > 2 unmatched student ids: the
    # student side is padded with 0 like the teacher's -inf.
    logits_NV = torch.tensor([[0.0, math.log(2.0), math.log(3.0)], [0.0, 0.0, math.log(2.0)]])
    matched_V = torch.tensor([True, False, False])
    teacher_NK = torch.tensor(
        [[math.log(2 / 6), math.log(3 / 6), NEG_INF], [NEG_INF, math.log(0.25), math.log(0.5)]]
    )
    out_N = uld_sorted_l1(logits_NV, matched_V, teacher_NK)
    torch.testing.assert_close(out_N, torch.zeros(2), rtol=0, atol=1e-7)
    # With id 1 matched too, only id 2 is left: [1/2, 0, 0] vs [1/2, 1/3, 0] and [1/2, 1/4, 0].
    out_N = uld_sorted_l1(logits_NV, torch.tensor([True, True, False]), teacher_NK)
    torch.testing.assert_close(out_N, torch.tensor([1 / 3, 0.25]))


def test_uld_sorted_l1_gradient_matches_finite_differences():
    generator = torch.Generator().manual_seed(0)
    logits_NV = torch.randn(2, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    matched_V = torch.tensor([True, False, False, True, False, False])
    teacher_NK = torch.tensor([[-1.0, -2.5, NEG_INF], [-0.4, -1.7, -3.0]], dtype=torch.float64)
    assert uld_sorted_l1(logits_NV, matched_V, teacher_NK).dtype == torch.float64
    assert torch.autograd.gradcheck(
        lambda x: uld_sorted_l1(x, matched_V, teacher_NK, temperature=1.5), (logits_NV,)
    )
    # The gradient reaches matched logits too, through the full-vocabulary softmax.
    uld_sorted_l1(logits_NV, matched_V, teacher_NK).sum().backward()
    assert logits_NV.grad is not None
    assert bool((logits_NV.grad[:, matched_V] != 0).all())
