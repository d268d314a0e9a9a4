"""The metrics of `opd eval`: pure functions of graded completions, no model or file involved.

- `pass@k`: the probability that at least one of k completions drawn (without replacement) from
  an example's n is correct; with c correct, the unbiased estimator of Chen et al. 2021
  ("Evaluating Large Language Models Trained on Code", eq. 1): `1 - C(n-c, k) / C(n, k)`.
  The dataset's pass@k is its mean over examples.
- `mean@n`: the mean accuracy over all n completions of every example (the mean of `c / n`).
  It estimates the same quantity, a single sample's accuracy, whatever k is: hence one `mean@n`,
  not one per k. It equals pass@1.
- Length and truncation: the mean completion length in tokens and the fraction of completions
  that hit the token limit (vLLM's `finish_reason == "length"`), over all completions.

Examples whose gold answer the grader cannot parse (graded `None`) count in the number of
examples, the lengths and the truncation rate, but not in the accuracies: a bad dataset row is
not a wrong answer. Their number is reported as `num_ungradable`.

`format_table` shows a summary's models side by side, one metric per row.

Test: `pytest tests/unit/test_eval_metrics.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb
from typing import Any


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k of one example: `1 - C(n-c, k) / C(n, k)` (exact integer binomials)."""
    if not 0 <= num_correct <= num_samples or not 1 <= k <= num_samples:
        raise ValueError(
            f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={num_samples}, c={num_correct}, "
            f"k={k}."
        )
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


def example_pass_at_k(correct: Sequence[bool], ks: Sequence[int]) -> dict[str, float]:
    """`{"pass@k": value}` for each k, from one example's n correctness flags."""
    return {f"pass@{k}": pass_at_k(len(correct), sum(correct), k) for k in ks}


def summarize(
    correct_per_example: Sequence[Sequence[bool] | None],
    num_tokens_per_example: Sequence[Sequence[int]],
    truncated_per_example: Sequence[Sequence[bool]],
    ks: Sequence[int],
) -> dict[str, float | int | None]:
    """The dataset's metrics from per-example lists of n values each.

    Args:
        correct_per_example: n correctness flags per example, or None where the gold answer was
            ungradable.
        num_tokens_per_example: n completion lengths (tokens) per example.
        truncated_per_example: n flags per example, True where the completion hit the limit.
        ks: the k of each pass@k to report (each <= n).

    Returns:
        `num_examples`, `num_ungradable`, `mean@{n}`, `pass@{k}` for each k (None when no example
        is gradable), `mean_length` (tokens) and `truncation_rate`.
    """
    if not num_tokens_per_example:
        raise ValueError("summarize needs at least one example.")
    num_samples = len(num_tokens_per_example[0])
    graded = [correct for correct in correct_per_example if correct is not None]
    metrics: dict[str, float | int | None] = {
        "num_examples": len(num_tokens_per_example),
        "num_ungradable": len(correct_per_example) - len(graded),
        f"mean@{num_samples}": mean([sum(c) / len(c) for c in graded]) if graded else None,
    }
    for k in ks:
        per_example = [pass_at_k(len(c), sum(c), k) for c in graded]
        metrics[f"pass@{k}"] = mean(per_example) if graded else None
    metrics["mean_length"] = mean([n for lengths in num_tokens_per_example for n in lengths])
    metrics["truncation_rate"] = mean(
        [float(flag) for flags in truncated_per_example for flag in flags]
    )
    return metrics


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def format_table(summary: dict[str, Any]) -> str:
    """Rows: metrics; columns: the models (student, teacher)."""
    settings, models = summary["settings"], summary["models"]
    sampling = settings["sampling"]
    n = sampling["num_samples"]
    rows = [
        ("examples", "num_examples", "{:d}"),
        ("ungradable golds", "num_ungradable", "{:d}"),
        (f"mean@{n}", f"mean@{n}", "{:.1%}"),
    ]
    rows += [(f"pass@{k}", f"pass@{k}", "{:.1%}") for k in settings["k"]]
    rows += [
        ("mean length (tokens)", "mean_length", "{:.1f}"),
        ("truncation rate", "truncation_rate", "{:.1%}"),
    ]
    width = max(12, *(len(label) + 2 for label in models))
    lines = [
        f"opd eval: {settings['dataset']['dataset_name']}, {n} samples per example at temperature "
        f"{sampling['temperature']}, top_p {sampling['top_p']}, max {sampling['max_new_tokens']} "
        "new tokens",
        f"{'':24}" + "".join(f"{label:>{width}}" for label in models),
    ]
    for title, key, fmt in rows:
        values = [model["metrics"][key] for model in models.values()]
        cells = ["n/a" if value is None else fmt.format(value) for value in values]
        lines.append(f"{title:24}" + "".join(f"{cell:>{width}}" for cell in cells))
    return "\n".join(lines)
