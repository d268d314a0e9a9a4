"""OPDTrainer on a CUDA GPU (run by scripts/gpu_check.sh; deselected on CPU machines).

The CPU tests cover vLLM rollouts; this checks the CUDA side of the trainer: bf16 default,
teacher placed on the GPU, per-token advantages and a finite loss over 2 steps. vLLM's CUDA build
is not available on the GPU machine used here, so generation uses transformers. The prompts are
an `IterableDataset` because `Dataset.from_dict` fails in that machine's image (datasets cannot
fingerprint a pyarrow table under its Python 3.12); the trainer does not care which one it gets.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import IterableDataset

pytestmark = pytest.mark.gpu


def test_two_steps_on_cuda(tiny_student, tiny_teacher, tmp_path):
    assert torch.cuda.is_available(), "this test needs a CUDA GPU"
    from opd import OPDConfig, OPDTrainer

    args = OPDConfig(
        output_dir=str(tmp_path),
        teacher_model_name_or_path=str(tiny_teacher),
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        logging_steps=1,
        save_strategy="no",
    )
    assert args.bf16 is True  # TRL's GPU default is kept
    dataset = IterableDataset.from_generator(lambda: ({"prompt": f"{a}+{a}="} for a in range(16)))
    trainer = OPDTrainer(model=str(tiny_student), args=args, train_dataset=dataset)
    assert trainer.teacher.model.device.type == "cuda"
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "opd/reverse_kl_k1" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["opd/reverse_kl_k1"])
