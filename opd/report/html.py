"""The report's HTML page: run facts, summary tables, the plots, alarms and skipped plots.

    html = render_page(run, figures=[("reverse_kl.png", "Reverse KL ...")], skipped=[...])

Images are referenced by relative path (the PNGs sit beside `index.html`), so the folder can be
copied or served as is. Everything shown comes from the `RunLog` (opd/report/run_log.py).

Test: `pytest tests/unit/test_report_plots.py`.
"""

from __future__ import annotations

from html import escape
from typing import Any

from opd.report.run_log import RunLog, metric_series

SUMMARY_KEYS = (  # (logged key, what it is, unit)
    ("opd/reverse_kl_k1", "reverse KL, k1 on sampled tokens", "nats/token"),
    ("opd/reverse_kl", "reverse KL, exact", "nats/token"),
    ("opd/entropy", "student entropy", "nats/token"),
    ("reward", "outcome reward", "mean"),
    ("opd/accuracy", "accuracy", "fraction"),
    ("completions/mean_length", "completion length", "tokens"),
    ("completions/clipped_ratio", "truncation rate", "fraction"),
    ("opd/repetition_rate", "repetition rate", "fraction"),
    ("opd/kept_fraction", "kept-token fraction", "fraction"),
    ("opd/topk_mass", "student mass on teacher top-k", "fraction"),
    ("opd/ratio_mean", "importance ratio, mean", "ratio"),
    ("teacher/latency_s", "teacher latency", "seconds"),
    ("loss", "loss", ""),
)
CONFIG_KEYS = (
    "model_name_or_path",
    "teacher_model_name_or_path",
    "teacher_mode",
    "teacher_top_k",
    "tip_rule",
    "opd_baseline",
    "learning_rate",
    "max_steps",
)
STYLE = """body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3;text-align:left}
img{max-width:100%;border:1px solid #ddd}figure{margin:0 0 2em}.alarm{color:#b00020}
.note{color:#555}"""


def render_page(
    run: RunLog, *, figures: list[tuple[str, str]], skipped: list[str], notes: list[str]
) -> str:
    """The whole page. `figures`: (png file name, caption); `skipped`: plot titles not drawn."""
    name = escape(run_name(run))
    status = "finished" if run.finished else "unfinished: metrics up to the newest checkpoint"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>opd report: {name}</title>",
        f"<style>{STYLE}</style></head><body><h1>opd report: {name}</h1>",
        f"<p>Run folder <code>{escape(str(run.run_dir))}</code> ({status}). Metrics read from "
        f"<code>{escape(str(run.source))}</code>.</p>",
        _table(["field", "value"], _config_rows(run)),
        "<h2>Summary</h2>",
        _table(["signal", "unit", "first", "last"], _summary_rows(run.history)),
    ]
    if isinstance(run.results.get("before"), dict) and isinstance(run.results.get("after"), dict):
        parts += ["<h2>Before / after training (held-out)</h2>", _before_after(run.results)]
    parts += ["<h2>Alarms</h2>", _alarms(run.alarms), "<h2>Plots</h2>"]
    for file_name, caption in figures:
        parts.append(
            f"<figure><img src='{escape(file_name)}' alt='{escape(caption)}'>"
            f"<figcaption>{escape(caption)}</figcaption></figure>"
        )
    skipped_text = ", ".join(escape(title) for title in skipped) or "none"
    parts.append(
        f"<p class='note'>Skipped plots (the run logged none of their keys): {skipped_text}.</p>"
    )
    parts += [f"<p class='note'>{escape(note)}</p>" for note in notes]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def run_name(run: RunLog) -> str:
    configured = run.config.get("run_name")
    return str(configured) if configured else run.run_dir.resolve().name


def _config_rows(run: RunLog) -> list[list[str]]:
    rows = [[key, str(run.config[key])] for key in CONFIG_KEYS if key in run.config]
    steps = [entry["step"] for entry in run.history if "step" in entry]
    if steps:
        rows.append(["logged steps", f"{min(steps)}–{max(steps)}"])
    if "train_wall_s" in run.results:
        rows.append(["training wall time", f"{run.results['train_wall_s']} s"])
    return rows


def _summary_rows(history: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for key, what, unit in SUMMARY_KEYS:
        steps, values = metric_series(history, key)
        if values:
            rows.append(
                [
                    f"{what} ({key})",
                    unit,
                    f"{values[0]:.4g} (step {steps[0]})",
                    f"{values[-1]:.4g} (step {steps[-1]})",
                ]
            )
    return rows


def _before_after(results: dict[str, Any]) -> str:
    before, after = results["before"], results["after"]
    rows = [
        [key, _number(before.get(key)), _number(after.get(key))]
        for key in dict.fromkeys([*before, *after])
    ]
    return _table(["metric", "before", "after"], rows)


def _alarms(alarms: list[dict[str, Any]]) -> str:
    if not alarms:
        return "<p>No collapse-guard alarm was raised (or the run wrote no opd_alarms.jsonl).</p>"
    items = [
        f"<li class='alarm'>step {escape(str(a.get('step')))}: <b>{escape(str(a.get('signal')))}"
        f"</b> = {escape(_number(a.get('value')))} "
        f"(threshold {escape(_number(a.get('threshold')))}) "
        f"{escape(str(a.get('message', '')))}</li>"
        for a in alarms
    ]
    return "<ul>" + "".join(items) + "</ul>"


def _table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "<p class='note'>(nothing logged)</p>"
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
