"""The whole lm_head weight for opd's fused loss, whatever wraps or shards the student.

opd applies the lm_head itself (to the kept positions only, in chunks), so it needs the full
`[V, H]` weight on every process, with autograd back to the parameter the optimizer updates:

- plain / DDP / PEFT: the parameter itself;
- FSDP2 (`fully_shard`): the parameter is a `DTensor` shard; `full_tensor()` all-gathers it once
  per micro-step, and its backward reduce-scatters the gradient back into the shards;
- DeepSpeed ZeRO-3: see `zero3_lm_head_weight`.

Test: `pytest tests/integration/test_multiprocess.py`.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from opd.arguments import ConfigError


def enable_fsdp_on_cpu(trainer) -> None:
    """Turn on accelerate's FSDP2 path for a multi-process CPU run that asked for FSDP.

    accelerate enables FSDP only for GPU-like distributed types and otherwise silently falls
    back to DDP, so `--fsdp full_shard` on CPU (gloo) would train unsharded without a word.
    torch's `fully_shard` itself runs on CPU with gloo; this makes accelerate's own FSDP2
    preparation (`fsdp2_prepare_model`) run there too. Called right after the Trainer built
    its `Accelerator`; a no-op on GPUs and without FSDP.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    plugin_args = trainer.args.fsdp_plugin_args
    if plugin_args is None or state.distributed_type != DistributedType.MULTI_CPU:
        return
    if int(plugin_args.get("fsdp_version", 1)) != 2:
        raise ConfigError(
            "FSDP on CPU needs FSDP2: set fsdp_config: {fsdp_version: 2} (FSDP1 needs CUDA)."
        )
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args)
    state.distributed_type = DistributedType.FSDP
    # As accelerate does for FSDP on GPUs: every new `AcceleratorState()` copies this back.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def full_lm_head_weight(model) -> torch.Tensor:
    """`[V, H]` lm_head weight of the unwrapped student, whole, differentiable to its shards."""
    weight = model.get_output_embeddings().weight
    if isinstance(weight, DTensor):
        return weight.full_tensor()
    if hasattr(weight, "ds_id"):  # a DeepSpeed ZeRO-3 partitioned parameter
        return zero3_lm_head_weight(model)
    return weight


def zero3_lm_head_weight(model) -> torch.Tensor:
    """A whole copy of a ZeRO-3 partitioned lm_head weight whose gradient reaches the partition.

    The copy is made inside a call of the lm_head module itself, so ZeRO-3's own module hooks
    do the work: the pre-forward hook gathers the weight, the post-forward hook re-partitions it
    and marks the copy so that, when the loss's backward reaches it (later, in
    `accelerator.backward`), the weight is gathered again before the `[V, H]` gradient is
    accumulated into it; ZeRO-3's gradient hook then reduce-scatters that gradient into this
    process's partition, and the end of the backward re-partitions the weight.

    Gathering with `GatheredParameters` instead fails in the backward: the weight is partitioned
    again by then (shape `[0]`), and autograd cannot accumulate a `[V, H]` gradient into it.
    """
    lm_head = model.get_output_embeddings()
    # A forward set on the instance (accelerate's offload hooks do that) is put back after.
    instance_forward = vars(lm_head).get("forward")
    lm_head.forward = lambda: lm_head.weight.clone()
    try:
        return lm_head()
    finally:
        if instance_forward is None:
            del lm_head.forward
        else:
            lm_head.forward = instance_forward
