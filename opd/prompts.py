"""Prompt -> token ids exactly as TRL's GRPOTrainer tokenises them, for every job that samples or
scores outside the trainer (`opd rollout`, `opd teacher precompute`, `opd eval`): text through the
tokenizer with its default special tokens; chat messages through the chat template with a
generation prompt. Online and offline OPD therefore see the same prompt ids.

Test: `pytest tests/unit/test_prompt_format.py` and
`pytest tests/integration/test_rollout_precompute.py -k prompt`.
"""

from __future__ import annotations

from typing import Any

from opd.arguments import ConfigError


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as error:
        raise ConfigError(f"model_name_or_path={name_or_path!r}: {error}") from error


def encode_prompt(tokenizer, prompt: str | list[dict[str, Any]]) -> list[int]:
    """Prompt ids as TRL's GRPOTrainer makes them: chat messages through the chat template with
    a generation prompt; text through the tokenizer with its default special tokens."""
    if isinstance(prompt, str):
        return list(tokenizer(text=prompt)["input_ids"])
    require_chat_template(tokenizer)
    encoded = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def require_chat_template(tokenizer) -> None:
    """Raise ConfigError unless `tokenizer` can render chat prompts (it has a chat template)."""
    if getattr(tokenizer, "chat_template", None):
        return
    raise ConfigError(
        "the prompts are chat messages (the dataset's, or made by dataset_chat_template or "
        f"dataset_system_prompt) but the tokenizer of {tokenizer.name_or_path!r} has no chat "
        "template; use text prompts: leave dataset_chat_template and dataset_system_prompt "
        "unset (dataset_prompt_template works on text)."
    )
