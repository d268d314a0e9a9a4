"""Cross-tokenizer OPD on the demo: does a teacher of another tokenizer move the student toward it?

The demo's student (`demo:student`, one token per character) is distilled for the same steps,
batch, lr and seeds by vanilla on-policy distillation (`opd_kl_coef 1`, no outcome reward,
METHODS.md s.1) from:

- same: `demo:teacher`, the demo's teacher, with the student's own character tokenizer (the
  reference: the same-tokenizer path);
- cross: `demo:teacher-bpe`, the same task learnt by a teacher whose BPE tokenizer makes most
  numbers one token and whose EOS is another string at another id (`opd/demo/bpe.py`), through
  `teacher_cross_tokenizer` (span rewards, rule all; `recipes/cross_tokenizer-tiny.yaml`);
- cross_hybrid: cross plus the family-B divergence at span starts, JSD beta 0.5 on the
  teacher's top-8, GOLD's vocabulary map plus ULD's sorted L1 (`opd_cross_vocab hybrid`).

Evaluated on the first `--eval_prompts` of the demo's 200 held-out problems, for the initial
student, each final model, and both teachers:
- accuracy: greedy completions graded by the task (`opd.demo.evaluate.greedy_accuracy`);
- bpe_logprob: the BPE teacher's logprob of the model's greedy answer (its text re-tokenized by
  the BPE tokenizer, plus the BPE EOS) after the BPE rendering of the prompt, mean over prompts:
  how likely the cross-tokenizer teacher finds what the student now answers.

Every run is its own `opd distill` (in this process) under
`--output_dir/s<steps>-b<batch>-lr<lr>/seed<seed>/<arm>`, skipped when its `opd_results.json`
exists; each evaluation is cached beside it, so a second invocation trains nothing.
`results.json` at the end.

The schedule is the embedded demo's (`opd/demo/default.yaml`): lr 1e-3 after 10 warm-up steps,
100 steps of 512 samples (128 prompts x 4), transformers generation here instead of vLLM.

Run: `python scripts/experiments/cross_tokenizer_demo.py [--steps 100] [--batch_size 512]
[--learning_rate 1e-3] [--seeds 0 1] [--arms same cross cross_hybrid] [--eval_prompts 200]
[--output_dir opd-runs/cross_tokenizer_demo]`.

Measured (2-core CPU, 2026-12-08, seeds 0 and 1, 245 s for the six runs and evaluations):

    model               accuracy   bpe logprob
    student before         0.370        -3.812
    demo:teacher           1.000        -0.147
    demo:teacher-bpe       0.995        -0.036
    mean same              0.752        -1.461    (0.755, 0.750)
    mean cross             0.643        -2.039    (0.610, 0.675)
    mean cross_hybrid      0.677        -1.831    (0.675, 0.680)
    accuracy SE of one cell: 0.034

Cross-tokenizer OPD moves the student toward the BPE teacher (+27 to +31 accuracy points, its
answers 1.8-2.0 nats likelier under that teacher), short of the same-tokenizer teacher. On the
way there (seed 0, cross arm): with the span's reward on its last token only the student
collapsed to 0.000 (it stopped after one digit, unpunished); with the reward on every token of
the span, 0.505; with the boundary credit and the within-span prefix split, 0.610. Before
special tokens the teacher cannot spell were penalised, the student learnt to answer with them
(509 of 512 rows at step 99).

Test: `pytest tests/integration/test_cross_tokenizer_script.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.cli import run_logged
from opd.demo.evaluate import greedy_accuracy
from opd.demo.pretrain import MAX_NEW_TOKENS, demo_splits, prepare_bpe_teacher, prepare_demo_models

REPO = Path(__file__).resolve().parents[2]
BASE_RECIPE = REPO / "recipes" / "cross_tokenizer-tiny.yaml"
ARMS = ("same", "cross", "cross_hybrid")
GROUP_SIZE = 4
COMMON_FLAGS = [
    "--opd_kl_coef", "1.0", "--opd_outcome_weight", "0.0", "--num_generations", str(GROUP_SIZE),
    "--reward_funcs", "demo_accuracy",  # logged, not trained on
]  # fmt: skip
ARM_FLAGS = {
    "same": ["--teacher_model_name_or_path", "demo:teacher", "--teacher_cross_tokenizer",
             "false", "--opd_divergence", "none", "--teacher_top_k", "0"],
    "cross": ["--teacher_model_name_or_path", "demo:teacher-bpe", "--teacher_cross_tokenizer",
              "true", "--opd_divergence", "none", "--teacher_top_k", "0"],
    "cross_hybrid": ["--teacher_model_name_or_path", "demo:teacher-bpe",
                     "--teacher_cross_tokenizer", "true", "--opd_divergence", "jsd",
                     "--opd_divergence_coef", "0.5", "--teacher_top_k", "8",
                     "--opd_cross_vocab", "hybrid"],
}  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """The experiment's sizes (the defaults: the full run)."""

    steps: int = 100
    batch_size: int = 512
    learning_rate: float = 1e-3
    seeds: tuple[int, ...] = (0, 1)
    arms: tuple[str, ...] = ARMS
    eval_prompts: int = 200

    def run_dir(self, out: Path, seed: int, arm: str) -> Path:
        sizes = f"s{self.steps}-b{self.batch_size}-lr{self.learning_rate:g}"
        return out / sizes / f"seed{seed}" / arm

    @property
    def eval_name(self) -> str:
        return f"eval-p{self.eval_prompts}.json"


def train_arm(plan: Plan, run_dir: Path, arm: str, seed: int) -> float:
    """`plan.steps` steps of `arm` from the initial demo student (skipped when done); the
    wall time of the `opd distill` call."""
    wall_path = run_dir / "wall.json"
    if (run_dir / "opd_results.json").is_file():
        return json.loads(wall_path.read_text())["wall_s"] if wall_path.is_file() else math.nan
    args = [
        "distill", "--config", str(BASE_RECIPE), *COMMON_FLAGS, *ARM_FLAGS[arm],
        "--output_dir", str(run_dir), "--max_steps", str(plan.steps),
        "--per_device_train_batch_size", str(plan.batch_size),
        "--learning_rate", str(plan.learning_rate),
        "--lr_scheduler_type", "constant_with_warmup", "--warmup_steps", "10",
        "--seed", str(seed), "--logging_steps", "1", "--save_strategy", "no",
        "--write_report", "false",
    ]  # fmt: skip
    start = time.perf_counter()
    run_logged(args, run_dir / "train.log")
    seconds = time.perf_counter() - start
    wall_path.write_text(json.dumps({"wall_s": seconds}))
    print(f"  {arm} seed {seed}: trained in {seconds:.0f} s", flush=True)
    return seconds


@torch.no_grad()
def bpe_answer_logprob(model, tokenizer, bpe_teacher, bpe_tokenizer, held_out) -> float:
    """Mean over prompts of the BPE teacher's logprob of `model`'s greedy answer + EOS."""
    prompts = list(held_out["prompt"])
    encoded = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    out = model.generate(**encoded, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    answers = tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :],
                                     skip_special_tokens=True)  # fmt: skip
    total = 0.0
    for prompt, answer in zip(prompts, answers, strict=True):
        prompt_ids = bpe_tokenizer(prompt)["input_ids"]
        answer_ids = bpe_tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + answer_ids + [bpe_tokenizer.eos_token_id]])
        logprobs = bpe_teacher(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        targets = ids[0, len(prompt_ids) :]
        total += float(logprobs[len(prompt_ids) - 1 :].gather(-1, targets[:, None]).sum())
    return total / len(prompts)


def evaluate(model_path: str, result_path: Path, context) -> dict:
    """Held-out greedy accuracy and the BPE teacher's logprob of the greedy answers, cached."""
    if result_path.is_file():
        return json.loads(result_path.read_text())
    bpe_teacher, bpe_tokenizer, held_out = context
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    accuracy = greedy_accuracy(model, tokenizer, held_out, max_new_tokens=MAX_NEW_TOKENS)
    result = {
        "accuracy": accuracy,
        "accuracy_se": math.sqrt(accuracy * (1 - accuracy) / len(held_out)),
        "bpe_logprob": bpe_answer_logprob(model, tokenizer, bpe_teacher, bpe_tokenizer, held_out),
    }
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1))
    return result


def run_experiment(plan: Plan, out: Path) -> dict:
    teacher_path, student_path = (str(path) for path in prepare_demo_models())
    bpe_path = str(prepare_bpe_teacher())
    bpe_teacher = AutoModelForCausalLM.from_pretrained(bpe_path, dtype=torch.float32).eval()
    held_out = demo_splits()[1]
    held_out = held_out.select(range(min(plan.eval_prompts, len(held_out))))
    context = (bpe_teacher, AutoTokenizer.from_pretrained(bpe_path), held_out)
    eval_dir = out / "eval"
    models = {"student before": student_path, "demo:teacher": teacher_path,
              "demo:teacher-bpe": bpe_path}  # fmt: skip
    fixed = {name: evaluate(path, eval_dir / f"{name.replace(':', '_').replace(' ', '_')}-"
                            f"{plan.eval_name}", context)
             for name, path in models.items()}  # fmt: skip
    cells: dict[str, list[dict]] = {arm: [] for arm in plan.arms}
    for seed in plan.seeds:
        for arm in plan.arms:
            run_dir = plan.run_dir(out, seed, arm)
            wall = train_arm(plan, run_dir, arm, seed)
            cell = evaluate(str(run_dir), run_dir / plan.eval_name, context) | {"wall_s": wall}
            cells[arm].append(cell)
            print(f"  {arm} seed {seed}: acc {cell['accuracy']:.3f} "
                  f"bpe_logprob {cell['bpe_logprob']:.3f}", flush=True)  # fmt: skip
    return {"fixed": fixed, "cells": cells}


def format_table(plan: Plan, experiment: dict) -> str:
    header = f"{'model':22s}{'seed':>6s}{'accuracy':>10s}{'bpe logprob':>13s}{'wall s':>8s}"
    lines = [header, "-" * len(header)]
    for name, cell in experiment["fixed"].items():
        lines.append(f"{name:22s}{'':>6s}{cell['accuracy']:>10.3f}{cell['bpe_logprob']:>13.3f}")
    for arm in plan.arms:
        arm_cells = experiment["cells"][arm]
        for seed, cell in zip(plan.seeds, arm_cells, strict=True):
            lines.append(f"{arm:22s}{seed:>6d}{cell['accuracy']:>10.3f}"
                         f"{cell['bpe_logprob']:>13.3f}{cell['wall_s']:>8.0f}")  # fmt: skip
        keys = ("accuracy", "bpe_logprob")
        mean = {key: sum(cell[key] for cell in arm_cells) / len(arm_cells) for key in keys}
        lines.append(f"{'mean ' + arm:22s}{'all':>6s}{mean['accuracy']:>10.3f}"
                     f"{mean['bpe_logprob']:>13.3f}")  # fmt: skip
    se = max(c["accuracy_se"] for cells in experiment["cells"].values() for c in cells)
    lines.append(f"accuracy SE of one cell (binomial, {plan.eval_prompts} prompts): +-{se:.3f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = Plan()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="opd-runs/cross_tokenizer_demo")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size,
                        help=f"rollouts per step, a multiple of {GROUP_SIZE}")  # fmt: skip
    parser.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(defaults.seeds))
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--eval_prompts", type=int, default=defaults.eval_prompts)
    args = parser.parse_args(argv)
    if args.batch_size % GROUP_SIZE:
        parser.error(f"--batch_size must be a multiple of {GROUP_SIZE} (rollouts per prompt)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    plan = replace(
        Plan(), steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        seeds=tuple(args.seeds), arms=tuple(args.arms), eval_prompts=args.eval_prompts,
    )  # fmt: skip
    out = Path(args.output_dir)
    start = time.perf_counter()
    experiment = run_experiment(plan, out)
    table = format_table(plan, experiment)
    print(table)
    print(f"total wall time: {time.perf_counter() - start:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(experiment | {"table": table}, indent=1))
    return experiment


if __name__ == "__main__":
    main()
