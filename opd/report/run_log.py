"""Read what a run left on disk: its logged metrics, config, alarms and TIP token samples.

    run = load_run("opd-runs/tip_q3")        # RunLog
    steps, values = metric_series(run.history, "opd/reverse_kl_k1")

Where the metrics come from, first found wins:
1. `RUN_DIR/opd_results.json` (`log_history`, written by `opd distill` when training ends);
2. `RUN_DIR/trainer_state.json` (RUN_DIR is itself a checkpoint folder);
3. the newest `RUN_DIR/checkpoint-<step>/trainer_state.json`, so a run that died or is still
   running can be reported up to its last checkpoint.
A folder with none of these raises `ReportError`, which names what it looked for.

Test: `pytest tests/unit/test_report_run_log.py`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_FILE = "opd_results.json"
CONFIG_FILE = "opd_config.yaml"
ALARMS_FILE = "opd_alarms.jsonl"
TIP_TOKENS_FILE = "opd_tip_tokens.jsonl"  # written by opd/report/token_sample.py


class ReportError(ValueError):
    """The run folder holds nothing to report, or a file in it is malformed."""


@dataclass(frozen=True)
class RunLog:
    """Everything the report draws, read from one run folder."""

    run_dir: Path
    """The folder given to `opd report` (the run's `output_dir`)."""
    source: Path
    """The file `history` was read from."""
    finished: bool
    """True when `history` comes from `opd_results.json` (training ended)."""
    history: list[dict[str, Any]]
    """TRL's `log_history`: one dict per logging event, with `step` and metric keys."""
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved config (`opd_config.yaml`), empty when absent."""
    results: dict[str, Any] = field(default_factory=dict)
    """The rest of `opd_results.json` (`train_wall_s`, demo `before`/`after`)."""
    alarms: list[dict[str, Any]] = field(default_factory=list)
    """Collapse-guard alarms: `{step, signal, value, threshold, message}` per line."""
    tip_samples: list[dict[str, Any]] = field(default_factory=list)
    """One TIP token sample per sampled step, sorted by step (see token_sample.py)."""


def load_run(run_dir: str | Path) -> RunLog:
    """Read a run folder; raises `ReportError` when it holds no logged metrics."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a folder (give the run's output_dir).")
    source, data = _find_log_history(run_dir)
    history = data.get("log_history")
    if not isinstance(history, list) or not history:
        raise ReportError(
            f"{source} has no log_history entries: the run logged no metrics yet "
            "(its first log comes after `logging_steps` steps)."
        )
    finished = source.name == RESULTS_FILE
    tip_by_step = {row["step"]: row for row in read_jsonl(run_dir / TIP_TOKENS_FILE)}
    return RunLog(
        run_dir=run_dir,
        source=source,
        finished=finished,
        history=[entry for entry in history if isinstance(entry, dict)],
        config=_read_config(run_dir / CONFIG_FILE),
        results={k: v for k, v in data.items() if k != "log_history"} if finished else {},
        alarms=sorted(read_jsonl(run_dir / ALARMS_FILE), key=lambda row: row.get("step", 0)),
        tip_samples=[tip_by_step[step] for step in sorted(tip_by_step)],  # last line per step
    )


def _find_log_history(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    candidates = [run_dir / RESULTS_FILE, run_dir / "trainer_state.json"]
    checkpoints = [
        path
        for path in run_dir.glob("checkpoint-*")
        if path.name.removeprefix("checkpoint-").isdigit()
        and (path / "trainer_state.json").is_file()
    ]
    if checkpoints:
        newest = max(checkpoints, key=lambda path: int(path.name.removeprefix("checkpoint-")))
        candidates.append(newest / "trainer_state.json")
    for path in candidates:
        if path.is_file():
            return path, _read_json(path)
    raise ReportError(
        f"{run_dir}: no logged metrics found. Looked for {RESULTS_FILE} (written when a run "
        "ends), trainer_state.json and checkpoint-*/trainer_state.json (written at each save); "
        "is this a run's output_dir?"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ReportError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ReportError(f"{path} must hold a JSON object with a log_history list.")
    return data


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    import yaml

    config = yaml.safe_load(path.read_text())
    return config if isinstance(config, dict) else {}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file, one per line; [] when the file does not exist.

    A line that is not a JSON object (e.g. a half-written last line of a live run) is skipped.
    """
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int | float):
            rows.append(row)
    return rows


def metric_series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """The `(steps, values)` at which `key` was logged, in log order; non-numbers are dropped."""
    steps, values = [], []
    for entry in history:
        value = entry.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and "step" in entry:
            steps.append(int(entry["step"]))
            values.append(float(value))
    return steps, values


def logged_keys(history: list[dict[str, Any]]) -> set[str]:
    """Every metric key with at least one finite numeric value."""
    return {
        key
        for entry in history
        for key, value in entry.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }
