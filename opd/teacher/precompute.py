"""`opd teacher precompute`: score a fixed rollout set with a teacher, once, into parquet shards
(Lightning OPD, METHODS.md section 6). Training then reads them with `OfflineTeacher`.

    opd teacher precompute --rollouts ROLLOUTS_DIR --teacher_model_name_or_path T \
        --output_dir SCORES_DIR [--teacher_top_k 16] [--num_workers 1]

Input: a folder written by `opd rollout`, or a .jsonl/.json/.parquet file with token-id columns
`prompt_ids`/`completion_ids` or text columns `prompt`/`completion` (tokenized here with
`tokenizer_name_or_path`, default the teacher's tokenizer). The teacher is any `TeacherScorer`
built from the same `teacher_*` fields as `OPDConfig` (local model, `opd teacher serve`, stock
`vllm serve`).

Determinism and resumption: output shard i holds rollout rows [i*S, (i+1)*S), scored in
mini-batches of `teacher_batch_size` rows starting at i*S, so a shard's bytes depend only on its
rows, never on which worker or which run scored it. A rerun verifies the finished shards and
scores only the rest; the resulting set is byte-identical to an uninterrupted run's. A rerun with
another teacher, top-k, temperature or rollout set into the same output_dir is refused.

Test: `pytest tests/integration/test_rollout_precompute.py`.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import pyarrow as pa

from opd.config import ConfigError
from opd.teacher.consistency import compare_fingerprints, tokenizer_fingerprint
from opd.teacher.shard_rows import list_lengths, rollout_batch_from_table, teacher_columns
from opd.teacher.shards import ShardSetWriter
from opd.types import RolloutBatch, TeacherScores

PROG = "opd teacher precompute"
DESCRIPTION = "Score a fixed rollout set with a teacher into parquet shards (offline OPD)."
# For the crash test only: seconds to sleep after each written shard, so that a test can kill the
# job between two shards on a busy machine.
THROTTLE_ENV = "OPD_PRECOMPUTE_SHARD_DELAY_S"


@dataclass
class PrecomputeArguments:
    """Arguments of `opd teacher precompute` (teacher fields named as in `OPDConfig`)."""

    rollouts: str = field(
        metadata={
            "help": "A folder written by `opd rollout`, or a .jsonl/.json/.parquet file with "
            "prompt_ids/completion_ids (token ids) or prompt/completion (text) columns."
        }
    )
    output_dir: str = field(metadata={"help": "Folder for the teacher-score shards + manifest."})
    teacher_mode: Literal["local", "server", "vllm"] = field(
        default="local",
        metadata={
            "help": "'local': in-process transformers model; 'server': `opd teacher serve` at "
            "teacher_urls; 'vllm': a stock `vllm serve` at teacher_urls."
        },
    )
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher model (required for 'local' and 'vllm')."}
    )
    teacher_urls: list[str] = field(
        default_factory=list, metadata={"help": "Teacher base URLs for 'server'/'vllm'."}
    )
    teacher_api_key: str | None = field(
        default=None, metadata={"help": "Bearer token (default: $OPD_TEACHER_API_KEY)."}
    )
    teacher_top_k: int = field(
        default=0, metadata={"help": "Top-k teacher logprobs to store per token (0: none)."}
    )
    teacher_temperature: float = field(
        default=1.0, metadata={"help": "Temperature the teacher's logits are divided by."}
    )
    teacher_batch_size: int = field(
        default=16, metadata={"help": "Rollout rows per teacher call (fixed order)."}
    )
    teacher_timeout_s: float = field(default=300.0, metadata={"help": "Seconds per HTTP answer."})
    teacher_retry_budget_s: float = field(
        default=120.0, metadata={"help": "How long a failing teacher request is retried."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer for text rollout files (default: teacher_model_name_or_path)."
        },
    )
    num_workers: int = field(
        default=1,
        metadata={
            "help": "Threads scoring whole shards in parallel (server/vllm: one client each)."
        },
    )
    shard_size: int | None = field(
        default=None,
        metadata={"help": "Rows per output shard (default: the rollout set's, else 1024)."},
    )

    def __post_init__(self):
        if self.teacher_mode in ("local", "vllm") and not self.teacher_model_name_or_path:
            raise ConfigError(
                f"teacher_mode={self.teacher_mode!r} needs teacher_model_name_or_path."
            )
        if self.teacher_mode in ("server", "vllm") and not self.teacher_urls:
            raise ConfigError(f"teacher_mode={self.teacher_mode!r} needs teacher_urls.")
        if self.teacher_top_k < 0 or self.teacher_batch_size < 1 or self.num_workers < 1:
            raise ConfigError(
                "teacher_top_k must be >= 0, teacher_batch_size and num_workers >= 1."
            )
        if self.teacher_temperature <= 0:
            raise ConfigError(f"teacher_temperature must be > 0, got {self.teacher_temperature}.")
        if self.shard_size is not None and self.shard_size < 1:
            raise ConfigError(f"shard_size must be >= 1, got {self.shard_size}.")


def precompute_main(argv: list[str]) -> int:
    from opd.cli import run_dataclass_command

    return run_dataclass_command(
        PrecomputeArguments, run_precompute, argv, prog=PROG, description=DESCRIPTION
    )


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------


def run_precompute(args: PrecomputeArguments) -> dict[str, Any]:
    """Score every rollout row not yet in `args.output_dir`; returns the final manifest."""
    from opd.teacher.precompute_input import load_rollouts

    rollouts = load_rollouts(args)
    teachers = build_teachers(args, rollouts.student_tokenizer, rollouts.student_fingerprint)
    shard_size = args.shard_size or rollouts.shard_size or 1024
    num_rows = rollouts.table.num_rows
    plan = {
        "kind": "teacher_scores",
        "num_rows": num_rows,
        "num_shards": -(-num_rows // shard_size),
        "shard_size": shard_size,
        "teacher": {
            "model": teachers[0].teacher_id,
            "tokenizer": teacher_fingerprint(teachers[0]),
            "temperature": float(args.teacher_temperature),
            "top_k": int(args.teacher_top_k),
            "mode": args.teacher_mode,
        },
        "rollouts": rollouts.info,
    }
    writer = ShardSetWriter(args.output_dir, plan, rerun_hint=PROG)
    try:
        finished = writer.start()
        todo = [i for i in range(plan["num_shards"]) if i not in finished]
        if todo:
            score_shards(rollouts.table, todo, shard_size, teachers, writer, args)
        manifest = writer.manifest()
    finally:
        writer.close()
    print(
        f"{PROG}: {manifest['num_rows']} rows scored by {plan['teacher']['model']} in "
        f"{manifest['num_shards']} shards ({len(finished)} already done) -> {args.output_dir}"
    )
    return manifest


def build_teachers(args: PrecomputeArguments, student_tokenizer, student_fingerprint) -> list:
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
    teacher = getattr(teacher, "inner", teacher)
    tokenizer = getattr(teacher, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer_fingerprint(tokenizer)
    server_info = getattr(teacher, "server_info", None)
    if not callable(server_info):
        return None
    return cast("dict[str, Any]", server_info()).get("tokenizer")


class SerializedTeacher:
    """A teacher whose `score` runs one call at a time (a local model shared by workers)."""

    def __init__(self, inner):
        self.inner = inner
        self.teacher_id = inner.teacher_id
        self._lock = threading.Lock()

    def score(self, batch: RolloutBatch, top_k: int = 0) -> TeacherScores:
        with self._lock:
            return self.inner.score(batch, top_k)


def score_shards(
    table: pa.Table,
    todo: list[int],
    shard_size: int,
    teachers: list,
    writer: ShardSetWriter,
    args: PrecomputeArguments,
) -> None:
    """Workers take whole shards from a queue; the first error stops them all and is raised."""
    from tqdm import tqdm

    pending: queue.Queue[int] = queue.Queue()
    for index in todo:
        pending.put(index)
    rows_todo = sum(min(shard_size, table.num_rows - i * shard_size) for i in todo)
    failed = threading.Event()
    progress = tqdm(total=rows_todo, desc="teacher scores", unit="row")
    delay_s = float(os.environ.get(THROTTLE_ENV, "0"))

    def work(teacher) -> None:
        while not failed.is_set():
            try:
                index = pending.get_nowait()
            except queue.Empty:
                return
            try:
                shard = table.slice(index * shard_size, shard_size)
                writer.write_shard(index, score_shard(shard, teacher, args))
            except BaseException:
                failed.set()
                raise
            progress.update(shard.num_rows)
            time.sleep(delay_s)

    workers = teachers[: min(len(teachers), len(todo))]
    with ThreadPoolExecutor(len(workers), thread_name_prefix="precompute") as pool:
        futures = [pool.submit(work, teacher) for teacher in workers]
        for future in futures:
            future.result()
    progress.close()


def score_shard(shard: pa.Table, teacher, args: PrecomputeArguments) -> pa.Table:
    """The shard's rows plus their teacher columns, scored in fixed mini-batches."""
    parts: dict[str, list[pa.Array]] = {}
    for lo in range(0, shard.num_rows, args.teacher_batch_size):
        rows = shard.slice(lo, args.teacher_batch_size)
        batch = rollout_batch_from_table(rows)
        scores = teacher.score(batch, args.teacher_top_k)
        check_scores(scores, args, teacher.teacher_id)
        lengths_B = list_lengths(rows["completion_ids"])
        for name, column in teacher_columns(scores, lengths_B, args.teacher_top_k).items():
            parts.setdefault(name, []).append(column)
    for name, chunks in parts.items():
        shard = shard.append_column(name, pa.chunked_array(chunks))
    return shard


def check_scores(scores: TeacherScores, args: PrecomputeArguments, teacher_id: str) -> None:
    """A teacher that answers with another top-k or temperature would corrupt the shards."""
    if scores.top_k != args.teacher_top_k or not np.isclose(
        scores.temperature, args.teacher_temperature
    ):
        raise ConfigError(
            f"teacher {teacher_id!r} answered with top_k={scores.top_k}, "
            f"temperature={scores.temperature}; asked for top_k={args.teacher_top_k}, "
            f"temperature={args.teacher_temperature}."
        )
