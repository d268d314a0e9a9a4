"""Collapse guards in real `opd distill` runs on the demo models (transformers generation).

One run is made to collapse by construction: `max_completion_length 1` cuts every completion, so
the truncation guard (patience 2, action stop) must end training at step 2 of 4, write the alarm
and show the warning on the console. It runs through the real CLI in a subprocess, to see what a
user sees. The other run is healthy: with the default thresholds (start value = the first log, so
that the relative guards judge steps 2 and 3) it stays silent, and its logs carry every metric the
guards read (a renamed key would otherwise turn a guard off without a word).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from opd.cli import main
from opd.guards import ALARM_COUNT_KEY, ALARMS_FILE, SIGNALS

RECIPE = Path(__file__).parents[2] / "recipes" / "vanilla_opd-tiny.yaml"
# No report either: these tests read the logs and the alarms file, not the plots.
NO_VLLM = ["--use_vllm", "false", "--logging_steps", "1", "--save_strategy", "no",
           "--write_report", "false"]  # fmt: skip


@pytest.fixture(scope="module")
def demo_models():
    from opd.demo.pretrain import prepare_demo_models

    return prepare_demo_models()  # built once, cached outside the repo


def _history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "opd_results.json").read_text())["log_history"]


def test_truncation_guard_stops_the_run_at_the_expected_step(demo_models, tmp_path):
    command = [
        sys.executable, "-m", "opd.cli", "distill", "--config", str(RECIPE),
        "--output_dir", str(tmp_path), *NO_VLLM, "--max_steps", "4",
        "--max_completion_length", "1", "--guard_truncation_rate", "0.5",
        "--guard_patience", "2", "--guard_action", "stop",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    message = (
        "opd guard: truncation_rate at step 2 is 1.0, above guard_truncation_rate 0.5 for 2 logs "
        "in a row; stopping training (guard_action=stop)"
    )
    # what the user sees on the console: the warning on a line of its own, not after the bar
    assert message in [line.split("\r")[-1] for line in result.stderr.split("\n")]
    [alarm] = [json.loads(line) for line in (tmp_path / ALARMS_FILE).read_text().splitlines()]
    assert alarm == {
        "step": 2, "signal": "truncation_rate", "value": 1.0, "threshold": 0.5,
        "message": message, "field": "guard_truncation_rate", "start": None,
    }  # fmt: skip
    steps = [entry for entry in _history(tmp_path) if "completions/clipped_ratio" in entry]
    assert [(e["step"], e[ALARM_COUNT_KEY]) for e in steps] == [(1, 0), (2, 1)]
    assert max(entry["step"] for entry in _history(tmp_path)) == 2  # stopped, not 4 steps
    assert (tmp_path / "model.safetensors").is_file()  # the caller still saves the model
    # one compact line per logging step (opd/trainer/console.py), not TRL's whole logs dict
    step_lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in step_lines] == ["step 1/4", "step 2/4"]
    assert step_lines[1].endswith(" | alarms 1") and "{'loss'" not in result.stdout


def test_healthy_run_with_default_guards_stays_silent(demo_models, tmp_path, caplog):
    args = ["distill", "--config", str(RECIPE), "--output_dir", str(tmp_path), *NO_VLLM]
    with caplog.at_level("WARNING", logger="opd.guards"):
        assert (
            main([*args, "--max_steps", "3", "--teacher_top_k", "5", "--guard_start_logs", "1"])
            == 0
        )
    assert [r for r in caplog.records if r.name == "opd.guards"] == []
    assert not (tmp_path / ALARMS_FILE).exists()
    steps = [entry for entry in _history(tmp_path) if "opd/reverse_kl_k1" in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3]
    for entry in steps:
        assert all(signal.key in entry for signal in SIGNALS), sorted(entry)
        assert entry[ALARM_COUNT_KEY] == 0
