"""LoRA students (real peft) in `OPDTrainer`: the OPSD self-teacher and the G-OPD reference are
the adapter-disabled student (the base model, no copy of its weights) before and after a
training step, while the adapted student moves; an adapter on the lm_head is refused.

Tiny models, transformers generation (no vLLM): tests/integration/test_cli.py runs the LoRA
student through the real CLI with vLLM rollouts.

Run: `pytest tests/integration/test_peft.py`.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from opd import OPDConfig, OPDTrainer

PROMPT_IDS = torch.tensor([[4, 13], [5, 13]])
COMPLETION_IDS = torch.tensor([[6, 7, 2], [8, 2, 0]])
MASK_BT = torch.tensor([[1, 1, 1], [1, 1, 0]])


def _output() -> dict[str, torch.Tensor]:
    """A fixed batch in TRL's layout (what `_reference_logprobs` reads)."""
    return {
        "prompt_ids": PROMPT_IDS, "prompt_mask": torch.ones_like(PROMPT_IDS),
        "completion_ids": COMPLETION_IDS, "completion_mask": MASK_BT,
    }  # fmt: skip


def _logprobs_BT(model) -> torch.Tensor:
    """`[B, T]` logprobs of the completion tokens from the model's own full logits."""
    input_ids = torch.cat([PROMPT_IDS, COMPLETION_IDS], dim=1)
    attention_mask = torch.cat([torch.ones_like(PROMPT_IDS), MASK_BT], dim=1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logprobs = torch.log_softmax(logits[:, 1:-1].float(), dim=-1)
    return logprobs.gather(-1, COMPLETION_IDS[..., None])[..., 0] * MASK_BT


def _teacher_logprobs_BT(trainer) -> torch.Tensor:
    from opd.types import RolloutBatch

    batch = RolloutBatch(
        prompt_ids=PROMPT_IDS.tolist(), completion_ids_BT=COMPLETION_IDS,
        completion_mask_BT=MASK_BT, sampler_logprobs_BT=None, policy_version=0,
    )  # fmt: skip
    return trainer.teacher.score(batch).sampled_logprobs_BT * MASK_BT


def _make_trainer(tmp_path, tiny_student, peft_config, **fields) -> OPDTrainer:
    args = OPDConfig(
        output_dir=str(tmp_path), teacher_mode="self", report_to="none", max_steps=1,
        per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
        learning_rate=5e-2, save_strategy="no", seed=0, **fields,
    )  # fmt: skip
    dataset = Dataset.from_dict({"prompt": [f"{a}+{a}=" for a in range(4)]})
    return OPDTrainer(
        model=str(tiny_student), args=args, train_dataset=dataset, peft_config=peft_config
    )


def test_self_teacher_and_reference_are_the_adapter_disabled_student(tmp_path, tiny_student):
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = _make_trainer(tmp_path, tiny_student, lora, opd_lambda=0.5)
    base = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    base_BT = _logprobs_BT(base)
    # No copy: the teacher runs the student's own modules; G-OPD uses disable_adapter.
    assert trainer.teacher.model.peft_model is trainer.model
    assert trainer.opd_reference is None
    assert trainer.teacher.teacher_id.startswith("self:")
    student_before_BT = _logprobs_BT(trainer.model)
    for stage in ("before", "after"):
        teacher_BT = _teacher_logprobs_BT(trainer)
        reference_BT = trainer._reference_logprobs(_output()) * MASK_BT
        torch.testing.assert_close(teacher_BT, base_BT, atol=1e-5, rtol=0, msg=stage)
        torch.testing.assert_close(reference_BT, base_BT, atol=1e-5, rtol=0, msg=stage)
        if stage == "before":
            trainer.train()
    assert trainer.model.training  # the teacher's eval-mode forward restored the student's mode
    student_after_BT = _logprobs_BT(trainer.model)
    assert (student_after_BT - student_before_BT).abs().max() > 1e-2  # the adapter moved
    lora_B = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    assert lora_B and all(p.requires_grad for p in lora_B)  # the teacher froze nothing


@pytest.mark.parametrize(
    "lora",
    [
        LoraConfig(r=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM"),
        LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    ],
    ids=["lora_on_lm_head", "lm_head_in_modules_to_save"],
)
def test_adapter_on_lm_head_is_refused_at_init(tmp_path, tiny_student, lora):
    with pytest.raises(ValueError, match="lm_head"):
        _make_trainer(tmp_path, tiny_student, lora)
