"""`opd distill` through the real CLI on tiny models: config round trip, LoRA with vLLM (CPU)
rollouts, errors. The plain 2-step vLLM run through the CLI is
`tests/integration/test_recipes.py::test_vanilla_opd_tiny_runs_two_steps_with_vllm`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from opd.cli import main


def test_resolved_config_reproduces_the_run(tiny_student, tiny_teacher, prompt_file, tmp_path):
    """The written config parses back into the same values (dry run: no training)."""
    first = tmp_path / "first"
    args = [
        "distill", "--model_name_or_path", str(tiny_student),
        "--teacher_model_name_or_path", str(tiny_teacher), "--dataset_name", str(prompt_file),
        "--learning_rate", "3e-5", "--output_dir", str(first), "--dry_run", "true",
    ]  # fmt: skip
    assert main(args) == 0
    written = yaml.safe_load((first / "opd_config.yaml").read_text())
    second = tmp_path / "second"
    config_path = first / "opd_config.yaml"
    rerun = ["distill", "--config", str(config_path), "--output_dir", str(second)]
    assert main(rerun) == 0
    rewritten = yaml.safe_load((second / "opd_config.yaml").read_text())
    rewritten["output_dir"] = written["output_dir"]
    assert rewritten == written
    assert written["learning_rate"] == 3e-5


def test_help_lists_commands_and_fields(capsys):
    assert main(["--help"]) == 0
    assert "distill" in capsys.readouterr().out
    result = subprocess.run(
        [sys.executable, "-m", "opd.cli", "distill", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for name in ("--teacher_model_name_or_path", "--opd_kl_coef", "--learning_rate", "--config",
                 "--write_report"):  # fmt: skip
        assert name in result.stdout


def test_distill_lora_student_with_vllm_saves_the_adapter(
    tiny_student, tiny_teacher, prompt_file, tmp_path
):
    """`--use_peft` through the real CLI on the vanilla_opd-tiny recipe (vLLM colocate rollouts).

    Step 2 samples with the weights synced after step 1; vLLM's logprobs equal the trainer's
    (TRL merges the adapters for the sync), although step 1 moved the model (checkpoint-1).
    """
    output_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "opd.cli", "distill", "--config", "recipes/vanilla_opd-tiny.yaml",
        "--model_name_or_path", str(tiny_student), "--teacher_model_name_or_path",
        str(tiny_teacher), "--dataset_name", str(prompt_file), "--output_dir", str(output_dir),
        "--use_peft", "true", "--lora_r", "8", "--lora_target_modules", "all-linear",
        "--learning_rate", "5e-2", "--max_steps", "2", "--save_strategy", "steps",
        "--save_steps", "1", "--write_report", "false",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    for folder in (output_dir, output_dir / "checkpoint-1"):
        assert (folder / "adapter_model.safetensors").exists()
        assert not (folder / "model.safetensors").exists()  # the adapter only
    adapter = json.loads((output_dir / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["target_modules"]
    results = json.loads((output_dir / "opd_results.json").read_text())
    steps = {
        entry["step"]: entry for entry in results["log_history"] if "opd/reverse_kl_k1" in entry
    }
    assert steps[2]["sampling/sampling_logp_difference/max"] < 1e-4
    assert _adapter_shift(tiny_student, output_dir / "checkpoint-1") > 1e-2


def _adapter_shift(base_path, adapter_path) -> float:
    """Largest change of a next-token logprob on a fixed sequence that the adapter causes."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    input_ids = torch.tensor([[4, 5, 13, 6, 7, 16, 8, 10, 2]])
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    with torch.no_grad():
        before = torch.log_softmax(base(input_ids=input_ids).logits, dim=-1)
        adapted = PeftModel.from_pretrained(base, adapter_path)
        after = torch.log_softmax(adapted(input_ids=input_ids).logits, dim=-1)
    return float((after - before).abs().max())
