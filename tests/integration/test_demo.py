"""The embedded demo recipe (`opd distill` with no arguments), shortened to 2 steps.

Real parts: the demo's locally trained teacher and student (cached in `$OPD_CACHE_DIR` or
~/.cache/opd/demo; built on first use, ~1 min), vLLM (CPU) rollouts, the before/after table.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_embedded_demo_runs_and_prints_the_table(tmp_path):
    output_dir = tmp_path / "demo"
    command = [
        sys.executable, "-m", "opd.cli", "distill",
        "--max_steps", "2", "--warmup_steps", "0", "--output_dir", str(output_dir),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "accuracy (held-out, greedy)" in result.stdout
    assert "reverse KL(student||teacher)" in result.stdout

    results = json.loads((output_dir / "opd_results.json").read_text())
    before, after = results["before"], results["after"]
    # The teacher knows the task, the student does not (yet): that is what the demo distills.
    assert after["teacher_accuracy"] > 0.9
    assert before["accuracy"] < after["teacher_accuracy"] - 0.3
    assert before["reverse_kl"] > 0.5
    logged = [entry for entry in results["log_history"] if "opd/reverse_kl_k1" in entry]
    assert len(logged) >= 1
