"""`OPDConfig` validation and `opd distill` argument parsing: bad input names the field."""

from __future__ import annotations

import pytest

from opd.cli import main
from opd.config import OPDConfig


def make_config(tmp_path, **overrides) -> OPDConfig:
    fields = {"output_dir": str(tmp_path), "teacher_model_name_or_path": "t", "report_to": "none"}
    return OPDConfig(**{**fields, **overrides})


def test_valid_config_keeps_grpo_fields(tmp_path):
    config = make_config(tmp_path, learning_rate=1e-5, opd_kl_coef=0.5)
    assert config.learning_rate == 1e-5 and config.opd_kl_coef == 0.5
    assert config.bf16 is False  # CPU machine: fp32, not TRL's bf16 default


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"teacher_model_name_or_path": None}, "set teacher_model_name_or_path"),
        ({"teacher_mode": "remote"}, "teacher_mode='remote' is not one of local"),
        ({"opd_kl_coef": 0.0, "opd_outcome_weight": 0.0}, "leave nothing to train"),
        ({"opd_kl_coef": -1.0}, "opd_kl_coef and opd_outcome_weight must be >= 0"),
        ({"opd_discount": 1.0}, r"opd_discount must be in \[0, 1\)"),
        ({"opd_kl_coef": "big"}, "opd_kl_coef must be a finite number"),
        ({"teacher_top_k": 2.5}, "teacher_top_k must be an integer"),
        ({"teacher_temperature": 0.0}, r"teacher_temperature must be a finite number >= 0.01"),
        ({"teacher_temperature": 1e-45}, r"below it the teacher's logits / temperature overflow"),
        ({"teacher_temperature": float("inf")}, r"teacher_temperature must be a finite number"),
        ({"opd_behaviour_logprobs": "ref"}, "opd_behaviour_logprobs='ref' is not one of"),
        ({"opd_baseline": "exact"}, "opd_baseline='exact' is not one of none, full, topk"),
        ({"tip_rule": "q4"}, "tip_rule='q4' is not one of"),
        ({"opd_divergence": "kl"}, "opd_divergence='kl' is not one of"),
        ({"opd_weighting": "luffy"}, "opd_weighting='luffy' is not one of"),
        ({"opd_lambda": 0.0}, "opd_lambda must be > 0"),
        ({"opd_lambda": float("nan")}, "opd_lambda must be a finite number"),
        ({"tip_keep_ratio": 0.0}, r"tip_keep_ratio must be in \(0, 1\]"),
        ({"tip_divergence_quantile": 1.5}, r"tip_divergence_quantile must be in \[0, 1\]"),
        ({"opd_trace_gamma": 0.0}, "opd_trace_gamma must be > 0"),
        ({"opd_baseline_top_k": 0}, "opd_baseline_top_k must be >= 1"),
        ({"teacher_route_column": "domain"}, "needs both teacher_route_column"),
        ({"opd_reference_model": "m"}, "only used when opd_lambda != 1"),
        ({"opd_divergence_beta": 2.0}, r"opd_divergence_beta must be in \[0, 1\]"),
        ({"teacher_context_template": "{prompt}"}, "must contain {prompt} and {context}"),
    ],
)
def test_config_rejects_bad_values(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **overrides)


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_cli_unknown_yaml_key_names_it_and_suggests(tmp_path, capsys):
    recipe = _write(tmp_path, "teacher_model_name_or_path: t\nlearning_rat: 1.0e-4\n")
    assert main(["distill", "--config", recipe]) == 2
    err = capsys.readouterr().err
    assert "unknown field 'learning_rat'" in err and "did you mean 'learning_rate'" in err


def test_cli_unknown_flag_names_it(capsys):
    assert main(["distill", "--no_such_field", "1", "--dry_run", "true"]) == 2
    assert "--no_such_field" in capsys.readouterr().err


def test_cli_wrong_type_names_the_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--learning_rate", "fast"])
    assert exit_info.value.code == 2
    assert "--learning_rate" in capsys.readouterr().err


def test_cli_impossible_combination_names_the_field(tmp_path, capsys):
    args = ["distill", "--opd_kl_coef", "0", "--output_dir", str(tmp_path), "--dry_run", "true"]
    assert main(args) == 2
    assert "opd_kl_coef=0, opd_outcome_weight=0" in capsys.readouterr().err


def test_cli_unknown_reward_function(tmp_path, capsys):
    args = ["distill", "--reward_funcs", "nope", "--output_dir", str(tmp_path), "--dry_run", "true"]
    assert main(args) == 2
    assert "reward_funcs: unknown ['nope']" in capsys.readouterr().err


def test_cli_missing_dataset_file(tmp_path, capsys):
    missing = str(tmp_path / "missing.jsonl")
    args = ["distill", "--dataset_name", missing, "--output_dir", str(tmp_path),
            "--model_name_or_path", "s", "--teacher_model_name_or_path", "t"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and "no such file" in err


def test_embedded_demo_recipe_parses(tmp_path):
    assert main(["distill", "--output_dir", str(tmp_path), "--dry_run", "true"]) == 0
    assert (tmp_path / "opd_config.yaml").exists()


def test_pure_divergence_needs_no_policy_term(tmp_path):
    # OPSD is family B only: opd_kl_coef = 0 and no outcome reward is valid with a divergence.
    config = make_config(tmp_path, opd_kl_coef=0.0, opd_divergence="jsd")
    assert config.opd_divergence == "jsd"


def test_routes_replace_the_single_teacher_fields(tmp_path):
    config = make_config(
        tmp_path, teacher_model_name_or_path=None, teacher_route_column="domain",
        teacher_routes=["math=a", "code=b"],
    )  # fmt: skip
    assert config.teacher_routes == ["math=a", "code=b"]


def test_deepspeed_without_cuda_is_refused_not_run_as_separate_copies():
    """On a CPU accelerate starts DeepSpeed as one independent process per rank: refuse."""
    with pytest.raises(ValueError, match=r"DeepSpeed through the Trainer needs CUDA.*FSDP2"):
        OPDConfig(
            output_dir="/tmp/opd-test", report_to="none", teacher_model_name_or_path="t",
            deepspeed={"zero_optimization": {"stage": 3}},
        )  # fmt: skip


def test_in_process_teacher_under_zero3_is_refused(monkeypatch):
    """ZeRO-3 partitions the weights a local or self teacher would run on."""
    import opd.trainer.build as build

    monkeypatch.setattr(build, "_zero3_enabled", lambda: True)
    args = OPDConfig(output_dir="/tmp/opd-test", report_to="none", teacher_mode="self")
    with pytest.raises(ValueError, match="ZeRO-3 partitions the weights"):
        build.check_method_capabilities(args, None, None)
