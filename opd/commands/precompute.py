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
rows and the recorded settings, never on which worker or which run scored it. A rerun verifies
the finished shards and scores only the rest; the resulting set is byte-identical to an
uninterrupted run's. Every argument is classified in `RECORDED_SETTINGS` (can change a byte of
the output: recorded in the manifest and in every shard; a rerun with another value is refused,
naming the argument) or `FREE_SETTINGS` (cannot: a rerun may change it). `--repair` rebuilds a
lost or corrupt manifest from the shards that verify. A teacher that stops answering ends the job
with one line saying how many shards are done and kept (`--debug`: the traceback).

Model names `demo:teacher` / `pypi:*` are resolved by `opd.models` for loading; the manifest
keeps the name as given.

`--store_hidden_states true` also stores the teacher's final hidden state at every completion
token (`teacher_hidden_dtype`: float32, or bfloat16 at half the bytes) and writes its output head
once (`output_head.safetensors`), so offline training gets the teacher's full distribution
(`opd_baseline: full`, `opd_divergence_support: full`). The manifest's `hidden` section records
the dtype, H, the bytes per token (of the hidden states, and of a whole shard row's per-token
columns) and the head's shape, dtype and sha256. Teachers: local, or `opd teacher serve`
(transformers backend); a stock vLLM server returns no hidden states.

Test: `pytest tests/integration/test_rollout_precompute.py
tests/integration/test_offline_hidden.py`.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from opd.arguments import ConfigError, check_at_least_one, help_field
from opd.config import TeacherArguments
from opd.shards import OUTPUT_HEAD_NAME, ShardSetWriter, atomic_write_bytes
from opd.teacher.http import TeacherRequestError, TeacherStoppedError, TeacherUnavailableError
from opd.teacher.shard_rows import (
    HIDDEN_COLUMN,
    hidden_column,
    list_lengths,
    rollout_batch_from_table,
    teacher_columns,
)
from opd.teacher.wire import HIDDEN_DTYPES
from opd.types import DIRECT_TEACHER_MODES, HiddenDtype, SpanRule, TeacherMode, TeacherScores

PROG = "opd teacher precompute"
DESCRIPTION = "Score a fixed rollout set with a teacher into parquet shards (offline OPD)."
# For the crash test only: seconds to sleep after each written shard, so that a test can kill the
# job between two shards on a busy machine.
THROTTLE_ENV = "OPD_PRECOMPUTE_SHARD_DELAY_S"

# Every argument that can change a byte of the output -> the manifest key recording it. A resume
# with another value is refused (`ShardSetWriter` names the argument); each shard carries them.
RECORDED_SETTINGS = {
    # The rows scored: recorded by content (the rollout manifest's or the file's sha256), so a
    # moved rollout set resumes (its path is relocatable) and an edited one is refused.
    "rollouts": "rollouts.fingerprint",
    # local transformers, our server and stock vLLM run different kernels: other rounding.
    "teacher_mode": "teacher.mode",
    # The teacher; as given (`demo:teacher`), or the served name in server mode.
    "teacher_model_name_or_path": "teacher.model",
    "teacher_top_k": "teacher.top_k",  # the stored columns
    "teacher_temperature": "teacher.temperature",  # divides the logits
    # Rows per forward: padding width and batched-matmul shapes change the float rounding
    # (measured on CPU: 3 vs 5 changed the values of 22 of 25 shards of 16 rows).
    "teacher_batch_size": "teacher.batch_size",
    # Tokenizes text rollout files: recorded as the sha256 of the ids it made (the only way it
    # reaches the output); a file of token ids records nothing (the tokenizer is only checked).
    "tokenizer_name_or_path": "rollouts.token_ids",
    # Shard boundaries, and where each shard's first mini-batch starts.
    "shard_size": "shard_size",
    # The hidden-state column, and the dtype it holds (recorded even when none is stored).
    "store_hidden_states": "hidden.stored",
    "teacher_hidden_dtype": "hidden.dtype",
    # A teacher of another tokenizer: span sums on the student's positions, its own top-k ids
    # and a span-start column; the tokenizer the completions are re-tokenized with (recorded as
    # given even when the mode is off, like teacher_hidden_dtype).
    "teacher_cross_tokenizer": "teacher.cross_tokenizer.enabled",
    "teacher_tokenizer_name_or_path": "teacher.cross_tokenizer.teacher_tokenizer",
}
# Every argument that cannot change a byte of the output: a resume may change it.
FREE_SETTINGS = {
    "output_dir": "where the set is written (it is the set being resumed)",
    "teacher_urls": "replicas of one teacher; /info must agree on model and tokenizer",
    "teacher_api_key": "authentication only (and never written to disk)",
    "teacher_timeout_s": "how long to wait for an answer, not what it is",
    "teacher_retry_budget_s": "how long to retry, not what the answer is",
    "num_workers": "each shard is scored alone in fixed mini-batches, whichever worker takes it",
    "repair": "rebuilds the manifest from shards that carry the same settings",
    "debug": "how errors are shown",
    "teacher_span_rule": "applied by training to the stored span sums, not stored",
}
SETTING_LABELS = {key: name for name, key in RECORDED_SETTINGS.items()}


@dataclass(kw_only=True)
class PrecomputeArguments(TeacherArguments):
    """Arguments of `opd teacher precompute`: the teacher as in `OPDConfig` (`TeacherArguments`),
    the rollouts it scores and where the scores go."""

    rollouts: str = help_field(
        help="A folder written by `opd rollout`, or a .jsonl/.json/.parquet file with "
        "prompt_ids/completion_ids (token ids) or prompt/completion (text) columns."
    )
    output_dir: str = help_field(help="Folder for the teacher-score shards + manifest.")
    tokenizer_name_or_path: str | None = help_field(
        None, "Tokenizer for text rollout files (default: teacher_model_name_or_path)."
    )
    num_workers: int = help_field(
        1, "Threads scoring whole shards in parallel (server/vllm: one client each)."
    )
    shard_size: int | None = help_field(
        None, "Rows per output shard (default: the rollout set's, else 1024)."
    )
    repair: bool = help_field(
        False,
        "Rebuild a lost or corrupt manifest.json from the shards that verify (their "
        "embedded checksum and settings), then score the missing ones.",
    )
    store_hidden_states: bool = help_field(
        False,
        "Also store the teacher's final hidden state at every completion token (H values in "
        "teacher_hidden_dtype) and its output head, so that offline training can use the "
        "teacher's full distribution (opd_baseline / opd_divergence_support: full).",
    )
    debug: bool = help_field(False, "Show tracebacks of teacher errors (not one line).")

    def __post_init__(self):
        self.teacher_mode = TeacherMode(self.teacher_mode)
        if self.teacher_mode not in DIRECT_TEACHER_MODES:
            raise ConfigError(
                f"teacher_mode={self.teacher_mode!r}: precompute scores with a teacher it can "
                f"call: {', '.join(DIRECT_TEACHER_MODES)}."
            )
        if self.teacher_mode in ("local", "vllm") and not self.teacher_model_name_or_path:
            raise ConfigError(
                f"teacher_mode={self.teacher_mode!r} needs teacher_model_name_or_path."
            )
        if self.teacher_mode in ("server", "vllm") and not self.teacher_urls:
            raise ConfigError(f"teacher_mode={self.teacher_mode!r} needs teacher_urls.")
        self.teacher_hidden_dtype = HiddenDtype(self.teacher_hidden_dtype)
        self.teacher_span_rule = SpanRule(self.teacher_span_rule)
        if self.teacher_cross_tokenizer and self.store_hidden_states:
            raise ConfigError(
                "store_hidden_states stores the teacher's hidden states at the student's "
                "positions, which a teacher of another tokenizer does not have: unset one."
            )
        if self.store_hidden_states and self.teacher_mode == "vllm":
            raise ConfigError(
                "store_hidden_states needs the teacher's hidden states, which a stock vLLM "
                "server does not return: use teacher_mode local, or server with `opd teacher "
                "serve --backend transformers`."
            )
        self.check_teacher_scoring()
        check_at_least_one(self, "num_workers", "shard_size")

    @property
    def needs_full_teacher_distribution(self) -> bool:
        """`build_teacher` makes a server teacher in hidden-state mode when this is true."""
        return self.store_hidden_states

    @property
    def hidden_dtype(self) -> str:
        """The dtype the teacher is asked its hidden states in; "" when none are stored."""
        return str(self.teacher_hidden_dtype) if self.store_hidden_states else ""


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------


def run(args: PrecomputeArguments) -> dict[str, Any]:
    """Score every rollout row not yet in `args.output_dir`; returns the final manifest."""
    from opd.teacher.precompute_input import build_teachers, load_rollouts, loading_arguments

    rollouts = load_rollouts(args)
    with teacher_errors_as_one_line(args, None):
        teachers = build_teachers(
            loading_arguments(args), rollouts.student_tokenizer, rollouts.student_fingerprint
        )
    shard_size = args.shard_size or rollouts.shard_size or 1024
    plan = precompute_plan(args, rollouts, teachers[0], shard_size)
    writer = ShardSetWriter(args.output_dir, plan, rerun_hint=PROG, labels=SETTING_LABELS)
    try:
        finished = writer.start(repair=args.repair)
        if args.store_hidden_states:  # after `start`: a new output_dir must be empty before it
            write_output_head(args, teachers[0], plan["hidden"]["output_head"])
        todo = [i for i in range(plan["num_shards"]) if i not in finished]
        if todo:
            with teacher_errors_as_one_line(args, writer):
                score_shards(rollouts.table, todo, shard_size, teachers, writer, args)
        manifest = writer.manifest()
    finally:
        writer.close()
    print(
        f"{PROG}: {manifest['num_rows']} rows scored by {plan['teacher']['model']} in "
        f"{manifest['num_shards']} shards ({len(finished)} already done) -> {args.output_dir}"
    )
    return manifest


def precompute_plan(
    args: PrecomputeArguments, rollouts, teacher, shard_size: int
) -> dict[str, Any]:
    """What defines the set: every `RECORDED_SETTINGS` value, the rows, and what the teacher
    reports about itself (tokenizer; device of a local model: CPU and GPU kernels round
    differently)."""
    from opd.teacher.precompute_input import teacher_device, teacher_fingerprint

    num_rows = rollouts.table.num_rows
    local = args.teacher_mode == "local"
    return {
        "kind": "teacher_scores",
        "num_rows": num_rows,
        "num_shards": -(-num_rows // shard_size),
        "shard_size": shard_size,
        "teacher": {
            "model": args.teacher_model_name_or_path if local else teacher.teacher_id,
            "tokenizer": teacher_fingerprint(teacher),
            "temperature": float(args.teacher_temperature),
            "top_k": int(args.teacher_top_k),
            "mode": args.teacher_mode,
            "batch_size": int(args.teacher_batch_size),
            "device": teacher_device(teacher),
            "cross_tokenizer": cross_tokenizer_plan(args, rollouts),
        },
        "rollouts": rollouts.info,
        "hidden": hidden_plan(args, teacher),
    }


def cross_tokenizer_plan(args: PrecomputeArguments, rollouts) -> dict[str, Any]:
    """The manifest's `teacher.cross_tokenizer`: whether the set is on the student's positions
    from a teacher of another tokenizer, which tokenizers, and how they were aligned."""
    from opd.teacher.consistency import tokenizer_fingerprint
    from opd.teacher.cross_tokenizer import ALIGNMENT_RULE

    section: dict[str, Any] = {
        "enabled": bool(args.teacher_cross_tokenizer),
        "teacher_tokenizer": args.teacher_tokenizer_name_or_path,
    }
    if not args.teacher_cross_tokenizer:
        return section
    return section | {
        "student_tokenizer": tokenizer_fingerprint(rollouts.student_tokenizer),
        "alignment": ALIGNMENT_RULE,
        "stored": "teacher_logprobs: each span's summed teacher logprob at its last student "
        "token; teacher_topk_*: the teacher's own ids at its first; teacher_span_start",
    }


def hidden_plan(args: PrecomputeArguments, teacher) -> dict[str, Any]:
    """The manifest's `hidden` section: the stored hidden states' dtype and width, their bytes
    per completion token (and those of all of a row's per-token columns: completion id, sampler
    and teacher logprobs, top-k ids and logprobs, hidden state), and the teacher's output head."""
    from opd.teacher.output_head import head_digest, head_info
    from opd.teacher.precompute_input import teacher_output_head

    section = {"stored": args.store_hidden_states, "dtype": str(args.teacher_hidden_dtype)}
    if not args.store_hidden_states:
        return section
    head_VH = teacher_output_head(teacher)
    hidden_size = int(head_VH.shape[1])
    bytes_per_token = hidden_size * HIDDEN_DTYPES[args.hidden_dtype].itemsize
    return section | {
        "hidden_size": hidden_size,
        "bytes_per_token": bytes_per_token,
        "row_bytes_per_token": 4 + 4 + 4 + 8 * int(args.teacher_top_k) + bytes_per_token,
        "output_head": head_info(head_VH, head_digest(head_VH)),
    }


def write_output_head(args: PrecomputeArguments, teacher, recorded: dict[str, Any]) -> None:
    """The teacher's lm_head into the set (`output_head.safetensors`, atomically), once per run:
    the bytes depend only on the head, so a resumed set is byte-identical too."""
    from opd.teacher.output_head import encode_head
    from opd.teacher.precompute_input import teacher_output_head

    head_VH = teacher_output_head(teacher)
    atomic_write_bytes(
        Path(args.output_dir) / OUTPUT_HEAD_NAME, encode_head(head_VH, recorded["sha256"])
    )


@contextmanager
def teacher_errors_as_one_line(args: PrecomputeArguments, writer: ShardSetWriter | None):
    """A teacher that stops answering (or rejects a request) ends the job with one line that
    names the server (the error text of `opd.teacher.http`) and what is kept, not a traceback."""
    try:
        yield
    except (TeacherUnavailableError, TeacherRequestError) as error:
        if args.debug:
            raise
        text = " ".join(str(error).split())
        if writer is None:
            kept = "No shard was scored in this run"
        else:
            done, planned = len(writer.manifest()["shards"]), writer.plan["num_shards"]
            kept = f"{done} of {planned} shards are done and kept in {args.output_dir}"
        what_next = (
            "rerun the same command to resume"
            if isinstance(error, TeacherUnavailableError)
            else "fix the request and rerun the same command to resume"
        )
        raise TeacherStoppedError(f"{text.rstrip('.')}. {kept}; {what_next}.") from error


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
    try:
        with ThreadPoolExecutor(len(workers), thread_name_prefix="precompute") as pool:
            futures = [pool.submit(work, teacher) for teacher in workers]
            for future in futures:
                future.result()
    finally:
        progress.close()


def score_shard(shard: pa.Table, teacher, args: PrecomputeArguments) -> pa.Table:
    """The shard's rows plus their teacher columns, scored in fixed mini-batches."""
    from opd.teacher.precompute_input import scores_and_hidden

    parts: dict[str, list[pa.Array]] = {}
    for lo in range(0, shard.num_rows, args.teacher_batch_size):
        rows = shard.slice(lo, args.teacher_batch_size)
        batch = rollout_batch_from_table(rows)
        if args.teacher_cross_tokenizer:  # the teacher's own rendering of each prompt
            batch = teacher_rendered_batch(batch, rows, teacher)
        scores, hidden_BTH = scores_and_hidden(
            teacher, batch, args.teacher_top_k, args.hidden_dtype
        )
        check_scores(scores, args, teacher.teacher_id)
        lengths_B = list_lengths(rows["completion_ids"])
        columns = teacher_columns(scores, lengths_B, args.teacher_top_k)
        if hidden_BTH is not None:
            columns[HIDDEN_COLUMN] = hidden_column(hidden_BTH, lengths_B)
        for name, column in columns.items():
            parts.setdefault(name, []).append(column)
    for name, chunks in parts.items():
        shard = shard.append_column(name, pa.chunked_array(chunks))
    return shard


def teacher_rendered_batch(batch, rows: pa.Table, teacher):
    """`batch` with the teacher's prompt ids rendered from the stored `prompt` column (a
    cross-tokenizer teacher scores after its own tokens)."""
    import dataclasses

    if batch.teacher_prompt_ids is not None:
        raise ConfigError(
            "teacher_cross_tokenizer: these rollouts carry a privileged teacher prompt "
            "(teacher_prompt_ids), which precompute cannot re-render for another tokenizer; "
            "train online (teacher_mode local or server) with teacher_context_column instead."
        )
    if "prompt" not in rows.column_names:
        raise ConfigError(
            "teacher_cross_tokenizer needs the rollouts' `prompt` column (text or messages) to "
            "render it with the teacher's tokenizer; the rollout set has none."
        )
    prompts = rows["prompt"].to_pylist()
    return dataclasses.replace(batch, teacher_prompt_ids=teacher.render_prompt_ids(prompts))


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
