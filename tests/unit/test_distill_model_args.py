"""`opd distill` takes TRL's `ModelConfig` flags (LoRA, dtype, attention, revision) as `trl grpo`
does, and the teacher placement fields of `OPDConfig`. Parsing only: no model is loaded.

Run: `pytest tests/unit/test_distill_model_args.py`.
"""

from __future__ import annotations

import pytest
import yaml

from opd.cli import main
from opd.commands.distill import StudentModelConfig, build_peft_config, student_init_kwargs
from opd.config import ConfigError, OPDConfig

LORA_FLAGS = [
    "--use_peft", "true", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.0",
    "--lora_target_modules", "q_proj", "v_proj", "--lora_modules_to_save", "embed_tokens",
    "--dtype", "bfloat16", "--attn_implementation", "eager", "--model_revision", "v1",
    "--trust_remote_code", "true",
]  # fmt: skip


def _dry_run(tmp_path, *flags: str) -> tuple[int, dict]:
    output_dir = tmp_path / "run"
    argv = [
        "distill", "--model_name_or_path", "student-path", "--teacher_model_name_or_path", "t",
        "--output_dir", str(output_dir), "--dry_run", "true", *flags,
    ]  # fmt: skip
    code = main(argv)
    written = output_dir / "opd_config.yaml"
    return code, yaml.safe_load(written.read_text()) if written.exists() else {}


def test_trl_model_flags_parse_and_round_trip(tmp_path):
    code, written = _dry_run(tmp_path, *LORA_FLAGS)
    assert code == 0
    assert written["model_name_or_path"] == "student-path"
    assert written["use_peft"] is True and written["lora_r"] == 8 and written["lora_alpha"] == 16
    assert written["lora_target_modules"] == ["q_proj", "v_proj"]
    assert written["lora_modules_to_save"] == ["embed_tokens"]
    assert written["dtype"] == "bfloat16" and written["attn_implementation"] == "eager"
    assert written["model_revision"] == "v1" and written["trust_remote_code"] is True
    # The written file alone reproduces the run.
    rerun = tmp_path / "rerun"
    argv = ["distill", "--config", str(tmp_path / "run" / "opd_config.yaml")]
    assert main([*argv, "--output_dir", str(rerun)]) == 0
    rewritten = yaml.safe_load((rerun / "opd_config.yaml").read_text())
    assert {**rewritten, "output_dir": written["output_dir"]} == written


def test_peft_config_and_init_kwargs_come_from_trl():
    model_args = StudentModelConfig(
        use_peft=True, lora_r=8, lora_alpha=16, lora_target_modules=["all-linear"],
        dtype="bfloat16", attn_implementation="eager", model_revision="v1",
    )  # fmt: skip
    peft_config = build_peft_config(model_args)
    assert type(peft_config).__name__ == "LoraConfig"
    assert (peft_config.r, peft_config.lora_alpha, peft_config.target_modules) == (
        8,
        16,
        "all-linear",
    )
    assert build_peft_config(StudentModelConfig()) is None  # no --use_peft: full fine-tuning
    assert StudentModelConfig().model_name_or_path == "demo:student"
    assert StudentModelConfig().lora_dropout == 0.0  # see StudentModelConfig: no noise

    config = OPDConfig(output_dir="unused", teacher_model_name_or_path="t", report_to="none")
    assert student_init_kwargs(model_args, config) == {
        "revision": "v1", "trust_remote_code": False, "attn_implementation": "eager",
        "dtype": "bfloat16",
    }  # fmt: skip
    # model_init_kwargs wins where both set a key, as in `trl grpo`.
    config.model_init_kwargs = {"dtype": "float32", "low_cpu_mem_usage": True}
    merged = student_init_kwargs(model_args, config)
    assert merged["dtype"] == "float32" and merged["low_cpu_mem_usage"] is True


@pytest.mark.parametrize(
    "flags",
    [["--lora_target_modules", "q_proj", "lm_head"], ["--lora_modules_to_save", "lm_head"]],
)
def test_adapter_on_lm_head_is_refused_before_loading(tmp_path, capsys, flags):
    code, _ = _dry_run(tmp_path, "--use_peft", "true", *flags)
    assert code == 2
    error = capsys.readouterr().err
    assert "remove lm_head from lora_target_modules and lora_modules_to_save" in error
    with pytest.raises(ConfigError, match="adapter on lm_head"):
        build_peft_config(StudentModelConfig(use_peft=True, lora_modules_to_save=["lm_head"]))


def _config(**overrides) -> OPDConfig:
    fields = {"output_dir": "unused", "teacher_model_name_or_path": "t", "report_to": "none"}
    return OPDConfig(**{**fields, **overrides})


def test_teacher_placement_fields_parse_json_like_trl(tmp_path):
    code, written = _dry_run(
        tmp_path, "--teacher_dtype", "bfloat16", "--teacher_device_map", '{"": "cpu"}',
        "--teacher_model_init_kwargs", '{"attn_implementation": "eager"}',
    )  # fmt: skip
    assert code == 0
    assert written["teacher_dtype"] == "bfloat16"
    assert written["teacher_device_map"] == {"": "cpu"}
    assert written["teacher_model_init_kwargs"] == {"attn_implementation": "eager"}
    assert _config().teacher_dtype == "auto" and _config().teacher_device_map is None
    assert _config(teacher_device_map="cuda:1").teacher_device_map == "cuda:1"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"teacher_dtype": "fp8"}, "teacher_dtype='fp8' is not one of auto, float32"),
        ({"teacher_device_map": "gpu0"}, "teacher_device_map='gpu0' is not a device"),
        ({"teacher_device_map": 3}, "teacher_device_map must be a device"),
        ({"teacher_model_init_kwargs": "{oops"}, "teacher_model_init_kwargs is not valid JSON"),
        ({"teacher_model_init_kwargs": "[1]"}, "teacher_model_init_kwargs must be a JSON object"),
        ({"teacher_model_init_kwargs": {"dtype": "float16"}}, "use teacher_dtype and"),
        ({"teacher_model_init_kwargs": '{"device_map": "auto"}'}, "sets device_map"),
    ],
)
def test_teacher_placement_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(**overrides)
