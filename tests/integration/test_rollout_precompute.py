"""Offline OPD end to end: `opd rollout` (real CLI, vLLM on CPU, the student named `demo:student`)
-> `opd teacher precompute` (local tiny teacher) -> `OfflineTeacher`. Checks values against
`LocalTeacher`, resumption after a SIGKILL (byte-identical to an uninterrupted run),
worker-count independence, refusals, `--repair` of a lost manifest, `demo:` names, and a teacher
server stopped mid-run (one line; finished shards kept and resumed)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.cli import command_runner
from opd.commands.precompute import THROTTLE_ENV
from opd.commands.rollout import (
    RolloutArguments,
    load_prompts,
    rows_from_outputs,
    teacher_prompts,
)
from opd.config import ConfigError
from opd.demo.tiny import build_char_tokenizer
from opd.shards import MANIFEST_NAME, load_shard_set, read_manifest, shard_name
from opd.teacher.build import build_teacher
from opd.teacher.local import LocalTeacher
from opd.teacher.offline import OfflineTeacher, same_model
from opd.types import RolloutBatch

NUM_PROMPTS, NUM_GENERATIONS, TOP_K, SHARD_SIZE = 16, 2, 4, 2
NUM_ROWS = NUM_PROMPTS * NUM_GENERATIONS
NUM_SHARDS = NUM_ROWS // SHARD_SIZE

rollout_main = command_runner("rollout")
precompute_main = command_runner("teacher precompute")


def _rollout_command(student, prompt_file, output_dir, *extra) -> list[str]:
    return [
        sys.executable, "-m", "opd.cli", "rollout",
        "--model_name_or_path", str(student), "--dataset_name", str(prompt_file),
        "--output_dir", str(output_dir), "--num_generations", str(NUM_GENERATIONS),
        "--max_completion_length", "6", "--vllm_max_model_length", "32", "--shard_size", "8",
        *extra,
    ]  # fmt: skip


def _precompute_args(rollouts, teacher, output_dir, *extra) -> list[str]:
    return [
        "--rollouts", str(rollouts), "--teacher_model_name_or_path", str(teacher),
        "--output_dir", str(output_dir), "--teacher_top_k", str(TOP_K),
        "--shard_size", str(SHARD_SIZE), "--teacher_batch_size", "3", *extra,
    ]  # fmt: skip


def _files(folder: Path) -> dict[str, bytes]:
    names = [MANIFEST_NAME] + [shard_name(i) for i in range(read_manifest(folder)["num_shards"])]
    return {name: (folder / name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def demo_models() -> tuple[Path, Path]:
    """`(teacher, student)` folders of the demo models (built once, cached outside the repo).
    They share the tiny models' character tokenizer, so they score the rollouts below."""
    from opd.demo.pretrain import prepare_demo_models

    return prepare_demo_models()


@pytest.fixture(scope="module")
def rollouts(tiny_student, prompt_file, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("rollouts") / "set"
    command = _rollout_command(tiny_student, prompt_file, output_dir)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"{NUM_ROWS} rollouts" in result.stdout and str(output_dir) in result.stdout
    return output_dir


@pytest.fixture(scope="module")
def scores(rollouts, tiny_teacher, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("scores") / "set"
    assert precompute_main(_precompute_args(rollouts, tiny_teacher, output_dir)) == 0
    return output_dir


@pytest.fixture(scope="module")
def teacher_model(tiny_teacher):
    return AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()


@pytest.mark.slow
def test_rollout_rows_and_columns(rollouts, tiny_student, prompt_file):
    manifest, dataset = load_shard_set(rollouts, kind="rollouts", rerun_hint="opd rollout")
    assert manifest["complete"] and manifest["num_shards"] == 4 and len(dataset) == NUM_ROWS
    assert manifest["sampling"]["num_generations"] == NUM_GENERATIONS
    student_path = tiny_student
    assert set(dataset.column_names) >= {"prompt_index", "sample_index", "prompt_ids",
        "teacher_prompt_ids", "completion_ids", "sampler_logprobs", "stop_reason", "prompt",
        "answer"}  # fmt: skip
    expected_keys = [(p, s) for p in range(NUM_PROMPTS) for s in range(NUM_GENERATIONS)]
    assert list(zip(dataset["prompt_index"], dataset["sample_index"], strict=True)) == expected_keys
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    prompts = [json.loads(line) for line in prompt_file.read_text().splitlines()]
    for row in dataset:
        source = prompts[row["prompt_index"]]
        assert row["prompt"] == source["prompt"] and row["answer"] == source["answer"]
        assert row["prompt_ids"] == tokenizer(source["prompt"]).input_ids
        assert row["teacher_prompt_ids"] == row["prompt_ids"]
        assert 1 <= len(row["completion_ids"]) <= 6
        assert len(row["sampler_logprobs"]) == len(row["completion_ids"])
        assert all(math.isfinite(lp) and lp <= 0 for lp in row["sampler_logprobs"])
        ends_with_eos = row["completion_ids"][-1] == tokenizer.eos_token_id
        assert row["stop_reason"] == ("stop" if ends_with_eos else "length")
    # Samples differ: the seed of each sample is its own.
    assert len({tuple(ids) for ids in dataset["completion_ids"]}) > NUM_ROWS // 2


@pytest.mark.slow
def test_rollout_rerun_reproduces_missing_and_corrupt_shards(
    rollouts, tiny_student, prompt_file, tmp_path, capsys
):
    """A rerun samples only the shards that are missing or corrupt, in a fresh engine, and gets
    the same bytes: every prompt's sampling seed is fixed."""
    copy = tmp_path / "copy"
    shutil.copytree(rollouts, copy)
    (copy / shard_name(1)).unlink()
    (copy / shard_name(2)).write_bytes(b"garbage")
    command = _rollout_command(tiny_student, prompt_file, copy)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "(2 already done)" in result.stdout and "is corrupt" in result.stdout
    assert _files(copy) == _files(rollouts)


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--temperature", "0.5", "temperature: 1.0 in the folder vs 0.5 now"),
        ("--vllm_max_model_length", "24", "vllm_max_model_length: 32 in the folder vs 24 now"),
        # `demo:student` resolves (its tokenizer loads) and is compared as given.
        ("--model_name_or_path", "demo:student", "vs 'demo:student' now"),
    ],
)
def test_rollout_refuses_other_settings_naming_the_argument(
    rollouts, prompt_file, tiny_student, demo_models, flag, value, expected, capsys
):
    before = _files(rollouts)
    argv = _rollout_command(tiny_student, prompt_file, rollouts, flag, value)[4:]
    assert rollout_main(argv) == 2  # refused before any engine starts
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("opd rollout: error: output_dir")
    assert expected in error and "new output_dir" in error
    assert _files(rollouts) == before


def test_rollout_repairs_a_lost_manifest_without_sampling(
    rollouts, tiny_student, prompt_file, tmp_path, capsys
):
    copy = tmp_path / "copy"
    shutil.copytree(rollouts, copy)
    (copy / MANIFEST_NAME).unlink()
    argv = _rollout_command(tiny_student, prompt_file, copy)[4:]
    assert rollout_main(argv) == 2
    assert "rerun the same command with --repair" in capsys.readouterr().err
    assert rollout_main([*argv, "--repair"]) == 0  # every shard verifies: no engine starts
    assert "(4 already done)" in capsys.readouterr().out
    assert _files(copy) == _files(rollouts)


def test_precompute_equals_local_teacher(scores, rollouts, tiny_teacher, teacher_model):
    manifest = read_manifest(scores, kind="teacher_scores")
    assert manifest["complete"] and manifest["num_shards"] == NUM_ROWS // SHARD_SIZE
    assert manifest["teacher"]["model"] == str(tiny_teacher) and manifest["teacher"]["top_k"] == 4
    assert manifest["rollouts"]["fingerprint"] == read_manifest(rollouts)["fingerprint"]
    files = [str(scores / entry["file"]) for entry in manifest["shards"]]
    dataset = load_dataset("parquet", data_files=files, split="train")
    assert (
        len(dataset) == NUM_ROWS
        and dataset.features["teacher_topk_ids"].feature.feature.dtype == "int32"
    )
    teacher = LocalTeacher(teacher_model)
    for row in dataset:
        completion = row["completion_ids"]
        batch = RolloutBatch(
            prompt_ids=[row["prompt_ids"]],
            completion_ids_BT=torch.tensor([completion]),
            completion_mask_BT=torch.ones(1, len(completion), dtype=torch.long),
        )
        expected = teacher.score(batch, top_k=TOP_K)
        torch.testing.assert_close(
            torch.tensor(row["teacher_logprobs"]),
            expected.sampled_logprobs_BT[0],
            atol=1e-6,
            rtol=0,
        )
        torch.testing.assert_close(
            torch.tensor(row["teacher_topk_logprobs"]),
            expected.topk_logprobs_BTK[0],
            atol=1e-6,
            rtol=0,
        )
        assert torch.tensor(row["teacher_topk_ids"]).tolist() == expected.topk_ids_BTK[0].tolist()


def test_precompute_resumes_after_sigkill_byte_identical(scores, rollouts, tiny_teacher, tmp_path):
    output_dir = tmp_path / "killed"
    args = _precompute_args(rollouts, tiny_teacher, output_dir, "--num_workers", "1")
    command = [sys.executable, "-m", "opd.cli", "teacher", "precompute", *args]
    # Slow the job down between shards so the kill lands mid-run on a busy machine.
    env = {**os.environ, THROTTLE_ENV: "0.5"}
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (output_dir / shard_name(0)).exists():
        assert job.poll() is None, job.stderr.read().decode()[-4000:]
        assert time.monotonic() < deadline, "no shard appeared"
        time.sleep(0.05)
    time.sleep(0.7)
    job.send_signal(signal.SIGKILL)
    job.wait()
    partial = read_manifest(output_dir)
    assert not partial["complete"] and 1 <= len(partial["shards"]) < partial["num_shards"]

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"({len(partial['shards'])} already done)" in rerun.stdout
    assert _files(output_dir) == _files(scores)
    assert not list(output_dir.glob("*.tmp-*"))
    _, dataset = load_shard_set(output_dir, kind="teacher_scores", rerun_hint="x")
    keys = list(zip(dataset["prompt_index"], dataset["sample_index"], strict=True))
    assert sorted(keys) == [(p, s) for p in range(NUM_PROMPTS) for s in range(NUM_GENERATIONS)]


def test_two_workers_equal_one(scores, rollouts, tiny_teacher, tmp_path):
    output_dir = tmp_path / "two"
    args = _precompute_args(rollouts, tiny_teacher, output_dir, "--num_workers", "2")
    assert precompute_main(args) == 0
    assert _files(output_dir) == _files(scores)


def test_precompute_through_two_servers(scores, rollouts, tiny_teacher, tmp_path, serve_in_thread):
    """`--teacher_mode server` with two URLs and two workers: the local job's values."""
    from opd.commands.serve import ServeArguments, build_app, build_backend

    serve_args = ServeArguments(model=str(tiny_teacher), batch_size=3)
    backend = build_backend(serve_args)
    output_dir = tmp_path / "served"
    with (
        serve_in_thread(build_app(serve_args, backend)) as first,
        serve_in_thread(build_app(serve_args, backend)) as second,
    ):
        args = _precompute_args(rollouts, tiny_teacher, output_dir, "--teacher_mode", "server",
                                "--teacher_urls", first, second, "--num_workers", "2")  # fmt: skip
        assert precompute_main(args) == 0
    manifest = read_manifest(output_dir, kind="teacher_scores")
    assert manifest["teacher"]["mode"] == "server" and manifest["teacher"]["tokenizer"]
    # The server names its model (a folder by its name): the same teacher as the local run's.
    assert same_model(read_manifest(scores)["teacher"]["model"], manifest["teacher"]["model"])
    _, served = load_shard_set(output_dir, kind="teacher_scores", rerun_hint="x")
    _, local = load_shard_set(scores, kind="teacher_scores", rerun_hint="x")
    for column in ("teacher_logprobs", "teacher_topk_logprobs"):
        # The server batches rows differently from the local job: equal up to fp32 rounding.
        for served_row, local_row in zip(served[column], local[column], strict=True):
            torch.testing.assert_close(
                torch.tensor(served_row), torch.tensor(local_row), atol=1e-5, rtol=0
            )
    assert served["completion_ids"] == local["completion_ids"]


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--teacher_top_k", "2", "(teacher_top_k: 4 in the folder vs 2 now)"),
        # Another batch size changes the scores (padding, batched matmuls): refused, not mixed.
        ("--teacher_batch_size", "5", "(teacher_batch_size: 3 in the folder vs 5 now)"),
    ],
)
def test_precompute_refuses_other_settings_in_same_folder(
    scores, rollouts, tiny_teacher, flag, value, expected, capsys
):
    before = _files(scores)
    args = _precompute_args(rollouts, tiny_teacher, scores)
    args[args.index(flag) + 1] = value
    assert precompute_main(args) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("opd teacher precompute: error: output_dir")
    assert expected in error and "new output_dir" in error
    assert _files(scores) == before


def _flip_row_group_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8] ^= 0xFF  # right after the leading `PAR1`: the first row group, not the footer
    path.write_bytes(bytes(data))


def test_precompute_repairs_a_lost_manifest(scores, rollouts, tiny_teacher, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(scores, copy)
    (copy / MANIFEST_NAME).unlink()
    args = _precompute_args(rollouts, tiny_teacher, copy)
    assert precompute_main(args) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"opd teacher precompute: error: output_dir {copy} holds {NUM_SHARDS} shard files but no "
        f"{MANIFEST_NAME} (lost or deleted); rerun the same command with --repair to rebuild it "
        "from the shards that verify."
    )
    assert precompute_main([*args, "--repair"]) == 0
    assert f"({NUM_SHARDS} already done)" in capsys.readouterr().out
    assert _files(copy) == _files(scores)  # the rebuilt manifest is the original, byte for byte
    rows = [0, 5, 17]
    repaired = OfflineTeacher(copy, expected_model=str(tiny_teacher), top_k=TOP_K)
    original = OfflineTeacher(scores, expected_model=str(tiny_teacher), top_k=TOP_K)
    (got_batch, got), (want_batch, want) = (t.batch_for_rows(rows) for t in (repaired, original))
    assert torch.equal(got_batch.completion_ids_BT, want_batch.completion_ids_BT)
    assert torch.equal(got.sampled_logprobs_BT, want.sampled_logprobs_BT)
    assert torch.equal(got.topk_ids_BTK, want.topk_ids_BTK)

    # A corrupt shard is left out of the rebuilt manifest, then scored again.
    (copy / MANIFEST_NAME).unlink()
    _flip_row_group_byte(copy / shard_name(5))
    assert precompute_main([*args, "--repair"]) == 0
    out = capsys.readouterr().out
    assert f"{shard_name(5)} is corrupt" in out and f"({NUM_SHARDS - 1} already done)" in out
    assert _files(copy) == _files(scores)

    # A shard made with other settings is refused, not mixed in.
    other = tmp_path / "batch5"
    assert precompute_main(_precompute_args(rollouts, tiny_teacher, other, "--teacher_batch_size",
                                            "5")) == 0  # fmt: skip
    shutil.copy(other / shard_name(3), copy / shard_name(3))
    assert precompute_main([*args, "--repair"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"opd teacher precompute: error: {copy / shard_name(3)} was made with different settings "
        f"(teacher_batch_size: 5 in the shard vs 3 now); move it out of {copy} or use a new "
        "output_dir."
    )


def test_precompute_keeps_shards_when_the_teacher_server_stops(
    scores, rollouts, tiny_teacher, tmp_path, serve_in_thread, monkeypatch, capsys
):
    """The real `opd teacher serve` app on loopback stops after the first shards: one line on
    stderr naming that server and what is kept. The same command against a restarted server (at
    another URL: replicas do not block a resume) finishes the set; local mode is refused."""
    from opd.commands.serve import ServeArguments, build_app, build_backend

    serve_args = ServeArguments(model=str(tiny_teacher), batch_size=3)
    backend = build_backend(serve_args)
    output_dir = tmp_path / "served"
    monkeypatch.setenv(THROTTLE_ENV, "0.2")  # so the stop lands mid-run
    exit_code = []
    with serve_in_thread(build_app(serve_args, backend)) as url:
        args = _precompute_args(rollouts, tiny_teacher, output_dir, "--teacher_mode", "server",
                                "--teacher_urls", url, "--teacher_retry_budget_s", "1")  # fmt: skip
        job = threading.Thread(target=lambda: exit_code.append(precompute_main(args)))
        job.start()
        deadline = time.monotonic() + 60
        while not (output_dir / shard_name(0)).exists():
            assert job.is_alive() and time.monotonic() < deadline, "no shard appeared"
            time.sleep(0.02)
    job.join(timeout=60)
    assert exit_code == [1]
    stderr = capsys.readouterr().err
    done = len(read_manifest(output_dir)["shards"])
    assert 1 <= done < NUM_SHARDS and "Traceback" not in stderr
    error = stderr.splitlines()[-1]
    assert error.startswith(f"opd teacher precompute: error: the teacher at {url} did not answer")
    assert "`opd teacher serve ...`" in error and "vllm" not in error
    assert error.endswith(
        f"{done} of {NUM_SHARDS} shards are done and kept in {output_dir}; rerun the same "
        "command to resume."
    )

    monkeypatch.delenv(THROTTLE_ENV)
    with serve_in_thread(build_app(serve_args, backend)) as restarted:
        args[args.index(url)] = restarted
        assert precompute_main(args) == 0
    assert f"({done} already done)" in capsys.readouterr().out
    assert read_manifest(output_dir)["complete"]
    assert precompute_main(_precompute_args(rollouts, tiny_teacher, output_dir)) == 2
    assert "teacher_mode: 'server' in the folder vs 'local' now" in capsys.readouterr().err


def test_precompute_takes_demo_teacher_name(rollouts, demo_models, tmp_path):
    """`demo:teacher` is scored by the demo's teacher folder and recorded as `demo:teacher`; the
    offline teacher accepts it under either spelling (`opd distill` resolves names first)."""
    output_dir = tmp_path / "demo"
    assert precompute_main(_precompute_args(rollouts, "demo:teacher", output_dir)) == 0
    assert read_manifest(output_dir)["teacher"]["model"] == "demo:teacher"
    teacher_path = demo_models[0]
    offline = OfflineTeacher(output_dir, expected_model=str(teacher_path), top_k=TOP_K)
    OfflineTeacher(output_dir, expected_model="demo:teacher", top_k=TOP_K)
    batch, stored = offline.batch_for_rows(offline.grouped_rows()[2])
    model = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    expected = LocalTeacher(model).score(batch, top_k=TOP_K)
    torch.testing.assert_close(
        stored.sampled_logprobs_BT, expected.sampled_logprobs_BT, atol=1e-6, rtol=0
    )
    assert torch.equal(stored.topk_ids_BTK, expected.topk_ids_BTK)


def test_precompute_checks_recorded_student_tokenizer(rollouts, tiny_teacher, tmp_path, capsys):
    """When the rollout manifest's student cannot be loaded, its recorded tokenizer fingerprint
    is compared with the teacher's."""
    copy = tmp_path / "rollouts"
    shutil.copytree(rollouts, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["student"] = str(tmp_path / "gone")
    manifest["student_tokenizer"]["vocab_size"] = 99
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert precompute_main(_precompute_args(copy, tiny_teacher, tmp_path / "scores")) == 2
    error = capsys.readouterr().err
    assert "vocab_size: student 99 vs teacher 50" in error and "rollout manifest" in error


def test_precompute_text_file(tiny_teacher, teacher_model, tmp_path):
    source = tmp_path / "pairs.jsonl"
    pairs = [{"prompt": "1+2=", "completion": "3"}, {"prompt": "2*3=", "completion": "6.", "id": 7}]
    source.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    output_dir = tmp_path / "scores"
    args = ["--rollouts", str(source), "--teacher_model_name_or_path", str(tiny_teacher),
            "--output_dir", str(output_dir)]  # fmt: skip
    assert precompute_main(args) == 0
    _, dataset = load_shard_set(output_dir, kind="teacher_scores", rerun_hint="x")
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    teacher = LocalTeacher(teacher_model)
    for pair, row in zip(pairs, dataset, strict=True):
        assert row["prompt_ids"] == tokenizer(pair["prompt"]).input_ids
        completion = tokenizer(pair["completion"], add_special_tokens=False).input_ids
        assert row["completion_ids"] == completion and row["sampler_logprobs"] is None
        batch = RolloutBatch(
            prompt_ids=[row["prompt_ids"]],
            completion_ids_BT=torch.tensor([completion]),
            completion_mask_BT=torch.ones(1, len(completion), dtype=torch.long),
        )
        expected = teacher.score(batch).sampled_logprobs_BT[0]
        torch.testing.assert_close(
            torch.tensor(row["teacher_logprobs"]), expected, atol=1e-6, rtol=0
        )
    assert dataset["id"] == [None, 7]


def test_offline_teacher_matches_local_teacher(scores, tiny_teacher, tiny_student, teacher_model):
    offline = OfflineTeacher(scores, expected_model=str(tiny_teacher), top_k=TOP_K)
    offline.check_student_tokenizer(AutoTokenizer.from_pretrained(tiny_student))
    groups = offline.grouped_rows()
    assert len(groups) == NUM_PROMPTS and all(len(g) == NUM_GENERATIONS for g in groups)
    stored = offline.dataset()
    for prompt_index, group in enumerate(groups):
        assert [stored[r]["prompt_index"] for r in group] == [prompt_index] * NUM_GENERATIONS
        assert [stored[r]["sample_index"] for r in group] == list(range(NUM_GENERATIONS))
    assert offline.rows_for_prompt_index(3) == groups[3]

    rows = groups[1] + groups[6] + groups[2]
    batch, stored_scores = offline.batch_for_rows(rows)
    assert batch.sampler_logprobs_BT is not None
    for i, row in enumerate(rows):
        length = len(stored[row]["completion_ids"])
        assert batch.sampler_logprobs_BT[i, :length].tolist() == pytest.approx(
            stored[row]["sampler_logprobs"]
        )
    expected = LocalTeacher(teacher_model).score(batch, top_k=TOP_K)
    for got in (offline.score(batch, top_k=TOP_K), stored_scores):
        torch.testing.assert_close(
            got.sampled_logprobs_BT, expected.sampled_logprobs_BT, atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            got.topk_logprobs_BTK, expected.topk_logprobs_BTK, atol=1e-6, rtol=0
        )
        assert torch.equal(got.topk_ids_BTK, expected.topk_ids_BTK)
        assert got.teacher_id == str(tiny_teacher)
    top2 = offline.score(batch, top_k=2)
    assert torch.equal(top2.topk_ids_BTK, expected.topk_ids_BTK[..., :2])

    unknown = RolloutBatch(
        prompt_ids=[batch.prompt_ids[0]],
        completion_ids_BT=torch.tensor([[5, 5, 5, 5, 5, 5, 5]]),
        completion_mask_BT=torch.ones(1, 7, dtype=torch.long),
    )
    with pytest.raises(ConfigError, match=r"row 0 of the batch .* is not in the teacher shards"):
        offline.score(unknown)


def test_offline_teacher_refusals(scores, tiny_teacher, tmp_path):
    with pytest.raises(ConfigError, match="teacher_model_name_or_path='other/teacher'"):
        OfflineTeacher(scores, expected_model="other/teacher")
    with pytest.raises(ConfigError, match=r"teacher_top_k=8 .* hold the top 4"):
        OfflineTeacher(scores, top_k=8)
    with pytest.raises(ConfigError, match=r"teacher_temperature=2\.0 .* at temperature 1\.0"):
        OfflineTeacher(scores, temperature=2.0)
    offline = OfflineTeacher(scores, top_k=TOP_K)
    with pytest.raises(ConfigError, match="vocab_size: student 10 vs teacher 50") as error:
        offline.check_student_tokenizer(build_char_tokenizer("0123456"))
    assert "shard manifest" in str(error.value)
    args = SimpleNamespace(teacher_mode="offline", teacher_shards=str(scores),
                           teacher_model_name_or_path=str(tiny_teacher), teacher_top_k=TOP_K,
                           teacher_temperature=1.0)  # fmt: skip
    assert isinstance(build_teacher(args), OfflineTeacher)

    unfinished = tmp_path / "unfinished"
    shutil.copytree(scores, unfinished)
    manifest = json.loads((unfinished / MANIFEST_NAME).read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:-1], False
    (unfinished / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="precompute did not finish: 15 of 16 shards; rerun"):
        OfflineTeacher(unfinished)


# ------------------------------------------------------------------------------------------------
# `opd rollout` pieces that need no engine
# ------------------------------------------------------------------------------------------------


def test_rollout_help_and_bad_input(tiny_student, prompt_file, tmp_path, capsys):
    assert rollout_main(["--help"]) == 0
    assert "--teacher_prompt_column" in capsys.readouterr().out
    args = ["--model_name_or_path", str(tiny_student), "--dataset_name", str(prompt_file),
            "--output_dir", str(tmp_path / "out"), "--teacher_prompt_column", "hint"]  # fmt: skip
    assert rollout_main(args) == 2
    error = capsys.readouterr().err
    assert "opd rollout: error: teacher_prompt_column='hint' is not a column" in error
    assert not (tmp_path / "out").exists()


def test_privileged_teacher_prompts_are_tokenized_like_prompts(tiny_student, tmp_path):
    source = tmp_path / "opsd.jsonl"
    source.write_text(json.dumps({"prompt": "1+1=", "hint": "answer 2. 1+1="}) + "\n")
    args = RolloutArguments(
        model_name_or_path=str(tiny_student), dataset_name=str(source), output_dir="unused",
        teacher_prompt_column="hint",
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    dataset = load_prompts(args)
    assert teacher_prompts(args, dataset, tokenizer) == [tokenizer("answer 2. 1+1=").input_ids]


def test_rows_from_vllm_outputs():
    """vLLM `RequestOutput`s as SimpleNamespace fakes (the pure parsing step)."""

    def completion(index, token_ids, logprobs, finish_reason):
        per_token = [
            {t: SimpleNamespace(logprob=lp)} for t, lp in zip(token_ids, logprobs, strict=True)
        ]
        return SimpleNamespace(
            index=index, token_ids=token_ids, logprobs=per_token, finish_reason=finish_reason
        )

    outputs = [
        SimpleNamespace(outputs=[completion(1, [7, 2], [-0.5, -0.25], "stop"),
                                 completion(0, [8, 9, 9], [-1.0, -2.0, -3.0], "length")]),
        SimpleNamespace(outputs=[completion(0, [2], [-0.125], "stop"),
                                 completion(1, [4], [-4.0], "length")]),
    ]  # fmt: skip
    rows = rows_from_outputs(outputs, [5, 6])
    assert rows == {
        "prompt_index": [5, 5, 6, 6],
        "sample_index": [0, 1, 0, 1],
        "completion_ids": [[8, 9, 9], [7, 2], [2], [4]],
        "sampler_logprobs": [[-1.0, -2.0, -3.0], [-0.5, -0.25], [-0.125], [-4.0]],
        "stop_reason": ["length", "stop", "stop", "length"],
    }
