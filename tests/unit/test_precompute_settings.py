"""Which arguments of `opd teacher precompute` and `opd rollout` may change between a run and its
resumption, and what a teacher that stops answering prints.

Every argument field is classified once, in its job module: `RECORDED_SETTINGS` (can change a
byte of the output: recorded, and a resume with another value is refused naming the argument)
or `FREE_SETTINGS` (cannot: a resume may change it). A new field fails
`test_every_*_argument_is_classified` until it is classified, and then the refusal / resume tests
below until they know a changed value for it. Real parts: the tiny local teacher, real files, a
real refused connection on loopback (the stock-vLLM kind; its mid-run stop with our server is in
tests/integration/test_rollout_precompute.py).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from opd.cli import command_runner
from opd.commands import precompute
from opd.commands import rollout as rollout_job
from opd.demo.tiny import ALPHABET
from opd.shards import MANIFEST_NAME, plan_differences, read_manifest, shard_name
from opd.teacher.http import TeacherUnavailableError

NUM_ROWS, SHARD_SIZE = 24, 8
NUM_SHARDS = NUM_ROWS // SHARD_SIZE

precompute_main = command_runner("teacher precompute")


def _lookup(manifest: dict, dotted: str):
    """The value at a dotted key; KeyError when a level is missing."""
    value = manifest
    for part in dotted.split("."):
        value = value[part]
    return value


@pytest.fixture(scope="module")
def text_rows(tmp_path_factory) -> Path:
    """Prompt/completion text pairs (tokenized by the job): completions of 1 to 30 characters."""
    rng = random.Random(0)
    characters = ALPHABET.replace("#", "")
    rows = [
        {"prompt": f"{a}+{a % 7}=", "completion": "".join(rng.choices(characters, k=1 + a % 30))}
        for a in range(NUM_ROWS)
    ]
    path = tmp_path_factory.mktemp("rows") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _args(rows: Path, teacher: Path, output_dir: Path, **changes) -> list[str]:
    values = {
        "rollouts": str(rows),
        "teacher_model_name_or_path": str(teacher),
        "output_dir": str(output_dir),
        "teacher_top_k": "2",
        "teacher_batch_size": "3",
        "shard_size": str(SHARD_SIZE),
    } | changes
    flags = []
    for name, value in values.items():
        flags += [f"--{name}", *(value if isinstance(value, list) else [value])]
    return flags


@pytest.fixture(scope="module")
def other_tokenizer(tiny_teacher, tmp_path_factory) -> Path:
    """The teacher's tokenizer (so it passes the tokenizer check) with a BOS before every text:
    other prompt ids."""
    from tokenizers import processors

    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


def _error_line(stderr: str) -> str:
    """The one error line of a job's stderr (progress bars of `datasets` may precede it)."""
    lines = [line for line in stderr.splitlines() if "error" in line or "Traceback" in line]
    assert len(lines) == 1 and lines[0].startswith("opd teacher precompute: error: "), stderr
    return lines[0]


def _files(folder: Path) -> dict[str, bytes]:
    names = [MANIFEST_NAME] + [shard_name(i) for i in range(NUM_SHARDS)]
    return {name: (folder / name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def scored(text_rows, tiny_teacher, tmp_path_factory) -> Path:
    """A finished run with `_args`' settings, the one the tests below resume or copy."""
    output_dir = tmp_path_factory.mktemp("scored") / "set"
    assert precompute_main(_args(text_rows, tiny_teacher, output_dir)) == 0
    return output_dir


# ------------------------------------------------------------------------------------------------
# opd teacher precompute
# ------------------------------------------------------------------------------------------------


def test_every_precompute_argument_is_classified(scored):
    fields = {field.name for field in dataclasses.fields(precompute.PrecomputeArguments)}
    recorded, free = precompute.RECORDED_SETTINGS, precompute.FREE_SETTINGS
    assert not recorded.keys() & free.keys()
    assert fields - recorded.keys() - free.keys() == set(), "classify these in precompute.py"
    assert recorded.keys() | free.keys() == fields, "classified fields that no longer exist"
    manifest = read_manifest(scored)
    for key in recorded.values():
        _lookup(manifest, key)  # every recorded argument is in the manifest


# A changed value for every recorded argument but teacher_mode (which needs a live server of the
# other kind: tests/integration/test_rollout_precompute.py::
# test_precompute_keeps_shards_when_the_teacher_server_stops).
def _recorded_changes(text_rows, tiny_student, other_tokenizer, tmp_path) -> dict[str, str]:
    edited = tmp_path / "edited.jsonl"
    edited.write_text(text_rows.read_text().replace('"1+1="', '"1+2="'))
    return {
        "rollouts": str(edited),
        "teacher_model_name_or_path": str(tiny_student),
        "teacher_top_k": "1",
        "teacher_temperature": "0.5",
        "teacher_batch_size": "4",
        "tokenizer_name_or_path": str(other_tokenizer),
        "shard_size": "6",
        "store_hidden_states": "true",
        # recorded even when no hidden states are stored (tests/integration/test_offline_hidden.py
        # refuses it on a set that stores them)
        "teacher_hidden_dtype": "bfloat16",
        # the same tokenizer as the student's: cross-tokenizer mode aligns it 1:1
        "teacher_cross_tokenizer": "true",
        # recorded as given, even with the mode off (the set's teacher tokenizer if it were on)
        "teacher_tokenizer_name_or_path": str(other_tokenizer),
    }


@pytest.mark.parametrize("name", sorted(set(precompute.RECORDED_SETTINGS) - {"teacher_mode"}))
def test_a_changed_recorded_setting_is_refused_naming_it(
    name, scored, text_rows, tiny_teacher, tiny_student, other_tokenizer, tmp_path, capsys
):
    changes = _recorded_changes(text_rows, tiny_student, other_tokenizer, tmp_path)
    assert changes.keys() == precompute.RECORDED_SETTINGS.keys() - {"teacher_mode"}
    before = _files(scored)
    assert precompute_main(_args(text_rows, tiny_teacher, scored, **{name: changes[name]})) == 2
    error = _error_line(capsys.readouterr().err)
    assert re.search(rf"[(;] ?{name}[:.]", error), error  # named by its argument
    assert " in the folder vs " in error and "new output_dir" in error
    assert _files(scored) == before


def _free_changes(tmp_path) -> dict[str, object]:
    return {
        "output_dir": None,  # the set itself, moved: see the test
        "teacher_urls": ["http://127.0.0.1:9"],
        "teacher_api_key": "secret-key",
        "teacher_timeout_s": "7",
        "teacher_retry_budget_s": "3",
        "num_workers": "2",
        "repair": "true",
        "debug": "true",
        "teacher_span_rule": "spread",
    }


@pytest.mark.parametrize("name", sorted(precompute.FREE_SETTINGS))
def test_a_changed_free_setting_resumes_to_the_same_bytes(
    name, scored, text_rows, tiny_teacher, tmp_path, capsys
):
    """A copy (elsewhere: output_dir changes too) missing its last shard resumes with the
    changed setting and rewrites that shard byte for byte."""
    changes = _free_changes(tmp_path)
    assert changes.keys() == precompute.FREE_SETTINGS.keys()
    copy = tmp_path / "moved"
    shutil.copytree(scored, copy)
    (copy / shard_name(NUM_SHARDS - 1)).unlink()
    extra = {} if changes[name] is None else {name: changes[name]}
    assert precompute_main(_args(text_rows, tiny_teacher, copy, **extra)) == 0
    assert f"({NUM_SHARDS - 1} already done)" in capsys.readouterr().out
    assert _files(copy) == _files(scored)
    assert not any(b"secret-key" in data for data in _files(copy).values())


# ------------------------------------------------------------------------------------------------
# opd rollout: classification and the manifest keys, without an engine
# ------------------------------------------------------------------------------------------------

ROLLOUT_CHANGES = {
    "model_name_or_path": "other/student",
    "dataset_name": "other.jsonl",
    "dataset_config": "main",
    "dataset_train_split": "test",
    "dataset_prompt_column": "question",
    "dataset_chat_template": True,
    "dataset_system_prompt": "Be brief.",
    "dataset_prompt_template": "{prompt} Answer:",
    "teacher_prompt_column": "hint",
    "max_prompts": 3,
    "num_generations": 3,
    "temperature": 0.5,
    "top_p": 0.9,
    "max_completion_length": 7,
    "seed": 1,
    "dtype": "bfloat16",
    "vllm_max_model_length": 64,
    "vllm_gpu_memory_utilization": 0.5,
    "shard_size": 4,
}


def test_every_rollout_argument_is_classified_and_recorded(tiny_student, prompt_file):
    fields = {field.name for field in dataclasses.fields(rollout_job.RolloutArguments)}
    recorded, free = rollout_job.RECORDED_SETTINGS, rollout_job.FREE_SETTINGS
    assert not recorded.keys() & free.keys()
    assert fields - recorded.keys() - free.keys() == set(), "classify these in commands/rollout.py"
    assert recorded.keys() | free.keys() == fields, "classified fields that no longer exist"
    assert ROLLOUT_CHANGES.keys() == recorded.keys()

    args = rollout_job.RolloutArguments(
        model_name_or_path=str(tiny_student), dataset_name=str(prompt_file), output_dir="unused"
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    plan = rollout_job.rollout_plan(args, tokenizer, num_prompts=16)
    for name, key in recorded.items():
        changed = dataclasses.replace(args, **{name: ROLLOUT_CHANGES[name]})
        differences = plan_differences(
            plan, rollout_job.rollout_plan(changed, tokenizer, num_prompts=16),
            labels=rollout_job.SETTING_LABELS,
        )  # fmt: skip
        assert any(line.startswith(f"{name}: ") for line in differences), (name, key)
    free_changes = {"output_dir": "elsewhere", "repair": True}
    assert free_changes.keys() == free.keys()
    for name, value in free_changes.items():
        changed = dataclasses.replace(args, **{name: value})
        assert plan == rollout_job.rollout_plan(changed, tokenizer, num_prompts=16), name
    # A shard_size that rounds to the same whole prompts is the same set.
    same = dataclasses.replace(args, shard_size=args.shard_size + 1, num_generations=2)
    assert (
        rollout_job.rollout_plan(same, tokenizer, 16)["shard_size"]
        == (
            rollout_job.rollout_plan(dataclasses.replace(args, num_generations=2), tokenizer, 16)[
                "shard_size"
            ]
        )
    )


# ------------------------------------------------------------------------------------------------
# A teacher that is not there: the stock-vLLM kind
# ------------------------------------------------------------------------------------------------


def _token_id_rows(tmp_path) -> Path:
    path = tmp_path / "ids.jsonl"
    rows = [{"prompt_ids": [1, 4 + i], "completion_ids": [5, 6, 7][: 1 + i % 3]} for i in range(5)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_unreachable_vllm_teacher_is_one_line_naming_vllm_serve(free_port, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    output_dir = tmp_path / "scores"
    argv = ["--rollouts", str(_token_id_rows(tmp_path)), "--output_dir", str(output_dir),
            "--teacher_mode", "vllm", "--teacher_urls", url, "--teacher_model_name_or_path",
            "Qwen/Qwen3-8B", "--teacher_retry_budget_s", "0.3", "--shard_size", "2"]  # fmt: skip
    assert precompute_main(argv) == 1
    error = _error_line(capsys.readouterr().err)
    assert error.startswith(f"opd teacher precompute: error: the teacher at {url} did not answer")
    assert "Connection refused" in error and "`vllm serve ...`" in error
    assert "opd teacher serve" not in error
    assert error.endswith(
        f"0 of 3 shards are done and kept in {output_dir}; rerun the same command to resume."
    )
    assert read_manifest(output_dir)["shards"] == []
    with pytest.raises(TeacherUnavailableError, match="vllm serve"):
        precompute_main([*argv, "--debug"])  # the traceback, for a bug report


@pytest.mark.parametrize("temperature", [0.0, 1e-45, float("inf"), float("nan")])
def test_a_temperature_that_would_give_nan_scores_is_refused(tmp_path, temperature):
    with pytest.raises(precompute.ConfigError, match=r"finite number >= 0.01"):
        precompute.PrecomputeArguments(
            rollouts=str(tmp_path), output_dir=str(tmp_path / "scores"),
            teacher_model_name_or_path="m", teacher_temperature=temperature,
        )  # fmt: skip
