"""Shard sets on tiny hand-made rows: manifest and atomic writes, resume, refusal of other
settings, corrupt/missing/incomplete detection, sealed shards and `--repair` of a lost or corrupt
manifest, and rows <-> RolloutBatch/TeacherScores."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from datasets import load_dataset

from opd.shard_seal import read_sealed_parquet, sealed_parquet
from opd.shards import (
    INDEX_KEY,
    MANIFEST_NAME,
    PLAN_KEY,
    ShardError,
    ShardSetWriter,
    file_sha256,
    load_shard_set,
    manifest_bytes,
    read_manifest,
    shard_name,
    shard_set_fingerprint,
)
from opd.teacher.shard_rows import (
    list_lengths,
    rollout_batch_from_table,
    teacher_columns,
    teacher_scores_from_table,
)
from opd.types import TeacherScores

HINT = "opd teacher precompute"
TOP_K = 2


def _rows(lo: int, hi: int) -> pa.Table:
    """Teacher-score rows lo..hi-1: row r has r % 3 + 1 completion tokens and a privileged
    teacher prompt on odd rows."""
    lengths = [r % 3 + 1 for r in range(lo, hi)]
    completion = [[10 + r + t for t in range(r % 3 + 1)] for r in range(lo, hi)]
    return pa.table(
        {
            "prompt_index": pa.array([r // 2 for r in range(lo, hi)], pa.int64()),
            "sample_index": pa.array([r % 2 for r in range(lo, hi)], pa.int64()),
            "prompt_ids": pa.array([[1, r] for r in range(lo, hi)], pa.list_(pa.int32())),
            "teacher_prompt_ids": pa.array(
                [[1, r] if r % 2 == 0 else [7, 7, r] for r in range(lo, hi)], pa.list_(pa.int32())
            ),
            "completion_ids": pa.array(completion, pa.list_(pa.int32())),
            "sampler_logprobs": pa.array(
                [[-0.5 * (t + 1) for t in range(n)] for n in lengths], pa.list_(pa.float32())
            ),
            "stop_reason": pa.array(["stop" if n < 3 else "length" for n in lengths]),
            "answer": pa.array([str(r) for r in range(lo, hi)]),
            "teacher_logprobs": pa.array(
                [[-0.25 * (r + t) for t in range(r % 3 + 1)] for r in range(lo, hi)],
                pa.list_(pa.float32()),
            ),
            "teacher_topk_ids": pa.array(
                [[[t, t + 1] for t in range(n)] for n in lengths], pa.list_(pa.list_(pa.int32()))
            ),
            "teacher_topk_logprobs": pa.array(
                [[[-0.1, -float("inf")] for _ in range(n)] for n in lengths],
                pa.list_(pa.list_(pa.float32())),
            ),
        }
    )


def _plan(top_k: int = TOP_K) -> dict:
    teacher = {"model": "t", "tokenizer": None, "temperature": 1.0, "top_k": top_k, "mode": "local"}
    rollouts = {"path": "/somewhere", "fingerprint": "abc"}
    return dict(kind="teacher_scores", num_rows=7, num_shards=3, shard_size=3, teacher=teacher,
                rollouts=rollouts)  # fmt: skip


def _write(folder, shards, plan=None) -> ShardSetWriter:
    writer = ShardSetWriter(folder, plan or _plan(), rerun_hint=HINT)
    writer.start()
    for index in shards:
        writer.write_shard(index, _rows(3 * index, min(3 * index + 3, 7)))
    writer.close()
    return writer


def test_round_trip_manifest_and_rows(tmp_path):
    _write(tmp_path, [0, 1, 2])
    manifest = read_manifest(tmp_path, kind="teacher_scores")
    assert manifest["complete"] and [s["file"] for s in manifest["shards"]] == [
        shard_name(i) for i in range(3)
    ]
    assert [s["num_rows"] for s in manifest["shards"]] == [3, 3, 1]
    for entry in manifest["shards"]:
        assert entry["sha256"] == file_sha256(tmp_path / entry["file"])
    assert manifest["fingerprint"] == shard_set_fingerprint(manifest["shards"])
    assert manifest["teacher"]["top_k"] == TOP_K and manifest["format"] == "opd-shards"
    assert not list(tmp_path.glob("*.tmp-*"))

    _, dataset = load_shard_set(tmp_path, kind="teacher_scores", rerun_hint=HINT)
    expected = _rows(0, 7).to_pylist()
    assert dataset.to_list() == expected  # shard order, values and -inf padding kept
    assert dataset.features["completion_ids"].feature.dtype == "int32"
    alone = load_dataset("parquet", data_files=str(tmp_path / shard_name(1)), split="train")
    assert alone.to_list() == expected[3:6]


def test_resumed_set_is_byte_identical(tmp_path):
    _write(tmp_path / "straight", [0, 1, 2])
    crashed = tmp_path / "crashed"
    _write(crashed, [2, 0])  # a worker finished shard 2 first, then the job died
    partial = read_manifest(crashed)
    assert not partial["complete"] and [s["file"] for s in partial["shards"]] == [
        shard_name(0),
        shard_name(2),
    ]
    (crashed / f"{shard_name(1)}.tmp-12345").write_bytes(b"half a shard")  # killed mid-write
    writer = ShardSetWriter(crashed, _plan(), rerun_hint=HINT)
    assert writer.start() == {0, 2}
    assert not list(crashed.glob("*.tmp-*"))
    writer.write_shard(1, _rows(3, 6))
    writer.close()
    for name in [MANIFEST_NAME] + [shard_name(i) for i in range(3)]:
        assert (crashed / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()


def test_other_settings_are_refused(tmp_path):
    _write(tmp_path, [0])
    other = _plan(top_k=4)
    other["rollouts"]["path"] = "/moved"  # the same data elsewhere is not a difference
    with pytest.raises(ShardError, match=r"teacher\.top_k: 2 in the folder vs 4 now") as error:
        ShardSetWriter(tmp_path, other, rerun_hint=HINT).start()
    assert "new output_dir" in str(error.value) and "rollouts.path" not in str(error.value)


def test_non_empty_folder_without_manifest_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ShardError, match="not empty"):
        ShardSetWriter(tmp_path, _plan(), rerun_hint=HINT).start()


def test_second_writer_is_locked_out(tmp_path):
    first = ShardSetWriter(tmp_path, _plan(), rerun_hint=HINT)
    first.start()
    with pytest.raises(ShardError, match="another job"):
        ShardSetWriter(tmp_path, _plan(), rerun_hint=HINT).start()
    first.close()


def test_corrupt_missing_and_incomplete_sets(tmp_path, capsys):
    _write(tmp_path, [0, 1, 2])
    shard = tmp_path / shard_name(1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-00001\.parquet is corrupt"):
        load_shard_set(tmp_path, kind="teacher_scores", rerun_hint=HINT)
    writer = ShardSetWriter(tmp_path, _plan(), rerun_hint=HINT)
    assert writer.start() == {0, 2}  # a rerun rewrites the corrupt shard
    writer.close()
    assert "shard-00001.parquet is corrupt" in capsys.readouterr().out
    with pytest.raises(ShardError, match="did not finish: 2 of 3 shards"):
        load_shard_set(tmp_path, kind="teacher_scores", rerun_hint=HINT)

    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    manifest["shards"].append({"file": shard_name(1), "num_rows": 3, "sha256": "0" * 64})
    manifest["complete"] = True
    (tmp_path / MANIFEST_NAME).write_bytes(manifest_bytes(manifest))
    shard.unlink()
    with pytest.raises(ShardError, match=r"shard-00001\.parquet is listed .* but missing"):
        load_shard_set(tmp_path, kind="teacher_scores", rerun_hint=HINT)
    with pytest.raises(ShardError, match="holds 'teacher_scores' shards, expected 'rollouts'"):
        read_manifest(tmp_path, kind="rollouts")


def _flip_row_group_byte(path) -> None:
    """Flip a byte of the first row group (right after the leading `PAR1`), not of the footer."""
    data = bytearray(path.read_bytes())
    data[8] ^= 0xFF
    path.write_bytes(bytes(data))


def test_sealed_parquet_verifies_itself(tmp_path):
    settings = {PLAN_KEY: '{"top_k": 2}', INDEX_KEY: "0"}
    path = tmp_path / "sealed.parquet"
    path.write_bytes(sealed_parquet(_rows(0, 3), settings))
    assert read_sealed_parquet(path, (PLAN_KEY, INDEX_KEY)) == (settings, 3, None)
    assert load_dataset("parquet", data_files=str(path), split="train").to_list() == (
        _rows(0, 3).to_pylist()
    )  # still a plain parquet file
    _flip_row_group_byte(path)
    _, _, problem = read_sealed_parquet(path, (PLAN_KEY, INDEX_KEY))
    assert problem == "is corrupt: its rows or settings do not match its seal"

    forged = {PLAN_KEY: '{"top_k": 4}', INDEX_KEY: "0"}  # other settings, same rows and seal
    sealed = sealed_parquet(_rows(0, 3), settings)
    path.write_bytes(sealed.replace(settings[PLAN_KEY].encode(), forged[PLAN_KEY].encode()))
    assert read_sealed_parquet(path, (PLAN_KEY, INDEX_KEY))[2] == (
        "is corrupt: its rows or settings do not match its seal"
    )
    path.write_bytes(b"garbage")
    assert read_sealed_parquet(path, (PLAN_KEY,))[2] == "is not a parquet file"


def test_shards_carry_the_plan_but_not_relocatable_keys(tmp_path):
    _write(tmp_path / "here", [0])
    moved = _plan()
    moved["rollouts"]["path"] = "/elsewhere"
    _write(tmp_path / "there", [0], plan=moved)
    here, there = (tmp_path / "here" / shard_name(0), tmp_path / "there" / shard_name(0))
    assert here.read_bytes() == there.read_bytes()  # the input moved: no byte changed
    settings, num_rows, problem = read_sealed_parquet(here, (PLAN_KEY, INDEX_KEY))
    assert problem is None and num_rows == 3 and settings[INDEX_KEY] == "0"
    carried = json.loads(settings[PLAN_KEY])
    assert carried["teacher"]["top_k"] == TOP_K and "path" not in carried["rollouts"]


def test_lost_manifest_needs_repair_which_rebuilds_it(tmp_path, capsys):
    _write(tmp_path, [0, 1, 2])
    original = (tmp_path / MANIFEST_NAME).read_bytes()
    (tmp_path / MANIFEST_NAME).unlink()
    with pytest.raises(ShardError) as error:
        ShardSetWriter(tmp_path, _plan(), rerun_hint=HINT).start()
    assert str(error.value) == (
        f"output_dir {tmp_path} holds 3 shard files but no {MANIFEST_NAME} (lost or deleted); "
        "rerun the same command with --repair to rebuild it from the shards that verify."
    )
    writer = ShardSetWriter(tmp_path, _plan(), rerun_hint=HINT)
    assert writer.start(repair=True) == {0, 1, 2}
    writer.close()
    assert (tmp_path / MANIFEST_NAME).read_bytes() == original
    assert "rebuilt" in capsys.readouterr().out

    (tmp_path / MANIFEST_NAME).write_text("{ half a manifest")
    with pytest.raises(ShardError, match=r"is not valid JSON .*; rerun .* with --repair"):
        ShardSetWriter(tmp_path, _plan(), rerun_hint=HINT).start()


def test_repair_drops_corrupt_shards_and_refuses_other_settings(tmp_path, capsys):
    _write(tmp_path / "straight", [0, 1, 2])
    folder = tmp_path / "damaged"
    _write(folder, [0, 1, 2])
    (folder / MANIFEST_NAME).unlink()
    _flip_row_group_byte(folder / shard_name(1))
    writer = ShardSetWriter(folder, _plan(), rerun_hint=HINT)
    assert writer.start(repair=True) == {0, 2}
    assert "shard-00001.parquet is corrupt" in capsys.readouterr().out
    writer.write_shard(1, _rows(3, 6))  # what the job does next: score the missing shard
    writer.close()
    for name in [MANIFEST_NAME] + [shard_name(i) for i in range(3)]:
        assert (folder / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()

    _write(tmp_path / "other", [2], plan=_plan(top_k=1))
    (folder / shard_name(2)).write_bytes((tmp_path / "other" / shard_name(2)).read_bytes())
    labels = {"teacher.top_k": "teacher_top_k"}
    with pytest.raises(ShardError) as error:
        ShardSetWriter(folder, _plan(), rerun_hint=HINT, labels=labels).start(repair=True)
    assert str(error.value) == (
        f"{folder / shard_name(2)} was made with different settings (teacher_top_k: 1 in the "
        f"shard vs 2 now); move it out of {folder} or use a new output_dir."
    )


def test_refusal_names_the_argument_of_a_labelled_key(tmp_path):
    _write(tmp_path, [0])
    labels = {"teacher.top_k": "teacher_top_k"}
    with pytest.raises(ShardError, match=r"\(teacher_top_k: 2 in the folder vs 4 now\)"):
        ShardSetWriter(tmp_path, _plan(top_k=4), rerun_hint=HINT, labels=labels).start()


def test_rows_to_batch_and_scores_and_back():
    table = _rows(0, 5)
    batch = rollout_batch_from_table(table)
    assert batch.completion_ids_BT.tolist() == [[10, 0, 0], [11, 12, 0], [12, 13, 14], [13, 0, 0],
                                                [14, 15, 0]]  # fmt: skip
    assert batch.completion_mask_BT.sum(1).tolist() == [1, 2, 3, 1, 2]
    assert batch.teacher_prompt_ids[1] == [7, 7, 1] and batch.prompt_ids[1] == [1, 1]
    assert batch.sampler_logprobs_BT[2].tolist() == [-0.5, -1.0, -1.5]
    assert batch.stop_reason_B == ["stop", "stop", "length", "stop", "stop"]

    scores = teacher_scores_from_table(table, top_k=TOP_K, teacher_id="t", temperature=1.0)
    assert scores.sampled_logprobs_BT[2].tolist() == [-0.5, -0.75, -1.0]
    assert scores.sampled_logprobs_BT[0, 1:].tolist() == [0.0, 0.0]
    assert scores.topk_ids_BTK[1].tolist() == [[0, 1], [1, 2], [0, 0]]
    assert scores.topk_logprobs_BTK[1, 2].tolist() == [-float("inf")] * 2  # padding position
    top1 = teacher_scores_from_table(table, top_k=1, teacher_id="t", temperature=1.0)
    assert torch.equal(top1.topk_ids_BTK, scores.topk_ids_BTK[..., :1])

    columns = teacher_columns(scores, list_lengths(table["completion_ids"]), TOP_K)
    for name, column in columns.items():
        assert column.equals(table[name].combine_chunks()), name


def test_rows_without_sampler_logprobs_or_privileged_prompt():
    table = _rows(0, 2)
    table = table.set_column(
        table.schema.get_field_index("sampler_logprobs"),
        "sampler_logprobs",
        pa.array([None, None], pa.list_(pa.float32())),
    )
    table = table.set_column(
        table.schema.get_field_index("teacher_prompt_ids"),
        "teacher_prompt_ids",
        table["prompt_ids"],
    )
    batch = rollout_batch_from_table(table)
    assert batch.sampler_logprobs_BT is None and batch.teacher_prompt_ids is None


def test_teacher_columns_of_real_scores_types():
    scores = TeacherScores(
        sampled_logprobs_BT=torch.tensor([[-1.0, -2.0], [-3.0, 0.0]]),
        completion_mask_BT=torch.tensor([[1, 1], [1, 0]]),
        topk_ids_BTK=torch.tensor([[[5], [6]], [[7], [0]]]),
        topk_logprobs_BTK=torch.tensor([[[-0.5], [-0.6]], [[-0.7], [-np.inf]]]),
    )
    columns = teacher_columns(scores, np.array([2, 1]), 1)
    assert columns["teacher_logprobs"].to_pylist() == [[-1.0, -2.0], [-3.0]]
    assert columns["teacher_topk_ids"].type == pa.list_(pa.list_(pa.int32()))
    assert columns["teacher_topk_ids"].to_pylist() == [[[5], [6]], [[7]]]
