"""`RoutedTeacher` (MOPD): each row scored by its route's teacher; `build_teacher` with routes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from opd.config import ConfigError
from opd.demo.tiny import build_char_tokenizer, build_tiny_model, save_tiny
from opd.teacher.build import build_teacher
from opd.teacher.local import LocalTeacher
from opd.teacher.routed import RoutedTeacher, select_rows
from opd.types import RolloutBatch


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def teachers(tokenizer) -> dict[str, LocalTeacher]:
    """Two real tiny teachers with different weights and the same tokenizer."""
    return {
        name: LocalTeacher(build_tiny_model(len(tokenizer), seed=seed), tokenizer=tokenizer)
        for name, seed in (("math", 1), ("code", 2))
    }


def _batch(routes: list[str] | None) -> RolloutBatch:
    return RolloutBatch(
        prompt_ids=[[4, 13], [5, 6, 7, 13], [4], [8, 9]],
        completion_ids_BT=torch.tensor([[6, 7, 2], [8, 2, 0], [9, 9, 9], [5, 5, 0]]),
        completion_mask_BT=torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]]),
        sampler_logprobs_BT=-torch.arange(12, dtype=torch.float32).reshape(4, 3),
        stop_reason_B=["stop", "stop", "length", "stop"],
        teacher_prompt_ids=[[4, 13], [5, 6, 7, 13], [10, 11, 4], [8, 9]],  # row 2: privileged
        teacher_route_B=routes,
    )


ROUTES = ["code", "math", "math", "code"]


@pytest.mark.parametrize("top_k", [0, 4])
def test_each_row_gets_its_own_teachers_scores(teachers, top_k):
    batch = _batch(ROUTES)
    routed = RoutedTeacher(teachers).score(batch, top_k=top_k)
    assert routed.sampled_logprobs_BT.shape == (4, 3) and routed.top_k == top_k
    torch.testing.assert_close(routed.completion_mask_BT, batch.completion_mask_BT)
    own = {name: teacher.score(batch, top_k=top_k) for name, teacher in teachers.items()}
    for row, name in enumerate(ROUTES):
        expected = own[name]
        torch.testing.assert_close(
            routed.sampled_logprobs_BT[row], expected.sampled_logprobs_BT[row], atol=1e-5, rtol=0
        )
        if top_k:
            assert torch.equal(routed.topk_ids_BTK[row], expected.topk_ids_BTK[row])
            torch.testing.assert_close(
                routed.topk_logprobs_BTK[row], expected.topk_logprobs_BTK[row], atol=1e-5, rtol=0
            )
    # The two teachers really disagree, so a wrong route would fail the checks above.
    assert not torch.allclose(own["math"].sampled_logprobs_BT, own["code"].sampled_logprobs_BT)


def test_teacher_id_and_metrics(teachers):
    routed_teacher = RoutedTeacher(teachers)
    assert routed_teacher.teacher_id == "routed(math=Qwen2ForCausalLM,code=Qwen2ForCausalLM)"
    scores = routed_teacher.score(_batch(["math", "math", "math", "code"]))
    assert scores.teacher_id == routed_teacher.teacher_id
    assert scores.metrics["teacher/route_math_rows"] == 3.0
    assert scores.metrics["teacher/route_code_rows"] == 1.0
    assert scores.metrics["teacher/latency_s"] > 0


def test_a_route_without_rows_is_reported_as_zero(teachers):
    scores = RoutedTeacher(teachers).score(_batch(["math"] * 4), top_k=2)
    assert scores.metrics["teacher/route_code_rows"] == 0.0
    expected = teachers["math"].score(_batch(None), top_k=2)
    torch.testing.assert_close(scores.sampled_logprobs_BT, expected.sampled_logprobs_BT)


def test_an_empty_batch_scores_to_empty_tensors(teachers):
    empty = RolloutBatch(
        prompt_ids=[],
        completion_ids_BT=torch.zeros(0, 3, dtype=torch.long),
        completion_mask_BT=torch.zeros(0, 3, dtype=torch.long),
        teacher_route_B=[],
    )
    scores = RoutedTeacher(teachers).score(empty, top_k=2)
    assert scores.sampled_logprobs_BT.shape == (0, 3) and scores.topk_ids_BTK.shape == (0, 3, 2)


def test_unknown_or_missing_routes_raise(teachers):
    with pytest.raises(ConfigError, match=r"\['poetry'\].*available routes are: math, code"):
        RoutedTeacher(teachers).score(_batch(["math", "poetry", "code", "math"]))
    with pytest.raises(ConfigError, match=r"no teacher_route_B.*math, code"):
        RoutedTeacher(teachers).score(_batch(None))


def test_select_rows_keeps_every_field_aligned():
    batch = _batch(ROUTES)
    sub = select_rows(batch, [3, 1])
    assert sub.prompt_ids == [[8, 9], [5, 6, 7, 13]]
    assert sub.teacher_prompt_ids == [[8, 9], [5, 6, 7, 13]]
    assert sub.stop_reason_B == ["stop", "stop"]
    assert torch.equal(sub.completion_ids_BT, batch.completion_ids_BT[[3, 1]])
    assert torch.equal(sub.completion_mask_BT, batch.completion_mask_BT[[3, 1]])
    assert torch.equal(sub.sampler_logprobs_BT, batch.sampler_logprobs_BT[[3, 1]])
    assert sub.teacher_route_B is None


def test_check_student_tokenizer_checks_every_route(teachers, tokenizer):
    other = build_char_tokenizer("abc")
    routed = RoutedTeacher(teachers)
    routed.check_student_tokenizer(tokenizer)
    with pytest.raises(ConfigError):
        routed.check_student_tokenizer(other)


def _route_args(mode: str, routes: list[str]) -> SimpleNamespace:
    return SimpleNamespace(
        teacher_mode=mode,
        teacher_routes=routes,
        teacher_model_name_or_path=None,
        teacher_urls=[],
        teacher_temperature=1.0,
        teacher_batch_size=4,
    )


def test_build_teacher_routes_local_models(tmp_path):
    math_path = save_tiny(tmp_path / "math", seed=1)
    code_path = save_tiny(tmp_path / "code", seed=2)
    # The student's tokenizer as a run loads it: from disk, like the teachers' own.
    student_tokenizer = AutoTokenizer.from_pretrained(math_path)
    args = _route_args("local", [f"math={math_path}", f" code = {code_path}"])
    teacher = build_teacher(args, student_tokenizer=student_tokenizer)
    assert isinstance(teacher, RoutedTeacher)
    assert teacher.teacher_id == f"routed(math={math_path},code={code_path})"
    assert args.teacher_routes and args.teacher_model_name_or_path is None  # args untouched
    batch = _batch(ROUTES)
    scores = teacher.score(batch)
    for row, name in enumerate(ROUTES):
        expected = LocalTeacher.from_pretrained(str(tmp_path / name)).score(batch)
        torch.testing.assert_close(
            scores.sampled_logprobs_BT[row], expected.sampled_logprobs_BT[row], atol=1e-5, rtol=0
        )


@pytest.mark.parametrize(
    ("mode", "routes", "message"),
    [
        ("local", ["math"], "'math' is not NAME=TEACHER"),
        ("local", ["=path"], "'=path' is not NAME=TEACHER"),
        ("local", ["math="], "'math=' is not NAME=TEACHER"),
        ("local", ["a=x", "a=y"], "names the route 'a' twice"),
        ("server", ["a=localhost:8000"], "is a URL starting with http://"),
        ("offline", ["a=x"], "routing supports local, server, vllm"),
    ],
)
def test_build_teacher_rejects_bad_routes(mode, routes, message):
    with pytest.raises(ConfigError, match=message):
        build_teacher(_route_args(mode, routes))
