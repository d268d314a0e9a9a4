"""`OPDTrainer` under DeepSpeed ZeRO-3 trains like the unsharded trainer (CUDA only).

On a CPU, accelerate runs DeepSpeed as one independent process per rank, so opd refuses it there
(`OPDConfig`) and `tests/integration/test_zero3.py` checks the lm_head path of
`opd/trainer/sharding.py` with DeepSpeed directly instead. Here the whole trainer runs: every
method of `tests/integration/mp_train.py` for 2 SGD steps, ZeRO-3 against plain, on as many
processes as there are GPUs (NCCL needs one GPU per process), fp32.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
SCRIPT = Path(__file__).parents[1] / "integration" / "mp_train.py"
METHODS = "vanilla,vopd,tip_q3,scope,luffy,divergence"


def _run(out: Path, student, teacher, processes: int, *extra: str) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={processes}", str(SCRIPT)]  # fmt: skip
    command = [*launcher, "--student", str(student), "--teacher", str(teacher), "--out",
               str(out), "--per_device_batch", str(4 // processes), "--methods", METHODS,
               *extra]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=os.environ)
    assert result.returncode == 0, result.stderr[-5000:]


def test_zero3_trains_like_the_unsharded_trainer(tiny_student, tiny_teacher, tmp_path):
    assert torch.cuda.is_available(), "this test needs a CUDA GPU"
    import deepspeed  # noqa: F401  (opd's deepspeed extra: carry its wheel to the GPU machine)

    processes = 2 if torch.cuda.device_count() >= 2 else 1
    _run(tmp_path / "plain", tiny_student, tiny_teacher, 1)
    _run(tmp_path / "zero3", tiny_student, tiny_teacher, processes, "--deepspeed")
    for method in METHODS.split(","):
        expected = torch.load(tmp_path / "plain" / f"{method}.pt")["state"]
        got = torch.load(tmp_path / "zero3" / f"{method}.pt")["state"]
        difference = max((expected[k] - got[k]).abs().max().item() for k in expected)
        assert difference <= 1e-4, f"{method}: max |dw| {difference:.2e}"  # TF32-free fp32
