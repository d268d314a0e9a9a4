"""GRPO vs OPSD vs multi-rollout MOPD on the demo: same steps, seeds and outcome signal.

What is compared (METHODS.md sections 5, 8 and 11). Three arms train the demo student
(`demo:student`, `demo:arithmetic`, reward `demo_accuracy`) for the same steps, batch, lr and
seeds; all three carry GRPO's group-centred outcome advantage (`opd_outcome_weight 1`,
`opd_kl_coef 0`), so only the self-distillation term differs:

- grpo: the outcome advantage alone (`opd_divergence none`). `teacher_mode self` so that no
  extra model loads (its teacher's scores are logged, never trained on).
- opsd: plus OPSD's term (Zhao et al. 2026, arXiv:2601.18734, METHODS.md s.5): the frozen
  initial student scores each rollout after `{context}={prompt}` with the reference answer as
  context (e.g. "47=41+6="); full-vocabulary generalized JSD, beta 0.5, temperature 1.1, coef 1,
  the fields of `recipes/opsd-tiny.yaml`.
- mopd: the same loss, the context built from the rollout's group peers instead (Yu et al. 2026,
  arXiv:2605.12652, METHODS.md s.11; `mopd_peers contrastive`, up to 2 successes labelled "ok:"
  and 1 failure labelled "no:", as `recipes/mopd-tiny.yaml`); a row whose peers hold no success
  falls back to the reference answer, i.e. to OPSD's context.

Caveat: the demo's self-teacher is a character model pre-trained on bare "37+5=" prompts only;
it never saw a context before the prompt ("47=41+6=", "ok:47no:46=41+6="), so whether either
context helps it is an open question and the arms' differences may be within noise (the SE
and seed spread are printed). A line under the table gives the self-teacher's greedy accuracy
with the reference in its context (OPSD's teacher) and with one peer success (a MOPD context),
next to the student's without.

Evaluation of the initial student (once) and of each final model, on the first
`--eval_prompts` of the demo's 200 held-out problems:
- accuracy: greedy completions graded by the task (`opd.demo.evaluate.greedy_accuracy`);
- rKL: the full-vocabulary reverse KL to `demo:teacher`,
  `KL_t = sum_v p_s(v) (log p_s(v) - log p_t(v))`, mean over the tokens (EOS included) of the
  student's own temperature-1 samples (`--eval_samples` per prompt, one sampling seed for every
  model); its SE by the delta method over sequences,
  `SE^2 = sum_i (S_i - rKL n_i)^2 / (sum_i n_i)^2` (S_i, n_i: sequence i's KL sum and length).

Every run is its own `opd distill` (in this process) under
`--output_dir/s<steps>-b<batch>-lr<lr>/seed<seed>/<arm>`, skipped when its `opd_results.json`
exists; each evaluation is cached beside it (`eval-p<prompts>-k<samples>.json`), so a second
invocation trains nothing, and adding a seed or an arm reuses the rest. `results.json` at the
end. Wall time per run: the `opd distill` call (model loading included), measured once.

Run: `python scripts/experiments/mopd_vs_opsd.py [--steps 80] [--batch_size 512]
[--learning_rate 3e-4] [--seeds 0 1] [--arms grpo opsd mopd] [--eval_prompts 200]
[--eval_samples 4] [--output_dir opd-runs/mopd_vs_opsd]`.

Defaults: 80 steps of batch 512 (128 prompts x 4 rollouts, the demo's batch: smaller ones are
too noisy here), lr 3e-4 constant, seeds 0 and 1, all 200 held-out prompts, 4 samples each. Not
the tiny recipes' lr 1e-3: there GRPO alone collapses the student to an empty answer within 3
steps (batch 128: training reward 0.26, 0.04, 0; mean length 3.0 -> 1.3). At 1e-4, 60 GRPO steps
reach 0.445 held-out accuracy, at 3e-4 0.500 (seed 0).

Measured (2-core CPU, quiet: 293 s in all, runs 41-53 s each; with other jobs on the CPU a run
took up to 3x longer). Initial student: accuracy 0.370, rKL 1.638. Self-teacher greedy accuracy
with the reference in context 0.030, with one peer success 0.000: the context does not help the
demo's self-teacher, it breaks it. Means over seeds 0 and 1, accuracy / rKL / wall s:
    grpo  0.570  1.161  43
    opsd  0.323  3.028  50
    mopd  0.338  2.944  53
(mopd: 41% of groups had a success, the other rows read the reference.) Evaluation SE of one
cell: accuracy 0.035, rKL 0.09; seed spread: accuracy up to 0.030, rKL up to 0.43 (opsd). Both
self-distillation arms lose accuracy and move away from demo:teacher: their JSD pulls the student
toward a self-teacher that cannot read a context; opsd and mopd do not differ beyond the noise.

Test: `pytest tests/integration/test_mopd_vs_opsd_script.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.cli import run_logged
from opd.demo.evaluate import (
    greedy_accuracy,
    held_out_metrics,
)
from opd.demo.pretrain import MAX_NEW_TOKENS, demo_splits, prepare_demo_models
from opd.teacher.context import teacher_prompt

REPO = Path(__file__).resolve().parents[2]
BASE_RECIPE = REPO / "recipes" / "mopd-tiny.yaml"  # demo models, no vLLM; method fields below
ARMS = ("grpo", "opsd", "mopd")
GROUP_SIZE = 4  # rollouts per prompt (the demo's num_generations)
CONTEXT_TEMPLATE = "{context}={prompt}"  # the demo's vocabulary has no newline (mopd-tiny.yaml)
# What all three arms share: the outcome advantage, no sampled-token KL, the self-teacher with the
# reference as its context (the grpo arm scores with it but trains on none of it), OPSD's loss.
COMMON_FLAGS = [
    "--reward_funcs", "demo_accuracy", "--opd_outcome_weight", "1.0", "--opd_kl_coef", "0.0",
    "--teacher_mode", "self", "--teacher_context_column", "answer",
    "--teacher_context_template", CONTEXT_TEMPLATE, "--opd_divergence_support", "full",
    "--opd_divergence_beta", "0.5", "--opd_divergence_temperature", "1.1",
    "--opd_divergence_coef", "1.0", "--num_generations", str(GROUP_SIZE),
]  # fmt: skip
ARM_FLAGS = {
    "grpo": ["--opd_divergence", "none", "--mopd_peers", "none"],
    "opsd": ["--opd_divergence", "jsd", "--mopd_peers", "none"],
    "mopd": ["--opd_divergence", "jsd", "--mopd_peers", "contrastive",
             "--mopd_max_successes", "2", "--mopd_max_failures", "1",
             "--mopd_success_label", "ok:", "--mopd_failure_label", "no:"],
}  # fmt: skip
EVAL_SEED = 1234


@dataclass(frozen=True)
class Plan:
    """The experiment's sizes (the defaults: the full run, about 15 minutes on 2 CPU cores)."""

    steps: int = 80
    batch_size: int = 512
    learning_rate: float = 3e-4
    seeds: tuple[int, ...] = (0, 1)
    arms: tuple[str, ...] = ARMS
    eval_prompts: int = 200
    eval_samples: int = 4

    def run_dir(self, out: Path, seed: int, arm: str) -> Path:
        """Where one arm's run lives; the training sizes are in the path, so a changed plan
        never reuses another plan's runs."""
        sizes = f"s{self.steps}-b{self.batch_size}-lr{self.learning_rate:g}"
        return out / sizes / f"seed{seed}" / arm

    @property
    def eval_name(self) -> str:
        return f"eval-p{self.eval_prompts}-k{self.eval_samples}.json"


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def train_arm(plan: Plan, run_dir: Path, arm: str, seed: int) -> None:
    """`plan.steps` steps of `arm` from the initial demo student; skipped when done."""
    if (run_dir / "opd_results.json").is_file():
        print(f"  {arm} seed {seed}: done ({run_dir})", flush=True)
        return
    args = [
        "distill", "--config", str(BASE_RECIPE), *COMMON_FLAGS, *ARM_FLAGS[arm],
        "--output_dir", str(run_dir), "--max_steps", str(plan.steps),
        "--per_device_train_batch_size", str(plan.batch_size),
        "--learning_rate", str(plan.learning_rate), "--lr_scheduler_type", "constant",
        "--seed", str(seed), "--logging_steps", "1", "--save_strategy", "no",
        "--write_report", "false",
    ]  # fmt: skip
    start = time.perf_counter()
    run_logged(args, run_dir / "train.log")
    seconds = time.perf_counter() - start
    (run_dir / "wall.json").write_text(json.dumps({"wall_s": seconds}))
    print(f"  {arm} seed {seed}: trained in {seconds:.0f} s", flush=True)


def training_summary(run_dir: Path) -> dict:
    """The run's wall time and, from its log, the mean training reward and MOPD's fraction of
    groups with a success (the rows that got a peer context, not the reference)."""
    results = json.loads((run_dir / "opd_results.json").read_text())
    steps = [row for row in results["log_history"] if "reward" in row]
    wall_path = run_dir / "wall.json"
    wall = json.loads(wall_path.read_text())["wall_s"] if wall_path.is_file() else math.nan
    key = "opd/mopd_groups_with_success"
    peers = [row[key] for row in steps if key in row]
    return {
        "wall_s": wall,
        "train_wall_s": results["train_wall_s"],
        "train_reward_mean": sum(row["reward"] for row in steps) / max(len(steps), 1),
        "mopd_groups_with_success": sum(peers) / len(peers) if peers else None,
    }


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def evaluate_model(model_path: str, result_path: Path, context) -> dict:
    """Held-out greedy accuracy and exact reverse KL on sampled completions, cached."""
    teacher, tokenizer, held_out, samples = context
    return held_out_metrics(
        model_path, result_path, teacher=teacher, tokenizer=tokenizer, held_out=held_out,
        samples=samples, seed=EVAL_SEED, max_new_tokens=MAX_NEW_TOKENS, reverse_kl="exact",
    )  # fmt: skip


# What the self-teacher reads in OPSD (the reference answer) and in MOPD with one peer success
# (peer_context's block: the label, a newline, the peer's text), per held-out row.
PROBE_CONTEXTS = {"reference": "{answer}", "one peer success": "ok:\n{answer}"}


def self_teacher_accuracy(model_path: str, result_path: Path, context) -> dict[str, float]:
    """Greedy accuracy of the initial student reading each `PROBE_CONTEXTS` context before the
    prompt, i.e. how much the self-teacher knows; cached in `result_path`."""
    if result_path.is_file():
        return json.loads(result_path.read_text())
    _, tokenizer, held_out, _ = context
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    result = {}
    for name, pattern in PROBE_CONTEXTS.items():
        prompted = held_out.map(
            lambda row, pattern=pattern: {
                "prompt": teacher_prompt(
                    row["prompt"], pattern.format(answer=row["answer"]), CONTEXT_TEMPLATE
                )
            }
        )
        result[name] = greedy_accuracy(model, tokenizer, prompted, max_new_tokens=MAX_NEW_TOKENS)
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result))
    return result


def eval_context(plan: Plan, teacher_path: str):
    """What every evaluation shares: the teacher, the tokenizer, the held-out prompts, samples."""
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    held_out = demo_splits()[1]
    held_out = held_out.select(range(min(plan.eval_prompts, len(held_out))))
    return teacher, tokenizer, held_out, plan.eval_samples


# ------------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------------

COLUMNS = ("acc before", "acc after", "rKL after", "wall s")


def format_row(label: str, seed: str, before: dict, cell: dict) -> str:
    values = (before["accuracy"], cell["accuracy"], cell["reverse_kl"], cell["wall_s"])
    numbers = "".join(f"{x:>12.3f}" for x in values[:3]) + f"{values[3]:>12.0f}"
    return f"{label:10s}{seed:>6s}{numbers}"


def format_table(plan: Plan, cells: dict, before: dict) -> str:
    """One row per (arm, seed), then one per arm with the mean over seeds."""
    header = f"{'arm':10s}{'seed':>6s}" + "".join(f"{name:>12s}" for name in COLUMNS)
    lines = [header, "-" * len(header)]
    for arm in plan.arms:
        for seed, cell in zip(plan.seeds, cells[arm], strict=True):
            lines.append(format_row(arm, str(seed), before, cell))
    lines.append("-" * len(header))
    for arm in plan.arms:
        keys = ("accuracy", "reverse_kl", "wall_s")
        mean = {key: sum(cell[key] for cell in cells[arm]) / len(cells[arm]) for key in keys}
        lines.append(format_row(f"mean {arm}", "all", before, mean))
    return "\n".join(lines)


def noise_line(plan: Plan, cells: dict) -> str:
    """One cell's evaluation SE and, with several seeds, the largest seed spread of each arm."""
    all_cells = [cell for arm in plan.arms for cell in cells[arm]]
    acc_se = max(cell["accuracy_se"] for cell in all_cells)
    kl_se = max(cell["reverse_kl_se"] for cell in all_cells)
    text = f"evaluation SE of one cell: accuracy +-{acc_se:.3f}, rKL +-{kl_se:.3f}"
    if len(plan.seeds) > 1:
        spread = {
            key: max(max(c[key] for c in cells[arm]) - min(c[key] for c in cells[arm])
                     for arm in plan.arms)
            for key in ("accuracy", "reverse_kl")
        }  # fmt: skip
        text += (f"; seed spread (max - min, largest over arms): accuracy "
                 f"{spread['accuracy']:.3f}, rKL {spread['reverse_kl']:.3f}")  # fmt: skip
    return text


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def run_experiment(plan: Plan, out: Path) -> dict:
    """Every run and evaluation (each skipped when its output exists); returns the results."""
    teacher_path, student_path = (str(path) for path in prepare_demo_models())
    context = eval_context(plan, teacher_path)
    eval_dir = out / "eval"
    before = evaluate_model(student_path, eval_dir / f"initial-{plan.eval_name}", context)
    teacher_acc = self_teacher_accuracy(
        student_path, eval_dir / f"self_teacher-{plan.eval_name}", context
    )
    cells: dict[str, list[dict]] = {arm: [] for arm in plan.arms}
    for seed in plan.seeds:
        for arm in plan.arms:
            run_dir = plan.run_dir(out, seed, arm)
            train_arm(plan, run_dir, arm, seed)
            cell = training_summary(run_dir) | evaluate_model(
                str(run_dir), run_dir / plan.eval_name, context
            )
            cells[arm].append(cell)
            print(f"  {arm} seed {seed}: acc {cell['accuracy']:.3f} "
                  f"rKL {cell['reverse_kl']:.3f}", flush=True)  # fmt: skip
    return {"before": before, "self_teacher_accuracy": teacher_acc, "cells": cells}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = Plan()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="opd-runs/mopd_vs_opsd")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size,
                        help=f"rollouts per step, a multiple of {GROUP_SIZE}")  # fmt: skip
    parser.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(defaults.seeds))
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--eval_prompts", type=int, default=defaults.eval_prompts,
                        help="the first N of the 200 held-out problems")  # fmt: skip
    parser.add_argument("--eval_samples", type=int, default=defaults.eval_samples,
                        help="student samples per prompt for the reverse KL")  # fmt: skip
    args = parser.parse_args(argv)
    if args.batch_size % GROUP_SIZE:
        parser.error(f"--batch_size must be a multiple of {GROUP_SIZE} (rollouts per prompt)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    plan = replace(
        Plan(), steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        seeds=tuple(args.seeds), arms=tuple(args.arms), eval_prompts=args.eval_prompts,
        eval_samples=args.eval_samples,
    )  # fmt: skip
    out = Path(args.output_dir)
    start = time.perf_counter()
    experiment = run_experiment(plan, out)
    seconds = time.perf_counter() - start
    before = experiment["before"]
    print(
        f"\n{plan}\nacc: held-out greedy accuracy; rKL: full-vocabulary reverse KL to "
        "demo:teacher, nats/token on the student's samples; wall s: the run's opd distill\n"
    )
    print(format_table(plan, experiment["cells"], before))
    probes = ", ".join(
        f"{name} {acc:.3f}" for name, acc in experiment["self_teacher_accuracy"].items()
    )
    print(f"\ninitial student: acc {before['accuracy']:.3f}, rKL {before['reverse_kl']:.3f}; "
          f"self-teacher greedy acc with a context ({CONTEXT_TEMPLATE}): {probes}")  # fmt: skip
    print(noise_line(plan, experiment["cells"]))
    print(f"wall time: {seconds:.0f} s (runs and evaluations found done were skipped)")
    report = {"plan": asdict(plan), "wall_s": seconds, **experiment}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
