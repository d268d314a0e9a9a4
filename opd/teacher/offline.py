"""`OfflineTeacher`: the `TeacherScorer` of offline OPD, reading shards of `opd teacher precompute`.

No teacher runs during training (Lightning OPD, METHODS.md section 6). The shards hold the fixed
rollouts and the teacher's scores of them; the trainer iterates over the stored rollouts:

    teacher = OfflineTeacher(scores_dir, expected_model="Qwen/Qwen3-8B", top_k=16)
    teacher.check_student_tokenizer(student_tokenizer)
    for rows in teacher.grouped_rows():               # one prompt's samples, in sample order
        batch, scores = teacher.batch_for_rows(rows)  # right-padded, stored sampler logprobs

`score(batch, top_k)` also works as for any teacher: it looks each row up by (teacher context
ids, completion ids up to the last unmasked token) and fails, naming the row, when it is not in
the shards. The set must be complete and made with the expected teacher, at least the asked
top-k and the same temperature; anything else is refused with a `ConfigError` naming the field.

A set precomputed with `--store_hidden_states` opens as an `OfflineHiddenStateTeacher`: the same
reader that is also a `FullDistributionTeacher` (the stored output head, checked against the
manifest's sha256, and the stored hidden states), so the full-vocabulary methods train offline.
`OfflineTeacher(...)` picks the class from the manifest; a set without hidden states is never a
`FullDistributionTeacher`, and asking it for hidden states names the precompute flag to rerun.

Test: `pytest tests/integration/test_rollout_precompute.py -k offline
tests/integration/test_offline_hidden.py`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from opd.arguments import ConfigError
from opd.models import served_model_name
from opd.shards import OUTPUT_HEAD_NAME, load_shard_set, read_manifest
from opd.teacher.consistency import compare_fingerprints, tokenizer_fingerprint
from opd.teacher.shard_rows import (
    HIDDEN_COLUMN,
    hidden_states_from_table,
    list_lengths,
    rollout_batch_from_table,
    sequence_scores_from_table,
    teacher_scores_from_table,
)
from opd.teacher.wire import ScoreRequest, SequenceScores, score_batch_with, score_batch_with_extras
from opd.types import RolloutBatch, TeacherScores

PRECOMPUTE = "opd teacher precompute"


def stores_hidden_states(manifest: dict[str, Any]) -> bool:
    return bool((manifest.get("hidden") or {}).get("stored"))


def missing_hidden_states(shards_dir: str | Path) -> str:
    """The ConfigError message for a method that needs the teacher's full distribution from
    shards that hold no hidden states (e.g. for `check_method_capabilities`)."""
    return (
        "the full-vocabulary teacher distribution (opd_baseline: full, opd_divergence_support: "
        "full, or TIP's divergence without teacher_top_k) needs the teacher's hidden states, "
        f"which the shards in {shards_dir} do not hold: rerun `{PRECOMPUTE} ... "
        "--store_hidden_states true` into a new output_dir, or use the top-k forms "
        "(opd_baseline: topk / opd_divergence_support: topk) with teacher_top_k > 0."
    )


class OfflineTeacher:
    """Teacher scores precomputed into a complete teacher-score shard set."""

    def __new__(cls, shards_dir: str | Path | None = None, **kwargs):
        """An `OfflineHiddenStateTeacher` when the set stores hidden states (its manifest says
        so), else a plain `OfflineTeacher`. (None: unpickling and copying, which pass no
        arguments.)"""
        if cls is OfflineTeacher and shards_dir is not None:
            manifest = read_manifest(shards_dir, kind="teacher_scores")
            if stores_hidden_states(manifest):
                return object.__new__(OfflineHiddenStateTeacher)
        return super().__new__(cls)

    def __init__(
        self,
        shards_dir: str | Path,
        *,
        expected_model: str | None = None,
        top_k: int = 0,
        temperature: float = 1.0,
    ):
        self.shards_dir = Path(shards_dir)
        self.manifest, self._dataset = load_shard_set(
            self.shards_dir, kind="teacher_scores", rerun_hint=PRECOMPUTE
        )
        recorded = self.manifest["teacher"]
        self.teacher_id: str = recorded["model"]
        self.temperature = float(recorded["temperature"])
        self.stored_top_k = int(recorded["top_k"])
        check_recorded_teacher(self.shards_dir, recorded, expected_model, top_k, temperature)
        self._table: pa.Table = self._dataset.with_format("arrow")[:]
        self._row_by_key: dict[bytes, int] | None = None

    def check_student_tokenizer(self, student_tokenizer) -> None:
        """The student must share the teacher's tokenizer and that of the student that sampled
        the rollouts (their ids are the training data), as far as the manifest records them."""
        student_print = tokenizer_fingerprint(student_tokenizer)
        source = f"shard manifest {self.shards_dir / 'manifest.json'}"
        recorded = self.manifest["teacher"].get("tokenizer")
        if self.cross_tokenizer:  # the teacher's tokenizer differs; the student's is recorded
            recorded = self.manifest["teacher"]["cross_tokenizer"]["student_tokenizer"]
            print(
                f"opd: cross-tokenizer mode is on: {self.shards_dir} holds span scores of the "
                f"teacher {self.teacher_id!r} (tokenizer "
                f"{self.manifest['teacher']['cross_tokenizer']['teacher_tokenizer']!r}) on the "
                "student's positions."
            )
        if recorded is not None:
            compare_fingerprints(
                student_print, recorded, teacher_name=self.teacher_id, source=source
            )
        sampler = self.manifest["rollouts"].get("student_tokenizer")
        if sampler is not None:
            compare_fingerprints(
                student_print,
                sampler,
                teacher_name=self.teacher_id,
                source=f"{source}, tokenizer of the student that sampled the rollouts",
            )

    @property
    def cross_tokenizer(self) -> bool:
        """The set was precomputed by a teacher of another tokenizer (span scores)."""
        return bool((self.manifest["teacher"].get("cross_tokenizer") or {}).get("enabled"))

    def check_cross_tokenizer_mode(self, enabled: bool) -> None:
        """The run's `teacher_cross_tokenizer` must match how the set was precomputed."""
        if enabled != self.cross_tokenizer:
            made = "with" if self.cross_tokenizer else "without"
            raise ConfigError(
                f"{self.shards_dir} was precomputed {made} teacher_cross_tokenizer: set "
                f"teacher_cross_tokenizer: {str(self.cross_tokenizer).lower()} to train on it."
            )

    def teacher_tokenizer(self):
        """The tokenizer the set's teacher re-tokenized with (the divergence term's vocabulary
        map), as recorded: `teacher_tokenizer_name_or_path`, else the teacher model's."""
        from transformers import AutoTokenizer

        from opd.models import resolve_model_name

        recorded = self.manifest["teacher"]
        name = recorded["cross_tokenizer"].get("teacher_tokenizer") or recorded["model"]
        try:
            return AutoTokenizer.from_pretrained(resolve_model_name(name))
        except OSError as error:
            raise ConfigError(
                f"cannot load the teacher tokenizer {name!r} recorded in {self.shards_dir} "
                f"({error}); precompute with --teacher_tokenizer_name_or_path set to a path "
                "that training can load."
            ) from error

    # --------------------------------------------------------------------------------------------
    # What the trainer iterates over
    # --------------------------------------------------------------------------------------------

    def dataset(self):
        """The rows as a `datasets.Dataset` (rollout, pass-through and teacher columns)."""
        return self._dataset

    def __len__(self) -> int:
        return self._table.num_rows

    def grouped_rows(self) -> list[list[int]]:
        """Row indices per prompt_index (ascending), each group in sample_index order."""
        prompt_B = self._table["prompt_index"].to_numpy()
        sample_B = self._table["sample_index"].to_numpy()
        order = np.lexsort((sample_B, prompt_B))
        boundaries = np.flatnonzero(np.diff(prompt_B[order])) + 1
        return [group.tolist() for group in np.split(order, boundaries)]

    def rows_for_prompt_index(self, prompt_index: int) -> list[int]:
        prompt_B = self._table["prompt_index"].to_numpy()
        rows = np.flatnonzero(prompt_B == prompt_index)
        sample_B = self._table["sample_index"].to_numpy()[rows]
        return rows[np.argsort(sample_B, kind="stable")].tolist()

    def batch_for_rows(
        self, rows: list[int], top_k: int | None = None
    ) -> tuple[RolloutBatch, TeacherScores]:
        """Stored rollouts (right-padded, with the sampler's logprobs) and their teacher scores.

        `top_k` defaults to the stored K and may be smaller (the first `top_k` of each list).
        """
        top_k = self.stored_top_k if top_k is None else self._check_top_k(top_k)
        table = self._table.take(pa.array(rows, pa.int64()))
        scores = teacher_scores_from_table(
            table, top_k=top_k, teacher_id=self.teacher_id, temperature=self.temperature
        )
        return rollout_batch_from_table(table), scores

    # --------------------------------------------------------------------------------------------
    # TeacherScorer
    # --------------------------------------------------------------------------------------------

    def score(self, batch: RolloutBatch, top_k: int = 0) -> TeacherScores:
        self._check_top_k(top_k)
        return score_batch_with(self, batch, top_k=top_k)

    def score_sequences(self, request: ScoreRequest) -> SequenceScores:
        """The stored scores of each (teacher context, completion) of `request` (with the stored
        hidden states when it asks for them)."""
        if request.hidden_dtype and HIDDEN_COLUMN not in self._table.column_names:
            raise ConfigError(missing_hidden_states(self.shards_dir))
        pairs = zip(request.contexts(), request.completions(), strict=True)
        rows = [self._find(context, completion, i) for i, (context, completion) in enumerate(pairs)]
        table = self._table.take(pa.array(rows, pa.int64()))
        return sequence_scores_from_table(
            table, top_k=request.top_k, hidden_dtype=request.hidden_dtype
        )

    def _check_top_k(self, top_k: int) -> int:
        if top_k > self.stored_top_k:
            raise ConfigError(
                f"teacher_top_k={top_k} but {self.shards_dir} stores the teacher's top "
                f"{self.stored_top_k}; lower teacher_top_k or rerun `{PRECOMPUTE}` with "
                f"--teacher_top_k {top_k} into a new output_dir."
            )
        return top_k

    def _find(self, context: list[int], completion: list[int], row: int) -> int:
        if self._row_by_key is None:
            self._row_by_key = self._build_index()
        key = row_key(np.asarray(context, np.int32), np.asarray(completion, np.int32))
        stored = self._row_by_key.get(key)
        if stored is None:
            raise ConfigError(
                f"row {row} of the batch ({len(context)} context tokens, {len(completion)} "
                f"completion tokens) is not in the teacher shards at {self.shards_dir}. Offline "
                "OPD trains on the rollouts stored there (OfflineTeacher.grouped_rows / "
                f"batch_for_rows); to score other rollouts, run `{PRECOMPUTE}` on them."
            )
        return stored

    def _build_index(self) -> dict[bytes, int]:
        """key(teacher context, completion) -> first row holding it. Identical samples (same
        context and completion) have identical teacher scores, so any of them will do."""
        contexts = _ragged_numpy(self._table["teacher_prompt_ids"])
        completions = _ragged_numpy(self._table["completion_ids"])
        index: dict[bytes, int] = {}
        for row, (context, completion) in enumerate(zip(contexts, completions, strict=True)):
            index.setdefault(row_key(context, completion), row)
        return index


class OfflineHiddenStateTeacher(OfflineTeacher):
    """An `OfflineTeacher` over shards that store the teacher's hidden states: also a
    `FullDistributionTeacher` (`output_weight` from `output_head.safetensors`,
    `completion_hidden_states` from the `teacher_hidden_states` column)."""

    def __init__(self, shards_dir: str | Path, **kwargs):
        super().__init__(shards_dir, **kwargs)
        hidden = self.manifest["hidden"]
        self.hidden_dtype: str = hidden["dtype"]
        self.hidden_size = int(hidden["hidden_size"])
        self._head_VH = load_output_head(self.shards_dir, hidden["output_head"])
        # The rows of the last `batch_for_rows` and their completion ids: the batch the trainer
        # asks hidden states for next (Lightning OPD replays exactly those rows).
        self._selected: tuple[list[int], torch.Tensor] | None = None

    @property
    def output_weight(self) -> torch.Tensor:
        """The teacher's lm_head `[V, H]` as stored (its precompute dtype, on the CPU)."""
        return self._head_VH

    def batch_for_rows(
        self, rows: list[int], top_k: int | None = None
    ) -> tuple[RolloutBatch, TeacherScores]:
        batch, scores = super().batch_for_rows(rows, top_k)
        self._selected = (list(rows), batch.completion_ids_BT)
        return batch, scores

    @torch.no_grad()
    def completion_hidden_states(self, batch: RolloutBatch) -> torch.Tensor:
        """`[B, T, H]` the stored hidden states of `batch`'s rows (0 where masked), in the head's
        dtype: the rows of the last `batch_for_rows` when `batch` holds their completions (the
        trainer's batch, padded or cut to its own width), else each row looked up by its teacher
        context and completion, as `score` does."""
        rows = self._selected_rows(batch)
        if rows is None:
            _, extras = score_batch_with_extras(
                self.score_sequences, batch, top_k=0, temperature=self.temperature,
                teacher_id=self.teacher_id, hidden_dtype=self.hidden_dtype,
                hidden_size=self.hidden_size,
            )  # fmt: skip
            return extras["hidden_BTH"].to(self._head_VH.dtype)
        table = self._table.take(pa.array(rows, pa.int64()))
        stored_BTH = hidden_states_from_table(table, padded=True)
        mask_BT = batch.completion_mask_BT.cpu().bool()
        hidden_BTH = stored_BTH.new_zeros((*mask_BT.shape, self.hidden_size))
        width = min(stored_BTH.shape[1], mask_BT.shape[1])
        hidden_BTH[:, :width] = stored_BTH[:, :width]
        hidden_BTH = torch.where(mask_BT[..., None], hidden_BTH, 0)
        return hidden_BTH.to(self._head_VH.dtype)

    def _selected_rows(self, batch: RolloutBatch) -> list[int] | None:
        """The last selected rows if `batch`'s unmasked tokens are their stored completions."""
        if self._selected is None:
            return None
        rows, stored_ids_BT = self._selected
        ids_BT, mask_BT = batch.completion_ids_BT.cpu(), batch.completion_mask_BT.cpu().bool()
        if ids_BT.shape[0] != len(rows):
            return None
        width = min(ids_BT.shape[1], stored_ids_BT.shape[1])
        if mask_BT[:, width:].any():  # tokens past the stored completions: other rows
            return None
        keep_BT = mask_BT[:, :width]
        same = torch.equal(ids_BT[:, :width][keep_BT], stored_ids_BT[:, :width][keep_BT])
        return rows if same else None


def load_output_head(folder: Path, recorded: dict[str, Any]) -> torch.Tensor:
    """The set's stored output head, refused unless it is the one its manifest records."""
    from opd.teacher.output_head import decode_head

    path = folder / OUTPUT_HEAD_NAME
    fix = f"rerun `{PRECOMPUTE}` with the same arguments into {folder} to write it again"
    if not path.is_file():
        raise ConfigError(f"{path} is missing (the shards store hidden states); {fix}.")
    try:
        return decode_head(path.read_bytes(), recorded, source=str(path))
    except ConfigError as error:
        raise ConfigError(
            f"{path} is not the output head that {folder / 'manifest.json'} records "
            f"(sha256 {recorded['sha256'][:12]}...): it is corrupt or from another teacher; {fix}."
        ) from error


def row_key(context: np.ndarray, completion: np.ndarray) -> bytes:
    """Hash of the int32 context and completion ids (the lengths keep the split unambiguous)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray([len(context), len(completion)], np.int64).tobytes())
    digest.update(context.tobytes())
    digest.update(completion.tobytes())
    return digest.digest()


def _ragged_numpy(column: pa.ChunkedArray) -> list[np.ndarray]:
    lengths = list_lengths(column)
    values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.int32)
    return np.split(values, np.cumsum(lengths)[:-1])


def check_recorded_teacher(
    folder: Path, recorded: dict[str, Any], expected_model, top_k: int, temperature: float
) -> None:
    """Refuse shards that another teacher, a smaller top-k or another temperature produced."""
    where = f"the teacher scores in {folder}"
    if expected_model is not None and not same_model(expected_model, recorded["model"]):
        raise ConfigError(
            f"teacher_model_name_or_path={expected_model!r} but {where} come from "
            f"{recorded['model']!r}; point teacher_shards at that teacher's scores or rerun "
            f"`{PRECOMPUTE}` with this teacher."
        )
    if top_k > int(recorded["top_k"]):
        raise ConfigError(
            f"teacher_top_k={top_k} but {where} hold the top {recorded['top_k']}; lower "
            f"teacher_top_k or rerun `{PRECOMPUTE}` with --teacher_top_k {top_k}."
        )
    if not np.isclose(float(recorded["temperature"]), float(temperature), rtol=0, atol=1e-9):
        raise ConfigError(
            f"teacher_temperature={temperature} but {where} were computed at temperature "
            f"{recorded['temperature']}; use that temperature or rerun `{PRECOMPUTE}`."
        )


def same_model(expected: str, recorded: str) -> bool:
    """Equal names, two spellings of the same local folder, or a local folder and the name
    `opd teacher serve` answers with for it (servers name a model, never show its path)."""
    if recorded in (expected, served_model_name(expected)):
        return True
    return Path(expected).exists() and Path(expected).resolve() == Path(recorded).resolve()
