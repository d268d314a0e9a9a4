"""Time and peak memory of forward+backward for every `opd.kernels` function, in one table.

Baselines measured in the same run, on the same inputs:
- naive torch: full `[N, V]` logits in float32, `log_softmax`, the per-entry terms, autograd;
- Liger-Kernel's chunked `LigerFusedLinearJSDLoss` (beta=1 is reverse KL, `compiled=False` so
  it runs on CPU; soft loss only) for the fused full-vocabulary reverse KL loss.

Each case runs once to warm up, then `--repeats` times; the table shows the median time and the
peak resident memory above what the inputs already hold (Linux `VmHWM`, reset before each run
through `/proc/self/clear_refs`), so gradients and every temporary count (glibc's retained heap
too: what a user's process would see). The `check` column is the relative difference of the
case's loss value from the naive one (a benchmark of a wrong answer is worthless). Ratios are
against naive torch: time `x` > 1 is faster.

Run (CPU, about 15 minutes at the default sizes, needs ~20 GB of RAM for the naive 4k x 152k):
    python scripts/bench_kernels.py [--sizes 1024x32768,4096x151936] [--hidden 256] [--repeats 2]
On a GPU the same script runs on `--device cuda` (then memory is `torch.cuda.max_memory_allocated`).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from peak_memory import peak_mib_above, reset_peak

import opd.kernels as kernels
from opd.kernels import torch_ops

Case = Callable[[], torch.Tensor]  # runs forward + backward, returns the scalar loss


def measure(run: Case, device: str, repeats: int) -> tuple[float, float, float]:
    """`(median seconds, peak MiB above the inputs, loss value)` of `run`."""
    run()  # warm-up (first-call allocations, lazy imports)
    times, peaks, loss = [], [], float("nan")
    for _ in range(repeats):
        gc.collect()
        base = reset_peak(device)
        start = time.perf_counter()
        loss = float(run())
        peaks.append(peak_mib_above(base, device))
        times.append(time.perf_counter() - start)
    return statistics.median(times), max(peaks), loss


def naive_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1)


def logits_cases(n: int, v: int, k: int, device: str) -> dict[str, dict[str, Case]]:
    """Functions that take `[N, V]` logits: opd (dispatched) vs naive torch."""
    gen = torch.Generator(device=device).manual_seed(0)
    zs = torch.randn(n, v, device=device, generator=gen).requires_grad_(True)
    zt = torch.randn(n, v, device=device, generator=gen)
    ids = torch.randint(0, v, (n,), device=device, generator=gen)
    t_lp, t_ids = torch.log_softmax(zt, -1).topk(k, -1)

    def backward(loss: torch.Tensor) -> torch.Tensor:
        loss.backward()
        zs.grad = None
        return loss.detach()

    def naive_stats() -> torch.Tensor:
        ls = naive_log_softmax(zs)
        lp = ls.gather(-1, ids[:, None]).squeeze(-1)
        ent = -(ls.exp() * ls).sum(-1)
        return backward(lp.sum() + ent.sum())

    def opd_stats() -> torch.Tensor:
        lp, ent = kernels.sampled_logprob_entropy(zs, ids)
        return backward(lp.sum() + ent.sum())

    def naive_topk() -> torch.Tensor:  # teacher support + tail bucket, reverse KL
        ls = naive_log_softmax(zs).gather(-1, t_ids)
        ps, pt = ls.exp(), t_lp.exp()
        tail_s, tail_t = (1 - ps.sum(-1)).clamp_min(1e-10), (1 - pt.sum(-1)).clamp_min(1e-10)
        div = (ps * (ls - t_lp)).sum(-1) + tail_s * (tail_s.log() - tail_t.log())
        return backward(div.sum())

    def opd_topk() -> torch.Tensor:
        return backward(kernels.topk_divergence(zs, t_ids, t_lp).sum())

    def naive_full() -> torch.Tensor:
        ls, lt = naive_log_softmax(zs), naive_log_softmax(zt)
        return backward((ls.exp() * (ls - lt)).sum())

    def opd_full() -> torch.Tensor:
        return backward(kernels.full_divergence(zs, zt).sum())

    return {
        "sampled_logprob_entropy": {"naive torch": naive_stats, "opd": opd_stats},
        f"topk_divergence (K={k}, RKL)": {"naive torch": naive_topk, "opd": opd_topk},
        "full_divergence (RKL)": {"naive torch": naive_full, "opd": opd_full},
    }


def hidden_cases(
    n: int, v: int, h: int, k: int, device: str, dtype: torch.dtype
) -> dict[str, dict[str, Case]]:
    """Functions that take hidden states and lm_head weights: opd vs naive (vs Liger), and the
    floor of any exact method: the three lm_head matmuls (logits, dX, dW) with nothing else."""
    gen = torch.Generator(device=device).manual_seed(1)
    x = (torch.randn(n, h, device=device, generator=gen) / h**0.5).to(dtype).requires_grad_(True)
    w = torch.randn(v, h, device=device, generator=gen).to(dtype).requires_grad_(True)
    xt = (torch.randn(n, h, device=device, generator=gen) / h**0.5).to(dtype)
    wt = torch.randn(v, h, device=device, generator=gen).to(dtype)
    ids = torch.randint(0, v, (n,), device=device, generator=gen)
    with torch.no_grad():
        t_lp, t_ids = torch.log_softmax(xt @ wt.T, -1).topk(k, -1)

    def backward(loss: torch.Tensor) -> torch.Tensor:
        loss.backward()
        x.grad = w.grad = None
        return loss.detach()

    def naive_rkl_loss() -> torch.Tensor:
        ls, lt = naive_log_softmax(x @ w.T), naive_log_softmax(xt @ wt.T)
        return backward((ls.exp() * (ls - lt)).sum(-1).mean())

    def naive_stats() -> torch.Tensor:
        ls, lt = naive_log_softmax(x @ w.T), naive_log_softmax(xt @ wt.T)
        lp = ls.gather(-1, ids[:, None]).squeeze(-1)
        ps = ls.exp()
        ent, div = -(ps * ls).sum(-1), (ps * (ls - lt)).sum(-1)
        return backward(lp.sum() + ent.sum() + div.sum())

    def opd_stats() -> torch.Tensor:
        out = kernels.fused_linear_token_stats(x, w, ids, teacher_hidden=xt, teacher_weight=wt)
        return backward(sum(stat.sum() for stat in out.values()))

    def opd_loss(**teacher: torch.Tensor) -> torch.Tensor:
        weight = torch.full((n,), 1.0 / n, device=device)
        loss, _ = kernels.fused_linear_divergence_loss(x, w, weight=weight, **teacher)
        return backward(loss)

    def naive_topk_loss() -> torch.Tensor:
        ls = naive_log_softmax(x @ w.T).gather(-1, t_ids)
        ps, pt = ls.exp(), t_lp.exp()
        tail_s, tail_t = (1 - ps.sum(-1)).clamp_min(1e-10), (1 - pt.sum(-1)).clamp_min(1e-10)
        div = (ps * (ls - t_lp)).sum(-1) + tail_s * (tail_s.log() - tail_t.log())
        return backward(div.mean())

    def bare_matmuls() -> torch.Tensor:
        with torch.no_grad():
            z = x @ w.T
            _ = z @ w, z.T @ x
        return z[0, 0].float()

    rkl_loss = {
        "naive torch": naive_rkl_loss,
        "opd": partial(opd_loss, teacher_hidden=xt, teacher_weight=wt),
        "3 bare matmuls": bare_matmuls,
    }
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        print("liger-kernel is not installed (pip install liger-kernel): no Liger column")
    else:
        liger = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0, compiled=device == "cuda"
        )
        rkl_loss["Liger chunked JSD"] = lambda: backward(liger(x, w, xt, wt, ids))
    return {
        "fused_linear_token_stats (RKL, per row)": {
            "naive torch": naive_stats,
            "opd": opd_stats,
        },
        "fused_linear_divergence_loss (RKL)": rkl_loss,
        f"fused_linear_divergence_loss (K={k}, RKL)": {
            "naive torch": naive_topk_loss,
            "opd": partial(opd_loss, teacher_topk_ids=t_ids, teacher_topk_logprobs=t_lp),
        },
    }


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        n, v = item.lower().split("x")
        sizes.append((int(n), int(v)))
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        default="1024x32768,4096x32768,1024x151936,4096x151936",
        help="comma-separated N x V (tokens x vocabulary)",
    )
    parser.add_argument("--hidden", type=int, default=256, help="H of the lm_head cases")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--only", default="", help="run only functions whose name contains this")
    args = parser.parse_args()

    torch.manual_seed(0)
    impl = "triton" if kernels.use_triton(torch.empty(0, device=args.device)) else "torch"
    threads = torch.get_num_threads()
    print(
        f"device={args.device} opd path={impl} H={args.hidden} dtype={args.dtype} threads={threads}"
    )
    print(f"torch chunk: {torch_ops._CHUNK_ELEMENTS} float32 logits per chunk (torch path)")
    header = f"{'function':<42} {'N x V':>12} {'impl':<18} {'time s':>8} {'peak MiB':>9}"
    print(header + f" {'time x':>7} {'mem %':>6} {'check':>8}")
    for n, v in parse_sizes(args.sizes):
        groups = logits_cases(n, v, args.top_k, args.device)
        dtype = getattr(torch, args.dtype)
        groups |= hidden_cases(n, v, args.hidden, args.top_k, args.device, dtype)
        for name, impls in groups.items():
            if args.only not in name:
                continue
            base_time = base_mem = base_loss = None
            for label, run in impls.items():
                seconds, peak, loss = measure(run, args.device, args.repeats)
                if base_time is None:
                    base_time, base_mem, base_loss = seconds, peak, loss
                speed = base_time / seconds
                # Below 1 MiB the allocator reuses freed pages and RSS cannot see the peak.
                mem = f"{100 * peak / base_mem:5.0f}%" if base_mem >= 1 else "     -"
                check = abs(loss - base_loss) / max(abs(base_loss), 1e-12)
                check_text = "-" if label == "3 bare matmuls" else f"{check:.1e}"
                print(
                    f"{name:<42} {f'{n}x{v}':>12} {label:<18} {seconds:>8.2f} {peak:>9.0f} "
                    f"{speed:>6.2f}x {mem} {check_text:>8}",
                    flush=True,
                )
            gc.collect()
        del groups
        gc.collect()


if __name__ == "__main__":
    main()
