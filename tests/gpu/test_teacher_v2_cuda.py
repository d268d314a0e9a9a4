"""Teacher v2 on a CUDA GPU (run by scripts/gpu_check.sh; deselected on CPU machines).

The CPU tests check hidden-state mode and candidate sets for exactness; here the parts that only
a GPU exercises: the served teacher's head arrives on the CPU and must be moved to the student's
device once (`OPDTrainer.teacher_output_weight`), and the candidate request's student top-k pass
and the fused kernels run on CUDA. Generation uses transformers (no CUDA vLLM on that machine);
prompts are an `IterableDataset` for the reason `test_trainer_cuda.py` gives.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import IterableDataset

from opd.commands.serve import ServeArguments

pytestmark = pytest.mark.gpu

METHODS = {
    "hidden_states": {"opd_divergence_support": "full", "opd_baseline": "full"},
    "candidates": {"opd_divergence_support": "union", "opd_baseline": "topk", "teacher_top_k": 4},
}


def _prompt_rows():
    for a in range(16):
        yield {"prompt": f"{a}+{a}="}


@pytest.mark.parametrize("method", list(METHODS))
def test_two_steps_with_a_served_teacher_on_cuda(
    method, tiny_student, tiny_teacher, teacher_backend, serve_teacher, tmp_path, monkeypatch
):
    assert torch.cuda.is_available(), "this test needs a CUDA GPU"
    from opd import OPDConfig, OPDTrainer

    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "cache"))
    serve_args = ServeArguments(model=str(tiny_teacher), port=0, log_level="warning")
    with serve_teacher(serve_args, teacher_backend) as url:
        args = OPDConfig(
            output_dir=str(tmp_path), teacher_mode="server", teacher_urls=[url],
            report_to="none", max_steps=2, per_device_train_batch_size=8, num_generations=4,
            max_completion_length=8, logging_steps=1, save_strategy="no",
            opd_divergence="reverse_kl", opd_divergence_coef=0.5, **METHODS[method],
        )  # fmt: skip
        prompts = IterableDataset.from_generator(_prompt_rows)
        trainer = OPDTrainer(model=str(tiny_student), args=args, train_dataset=prompts)
        trainer.train()
    if method == "hidden_states":
        assert trainer.teacher_output_weight().device.type == "cuda"
    logged = [entry for entry in trainer.state.log_history if "opd/divergence" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["opd/divergence"])
