"""What `opd teacher precompute` reads: a rollout folder from `opd rollout`, or a file of rows.

A file (.jsonl/.json/.parquet) holds token ids (`prompt_ids`, `completion_ids`, optionally
`teacher_prompt_ids`, `prompt_index`, `sample_index`, `sampler_logprobs`, `stop_reason`) or text
(`prompt`, `completion`, optionally `teacher_prompt`), which is tokenized here the way
`opd rollout` tokenizes prompts. Either way the rows become a table with the rollout columns of
`opd/teacher/shards.py` (missing optional columns get defaults) and the file's other columns.

Test: `pytest tests/integration/test_rollout_precompute.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa

from opd.config import ConfigError
from opd.teacher.shards import ROLLOUT_COLUMNS, TEACHER_COLUMNS, file_sha256, load_shard_set

# ------------------------------------------------------------------------------------------------
# Input: a rollout folder or a file of token ids / text
# ------------------------------------------------------------------------------------------------

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class Rollouts:
    """The rollout rows to score and what the manifest records about them."""

    table: pa.Table
    """Rollout columns (see opd/teacher/shards.py) plus pass-through columns, in row order."""
    info: dict[str, Any]
    """The manifest's `rollouts` section: path, fingerprint, and the student when known."""
    shard_size: int | None = None
    student_tokenizer: Any = None
    student_fingerprint: dict[str, Any] | None = None


def load_rollouts(args) -> Rollouts:
    path = Path(args.rollouts)
    if path.is_dir():
        return rollouts_from_folder(path)
    if path.suffix in FILE_FORMATS and path.is_file():
        return rollouts_from_file(path, args)
    raise ConfigError(
        f"rollouts={args.rollouts!r} is neither a folder written by `opd rollout` nor a "
        f"{'/'.join(FILE_FORMATS)} file."
    )


def rollouts_from_folder(path: Path) -> Rollouts:
    manifest, dataset = load_shard_set(path, kind="rollouts", rerun_hint="opd rollout")
    info = {
        "path": str(path.resolve()),
        "fingerprint": manifest["fingerprint"],
        "student": manifest.get("student"),
        "student_tokenizer": manifest.get("student_tokenizer"),
        "sampling": manifest.get("sampling"),
    }
    return Rollouts(
        table=dataset.with_format("arrow")[:],
        info=info,
        shard_size=manifest["shard_size"],
        student_tokenizer=try_tokenizer(manifest.get("student")),
        student_fingerprint=manifest.get("student_tokenizer"),
    )


def rollouts_from_file(path: Path, args) -> Rollouts:
    """Rows of token ids, or of text tokenized here the way `opd rollout` tokenizes prompts."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    dataset = load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split="train")
    columns = set(dataset.column_names)
    tokenizer_name = args.tokenizer_name_or_path
    if {"prompt_ids", "completion_ids"} <= columns:
        tokenizer = try_tokenizer(tokenizer_name)
    elif {"prompt", "completion"} <= columns:
        tokenizer_name = tokenizer_name or args.teacher_model_name_or_path
        if not tokenizer_name:
            raise ConfigError(f"{path} holds text: set tokenizer_name_or_path to tokenize it.")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
        dataset = dataset.map(partial(tokenize_row, tokenizer=tokenizer))
    else:
        raise ConfigError(
            f"{path} needs columns prompt_ids and completion_ids (token ids) or prompt and "
            f"completion (text); it has {', '.join(sorted(columns))}."
        )
    info = {
        "path": str(path.resolve()),
        "fingerprint": file_sha256(path),
        "tokenizer": tokenizer_name,
    }
    return Rollouts(table=rollout_table(dataset), info=info, student_tokenizer=tokenizer)


def tokenize_row(row: dict[str, Any], *, tokenizer) -> dict[str, Any]:
    from opd.rollout.job import encode_prompt

    tokens = {
        "prompt_ids": encode_prompt(tokenizer, row["prompt"]),
        "completion_ids": tokenizer(row["completion"], add_special_tokens=False)["input_ids"],
    }
    if row.get("teacher_prompt") is not None:
        tokens["teacher_prompt_ids"] = encode_prompt(tokenizer, row["teacher_prompt"])
    return tokens


def rollout_table(dataset) -> pa.Table:
    """The rollout columns with their on-disk types (defaults for the optional ones), then the
    file's other columns."""
    num_rows = len(dataset)
    names = set(dataset.column_names)

    def column(name: str, default):
        return dataset[name] if name in names else default

    prompt_ids = dataset["prompt_ids"]
    rollout = {
        "prompt_index": pa.array(column("prompt_index", range(num_rows)), pa.int64()),
        "sample_index": pa.array(column("sample_index", [0] * num_rows), pa.int64()),
        "prompt_ids": pa.array(prompt_ids, pa.list_(pa.int32())),
        "teacher_prompt_ids": pa.array(
            column("teacher_prompt_ids", prompt_ids), pa.list_(pa.int32())
        ),
        "completion_ids": pa.array(dataset["completion_ids"], pa.list_(pa.int32())),
        "sampler_logprobs": pa.array(
            column("sampler_logprobs", [None] * num_rows), pa.list_(pa.float32())
        ),
        "stop_reason": pa.array(column("stop_reason", ["unknown"] * num_rows), pa.string()),
    }
    ours = ROLLOUT_COLUMNS + TEACHER_COLUMNS
    rest = dataset.remove_columns([n for n in dataset.column_names if n in ours])
    table = pa.table(rollout)
    for name, values in zip(rest.column_names, rest.with_format("arrow")[:].columns, strict=True):
        table = table.append_column(name, values)
    return table


def try_tokenizer(name: str | None):
    """The tokenizer saved at/cached for `name`, or None (then only fingerprints are compared)."""
    from transformers import AutoTokenizer

    if not name:
        return None
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        return None
