"""`scripts/experiments/mopd_vs_opsd.py` at a tiny size end to end, and its resume.

Tiny size: 1 step of batch 16 (4 prompts x 4 rollouts) per arm, seed 0, 8 held-out prompts and
1 sample each. What would fail if the script were wrong:

- each arm's resolved `opd_config.yaml` holds its method: all three the outcome advantage
  (weight 1, no sampled-token KL) and the self-teacher; grpo no divergence and no peers, opsd
  and mopd the same JSD (beta 0.5, temperature 1.1, full vocabulary), mopd contrastive peers;
- only mopd's log has MOPD's counters, every row of it has a context (peers or reference), and
  where a group had a success its divergence differs from opsd's on the same rollouts;
- same seed, same first step: the three arms sampled the same rollouts (same training reward);
- the "before" numbers are the initial student's, recomputed here independently: greedy
  accuracy on the same 8 prompts;
- a second invocation trains nothing (no model rewritten), is fast, and prints the same table.

Test: `pytest tests/integration/test_mopd_vs_opsd_script.py` (about 10 s on 2 CPU cores).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "experiments" / "mopd_vs_opsd.py"
ARGV = ["--steps", "1", "--batch_size", "16", "--seeds", "0", "--eval_prompts", "8",
        "--eval_samples", "1"]  # fmt: skip


def _load_script():
    spec = importlib.util.spec_from_file_location("mopd_vs_opsd", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _table(printed: str) -> str:
    return printed[printed.index("arm  ") :]


def _initial_accuracy(prompts: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.demo.evaluate import greedy_accuracy
    from opd.demo.pretrain import MAX_NEW_TOKENS, demo_splits, prepare_demo_models

    student = str(prepare_demo_models()[1])
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    held_out = demo_splits()[1].select(range(prompts))
    tokenizer = AutoTokenizer.from_pretrained(student)
    return greedy_accuracy(model, tokenizer, held_out, max_new_tokens=MAX_NEW_TOKENS)


@pytest.mark.slow  # three 1-step `opd distill` runs and their evaluations
def test_tiny_experiment_runs_three_arms_and_resumes(tmp_path, capsys):
    script = _load_script()
    argv = [*ARGV, "--output_dir", str(tmp_path)]
    start = time.perf_counter()
    report = script.main(argv)
    assert time.perf_counter() - start < 90
    printed = _table(capsys.readouterr().out)
    for arm in ("grpo", "opsd", "mopd"):
        assert f"\n{arm} " in printed and f"\nmean {arm} " in printed

    runs = {arm: tmp_path / "s1-b16-lr0.0003" / "seed0" / arm for arm in ("grpo", "opsd", "mopd")}
    configs = {
        arm: yaml.safe_load((run / "opd_config.yaml").read_text()) for arm, run in runs.items()
    }
    for config in configs.values():
        assert (config["opd_outcome_weight"], config["opd_kl_coef"]) == (1.0, 0.0)
        assert config["teacher_mode"] == "self" and config["max_steps"] == 1
    assert (configs["grpo"]["opd_divergence"], configs["grpo"]["mopd_peers"]) == ("none", "none")
    assert (configs["opsd"]["opd_divergence"], configs["opsd"]["mopd_peers"]) == ("jsd", "none")
    assert configs["mopd"]["mopd_peers"] == "contrastive"
    loss_fields = ("opd_divergence", "opd_divergence_beta", "opd_divergence_temperature",
                   "opd_divergence_support", "teacher_context_column")  # fmt: skip
    assert [configs["mopd"][f] for f in loss_fields] == [configs["opsd"][f] for f in loss_fields]
    assert configs["opsd"]["opd_divergence_temperature"] == 1.1

    first_steps = {
        arm: json.loads((run / "opd_results.json").read_text())["log_history"][0]
        for arm, run in runs.items()
    }
    assert first_steps["mopd"]["opd/mopd_context_fraction"] == 1.0
    # Seed 0's first batch has a group with a success: those rows' teacher read peers, not the
    # reference, so MOPD's divergence differs from OPSD's on the same rollouts.
    assert first_steps["mopd"]["opd/mopd_groups_with_success"] > 0
    assert first_steps["mopd"]["opd/divergence"] != pytest.approx(
        first_steps["opsd"]["opd/divergence"], rel=1e-3
    )
    assert "opd/mopd_context_fraction" not in first_steps["opsd"]
    assert first_steps["grpo"]["reward"] == first_steps["opsd"]["reward"]
    assert first_steps["grpo"]["reward"] == first_steps["mopd"]["reward"]
    assert report["before"]["accuracy"] == pytest.approx(_initial_accuracy(8))
    assert set(report["self_teacher_accuracy"]) == {"reference", "one peer success"}

    models = sorted(tmp_path.rglob("model.safetensors"))
    assert len(models) == 3
    written = [path.stat().st_mtime_ns for path in models]
    start = time.perf_counter()
    again = script.main(argv)
    assert time.perf_counter() - start < 15  # nothing trained or evaluated again
    assert [path.stat().st_mtime_ns for path in models] == written
    assert again["cells"] == report["cells"]
    again_printed = _table(capsys.readouterr().out)
    assert again_printed.split("\nwall time")[0] == printed.split("\nwall time")[0]
