"""Shard sets on disk: the rollouts of `opd rollout` and the teacher scores of `opd teacher
precompute`, as parquet files plus a JSON manifest.

A shard set is a folder:

    manifest.json          what the set is (kind, producer, settings) and which shards are done
    shard-00000.parquet    rows [0, S); each file loads with datasets.load_dataset("parquet", ...)
    shard-00001.parquet    rows [S, 2S); ...
    output_head.safetensors  teacher scores with hidden states only: the teacher's lm_head [V, H]

Rollout rows: `prompt_index`, `sample_index` (int64), `prompt_ids`, `teacher_prompt_ids`,
`completion_ids` (list<int32>), `sampler_logprobs` (list<float32>, one per completion token),
`stop_reason` (string), then the prompt dataset's own columns. Teacher-score rows add
`teacher_logprobs` (list<float32>) and, when top_k > 0, `teacher_topk_ids` (list<list<int32>>)
and `teacher_topk_logprobs` (list<list<float32>>, -inf padded): K values per completion token.
With `--store_hidden_states`, `teacher_hidden_states` (list<fixed_size_list<H>>): the teacher's
final hidden state predicting each completion token, float32 values or bfloat16 bits (uint16:
arrow has no bfloat16), as the manifest's `hidden` section says, which also records the head.

Crash safety: every file is written to `<name>.tmp-<pid>` and renamed over the target
(`os.replace` is atomic), and the manifest is rewritten after each finished shard. A killed job
leaves complete shards and a manifest listing them (`complete: false`); the rerun verifies their
sha256 and writes only the rest. Nothing volatile (times, hosts, pids) enters a shard or the
manifest, so an interrupted-and-resumed set is byte-identical to an uninterrupted one.

Self-describing shards: each shard's parquet footer carries the set's settings (the manifest's
plan less its relocatable keys, `opd.plan`), its index (`opd.shard`) and a seal (`opd.seal`):
the sha256 of the file's row groups and of those settings. A lost or corrupt manifest is rebuilt
from the shards whose seal verifies (`ShardSetWriter.start(repair=True)`, the jobs' `--repair`);
a shard made with other settings is refused rather than mixed in.

Test: `pytest tests/unit/test_shards.py`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from opd.arguments import ConfigError
from opd.shard_seal import read_sealed_parquet, sealed_parquet

FORMAT = "opd-shards"
VERSION = 1
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".opd-shards.lock"
ROLLOUT_COLUMNS = (
    "prompt_index", "sample_index", "prompt_ids", "teacher_prompt_ids", "completion_ids",
    "sampler_logprobs", "stop_reason",
)  # fmt: skip
TEACHER_COLUMNS = (
    "teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs", "teacher_hidden_states",
    "teacher_span_start",
)  # fmt: skip
OUTPUT_HEAD_NAME = "output_head.safetensors"
# Plan keys that may change between a run and its resumption (the data did not change). They
# stay out of the shards' embedded settings, so moving the input changes no shard's bytes.
RELOCATABLE_KEYS = ("rollouts.path",)
PLAN_KEY, INDEX_KEY = "opd.plan", "opd.shard"
REPAIR_HINT = "rerun the same command with --repair to rebuild it from the shards that verify"


class ShardError(ConfigError):
    """A shard set that is missing, corrupt, incomplete or not what the caller expected."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_set_fingerprint(shards: list[dict[str, Any]]) -> str:
    """sha256 over the ordered shard hashes: equal fingerprints mean byte-identical sets."""
    return hashlib.sha256("\n".join(entry["sha256"] for entry in shards).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------------


def _temporary_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _replace_durably(temporary: Path, path: Path) -> None:
    with open(temporary, "rb") as file:
        os.fsync(file.fileno())
    os.replace(temporary, path)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader (or a crash) sees the old or the new file only."""
    path = Path(path)
    temporary = _temporary_path(path)
    temporary.write_bytes(data)
    _replace_durably(temporary, path)


def write_parquet_atomic(
    path: str | Path, table: pa.Table, settings: dict[str, str] | None = None
) -> str:
    """Write `table` as parquet to `path` atomically; returns the file's sha256.

    The table's own schema metadata is dropped and chunks combined, so the bytes depend only on
    the rows and on `settings`, which (when given) the footer carries, sealed (`sealed_parquet`).
    """
    path = Path(path)
    if settings is not None:
        data = sealed_parquet(table, settings)
        atomic_write_bytes(path, data)
        return hashlib.sha256(data).hexdigest()
    temporary = _temporary_path(path)
    pq.write_table(table.replace_schema_metadata(None).combine_chunks(), temporary)
    sha256 = file_sha256(temporary)
    _replace_durably(temporary, path)
    return sha256


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode()


# ------------------------------------------------------------------------------------------------
# Reading and validating
# ------------------------------------------------------------------------------------------------


def read_manifest(folder: str | Path, *, kind: str | None = None) -> dict[str, Any]:
    """The manifest of the shard set in `folder`, checked for format, version and kind."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ShardError(f"{folder} is not a shard set: it has no {MANIFEST_NAME}.")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ShardError(f"{path} is not valid JSON ({error}).") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{path} is not an {FORMAT} manifest.")
    if manifest.get("version") != VERSION:
        raise ShardError(
            f"{path} has format version {manifest.get('version')}; this opd reads version "
            f"{VERSION}."
        )
    if kind is not None and manifest.get("kind") != kind:
        raise ShardError(f"{folder} holds {manifest.get('kind')!r} shards, expected {kind!r}.")
    return manifest


def shard_problem(folder: str | Path, entry: dict[str, Any]) -> str | None:
    """Why the manifest's shard `entry` is unusable (missing or corrupt); None if it is fine."""
    path = Path(folder) / entry["file"]
    if not path.is_file():
        return f"{path} is listed in {MANIFEST_NAME} but missing"
    sha256 = file_sha256(path)
    if sha256 != entry["sha256"]:
        return (
            f"{path} is corrupt: its sha256 is {sha256[:12]}..., "
            f"the manifest says {entry['sha256'][:12]}..."
        )
    return None


def validate_shard_set(
    folder: str | Path, manifest: dict[str, Any], *, verify_hashes: bool = True
) -> None:
    """Raise ShardError naming the first missing or corrupt shard file."""
    for entry in manifest["shards"]:
        if not verify_hashes:
            if not (Path(folder) / entry["file"]).is_file():
                raise ShardError(f"{Path(folder) / entry['file']} is listed but missing.")
            continue
        problem = shard_problem(folder, entry)
        if problem:
            raise ShardError(f"{problem}. Rerun the job that wrote {folder} to rewrite it.")


def check_complete(folder: str | Path, manifest: dict[str, Any], *, rerun_hint: str) -> None:
    done, planned = len(manifest["shards"]), manifest["num_shards"]
    if not manifest.get("complete") or done != planned:
        raise ShardError(
            f"{folder}: {rerun_hint} did not finish: {done} of {planned} shards; rerun "
            f"`{rerun_hint} ...` with the same arguments to complete it."
        )


def load_shard_set(folder: str | Path, *, kind: str, rerun_hint: str, verify_hashes: bool = True):
    """A complete shard set as (manifest, `datasets.Dataset` of its rows in shard order)."""
    from datasets import load_dataset

    manifest = read_manifest(folder, kind=kind)
    check_complete(folder, manifest, rerun_hint=rerun_hint)
    validate_shard_set(folder, manifest, verify_hashes=verify_hashes)
    files = [str(Path(folder) / entry["file"]) for entry in manifest["shards"]]
    dataset = load_dataset("parquet", data_files=files, split="train")
    if len(dataset) != manifest["num_rows"]:
        raise ShardError(
            f"{folder} holds {len(dataset)} rows; its manifest says {manifest['num_rows']}."
        )
    return manifest, dataset


# ------------------------------------------------------------------------------------------------
# Resumable writing
# ------------------------------------------------------------------------------------------------


def plan_differences(
    old: dict[str, Any],
    new: dict[str, Any],
    prefix: str = "",
    *,
    labels: dict[str, str] | None = None,
    where: str = "in the folder",
) -> list[str]:
    """`key: old in the folder vs new now` for every (dotted) key whose value differs,
    relocatable keys excepted. `labels` names a key by the argument that sets it."""
    differences = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            differences += plan_differences(
                before, after, prefix=f"{name}.", labels=labels, where=where
            )
        elif before != after and name not in RELOCATABLE_KEYS:
            label = _label(name, labels or {})
            differences.append(f"{label}: {before!r} {where} vs {after!r} now")
    return differences


def _label(name: str, labels: dict[str, str]) -> str:
    """The argument that sets `name` (or a key above it: `tokenizer_name_or_path.vocab_size`)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        key = ".".join(parts[:end])
        if key in labels:
            return ".".join([labels[key], *parts[end:]])
    return name


def stable_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """`plan` without its relocatable keys: what every shard of the set carries."""
    plan = json.loads(json.dumps(plan))
    for dotted in RELOCATABLE_KEYS:
        *parents, last = dotted.split(".")
        section = plan
        for parent in parents:
            section = section.get(parent) or {}
        section.pop(last, None)
    return plan


class ShardSetWriter:
    """Writes the shards of one planned set into `folder`, resuming a set a crash left behind.

    `plan` is everything that defines the set (kind, producer, settings, row and shard counts);
    the manifest is the plan plus the finished shards. A folder holding a different plan is
    refused, so a rerun never mixes shards of two settings; `labels` names a plan key by the
    argument that sets it (`{"teacher.top_k": "teacher_top_k"}`) in that refusal. Thread-safe:
    workers may write different shards concurrently. A lock file keeps a second job out.
    """

    def __init__(
        self,
        folder: str | Path,
        plan: dict[str, Any],
        *,
        rerun_hint: str,
        labels: dict[str, str] | None = None,
    ):
        self.folder = Path(folder)
        self.plan = {"format": FORMAT, "version": VERSION, **plan}
        self.rerun_hint = rerun_hint
        self.labels = labels or {}
        self._shard_plan = json.dumps(stable_plan(self.plan), sort_keys=True)
        self._shards: dict[int, dict[str, Any]] = {}
        self._mutex = threading.Lock()
        self._lock_file = None

    def start(self, *, repair: bool = False) -> set[int]:
        """Take the folder and return the indices of shards already finished (verified).

        `repair`: rebuild the manifest from the shards whose seal verifies, ignoring the one on
        disk (lost, corrupt or stale).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            for stale in self.folder.glob("*.tmp-*"):  # left by a killed writer
                stale.unlink()
            if repair:
                self._repair()
            elif (self.folder / MANIFEST_NAME).exists():
                self._resume(self._read_manifest())
            else:
                self._check_empty()
            self._write_manifest()
        except BaseException:
            self.close()  # a refused start leaves the folder to the next job
            raise
        return set(self._shards)

    def _take_lock(self) -> None:
        self._lock_file = open(self.folder / LOCK_NAME, "w")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise ShardError(f"another job is writing to {self.folder}; wait for it.") from error

    def _read_manifest(self) -> dict[str, Any]:
        try:
            return read_manifest(self.folder)
        except ShardError as error:
            raise ShardError(f"{str(error).rstrip('.')}; {REPAIR_HINT}.") from error

    def _check_empty(self) -> None:
        shards = sorted(p.name for p in self.folder.glob("shard-*.parquet"))
        if shards:
            raise ShardError(
                f"output_dir {self.folder} holds {len(shards)} shard files but no "
                f"{MANIFEST_NAME} (lost or deleted); {REPAIR_HINT}."
            )
        others = [p.name for p in self.folder.iterdir() if p.name != LOCK_NAME]
        if others:
            raise ShardError(
                f"output_dir {self.folder} is not empty ({', '.join(sorted(others)[:3])} ...) "
                f"and holds no {MANIFEST_NAME}; use a new output_dir."
            )

    def _resume(self, manifest: dict[str, Any]) -> None:
        old_plan = {
            k: v for k, v in manifest.items() if k not in ("shards", "fingerprint", "complete")
        }
        differences = plan_differences(old_plan, self.plan, labels=self.labels)
        if differences:
            raise ShardError(
                f"output_dir {self.folder} already holds a shard set made with different settings ("
                + "; ".join(differences)
                + "). Use a new output_dir (or delete this one to start over)."
            )
        for entry in manifest["shards"]:
            problem = shard_problem(self.folder, entry)
            if problem:
                print(f"{self.rerun_hint}: {problem}; it will be rewritten.")
                continue
            self._shards[shard_index(entry["file"])] = entry

    def _repair(self) -> None:
        self._shards = verified_shards(
            self.folder, stable_plan(self.plan), labels=self.labels, rerun_hint=self.rerun_hint
        )
        print(
            f"{self.rerun_hint}: rebuilt {self.folder / MANIFEST_NAME} from "
            f"{len(self._shards)} verified shards of {self.plan['num_shards']}."
        )

    def write_shard(self, index: int, table: pa.Table) -> None:
        """Write shard `index` atomically (carrying the plan and its seal), then record it."""
        settings = {PLAN_KEY: self._shard_plan, INDEX_KEY: str(index)}
        sha256 = write_parquet_atomic(self.folder / shard_name(index), table, settings)
        entry = {"file": shard_name(index), "num_rows": table.num_rows, "sha256": sha256}
        with self._mutex:
            self._shards[index] = entry
            self._write_manifest()

    @property
    def complete(self) -> bool:
        return len(self._shards) == self.plan["num_shards"]

    def manifest(self) -> dict[str, Any]:
        shards = [self._shards[index] for index in sorted(self._shards)]
        return {
            **self.plan,
            "shards": shards,
            "fingerprint": shard_set_fingerprint(shards),
            "complete": self.complete,
        }

    def _write_manifest(self) -> None:
        atomic_write_bytes(self.folder / MANIFEST_NAME, manifest_bytes(self.manifest()))

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


def shard_index(file_name: str) -> int:
    return int(file_name[len("shard-") : -len(".parquet")])


def verified_shards(
    folder: Path, shard_plan: dict[str, Any], *, labels: dict[str, str], rerun_hint: str
) -> dict[int, dict[str, Any]]:
    """`{index: manifest entry}` of the shards in `folder` whose seal verifies and that carry
    `shard_plan` (see `stable_plan`). A shard of other settings is refused
    (`ShardError`): mixing it in would change the set silently. Corrupt or foreign files are
    left out (printed), so the job writes them again."""
    shards = {}
    for path in sorted(folder.glob("shard-*.parquet")):
        if not re.fullmatch(r"shard-\d+\.parquet", path.name):
            continue
        settings, num_rows, problem = read_sealed_parquet(path, (PLAN_KEY, INDEX_KEY))
        index = shard_index(path.name)
        if settings is not None and settings[INDEX_KEY] != str(index):
            problem = f"holds shard {settings[INDEX_KEY]}, not shard {index}"
        if problem or settings is None:
            print(f"{rerun_hint}: {path.name} {problem}; it will be rewritten.")
            continue
        differences = plan_differences(
            json.loads(settings[PLAN_KEY]), shard_plan, labels=labels, where="in the shard"
        )
        if differences:
            raise ShardError(
                f"{path} was made with different settings (" + "; ".join(differences) + "); "
                f"move it out of {folder} or use a new output_dir."
            )
        shards[index] = {"file": path.name, "num_rows": num_rows, "sha256": file_sha256(path)}
    return shards
