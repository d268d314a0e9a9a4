"""TIP token selection: all tokens vs entropy_sample (50%) vs Q3, trained, and the loss memory.

Part 1 (training, METHODS.md section 3). The real trainer, once per rule, through the CLI:
`python -m opd.cli distill --tip_rule RULE --max_steps N --eval_before_after true --use_vllm false
--report_to none --seed S --output_dir OUT/RULE` on the embedded demo pair (everything else is
`opd/demo/default.yaml`). Each run is a fresh child process; its log is `OUT/RULE/train.log`. The
table gives the share of completion tokens the loss kept (`opd/kept_fraction`, mean over
steps), held-out greedy accuracy and exact reverse KL before and after (`opd_results.json`,
written by `opd distill`), the mean step time, and the child's peak resident memory (`ru_maxrss`
from `os.wait4`: the whole process, models and evaluation included). With the demo's 49-token
vocabulary the logits are a few MB, so that peak cannot show what TIP saves.

Part 2 (the loss step's memory at a realistic vocabulary). A random Qwen2 causal LM
(`opd.demo.tiny.build_tiny_model`: `--vocab` 32768, `--hidden` 256, `--layers` 2) and a batch of
`--batch` x `--tokens` completion tokens after a `--prompt-tokens` prompt. Each case runs in a fresh
child process (this script with `--loss-case`): one warm-up on a small batch, then one
forward+backward whose peak memory above the state after building the model and inputs is
measured (CPU: Linux `VmHWM`, reset through `/proc/self/clear_refs`, with glibc told to mmap every
allocation over 128 KiB so that freed tensors leave RSS; CUDA: `torch.cuda.max_memory_allocated`).
Cases:

    opd kept K%      opd's loss path (opd/trainer.py `_compute_loss`): `completion_hidden_states`
                     -> the kept positions -> `opd.kernels.fused_linear_token_stats` ->
                     `policy_loss_N` (plain ratio) -> mean -> backward; K = 100, 50, 10 (a seeded
                     random keep mask: memory does not depend on which tokens are kept)
    unfused kept K%  the kept positions' logits `[N, V]` in one tensor, `log_softmax`, gather
                     (TIP's "select before the lm_head" without a fused kernel); K = 100, 50, 10
    naive            full `[B, T, V]` logits (`logits_to_keep=T+1`, as TRL computes them),
                     `log_softmax`, gather, the same loss on all tokens
    no lm_head       the hidden states' forward+backward alone (a squared-norm loss): the floor
                     that the transformer body and its weight gradients set for every case

Run (CPU, 5-10 minutes with the defaults on 2 shared cores; ~5 GB of RAM for the naive case):
    python scripts/experiments/tip_tokens.py [--max-steps 50] [--rules none,entropy_sample,q3]
        [--q3-quantiles 0.5,0.8] [--distill-args "..."] [--skip-training]
        [--vocab 32768] [--batch 8] [--tokens 1024] [--skip-memory]
Step times are only comparable between runs on an otherwise idle machine.

Measured (defaults, 226 s on an idle 2-core CPU). Part 1: after 50 steps every rule is still in
the demo's early dip (accuracy 37.0% -> none 24.5%, entropy_sample 21.0%); at 100 steps none
reaches 63.0% and entropy_sample 59.0%. Q3 with the default quantiles keeps 0.2% of the tokens
at first (the demo has almost no confident-and-wrong tokens), so each Adam step is driven by a
handful of tokens; the student collapses (0.0% after 50 steps, reverse KL 6.3), also with a
family-B loss (`--distill-args "--opd_divergence reverse_kl --opd_divergence_support full
--opd_kl_coef 0"`), while `--q3-quantiles 0.9,0.5` keeps 40% and tracks the other rules (21.5%).
Part 2: opd's fused path peaks at 543 / 539 / 539 MB with 100 / 50 / 10% of tokens kept, the body
alone at 511 MB: the fused loss never holds `[N, V]` logits, so selection has nothing left to
save there. Unfused: 3525 / 1976 / 740 MB (50% kept: -44%, TIP's "up to 47%"); naive 4551 MB.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: the shared peak meter
from peak_memory import peak_mib_above, reset_peak

RULES = ("none", "entropy_sample", "q3")
LOSS_CASES = {  # name -> (path, kept share)
    "opd kept 100%": ("opd", 1.0),
    "opd kept 50%": ("opd", 0.5),
    "opd kept 10%": ("opd", 0.1),
    "unfused kept 100%": ("unfused", 1.0),
    "unfused kept 50%": ("unfused", 0.5),
    "unfused kept 10%": ("unfused", 0.1),
    "naive (full logits)": ("naive", 1.0),
    "no lm_head (floor)": ("floor", 1.0),
}

# ----- part 1: training runs through the CLI -----


def train_one(rule: str, args) -> dict:
    """Run `opd distill` for one TIP rule in a child process; its results and peak RSS."""
    output_dir = Path(args.output_root) / rule
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / "opd_results.json"
    results_path.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "opd.cli", "distill",
        "--tip_rule", rule, "--tip_keep_ratio", str(args.keep_ratio),
        "--max_steps", str(args.max_steps), "--eval_before_after", "true",
        "--use_vllm", "false", "--report_to", "none", "--seed", str(args.seed),
        "--logging_steps", "1", "--output_dir", str(output_dir),
    ]  # fmt: skip
    if rule in ("q3", "type_aware"):
        q_h, q_j = args.q3_quantiles.split(",")
        command += ["--tip_entropy_quantile", q_h, "--tip_divergence_quantile", q_j]
    command += shlex.split(args.distill_args)
    start = time.perf_counter()
    with open(output_dir / "train.log", "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # rusage of this child alone
    child.returncode = os.waitstatus_to_exitcode(status)
    run = {"rule": rule, "rc": child.returncode, "wall_s": time.perf_counter() - start}
    run["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    if child.returncode != 0 or not results_path.exists():
        log_text = (output_dir / "train.log").read_text()
        run["error"] = last_error_line(log_text)
        logged = [float(v) for v in re.findall(r"'opd/kept_fraction': '([^']+)'", log_text)]
        run["kept_fraction"] = statistics.mean(logged) if logged else float("nan")
        return run
    results = json.loads(results_path.read_text())
    steps = [entry for entry in results["log_history"] if "opd/kept_fraction" in entry]
    run["kept_fraction"] = statistics.mean(float(e["opd/kept_fraction"]) for e in steps)
    run["step_s"] = statistics.mean(float(e["step_time"]) for e in steps if "step_time" in e)
    run["before"], run["after"] = results["before"], results["after"]
    return run


def last_error_line(log_text: str) -> str:
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["(empty log)"])[-1][:160]


def print_header(columns: list[tuple[str, str]]) -> None:
    """A table's header line from `(name, format spec)` pairs, and a rule as long under it."""
    header = "".join(f"{name:{spec}}" for name, spec in columns)
    print(header)
    print("-" * len(header))


def print_training_table(runs: list[dict], args) -> None:
    q_h, q_j = args.q3_quantiles.split(",")
    print(
        f"\nPart 1: opd distill on the demo pair, {args.max_steps} steps, seed {args.seed}, "
        f"--use_vllm false (entropy_sample rho={args.keep_ratio}; q3 entropy < q{q_h}, "
        f"JSD >= q{q_j}; kept: mean opd/kept_fraction over the logged steps)"
        f"{' ' + args.distill_args if args.distill_args else ''}\n"
    )
    print_header([("tip_rule", "16s"), ("kept", ">7s"), ("acc before", ">12s"),
                  ("acc after", ">11s"), ("RKL before", ">12s"), ("RKL after", ">11s"),
                  ("s/step", ">8s"), ("wall s", ">8s"), ("peak RSS MB", ">13s")])  # fmt: skip
    for run in runs:
        if "error" in run:
            print(
                f"{run['rule']:16s}{run['kept_fraction']:7.1%}  FAILED (rc={run['rc']}, after "
                f"{run['wall_s']:.0f} s, peak RSS {run['peak_rss_mb']:.0f} MB): {run['error']}"
            )
            continue
        before, after = run["before"], run["after"]
        print(
            f"{run['rule']:16s}{run['kept_fraction']:7.1%}{before['accuracy']:12.1%}"
            f"{after['accuracy']:11.1%}{before['reverse_kl']:12.3f}{after['reverse_kl']:11.3f}"
            f"{run['step_s']:8.2f}{run['wall_s']:8.0f}{run['peak_rss_mb']:13.0f}"
        )


# ----- part 2: the loss step's peak memory, one child process per case -----


def build_case_inputs(args, device: torch.device, batch: int, tokens: int, keep_share: float):
    """Random prompt+completion ids `[B, P+T]`, completion ids `[B, T]`, advantages, keep mask."""
    generator = torch.Generator().manual_seed(args.seed)
    length = args.prompt_tokens + tokens
    input_ids = torch.randint(3, args.vocab, (batch, length), generator=generator)
    advantages_BT = torch.randn(batch, tokens, generator=generator)
    keep_BT = torch.rand(batch, tokens, generator=generator) < keep_share
    tensors = (input_ids, input_ids[:, -tokens:], advantages_BT, keep_BT)
    return tuple(t.to(device) for t in tensors)


def run_loss_step(model, path: str, inputs) -> float:
    """One forward+backward of the policy-gradient loss on the kept tokens; the loss value."""
    from opd.kernels import fused_linear_token_stats
    from opd.objectives.hidden import completion_hidden_states, output_weight
    from opd.objectives.surrogate import policy_loss_N

    input_ids, completion_ids_BT, advantages_BT, keep_BT = inputs
    num_tokens = completion_ids_BT.shape[1]
    attention_mask = torch.ones_like(input_ids)
    rows_N, cols_N = keep_BT.nonzero(as_tuple=True)
    ids_N = completion_ids_BT[rows_N, cols_N]
    if path == "naive":
        logits_BTV = model(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=num_tokens + 1
        ).logits[:, :-1]
        logprobs_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
        logprobs_N = logprobs_BTV[rows_N, cols_N].gather(-1, ids_N[:, None]).squeeze(-1)
    else:
        hidden_NH = completion_hidden_states(model, input_ids, attention_mask, num_tokens)[
            rows_N, cols_N
        ]
        weight_VH = output_weight(model)
        if path == "floor":  # no lm_head: what the body costs whatever the loss does
            loss = hidden_NH.float().pow(2).mean()
            loss.backward()
            return float(loss)
        if path == "opd":
            logprobs_N = fused_linear_token_stats(hidden_NH, weight_VH, ids_N)["logprob"]
        else:  # unfused: the kept rows' logits in one [N, V] tensor
            logprobs_NV = torch.log_softmax((hidden_NH @ weight_VH.T).float(), dim=-1)
            logprobs_N = logprobs_NV.gather(-1, ids_N[:, None]).squeeze(-1)
    loss_N = policy_loss_N(logprobs_N, logprobs_N.detach(), advantages_BT[rows_N, cols_N])
    loss = loss_N.sum() / max(int(rows_N.numel()), 1)
    loss.backward()
    return float(loss)


def loss_case_child(name: str, args) -> dict:
    """Measure one case in this (fresh) process: peak MB above the model and inputs, seconds."""
    from opd.demo.tiny import TinyShape, build_tiny_model

    path, keep_share = LOSS_CASES[name]
    device = torch.device(args.device)
    max_positions = args.prompt_tokens + args.tokens
    shape = TinyShape(args.hidden, args.layers, args.hidden // 64, 4 * args.hidden, max_positions)
    model = build_tiny_model(args.vocab, shape, seed=args.seed).to(device)
    warm_up = build_case_inputs(args, device, 1, 64, keep_share)
    run_loss_step(model, path, warm_up)  # first-call allocations, thread pools, lazy imports
    model.zero_grad(set_to_none=True)
    inputs = build_case_inputs(args, device, args.batch, args.tokens, keep_share)
    del warm_up
    gc.collect()
    base = reset_peak(device.type)
    start = time.perf_counter()
    loss = run_loss_step(model, path, inputs)
    peak_mb = peak_mib_above(base, device.type)
    seconds = time.perf_counter() - start
    kept = int(inputs[3].sum())
    return {"case": name, "peak_mb": peak_mb, "seconds": seconds,
            "kept": kept, "loss": loss}  # fmt: skip


def measure_loss_case(name: str, args) -> dict:
    """`loss_case_child` in a fresh interpreter (peak memory is per process)."""
    sizes = ["--vocab", args.vocab, "--hidden", args.hidden, "--layers", args.layers,
             "--batch", args.batch, "--tokens", args.tokens, "--prompt-tokens",
             args.prompt_tokens, "--seed", args.seed, "--device", args.device]  # fmt: skip
    command = [sys.executable, __file__, "--loss-case", name, *map(str, sizes)]
    # A fixed mmap threshold (it also stops glibc from raising it) returns every freed tensor
    # over 128 KiB to the OS, so RSS follows the live tensors instead of glibc's retained heap.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loss case {name!r} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_memory_table(cases: list[dict], args) -> None:
    by_name = {case["case"]: case for case in cases}
    all_tokens = by_name.get("opd kept 100%", {}).get("peak_mb")
    naive = by_name.get("naive (full logits)", {}).get("peak_mb")
    total = args.batch * args.tokens
    where = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "VmHWM - VmRSS"
    print(
        f"\nPart 2: loss step forward+backward, random Qwen2 V={args.vocab} H={args.hidden} "
        f"L={args.layers}, {args.batch} x {args.tokens} completion tokens "
        f"(+{args.prompt_tokens} prompt), {args.device}, peak above model+inputs ({where})\n"
    )
    print_header([("case", "22s"), ("kept tokens", ">13s"), ("peak MB", ">10s"),
                  ("vs opd 100%", ">13s"), ("vs naive", ">10s"), ("time s", ">8s")])  # fmt: skip
    for case in cases:
        peak = case["peak_mb"]
        vs_all = f"{peak / all_tokens:.2f}" if all_tokens else "-"
        vs_naive = f"{peak / naive:.2f}" if naive else "-"
        kept = f"{case['kept']} ({case['kept'] / total:.0%})"
        print(
            f"{case['case']:22s}{kept:>13s}{peak:10.0f}{vs_all:>13s}{vs_naive:>10s}"
            f"{case['seconds']:8.2f}"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    train = parser.add_argument_group("part 1: training runs")
    train.add_argument("--max-steps", type=int, default=50)
    train.add_argument("--rules", default=",".join(RULES), help="comma-separated tip_rule values")
    train.add_argument("--keep-ratio", type=float, default=0.5, help="tip_keep_ratio (rho)")
    train.add_argument(
        "--q3-quantiles",
        default="0.5,0.8",
        help="q3: tip_entropy_quantile,tip_divergence_quantile (default: opd's, TIP's reading)",
    )
    train.add_argument(
        "--distill-args",
        default="",
        help='more `opd distill` flags for every run, e.g. "--opd_divergence reverse_kl '
        '--opd_divergence_support full --opd_kl_coef 0" (TIP on a family-B loss)',
    )
    train.add_argument("--output-root", default="/tmp/opd-tip-tokens")
    train.add_argument("--skip-training", action="store_true")
    memory = parser.add_argument_group("part 2: loss-step memory")
    memory.add_argument("--vocab", type=int, default=32768)
    memory.add_argument("--hidden", type=int, default=256, help="a multiple of 64 (head size)")
    memory.add_argument("--layers", type=int, default=2)
    memory.add_argument("--batch", type=int, default=8)
    memory.add_argument("--tokens", type=int, default=1024, help="completion tokens per row")
    memory.add_argument("--prompt-tokens", type=int, default=16)
    memory.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    memory.add_argument("--skip-memory", action="store_true")
    memory.add_argument("--loss-case", choices=tuple(LOSS_CASES), help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.loss_case:  # the child of measure_loss_case
        print(json.dumps(loss_case_child(args.loss_case, args)))
        return
    start = time.perf_counter()
    runs, cases = [], []
    if not args.skip_training:
        for rule in args.rules.split(","):
            runs.append(train_one(rule, args))
            print(f"trained tip_rule={rule}: rc={runs[-1]['rc']}", flush=True)
    if not args.skip_memory:
        for name in LOSS_CASES:
            cases.append(measure_loss_case(name, args))
            print(f"measured {name}: {cases[-1]['peak_mb']:.0f} MB", flush=True)
    if runs:
        print_training_table(runs, args)
    if cases:
        print_memory_table(cases, args)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
