"""Gated LUFFY trace insertion: the `always` / `all_fail` / Thompson (HAPO) gates and BEPA's
per-prompt cache of the policy's own verified successes.

The gates are given as strings; `opd.types.TraceGate` members compare equal to them."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch

from opd.rollout.trace_gate import PromptLedger, _beta_cdf, insert_groups_G, prompt_key

F, T = False, True


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def binomial_tail(n: int, k: int, x: Fraction) -> float:
    """P(Binomial(n, x) >= k), exact: for integers, I_x(a, b) = P(Binomial(a + b - 1, x) >= a)."""
    return float(sum(math.comb(n, j) * x**j * (1 - x) ** (n - j) for j in range(k, n + 1)))


def test_all_fail_inserts_only_into_groups_without_a_correct_rollout():
    correct_GN = torch.tensor([[F, F, F], [T, F, F], [F, F, F], [F, T, T]])
    keys_G = ["a", "b", "c", "d"]
    inserted_G = insert_groups_G(
        "all_fail", keys_G, correct_GN, PromptLedger(), threshold=0.5, generator=seeded(0)
    )
    assert inserted_G.tolist() == [True, False, True, False]
    always_G = insert_groups_G(
        "always", keys_G, correct_GN, PromptLedger(), threshold=0.5, generator=seeded(0)
    )
    assert always_G.tolist() == [True] * 4


def test_thompson_reduces_to_always_at_threshold_one_and_to_never_at_zero():
    ledger = PromptLedger()
    ledger.update(["p"], torch.tensor([[T] * 8]), cache_successes=False)  # a strong prompt
    keys_G = ["p", "q"] * 50
    correct_GN = torch.zeros(100, 4, dtype=torch.bool)
    at_one = insert_groups_G(
        "thompson", keys_G, correct_GN, ledger, threshold=1.0, generator=seeded(1)
    )
    at_zero = insert_groups_G(
        "thompson", keys_G, correct_GN, ledger, threshold=0.0, generator=seeded(1)
    )
    assert at_one.all() and not at_zero.any()


def test_thompson_insertion_rate_falls_as_successes_accumulate():
    """2000 seeded draws per posterior; prior Beta(1, 1), 5 failures, threshold 1/2.
    Expected P(theta < 1/2) = I_{1/2}(1 + s, 1 + 5), integer parameters (closed form):
      s = 0:  I(1, 6)  = 1 - (1/2)^6                               = 0.984375
      s = 5:  I(6, 6)  = 1/2 (symmetric)
      s = 20: I(21, 6) = sum_{j=21..26} C(26, j) / 2^26
                       = (65780 + 14950 + 2600 + 325 + 26 + 1) / 67108864 = 83682 / 2^26 ≈ 0.00125
    """
    expected = {0: 1 - 0.5**6, 5: 0.5, 20: 83682 / 2**26}
    num_draws, rates = 2000, {}
    for num_successes, probability in expected.items():
        ledger = PromptLedger(alpha0=1.0, beta0=1.0)
        ledger.update(["p"], torch.zeros(1, 5, dtype=torch.bool), cache_successes=False)
        ledger.update(["p"], torch.ones(1, num_successes, dtype=torch.bool), cache_successes=False)
        assert ledger.insert_probability("p", 0.5) == pytest.approx(probability, rel=1e-12)
        inserted_G = insert_groups_G(
            "thompson", ["p"] * num_draws, torch.zeros(num_draws, 1, dtype=torch.bool), ledger,
            threshold=0.5, generator=seeded(123),
        )  # fmt: skip
        rates[num_successes] = inserted_G.float().mean().item()
        # 4 binomial standard errors (plus one draw's worth for the tiny rate)
        tolerance = 4 * math.sqrt(probability * (1 - probability) / num_draws) + 1 / num_draws
        assert abs(rates[num_successes] - probability) < tolerance, (num_successes, rates)
    assert rates[0] > rates[5] > rates[20]


def test_beta_cdf_matches_closed_forms():
    # integer parameters: the binomial tail, here exactly in rationals (also large counts)
    for a, b, x in [(1, 1, "1/3"), (3, 7, "1/5"), (40, 2, "9/10"), (300, 100, "3/4")]:
        exact = binomial_tail(a + b - 1, a, Fraction(x))
        assert _beta_cdf(float(Fraction(x)), a, b) == pytest.approx(exact, rel=1e-10, abs=1e-300)
    # non-integer: I_x(1/2, 1/2) = (2 / pi) asin(sqrt(x)) (arcsine law); I_x(a, 1) = x^a
    assert _beta_cdf(0.3, 0.5, 0.5) == pytest.approx(2 / math.pi * math.asin(math.sqrt(0.3)))
    assert _beta_cdf(0.7, 2.5, 1.0) == pytest.approx(0.7**2.5)
    assert _beta_cdf(0.0, 2.0, 3.0) == 0.0 and _beta_cdf(1.0, 2.0, 3.0) == 1.0


def test_thompson_is_deterministic_for_a_seed_and_reads_the_ledger_without_changing_it():
    ledger = PromptLedger()
    ledger.update(["p", "q"], torch.tensor([[T, F], [F, F]]), cache_successes=False)
    before = ledger.state_dict()
    keys_G = ["p", "q"] * 32
    correct_GN = torch.zeros(64, 2, dtype=torch.bool)

    def draw(seed):
        return insert_groups_G(
            "thompson", keys_G, correct_GN, ledger, threshold=0.5, generator=seeded(seed)
        )

    assert torch.equal(draw(7), draw(7))
    # 64 draws with probabilities I_{1/2}(2, 2) = 1/2 and I_{1/2}(1, 3) = 7/8: two seeds agree
    # everywhere with probability < 1e-10
    assert not torch.equal(draw(7), draw(8))
    assert ledger.state_dict() == before


def test_update_counts_rollouts_and_bepa_cache_keeps_the_newest_own_success():
    ledger = PromptLedger()
    correct_GN = torch.tensor([[F, T, T], [F, F, F]])
    completions_GN = [["wrong", "right-1", "right-2"], ["x", "y", "z"]]
    ledger.update(["a", "b"], correct_GN, completions_GN, cache_successes=True)
    assert ledger.successes == {"a": 2, "b": 0} and ledger.failures == {"a": 1, "b": 3}
    # the first correct completion of a's group; b has no success and keeps the dataset trace
    assert ledger.trace_for("a", "dataset-a") == "right-1"
    assert ledger.trace_for("b", "dataset-b") == "dataset-b"
    assert ledger.trace_for("b", None) is None
    # a later success refreshes the cache; a later failure leaves it; counts add up
    ledger.update(["a"], torch.tensor([[F, F, T]]), [["n1", "n2", "newer"]], cache_successes=True)
    ledger.update(["a"], torch.tensor([[F, F, F]]), [["m1", "m2", "m3"]], cache_successes=True)
    assert ledger.trace_for("a", "dataset-a") == "newer"
    assert ledger.successes["a"] == 3 and ledger.failures["a"] == 6
    # without cache_successes only the counts move
    plain = PromptLedger()
    plain.update(["a", "b"], correct_GN, completions_GN, cache_successes=False)
    assert plain.cached_traces == {} and plain.successes == {"a": 2, "b": 0}


def test_state_dict_round_trips_through_json():
    ledger = PromptLedger(alpha0=0.5, beta0=2.0)
    ledger.update(
        [prompt_key("p"), prompt_key([{"role": "user", "content": "q"}])],
        torch.tensor([[T, F], [F, F]]), [["ünïcode ok", "no"], ["x", "y"]], cache_successes=True,
    )  # fmt: skip
    restored = PromptLedger.from_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert restored == ledger
    restored.successes[prompt_key("p")] += 1  # a copy, not a view of the saved state
    assert restored != ledger


def test_prompt_key_is_stable_for_equal_prompts_and_differs_otherwise():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    same = [{"content": "Be brief.", "role": "system"}, {"content": "2+2?", "role": "user"}]
    other = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}]
    assert prompt_key(chat) == prompt_key(same)
    assert prompt_key(chat) != prompt_key(other)
    assert prompt_key("2+2?") != prompt_key([{"role": "user", "content": "2+2?"}])
    key = prompt_key("2+2?")
    assert len(key) == 16 and int(key, 16) >= 0


def test_unknown_gate_and_non_bool_correctness_are_rejected():
    with pytest.raises(ValueError, match="unknown trace gate"):
        insert_groups_G(
            "sometimes", ["a"], torch.tensor([[F]]), PromptLedger(), threshold=0.5,
            generator=seeded(0),
        )  # fmt: skip
    with pytest.raises(AssertionError, match="must be bool"):
        PromptLedger().update(["a"], torch.tensor([[1.0]]), cache_successes=False)
