"""Prompt datasets for `opd distill` and `opd eval`: tasks the repo generates, files or hub data.

Contract: a `datasets.Dataset` with a `prompt` column (text, or a list of chat messages that TRL
renders with the chat template); any other columns (e.g. `answer`) reach the reward functions.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, load_dataset

from opd.config import ConfigError

DEMO_DATASET = "demo:arithmetic"
WORD_PROBLEMS = "demo:word_problems"  # the real-model recipe's task (opd/demo/word_problems.py)
DEMO_DATASETS = (DEMO_DATASET, WORD_PROBLEMS)
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_prompt_dataset(
    name: str,
    *,
    config: str | None = None,
    split: str = "train",
    prompt_column: str = "prompt",
    as_chat: bool = False,
) -> Dataset:
    """Load `name` (demo task, local file or hub name) and expose its prompts as `prompt`.

    `as_chat` turns each text prompt into a one-message conversation, which TRL renders with the
    student's chat template (what instruct and reasoning models expect).
    """
    if name in DEMO_DATASETS:
        dataset = load_demo_dataset(name, split)
        return _as_chat(dataset) if as_chat else dataset
    path = Path(name)
    if path.suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise ConfigError(f"dataset_name={name!r}: no such file.")
        dataset = load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    else:
        dataset = load_dataset(name, config, split=split)
    if prompt_column not in dataset.column_names:
        raise ConfigError(
            f"dataset {name!r} has no column {prompt_column!r} (columns: "
            f"{', '.join(dataset.column_names)}); set dataset_prompt_column."
        )
    if prompt_column != "prompt":
        if "prompt" in dataset.column_names:
            dataset = dataset.remove_columns("prompt")
        dataset = dataset.rename_column(prompt_column, "prompt")
    if len(dataset) == 0:
        raise ConfigError(f"dataset {name!r} (split {split!r}) is empty.")
    return _as_chat(dataset) if as_chat else dataset


def load_demo_dataset(name: str, split: str) -> Dataset:
    """A dataset the repo generates: its `train` split, or its held-out `test` split."""
    if split not in ("train", "test"):
        raise ConfigError(f"dataset {name!r} has the splits 'train' and 'test', not {split!r}.")
    if name == DEMO_DATASET:
        from opd.demo.pretrain import demo_splits

        train, held_out = demo_splits()
        return held_out if split == "test" else train
    from opd.demo.word_problems import load_word_problems

    return load_word_problems(split)


def _as_chat(dataset: Dataset) -> Dataset:
    return dataset.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})


def load_prompts_for(args) -> Dataset:
    """`load_prompt_dataset` with the `dataset_*` fields that `opd distill` and `opd rollout`
    arguments share."""
    return load_prompt_dataset(
        args.dataset_name,
        config=args.dataset_config,
        split=args.dataset_train_split,
        prompt_column=args.dataset_prompt_column,
        as_chat=args.dataset_chat_template,
    )
