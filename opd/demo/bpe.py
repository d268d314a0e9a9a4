"""A BPE tokenizer for the embedded demo, different from the student's character tokenizer.

Cross-tokenizer distillation needs a teacher that splits text differently from the student. The
demo's student reads one character per token (`opd.demo.tiny.build_char_tokenizer`); the
tokenizer here is a BPE trained with the `tokenizers` library on the demo's task texts
(`"37+5=42"`, ...), so most numbers are ONE token (`"42"`, `"100"`), and its special tokens have
other ids: `<|endoftext|>` (EOS) 0, `<pad>` 1, `<s>` (BOS) 2, where the char tokenizer has
`<pad>` 0, `<bos>` 1, `<eos>` 2.

Contract:
- `decode(encode(s)) == s` for every string over `opd.demo.tiny.ALPHABET`: the pre-tokenizer
  isolates each run of digits and each other character (nothing is dropped, no space is added),
  merges happen only inside a run of digits, and the `Fuse` decoder concatenates the tokens.
  Characters outside the alphabet are dropped (BPE with no unknown token).
- No special token is added when encoding (no post-processor), as with the char tokenizer: a
  prompt carries no BOS and `tokenizer(answer)` is the answer's tokens alone.
- Left padding, as the char tokenizer.
- The same texts give the same vocabulary and merges (the trainer breaks count ties by token
  ids, which come from the sorted alphabet).

Models for this tokenizer are Llama, not the demo's Qwen2: `build_tiny_bpe_model` says why.
`opd.demo.pretrain.prepare_bpe_teacher` trains the demo's BPE teacher (`demo:teacher-bpe`) with
the tokenizer built from the demo's train split. `save_tiny_bpe` writes a random-weight tiny
model with a BPE tokenizer for tests; this module cannot import `opd.demo.pretrain` (which
imports it), so that tokenizer is built from every problem of the task, a superset of the train
texts (the same number tokens but for the rarest three-digit answers, e.g. "108").

Run `python -m opd.demo.bpe /tmp/tiny-bpe`; test with
`pytest -n 0 tests/unit/test_demo_bpe.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from datasets import Dataset
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from opd.demo import task
from opd.demo.tiny import ALPHABET, TinyShape, tiny_config_fields

# `TinyShape()`, read from here: ruff (B008) cannot see that the imported dataclass is frozen.
TINY_SHAPE = TinyShape()
# Listed in id order: a trainer's special tokens get the first ids.
EOS, PAD, BOS = "<|endoftext|>", "<pad>", "<s>"


def task_texts(dataset: Dataset) -> list[str]:
    """The full text of each row, prompt then answer: `"37+5=42"`."""
    return [p + a for p, a in zip(dataset["prompt"], dataset["answer"], strict=True)]


def build_bpe_tokenizer(texts: list[str], vocab_size: int = 160) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on `texts`, covering every character of `ALPHABET`.

    Args:
        texts: training texts; only runs of digits are merged (see the module docstring).
        vocab_size: the largest vocabulary. The task texts support ~100 merges (every two-digit
            number, and "100".."108"), so with 3 special tokens and 47 characters they run out
            before 160: every merge the task texts allow is made.

    Returns:
        A fast tokenizer with `<|endoftext|>` (EOS, id 0), `<pad>` (1) and `<s>` (BOS, 2).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    # `isolated` keeps every character (spaces included) in some piece, and a piece is either a
    # digit run or one other character, so "=" never merges into an answer: a prompt's tokens
    # are a prefix of its prompt + answer tokens.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d+|\D"), behavior="isolated")
    core.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD, BOS],
        # The alphabet is the initial vocabulary whatever `texts` contain.
        initial_alphabet=list(ALPHABET),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        padding_side="left",
        # The default clean-up would turn "a ." into "a." on decode.
        clean_up_tokenization_spaces=False,
    )


def build_tiny_bpe_model(
    tokenizer: PreTrainedTokenizerBase, shape: TinyShape = TINY_SHAPE, *, seed: int = 0
) -> LlamaForCausalLM:
    """A randomly initialised Llama causal LM of `shape` for `tokenizer` (tied embeddings,
    float32, sdpa; its config and generation config carry `tokenizer`'s BOS/EOS/PAD ids), with
    number tokens initialised by place value (`init_number_embeddings`).

    Llama, not the Qwen2 of `build_tiny_model`: for a `qwen2` config, transformers' AutoTokenizer
    (and vLLM, which calls it) always loads `Qwen2Tokenizer`, which rebuilds the tokenizer from
    its vocabulary with Qwen2's own pre-tokenizer (one token per digit) and byte-level decoder,
    so "42" would be two tokens and spaces would be lost. For a `llama` config it loads the saved
    `tokenizer.json` as written. The layers are the same but for Qwen2's q/k/v biases.
    """
    import torch

    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    config = LlamaConfig(
        **tiny_config_fields(len(tokenizer), shape, **ids, pad=tokenizer.pad_token_id)
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    init_number_embeddings(model, tokenizer, seed=seed)
    return model


def init_number_embeddings(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, *, seed: int
) -> None:
    """Start each all-digit token's embedding as a sum of one random vector per (place, digit):
    `e("42") = U[2] + T[4]`, `e("2") = U[2]`, `e("102") = U[2] + T[0] + H[1]`.

    Why: a merged number is one token, so the digits the sum depends on are not in the input.
    From random embeddings the demo's BPE teacher has to discover, from 700 examples, the units
    digit of ~100 unrelated tokens: its held-out accuracy after 400 to 1200 steps ranged from 0%
    to 89% across seeds and learning rates (stuck on the tens, or off by one). Shared place
    vectors give that structure at the start, as a new merged token is often initialised from
    its parts. Measured with `TEACHER_BPE_SFT` (600 steps) on 2 CPU cores: 99.5% held-out for
    seeds 1, 3 and 7, 94% and 96% for seeds 4 and 5. Other tokens keep their random init.
    """
    import torch

    number_ids = {token: i for token, i in tokenizer.get_vocab().items() if token.isdigit()}
    embeddings_VH = model.model.embed_tokens.weight  # tied: also the output layer
    num_places = max(len(token) for token in number_ids)
    generator = torch.Generator().manual_seed(seed)
    # The sum of up to `num_places` vectors keeps about the std of the model's other rows.
    scale = model.config.initializer_range / num_places**0.5
    place_digit_PDH = torch.randn(num_places, 10, embeddings_VH.shape[1], generator=generator)
    with torch.no_grad():
        for token, token_id in number_ids.items():
            digits = [int(digit) for digit in reversed(token)]  # units first
            rows_H = [place_digit_PDH[place, digit] for place, digit in enumerate(digits)]
            embeddings_VH[token_id] = scale * torch.stack(rows_H).sum(0)


def save_tiny_bpe(path: str | Path, shape: TinyShape = TINY_SHAPE, *, seed: int = 0) -> Path:
    """Write a BPE tokenizer and a random tiny model to `path` (loadable by transformers and
    vLLM), the BPE counterpart of `opd.demo.tiny.save_tiny`: `build_tiny_bpe_model` with a
    vocabulary of `len(tokenizer)`. The tokenizer is built from every problem of the task."""
    path = Path(path)
    tokenizer = build_bpe_tokenizer(task_texts(task.build_dataset(task.NUM_PROBLEMS, seed=0)))
    model = build_tiny_bpe_model(tokenizer, shape, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


if __name__ == "__main__":
    print(save_tiny_bpe(sys.argv[1] if len(sys.argv) > 1 else "/tmp/opd-tiny-bpe"))
