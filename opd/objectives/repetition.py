"""Repetition rate: how much of each completion repeats itself, a collapse signal to log.

Distillation from a teacher the student cannot yet imitate can collapse into loops ("the the the",
a sentence over and over). The rate below rises well before the reward or the KL shows it, so the
trainer logs it beside them. It is a metric only: nothing here takes gradients.

Test: `pytest tests/unit/test_repetition.py`.
"""

from __future__ import annotations


def repetition_rate(completion_ids: list[list[int]], n: int = 4) -> float:
    """Mean, over completions of at least `n` tokens, of the share of n-grams seen earlier in it.

    An n-gram counts as repeated when the same n tokens already occurred at an earlier position
    of the same completion, so a completion that says everything once scores 0 and a loop of
    one n-gram scores `(count - 1) / count`. Shorter completions have no n-gram to judge and are
    left out rather than counted as 0, which would dilute the signal in batches of short answers.

    Args:
        completion_ids: unpadded token ids of each completion (ragged).
        n: n-gram length (>= 1).

    Returns:
        The mean repeated-n-gram share in [0, 1); 0.0 when no completion has `n` tokens.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rates = [_repeated_share(ids, n) for ids in completion_ids if len(ids) >= n]
    return sum(rates) / len(rates) if rates else 0.0


def _repeated_share(ids: list[int], n: int) -> float:
    """The share of `ids`' n-grams that occurred earlier in `ids` (`len(ids) >= n`)."""
    seen: set[tuple[int, ...]] = set()
    repeated = 0
    num_ngrams = len(ids) - n + 1
    for start in range(num_ngrams):
        ngram = tuple(ids[start : start + n])
        repeated += ngram in seen
        seen.add(ngram)
    return repeated / num_ngrams
