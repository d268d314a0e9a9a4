"""`opd distill` across different tokenizers through the real CLI, for every teacher mode.

The demo's character-level student (tiny, random) learns from a tiny BPE teacher (another
vocabulary, another EOS string and id):

- local: the teacher in-process;
- server: the same teacher behind `opd teacher serve` on loopback (its app and uvicorn config, in
  a thread); the client re-tokenizes with `teacher_tokenizer_name_or_path` and sends the
  teacher-side ids, so its step-1 loss equals the local run's;
- offline: `opd teacher precompute --teacher_cross_tokenizer true` on a text rollout file, then
  `opd distill --teacher_mode offline`; the manifest records both tokenizers and the alignment.

A stock vLLM server (`/tokenize`) is checked in `tests/integration/test_teacher_vllm.py`.

Test: `pytest -n 0 -q tests/integration/test_cross_tokenizer_cli.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd.cli import command_runner, main
from opd.demo.bpe import save_tiny_bpe
from opd.shards import read_manifest

precompute_main = command_runner("teacher precompute")
CROSS = ["--teacher_cross_tokenizer", "true", "--teacher_top_k", "4", "--opd_divergence", "jsd",
         "--opd_cross_vocab", "hybrid"]  # fmt: skip


@pytest.fixture(scope="module")
def bpe_teacher(tmp_path_factory) -> Path:
    return save_tiny_bpe(tmp_path_factory.mktemp("bpe_teacher"), seed=1)


def distill(student: Path, prompt_file: Path | None, output_dir: Path, *extra: str) -> list[dict]:
    dataset = [] if prompt_file is None else ["--dataset_name", str(prompt_file)]
    argv = [
        "distill", "--model_name_or_path", str(student), *dataset,
        "--output_dir", str(output_dir), "--use_vllm", "false", "--eval_before_after", "false",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "2",
        "--max_completion_length", "5", "--learning_rate", "1e-3", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--seed", "0",
        "--write_report", "false", *extra,
    ]  # fmt: skip
    assert main(argv) == 0
    history = json.loads((output_dir / "opd_results.json").read_text())["log_history"]
    steps = [entry for entry in history if "opd/reverse_kl_k1" in entry]
    assert [entry["step"] for entry in steps] == [1, 2]
    return steps


def _check_cross_steps(steps: list[dict]) -> None:
    for entry in steps:
        assert 0 < entry["teacher/cross_spans_per_token"] <= 1.0
        assert entry["opd/uld_distance"] > 0 and entry["opd/divergence"] >= 0


@pytest.fixture(scope="module")
def local_steps(tiny_student, prompt_file, bpe_teacher, tmp_path_factory) -> list[dict]:
    output_dir = tmp_path_factory.mktemp("local")
    return distill(tiny_student, prompt_file, output_dir, "--teacher_mode", "local",
                   "--teacher_model_name_or_path", str(bpe_teacher), *CROSS)  # fmt: skip


def test_local_teacher_of_another_tokenizer(local_steps, capsys):
    _check_cross_steps(local_steps)


def test_the_same_pair_without_cross_tokenizer_mode_says_how_to_turn_it_on(
    tiny_student, prompt_file, bpe_teacher, tmp_path, capsys
):
    argv = ["distill", "--model_name_or_path", str(tiny_student), "--dataset_name",
            str(prompt_file), "--output_dir", str(tmp_path), "--report_to", "none",
            "--teacher_model_name_or_path", str(bpe_teacher)]  # fmt: skip
    assert main(argv) != 0
    error = capsys.readouterr().err
    assert "does not share the student's tokenizer" in error
    assert "teacher_cross_tokenizer: true" in error


def test_served_teacher_of_another_tokenizer(
    local_steps, tiny_student, prompt_file, bpe_teacher, tmp_path, serve_teacher
):
    from opd.commands.serve import ServeArguments, build_backend

    args = ServeArguments(model=str(bpe_teacher), port=0, log_level="warning", batch_size=16)
    with serve_teacher(args, build_backend(args)) as url:
        steps = distill(tiny_student, prompt_file, tmp_path, "--teacher_mode", "server",
                        "--teacher_urls", url, "--teacher_model_name_or_path",
                        str(bpe_teacher), "--teacher_tokenizer_name_or_path", str(bpe_teacher),
                        *CROSS)  # fmt: skip
    _check_cross_steps(steps)
    # the same teacher, the same re-tokenized ids: the same step (float rounding apart)
    assert steps[0]["loss"] == pytest.approx(local_steps[0]["loss"], abs=1e-5)
    assert steps[0]["opd/reverse_kl_k1"] == pytest.approx(
        local_steps[0]["opd/reverse_kl_k1"], abs=1e-5
    )


def test_served_teacher_needs_the_tokenizer_to_re_tokenize_with(
    tiny_student, prompt_file, tmp_path, capsys
):
    argv = ["distill", "--model_name_or_path", str(tiny_student), "--dataset_name",
            str(prompt_file), "--output_dir", str(tmp_path), "--report_to", "none",
            "--teacher_mode", "server", "--teacher_urls", "http://127.0.0.1:9",
            "--teacher_cross_tokenizer", "true"]  # fmt: skip
    assert main(argv) != 0
    assert "set teacher_tokenizer_name_or_path" in capsys.readouterr().err


@pytest.fixture(scope="module")
def text_rollouts(tmp_path_factory) -> Path:
    """Prompt/completion text of the student's format (answers then nothing: EOS is added by the
    trainer's stored rollouts, not here)."""
    rows = [
        {"prompt": f"{a}+{b}=", "completion": answer, "answer": str(a + b),
         "prompt_index": 4 * a + b, "sample_index": sample}
        for a in range(4)
        for b in range(4)
        for sample, answer in enumerate((str(a + b), str(a * b + 10)))  # one of 2 is wrong
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("rollouts") / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_precomputed_shards_of_a_teacher_of_another_tokenizer(
    tiny_student, bpe_teacher, text_rollouts, tmp_path, capsys
):
    shards = tmp_path / "shards"
    argv = ["--rollouts", str(text_rollouts), "--tokenizer_name_or_path", str(tiny_student),
            "--teacher_model_name_or_path", str(bpe_teacher), "--output_dir", str(shards),
            "--teacher_top_k", "4", "--teacher_cross_tokenizer", "true"]  # fmt: skip
    assert precompute_main(argv) == 0
    cross = read_manifest(shards)["teacher"]["cross_tokenizer"]
    assert cross["enabled"] is True and cross["alignment"].startswith("char-offsets-v1")
    assert (
        cross["student_tokenizer"]["vocab_size"]
        != read_manifest(shards)["teacher"]["tokenizer"]["vocab_size"]
    )  # both tokenizers recorded
    common = ["--teacher_mode", "offline", "--teacher_shards", str(shards),
              "--teacher_model_name_or_path", str(bpe_teacher), "--teacher_top_k", "4",
              "--opd_divergence", "jsd", "--opd_cross_vocab", "hybrid"]  # fmt: skip
    refused = ["distill", "--model_name_or_path", str(tiny_student), "--output_dir",
               str(tmp_path / "refused"), "--report_to", "none", *common]  # fmt: skip
    assert main(refused) != 0
    assert "precomputed with teacher_cross_tokenizer" in capsys.readouterr().err
    steps = distill(tiny_student, None, tmp_path / "run", *common,
                    "--teacher_cross_tokenizer", "true")  # fmt: skip
    for entry in steps:
        assert entry["opd/uld_distance"] > 0
