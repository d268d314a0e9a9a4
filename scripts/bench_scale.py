"""Scale on CPU: step time of 1 vs 2 processes, and memory per rank under DDP vs FSDP2.

    python scripts/bench_scale.py                 # one table, ~1.5 minutes on 2 cores
    python scripts/bench_scale.py --steps 10 --completion 48   # longer steps, more of them

Every layout trains the same student (a Qwen2-shaped random model, `--hidden` x `--layers`,
AdamW) against a tiny in-process teacher on the same global batch of `--batch` completions per
step. The rollouts are fixed (TRL's `rollout_func`, built by tests/integration/mp_train.py as for
the multi-process tests): each completion depends only on its prompt and its index in the group,
so every layout sees the same tokens. Layouts:

    1 process x 2 threads        the baseline (the whole machine, one process)
    1 process x 1 thread         for reference
    2 processes x 1 thread DDP   torchrun, gloo, OMP_NUM_THREADS=1 each
    2 processes x 1 thread FSDP2 the same with fsdp="full_shard", fsdp_version 2

Step time is the median over `--steps` steps after one warm-up step (rollout, teacher scores,
forward, backward, optimizer step), the slowest rank's. Memory is measured on each rank after
training, not computed from a formula: the bytes of the parameters it holds (`DTensor.to_local()`
under FSDP2) plus the bytes of its AdamW state tensors (local shards), and the process's peak RSS
(`ru_maxrss`) for reference. The script launches itself in `--worker` mode, through
`python -m torch.distributed.run` for 2 processes, and reads one JSON file per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from functools import partial
from pathlib import Path

os.environ.setdefault("OPD_KERNELS", "torch")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
# tests/integration/mp_train.py: the fixed-rollout hook and FSDP2 settings the scale tests use.
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

GROUP = 4  # num_generations
LAYOUTS = {  # name: (processes, threads per process, FSDP2)
    "1 process x 2 threads (baseline)": (1, 2, False),
    "1 process x 1 thread": (1, 1, False),
    "2 processes x 1 thread, DDP": (2, 1, False),
    "2 processes x 1 thread, FSDP2": (2, 1, True),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="global completions per step")
    parser.add_argument("--completion", type=int, default=32, help="max completion tokens")
    parser.add_argument("--steps", type=int, default=6, help="timed steps after 1 warm-up")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--worker", action="store_true", help="internal: one training run")
    parser.add_argument("--student")
    parser.add_argument("--teacher")
    parser.add_argument("--out")
    parser.add_argument("--per_device_batch", type=int)
    parser.add_argument("--fsdp", action="store_true")
    return parser.parse_args()


# ----------------------------------------------------------------------------- worker


def fixed_completion(prompt: str, copy: int, vocab_size: int, max_length: int) -> list[int]:
    """A completion that depends only on the prompt text and its index in the group."""
    import torch

    generator = torch.Generator().manual_seed(zlib.crc32(prompt.encode()) * 8 + copy)
    length = int(torch.randint(max_length // 2, max_length + 1, (1,), generator=generator))
    ids = torch.randint(3, vocab_size, (length,), generator=generator).tolist()
    return [*ids[:-1], 2]  # ends with EOS


def step_timer():
    """A TrainerCallback that records the wall time of every optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)

    return StepTimer()


def build_trainer(cli: argparse.Namespace, timer):
    from datasets import Dataset
    from mp_train import FSDP2, make_rollout_func
    from transformers import AutoConfig, AutoTokenizer

    from opd import OPDConfig, OPDTrainer

    tokenizer = AutoTokenizer.from_pretrained(cli.student)
    # The model's vocabulary, not len(tokenizer): the reloaded char tokenizer counts one more.
    vocab_size = AutoConfig.from_pretrained(cli.student).vocab_size
    fsdp = FSDP2 if cli.fsdp else {}
    args = OPDConfig(
        output_dir=os.path.join(cli.out, "trainer"), report_to="none", seed=0,
        teacher_model_name_or_path=cli.teacher, use_vllm=False,
        per_device_train_batch_size=cli.per_device_batch, num_generations=GROUP,
        max_completion_length=cli.completion, max_steps=cli.steps + 1,
        optim="adamw_torch", learning_rate=1e-5, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", bf16=False,
        opd_behaviour_logprobs="trainer", opd_ratio="plain", **fsdp,
    )  # fmt: skip
    prompts = [f"{a}+{b}=" for a in range(10) for b in range(10)]
    return OPDTrainer(
        model=cli.student, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer, callbacks=[timer],
        rollout_func=make_rollout_func(
            tokenizer, partial(fixed_completion, vocab_size=vocab_size, max_length=cli.completion)
        ),
    )  # fmt: skip


def local_bytes(tensor) -> int:
    """Bytes this process holds for `tensor`: its shard if it is a DTensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def run_worker(cli: argparse.Namespace) -> None:
    import torch
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    timer = step_timer()
    trainer = build_trainer(cli, timer)
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    parameters = list(model.parameters())  # tied embeddings are counted once
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    state_tensors = [
        value
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0  # not the scalar step counters
    ]
    sharded = isinstance(model.get_output_embeddings().weight, DTensor)
    assert sharded == cli.fsdp, f"FSDP2 asked: {cli.fsdp}, lm_head weight sharded: {sharded}"
    rank = trainer.accelerator.process_index
    report = {
        "rank": rank,
        "threads": torch.get_num_threads(),
        "step_s": timer.seconds,
        "param_bytes": sum(local_bytes(p) for p in parameters),
        "optimizer_bytes": sum(local_bytes(t) for t in state_tensors),
        "full_param_bytes": sum(p.numel() * p.element_size() for p in parameters),
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    Path(cli.out, f"rank{rank}.json").write_text(json.dumps(report))


# ----------------------------------------------------------------------------- driver


def run_layout(cli, folder: Path, name: str, student: Path, teacher: Path) -> list[dict]:
    processes, threads, fsdp = LAYOUTS[name]
    out = folder / f"run{list(LAYOUTS).index(name)}"
    out.mkdir()
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [
        *launcher, __file__, "--worker", "--student", str(student), "--teacher", str(teacher),
        "--out", str(out), "--per_device_batch", str(cli.batch // processes),
        "--steps", str(cli.steps), "--completion", str(cli.completion),
        *(["--fsdp"] if fsdp else []),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-12000:]}")
    reports = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(processes)]
    assert all(report["threads"] == threads for report in reports), reports
    return reports


def summarise(reports: list[dict]) -> dict:
    """The slowest rank's median step (warm-up dropped) and the largest rank's memory."""
    mib = 2**20
    return {
        "step_s": max(statistics.median(report["step_s"][1:]) for report in reports),
        "fastest_s": max(min(report["step_s"][1:]) for report in reports),
        "slowest_s": max(max(report["step_s"][1:]) for report in reports),
        "param_mib": max(report["param_bytes"] for report in reports) / mib,
        "optimizer_mib": max(report["optimizer_bytes"] for report in reports) / mib,
        "full_param_mib": reports[0]["full_param_bytes"] / mib,
        "rss_mib": max(report["peak_rss_kib"] for report in reports) / 1024,
    }


def print_table(cli, rows: dict[str, dict]) -> None:
    base = rows[next(iter(LAYOUTS))]
    ddp = rows["2 processes x 1 thread, DDP"]
    full = base["full_param_mib"]
    print(
        f"\nStudent {full * 2**20 / 4 / 1e6:.1f}M params (fp32, {full:.0f} MiB), AdamW; global "
        f"batch {cli.batch} completions of <= {cli.completion} tokens; median of {cli.steps} "
        f"steps after 1 warm-up.\n"
    )
    print(
        "| layout | step time (s) [fastest-slowest step] | vs baseline "
        "| params + AdamW state per rank (MiB) | vs DDP | peak RSS per rank (MiB) |"
    )
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        state = row["param_mib"] + row["optimizer_mib"]
        memory = f"{row['param_mib']:.0f} + {row['optimizer_mib']:.0f} = {state:.0f}"
        versus_ddp = state / (ddp["param_mib"] + ddp["optimizer_mib"])
        print(
            f"| {name} | {row['step_s']:.2f} [{row['fastest_s']:.2f}-{row['slowest_s']:.2f}] "
            f"| {base['step_s'] / row['step_s']:.2f}x speed "
            f"| {memory} | {versus_ddp:.2f}x | {row['rss_mib']:.0f} |"
        )
    fsdp, one_thread = rows["2 processes x 1 thread, FSDP2"], rows["1 process x 1 thread"]
    ratio = (fsdp["param_mib"] + fsdp["optimizer_mib"]) / (ddp["param_mib"] + ddp["optimizer_mib"])
    print(f"\nFSDP2 / DDP, params + AdamW state per rank: {ratio:.3f}")
    print(f"2 processes (DDP) vs 1 process x 1 thread: {one_thread['step_s'] / ddp['step_s']:.2f}x")


def run_driver(cli: argparse.Namespace) -> None:
    from opd.demo.tiny import TinyShape, save_tiny

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        folder = Path(tmp)
        shape = TinyShape(cli.hidden, cli.layers, cli.hidden // 64, cli.hidden * 3)
        student = save_tiny(folder / "student", shape, seed=0)
        teacher = save_tiny(folder / "teacher", TinyShape(hidden_size=192, num_heads=3), seed=1)
        rows = {}
        for name in LAYOUTS:
            rows[name] = summarise(run_layout(cli, folder, name, student, teacher))
            print(f"{name}: done ({time.perf_counter() - start:.0f} s)", flush=True)
    print_table(cli, rows)
    print(f"\nwall time {time.perf_counter() - start:.0f} s")


def main() -> None:
    cli = parse_args()
    if cli.worker:
        run_worker(cli)
    else:
        run_driver(cli)


if __name__ == "__main__":
    main()
