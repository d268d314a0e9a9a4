"""`repetition_rate`: hand-computed shares of repeated n-grams."""

from __future__ import annotations

import pytest

from opd.objectives.repetition import repetition_rate


def test_alternating_pair_repeats_three_of_five_bigrams():
    # Bigrams 12, 21, 12, 21, 12: the last three were seen before -> 3 / 5.
    assert repetition_rate([[1, 2, 1, 2, 1, 2]], n=2) == pytest.approx(0.6)


def test_distinct_ngrams_score_zero():
    assert repetition_rate([[1, 2, 3, 4, 5, 6]], n=2) == 0.0


def test_a_single_token_loop():
    # Unigrams 7, 7, 7, 7: all but the first repeat -> 3 / 4.
    assert repetition_rate([[7, 7, 7, 7]], n=1) == pytest.approx(0.75)


def test_mean_over_completions_skips_short_ones():
    # [1,2,1,2,1,2] trigrams 121 212 121 212 -> 2/4; [5,6,5,6] trigrams 565 656 -> 0;
    # [9,9,9,9,9] trigrams 999 x3 -> 2/3; [1, 2] has no trigram and is left out.
    completions = [[1, 2, 1, 2, 1, 2], [5, 6, 5, 6], [9, 9, 9, 9, 9], [1, 2]]
    assert repetition_rate(completions, n=3) == pytest.approx((1 / 2 + 0 + 2 / 3) / 3)


def test_default_n_is_four():
    # 4-grams of [1,2,3,4,1,2,3,4]: 1234 2341 3412 4123 1234 -> 1 / 5.
    assert repetition_rate([[1, 2, 3, 4, 1, 2, 3, 4]]) == pytest.approx(0.2)


def test_no_qualifying_completion_is_zero():
    assert repetition_rate([[1, 2, 3], []], n=4) == 0.0
    assert repetition_rate([], n=2) == 0.0


def test_n_must_be_positive():
    with pytest.raises(ValueError, match="n must be >= 1"):
        repetition_rate([[1, 2]], n=0)
