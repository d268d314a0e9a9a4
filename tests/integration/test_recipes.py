"""Every recipe parses and has a CPU twin; every twin runs 2 steps and shows its method.

`recipes/<name>.yaml` is written for GPUs and hub models; `recipes/<name>-tiny.yaml` holds the same
method fields on the demo's locally built models and task. The tiny runs go through `opd.cli.main`
in this process (transformers generation), except vanilla_opd-tiny, whose colocated vLLM engine
runs in a subprocess, as does the `opd rollout` job (vLLM) that writes lightning_opd-tiny's
shards. vopd_topk-tiny scores with the real `opd teacher serve` app on loopback.

Each run must reach step 2 and log the signal specific to its method, checked by value where the
maths gives one: vOPD's advantage is exactly `baseline_kl - k1`, ExOPD's step-1 advantage is
exactly `-1.25 * k1` (the reference is still the student), LUFFY's group holds 1 trace in 8.
The runs skip the report (`--write_report false`; `test_report.py` checks it), except the
2-process lightning_opd run, whose main process alone must write it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from opd.cli import main

RECIPES_DIR = Path(__file__).parents[2] / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))
TINY_SUFFIX = "-tiny"
REAL_NAMES = sorted(p.stem for p in RECIPES if not p.stem.endswith(TINY_SUFFIX))
TINY_NAMES = sorted(
    p.stem.removesuffix(TINY_SUFFIX) for p in RECIPES if p.stem.endswith(TINY_SUFFIX)
)

Steps = dict[int, dict[str, float]]  # logged step -> that step's metrics


def _tiny(name: str) -> Path:
    return RECIPES_DIR / f"{name}{TINY_SUFFIX}.yaml"


def _steps(output_dir: Path) -> Steps:
    """The per-step training logs of a finished run (the entries that carry opd's metrics)."""
    history = json.loads((output_dir / "opd_results.json").read_text())["log_history"]
    assert max(entry.get("step", 0) for entry in history) == 2, "the run did not reach step 2"
    steps = {entry["step"]: entry for entry in history if "opd/reverse_kl_k1" in entry}
    assert sorted(steps) == [1, 2], f"opd metrics logged at steps {sorted(steps)}, expected 1 and 2"
    return steps


# ------------------------------------------------------------------------------------------------
# Every recipe parses; real and tiny come in pairs
# ------------------------------------------------------------------------------------------------


def test_every_recipe_has_a_tiny_twin():
    assert REAL_NAMES, "no recipes found"
    assert set(REAL_NAMES) == set(TINY_NAMES), (
        f"real without -tiny: {sorted(set(REAL_NAMES) - set(TINY_NAMES))}; "
        f"-tiny without real: {sorted(set(TINY_NAMES) - set(REAL_NAMES))}"
    )


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_recipe_parses(recipe, tmp_path):
    text = recipe.read_text()
    assert text.startswith("#"), "a recipe opens with a comment: purpose, launch, needs"
    if recipe.stem.endswith(TINY_SUFFIX):
        name = recipe.stem.removesuffix(TINY_SUFFIX)
        launch = (
            f"CPU check of {name} on the demo models: opd distill --config recipes/{recipe.name}"
        )
    else:
        launch = f"opd distill --config recipes/{recipe.name}"
    assert launch in text, f"the header gives the launch command: {launch!r}"
    args = ["distill", "--config", str(recipe), "--bf16", "false", "--output_dir", str(tmp_path)]
    assert main([*args, "--dry_run", "true"]) == 0
    assert (tmp_path / "opd_config.yaml").is_file()


# ------------------------------------------------------------------------------------------------
# What each tiny run must show (values from its log history)
# ------------------------------------------------------------------------------------------------


def _advantage_is_vanilla(steps: Steps, coef: float = 1.0) -> None:
    for metrics in steps.values():
        expected = -coef * metrics["opd/reverse_kl_k1"]
        assert metrics["opd/advantage_mean"] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def _check_vanilla_opd(steps: Steps) -> None:
    _advantage_is_vanilla(steps)  # A_t = lp_teacher - lp_old, c = 1
    # The vLLM sampler's logprobs are the trainer's: the importance ratio stays at 1.
    assert all(m["opd/ratio_mean"] == pytest.approx(1.0, abs=1e-2) for m in steps.values())


def _check_vopd(steps: Steps) -> None:
    for metrics in steps.values():
        assert metrics["opd/baseline_kl"] > 0
        # A_t = r_t - V_t with V_t = -KL_t: the mean moves from -k1 by exactly the mean KL.
        expected = metrics["opd/baseline_kl"] - metrics["opd/reverse_kl_k1"]
        assert metrics["opd/advantage_mean"] == pytest.approx(expected, rel=1e-3, abs=1e-4)


def _check_vopd_topk(steps: Steps) -> None:
    _check_vopd(steps)
    for metrics in steps.values():
        assert "teacher/server_s" in metrics, "the teacher answered over HTTP"
        assert 0 < metrics["opd/topk_mass"] <= 1


def _check_tip(steps: Steps) -> None:
    # floor(0.5 * N) of N completion tokens, N = 19..24 here.
    assert all(m["opd/kept_fraction"] == pytest.approx(0.5, abs=0.05) for m in steps.values())


def _check_tip_q3(steps: Steps) -> None:
    assert all(0 < m["opd/kept_fraction"] <= 0.6 for m in steps.values())
    assert all(m["opd/jsd"] > 0 for m in steps.values())


def _check_tip_type_aware(steps: Steps) -> None:
    # The top-50% entropy share, united with Q3 (which may add nothing).
    assert all(0.45 <= m["opd/kept_fraction"] < 1 for m in steps.values())
    assert all(m["opd/jsd"] > 0 for m in steps.values())


def _check_exopd(steps: Steps) -> None:
    # At step 1 the reference (initial student) is the student: A_t = 1.25 (lp_t - lp_old).
    first = steps[1]
    assert first["opd/advantage_mean"] == pytest.approx(
        -1.25 * first["opd/reverse_kl_k1"], rel=1e-4
    )
    # At step 2 the student has moved off the reference, so the identity no longer holds.
    second = steps[2]
    assert second["opd/advantage_mean"] != pytest.approx(-1.25 * second["opd/reverse_kl_k1"])
    assert "rewards/accuracy_reward/mean" in first


def _check_opsd(steps: Steps) -> None:
    for metrics in steps.values():
        assert metrics["opd/divergence"] > 0
        # opd_kl_coef 0: no policy-gradient term; the loss is the divergence alone.
        assert metrics["opd/advantage_mean"] == 0 and metrics["opd/advantage_std"] == 0
        assert metrics["opd/loss"] == pytest.approx(metrics["opd/divergence"], rel=1e-4)
    # At step 1 the teacher has the student's weights; only the privileged context differs.
    assert abs(steps[1]["opd/reverse_kl_k1"]) > 0.1


def _check_lightning_opd(steps: Steps) -> None:
    for metrics in steps.values():
        assert "teacher/latency_s" not in metrics, "no live teacher: scores come from the shards"
        assert metrics["opd/clip_fraction"] >= 0  # the PPO-style surrogate
        assert math.isfinite(metrics["opd/reverse_kl_k1"])


def _check_luffy(steps: Steps) -> None:
    for metrics in steps.values():
        assert metrics["opd/offpolicy_fraction"] == pytest.approx(1 / 8)
        # The trace (the reference answer) is always right: at least 1 in 8 rewards is 1.
        assert metrics["rewards/accuracy_reward/mean"] >= 1 / 8
    # teacher_mode self at step 1 is the student itself: k1 is 0.
    assert steps[1]["opd/reverse_kl_k1"] == pytest.approx(0.0, abs=1e-5)


def _check_dgrpo(steps: Steps) -> None:
    for metrics in steps.values():
        assert "rewards/accuracy_reward/mean" in metrics and metrics["opd/clip_fraction"] >= 0
        # Centred outcome advantages plus 0.05 x the teacher term: far from vanilla's -k1.
        assert abs(metrics["opd/advantage_mean"]) < 0.25 * metrics["opd/reverse_kl_k1"]


def _check_scope(steps: Steps) -> None:
    for metrics in steps.values():
        assert 0 <= metrics["opd/accuracy"] <= 1
        if metrics["opd/accuracy"] > 0:  # correct samples switch from OPD to weighted MLE
            assert metrics["opd/advantage_mean"] != pytest.approx(-metrics["opd/reverse_kl_k1"])


def _check_sod(steps: Steps) -> None:
    weights = [m["opd/sod_weight_mean"] for m in steps.values()]
    assert all(0 < w <= 1.5 for w in weights)
    assert any(w != pytest.approx(1.0) for w in weights), "no completion had two steps"


def _check_uni_opd(steps: Steps) -> None:
    for metrics in steps.values():
        assert 0 <= metrics["opd/accuracy"] <= 1
        # The margin shift only ever raises advantages.
        assert metrics["opd/advantage_mean"] >= -metrics["opd/reverse_kl_k1"] - 1e-5


def _check_stable_opd(steps: Steps) -> None:
    for metrics in steps.values():
        assert metrics["opd/offpolicy_fraction"] == pytest.approx(1 / 4)  # 1 anchor per group
        assert metrics["opd/repetition_rate"] >= 0


def _check_multi_teacher(steps: Steps) -> None:
    for metrics in steps.values():
        rows = metrics["teacher/route_even_rows"] + metrics["teacher/route_odd_rows"]
        assert rows == 8, "every row went to exactly one teacher"
    assert sum(m["teacher/route_odd_rows"] for m in steps.values()) > 0
    assert sum(m["teacher/route_even_rows"] for m in steps.values()) > 0


def _check_qwen_coder_word_problems(steps: Steps) -> None:
    _advantage_is_vanilla(steps)
    for metrics in steps.values():
        assert 0.0 < metrics["opd/topk_mass"] <= 1.0 + 1e-6
        assert metrics["opd/entropy"] > 0.0
        assert metrics["guard/alarms"] == 0, "a healthy 2-step run raised a collapse alarm"


def _ratio_form_is_active(steps: Steps) -> None:
    """An s.10 ratio form logs opd/is_* (plain logs them only with sampler logprobs, which
    transformers generation has none of). Step 1 holds batches used with the weights that
    sampled them (every ratio 1, nothing clipped); step 2 replays one after an update."""
    first, second = steps[1], steps[2]
    assert first["opd/is_ess_fraction"] == pytest.approx(1.0)
    for quantile in ("p05", "p50", "p95"):
        assert first[f"opd/is_ratio_{quantile}"] == pytest.approx(1.0)
    assert first["opd/is_clip_fraction_pos"] == 0 and first["opd/is_clip_fraction_neg"] == 0
    # A step mean over 3 micro-batches, one off-policy: 0.91 and 0.67 here.
    assert second["opd/is_ess_fraction"] < 0.99
    assert second["opd/is_ratio_p05"] < 0.95
    _advantage_is_vanilla(steps)  # the form changes the surrogate, not the advantage


def _reinforce_style_value(steps: Steps) -> None:
    """REINFORCE-style forms log the value -w A lp_s: negative here, where A (mean -k1) and
    lp_s are mostly negative; the PPO-style forms (and plain) log -rho A > 0."""
    first = steps[1]
    assert first["opd/advantage_mean"] < 0 and first["opd/loss"] < 0


def _check_topr(steps: Steps) -> None:
    _ratio_form_is_active(steps)
    _reinforce_style_value(steps)
    # Positive tokens carry no importance weight: none truncated, even off-policy.
    assert all(m["opd/is_clip_fraction_pos"] == 0 for m in steps.values())


def _check_dispo(steps: Steps) -> None:
    _ratio_form_is_active(steps)
    _reinforce_style_value(steps)
    assert "rewards/accuracy_reward/mean" in steps[1]  # correctness picks the bounds
    # Incorrect responses' window [0, 101] clips nothing here; correct ones' floor 0.8 does.
    assert steps[2]["opd/is_clip_fraction_pos"] > 0


def _check_minpro(steps: Steps) -> None:
    _ratio_form_is_active(steps)
    assert steps[1]["opd/loss"] > 0  # the value -(w / rho) rho A, not REINFORCE's -w A lp_s
    # Off-policy, an earlier smaller ratio sets some tokens' weight (the prefix minimum).
    second = steps[2]
    assert second["opd/is_clip_fraction_pos"] + second["opd/is_clip_fraction_neg"] > 0


def _check_ctpo(steps: Steps) -> None:
    _ratio_form_is_active(steps)
    # The log-space window at t = 1 is [-0.025, 0.05]: it clips the drifted negative tokens.
    assert steps[2]["opd/is_clip_fraction_neg"] > 0


def _check_sapo(steps: Steps) -> None:
    _ratio_form_is_active(steps)
    # Ratios spread below 0.8 (PPO's 0.2 clip would act) yet the soft gate keeps over half of
    # every token's weight: no hard clip. Its value (4 / tau) sigmoid(tau (rho - 1)) (-A) is > 0.
    assert steps[1]["opd/loss"] > 0
    second = steps[2]
    assert second["opd/is_ratio_p05"] < 0.8
    assert second["opd/is_clip_fraction_pos"] == 0 and second["opd/is_clip_fraction_neg"] == 0


def _check_bapo(steps: Steps) -> None:
    _ratio_form_is_active(steps)
    for metrics in steps.values():  # the bounds Algorithm 1 chose, within [a, b] of s.5.1
        assert 0.6 <= metrics["opd/bapo_clip_low"] <= 0.9
        assert 1.2 <= metrics["opd/bapo_clip_high"] <= 3.0
    assert steps[2]["opd/is_clip_fraction_neg"] > 0  # drifted negative tokens under c_low


def _check_vcpo(steps: Steps) -> None:
    for metrics in steps.values():
        # No sampler logprobs without vLLM: every weight is 1, so ESS fraction and scale are 1.
        fraction = metrics["opd/ess_fraction"]
        assert 0 < fraction <= 1 and 0 < metrics["opd/lr_scale"] <= 1
        assert metrics["opd/lr_scale"] == pytest.approx(math.sqrt(fraction))  # the sqrt rule
        # Equal weights: the min-variance baseline is the group mean, so the advantage is
        # centred (vanilla OPD's mean is -k1).
        assert metrics["opd/advantage_mean"] == pytest.approx(0.0, abs=1e-5)
        assert metrics["opd/reverse_kl_k1"] > 0.1


def _check_chord(steps: Steps) -> None:
    # mu(0) = peak 0.9; mu(1) = 0.05 + (0.9 - 0.05) * (1 + cos(pi * 1 / 2)) / 2 = 0.475.
    assert steps[1]["opd/imitation_coef"] == pytest.approx(0.9)
    assert steps[2]["opd/imitation_coef"] == pytest.approx(0.475)
    for metrics in steps.values():
        assert 0 < metrics["opd/imitation_nll"] < math.inf  # the expert tokens were trained on


def _check_dypo(steps: Steps) -> None:
    for metrics in steps.values():
        assert metrics["opd/imitation_coef"] == pytest.approx(0.5)  # constant mu
        # Fewer right rollouts than the 4 groups: some group has none, so its prompt imitates.
        if metrics["opd/accuracy"] < 4 / 16:
            assert 0 < metrics["opd/imitation_nll"] < math.inf
    assert steps[1]["opd/accuracy"] < 4 / 16, "the gate was never forced open"


def _trace_rows_follow_the_gate(steps: Steps) -> None:
    for metrics in steps.values():  # one trace in each opened group of 8
        expected = metrics["opd/trace_insert_fraction"] / 8
        assert metrics["opd/offpolicy_fraction"] == pytest.approx(expected)
    assert any(m["opd/trace_insert_fraction"] < 1 for m in steps.values()), "never gated"


def _check_hapo(steps: Steps) -> None:
    _trace_rows_follow_the_gate(steps)
    assert steps[1]["opd/reverse_kl_k1"] == pytest.approx(0.0, abs=1e-5)  # teacher_mode self


def _check_bepa(steps: Steps) -> None:
    _trace_rows_follow_the_gate(steps)
    for metrics in steps.values():
        # all_fail: a group with no success of its own gets the (right) trace, so each of the 2
        # groups of 8 holds a right answer. A Thompson gate may leave a failed group without.
        assert metrics["rewards/accuracy_reward/mean"] >= 2 / 16


def _check_tcod(steps: Steps) -> None:
    # D(s) = 1 + floor((3 - 1) * s / 2) tokens, s = completed steps: 1 at step 1, 2 at step 2.
    assert steps[1]["opd/tcod_depth"] == 1 and steps[2]["opd/tcod_depth"] == 2
    # At depth 1 only each completion's first token carries the term: far from vanilla's -k1.
    first = steps[1]
    gap = abs(first["opd/advantage_mean"] + first["opd/reverse_kl_k1"])
    assert gap > 0.1 * first["opd/reverse_kl_k1"]


def _check_mopd(steps: Steps) -> None:
    for metrics in steps.values():
        # every row has a context: its peers, or the reference answer when none succeeded
        assert metrics["opd/mopd_context_fraction"] == 1.0
        assert 0.0 <= metrics["opd/mopd_groups_with_success"] <= 1.0
        assert metrics["opd/mopd_context_tokens"] > 5  # longer than the bare 5-token prompt
        assert metrics["opd/divergence"] > 0
        assert metrics["opd/advantage_mean"] == 0.0  # no policy-gradient term


def _check_pope(steps: Steps) -> None:
    for metrics in steps.values():
        assert metrics["opd/prefix_guided_fraction"] == 0.5  # 2 of each group of 4
        assert metrics["opd/prefix_fraction"] == 0.5
        assert 0.0 <= metrics["opd/groups_with_reward_fraction"] <= 1.0
        assert metrics["opd/prefix_token_fraction"] == 0.0  # the prefix is in the prompt


def _check_prefix_rl(steps: Steps) -> None:
    assert [steps[s]["opd/prefix_fraction"] for s in (1, 2)] == [1.0, 0.75]
    assert all(m["opd/prefix_guided_fraction"] == 1.0 for m in steps.values())


def _check_prefix_rft(steps: Steps) -> None:
    assert [steps[s]["opd/prefix_fraction"] for s in (1, 2)] == pytest.approx([0.95, 0.5])
    for metrics in steps.values():
        assert metrics["opd/prefix_guided_fraction"] == 0.5
        assert metrics["opd/prefix_token_fraction"] > 0  # the prefix heads the completion


def _check_trace(steps: Steps) -> None:
    assert [steps[s]["opd/trace_kl_coef"] for s in (1, 2)] == [1.0, 0.0]
    first = steps[1]
    assert first["opd/trace_key_fraction"] + first["opd/trace_error_fraction"] > 0


def _check_cross_tokenizer(steps: Steps) -> None:
    for metrics in steps.values():
        # a BPE token covers several of the student's digits: fewer spans than tokens
        assert 0 < metrics["teacher/cross_spans_per_token"] < 1.0
        assert metrics["opd/uld_distance"] > 0 and metrics["opd/divergence"] >= 0


CHECKS: dict[str, Callable[[Steps], None]] = {
    "vanilla_opd": _check_vanilla_opd,
    "vopd": _check_vopd,
    "vopd_topk": _check_vopd_topk,
    "tip": _check_tip,
    "tip_q3": _check_tip_q3,
    "tip_type_aware": _check_tip_type_aware,
    "exopd": _check_exopd,
    "opsd": _check_opsd,
    "lightning_opd": _check_lightning_opd,
    "luffy": _check_luffy,
    "dgrpo": _check_dgrpo,
    "scope": _check_scope,
    "sod": _check_sod,
    "uni_opd": _check_uni_opd,
    "stable_opd": _check_stable_opd,
    "multi_teacher": _check_multi_teacher,
    "qwen_coder_word_problems": _check_qwen_coder_word_problems,
    "topr": _check_topr,
    "dispo": _check_dispo,
    "minpro": _check_minpro,
    "ctpo": _check_ctpo,
    "sapo": _check_sapo,
    "bapo": _check_bapo,
    "vcpo": _check_vcpo,
    "chord": _check_chord,
    "dypo": _check_dypo,
    "hapo": _check_hapo,
    "bepa": _check_bepa,
    "tcod": _check_tcod,
    "mopd": _check_mopd,
    "pope": _check_pope,
    "prefix_rl": _check_prefix_rl,
    "prefix_rft": _check_prefix_rft,
    "trace": _check_trace,
    "cross_tokenizer": _check_cross_tokenizer,
    # stage 2 alone, from demo:student (both stages: tests/integration/test_sft_then_opd.py)
    "sft_then_opd": _check_vanilla_opd,
}


def test_every_tiny_recipe_has_a_check():
    assert set(CHECKS) == set(TINY_NAMES)


# ------------------------------------------------------------------------------------------------
# Fixtures: demo models, a served teacher, offline shards
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_models() -> tuple[Path, Path]:
    """`(teacher, student)` folders of the demo models (built once, cached outside the repo)."""
    from opd.demo.pretrain import prepare_demo_models

    return prepare_demo_models()


@pytest.fixture(scope="module")
def served_demo_teacher(demo_models, serve_in_thread):
    """The real `opd teacher serve` app with the demo teacher, on loopback in this process."""
    from opd.commands.serve import ServeArguments, build_app, build_backend

    arguments = ServeArguments(model=str(demo_models[0]), log_level="warning")
    with serve_in_thread(build_app(arguments, build_backend(arguments))) as url:
        yield url


@pytest.fixture(scope="module")
def lightning_shards(demo_models, tmp_path_factory) -> Path:
    """Offline teacher scores built by the real jobs: `opd rollout` (vLLM, in a subprocess so
    the engine does not live in pytest) then `opd teacher precompute` (in process)."""
    teacher, student = demo_models
    folder = tmp_path_factory.mktemp("lightning")
    rollout = [
        sys.executable, "-m", "opd.cli", "rollout", "--model_name_or_path", str(student),
        "--dataset_name", "demo:arithmetic", "--num_generations", "2",
        "--max_completion_length", "4", "--max_prompts", "8", "--vllm_max_model_length", "32",
        "--output_dir", str(folder / "rollouts"),
    ]  # fmt: skip
    result = subprocess.run(rollout, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    precompute = [
        "teacher", "precompute", "--rollouts", str(folder / "rollouts"),
        "--teacher_model_name_or_path", str(teacher), "--output_dir", str(folder / "scores"),
    ]  # fmt: skip
    assert main(precompute) == 0
    return folder / "scores"


@pytest.fixture(scope="module")
def tiny_run(request, tmp_path_factory) -> Callable[[str], Steps]:
    """`tiny_run(name)`: run `recipes/<name>-tiny.yaml` for its 2 steps in this process (once
    per module) and return its per-step metrics."""
    done: dict[str, Steps] = {}

    def run(name: str) -> Steps:
        if name not in done:
            output_dir = tmp_path_factory.mktemp(name)
            extra = []
            if name == "vopd_topk":
                extra = ["--teacher_urls", request.getfixturevalue("served_demo_teacher")]
            if name == "lightning_opd":
                extra = ["--teacher_shards", str(request.getfixturevalue("lightning_shards"))]
            args = ["distill", "--config", str(_tiny(name)), "--output_dir", str(output_dir),
                    "--write_report", "false"]  # fmt: skip
            assert main([*args, *extra]) == 0
            done[name] = _steps(output_dir)
        return done[name]

    return run


# ------------------------------------------------------------------------------------------------
# Two steps of every tiny recipe
# ------------------------------------------------------------------------------------------------


SLOW = {"lightning_opd": pytest.mark.slow}  # its shards need an `opd rollout` (vLLM) first
IN_PROCESS = [
    pytest.param(name, marks=[SLOW[name]] if name in SLOW else [])
    for name in TINY_NAMES
    if name != "vanilla_opd"
]


@pytest.mark.parametrize("name", IN_PROCESS)
def test_tiny_recipe_runs_two_steps(name, tiny_run):
    CHECKS[name](tiny_run(name))


@pytest.mark.slow
def test_vanilla_opd_tiny_runs_two_steps_with_vllm(tmp_path):
    """In a subprocess: the colocated vLLM engine should not live inside pytest. Also the CLI's
    end-to-end check of vLLM generation: resolved config, synced sampler, saved model."""
    command = [sys.executable, "-m", "opd.cli", "distill", "--config", str(_tiny("vanilla_opd")),
               "--output_dir", str(tmp_path), "--write_report", "false"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    steps = _steps(tmp_path)
    _check_vanilla_opd(steps)
    resolved = yaml.safe_load((tmp_path / "opd_config.yaml").read_text())
    assert resolved["use_vllm"] is True and resolved["vllm_mode"] == "colocate"
    assert list(steps) == [1, 2]
    for metrics in steps.values():
        assert math.isfinite(metrics["opd/reverse_kl_k1"]) and metrics["teacher/latency_s"] > 0
        # vLLM sampled in fp32 with synced weights: its logprobs equal the trainer's.
        assert metrics["sampling/sampling_logp_difference/max"] < 1e-4
    assert (tmp_path / "model.safetensors").exists()


def test_self_teacher_stays_the_initial_student(tiny_run):
    """LUFFY's teacher (teacher_mode self) is the frozen initial student: after one update of
    the student, their logprobs of the step-2 samples differ."""
    steps = tiny_run("luffy")
    assert abs(steps[2]["opd/reverse_kl_k1"]) > 1e-3


@pytest.mark.slow
def test_lightning_opd_under_torchrun_trains_like_one_process(lightning_shards, tmp_path):
    """`torchrun --nproc_per_node 2 -m opd.cli distill` on CPU, with no extra flag, trains data-
    parallel: 2 processes x 2 rows of stored rollouts end with the weights and logged losses of 1
    process x 4 rows (SGD without clipping, so a wrong loss scale would show), and the main
    process alone writes one config, one results file and one report."""
    from safetensors.torch import load_file

    common = [
        "distill", "--config", str(_tiny("lightning_opd")), "--teacher_shards",
        str(lightning_shards), "--opd_ratio", "plain", "--learning_rate", "1e-2",
        "--optim", "sgd", "--max_grad_norm", "0",
    ]  # fmt: skip
    runs = {
        "one": [sys.executable, "-m", "opd.cli", *common, "--per_device_train_batch_size", "4",
                "--write_report", "false"],
        "two": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m", "opd.cli", *common,
                "--per_device_train_batch_size", "2"],
    }  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, command in runs.items():
        command = [*command, "--output_dir", str(tmp_path / name)]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        assert result.stdout.count("resolved config written") == 1, result.stdout[-2000:]
    results = {name: json.loads((tmp_path / name / "opd_results.json").read_text())
               for name in runs}  # fmt: skip
    assert results["two"]["num_processes"] == 2
    losses = {name: [row["loss"] for row in r["log_history"] if "loss" in row]
              for name, r in results.items()}  # fmt: skip
    assert losses["two"] == pytest.approx(losses["one"], abs=1e-6)
    one, two = (load_file(tmp_path / name / "model.safetensors") for name in runs)
    assert max((one[key] - two[key]).abs().max().item() for key in one) <= 1e-5
    assert (tmp_path / "two" / "report" / "index.html").exists()
    assert not (tmp_path / "one" / "report").exists()  # --write_report false
