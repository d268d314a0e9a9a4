"""One line plot per training signal of METHODS.md ("Signals to log on every run").

    planned, skipped = plan_plots(run.history)          # which topics the run logged
    figure = build_metric_figure(spec, run.history, run.alarms, run_name="tip_q3")
    figure.savefig("reverse_kl.png")

`PLOTS` lists the topics: each names the logged keys it draws (a `*` in a key matches any
segment, e.g. each `rewards/<fn>/mean`), its title and its y axis with units. A topic whose keys
are all absent from the log is skipped (and listed as skipped in the HTML page). Collapse-guard
alarms (`opd_alarms.jsonl`) are drawn as labelled vertical lines on the plot of their signal.
Figures are built on the Agg canvas directly (no pyplot state, no display needed).

Test: `pytest tests/unit/test_report_plots.py`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from opd.report.run_log import logged_keys, metric_series

FIGURE_SIZE = (8.0, 4.6)  # inches; 120 dpi -> 960 x 552 px
DPI = 120
MARKERS_UP_TO = 40  # with this many points or fewer, each logged value gets a marker
ALARM_COLOR = "crimson"


@dataclass(frozen=True)
class Line:
    """One curve: a logged key (may hold one `*`) and its legend label (`{}` = the `*` part)."""

    key: str
    label: str
    style: str = "-"


@dataclass(frozen=True)
class PlotSpec:
    """One PNG: its file stem, title, axes and the curves it draws."""

    name: str
    title: str
    ylabel: str
    lines: tuple[Line, ...]
    right_ylabel: str = ""
    right_lines: tuple[Line, ...] = ()
    alarm_signals: tuple[str, ...] = ()
    fraction: bool = False  # the y axis is a fraction: show all of [0, 1]
    from_zero: bool = False  # the y axis starts at 0 (lengths, times)
    reference: tuple[float, str] | None = None  # a horizontal reference line and its label


# fmt: off
PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("reverse_kl", "Reverse KL(student ‖ teacher)", "reverse KL (nats per token)", (
        Line("opd/reverse_kl_k1", "k1 estimate on sampled tokens"),
        Line("opd/reverse_kl", "exact, over the vocabulary", "--"),
        Line("opd/baseline_kl", "baseline KL (vOPD value)", ":"),
    )),
    PlotSpec("divergences", "Other divergences", "divergence (nats per token)", (
        Line("opd/jsd", "JSD(student, teacher)"),
        Line("opd/divergence", "supervised divergence term", "--"),
        Line("opd/reference_kl", "KL(student ‖ reference)", ":"),
    )),
    PlotSpec("entropy", "Student entropy", "entropy (nats per token)", (
        Line("opd/entropy", "all completion tokens"),
        Line("opd/kept_entropy", "tokens kept for the loss", "--"),
    )),
    PlotSpec("reward", "Outcome reward and accuracy", "reward (mean) / accuracy (fraction)", (
        Line("reward", "reward (weighted sum of functions)"),
        Line("rewards/*/mean", "reward: {}", "--"),
        Line("opd/accuracy", "accuracy (first reward ≥ 0.5)", ":"),
    )),
    PlotSpec("length", "Completion length", "length (tokens)", (
        Line("completions/mean_length", "mean"),
        Line("completions/max_length", "max", "--"),
        Line("completions/min_length", "min", ":"),
    ), alarm_signals=("completion_length",), from_zero=True),
    PlotSpec("truncation", "Truncation and repetition", "rate (fraction)", (
        Line("completions/clipped_ratio", "truncated at max_completion_length"),
        Line("opd/repetition_rate", "repeated 4-grams (share per completion)", "--"),
    ), alarm_signals=("truncation_rate", "repetition_rate"), fraction=True),
    PlotSpec("kept_fraction", "Kept-token fraction under masks", "fraction of valid tokens", (
        Line("opd/kept_fraction", "tokens kept by the token mask"),
    ), fraction=True),
    PlotSpec("topk_mass", "Student mass on the teacher's top-k", "probability mass (fraction)", (
        Line("opd/topk_mass", "student mass on teacher top-k ids"),
    ), alarm_signals=("topk_mass",), fraction=True),
    PlotSpec("importance_ratio", "Importance ratio π_θ / π_sampler", "ratio (per token)", (
        Line("opd/ratio_mean", "mean"),
        Line("opd/ratio_max", "max", "--"),
        Line("opd/ratio_min", "min", ":"),
    ), right_ylabel="clipped tokens (fraction)", right_lines=(
        Line("opd/clip_fraction", "clipped fraction (right axis)", "-."),
    ), reference=(1.0, "ratio 1 (on-policy)")),
    PlotSpec("advantage", "Per-token advantage", "advantage (nats per token)", (
        Line("opd/advantage_mean", "mean"),
        Line("opd/advantage_std", "standard deviation", "--"),
    ), reference=(0.0, "zero")),
    PlotSpec("logprob", "Log-probability of the sampled tokens", "log-prob (nats per token)", (
        Line("opd/student_logprob", "student (sampler)"),
        Line("opd/teacher_logprob", "teacher", "--"),
    )),
    PlotSpec("teacher_latency", "Teacher scoring time per step", "time (seconds)", (
        Line("teacher/latency_s", "teacher call (client wall time)"),
        Line("teacher/server_s", "server compute", "--"),
    ), from_zero=True),
    PlotSpec("loss", "Training loss and gradient norm", "loss", (
        Line("loss", "loss"),
    ), right_ylabel="gradient norm (L2)", right_lines=(
        Line("grad_norm", "gradient norm (right axis)", "--"),
    )),
)
# fmt: on


def resolve_lines(lines: tuple[Line, ...], keys: set[str]) -> list[tuple[str, str, str]]:
    """`(key, label, style)` of each line whose key was logged, wildcards expanded (sorted).

    A wildcard that matches a single key is dropped: with one reward function its curve is the
    total reward's curve.
    """
    resolved = []
    for line in lines:
        if "*" not in line.key:
            if line.key in keys:
                resolved.append((line.key, line.label, line.style))
            continue
        matches = sorted(fnmatch.filter(keys, line.key))
        if len(matches) < 2:
            continue
        prefix, _, suffix = line.key.partition("*")
        for key in matches:
            part = key.removeprefix(prefix).removesuffix(suffix)
            resolved.append((key, line.label.format(part), line.style))
    return resolved


def plan_plots(history: list[dict[str, Any]]) -> tuple[list[PlotSpec], list[PlotSpec]]:
    """Split `PLOTS` into the topics this history logged and those it did not."""
    keys = logged_keys(history)
    planned, skipped = [], []
    for spec in PLOTS:
        has_data = resolve_lines(spec.lines + spec.right_lines, keys)
        (planned if has_data else skipped).append(spec)
    return planned, skipped


def new_figure() -> Figure:
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def build_metric_figure(
    spec: PlotSpec, history: list[dict[str, Any]], alarms: list[dict[str, Any]], *, run_name: str
) -> Figure:
    """The figure of one topic: its logged curves, reference line and alarms.

    The curves are the axes' `Line2D`s, labelled as in the legend; `line.get_xdata()` holds the
    logged steps and `line.get_ydata()` the logged values.
    """
    keys = logged_keys(history)
    figure = new_figure()
    ax = figure.add_subplot()
    handles = _draw_lines(ax, resolve_lines(spec.lines, keys), history, color_offset=0)
    right = resolve_lines(spec.right_lines, keys)
    if right:
        right_ax = ax.twinx()
        handles += _draw_lines(right_ax, right, history, color_offset=len(handles), alpha=0.6)
        right_ax.set_ylabel(spec.right_ylabel)
        right_ax.set_ylim(bottom=0)
        ax.set_zorder(right_ax.get_zorder() + 1)  # the main curves over the right-axis ones
        ax.patch.set_visible(False)
    if spec.reference is not None:
        value, label = spec.reference
        handles.append(ax.axhline(value, color="0.45", linewidth=0.8, label=label))
    handles += _draw_alarms(ax, [a for a in alarms if a.get("signal") in spec.alarm_signals])
    if spec.fraction:
        ax.set_ylim(-0.02, 1.02)
    elif spec.from_zero:
        ax.set_ylim(bottom=0)
    ax.set_title(spec.title, loc="left", fontsize=12)
    ax.set_title(run_name, loc="right", fontsize=8, color="0.4")
    ax.set_xlabel("training step")
    ax.set_ylabel(spec.ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if len(handles) > 1 or len(spec.lines + spec.right_lines) > 1:  # say which curve it is
        add_legend(figure, handles)
    return figure


def add_legend(figure: Figure, handles: list) -> None:
    """A legend under the axes (never over the data), in as many columns as fit the width."""
    labels = [handle.get_label() for handle in handles]
    figure.legend(
        handles=handles,
        labels=labels,
        loc="outside lower center",
        fontsize=8,
        ncols=legend_columns(labels),
        frameon=False,
    )


def legend_columns(labels: list[str], width_chars: int = 120) -> int:
    """The most columns whose widest labels (plus ~8 characters of line sample) fit the width.

    Legend entries fill column by column, `ceil(n / ncols)` rows each; 120 characters of 8-point
    text is about the 960-pixel figure width.
    """
    for ncols in range(len(labels), 1, -1):
        rows = -(-len(labels) // ncols)
        columns = [labels[start : start + rows] for start in range(0, len(labels), rows)]
        if sum(max(map(len, column)) + 8 for column in columns) <= width_chars:
            return ncols
    return 1


def _draw_lines(
    ax, lines: list[tuple[str, str, str]], history, *, color_offset: int, alpha: float = 1.0
) -> list:
    """Each curve with its colour and style; markers on short runs, thinner lines on long ones."""
    handles = []
    for index, (key, label, style) in enumerate(lines):
        steps, values = metric_series(history, key)
        marker = "o" if len(steps) <= MARKERS_UP_TO else None
        (handle,) = ax.plot(
            steps,
            values,
            style,
            marker=marker,
            markersize=3.5,
            linewidth=1.5 if marker else 1.0,
            alpha=alpha,
            color=f"C{color_offset + index}",
            label=label,
        )
        handles.append(handle)
    return handles


def _draw_alarms(ax, alarms: list[dict[str, Any]]) -> list:
    """A dotted vertical line at each alarm's step; one legend entry per signal."""
    handles = []
    for signal in dict.fromkeys(alarm["signal"] for alarm in alarms):
        mine = [alarm for alarm in alarms if alarm["signal"] == signal]
        first = mine[0]
        label = (
            f"alarm: {signal} at step {first['step']} ({first.get('value', float('nan')):.3g}, "
            f"threshold {first.get('threshold', float('nan')):.3g})"
        )
        if len(mine) > 1:
            label += f" + {len(mine) - 1} later"
        for index, alarm in enumerate(mine):
            handle = ax.axvline(
                alarm["step"],
                color=ALARM_COLOR,
                linestyle=(0, (2, 2)),
                linewidth=1.2,
                label=label if index == 0 else None,
            )
            if index == 0:
                handles.append(handle)
    return handles
