"""Off-policy ratio forms on stale Lightning OPD rollouts, on the demo pair (issue 18).

What is compared (METHODS.md sections 6 and 10). Staleness `s` = how many training steps older
than the model training starts from is the policy that sampled the stored rollouts.

1. Warm-up: the demo student trains with online OPD (`opd/demo/default.yaml`, transformers
   generation instead of vLLM) for `W` steps, saving checkpoints; the initial student is step 0.
2. Rollouts: `opd rollout` (vLLM, a subprocess) samples the same prompts, same seed, from the
   step `W - s` model for each `s`, and `opd teacher precompute` scores them with the demo
   teacher: one shard set per staleness, each row with the sampler's logprob `lp_samp`.
3. Training: from the step-`W` model, `K` steps of `recipes/lightning_opd-tiny.yaml`
   (`teacher_mode: offline`, one update per batch) on each shard set, same seed, lr and batch,
   for each ratio form. plain/ppo/cispo take `lp_old` = the current policy at generation time,
   so with one update per batch their ratio is 1 and they do not correct for staleness (the
   baseline; the three take the same gradient); topr, dispo, minpro, ctpo, sapo and bapo weigh
   the current policy against `lp_samp` (DISPO and BAPO split by correctness: the runs grade the
   stored rollouts with `demo_accuracy`, not trained on); "vcpo" is plain with the learning rate
   scaled by the ESS and the min-variance baseline (`opd_lr_ess_scaling`,
   `opd_baseline: min_variance`).
4. Evaluation of each final model on the 200 held-out demo problems:
   - accuracy: greedy completions graded by the task (`opd.demo.evaluate.greedy_accuracy`);
   - rKL: the on-policy reverse KL to the teacher, k1 mean over tokens of the student's own
     temperature-1 samples (`Plan.eval_samples` per problem, one sampling seed for every model):
     `rKL = sum_{i,t} (lp_s(y_it) - lp_t(y_it)) / sum_i n_i`, its standard error by the delta
     method over sequences, `SE^2 = sum_i (S_i - rKL n_i)^2 / (sum_i n_i)^2`; the exact
     full-vocabulary KL on the same samples is stored too (`reverse_kl_exact`);
   - ESS: the mean over the K steps of `opd/is_ess_fraction` from the run's log, the ESS
     `(sum w)^2 / (N sum w^2)` of `w_t = exp(lp_s - lp_samp)` over the step's tokens (logged
     for every form, including those whose update does not use it).

One table: rows = forms, for each staleness rKL, accuracy and ESS (means over `--seeds`, and a
spread table when there are several), plus the start (step W) and sampler models as reference.

Every stage is skipped when its output exists (the warm-up's checkpoints, a complete shard set, a
run's `opd_results.json`, an `eval.json`), so a second invocation resumes, and adding a seed
reuses the warm-up and the rollouts. Outputs under `--output_dir` (default
`opd-runs/offpolicy_ratios`), `results.json` at the end.

Run: `python scripts/experiments/offpolicy_ratios.py [--seeds 0 1] [--learning_rate 1e-3]
[--forms plain topr] [--tiny]`. Runs live under `train/lr<lr>/seed<seed>/stale<s>/<form>`, so
another seed or lr reuses the warm-up and the shards. `--tiny` (the test): W = 1 (lr 1e-3, no lr
warm-up), staleness {0, 1}, plain and ppo, 16 prompts, batch 32, 2 steps.

Defaults: W = 20, staleness {0, 5, 20} (checkpoints 20, 15 and the initial student), 512 prompts
x 4 rollouts (2048, 4 steps per pass), K = 20 steps (5 passes), batch 512 (128 prompts x 4, as
the demo: smaller batches are too noisy, demo_opd_check.py), lr 1e-4 constant. Not the
recipe's 1e-3: there one Adam step from the start model already drops the ESS against its own
rollouts to ~0.03 (ratio p05 0.01), so after the first step every column is equally far
off-policy and the staleness barely matters; at 1e-4 the 0-stale ESS decays 1.0, 0.96, 0.89,
... and the 20-stale one starts at ~0.2 (exploration runs, plain and topr).

Measured (2-core CPU shared with other jobs; seed 0: 769 s, of which warm-up 230 s, shards
2 min, 30 runs 6-80 s each; seed 1 added: 329 s). Start model (step 20): rKL 1.934, accuracy
0.225; samplers: step 15 1.880 / 0.240, step 0 1.609 / 0.370 (the demo's fresh-optimizer dip:
the warm-up lowered accuracy, so the 20-stale sampler is the best model here). Means over seeds
0 and 1, rKL / accuracy / ESS at 0, 5 and 20 steps stale:
    plain  2.99 .06 .32 | 2.65 .12 .15 | 2.63 .18 .16   (ppo, cispo: the same)
    topr   1.87 .20 .48 | 2.00 .28 .32 | 1.92 .27 .30
    dispo  1.68 .30 .71 | 1.98 .26 .55 | 1.85 .31 .60
    minpro 2.55 .08 .44 | 2.53 .11 .22 | 2.61 .21 .21
    ctpo   1.71 .28 .69 | 1.64 .28 .58 | 1.57 .32 .44
    sapo   2.59 .08 .43 | 2.76 .08 .15 | 2.99 .11 .14
    bapo   1.75 .27 .95 | 1.81 .24 .66 | 1.67 .32 .65
    vcpo   2.05 .16 .44 | 2.26 .16 .24 | 2.20 .20 .26
One cell's evaluation SE: rKL 0.037, accuracy 0.034; seed spread (max - min) of rKL 0.00-0.04
at 5 and 20 stale, up to 0.55 at 0 stale (plain). Uncorrected forms lose to the start model at
every staleness (the fixed rollouts are reused 5 times): the damage is from reuse as much as from
staleness.

Test: `pytest tests/integration/test_offpolicy_ratios_script.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.cli import run_logged
from opd.demo.evaluate import (
    held_out_metrics,
)
from opd.demo.pretrain import MAX_NEW_TOKENS, demo_splits, prepare_demo_models

REPO = Path(__file__).resolve().parents[2]
LIGHTNING_RECIPE = REPO / "recipes" / "lightning_opd-tiny.yaml"
FORMS = ("plain", "ppo", "cispo", "topr", "dispo", "minpro", "ctpo", "sapo", "bapo", "vcpo")
BASELINE_FORM = "plain"
GROUP_SIZE = 4  # rollouts per prompt (the demo's num_generations)
VCPO_FLAGS = ["--opd_ratio", "plain", "--opd_lr_ess_scaling", "true",
              "--opd_baseline", "min_variance"]  # fmt: skip
EVAL_SEED = 1234


@dataclass(frozen=True)
class Plan:
    """The experiment's sizes (defaults: the full run; `TINY`: the test's)."""

    warmup_steps: int = 20
    staleness: tuple[int, ...] = (0, 5, 20)
    forms: tuple[str, ...] = FORMS
    prompts: int = 512
    batch_size: int = 512
    train_steps: int = 20
    learning_rate: float = 1e-4
    warmup_batch_size: int = 512  # the demo's
    warmup_lr_warmup_steps: int = 10  # the demo's
    eval_samples: int = 8
    seeds: tuple[int, ...] = (0,)


TINY = Plan(
    warmup_steps=1, staleness=(0, 1), forms=("plain", "ppo"), prompts=16, batch_size=32,
    train_steps=2, warmup_batch_size=32, warmup_lr_warmup_steps=0, eval_samples=2,
)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------


def sampler_models(plan: Plan, out: Path, initial_student: str) -> dict[int, str]:
    """`{staleness: folder of the step W - s model}` (step 0: the initial student)."""
    warm = out / "warmup"
    return {
        s: initial_student
        if s == plan.warmup_steps
        else str(warm / f"checkpoint-{plan.warmup_steps - s}")
        for s in plan.staleness
    }


def warm_up(plan: Plan, out: Path) -> None:
    """Online OPD from the initial student for W steps, a checkpoint at every step needed (the
    samplers' and W, the start of training)."""
    steps = {plan.warmup_steps - s for s in plan.staleness} | {plan.warmup_steps}
    needed = [out / "warmup" / f"checkpoint-{step}" for step in steps if step > 0]
    if all((path / "model.safetensors").is_file() for path in needed):
        print(f"warm-up: done ({out / 'warmup'})", flush=True)
        return
    save_every = math.gcd(*(step for step in steps if step > 0))
    demo_recipe = REPO / "opd" / "demo" / "default.yaml"
    args = [
        "distill", "--config", str(demo_recipe), "--use_vllm", "false",
        "--max_steps", str(plan.warmup_steps), "--save_strategy", "steps",
        "--save_steps", str(save_every), "--per_device_train_batch_size",
        str(plan.warmup_batch_size), "--warmup_steps", str(plan.warmup_lr_warmup_steps),
        "--eval_before_after", "false", "--write_report", "false", "--logging_steps", "1",
        "--output_dir", str(out / "warmup"),
    ]  # fmt: skip
    start = time.perf_counter()
    run_logged(args, out / "warmup" / "train.log")
    print(f"warm-up: {plan.warmup_steps} steps in {time.perf_counter() - start:.0f} s", flush=True)


def is_complete_shard_set(folder: Path) -> bool:
    manifest = folder / "manifest.json"
    return manifest.is_file() and bool(json.loads(manifest.read_text()).get("complete"))


def build_shards(plan: Plan, out: Path, staleness: int, model: str, teacher: str) -> Path:
    """`opd rollout` from `model` (vLLM, a subprocess) then `opd teacher precompute`."""
    rollouts, scores = out / "rollouts" / f"stale{staleness}", out / "scores" / f"stale{staleness}"
    if is_complete_shard_set(scores):
        print(f"shards stale {staleness}: done ({scores})", flush=True)
        return scores
    start = time.perf_counter()
    if not is_complete_shard_set(rollouts):
        command = [
            sys.executable, "-m", "opd.cli", "rollout", "--model_name_or_path", model,
            "--dataset_name", "demo:arithmetic", "--num_generations", str(GROUP_SIZE),
            "--max_completion_length", str(MAX_NEW_TOKENS), "--max_prompts", str(plan.prompts),
            "--vllm_max_model_length", "32", "--seed", "0", "--output_dir", str(rollouts),
        ]  # fmt: skip
        rollouts.parent.mkdir(parents=True, exist_ok=True)
        log_path = rollouts.parent / f"stale{staleness}.log"
        with open(log_path, "w") as log:
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=1800)
        if result.returncode != 0:
            raise RuntimeError(f"opd rollout failed:\n{log_path.read_text()[-3000:]}")
    precompute = ["teacher", "precompute", "--rollouts", str(rollouts),
                  "--teacher_model_name_or_path", teacher, "--output_dir", str(scores)]  # fmt: skip
    run_logged(precompute, out / "scores" / f"stale{staleness}.log")
    print(f"shards stale {staleness}: {time.perf_counter() - start:.0f} s", flush=True)
    return scores


def train_run(plan: Plan, run_dir: Path, form: str, scores: Path, start_model: str, seed: int):
    """K steps of Lightning OPD with `form` on the stored rollouts `scores`."""
    if (run_dir / "opd_results.json").is_file():
        return
    ratio = VCPO_FLAGS if form == "vcpo" else ["--opd_ratio", form]
    args = [
        "distill", "--config", str(LIGHTNING_RECIPE), "--teacher_shards", str(scores),
        "--model_name_or_path", start_model, "--output_dir", str(run_dir),
        "--num_generations", str(GROUP_SIZE), "--per_device_train_batch_size",
        str(plan.batch_size), "--max_steps", str(plan.train_steps),
        "--learning_rate", str(plan.learning_rate), "--seed", str(seed),
        "--reward_funcs", "demo_accuracy",  # correctness for DISPO/BAPO; not trained on
        "--logging_steps", "1", "--save_strategy", "no", "--write_report", "false", *ratio,
    ]  # fmt: skip
    start = time.perf_counter()
    run_logged(args, run_dir / "train.log")
    print(f"  trained {run_dir.relative_to(run_dir.parents[3])}: "
          f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip


def ess_summary(run_dir: Path) -> dict:
    """Mean ESS fraction over the training steps, and each step's ESS and ratio quantiles."""
    history = json.loads((run_dir / "opd_results.json").read_text())["log_history"]
    steps = [row for row in history if "opd/is_ess_fraction" in row]
    ess_S = [row["opd/is_ess_fraction"] for row in steps]
    finite = [value for value in ess_S if math.isfinite(value)]
    return {
        "ess_fraction": sum(finite) / len(finite) if finite else math.nan,
        "ess_fraction_per_step": ess_S,
        "ratio_p05_per_step": [row["opd/is_ratio_p05"] for row in steps],
        "ratio_p95_per_step": [row["opd/is_ratio_p95"] for row in steps],
    }


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def evaluate_model(model_path: str, result_path: Path, context) -> dict:
    """Held-out greedy accuracy and on-policy reverse KL (k1) of one model, cached."""
    teacher, tokenizer, held_out, samples = context
    return held_out_metrics(
        model_path, result_path, teacher=teacher, tokenizer=tokenizer, held_out=held_out,
        samples=samples, seed=EVAL_SEED, max_new_tokens=MAX_NEW_TOKENS, reverse_kl="k1",
    )  # fmt: skip


def eval_context(plan: Plan, teacher_path: str):
    """What every evaluation shares: the teacher, the tokenizer, the held-out split, samples."""
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    return teacher, tokenizer, demo_splits()[1], plan.eval_samples


# ------------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------------

METRICS = (("reverse_kl", "rKL"), ("accuracy", "acc"), ("ess_fraction", "ESS"))


def aggregate(cells: list[dict], how: str) -> dict[str, float]:
    """Mean or spread (max - min) over seeds of each metric."""
    out = {}
    for key, _ in METRICS:
        values = [cell[key] for cell in cells if key in cell]
        if not values:
            out[key] = math.nan
        elif how == "mean":
            out[key] = sum(values) / len(values)
        else:
            out[key] = max(values) - min(values)
    return out


def format_cell(values: dict[str, float]) -> str:
    """One staleness column of one row: rKL, accuracy, ESS ("-" where not defined)."""
    numbers = [values.get(key, math.nan) for key, _ in METRICS]
    return "| " + " ".join(f"{x:7.3f}" if math.isfinite(x) else f"{'-':>7s}" for x in numbers) + " "


def format_table(plan: Plan, results: dict, how: str, references: dict) -> str:
    """Rows = forms (then the reference models when `how` is "mean"), columns = staleness."""
    width = 8 * len(METRICS)  # a column: "| " + 7-wide numbers joined by spaces + " "
    names = " ".join(f"{name:>7s}" for _, name in METRICS)
    lines = [
        f"{'':16s}" + "".join(f"| {f'{s} steps stale':<{width}s}" for s in plan.staleness),
        f"{'form':16s}" + "".join(f"| {names} " for _ in plan.staleness),
    ]
    lines.append("-" * len(lines[-1]))
    rows = {
        form: {s: aggregate(results[form][s], how) for s in plan.staleness} for form in plan.forms
    }
    if how == "mean":
        rows |= references
    for label, by_staleness in rows.items():
        cells = "".join(format_cell(by_staleness[s]) for s in plan.staleness)
        lines.append(f"{label:16s}{cells}")
    return "\n".join(lines)


def conclusion(plan: Plan, results: dict) -> str:
    """Which form had the lowest rKL at the largest staleness, and by how much versus plain."""
    stale = max(plan.staleness)
    cells = {form: results[form][stale] for form in plan.forms}
    means = {form: aggregate(cells[form], "mean") for form in plan.forms}
    best = min(plan.forms, key=lambda form: means[form]["reverse_kl"])
    kl, acc = means[best]["reverse_kl"], means[best]["accuracy"]
    text = f"At {stale} steps stale the lowest rKL is {best}'s, {kl:.3f}"
    if BASELINE_FORM in means and best != BASELINE_FORM:
        plain_kl, plain_acc = means[BASELINE_FORM]["reverse_kl"], means[BASELINE_FORM]["accuracy"]
        text += f" vs plain {plain_kl:.3f} ({kl - plain_kl:+.3f})"
        text += f"; accuracy {acc:.3f} vs {plain_acc:.3f}"
    kl_se = max(cell["reverse_kl_se"] for form in plan.forms for cell in cells[form])
    acc_se = max(cell["accuracy_se"] for form in plan.forms for cell in cells[form])
    text += f". Evaluation SE of one cell: rKL +-{kl_se:.3f}, accuracy +-{acc_se:.3f}"
    if len(plan.seeds) > 1:
        spreads = [aggregate(cells[form], "spread")["reverse_kl"] for form in plan.forms]
        text += (
            f"; rKL spread over {len(plan.seeds)} seeds (max - min, mean over forms) "
            f"{sum(spreads) / len(spreads):.3f}"
        )
    return text + "."


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def reference_rows(plan: Plan, out: Path, models: dict[int, str], start_model: str, context):
    """The step-W start model (same in every column) and each column's sampler."""
    start = evaluate_model(start_model, out / "eval" / f"step{plan.warmup_steps}.json", context)
    samplers = {
        s: evaluate_model(models[s], out / "eval" / f"step{plan.warmup_steps - s}.json", context)
        for s in plan.staleness
    }
    return {
        f"start (step {plan.warmup_steps})": {s: start for s in plan.staleness},
        "sampler (W - s)": samplers,
    }


def run_experiment(plan: Plan, out: Path) -> dict:
    """Every stage (each skipped when its output exists); returns the results."""
    teacher_path, student_path = (str(path) for path in prepare_demo_models())
    models = sampler_models(plan, out, student_path)
    start_model = str(out / "warmup" / f"checkpoint-{plan.warmup_steps}")
    warm_up(plan, out)
    scores = {s: build_shards(plan, out, s, models[s], teacher_path) for s in plan.staleness}
    context = eval_context(plan, teacher_path)
    results = {form: {s: [] for s in plan.staleness} for form in plan.forms}
    train_dir = out / "train" / f"lr{plan.learning_rate:g}"
    for seed in plan.seeds:
        for s in plan.staleness:
            for form in plan.forms:
                run_dir = train_dir / f"seed{seed}" / f"stale{s}" / form
                train_run(plan, run_dir, form, scores[s], start_model, seed)
                cell = ess_summary(run_dir) | evaluate_model(
                    str(run_dir), run_dir / "eval.json", context
                )
                results[form][s].append(cell)
                print(
                    f"seed {seed} stale {s:2d} {form:7s} rKL {cell['reverse_kl']:.3f} "
                    f"acc {cell['accuracy']:.3f} ESS {cell['ess_fraction']:.3f}",
                    flush=True,
                )
    return {
        "results": results,
        "references": reference_rows(plan, out, models, start_model, context),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="opd-runs/offpolicy_ratios")
    parser.add_argument("--tiny", action="store_true", help="the test's sizes (see TINY)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: 0)")
    parser.add_argument("--forms", nargs="+", choices=FORMS, help="default: all")
    parser.add_argument("--learning_rate", type=float, help="of the K steps (default: 1e-4)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    plan = TINY if args.tiny else Plan()
    if args.seeds:
        plan = replace(plan, seeds=tuple(args.seeds))
    if args.forms:
        plan = replace(plan, forms=tuple(args.forms))
    if args.learning_rate:
        plan = replace(plan, learning_rate=args.learning_rate)
    out = Path(args.output_dir)
    start = time.perf_counter()
    experiment = run_experiment(plan, out)
    results, references = experiment["results"], experiment["references"]
    seconds = time.perf_counter() - start
    print(f"\n{plan}\nrKL: on-policy reverse KL to the teacher (k1, nats/token, held-out samples); "
          f"acc: held-out greedy accuracy; ESS: mean ESS fraction over training\n")  # fmt: skip
    print(format_table(plan, results, "mean", references))
    if len(plan.seeds) > 1:
        print(f"\nspread (max - min) over seeds {list(plan.seeds)}\n")
        print(format_table(plan, results, "spread", references))
    summary = conclusion(plan, results)
    print(f"\n{summary}\nwall time: {seconds:.0f} s (stages found done were skipped)")
    report = {"plan": asdict(plan), "wall_s": seconds, "conclusion": summary, **experiment}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
