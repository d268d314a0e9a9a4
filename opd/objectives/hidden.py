"""Final hidden states at the completion positions, and the lm_head they feed.

opd applies the lm_head itself (through `opd.kernels`) so that it can choose the positions first:
TIP's dropped tokens then cost no logits, and the fused kernels never hold `[tokens x vocab]`.
The forward still goes through the (possibly DDP/PEFT-wrapped) model, asking for one logit
only, so wrappers' hooks and adapters run as usual.

Test: `pytest tests/unit/test_hidden.py`.
"""

from __future__ import annotations

import torch

from opd.config import ConfigError

# Architectures whose logits are not `hidden @ lm_head.T`: recomputing them from hidden states
# would silently give another distribution.
_UNSUPPORTED_LOGIT_TRANSFORMS = (
    "final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
    "lm_head_multiplier",
)  # fmt: skip


def check_plain_lm_head(model) -> None:
    """Refuse models whose logits are transformed after the lm_head (softcap, scaling)."""
    config = getattr(model, "config", None)
    for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1.0, 0.0):
            raise ConfigError(
                f"{type(model).__name__} transforms its logits ({name}={value}); opd's fused "
                "loss recomputes logits as hidden @ lm_head.T and does not support that yet."
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
