"""The TIP plot: sampled tokens on the entropy-vs-divergence plane, kept vs dropped.

    figure = build_tip_figure(run.tip_samples, run_name="tip_q3")

Axes are TIP's normalised ones (opd/objectives/tip.py): `h = H / ln V` (student entropy) and
`j = JSD / ln 2` (student-teacher divergence), both in [0, 1]. The dashed lines are the q3
thresholds (the `tip_entropy_quantile` of h and the `tip_divergence_quantile` of j), averaged
over the sampled steps, which the legend says; the four quadrants are labelled, the q3 one
("confident & wrong": low entropy, high divergence) in red. When the rule computed no
divergence (entropy-only `entropy_sample`) the figure is a histogram of h instead, and its title
says so. The samples come from `opd_tip_tokens.jsonl` (opd/report/token_sample.py).

Test: `pytest tests/unit/test_report_plots.py`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from opd.report.plots import add_legend, new_figure

MAX_POINTS = 20_000  # beyond this the scatter is a random subsample (seeded)
KEPT_COLOR, DROPPED_COLOR = "tab:red", "0.55"
QUADRANTS = (  # (x, y) in axes fraction, text, alignment
    (0.02, 0.97, "confident & wrong (q3)", "left", "top"),
    (0.98, 0.97, "uncertain & wrong", "right", "top"),
    (0.02, 0.03, "confident & right", "left", "bottom"),
    (0.98, 0.03, "uncertain & right", "right", "bottom"),
)


def build_tip_figure(samples: list[dict[str, Any]], *, run_name: str) -> Figure | None:
    """Scatter (or entropy histogram) of the sampled TIP tokens; None when there are none."""
    samples = [row for row in samples if row.get("h")]
    if not samples:
        return None
    figure = new_figure()
    ax = figure.add_subplot()
    rule = samples[-1].get("rule", "?")
    steps = f"steps {samples[0]['step']}–{samples[-1]['step']}"
    with_j = [row for row in samples if row.get("j") is not None]
    if with_j:
        h_N, j_N, kept_N = _stack(with_j, ("h", "j", "kept"))
        _draw_scatter(ax, h_N, j_N, kept_N.astype(bool))
        h_line = float(np.mean([row["h_threshold"] for row in with_j]))
        j_line = float(np.mean([row["j_threshold"] for row in with_j]))
        _draw_quadrants(ax, h_line, j_line, len(with_j), with_j[-1])
        ax.set_xlim(0, max(0.05, float(h_N.max()), h_line) * 1.08)
        ax.set_ylim(0, max(0.05, float(j_N.max()), j_line) * 1.15)  # room for the labels
        ax.set_ylabel("normalised divergence j = JSD / ln 2 (0–1)")
        title = f"TIP tokens: entropy vs divergence (rule {rule}, {steps})"
    else:
        h_N, kept_N = _stack(samples, ("h", "kept"))
        _draw_entropy_histogram(ax, h_N, kept_N.astype(bool), samples)
        ax.set_ylabel("sampled tokens (count)")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        title = f"TIP tokens: entropy only (rule {rule} logs no divergence; {steps})"
    ax.set_title(title, loc="left", fontsize=11)
    ax.set_title(run_name, loc="right", fontsize=8, color="0.4")
    ax.set_xlabel("normalised student entropy h = H / ln V (0–1)")
    ax.grid(alpha=0.3)
    add_legend(figure, ax.get_legend_handles_labels()[0])
    return figure


def _stack(samples: list[dict[str, Any]], fields: tuple[str, ...]) -> list[np.ndarray]:
    """Concatenate per-step lists; past `MAX_POINTS` tokens keep a seeded random subset."""
    arrays = [
        np.concatenate([np.asarray(row[name], dtype=float) for row in samples]) for name in fields
    ]
    if arrays[0].size > MAX_POINTS:
        pick = np.sort(np.random.default_rng(0).choice(arrays[0].size, MAX_POINTS, replace=False))
        arrays = [array[pick] for array in arrays]
    return arrays


def _draw_scatter(ax, h_N: np.ndarray, j_N: np.ndarray, kept_N: np.ndarray) -> None:
    size = 14 if h_N.size <= 2000 else 5
    ax.scatter(
        h_N[~kept_N],
        j_N[~kept_N],
        s=size,
        c=DROPPED_COLOR,
        alpha=0.45,
        linewidths=0,
        label=f"dropped ({int((~kept_N).sum())} tokens)",
    )
    ax.scatter(
        h_N[kept_N],
        j_N[kept_N],
        s=size,
        c=KEPT_COLOR,
        alpha=0.6,
        linewidths=0,
        label=f"kept for the loss ({int(kept_N.sum())} tokens)",
    )


def _draw_quadrants(ax, h_line: float, j_line: float, num_steps: int, last: dict) -> None:
    label = (
        f"q3 thresholds (mean of {num_steps} steps): h < {h_line:.3f} "
        f"(q{last['entropy_quantile']:g}), j ≥ {j_line:.3f} (q{last['divergence_quantile']:g})"
    )
    ax.axvline(h_line, color="0.2", linestyle="--", linewidth=1.0, label=label)
    ax.axhline(j_line, color="0.2", linestyle="--", linewidth=1.0)
    for x, y, text, horizontal, vertical in QUADRANTS:
        ax.text(
            x,
            y,
            text,
            transform=ax.transAxes,
            ha=horizontal,
            va=vertical,
            fontsize=8,
            color=KEPT_COLOR if "q3" in text else "0.25",
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8},
        )


def _draw_entropy_histogram(ax, h_N: np.ndarray, kept_N: np.ndarray, samples: list) -> None:
    bins = np.linspace(0, max(0.05, float(h_N.max())) * 1.02, 41)
    ax.hist(
        [h_N[kept_N], h_N[~kept_N]],
        bins=bins,
        stacked=True,
        color=[KEPT_COLOR, DROPPED_COLOR],
        label=["kept for the loss", "dropped"],
    )
    h_line = float(np.mean([row["h_threshold"] for row in samples]))
    quantile = samples[-1]["entropy_quantile"]
    ax.axvline(
        h_line,
        color="0.2",
        linestyle="--",
        linewidth=1.0,
        label=f"h quantile q{quantile:g}, mean over {len(samples)} steps: {h_line:.3f}",
    )
