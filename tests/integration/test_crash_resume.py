"""A SIGKILLed `opd distill` resumes to the weights of an uninterrupted run (1 and 2 processes).

The rollouts are fixed (`teacher_mode offline` on teacher scores precomputed in this process), so
no generation randomness enters. The recipe carries state across steps, each piece of which a
lossy resume would change: AdamW's moments, a warm-up learning-rate schedule, one generation
reused for 2 iterations (the PPO ratio against lp_old of the buffered generation), a second
epoch (the sampler's order), TIP's per-step random token selection and the collapse guard's
streaks (its alarm count is logged). A checkpoint is saved every step.

Each test draws a step k from a seeded generator (printed), SIGKILLs the whole process tree as
soon as the folder checkpoint-k appears (so usually while it is being written), resumes with
`--resume_from_checkpoint true`, which must pick the latest complete checkpoint (k-1 when
checkpoint-k was cut off), and requires the final weights of the uninterrupted run, tensor by
tensor (max abs difference <= 1e-6), and its per-step losses, learning rates and alarm counts.

Launches (each pays ~15 s of imports): with 1 process the killed run is a subprocess, and the
reference and the resume run here through `opd.cli.main` (as `test_recipes.py` runs recipes).
With 2 processes the killed run is `torchrun -m opd.cli distill`, and one more `torchrun` runs
the resume and then the reference (`crash_resume_worker.py`).

The last two tests check, without training, that a resume refuses an incomplete checkpoint and
settings that differ from the checkpointed run's.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from opd.cli import main

MAX_STEPS = 8  # 4 prompts, 2 per generation, each generation used for 2 steps: 2 epochs
# k = random.Random(KILL_SEED + processes).randint(2, MAX_STEPS - 1): 5 and 6. From 2: a kill while
# checkpoint-1 is written leaves no checkpoint to resume from.
KILL_SEED = 8
WORKER = Path(__file__).with_name("crash_resume_worker.py")
PROMPTS = [(a, b) for a in range(2) for b in range(2)]


@pytest.fixture(scope="module")
def scores(tiny_student, tiny_teacher, tmp_path_factory) -> Path:
    """Teacher scores (top-4) of fixed rollouts: 2 completions per prompt, one right answer and
    one wrong, scored by the real `opd teacher precompute` job."""
    folder = tmp_path_factory.mktemp("crash_resume")
    rows = [
        {"prompt": f"{a}+{b}=", "answer": str(a + b), "prompt_index": index,
         "sample_index": sample, "completion": str(a + b) if sample == 0 else f"{a}{b}+{b}"}
        for index, (a, b) in enumerate(PROMPTS)
        for sample in range(2)
    ]  # fmt: skip
    rollouts = folder / "rollouts.jsonl"
    rollouts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    command = [
        "teacher", "precompute", "--rollouts", str(rollouts), "--output_dir", str(folder / "s"),
        "--teacher_model_name_or_path", str(tiny_teacher), "--teacher_top_k", "4",
        "--tokenizer_name_or_path", str(tiny_student),
    ]  # fmt: skip
    assert main(command) == 0
    return folder / "s"


def _distill_args(student, teacher, scores, processes: int) -> list[str]:
    """The run: AdamW with warm-up, 2 iterations per generation (PPO), TIP, a firing guard."""
    return [
        "distill", "--model_name_or_path", str(student), "--teacher_mode", "offline",
        "--teacher_shards", str(scores), "--teacher_top_k", "4",
        "--teacher_model_name_or_path", str(teacher), "--use_vllm", "false",
        "--eval_before_after", "false", "--num_generations", "2", "--max_completion_length", "6",
        "--per_device_train_batch_size", str(2 // processes), "--gradient_accumulation_steps", "2",
        "--num_iterations", "2", "--opd_ratio", "ppo", "--optim", "adamw_torch",
        "--learning_rate", "1e-3", "--lr_scheduler_type", "linear", "--warmup_steps", "2",
        "--tip_rule", "entropy_sample", "--tip_keep_ratio", "0.5",
        # every completion is truncated: the guard's streak reaches 2 and fires once per run
        "--guard_truncation_rate", "0.5", "--guard_patience", "2",
        "--max_steps", str(MAX_STEPS), "--save_strategy", "steps", "--save_steps", "1",
        "--logging_steps", "1", "--report_to", "none", "--seed", "0",
        # no plots at the end (~5 s a run): the test compares weights and logs
        "--write_report", "false",
    ]  # fmt: skip


def _launcher(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}"]  # fmt: skip


def _environment() -> dict[str, str]:
    # One thread everywhere (also in this process, see `one_thread`): the same reduction order in
    # the killed, resumed and reference runs.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _kill_step(processes: int) -> int:
    step = random.Random(KILL_SEED + processes).randint(2, MAX_STEPS - 1)
    print(f"{processes} process(es): SIGKILL when checkpoint-{step} appears")
    return step


def _run_and_kill(command: list[str], output_dir: Path, kill_step: int) -> None:
    """Start `command` in its own session; when checkpoint-<kill_step> appears, SIGKILL every
    process of its tree (torchrun starts each worker in a session of its own)."""
    log = output_dir.with_suffix(".log")
    with log.open("w") as out:
        run = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                               env=_environment(), start_new_session=True)  # fmt: skip
    marker = output_dir / f"checkpoint-{kill_step}"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert run.poll() is None, f"the run ended before step {kill_step}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no checkpoint-{kill_step}:\n{log.read_text()}"
        time.sleep(0.005)
    tree = [run.pid, *(child.pid for child in psutil.Process(run.pid).children(recursive=True))]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
    assert run.wait(timeout=60) == -signal.SIGKILL
    _, alive = psutil.wait_procs([p for p in map(_process, tree) if p is not None], timeout=30)
    assert not alive, f"survived the kill: {alive}"
    assert not (output_dir / "opd_results.json").exists(), "the run finished before the kill"
    states = {
        path.name: sorted(item.name for item in path.iterdir())
        for path in sorted(output_dir.glob("checkpoint-*"))
    }
    print(f"killed; checkpoint folders left: {json.dumps(states)}")


def _process(pid: int) -> psutil.Process | None:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid)
    return None


def _steps(output_dir: Path) -> dict[int, tuple[float, float, int]]:
    """step -> (loss, learning rate, collapse alarms so far) of a finished run."""
    history = json.loads((output_dir / "opd_results.json").read_text())["log_history"]
    alarms = 0
    steps = {}
    for entry in history:
        if "loss" in entry:
            assert entry["step"] not in steps, f"step {entry['step']} logged twice"
            alarms = entry.get("guard/alarms", alarms)  # logged on the steps that generate
            steps[entry["step"]] = (entry["loss"], entry["learning_rate"], alarms)
    return steps


def _assert_same_run(resumed: Path, reference: Path, student: Path) -> None:
    got = load_file(resumed / "model.safetensors")
    expected = load_file(reference / "model.safetensors")
    assert got.keys() == expected.keys()
    difference = max((got[name] - expected[name]).abs().max().item() for name in expected)
    print(f"max abs weight difference, resumed vs uninterrupted: {difference:.3g}")
    assert difference <= 1e-6
    resumed_steps, reference_steps = _steps(resumed), _steps(reference)
    assert sorted(reference_steps) == list(range(1, MAX_STEPS + 1))
    assert sorted(resumed_steps) == sorted(reference_steps), "a step was lost or repeated"
    for step, (loss, rate, alarms) in reference_steps.items():
        assert resumed_steps[step][0] == pytest.approx(loss, abs=1e-6), f"loss at step {step}"
        assert resumed_steps[step][1:] == (rate, alarms), f"lr, alarms at step {step}"
    assert reference_steps[MAX_STEPS][2] == 1, "the guard fired once in the uninterrupted run"
    initial = load_file(student / "model.safetensors")
    moved = max((expected[name] - initial[name]).abs().max().item() for name in initial)
    assert moved > 1e-3, "training did not move the weights"


def _killed_run(student: Path, teacher: Path, scores: Path, tmp_path: Path, processes: int):
    """A run of `processes` processes into `tmp_path/killed`, SIGKILLed when the checkpoint of
    a seeded random step appears; returns its arguments, that folder, `tmp_path/reference` (for
    the uninterrupted run) and the step of the latest checkpoint it finished."""
    kill_step = _kill_step(processes)
    args = _distill_args(student, teacher, scores, processes=processes)
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    _run_and_kill([*_launcher(processes), "-m", "opd.cli", *args, "--output_dir", str(killed)],
                  killed, kill_step)  # fmt: skip
    complete = _complete_after_kill(killed, kill_step, processes)
    return args, killed, reference, kill_step if complete else kill_step - 1


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(
    tiny_student, tiny_teacher, scores, tmp_path, one_thread
):
    args, killed, reference, latest_complete = _killed_run(
        tiny_student, tiny_teacher, scores, tmp_path, processes=1
    )
    assert main([*args, "--output_dir", str(killed), "--resume_from_checkpoint", "true"]) == 0
    assert main([*args, "--output_dir", str(reference)]) == 0
    _assert_resumed_from_latest_complete(killed, latest_complete)
    _assert_same_run(killed, reference, tiny_student)


@pytest.mark.slow
def test_killed_torchrun_resumes_to_the_same_weights(tiny_student, tiny_teacher, scores, tmp_path):
    args, killed, reference, latest_complete = _killed_run(
        tiny_student, tiny_teacher, scores, tmp_path, processes=2
    )
    runs = [
        [*args, "--output_dir", str(killed), "--resume_from_checkpoint", "true"],
        [*args, "--output_dir", str(reference)],
    ]
    command = [*_launcher(2), str(WORKER), json.dumps(runs)]
    result = subprocess.run(command, capture_output=True, text=True, env=_environment(),
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert json.loads((killed / "opd_results.json").read_text())["num_processes"] == 2
    _assert_resumed_from_latest_complete(killed, latest_complete)
    _assert_same_run(killed, reference, tiny_student)


def _complete_after_kill(output_dir: Path, kill_step: int, processes: int) -> bool:
    """Whether checkpoint-<kill_step> was finished: process 0 writes trainer_state.json last;
    every process writes its RNG state."""
    folder = output_dir / f"checkpoint-{kill_step}"
    rng = ["rng_state.pth"] if processes == 1 else [f"rng_state_{p}.pth" for p in range(processes)]
    return all((folder / name).exists() for name in ["trainer_state.json", *rng])


def _assert_resumed_from_latest_complete(output_dir: Path, expected_step: int) -> None:
    """The run's resolved config records the folder `--resume_from_checkpoint true` chose."""
    resolved = yaml.safe_load((output_dir / "opd_config.yaml").read_text())
    checkpoint = Path(resolved["resume_from_checkpoint"])
    print(f"resumed from {checkpoint.name}")
    assert checkpoint == output_dir / f"checkpoint-{expected_step}"


# ------------------------------------------------------------------------------------------------
# Without training: the sampler's order, incomplete checkpoints, changed settings
# ------------------------------------------------------------------------------------------------


def test_sampler_order_is_a_function_of_the_epoch():
    """A fresh sampler in epoch e (a resumed run's) draws what TRL's drew in its (e+1)-th pass;
    TRL's own fresh sampler replays epoch 0's order (what resumed runs did)."""
    from trl.trainer.utils import RepeatSampler

    from opd.trainer.resume import EpochSeededRepeatSampler

    settings = {"data_source": range(7), "mini_repeat_count": 2, "batch_size": 3,
                "repeat_count": 2, "shuffle": True, "seed": 0}  # fmt: skip
    trl_sampler = RepeatSampler(**settings)
    orders = [list(trl_sampler) for _ in range(3)]
    assert orders[0] != orders[2]
    for epoch, order in enumerate(orders):
        resumed = EpochSeededRepeatSampler.from_sampler(
            RepeatSampler(**settings), epoch_of=lambda epoch=epoch: epoch
        )
        assert list(resumed) == order
    assert list(RepeatSampler(**settings)) == orders[0]


def _checkpoint(folder: Path, *files: str, state: str = '{"global_step": 1}') -> Path:
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(b"")
    if state:
        (folder / "trainer_state.json").write_text(state)
    return folder


def test_checkpoint_problem_names_what_a_cut_off_save_misses(tmp_path):
    from opd.trainer.resume import checkpoint_problem

    one = _checkpoint(tmp_path / "one", "rng_state.pth")
    assert checkpoint_problem(one, 1) is None
    assert checkpoint_problem(one, 2) == "no rng_state_0.pth, rng_state_1.pth (for 2 process(es))"
    two = _checkpoint(tmp_path / "two", "rng_state_0.pth", "opd_generation_buffer_0.pt")
    assert checkpoint_problem(two, 2) == (
        "no rng_state_1.pth, opd_generation_buffer_1.pt (for 2 process(es))"
    )
    half_written = _checkpoint(tmp_path / "half", "rng_state.pth", state='{"global_st')
    assert checkpoint_problem(half_written, 1) == "no readable trainer_state.json"
    assert checkpoint_problem(_checkpoint(tmp_path / "none", "model.safetensors", state=""), 1)


def test_resume_refuses_an_incomplete_checkpoint_and_finds_the_latest_complete(tmp_path, capsys):
    output_dir = tmp_path / "run"
    for step in (1, 2):
        _checkpoint(output_dir / f"checkpoint-{step}", "model.safetensors", "rng_state.pth")
    _checkpoint(output_dir / "checkpoint-3", "model.safetensors", state="")  # the kill's
    dry_run = ["distill", "--dry_run", "true", "--output_dir", str(output_dir)]
    assert main([*dry_run, "--resume_from_checkpoint", str(output_dir / "checkpoint-3")]) == 2
    error = capsys.readouterr().err
    assert f"{output_dir / 'checkpoint-3'} is incomplete (no readable trainer_state.json)" in error
    assert f"resume from {output_dir / 'checkpoint-2'} (the latest complete one)" in error
    assert main([*dry_run, "--resume_from_checkpoint", "true"]) == 0
    assert f"opd: resuming from {output_dir / 'checkpoint-2'}" in capsys.readouterr().out


def test_resume_refuses_settings_that_change_the_run(tmp_path, capsys):
    output_dir = tmp_path / "run"
    dry_run = ["distill", "--dry_run", "true", "--output_dir", str(output_dir)]
    assert main([*dry_run, "--learning_rate", "1e-3"]) == 0  # the run's opd_config.yaml
    checkpoint = _checkpoint(output_dir / "checkpoint-2", "model.safetensors", "rng_state.pth")
    (checkpoint / "opd_config.yaml").write_bytes((output_dir / "opd_config.yaml").read_bytes())
    resume = [*dry_run, "--resume_from_checkpoint", "true"]
    assert main([*resume, "--learning_rate", "2e-3", "--seed", "1", "--tip_rule", "q3"]) == 2
    error = capsys.readouterr().err
    assert "these settings differ from the run that wrote" in error
    for change in ("learning_rate 0.001 -> 0.002", "seed 0 -> 1", "tip_rule 'none' -> 'q3'"):
        assert change in error
    # Where it logs and saves, how long it runs and whether it draws the report may change.
    extend = ["--learning_rate", "1e-3", "--max_steps", "99", "--logging_steps", "5"]
    assert main([*resume, *extend, "--save_steps", "7", "--write_report", "false"]) == 0
