"""`scripts/experiments/offpolicy_ratios.py --tiny` end to end, and its resume.

The tiny plan: one warm-up step of online OPD (lr 1e-3, no lr warm-up), real `opd rollout` (vLLM,
subprocess) from the step-1 and step-0 models (0 and 1 steps stale), `opd teacher precompute`,
2 steps of Lightning OPD per form (plain, ppo) and staleness, held-out evaluation. What would fail
if the script were wrong:

- the shard set of staleness s was sampled by the step W - s model (its manifest says which);
- at the first training step the model is the step-W model, so against the 0-stale sampler (the
  same weights, vLLM in fp32) every ratio is 1 (within 1e-3), and against the 1-stale one (one
  Adam step at lr 1e-3 earlier) some are far from 1;
- plain and ppo with one update per batch take the same gradient (ratio 1, nothing clipped), so
  with the same seed, data and lr their final models evaluate identically: a script that gave
  the forms different starts, data or seeds would show a difference;
- a second invocation trains nothing (the final models are not rewritten) and returns the same
  table.

Test: `pytest tests/integration/test_offpolicy_ratios_script.py` (about 60 s on 2 CPU cores,
mostly the two vLLM rollouts).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "experiments" / "offpolicy_ratios.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("offpolicy_ratios", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # two `opd rollout` subprocesses (vLLM engine start-up)
def test_tiny_experiment_runs_resumes_and_keeps_forms_comparable(tmp_path, capsys):
    script = _load_script()
    argv = ["--tiny", "--output_dir", str(tmp_path)]
    report = script.main(argv)
    printed = capsys.readouterr().out
    for label in ("plain", "ppo", "start (step 1)", "sampler (W - s)", "1 steps stale"):
        assert label in printed

    # Who sampled each shard set: the step W - s model (W = 1; step 0 is the initial student).
    from opd.demo.pretrain import prepare_demo_models

    initial_student = str(prepare_demo_models()[1])
    samplers = {0: str(tmp_path / "warmup" / "checkpoint-1"), 1: initial_student}
    for staleness, model in samplers.items():
        manifest = json.loads(
            (tmp_path / "scores" / f"stale{staleness}" / "manifest.json").read_text()
        )
        assert manifest["rollouts"]["student"] == model

    results = report["results"]
    for form in ("plain", "ppo"):
        fresh, stale = results[form][0][0], results[form][1][0]
        fresh_first = (fresh["ratio_p05_per_step"][0], fresh["ratio_p95_per_step"][0])
        assert fresh_first == pytest.approx((1.0, 1.0), abs=1e-3)
        stale_first = (stale["ratio_p05_per_step"][0], stale["ratio_p95_per_step"][0])
        assert max(abs(r - 1.0) for r in stale_first) > 0.05
        assert len(fresh["ess_fraction_per_step"]) == 2  # one ESS per training step
        assert fresh["ess_fraction_per_step"][0] == pytest.approx(1.0, abs=1e-4)
    for staleness in (0, 1):
        plain, ppo = results["plain"][staleness][0], results["ppo"][staleness][0]
        for key in ("reverse_kl", "reverse_kl_exact", "accuracy", "ess_fraction"):
            assert ppo[key] == pytest.approx(plain[key], abs=1e-5), key

    models = sorted((tmp_path / "train").rglob("model.safetensors"))
    assert len(models) == 4  # 2 forms x 2 staleness levels, seed 0
    written = [path.stat().st_mtime_ns for path in models]
    start = time.perf_counter()
    again = script.main(argv)
    assert time.perf_counter() - start < 30  # nothing trained or sampled again
    assert [path.stat().st_mtime_ns for path in models] == written
    assert again["results"] == results
