"""`opd distill --bf16 true` on a CPU-only machine runs without `--use_cpu` (opd/config.py sets
it): one step of the embedded demo recipe, with transformers generation and a small batch to keep
it short (about 15 s). The config-level checks: `tests/unit/test_config_bf16_cpu.py`.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from opd.cli import main

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only case")


def test_distill_with_bf16_alone_runs_a_step_on_the_cpu(tmp_path):
    args = [
        "distill", "--bf16", "true", "--max_steps", "1", "--output_dir", str(tmp_path),
        "--use_vllm", "false", "--per_device_train_batch_size", "16",
        "--teacher_batch_size", "16", "--eval_before_after", "false", "--write_report", "false",
    ]  # fmt: skip
    assert main(args) == 0
    written = yaml.safe_load((tmp_path / "opd_config.yaml").read_text())
    assert written["bf16"] is True and written["use_cpu"] is True  # reproducible as run
    history = json.loads((tmp_path / "opd_results.json").read_text())["log_history"]
    [step] = [entry for entry in history if "opd/reverse_kl_k1" in entry]
    assert step["step"] == 1 and math.isfinite(step["loss"])
