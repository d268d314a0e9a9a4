"""Every private touch of TRL (and of the vLLM engine TRL builds) that opd relies on, in one place.

`OPDTrainer` subclasses TRL's `GRPOTrainer`. Public API (`GRPOConfig`, `GRPOTrainer(...)`,
`train()`) is used directly; everything else that could change in a TRL release without notice
goes through this module: the hooks opd overrides, the private methods it calls, the keys of the
batch dict TRL passes between its phases, trainer attributes set by `GRPOTrainer.__init__`,
the `LLM` symbol of TRL's generation module that opd patches to pass engine arguments, and the
vLLM engine methods that `LLM.generate` drives, which opd wraps to stream finished requests.

`tests/unit/test_trl_surface.py` pins all of it against the installed TRL: an upgrade that
renames, removes or re-signs any of these names fails that test before it breaks training.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from trl import GRPOTrainer
from trl.trainer.utils import RepeatSampler, add_fused_lm_head

from opd.types import OPDBatchFields

__all__ = ["GRPOTrainer", "RepeatSampler", "add_fused_lm_head"]

# `GRPOTrainer` hooks that `OPDTrainer` overrides, with the parameters it relies on.
OVERRIDDEN_HOOKS: dict[str, tuple[str, ...]] = {
    "_generate_and_score_completions": ("self", "inputs"),
    "_generate": ("self", "prompts"),
    "_calculate_rewards": ("self", "inputs", "prompts", "completions", "completion_ids_list"),
    "_compute_loss": ("self", "model", "inputs"),
    # prefix-guided rollouts: generation continues from prompt + prefix (token ids), and a
    # vLLM server must not merge a group's guided and unguided rows into one prompt with n > 1
    "_tokenize_prompts": ("self", "prompts"),
    "_generate_single_turn": (
        "self",
        "prompt_ids",
        "images",
        "multimodal_fields",
        "num_generations",
    ),
    # transformers' Trainer hook: opd turns accelerate's FSDP2 path on for CPU runs after it.
    "create_accelerator_and_postprocess": ("self",),
    # the training sampler, made to shuffle by epoch so that a resumed run sees the same data
    "_get_train_sampler": ("self", "dataset"),
    # a checkpoint also holds the generation buffered for later steps; a resume reads it back
    "_save_checkpoint": ("self", "model", "trial"),
    "train": ("self", "resume_from_checkpoint"),
}
# Private methods opd calls, with the leading parameters it passes.
CALLED_PRIVATE: dict[str, tuple[str, ...]] = {
    "_get_per_token_logps_and_entropies": (
        "self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size",
    ),
    "_save_checkpoint": ("self", "model", "trial"),
}  # fmt: skip
# Keys of the batch dict from `_generate_and_score_completions` that opd reads. The first group
# is always present; the second only for some settings (TRL writes them by name in that method).
BATCH_KEYS = (
    "prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages",
    "num_items_in_batch",
)  # fmt: skip
OPTIONAL_BATCH_KEYS = (
    "old_per_token_logps", "ref_per_token_logps", "sampling_per_token_logps",
    "importance_sampling_ratio", "tool_mask",
)  # fmt: skip
# Keys opd adds to that dict (`OPDBatchFields`); TRL must not use them itself (it splits every
# tensor by rows).
OPD_BATCH_KEYS = OPDBatchFields.batch_keys()
# Attributes `GRPOTrainer.__init__` sets that opd reads.
TRAINER_ATTRIBUTES = (
    "num_generations", "temperature", "loss_type", "epsilon_low", "epsilon_high", "beta",
    "use_vllm", "vllm_mode", "vllm_importance_sampling_correction", "max_completion_length",
    "ref_model", "_metrics", "vllm_generation", "aux_loss_enabled",
    # how TRL renders a conversational prompt (`_tokenize_prompts`); the OPSD teacher prompt too
    "chat_template_kwargs", "tools", "chat_template", "environment_factories",
    # the generation reused over `steps_per_generation * num_iterations` micro-steps (resume.py)
    "_step", "_buffered_inputs", "num_iterations",
)  # fmt: skip
# Attributes of transformers' `Trainer` (set outside `__init__` or not documented) opd reads.
HF_TRAINER_ATTRIBUTES = ("current_gradient_accumulation_steps", "callback_handler")
# `GRPOTrainer._generate` returns a tuple; opd's trace injection unpacks its leading items.
GENERATE_RESULT = ("prompt_ids", "completion_ids", "tool_mask", "completions", "logprobs")
# `GRPOConfig` / `TrainingArguments` fields opd's trainer reads (besides the loss fields that
# `opd/trainer/build.py` classifies in LOSS_FIELDS).
CONFIG_FIELDS = (
    "bf16", "fp16", "cast_lm_head_to_fp32", "chat_template_kwargs", "num_generations",
    "output_dir", "per_device_train_batch_size", "seed", "steps_per_generation", "temperature",
    "use_liger_kernel", "use_vllm", "vllm_mode",
)  # fmt: skip
# `RepeatSampler.__init__` parameters, stored under the same names, that opd copies into its
# epoch-seeded subclass (`opd/trainer/resume.py`), and the attributes that subclass reads.
REPEAT_SAMPLER_PARAMS = (
    "data_source", "mini_repeat_count", "batch_size", "repeat_count", "shuffle", "seed",
)  # fmt: skip
REPEAT_SAMPLER_ATTRIBUTES = ("generator", "num_samples")
# Parameters of `trl.trainer.utils.add_fused_lm_head` that opd passes (G-OPD reference copy).
FUSED_LM_HEAD_PARAMS = ("model", "temperature", "cast_lm_head_to_fp32")
# TRL's colocated generation: the module whose `LLM` symbol opd patches, and the members of its
# `VLLMGeneration` that opd's CPU weight sync uses.
VLLM_GENERATION_MODULE = "trl.generation.vllm_generation"
VLLM_GENERATION_MEMBERS = ("sync_weights", "_iter_named_params", "llm")
# vLLM's `LLMEngine` methods that `LLM.generate` drives: `LLM._add_request` adds each prompt in
# order, `LLM._run_engine` calls `step()` until no request is unfinished. opd wraps them on the
# colocated engine to see each request the moment it finishes (`watch_finished_requests`).
VLLM_ENGINE_MEMBERS = ("add_request", "step", "has_unfinished_requests")
VLLM_LLM_ENGINE_LOOP = ("_add_request", "_run_engine")


def per_token_logprobs(trainer, model, output: dict[str, Any], input_ids, attention_mask):
    """`[B, T]` logprobs of the completion tokens under `model`, computed the way TRL does."""
    logprobs_BT, _, _ = trainer._get_per_token_logps_and_entropies(
        model,
        input_ids,
        attention_mask,
        output["completion_ids"].size(1),
        batch_size=trainer.args.per_device_train_batch_size,
    )
    return logprobs_BT


def save_checkpoint(trainer) -> str:
    """Write `checkpoint-<global_step>` as TRL's Trainer does at a save step; returns its path."""
    trainer._save_checkpoint(trainer.model, trial=None)
    return f"{trainer.args.output_dir}/checkpoint-{trainer.state.global_step}"


def save_checkpoint_as_trl(parent, model, trial) -> None:
    """TRL's `_save_checkpoint` from an override (`parent` is the override's `super()`)."""
    parent._save_checkpoint(model, trial)


def generation_buffer(trainer) -> tuple[int, list[dict[str, Any]] | None]:
    """TRL's micro-step counter and the generation it splits over the next micro-steps."""
    return trainer._step, trainer._buffered_inputs


def set_generation_buffer(trainer, step: int, buffered: list[dict[str, Any]] | None) -> None:
    trainer._step, trainer._buffered_inputs = step, buffered


def generation_cycle_length(trainer) -> int:
    """Micro-steps one generation serves (TRL generates when `_step` is a multiple of it)."""
    return trainer.args.steps_per_generation * trainer.num_iterations


def append_metric(trainer, mode: str, name: str, value: float) -> None:
    """Add one value to TRL's per-step metric buffer (logged and averaged at each log step)."""
    trainer._metrics[mode][name].append(value)


def prompt_render_kwargs(trainer) -> dict[str, Any]:
    """The `chat_template_kwargs`, `tools` and `chat_template` TRL renders chat prompts with.

    With `environment_factory` TRL renders each prompt with its environment's own tools, which
    opd does not mirror: refused.
    """
    if trainer.environment_factories is not None:
        raise ValueError(
            "teacher_context_column with environment_factory is not supported: TRL renders each "
            "prompt with its environment's tools; pass tools= to the trainer instead."
        )
    return {
        "chat_template_kwargs": trainer.chat_template_kwargs,
        "tools": trainer.tools,
        "chat_template": trainer.chat_template,
    }


def router_aux_loss_enabled(trainer) -> bool:
    """Whether TRL would add the MoE router auxiliary loss (an MoE model, coefficient != 0)."""
    return bool(trainer.aux_loss_enabled)


def replace_colocate_sync(trainer, sync: Callable[[Any], None]) -> None:
    """Make TRL's colocate weight sync call `sync(generation)` instead of its own push."""
    trainer.vllm_generation.sync_weights = partial(sync, trainer.vllm_generation)


def iter_sync_params(generation) -> Iterator[tuple[str, torch.Tensor]]:
    """TRL's `(vLLM name, full tensor)` stream for a sync: merges PEFT adapters, gathers
    FSDP/ZeRO-3 shards, renames for vLLM."""
    return generation._iter_named_params()


def colocated_llm(generation):
    """The in-process `vllm.LLM` TRL built for colocate mode."""
    return generation.llm


@contextmanager
def watch_finished_requests(
    llm, on_finished: Callable[[int, Any], None], after_step: Callable[[bool], None]
) -> Iterator[None]:
    """While inside, report every request `llm.generate` finishes, at the engine step that ends it.

    `on_finished(index, output)` gets vLLM's final `RequestOutput` and the request's index: the
    order in which generate added it since the block began (its prompt's position in the call).
    `after_step(done)` runs after each engine step; `done` once no request is left. What generate
    returns is unchanged: the wrappers only look at the engine's outputs.
    """
    engine = llm.llm_engine
    indices: dict[str, int] = {}
    add_request, step = engine.add_request, engine.step

    def add_and_index(request_id, *args, **kwargs):
        indices.setdefault(str(request_id), len(indices))
        return add_request(request_id, *args, **kwargs)

    def step_and_report():
        outputs = step()
        for output in outputs:
            if output.finished and output.request_id in indices:
                on_finished(indices[output.request_id], output)
        after_step(not engine.has_unfinished_requests())
        return outputs

    own = {name: vars(engine)[name] for name in ("add_request", "step") if name in vars(engine)}
    engine.add_request, engine.step = add_and_index, step_and_report
    try:
        yield
    finally:  # back to what the engine had: its class's methods, or an earlier wrapper
        for name in ("add_request", "step"):
            if name in own:
                setattr(engine, name, own[name])
            else:
                delattr(engine, name)


@contextmanager
def vllm_engine_kwargs(**engine_kwargs):
    """Add keyword arguments to the `vllm.LLM(...)` that TRL's colocate mode builds.

    TRL exposes no dtype option for the colocated engine; this is the narrowest seam: the `LLM`
    name inside TRL's generation module, patched only while `GRPOTrainer.__init__` runs.
    """
    engine_kwargs = {key: value for key, value in engine_kwargs.items() if value is not None}
    module = sys.modules.get(VLLM_GENERATION_MODULE)
    if not engine_kwargs or module is None or not hasattr(module, "LLM"):
        yield
        return
    original = module.LLM
    module.LLM = partial(original, **engine_kwargs)
    try:
        yield
    finally:
        module.LLM = original
