"""Tiny, locally built models and tokenizers (no hub downloads).

The embedded demo and the tests need real transformers models and a real tokenizer that vLLM can
load from disk. Both are built here from a config: a character-level tokenizer over a small
alphabet and a Qwen2-architecture causal LM with head size 64 (vLLM's CPU attention rejects 16).

Run `python -m opd.demo.tiny /tmp/tiny` to write a random-weight model and tokenizer to a folder.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

ALPHABET = "0123456789+-*=? abcdefghijklmnopqrstuvwxyz.,:#"
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


def build_char_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """One token per character, plus `<pad>`, `<bos>`, `<eos>` (ids 0, 1, 2).

    Decoding concatenates characters, so `decode(encode(s)) == s` for any `s` over the alphabet.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="left"
    )


@dataclass(frozen=True)
class TinyShape:
    """Shape of a tiny Qwen2 model. Head size = hidden_size / num_heads: keep it >= 64."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 256
    max_positions: int = 128


def build_tiny_model(
    vocab_size: int, shape: TinyShape = TinyShape(), *, seed: int = 0
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM of `shape` (tied embeddings, float32, sdpa)."""
    import torch

    config = Qwen2Config(**tiny_config_fields(vocab_size, shape, bos=1, eos=2, pad=0))
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def tiny_config_fields(vocab_size: int, shape: TinyShape, *, bos: int, eos: int, pad: int) -> dict:
    """The config fields every tiny model shares (Qwen2 here, Llama in `opd.demo.bpe`)."""
    assert shape.hidden_size // shape.num_heads >= 64, "vLLM's CPU attention needs head size >= 64"
    return {
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_heads,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_positions,
        "tie_word_embeddings": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
        "attn_implementation": "sdpa",
    }


def save_tiny(path: str | Path, shape: TinyShape = TinyShape(), *, seed: int = 0) -> Path:
    """Write a tokenizer and a random tiny model to `path` (loadable by transformers and vLLM)."""
    path = Path(path)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(len(tokenizer), shape, seed=seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


if __name__ == "__main__":
    print(save_tiny(sys.argv[1] if len(sys.argv) > 1 else "/tmp/opd-tiny"))
