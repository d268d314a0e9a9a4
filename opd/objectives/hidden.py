"""Final hidden states at the completion positions, and the lm_head they feed.

opd applies the lm_head itself (through `opd.kernels`) so that it can choose the positions first:
TIP's dropped tokens then cost no logits, and the fused kernels never hold `[tokens x vocab]`.
The forward still goes through the (possibly DDP/PEFT-wrapped) model, asking for one logit
only, so wrappers' hooks and adapters run as usual.

Test: `pytest tests/unit/test_hidden.py`.
"""

from __future__ import annotations

import torch

from opd.arguments import ConfigError

# Architectures whose logits are not `hidden @ lm_head.T`: recomputing them from hidden states
# would silently give another distribution.
_UNSUPPORTED_LOGIT_TRANSFORMS = (
    "final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
    "lm_head_multiplier",
)  # fmt: skip


def check_plain_lm_head(model) -> None:
    """Refuse models whose logits are transformed after the lm_head (softcap, scaling) or whose
    lm_head carries a PEFT adapter."""
    config = getattr(model, "config", None)
    for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1.0, 0.0):
            raise ConfigError(
                f"{type(model).__name__} transforms its logits ({name}={value}); opd's fused "
                "loss recomputes logits as hidden @ lm_head.T and does not support that yet."
            )
    _check_no_head_adapter(model)


def _check_no_head_adapter(model) -> None:
    """Refuse a PEFT adapter on the lm_head, or on an embedding tied to it: opd's loss reads
    `lm_head.weight` (the base weight, not the adapted head), and vLLM, which ties the head to
    the embedding, would sample from another head than the trainer's."""
    if not hasattr(model, "peft_config"):
        return
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    wrapped = (BaseTunerLayer, ModulesToSaveWrapper)
    tied = model.config.get_text_config().tie_word_embeddings
    if isinstance(model.get_output_embeddings(), wrapped) or (
        tied and isinstance(model.get_input_embeddings(), wrapped)
    ):
        raise ConfigError(
            "a PEFT adapter on the lm_head (or on the input embedding tied to it) is not "
            "supported: opd's loss computes logits as hidden @ lm_head.weight; remove lm_head "
            "(and embed_tokens) from lora_target_modules and lora_modules_to_save."
        )


def output_weight(model) -> torch.Tensor:
    """The lm_head weight `[V, H]` of a (possibly wrapped) causal LM."""
    return model.get_output_embeddings().weight


def completion_hidden_states(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_completion_tokens: int,
) -> torch.Tensor:
    """`[B, T, H]`: the final (normed) hidden state that predicts each completion token.

    `input_ids` is `[left-padded prompt | right-padded completion]`; completion token t sits at
    `L - T + t` and is predicted from position `L - T + t - 1`.
    """
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    start = input_ids.shape[1] - num_completion_tokens - 1
    return output.hidden_states[-1][:, start : start + num_completion_tokens]


def prompt_completion_ids(output: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`[prompt | completion]` ids and attention mask of a TRL batch."""
    input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
    attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    return input_ids, attention_mask
