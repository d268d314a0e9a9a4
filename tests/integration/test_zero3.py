"""DeepSpeed ZeRO-3: opd's fused loss gets the whole lm_head and its gradient reaches the shards.

Real parts: `torchrun --nproc_per_node 2` on the CPU (DeepSpeed's CPU accelerator, gloo),
`deepspeed.initialize` with ZeRO-3, a tiny Qwen2 model (tied and untied lm_head), the loss built
as opd's is (`logits_to_keep=1` hidden states, `full_lm_head_weight`, `fused_linear_token_stats`),
2 SGD steps. Two processes with half the batch each must train the same weights as one unsharded
process with the whole batch (fp32, max abs diff <= 1e-5). The per-rank script is
`zero3_worker.py`. `deepspeed` comes with the `dev` extra (scripts/setup.sh installs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("zero3_worker.py")


@pytest.mark.slow
def test_zero3_lm_head_trains_like_one_unsharded_process(tmp_path):
    # One thread per rank on a 2-core box; DS_ACCELERATOR=cpu: no GPU is looked for.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    env.pop("MASTER_PORT", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", str(WORKER), str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case, values in report.items():
            assert values["param_diff"] <= 1e-5, (rank, case, values)
            assert values["lm_head_diff"] <= 1e-5, (rank, case, values)
            assert values["nograd_weight_diff"] <= 1e-5, (rank, case, values)
            assert values["reference_moved"] > 1e-2, (rank, case, values)  # the steps did train
        # threshold 0 partitions the lm_head; the default keeps this small one whole everywhere
        assert report["tied"]["partitioned"] and report["untied"]["partitioned"], report
        assert not report["tied_persistent"]["partitioned"], report
