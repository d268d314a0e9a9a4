"""Hidden states in precomputed teacher shards: `opd teacher precompute --store_hidden_states`
and the offline teacher that reads them (Lightning OPD with the teacher's full distribution).

Real parts: the tiny local teacher (and `opd teacher serve`'s own app on loopback for the server
teacher), the real CLI for precompute and for a 2-step `opd distill --teacher_mode offline` with
`opd_divergence_support: full` and `opd_baseline: full`. The rollouts are a small jsonl of text
pairs with prompt and sample indices (no vLLM: the stored rollouts are what is replayed).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.cli import command_runner, main
from opd.commands.precompute import PrecomputeArguments
from opd.config import ConfigError
from opd.shards import MANIFEST_NAME, OUTPUT_HEAD_NAME, read_manifest, shard_name
from opd.teacher.local import LocalTeacher
from opd.teacher.offline import OfflineHiddenStateTeacher, OfflineTeacher
from opd.teacher.output_head import head_digest, head_info
from opd.teacher.protocol import FullDistributionTeacher
from opd.teacher.shard_rows import HIDDEN_COLUMN, hidden_states_from_table
from opd.teacher.wire import score_batch_with_extras
from opd.types import RolloutBatch

NUM_PROMPTS, NUM_SAMPLES, SHARD_SIZE, TOP_K = 6, 2, 4, 4
NUM_SHARDS = -(-NUM_PROMPTS * NUM_SAMPLES // SHARD_SIZE)
HIDDEN_SIZE = 192  # the tiny teacher's (tests/conftest.py)

precompute_main = command_runner("teacher precompute")


@pytest.fixture(scope="module")
def rollout_rows(tmp_path_factory) -> Path:
    """Two completions (1 to 6 characters) per prompt, with their prompt and sample indices
    (and the answer, which `opd distill`'s default reward reads)."""
    rows = [
        {"prompt": f"{a}+{a % 4}=", "completion": "0123456789"[: 1 + (3 * a + s) % 6],
         "prompt_index": a, "sample_index": s, "answer": str(a + a % 4)}
        for a in range(NUM_PROMPTS) for s in range(NUM_SAMPLES)
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("rows") / "rollouts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _args(rows: Path, teacher: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--rollouts", str(rows), "--teacher_model_name_or_path", str(teacher),
            "--output_dir", str(output_dir), "--teacher_top_k", str(TOP_K),
            "--shard_size", str(SHARD_SIZE), "--teacher_batch_size", "3", *extra]  # fmt: skip


def _precomputed(tmp_path_factory, rows, teacher, name: str, *extra: str) -> Path:
    output_dir = tmp_path_factory.mktemp(name) / "scores"
    assert precompute_main(_args(rows, teacher, output_dir, *extra)) == 0
    return output_dir


@pytest.fixture(scope="module")
def hidden_fp32(tmp_path_factory, rollout_rows, tiny_teacher) -> Path:
    return _precomputed(
        tmp_path_factory, rollout_rows, tiny_teacher, "fp32", "--store_hidden_states", "true"
    )


@pytest.fixture(scope="module")
def hidden_bf16(tmp_path_factory, rollout_rows, tiny_teacher) -> Path:
    extra = ("--store_hidden_states", "true", "--teacher_hidden_dtype", "bfloat16")
    return _precomputed(tmp_path_factory, rollout_rows, tiny_teacher, "bf16", *extra)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, rollout_rows, tiny_teacher) -> Path:
    return _precomputed(tmp_path_factory, rollout_rows, tiny_teacher, "plain")


@pytest.fixture(scope="module")
def teacher_model(tiny_teacher):
    return AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32)


def _files(folder: Path) -> dict[str, bytes]:
    names = [MANIFEST_NAME, OUTPUT_HEAD_NAME] + [shard_name(i) for i in range(NUM_SHARDS)]
    return {name: (folder / name).read_bytes() for name in names if (folder / name).exists()}


def _stored_hidden(folder: Path) -> torch.Tensor:
    """Every shard's `teacher_hidden_states` as flat `[M, H]`, in shard order."""
    tables = [pq.read_table(folder / shard_name(i)) for i in range(NUM_SHARDS)]
    return torch.cat([hidden_states_from_table(table) for table in tables])


# ------------------------------------------------------------------------------------------------
# opd teacher precompute --store_hidden_states
# ------------------------------------------------------------------------------------------------


def test_stored_hidden_states_equal_the_local_teacher(hidden_fp32, teacher_model):
    manifest = read_manifest(hidden_fp32, kind="teacher_scores")
    head_VH = teacher_model.get_output_embeddings().weight.detach()
    hidden = manifest["hidden"]
    assert hidden == {
        "stored": True, "dtype": "float32", "hidden_size": HIDDEN_SIZE,
        "bytes_per_token": 4 * HIDDEN_SIZE,
        "row_bytes_per_token": 4 + 4 + 4 + 8 * TOP_K + 4 * HIDDEN_SIZE,
        "output_head": head_info(head_VH, head_digest(head_VH)),
    }  # fmt: skip
    per_token = pq.read_schema(hidden_fp32 / shard_name(0)).field(HIDDEN_COLUMN).type.value_type
    assert (per_token.list_size, per_token.value_type) == (HIDDEN_SIZE, pa.float32())

    offline = OfflineTeacher(hidden_fp32, top_k=TOP_K)
    assert isinstance(offline, OfflineHiddenStateTeacher)
    assert isinstance(offline, FullDistributionTeacher)
    assert torch.equal(offline.output_weight, head_VH)
    local = LocalTeacher(teacher_model, batch_size=16)
    rows = list(range(len(offline)))[::-1]  # every row, shards mixed in one batch
    batch, _ = offline.batch_for_rows(rows)
    expected_BTH = local.completion_hidden_states(batch)
    mask_BT = batch.completion_mask_BT.bool()
    got_BTH = offline.completion_hidden_states(batch)
    assert got_BTH.shape == expected_BTH.shape and got_BTH.dtype == torch.float32
    torch.testing.assert_close(got_BTH[mask_BT], expected_BTH[mask_BT], atol=1e-5, rtol=0)
    assert not got_BTH[~mask_BT].any()


def test_hidden_states_of_other_batches(hidden_fp32, teacher_model):
    """The trainer's batch is wider than the stored rows (TRL pads to its own width) and may
    mask tokens; a batch that is not the last selection is looked up row by row."""
    offline = OfflineTeacher(hidden_fp32, top_k=TOP_K)
    batch, _ = offline.batch_for_rows([5, 2, 9])
    width = batch.completion_ids_BT.shape[1]
    mask_BT = torch.cat([batch.completion_mask_BT, torch.zeros(3, 2, dtype=torch.long)], dim=1)
    mask_BT[1, 0] = 0  # a masked token inside a completion
    wider = RolloutBatch(
        prompt_ids=batch.prompt_ids,
        completion_ids_BT=torch.cat([batch.completion_ids_BT, torch.zeros(3, 2).long()], dim=1),
        completion_mask_BT=mask_BT,
    )
    expected_BTH = LocalTeacher(teacher_model).completion_hidden_states(wider)
    selected_BTH = offline.completion_hidden_states(wider)
    assert selected_BTH.shape == (3, width + 2, HIDDEN_SIZE)
    keep_BT = mask_BT.bool()
    torch.testing.assert_close(selected_BTH[keep_BT], expected_BTH[keep_BT], atol=1e-5, rtol=0)
    assert not selected_BTH[~keep_BT].any()

    offline.batch_for_rows([0, 1, 3])  # another selection: `wider` is looked up by its ids
    looked_up_BTH = offline.completion_hidden_states(wider)
    torch.testing.assert_close(looked_up_BTH, selected_BTH, atol=0, rtol=0)


def test_bfloat16_halves_the_hidden_bytes(hidden_fp32, hidden_bf16):
    fp32, bf16 = read_manifest(hidden_fp32)["hidden"], read_manifest(hidden_bf16)["hidden"]
    assert bf16["dtype"] == "bfloat16"
    assert bf16["bytes_per_token"] * 2 == fp32["bytes_per_token"] == 4 * HIDDEN_SIZE
    assert fp32["row_bytes_per_token"] - bf16["row_bytes_per_token"] == 2 * HIDDEN_SIZE
    assert bf16["output_head"] == fp32["output_head"]  # the head keeps the teacher's dtype
    for index in range(NUM_SHARDS):
        values = [
            pq.read_table(folder / shard_name(index))[HIDDEN_COLUMN].combine_chunks().flatten()
            for folder in (hidden_fp32, hidden_bf16)
        ]
        assert values[1].flatten().nbytes * 2 == values[0].flatten().nbytes
    # The same forwards, rounded once: bfloat16 storage is the float32 values rounded.
    stored_fp32, stored_bf16 = _stored_hidden(hidden_fp32), _stored_hidden(hidden_bf16)
    assert stored_bf16.dtype == torch.bfloat16
    assert torch.equal(stored_bf16, stored_fp32.to(torch.bfloat16))
    offline = OfflineTeacher(hidden_bf16)
    batch, _ = offline.batch_for_rows([0, 1])
    assert offline.completion_hidden_states(batch).dtype == offline.output_weight.dtype


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (("--store_hidden_states", "true", "--teacher_hidden_dtype", "bfloat16"),
         "teacher_hidden_dtype: 'float32' in the folder vs 'bfloat16' now"),
        ((), "store_hidden_states: True in the folder vs False now"),
    ],
)  # fmt: skip
def test_resume_with_other_hidden_settings_is_refused(
    hidden_fp32, rollout_rows, tiny_teacher, extra, expected, capsys
):
    before = _files(hidden_fp32)
    assert precompute_main(_args(rollout_rows, tiny_teacher, hidden_fp32, *extra)) == 2
    error = capsys.readouterr().err
    assert expected in error and "new output_dir" in error, error
    assert _files(hidden_fp32) == before


def test_resume_restores_shards_and_head_byte_identical(
    hidden_fp32, rollout_rows, tiny_teacher, tmp_path, capsys
):
    copy = tmp_path / "copy"
    shutil.copytree(hidden_fp32, copy)
    (copy / shard_name(NUM_SHARDS - 1)).unlink()
    (copy / OUTPUT_HEAD_NAME).unlink()
    extra = ("--store_hidden_states", "true")
    assert precompute_main(_args(rollout_rows, tiny_teacher, copy, *extra)) == 0
    assert f"({NUM_SHARDS - 1} already done)" in capsys.readouterr().out
    assert _files(copy) == _files(hidden_fp32) and len(_files(copy)) == NUM_SHARDS + 2


def test_precompute_through_a_server_in_hidden_state_mode(
    hidden_fp32, rollout_rows, tiny_teacher, tmp_path, serve_in_thread, monkeypatch
):
    """`--teacher_mode server`: the client asks `opd teacher serve` for hidden states and fetches
    the head once (cached under OPD_CACHE_DIR); the values are the local job's up to rounding."""
    from opd.commands.serve import ServeArguments, build_app, build_backend

    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "cache"))
    serve_args = ServeArguments(model=str(tiny_teacher), batch_size=3)
    output_dir = tmp_path / "served"
    with serve_in_thread(build_app(serve_args, build_backend(serve_args))) as url:
        args = _args(rollout_rows, tiny_teacher, output_dir, "--teacher_mode", "server",
                     "--teacher_urls", url, "--store_hidden_states", "true")  # fmt: skip
        assert precompute_main(args) == 0
    served, local = read_manifest(output_dir)["hidden"], read_manifest(hidden_fp32)["hidden"]
    assert served == local
    assert (output_dir / OUTPUT_HEAD_NAME).read_bytes() == (
        hidden_fp32 / OUTPUT_HEAD_NAME
    ).read_bytes()
    torch.testing.assert_close(
        _stored_hidden(output_dir), _stored_hidden(hidden_fp32), atol=1e-5, rtol=0
    )


def test_refusals_without_hidden_states(plain, hidden_fp32, tmp_path):
    offline = OfflineTeacher(plain, top_k=TOP_K)
    assert type(offline) is OfflineTeacher
    assert not isinstance(offline, FullDistributionTeacher)
    batch, _ = offline.batch_for_rows([0, 1])
    with pytest.raises(ConfigError, match=r"--store_hidden_states true` into a new output_dir"):
        score_batch_with_extras(
            offline.score_sequences, batch, top_k=0, temperature=1.0, teacher_id="t",
            hidden_dtype="float32", hidden_size=HIDDEN_SIZE,
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"a stock vLLM server does not return"):
        PrecomputeArguments(rollouts="r.jsonl", output_dir="out", teacher_mode="vllm",
                            teacher_urls=["http://127.0.0.1:9"], teacher_model_name_or_path="m",
                            store_hidden_states=True)  # fmt: skip

    damaged = tmp_path / "damaged"
    shutil.copytree(hidden_fp32, damaged)
    head = bytearray((damaged / OUTPUT_HEAD_NAME).read_bytes())
    head[-1] ^= 1  # one weight changes
    (damaged / OUTPUT_HEAD_NAME).write_bytes(bytes(head))
    with pytest.raises(ConfigError, match=r"is not the output head that .* records"):
        OfflineTeacher(damaged)
    (damaged / OUTPUT_HEAD_NAME).unlink()
    with pytest.raises(ConfigError, match=r"output_head.safetensors is missing .* rerun"):
        OfflineTeacher(damaged)


# ------------------------------------------------------------------------------------------------
# opd distill --teacher_mode offline with the full distribution
# ------------------------------------------------------------------------------------------------


def _distill_args(student: Path, teacher: Path, shards: Path, output_dir: Path) -> list[str]:
    return ["distill", "--model_name_or_path", str(student), "--teacher_mode", "offline",
            "--teacher_shards", str(shards), "--teacher_model_name_or_path", str(teacher),
            "--opd_divergence_support", "full", "--opd_baseline", "full",
            "--opd_divergence", "reverse_kl", "--opd_divergence_coef", "0.5",
            "--output_dir", str(output_dir), "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--num_generations", str(NUM_SAMPLES),
            "--max_completion_length", "8", "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--eval_before_after", "false",
            "--write_report", "false"]  # fmt: skip


def test_distill_offline_with_the_full_distribution(
    hidden_fp32, tiny_student, tiny_teacher, teacher_model, tmp_path, monkeypatch
):
    """2 steps train on the stored full teacher distribution. A spy (the real method, recorded)
    checks that the trainer's hidden states are the stored rows of its own batch."""
    calls = []
    stored_hidden_states = OfflineHiddenStateTeacher.completion_hidden_states

    def recorded(self, batch):
        hidden_BTH = stored_hidden_states(self, batch)
        calls.append((batch, hidden_BTH, self._selected_rows(batch) is not None))
        return hidden_BTH

    monkeypatch.setattr(OfflineHiddenStateTeacher, "completion_hidden_states", recorded)
    output_dir = tmp_path / "run"
    assert main(_distill_args(tiny_student, tiny_teacher, hidden_fp32, output_dir)) == 0
    results = json.loads((output_dir / "opd_results.json").read_text())
    steps = [entry for entry in results["log_history"] if "opd/divergence" in entry]
    assert [entry["step"] for entry in steps] == [1, 2]
    for entry in steps:
        # the reverse KL to the stored full teacher distribution: finite and positive (the
        # student and the teacher are different random models)
        assert 0 < entry["opd/divergence"] < math.inf
        assert math.isfinite(entry["loss"])
    assert (output_dir / "model.safetensors").exists()

    assert len(calls) == 2  # one generation batch per step
    local = LocalTeacher(teacher_model)
    for batch, hidden_BTH, selected in calls:
        assert selected  # the rows `OfflineRollouts` replayed, not a lookup
        mask_BT = batch.completion_mask_BT.bool()
        assert hidden_BTH.shape == (*mask_BT.shape, HIDDEN_SIZE) and mask_BT.sum() > 0
        expected_BTH = local.completion_hidden_states(batch)
        torch.testing.assert_close(hidden_BTH[mask_BT], expected_BTH[mask_BT], atol=1e-5, rtol=0)


def test_distill_offline_refuses_the_full_distribution_without_hidden_states(
    plain, tiny_student, tiny_teacher, tmp_path, capsys
):
    assert main(_distill_args(tiny_student, tiny_teacher, plain, tmp_path / "run")) == 2
    assert "--store_hidden_states true` into a new output_dir" in capsys.readouterr().err
