"""`opd distill` on the embedded demo with what a `trl grpo` user types: a reward function from
their own module (`--reward_funcs my_rewards.length_bonus`), and the run's config keeping the
model names as given (`demo:student`, not the local cache folder).

Real parts: the demo's locally trained models (cached outside the repo, built on first use),
the real CLI in this process, 1 training step with transformers generation (no vLLM: this tests
the reward and the config, not sampling). The report's plots are skipped (`--write_report
false`, ~5 s); the test checks that they are, while `test_report.py` checks the default run's.
"""

from __future__ import annotations

import json
import statistics
import sys
import textwrap

import pytest
import yaml

from opd.cli import main

# `length_bonus` keeps what it returned, so the test can check the logged mean against it.
REWARDS_MODULE = """
RETURNED = []

def length_bonus(completions, **kwargs):
    values = [len(completion) / 10 for completion in completions]
    RETURNED.extend(values)
    return values
"""
ONE_STEP = ["--max_steps", "1", "--use_vllm", "false", "--eval_before_after", "false",
            "--per_device_train_batch_size", "8", "--teacher_batch_size", "8",
            "--logging_steps", "1", "--write_report", "false"]  # fmt: skip


@pytest.fixture(scope="module")
def demo_models():
    from opd.demo.pretrain import prepare_demo_models

    return prepare_demo_models()  # built once, cached outside the repo


@pytest.fixture
def my_rewards(tmp_path, monkeypatch):
    """`my_rewards.py` in a folder on the path (as PYTHONPATH puts it), forgotten afterwards."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / "my_rewards.py").write_text(textwrap.dedent(REWARDS_MODULE))
    monkeypatch.syspath_prepend(str(folder))
    yield
    sys.modules.pop("my_rewards", None)


@pytest.mark.usefixtures("demo_models", "my_rewards")
def test_imported_reward_is_logged_and_the_config_keeps_the_demo_names(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    args = ["distill", "--reward_funcs", "my_rewards.length_bonus", *ONE_STEP,
            "--output_dir", "run"]  # fmt: skip
    assert main(args) == 0

    run = tmp_path / "run"
    assert f"opd: run folder {run}\n" in capsys.readouterr().out  # relative -> absolute, once
    history = json.loads((run / "opd_results.json").read_text())["log_history"]
    [step] = [entry for entry in history if "rewards/length_bonus/mean" in entry]
    returned = sys.modules["my_rewards"].RETURNED
    assert len(returned) == 8  # one value per completion of the step's batch
    assert step["rewards/length_bonus/mean"] == pytest.approx(statistics.mean(returned))

    config = yaml.safe_load((run / "opd_config.yaml").read_text())
    assert config["model_name_or_path"] == "demo:student"
    assert config["teacher_model_name_or_path"] == "demo:teacher"
    assert config["reward_funcs"] == ["my_rewards.length_bonus"]
    assert config["output_dir"] == "run"  # as given
    assert config["write_report"] is False
    assert not (run / "report").exists()  # the run finished (opd_results.json) without plots


@pytest.mark.usefixtures("demo_models")
def test_system_prompt_without_chat_template_fails_before_training(tmp_path, capsys):
    """The demo student's tokenizer has no chat template: refused before any model loads."""
    args = ["distill", "--dataset_system_prompt", "be brief.", *ONE_STEP,
            "--output_dir", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "opd distill: error: the prompts are chat messages" in error
    assert "has no chat template" in error
    assert not (tmp_path / "run" / "opd_results.json").exists()
