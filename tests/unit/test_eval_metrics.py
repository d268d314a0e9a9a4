"""`opd eval`'s metrics (`opd/evaluation/metrics.py`) against values computed by hand."""

from __future__ import annotations

import pytest

from opd.evaluation.metrics import example_pass_at_k, pass_at_k, summarize

# pass@k = 1 - C(n-c, k) / C(n, k) with n = 4, C(4, 1) = 4, C(4, 2) = 6, C(4, 4) = 1:
#   c=0: every k -> 1 - C(4,k)/C(4,k) = 0
#   c=1: k=1 -> 1 - 3/4 = 1/4;  k=2 -> 1 - C(3,2)/6 = 1 - 3/6 = 1/2;  k=4 -> 1 - C(3,4)/1 = 1
#   c=2: k=1 -> 1 - 2/4 = 1/2;  k=2 -> 1 - C(2,2)/6 = 5/6;            k=4 -> 1
#   c=3: k=1 -> 3/4;            k=2 -> 1 - C(1,2)/6 = 1;              k=4 -> 1
#   c=4: 1 for every k
PASS_AT_K_N4 = {
    0: {1: 0.0, 2: 0.0, 4: 0.0},
    1: {1: 1 / 4, 2: 1 / 2, 4: 1.0},
    2: {1: 1 / 2, 2: 5 / 6, 4: 1.0},
    3: {1: 3 / 4, 2: 1.0, 4: 1.0},
    4: {1: 1.0, 2: 1.0, 4: 1.0},
}


@pytest.mark.parametrize("num_correct", range(5))
@pytest.mark.parametrize("k", [1, 2, 4])
def test_pass_at_k_by_hand(num_correct, k):
    assert pass_at_k(4, num_correct, k) == pytest.approx(PASS_AT_K_N4[num_correct][k], abs=1e-12)


def test_pass_at_1_is_the_fraction_correct_and_pass_at_n_any_correct():
    for n in (1, 3, 8):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)
            assert pass_at_k(n, c, n) == (1.0 if c else 0.0)


def test_pass_at_k_large_n_is_exact():
    # n=100, c=1, k=10: 1 - C(99,10)/C(100,10) = 1 - 90/100 = 0.1 (exact integers, no overflow).
    assert pass_at_k(100, 1, 10) == pytest.approx(0.1, abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(n, c, k)


def test_example_pass_at_k_keys():
    assert example_pass_at_k([True, False, True, False], [1, 2, 4]) == pytest.approx(
        {"pass@1": 1 / 2, "pass@2": 5 / 6, "pass@4": 1.0}
    )


def test_summarize_by_hand():
    """Three examples, n = 4; the third's gold is ungradable (None)."""
    correct = [[True, False, False, False], [True, True, True, False], None]
    num_tokens = [[10, 20, 30, 40], [5, 5, 5, 5], [1, 2, 3, 100]]
    truncated = [[False, False, False, True], [False] * 4, [False, False, False, True]]
    metrics = summarize(correct, num_tokens, truncated, ks=[1, 2, 4])
    # Accuracies over the 2 gradable examples (c = 1 and c = 3):
    #   mean@4 = (1/4 + 3/4) / 2 = 1/2;  pass@1 is the same;
    #   pass@2 = (1/2 + 1) / 2 = 3/4;    pass@4 = (1 + 1) / 2 = 1.
    # Lengths and truncation over all 12 completions:
    #   mean_length = (100 + 20 + 106) / 12 = 226 / 12;  truncation_rate = 2 / 12.
    assert metrics == pytest.approx(
        {
            "num_examples": 3,
            "num_ungradable": 1,
            "mean@4": 0.5,
            "pass@1": 0.5,
            "pass@2": 0.75,
            "pass@4": 1.0,
            "mean_length": 226 / 12,
            "truncation_rate": 2 / 12,
        }
    )


def test_summarize_with_no_gradable_example():
    metrics = summarize([None], [[3, 5]], [[True, False]], ks=[1, 2])
    assert metrics == {
        "num_examples": 1,
        "num_ungradable": 1,
        "mean@2": None,
        "pass@1": None,
        "pass@2": None,
        "mean_length": 4.0,
        "truncation_rate": 0.5,
    }
