"""TIP token selection (METHODS.md s.3): hand-computed masks on a 2x3 batch, sampling statistics."""

from __future__ import annotations

import math

import pytest
import torch

from opd.objectives.tip import batch_quantile, kept_fraction, tip_axes, tip_keep_mask
from opd.types import TipRule

VOCAB = 1000
LN_V, LN_2 = math.log(VOCAB), math.log(2.0)
# Normalised axes h = H / ln V and j = JSD / ln 2 of a 2x3 batch; the masked token (1, 2) has
# h = 0, j = 1, so every rule but entropy_sample would pick it if the mask were ignored.
H_BT = torch.tensor([[0.1, 0.8, 0.4], [0.6, 0.2, 0.0]])
J_BT = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.7, 1.0]])
ENTROPY_BT = H_BT * LN_V
DIVERGENCE_BT = J_BT * LN_2
MASK_BT = torch.tensor([[1, 1, 1], [1, 1, 0]])


def keep(rule, entropy_BT=ENTROPY_BT, divergence_BT=DIVERGENCE_BT, mask_BT=MASK_BT, **kwargs):
    return tip_keep_mask(rule, entropy_BT, divergence_BT, mask_BT, vocab_size=VOCAB, **kwargs)


def test_axes_normalise_and_clamp():
    # h = [1.5 ln V, 0.25 ln V] / ln V = [1.5 -> 1.0, 0.25]; j = [-1e-3, 0.5 ln 2] / ln 2 =
    # [-1e-3 -> 0.0, 0.5].
    h_BT, j_BT = tip_axes(
        torch.tensor([[1.5 * LN_V, 0.25 * LN_V]]),
        torch.tensor([[-1e-3, 0.5 * LN_2]]),
        vocab_size=VOCAB,
    )
    torch.testing.assert_close(h_BT, torch.tensor([[1.0, 0.25]]))
    torch.testing.assert_close(j_BT, torch.tensor([[0.0, 0.5]]))


def test_none_keeps_the_completion_mask():
    assert torch.equal(keep("none"), MASK_BT.bool())


def test_q3_keeps_the_overconfident_wrong_token():
    # Valid h sorted [0.1, 0.2, 0.4, 0.6, 0.8]: median (pos 0.5 * 4 = 2) = 0.4 -> h < 0.4 at
    # (0, 0) and (1, 1). Valid j sorted [0.1, 0.2, 0.3, 0.7, 0.9]: 0.8-quantile (pos 3.2) =
    # 0.7 + 0.2 * (0.9 - 0.7) = 0.74 -> j >= 0.74 only at (0, 0). The masked (1, 2), h = 0 and
    # j = 1, neither counts nor shifts the thresholds (with it the median would be 0.3).
    expected = torch.tensor([[True, False, False], [False, False, False]])
    assert torch.equal(keep("q3"), expected)


def test_q3_thresholds_are_configurable():
    # entropy_quantile = 0.75 (pos 3 -> 0.6): h < 0.6 at (0, 0), (0, 2), (1, 1);
    # divergence_quantile = 0.5 (pos 2 -> 0.3): j >= 0.3 at (0, 0), (0, 2), (1, 1).
    # Counting the masked (1, 2) in the statistics would give j >= 0.5 and drop (0, 2).
    expected = torch.tensor([[True, False, True], [False, True, False]])
    assert torch.equal(keep("q3", entropy_quantile=0.75, divergence_quantile=0.5), expected)


def test_q3_decides_tied_tokens_alike_when_float_noise_splits_the_tie():
    """Tokens tied at a threshold in one layout come out an ulp apart in another (the 2-process
    equivalence test saw 0.34397417 vs 0.34397420): both layouts keep the same tokens."""
    j_tied = torch.tensor([[0.2, 0.34397420, 0.34397420], [0.34397420, 0.34397420, 0.1]])
    j_split = torch.tensor([[0.2, 0.34397417, 0.34397420], [0.34397417, 0.34397420, 0.1]])
    h_BT = torch.tensor([[0.5, 0.1, 0.1], [0.1, 0.1, 0.9]])  # 0.9-quantile 0.7: all but one
    ones_BT = torch.ones(2, 3)
    # the 0.8-quantile of j (position 4 of 6) is the tied value, or the upper of the split pair
    kept = [
        keep("q3", h_BT * LN_V, j_BT * LN_2, ones_BT, entropy_quantile=0.9, divergence_quantile=0.8)
        for j_BT in (j_tied, j_split)
    ]
    assert torch.equal(kept[0], kept[1])
    assert kept[0][0, 1:].all() and kept[0][1, :2].all()  # the four tied tokens, all kept


def test_type_aware_is_top_entropy_union_q3():
    # n = floor(0.5 * 5) = 2 highest h: 0.8 at (0, 1), 0.6 at (1, 0); q3 = {(0, 0)}.
    expected = torch.tensor([[True, True, False], [True, False, False]])
    assert torch.equal(keep("type_aware", keep_ratio=0.5), expected)
    union = keep("q3") | keep("type_aware", keep_ratio=0.5, entropy_quantile=0.0)
    assert torch.equal(keep("type_aware", keep_ratio=0.5), union)


def test_entropy_sample_keeps_exactly_the_positive_weight_tokens():
    # alpha = 1, gamma = 1: weight h * j = [[0.09, 0.08, 0.12], [0.12, 0.14, -]]; with
    # j = 0 at (0, 1), (0, 2), (1, 0) the positive weights are 0.09 at (0, 0) and 0.14 at (1, 1),
    # and n = floor(0.5 * 5) = 2, so those two are the only possible draw.
    divergence_BT = torch.tensor([[0.9, 0.0, 0.0], [0.0, 0.7, 1.0]]) * LN_2
    expected = torch.tensor([[True, False, False], [False, True, False]])
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        kept = keep("entropy_sample", divergence_BT=divergence_BT, gamma=1.0, generator=generator)
        assert torch.equal(kept, expected)


def test_entropy_sample_fills_with_zero_weight_tokens():
    # Two positive weights, n = floor(0.8 * 5) = 4: both kept plus 2 of the 3 zero-weight tokens.
    divergence_BT = torch.tensor([[0.9, 0.0, 0.0], [0.0, 0.7, 1.0]]) * LN_2
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        kept = keep(
            "entropy_sample",
            divergence_BT=divergence_BT,
            gamma=1.0,
            keep_ratio=0.8,
            generator=generator,
        )
        assert kept[0, 0] and kept[1, 1] and int(kept.sum()) == 4 and not kept[1, 2]


@pytest.mark.parametrize("keep_ratio", [0.01, 0.25, 0.3, 0.5, 0.77, 1.0])
def test_entropy_sample_keeps_floor_ratio_times_valid(keep_ratio):
    generator = torch.Generator().manual_seed(0)
    mask_BT = torch.rand(4, 37, generator=generator) > 0.3
    entropy_BT = torch.rand(4, 37, generator=generator) * LN_V
    divergence_BT = torch.rand(4, 37, generator=generator) * LN_2
    n_valid = int(mask_BT.sum())
    kept = keep("entropy_sample", entropy_BT, divergence_BT, mask_BT, keep_ratio=keep_ratio)
    assert int(kept.sum()) == max(1, math.floor(keep_ratio * n_valid))
    assert not (kept & ~mask_BT).any()
    assert kept_fraction(kept, mask_BT) == int(kept.sum()) / n_valid


def test_entropy_sample_frequencies_follow_the_weights():
    # One draw (n = floor(0.25 * 5) = 1), gamma = 0: P(token) = h / sum h over valid tokens.
    # Valid h = [0.1, 0.8, 0.4, 0.6, 0.2], sum 2.1: (0, 2) at 0.4 has twice the weight of (1, 1)
    # at 0.2, so P = 0.4 / 2.1 = 0.190 vs 0.2 / 2.1 = 0.095.
    counts_BT = torch.zeros(2, 3)
    n_draws = 4000
    for seed in range(n_draws):
        counts_BT += keep(
            "entropy_sample", keep_ratio=0.25, generator=torch.Generator().manual_seed(seed)
        )
    frequency_BT = counts_BT / n_draws
    expected_BT = torch.tensor([[0.1, 0.8, 0.4], [0.6, 0.2, 0.0]]) / 2.1
    torch.testing.assert_close(frequency_BT, expected_BT, atol=0.025, rtol=0.0)
    assert counts_BT[0, 2] > 1.5 * counts_BT[1, 1]
    assert counts_BT[1, 2] == 0


def test_entropy_sample_never_keeps_zero_entropy_tokens():
    # gamma = 0: weight h^1; (0, 1) and (1, 0) have h = 0; 4 positive-weight tokens >= n = 3.
    entropy_BT = torch.tensor([[0.5, 0.0, 0.1], [0.0, 0.9, 0.3]]) * LN_V
    mask_BT = torch.ones(2, 3)
    for seed in range(300):
        generator = torch.Generator().manual_seed(seed)
        kept = keep("entropy_sample", entropy_BT, mask_BT=mask_BT, generator=generator)
        assert int(kept.sum()) == 3 and not kept[0, 1] and not kept[1, 0]


@pytest.mark.parametrize("rule", list(TipRule))
def test_masked_tokens_are_never_kept(rule):
    generator = torch.Generator().manual_seed(1)
    mask_BT = torch.rand(3, 50, generator=generator) > 0.5
    # Masked tokens carry the most attractive values for every rule.
    entropy_BT = torch.where(mask_BT, torch.rand(3, 50, generator=generator), 0.0) * LN_V
    divergence_BT = torch.where(mask_BT, torch.rand(3, 50, generator=generator), 1.0) * LN_2
    kept = keep(rule, entropy_BT, divergence_BT, mask_BT, keep_ratio=0.9, generator=generator)
    assert kept.dtype == torch.bool
    assert not (kept & ~mask_BT).any()


@pytest.mark.parametrize("rule", list(TipRule))
def test_all_masked_keeps_nothing(rule):
    kept = keep(rule, mask_BT=torch.zeros(2, 3))
    assert not kept.any()
    assert kept_fraction(kept, torch.zeros(2, 3)) == 0.0


def test_kept_fraction():
    # 2 kept of 5 valid; the kept masked (1, 2) does not count.
    kept = torch.tensor([[1, 0, 0], [0, 1, 1]])
    assert kept_fraction(kept, MASK_BT) == pytest.approx(2 / 5)


def test_batch_quantile_matches_torch_quantile():
    values_N = torch.randn(101, generator=torch.Generator().manual_seed(0))
    for q in [0.0, 0.1, 0.5, 0.8, 0.973, 1.0]:
        torch.testing.assert_close(batch_quantile(values_N, q), torch.quantile(values_N, q))


def test_unknown_rule_names_the_allowed_rules():
    with pytest.raises(ValueError, match=r"none, entropy_sample, q3, type_aware"):
        keep("top_k")
