"""`completion_token_stats` against the definitions, computed directly on explicit logits, and
`TokenStats` back at its `[B, T]` positions."""

from __future__ import annotations

import math

import pytest
import torch

from opd.objectives.token_stats import completion_token_stats
from opd.types import TokenStats

N, H, V, K = 7, 5, 11, 4


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(N, H, generator=generator)
    student_weight = torch.randn(V, H, generator=generator)
    teacher_hidden = torch.randn(N, H + 2, generator=generator)
    teacher_weight = torch.randn(V, H + 2, generator=generator)
    ids = torch.randint(0, V, (N,), generator=generator)
    return student_hidden, student_weight, teacher_hidden, teacher_weight, ids


def _log_softmax(hidden, weight, temperature=1.0):
    return torch.log_softmax(hidden @ weight.T / temperature, -1)


def test_full_teacher_stats_match_the_definitions(inputs):
    student_hidden, student_weight, teacher_hidden, teacher_weight, ids = inputs
    stats = completion_token_stats(
        student_hidden, student_weight, ids, temperature=0.7,
        teacher_hidden_NH=teacher_hidden, teacher_weight_VH=teacher_weight,
        teacher_temperature=1.3, baseline="full", jsd=True, chunk_rows=3,
    )  # fmt: skip
    ls = _log_softmax(student_hidden, student_weight, 0.7)
    lt = _log_softmax(teacher_hidden, teacher_weight, 1.3)
    ps, pt = ls.exp(), lt.exp()
    torch.testing.assert_close(stats.logprob, ls.gather(-1, ids[:, None])[:, 0])
    torch.testing.assert_close(stats.entropy, -(ps * ls).sum(-1))
    kl = (ps * (ls - lt)).sum(-1)  # KL_t = sum_v p_s (log p_s - log p_t)
    torch.testing.assert_close(stats.reverse_kl, kl)
    torch.testing.assert_close(stats.baseline_kl, kl)
    lm = torch.log(0.5 * ps + 0.5 * pt)
    jsd = 0.5 * (ps * (ls - lm)).sum(-1) + 0.5 * (pt * (lt - lm)).sum(-1)
    torch.testing.assert_close(stats.jsd, jsd)


def test_topk_baseline_renormalises_both_on_the_students_top_k(inputs):
    student_hidden, student_weight, teacher_hidden, teacher_weight, ids = inputs
    stats = completion_token_stats(
        student_hidden, student_weight, ids, teacher_hidden_NH=teacher_hidden,
        teacher_weight_VH=teacher_weight, baseline="topk", baseline_top_k=K,
    )  # fmt: skip
    ls = _log_softmax(student_hidden, student_weight)
    lt = _log_softmax(teacher_hidden, teacher_weight)
    support = ls.topk(K, -1).indices
    ls_k = torch.log_softmax(ls.gather(-1, support), -1)
    lt_k = torch.log_softmax(lt.gather(-1, support), -1)
    expected = (ls_k.exp() * (ls_k - lt_k)).sum(-1)
    torch.testing.assert_close(stats.baseline_kl, expected)


def test_remote_teacher_topk_gives_topk_mass_and_tail_bucket_kl(inputs):
    student_hidden, student_weight, teacher_hidden, teacher_weight, ids = inputs
    lt = _log_softmax(teacher_hidden, teacher_weight)
    topk = lt.topk(K, -1)
    stats = completion_token_stats(
        student_hidden, student_weight, ids, teacher_topk_ids_NK=topk.indices,
        teacher_topk_logprobs_NK=topk.values,
    )  # fmt: skip
    ls = _log_softmax(student_hidden, student_weight)
    mass = ls.gather(-1, topk.indices).exp().sum(-1)
    torch.testing.assert_close(stats.topk_mass, mass)
    # Tail bucket: the support's K entries plus one bucket with the rest of each distribution.
    ls_k, lt_k = ls.gather(-1, topk.indices), topk.values
    tail_s, tail_t = torch.log1p(-mass), torch.log1p(-lt_k.exp().sum(-1))
    kl = (ls_k.exp() * (ls_k - lt_k)).sum(-1) + tail_s.exp() * (tail_s - tail_t)
    torch.testing.assert_close(stats.reverse_kl, kl)
    assert stats.baseline_kl is None and stats.jsd is None


def test_a_two_token_jsd_by_hand():
    # p_s = (0.5, 0.5), p_t = (0.9, 0.1), m = (0.7, 0.3):
    # KL(p_s||m) = 0.5 ln(5/7) + 0.5 ln(5/3) = 0.5 * (-0.3364722 + 0.5108256) = 0.0871767
    # KL(p_t||m) = 0.9 ln(9/7) + 0.1 ln(1/3) = 0.2261830 - 0.1098612 = 0.1163217
    # JSD_0.5 = 0.5 * (0.0871767 + 0.1163217) = 0.1017492
    student_weight = torch.tensor([[0.0], [0.0]])
    teacher_weight = torch.tensor([[math.log(0.9)], [math.log(0.1)]])
    stats = completion_token_stats(
        torch.ones(1, 1), student_weight, torch.tensor([0]), teacher_hidden_NH=torch.ones(1, 1),
        teacher_weight_VH=teacher_weight, jsd=True,
    )  # fmt: skip
    assert stats.jsd.item() == pytest.approx(0.1017492, abs=1e-6)
    assert stats.entropy.item() == pytest.approx(math.log(2.0))


def test_full_baseline_without_teacher_hidden_states_is_refused(inputs):
    student_hidden, student_weight, _, _, ids = inputs
    with pytest.raises(ValueError, match="hidden states"):
        completion_token_stats(student_hidden, student_weight, ids, baseline="full")


def test_chunk_stats_scatter_back_to_their_positions():
    # Two chunks of valid positions, in row-major order of the mask: (0,0), (0,2) | (1,1).
    mask_BT = torch.tensor([[1, 0, 1], [0, 1, 0]])
    stats_N = TokenStats.cat(
        [
            TokenStats(torch.tensor([-1.0, -2.0]), torch.tensor([0.5, 0.25]), jsd=torch.ones(2)),
            TokenStats(torch.tensor([-3.0]), torch.tensor([0.125]), jsd=torch.full((1,), 2.0)),
        ]
    )
    stats_BT = stats_N.scattered_BT(mask_BT)
    assert stats_BT.logprob.tolist() == [[-1.0, 0.0, -2.0], [0.0, -3.0, 0.0]]
    assert stats_BT.entropy.tolist() == [[0.5, 0.0, 0.25], [0.0, 0.125, 0.0]]
    assert stats_BT.jsd.tolist() == [[1.0, 0.0, 1.0], [0.0, 2.0, 0.0]]
    assert stats_BT.reverse_kl is None and stats_BT.logprob.dtype == torch.float32
