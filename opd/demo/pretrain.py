"""Pre-training stage of the embedded demo: a teacher that knows the task, a student that does not.

No model can be downloaded, so `opd distill` (no arguments) builds both from `opd.demo.tiny` and
trains them here on the synthetic task of `opd.demo.task` with a plain torch SFT loop (AdamW,
loss only on the answer and EOS tokens):

- the teacher, a larger tiny model, is trained to high held-out accuracy;
- the student, a smaller tiny model, is warm-started for a few steps only, so it knows the
  format (digits then EOS) but often gets the sum wrong: an SFT checkpoint before OPD.

Contract: `prepare_demo_models(cache_dir=None, log=print) -> (teacher_path, student_path)`, two
folders written with `save_pretrained` (model and tokenizer) that transformers and vLLM load.
They are cached outside the repo, in `$OPD_CACHE_DIR` or `~/.cache/opd/demo`, under a short hash
of the task and training settings; a complete cache skips the training. Each model is trained
into a temporary folder and renamed into place, so a crash never leaves a half-written cache.

`prepare_bpe_teacher(cache_dir=None, log=print) -> path` trains a third model into the same
folder, `teacher-bpe`, for cross-tokenizer distillation: a teacher of the same shape whose
tokenizer is not the student's, the BPE tokenizer of `opd.demo.bpe` built from the train split
(numbers are one token), on a Llama model (`opd.demo.bpe.build_tiny_bpe_model` says why).

Run `python -m opd.demo.pretrain [cache_dir]` to build the cache: 50 s on 2 CPU cores (teacher
37 s to 99.5% held-out accuracy, student 5 s to 37%); `python -m opd.demo.pretrain --bpe
[cache_dir]` builds the BPE teacher (27 s to 99.5%; vLLM greedy: 99.5% too).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd.demo import task
from opd.demo.bpe import build_bpe_tokenizer, build_tiny_bpe_model, task_texts
from opd.demo.evaluate import greedy_accuracy
from opd.demo.tiny import TinyShape, build_char_tokenizer, build_tiny_model

# Bump when the task or the training code changes in a way the settings below do not capture.
TASK_VERSION = "add-2digit-1digit-v1"
NUM_TRAIN, NUM_EVAL, SPLIT_SEED = 700, 200, 0
MAX_NEW_TOKENS = task.MAX_ANSWER_CHARS + 1  # answer digits + EOS
MARKER = "opd_demo.json"


@dataclass(frozen=True)
class TinySFTConfig:
    """Model shape and SFT schedule of one demo model."""

    shape: TinyShape
    steps: int
    warmup_steps: int
    seed: int
    batch_size: int = 64
    learning_rate: float = 1e-3


# Measured (scripts/experiments/demo_opd_check.py): the teacher reaches 97-100% held-out greedy
# accuracy; lr 3e-3 stalls below 15%. No label smoothing: it bounds the teacher's log-probs
# but the student then spends its OPD steps matching the smoothing floor, not the digits.
TEACHER_SFT = TinySFTConfig(TinyShape(256, 3, 4, 512), steps=400, warmup_steps=30, seed=1)
# Stopped mid-way up its learning curve: ~37% held-out accuracy (150 steps: ~11%, 250: ~54%).
# A student with more to learn than this does not get past ~60% in 100 vanilla OPD steps.
STUDENT_SFT = TinySFTConfig(TinyShape(128, 2, 2, 256), steps=210, warmup_steps=10, seed=2)
# The teacher's shape, 600 steps: held-out accuracy 94-99.5% across seeds, where 400 steps
# give 75-99.5% (opd.demo.bpe.init_number_embeddings). Not in `settings_hash`, which keys the
# folder it shares with the other two: changing it, or the BPE tokenizer, needs a TASK_VERSION
# bump (or deleting `teacher-bpe/`).
TEACHER_BPE_SFT = replace(TEACHER_SFT, steps=600)


def settings_hash() -> str:
    """Short hash of everything that determines the cached models."""
    settings = {
        "task": TASK_VERSION,
        "splits": [NUM_TRAIN, NUM_EVAL, SPLIT_SEED],
        "teacher": asdict(TEACHER_SFT),
        "student": asdict(STUDENT_SFT),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def default_cache_dir() -> Path:
    """`$OPD_CACHE_DIR` or `~/.cache/opd/demo`, then the settings hash."""
    root = os.environ.get("OPD_CACHE_DIR") or Path.home() / ".cache" / "opd" / "demo"
    return Path(root) / settings_hash()


def demo_splits() -> tuple[Dataset, Dataset]:
    """The demo's train and held-out datasets (disjoint prompts)."""
    return task.build_splits(NUM_TRAIN, NUM_EVAL, SPLIT_SEED)


def encode_sft_examples(
    tokenizer: PreTrainedTokenizerBase, dataset: Dataset
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `prompt + answer + EOS` ids and labels, both `[N, L]` int64.

    Labels are -100 on prompt and padding tokens, so the loss covers only answer digits and EOS.
    """
    rows = []
    for prompt, answer in zip(dataset["prompt"], dataset["answer"], strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = [*tokenizer(answer)["input_ids"], tokenizer.eos_token_id]
        rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    length = max(len(ids) for ids, _ in rows)
    input_ids_NL = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    labels_NL = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        input_ids_NL[i, : len(ids)] = torch.tensor(ids)
        labels_NL[i, : len(labels)] = torch.tensor(labels)
    return input_ids_NL, labels_NL


def _lr_factor(step: int, config: TinySFTConfig) -> float:
    """Linear warmup then cosine decay to 10% of the peak."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def sft_loss(model: PreTrainedModel, input_ids_BL: torch.Tensor, labels_BL: torch.Tensor):
    """Mean next-token cross-entropy over labelled (answer and EOS) tokens."""
    # Right padding and causal attention: labelled positions never attend to the pad tokens
    # after them, so no attention mask is needed.
    logits_BLV = model(input_ids=input_ids_BL).logits
    return torch.nn.functional.cross_entropy(
        logits_BLV[:, :-1].flatten(0, 1).float(), labels_BL[:, 1:].flatten(), ignore_index=-100
    )


def train_sft(
    config: TinySFTConfig,
    tokenizer: PreTrainedTokenizerBase,
    train: Dataset,
    log: Callable,
    model: PreTrainedModel | None = None,
) -> PreTrainedModel:
    """Train `model` (by default a new `build_tiny_model` of `config`'s shape) with SFT on
    `train`; returns it in eval mode."""
    if model is None:
        model = build_tiny_model(len(tokenizer), config.shape, seed=config.seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    input_ids_NL, labels_NL = encode_sft_examples(tokenizer, train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    for step in range(config.steps):
        rows_B = torch.randint(0, len(input_ids_NL), (config.batch_size,), generator=generator)
        loss = sft_loss(model, input_ids_NL[rows_B], labels_NL[rows_B])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % max(1, config.steps // 5) == 0 or step == 0:
            log(f"  step {step + 1}/{config.steps}  loss {loss.item():.4f}")
    model.eval()
    return model


def _is_complete(model_dir: Path) -> bool:
    """A model folder is complete once its marker exists: the marker is written last, inside the
    temporary folder, before the rename."""
    return (model_dir / MARKER).is_file()


def _train_into_cache(
    role: str,
    config: TinySFTConfig,
    cache_dir: Path,
    splits: tuple[Dataset, Dataset],
    log,
    tokenizer: PreTrainedTokenizerBase | None = None,
    model: PreTrainedModel | None = None,
) -> Path:
    """Train one model into a temporary folder next to its final place, then rename it there.
    `tokenizer` and `model` default to the char tokenizer and `train_sft`'s Qwen2 model."""
    final_dir = cache_dir / role
    tokenizer = tokenizer if tokenizer is not None else build_char_tokenizer()
    train, held_out = splits
    shape = config.shape
    log(f"[opd demo] training the {role} ({shape.num_layers} layers, hidden {shape.hidden_size})")
    start = time.perf_counter()
    model = train_sft(config, tokenizer, train, log, model)
    seconds = time.perf_counter() - start
    accuracy = greedy_accuracy(model, tokenizer, held_out, max_new_tokens=MAX_NEW_TOKENS)
    log(f"[opd demo] {role}: {seconds:.1f}s, held-out greedy accuracy {accuracy:.1%}")
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{role}-", dir=cache_dir))
    try:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        marker = {"settings_hash": settings_hash(), "sft": asdict(config), "seconds": seconds}
        marker["held_out_accuracy"] = accuracy
        (tmp_dir / MARKER).write_text(json.dumps(marker, indent=2))
        if final_dir.exists() and not _is_complete(final_dir):
            shutil.rmtree(final_dir)  # not ours: written by hand or by an older version
        os.replace(tmp_dir, final_dir)
    except OSError:
        # Another process finished the same folder first (rename onto a non-empty folder fails).
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if not _is_complete(final_dir):
            raise
    return final_dir


def prepare_demo_models(
    cache_dir: str | Path | None = None, log: Callable[[str], object] = print
) -> tuple[Path, Path]:
    """Return `(teacher_path, student_path)`, training whichever is not cached yet.

    Args:
        cache_dir: folder holding `teacher/` and `student/`; defaults to `default_cache_dir()`.
        log: called with one progress line at a time.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    splits = demo_splits()
    paths = []
    for role, config in (("teacher", TEACHER_SFT), ("student", STUDENT_SFT)):
        model_dir = cache_dir / role
        if _is_complete(model_dir):
            log(f"[opd demo] using cached {role}: {model_dir}")
        else:
            model_dir = _train_into_cache(role, config, cache_dir, splits, log)
        paths.append(model_dir)
    return paths[0], paths[1]


def prepare_bpe_teacher(
    cache_dir: str | Path | None = None, log: Callable[[str], object] = print
) -> Path:
    """Return the folder of the BPE teacher (`teacher-bpe`), training it if not cached yet.

    Args:
        cache_dir: folder holding `teacher-bpe/`; defaults to `default_cache_dir()`.
        log: called with one progress line at a time.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    model_dir = cache_dir / "teacher-bpe"
    if _is_complete(model_dir):
        log(f"[opd demo] using cached teacher-bpe: {model_dir}")
        return model_dir
    splits = demo_splits()
    tokenizer = build_bpe_tokenizer(task_texts(splits[0]))
    config = TEACHER_BPE_SFT
    model = build_tiny_bpe_model(tokenizer, config.shape, seed=config.seed)
    return _train_into_cache("teacher-bpe", config, cache_dir, splits, log, tokenizer, model)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--bpe"]:
        print(f"teacher-bpe: {prepare_bpe_teacher(args[1] if len(args) > 1 else None)}")
    else:
        teacher_path, student_path = prepare_demo_models(args[0] if args else None)
        print(f"teacher: {teacher_path}\nstudent: {student_path}")
