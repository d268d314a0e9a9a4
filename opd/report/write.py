"""The report of a run (`opd report RUN_DIR`): PNG plots of its logged signals and one HTML page
holding them.

    opd report opd-runs/tip_q3                      # writes opd-runs/tip_q3/report/
    opd report opd-runs/tip_q3 --output_dir /tmp/r  # elsewhere

Reads the run folder (opd/report/run_log.py: `opd_results.json`, or the newest checkpoint's
`trainer_state.json` for a run that died), draws one PNG per logged topic (opd/report/plots.py)
plus the TIP entropy-vs-divergence scatter when the run sampled TIP tokens
(opd/report/tip_scatter.py), and writes `index.html` referencing them (opd/report/html.py).
`opd distill` calls `write_report_after_run` when training ends; a failure there only warns,
since the model and the metrics are already saved.

Test: `pytest tests/unit/test_report_plots.py tests/integration/test_report.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from opd.report.run_log import load_run, logged_keys

TIP_PLOT = "tip_scatter"


def write_report(run_dir: str | Path, output_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs and `index.html` of the run in `run_dir`; returns the paths written.

    Raises:
        ReportError: `run_dir` holds no logged metrics (the message says what was looked for).
    """
    # Here, not at module scope: `opd distill` imports this module, and a missing or broken
    # matplotlib must become the warning of `write_report_after_run`, not a failed run.
    from opd.report.html import render_page, run_name
    from opd.report.plots import build_metric_figure, plan_plots, resolve_lines
    from opd.report.tip_scatter import build_tip_figure

    run = load_run(run_dir)
    out = Path(output_dir) if output_dir is not None else run.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    name = run_name(run)
    planned, skipped = plan_plots(run.history)
    keys = logged_keys(run.history)
    written, figures = [], []
    for spec in planned:
        figure = build_metric_figure(spec, run.history, run.alarms, run_name=name)
        written.append(_save(figure, out / f"{spec.name}.png"))
        drawn = [key for key, _, _ in resolve_lines(spec.lines + spec.right_lines, keys)]
        figures.append((f"{spec.name}.png", f"{spec.title}. Logged keys: {', '.join(drawn)}."))
    skipped_titles = [
        f"{spec.title} ({', '.join(line.key for line in spec.lines + spec.right_lines)})"
        for spec in skipped
    ]
    tip_figure = build_tip_figure(run.tip_samples, run_name=name)
    if tip_figure is not None:
        written.append(_save(tip_figure, out / f"{TIP_PLOT}.png"))
        caption = "TIP tokens: student entropy vs divergence, kept vs dropped (a sample of at most "
        caption += "256 tokens per step, from opd_tip_tokens.jsonl)."
        figures.append((f"{TIP_PLOT}.png", caption))
    elif run.config.get("tip_rule", "none") != "none":
        skipped_titles.append("TIP scatter (no opd_tip_tokens.jsonl in the run folder)")
    notes = []
    unplotted = sorted({str(alarm.get("signal")) for alarm in run.alarms} - _plotted(planned))
    if unplotted:
        notes.append(f"Alarms on signals without a plot here: {', '.join(unplotted)}.")
    page = render_page(run, figures=figures, skipped=skipped_titles, notes=notes)
    index = out / "index.html"
    index.write_text(page)
    return [*written, index]


def _save(figure, path: Path) -> Path:
    figure.savefig(path)
    return path


def _plotted(planned) -> set[str]:
    """The alarm signals that the drawn plots show."""
    return {signal for spec in planned for signal in spec.alarm_signals}


def write_report_after_run(output_dir: str | Path) -> Path | None:
    """The end of `opd distill`: write the report, or warn (never raise) when that fails.

    The model and `opd_results.json` are saved before this runs, so a plotting error must not
    turn a finished run into a failed one; the warning names the error and how to retry.
    """
    try:
        paths = write_report(output_dir)
    except Exception as error:  # any plotting failure: the run itself succeeded
        print(
            f"opd: warning: the run finished and is saved in {output_dir}, but its report could "
            f"not be written ({type(error).__name__}: {error}). Retry with `opd report "
            f"{output_dir}`.",
            file=sys.stderr,
        )
        return None
    print(f"opd: report written to {paths[-1]} ({len(paths) - 1} plots)")
    return paths[-1]
