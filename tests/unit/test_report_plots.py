"""`opd report` on constructed logs: which plots, what each draws, the HTML page, failures."""

from __future__ import annotations

import json

import pytest

from opd.report.plots import (
    PLOTS,
    build_metric_figure,
    legend_columns,
    plan_plots,
    resolve_lines,
)
from opd.report.tip_scatter import build_tip_figure
from opd.report.write import write_report, write_report_after_run

SPECS = {spec.name: spec for spec in PLOTS}


def _history(keys: dict[str, list[float]]) -> list[dict]:
    num_steps = max(len(values) for values in keys.values())
    return [
        {"step": step + 1, **{key: values[step] for key, values in keys.items()}}
        for step in range(num_steps)
    ]


def _lines(figure) -> dict[str, tuple[list, list]]:
    """Curves of every axes (twins included), by legend label."""
    return {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for ax in figure.axes
        for line in ax.get_lines()
        if not line.get_label().startswith("_")
    }


def test_plan_draws_logged_topics_and_skips_the_rest():
    history = _history({"opd/reverse_kl_k1": [1.0, 2.0], "completions/clipped_ratio": [0, 0.5]})
    planned, skipped = plan_plots(history)
    assert [spec.name for spec in planned] == ["reverse_kl", "truncation"]
    assert {spec.name for spec in skipped} == set(SPECS) - {"reverse_kl", "truncation"}
    # A right-axis-only topic (clip fraction without ratios) is still drawn.
    planned, _ = plan_plots(_history({"opd/clip_fraction": [0.1]}))
    assert [spec.name for spec in planned] == ["importance_ratio"]


def test_reward_lines_per_function_only_when_several():
    keys = {"reward", "rewards/accuracy/mean", "opd/accuracy"}
    resolved = resolve_lines(SPECS["reward"].lines, keys)
    assert [key for key, _, _ in resolved] == ["reward", "opd/accuracy"]
    resolved = resolve_lines(SPECS["reward"].lines, keys | {"rewards/format/mean"})
    assert [label for _, label, _ in resolved][1:3] == ["reward: accuracy", "reward: format"]


def test_metric_figure_draws_the_logged_values_and_alarms():
    history = _history(
        {"completions/mean_length": [3.0, 5.0, 9.0], "completions/max_length": [4.0, 8.0, 16.0]}
    )
    history.insert(1, {"step": 1, "eval_loss": 0.3})  # another log event without the keys
    alarms = [
        {"step": 2, "signal": "completion_length", "value": 5.0, "threshold": 4.0},
        {"step": 3, "signal": "completion_length", "value": 9.0, "threshold": 4.0},
        {"step": 3, "signal": "topk_mass", "value": 0.1, "threshold": 0.5},  # another plot's
    ]
    figure = build_metric_figure(SPECS["length"], history, alarms, run_name="run-a")
    lines = _lines(figure)
    assert lines["mean"] == ([1, 2, 3], [3.0, 5.0, 9.0])
    assert lines["max"] == ([1, 2, 3], [4.0, 8.0, 16.0])
    (alarm_label,) = [label for label in lines if label.startswith("alarm")]
    assert alarm_label == "alarm: completion_length at step 2 (5, threshold 4) + 1 later"
    ax = figure.axes[0]
    alarm_steps = [line.get_xdata()[0] for line in ax.get_lines() if line.get_color() == "crimson"]
    assert alarm_steps == [2, 3]
    assert ax.get_xlabel() == "training step" and ax.get_ylabel() == "length (tokens)"
    assert ax.get_title(loc="left") == "Completion length" and ax.get_title(loc="right") == "run-a"
    assert len(figure.legends) == 1  # several curves: a legend (under the axes)


def test_single_curve_has_no_legend_and_fraction_axis():
    history = _history({"opd/kept_fraction": [0.4, 0.5]})
    figure = build_metric_figure(SPECS["kept_fraction"], history, [], run_name="r")
    assert not figure.legends
    assert figure.axes[0].get_ylim() == pytest.approx((-0.02, 1.02))


def test_legend_columns_fit_the_width():
    assert legend_columns(["mean", "max", "min"]) == 3
    assert legend_columns(["x" * 50, "y" * 50, "z" * 50]) == 2
    assert legend_columns(["x" * 130, "y"]) == 1


def _tip_sample(step: int, with_j: bool = True) -> dict:
    return {
        "step": step, "rule": "q3", "h": [0.1, 0.5, 0.2], "kept": [1, 0, 0],
        "j": [0.9, 0.8, 0.1] if with_j else None, "h_threshold": 0.3 + 0.1 * step,
        "j_threshold": 0.5 if with_j else None, "entropy_quantile": 0.5,
        "divergence_quantile": 0.8,
    }  # fmt: skip


def test_tip_scatter_kept_dropped_and_mean_thresholds():
    figure = build_tip_figure([_tip_sample(1), _tip_sample(2)], run_name="r")
    ax = figure.axes[0]
    points = {c.get_label().split()[0]: c.get_offsets().tolist() for c in ax.collections}
    assert points["kept"] == [[0.1, 0.9], [0.1, 0.9]]
    assert sorted(points["dropped"]) == [[0.2, 0.1]] * 2 + [[0.5, 0.8]] * 2
    vertical, horizontal = ax.get_lines()
    assert vertical.get_xdata()[0] == pytest.approx(0.45)  # mean of 0.4 and 0.5
    assert horizontal.get_ydata()[0] == pytest.approx(0.5)
    assert "mean of 2 steps" in vertical.get_label()
    texts = [text.get_text() for text in ax.texts]
    assert "confident & wrong (q3)" in texts and len(texts) == 4


def test_tip_without_divergence_is_an_entropy_histogram():
    figure = build_tip_figure([_tip_sample(1, with_j=False)], run_name="r")
    ax = figure.axes[0]
    assert "logs no divergence" in ax.get_title(loc="left")
    assert ax.get_ylabel() == "sampled tokens (count)"
    assert build_tip_figure([], run_name="r") is None


def test_write_report_page_references_every_png(tmp_path):
    history = _history({"opd/reverse_kl_k1": [2.0, 1.0], "opd/entropy": [0.5, 0.4]})
    results = {"log_history": history, "before": {"accuracy": 0.1}, "after": {"accuracy": 0.6}}
    (tmp_path / "opd_results.json").write_text(json.dumps(results))
    (tmp_path / "opd_config.yaml").write_text("tip_rule: q3\n")
    alarm = {"step": 2, "signal": "entropy_drop", "value": 0.4, "threshold": 0.45, "message": "m<"}
    (tmp_path / "opd_alarms.jsonl").write_text(json.dumps(alarm) + "\n")
    paths = write_report(tmp_path, tmp_path / "out")
    assert [path.name for path in paths] == ["reverse_kl.png", "entropy.png", "index.html"]
    page = paths[-1].read_text()
    assert "src='reverse_kl.png'" in page and "src='entropy.png'" in page
    assert "<td>2 (step 1)</td><td>1 (step 2)</td>" in page  # first and last k1
    assert "<td>accuracy</td><td>0.1</td><td>0.6</td>" in page  # before/after
    assert "entropy_drop</b> = 0.4 (threshold 0.45) m&lt;" in page
    assert "Alarms on signals without a plot here: entropy_drop." in page
    assert "Student mass on the teacher&#x27;s top-k (opd/topk_mass)" in page  # skipped
    assert "TIP scatter (no opd_tip_tokens.jsonl" in page  # a TIP run without samples


def test_after_run_failure_warns_instead_of_raising(tmp_path, capsys, monkeypatch):
    assert write_report_after_run(tmp_path) is None  # nothing logged: a warning, no exception
    err = capsys.readouterr().err
    assert "opd: warning: the run finished and is saved in" in err
    assert "ReportError" in err and f"opd report {tmp_path}" in err

    def broken(*args, **kwargs):
        raise RuntimeError("no font")

    history = _history({"opd/entropy": [0.5]})
    (tmp_path / "opd_results.json").write_text(json.dumps({"log_history": history}))
    monkeypatch.setattr("opd.report.plots.build_metric_figure", broken)
    assert write_report_after_run(tmp_path) is None
    assert "(RuntimeError: no font)" in capsys.readouterr().err
    monkeypatch.undo()
    assert write_report_after_run(tmp_path) == tmp_path / "report" / "index.html"
    assert "opd: report written to" in capsys.readouterr().out
