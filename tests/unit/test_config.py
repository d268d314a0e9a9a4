"""`OPDConfig` validation and `opd distill` argument parsing: bad input names the field."""

from __future__ import annotations

import pytest
import yaml
from transformers import AutoModelForCausalLM

from opd.cli import main
from opd.config import OPDConfig
from opd.teacher.local import LocalTeacher
from opd.types import Baseline, GuardAction, TeacherMode, TipRule


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
    assert main(["distill", "--learning_rate", "fast"]) == 2
    assert "--learning_rate" in capsys.readouterr().err


def test_cli_impossible_combination_names_the_field(tmp_path, capsys):
    args = ["distill", "--opd_kl_coef", "0", "--output_dir", str(tmp_path), "--dry_run", "true"]
    assert main(args) == 2
    assert "opd_kl_coef=0, opd_outcome_weight=0" in capsys.readouterr().err


def test_cli_unknown_reward_function(tmp_path, capsys):
    args = ["distill", "--reward_funcs", "nope", "--output_dir", str(tmp_path), "--dry_run", "true"]
    assert main(args) == 2
    assert "reward_funcs: unknown 'nope'" in capsys.readouterr().err


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


def test_in_process_teacher_under_zero3_is_refused(monkeypatch, tiny_teacher):
    """ZeRO-3 partitions the weights a local or self teacher would run on. ZeRO-3 needs CUDA, so
    its switch is forced and its partition marker (`ds_id`) set by hand."""
    import opd.trainer.build as build

    monkeypatch.setattr(build, "_zero3_enabled", lambda: True)
    args = OPDConfig(output_dir="/tmp/opd-test", report_to="none", teacher_mode="self")
    with pytest.raises(ValueError, match="ZeRO-3 partitions the weights"):
        build.check_method_capabilities(args, None, None)
    local = OPDConfig(output_dir="/tmp/opd-test", report_to="none", teacher_model_name_or_path="t")
    teacher = LocalTeacher(AutoModelForCausalLM.from_pretrained(tiny_teacher))
    build.check_method_capabilities(local, teacher, None)  # loaded before ZeRO-3: whole
    teacher.output_weight.ds_id = 0  # how ZeRO-3 marks a partitioned parameter
    with pytest.raises(ValueError, match="ZeRO-3 partitions the weights"):
        build.check_method_capabilities(local, teacher, None)


def test_choice_fields_hold_enum_members_equal_to_the_strings(tmp_path):
    config = make_config(tmp_path, opd_baseline="full", tip_rule="q3", guard_action="stop")
    assert config.opd_baseline is Baseline.FULL and config.opd_baseline == "full"
    assert config.tip_rule is TipRule.Q3 and config.guard_action is GuardAction.STOP
    assert config.teacher_mode is TeacherMode.LOCAL  # the default is a member too
    assert config.to_dict()["opd_baseline"] == "full"  # what report_to and the run folder get
    assert repr(config.opd_baseline) == "'full'"  # messages read as before


def test_cli_choices_parse_from_strings_and_are_saved_as_strings(tmp_path, capsys):
    args = ["distill", "--output_dir", str(tmp_path), "--dry_run", "true", "--opd_ratio", "ppo",
            "--opd_divergence", "forward_kl", "--teacher_top_k", "4"]  # fmt: skip
    assert main(args) == 0
    saved = yaml.safe_load((tmp_path / "opd_config.yaml").read_text())
    assert saved["opd_divergence"] == "forward_kl" and saved["opd_ratio"] == "ppo"
    assert main(["distill", "--opd_ratio", "clip"]) == 2
    err = capsys.readouterr().err
    assert "--opd_ratio" in err and "'plain', 'ppo', 'cispo'" in err


@pytest.mark.parametrize(
    ("overrides", "full", "topk", "tip_divergence"),
    [
        ({}, False, False, False),
        ({"opd_baseline": "full"}, True, False, False),
        ({"opd_baseline": "topk"}, True, True, False),  # without teacher_top_k: hidden states
        ({"opd_baseline": "topk", "teacher_top_k": 8}, False, True, False),
        ({"opd_divergence": "jsd", "teacher_top_k": 8}, False, True, False),
        ({"opd_divergence": "jsd", "opd_divergence_support": "full"}, True, False, False),
        ({"tip_rule": "entropy_sample"}, False, False, False),
        ({"tip_rule": "entropy_sample", "tip_gamma": 1.0}, True, False, True),
        ({"tip_rule": "q3", "teacher_top_k": 8}, False, False, True),
    ],
)
def test_derived_switches(tmp_path, overrides, full, topk, tip_divergence):
    config = make_config(tmp_path, **overrides)
    assert config.needs_full_teacher_distribution is full
    assert config.needs_teacher_topk is topk
    assert config.tip_needs_divergence is tip_divergence
