"""`opd distill` with the teacher behind a real HTTP server, and offline on precomputed shards.

Everything runs through the real CLI: `opd teacher serve` on loopback with the tiny teacher and
`opd distill --teacher_mode server` in subprocesses (the server is killed mid-run), `opd rollout`
in a subprocess, `opd teacher precompute` + `opd distill --teacher_mode offline` in process. The
server runs sample with transformers generation (`--use_vllm false`): they are about the teacher.
The runs skip the report (`--write_report false`), which `tests/integration/test_report.py` checks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from opd.cli import main

STEPS = 6


class Server:
    """`opd teacher serve` in a subprocess on a fixed port (restartable on the same port)."""

    def __init__(self, model: Path, port: int, log_path: Path, wait_healthy):
        self.model, self.port, self.log_path = model, port, log_path
        self.wait_healthy = wait_healthy
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> Server:
        command = [sys.executable, "-m", "opd.cli", "teacher", "serve", "--model", str(self.model),
                   "--port", str(self.port), "--log_level", "warning"]  # fmt: skip
        log = self.log_path.open("a")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.wait_healthy(self.url, self.process, self.log_path)
        return self

    def served_requests(self) -> int:
        try:
            return int(httpx.get(self.url + "/info", timeout=1).json()["stats"]["requests"])
        except (httpx.TransportError, ValueError):
            return 0

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def server(tiny_teacher, tmp_path, free_port, wait_healthy):
    server = Server(tiny_teacher, free_port(), tmp_path / "server.log", wait_healthy)
    yield server
    server.kill()


def _server_args(server: Server, retry_budget_s: float) -> list[str]:
    return ["--teacher_mode", "server", "--teacher_urls", server.url,
            "--teacher_model_name_or_path", str(server.model),
            "--teacher_retry_budget_s", str(retry_budget_s)]  # fmt: skip


@pytest.fixture(scope="module")
def unbroken(tiny_student, tiny_teacher, prompt_file, tmp_path_factory, free_port, wait_healthy):
    """The reference: the same run against a teacher that never fails (one per module, shared by
    the tests that break the teacher)."""
    folder = tmp_path_factory.mktemp("unbroken")
    server = Server(tiny_teacher, free_port(), folder / "server.log", wait_healthy).start()
    try:
        command = _distill_command(tiny_student, prompt_file, folder, *_server_args(server, 120))
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    finally:
        server.kill()
    assert result.returncode == 0, result.stderr[-4000:]
    return folder


def _distill_command(student, prompt_file, output_dir, *extra) -> list[str]:
    return [
        sys.executable, "-m", "opd.cli", "distill",
        "--model_name_or_path", str(student), "--dataset_name", str(prompt_file),
        "--output_dir", str(output_dir), "--use_vllm", "false", "--eval_before_after", "false",
        "--max_steps", str(STEPS), "--per_device_train_batch_size", "4",
        "--num_generations", "2", "--max_completion_length", "6", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
        "--write_report", "false", *extra,
    ]  # fmt: skip


def _history(output_dir: Path) -> list[dict]:
    results = json.loads((output_dir / "opd_results.json").read_text())
    return [entry for entry in results["log_history"] if "opd/reverse_kl_k1" in entry]


def _weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


def _assert_same_run(output_dir: Path, reference: Path) -> None:
    """Nothing lost, nothing repeated: every step logged once with the reference's metrics, and
    the same batches in the same order gave the same weights."""
    steps, reference_steps = _history(output_dir), _history(reference)
    assert [entry["step"] for entry in steps] == list(range(1, STEPS + 1))
    for entry, expected in zip(steps, reference_steps, strict=True):
        assert entry["opd/reverse_kl_k1"] == pytest.approx(expected["opd/reverse_kl_k1"], abs=1e-6)
    weights = _weights(output_dir)
    for name, tensor in _weights(reference).items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_distill_survives_a_teacher_restart(tiny_student, prompt_file, server, unbroken, tmp_path):
    """Kill the server mid-run and restart it: training continues, identical to an unbroken run."""
    server.start()
    broken = tmp_path / "broken"
    before = server.served_requests()
    command = _distill_command(tiny_student, prompt_file, broken, *_server_args(server, 120))
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while server.served_requests() - before < 2 and run.poll() is None:
        time.sleep(0.02)  # the start-up /info check and the first batch's scores
    server.kill()
    time.sleep(3)  # the trainer is now retrying step 2's (or 3's) scores against a dead port
    server.start()
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-4000:]
    retries = sum(entry.get("teacher/retries", 0) for entry in _history(broken))
    assert retries > 0, "no request hit the dead server"
    _assert_same_run(broken, unbroken)


@pytest.mark.slow
def test_distill_stops_with_a_clear_error_and_resumes(
    tiny_student, prompt_file, server, unbroken, tmp_path
):
    """A teacher that stays down past the retry budget: checkpoint, clear error; the resumed run
    ends where an unbroken one does."""
    server.start()
    output_dir = tmp_path / "run"
    command = _distill_command(tiny_student, prompt_file, output_dir, *_server_args(server, 3))
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while server.served_requests() < 2 and run.poll() is None:
        time.sleep(0.02)
    server.kill()
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 1, stderr[-4000:]
    assert "opd distill: error: the teacher at " + server.url in stderr
    assert "teacher_retry_budget_s" in stderr and "Traceback" not in stderr
    checkpoints = sorted(output_dir.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and f"--resume_from_checkpoint {checkpoints[0]}" in stderr
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 1 <= stopped_at < STEPS

    server.start()
    command += ["--resume_from_checkpoint", str(checkpoints[0])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    # The checkpoint carries the log of steps 1..stopped_at; the resumed run appends the rest.
    _assert_same_run(output_dir, unbroken)
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    saved = [entry["step"] for entry in state["log_history"] if "opd/reverse_kl_k1" in entry]
    assert saved == list(range(1, stopped_at + 1))


@pytest.mark.slow
def test_distill_offline_on_precomputed_shards(tiny_student, tiny_teacher, prompt_file, tmp_path):
    """`opd rollout` (vLLM: in a subprocess, so the engine does not live in pytest), then `opd
    teacher precompute` with top-k columns and `opd distill --teacher_mode offline` (in process)."""
    rollouts, scores, output_dir = tmp_path / "rollouts", tmp_path / "scores", tmp_path / "run"
    rollout = [sys.executable, "-m", "opd.cli", "rollout",
               "--model_name_or_path", str(tiny_student), "--dataset_name", str(prompt_file),
               "--output_dir", str(rollouts),
               "--num_generations", "2", "--max_completion_length", "6",
               "--vllm_max_model_length", "32", "--max_prompts", "8"]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run(rollout, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"opd rollout:\n{result.stderr[-4000:]}"
    assert main(["teacher", "precompute", "--rollouts", str(rollouts), "--output_dir", str(scores),
                 "--teacher_mode", "local", "--teacher_model_name_or_path", str(tiny_teacher),
                 "--teacher_top_k", "4"]) == 0  # fmt: skip
    assert main(["distill", "--model_name_or_path", str(tiny_student), "--teacher_mode", "offline",
                 "--teacher_shards", str(scores), "--teacher_top_k", "4",
                 "--teacher_model_name_or_path", str(tiny_teacher), "--output_dir", str(output_dir),
                 "--max_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "2",
                 "--max_completion_length", "6", "--logging_steps", "1", "--save_strategy", "no",
                 "--report_to", "none", "--eval_before_after", "false", "--use_vllm", "true",
                 "--write_report", "false"]) == 0  # fmt: skip
    steps = _history(output_dir)
    assert [entry["step"] for entry in steps] == [1, 2]
    for entry in steps:
        # lp_teacher is read from the shards; lp_old is the current student's: both finite.
        assert entry["opd/teacher_logprob"] < 0 and entry["opd/student_logprob"] < 0
    assert "sampling_logp_difference" not in json.dumps(steps), "offline mode ran vLLM"
    assert (output_dir / "model.safetensors").exists()
