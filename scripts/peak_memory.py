"""Peak memory of one step, shared by the benchmark scripts (never imported by `opd/`).

CUDA: the allocator's peak. CPU: the process's RSS high-water mark (`VmHWM`), reset to the
current RSS first through `/proc/self/clear_refs`, so the peak is the step's own.
"""

from __future__ import annotations

import torch


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field))
    return int(line.split()[1])


def reset_peak(device: str) -> int:
    """Start a measurement; returns the baseline in bytes."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS
    return rss_kib("VmRSS") * 1024


def peak_mib_above(base: int, device: str) -> float:
    """The peak since `reset_peak`, in MiB above its baseline."""
    if device == "cuda":
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return (rss_kib("VmHWM") * 1024 - base) / 2**20
