"""Decisions that must see the whole global batch, taken identically on every process.

TRL splits each generation batch over processes by rows (process p holds rows [p*B, (p+1)*B)),
and pads each process's completions to its own longest one. Some of opd's choices are defined on
the batch, not on a row: TIP's token selection (quantiles, sampling a share of all tokens), and
the group statistics of SCOPE and Uni-OPD (a group of `num_generations` rows can span processes).
`on_global_batch` gathers the `[B, T]` inputs of such a choice from every process (padded to the
longest completion), applies it to the global batch, and returns this process's rows; every
process computes the same result, so N processes x B rows decide exactly as 1 process x N*B.

Test: `pytest tests/integration/test_multiprocess.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def on_global_batch(
    accelerator, fn: Callable[..., torch.Tensor], *tensors: torch.Tensor
) -> torch.Tensor:
    """`fn(*global tensors)[this process's rows, :T]`.

    Args:
        accelerator: the trainer's `Accelerator`.
        fn: maps `[N*B, T_max]` (or `[N*B]`) tensors to a `[N*B, T_max]` (or `[N*B]`) tensor.
        tensors: this process's `[B, T]` or `[B]` tensors; the `[B, T]` ones share T.

    Returns:
        `[B, T]` (or `[B]`): this process's rows of `fn`'s result, cropped to the local T.
    """
    if accelerator.num_processes == 1:
        return fn(*tensors)
    num_rows = tensors[0].shape[0]
    num_tokens = max((t.shape[1] for t in tensors if t.dim() == 2), default=0)
    gathered = [gather_rows(accelerator, tensor) for tensor in tensors]
    result = fn(*gathered)
    first = accelerator.process_index * num_rows
    local = result[first : first + num_rows]
    return local[:, :num_tokens] if local.dim() == 2 else local


def gather_rows(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """All processes' rows of `tensor`, in process order; `[B, T]` padded with zeros to the
    longest T (zeros are masked positions for every caller)."""
    if tensor.dim() == 2:
        tensor = accelerator.pad_across_processes(tensor, dim=1, pad_index=0)
    if tensor.dtype == torch.bool:  # gloo cannot all-gather bool tensors
        return accelerator.gather(tensor.to(torch.uint8)).bool()
    return accelerator.gather(tensor.contiguous())


def global_count(accelerator, count: torch.Tensor) -> float:
    """The sum of a per-process count over all processes."""
    return float(accelerator.gather(count.reshape(1).float()).sum())
