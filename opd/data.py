"""Prompt datasets for `opd distill`: the embedded demo task, local files or hub datasets.

Contract: a `datasets.Dataset` with a `prompt` column (text, or a list of chat messages that TRL
renders with the chat template); any other columns (e.g. `answer`) reach the reward functions.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, load_dataset

from opd.config import ConfigError

DEMO_DATASET = "demo:arithmetic"
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
    if name == DEMO_DATASET:
        from opd.demo.pretrain import demo_splits

        return demo_splits()[0]
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
    if as_chat:
        dataset = dataset.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    return dataset


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
