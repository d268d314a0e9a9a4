"""The real teacher server on loopback: `opd teacher serve` + `ServerTeacher` against the tiny
teacher.

Servers run in-process (uvicorn in a thread, built by `opd.commands.serve.build_app`) and, once,
through the real CLI in a subprocess. Scores are compared with an in-process `LocalTeacher`
forward of the same model. Run: `.venv/bin/pytest tests/integration/test_teacher_server.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import torch
from safetensors.torch import save as safetensors_save
from transformers import AutoModelForCausalLM, AutoTokenizer

import opd
from opd.cli import command_runner
from opd.commands.serve import (
    ServeArguments,
    build_app,
    build_backend,
    max_sequence_tokens,
    transformers_context_length,
)
from opd.config import ConfigError
from opd.demo.tiny import build_char_tokenizer
from opd.teacher.batching import (
    ScoreBatcher,
    group_requests,
    merge_requests,
    plan_padded_calls,
    split_scores,
)
from opd.teacher.client import ServerTeacher
from opd.teacher.consistency import tokenizer_fingerprint
from opd.teacher.http import RetryPolicy, TeacherRequestError, TeacherUnavailableError
from opd.teacher.local import LocalTeacher
from opd.teacher.wire import (
    CONTENT_TYPE,
    DEFAULT_MAX_RESPONSE_BYTES,
    ScoreRequest,
    WireError,
    decode_scores,
    encode_request,
    make_request,
)
from opd.types import RolloutBatch

API_KEY = "test-key"
VOCAB = 49  # the char tokenizer of opd.demo.tiny
LIMITS = {"max_top_k": 8, "max_sequence_tokens": 64, "max_sequences": 64}
MAX_BODY_BYTES = 16384
FAST_RETRY = RetryPolicy(budget_s=20.0, first_backoff_s=0.1, max_backoff_s=0.5)

serve_main = command_runner("teacher serve")


# ------------------------------------------------------------------------------------------------
# Servers
# ------------------------------------------------------------------------------------------------


def _serve_arguments(model, **overrides) -> ServeArguments:
    values = {
        "model": str(model),
        "api_key": API_KEY,
        "batch_size": 4,
        "max_batch_tokens": 2048,
        "max_body_bytes": MAX_BODY_BYTES,
        **LIMITS,
    }
    return ServeArguments(**{**values, **overrides})


@pytest.fixture(scope="module")
def server_url(tiny_teacher, teacher_backend, serve_teacher):
    """The app `opd teacher serve` builds, run with the uvicorn configuration it runs with."""
    args = _serve_arguments(tiny_teacher, port=0, log_level="warning")
    with serve_teacher(args, teacher_backend) as url:
        yield url


@pytest.fixture(scope="module")
def cli_server_url(tiny_teacher, tmp_path_factory, free_port, serve_subprocess):
    """`python -m opd.cli teacher serve` in a subprocess (the real entry point, dashed flags)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("cli_server") / "server.log"
    command = [
        sys.executable, "-m", "opd.cli", "teacher", "serve", "--model", str(tiny_teacher),
        "--port", str(port), "--api-key", API_KEY, "--max-top-k", "8",
        "--max_sequence_tokens", "64", "--log_level", "warning",
    ]  # fmt: skip
    with serve_subprocess(command, port, log_path) as url:
        yield url, log_path


@pytest.fixture(scope="module")
def reference(tiny_teacher) -> LocalTeacher:
    """An independent in-process forward of the same weights (the expected scores)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32)
    return LocalTeacher(model)


def _post(url: str, body, *, api_key: str | None = API_KEY, **kwargs) -> httpx.Response:
    headers = {"Content-Type": CONTENT_TYPE}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    return httpx.post(f"{url}/v1/score", content=body, headers=headers, timeout=60, **kwargs)


def _stats(url: str) -> dict[str, int]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return httpx.get(f"{url}/info", headers=headers, timeout=10).json()["stats"]


def _assert_scores_equal(actual, expected) -> None:
    """Equal scores; `expected` may hold one top-k column more than `actual`, so that a near-tie
    between the last returned token and the next one is seen too."""
    torch.testing.assert_close(
        actual.sampled_logprobs_M, expected.sampled_logprobs_M, atol=1e-5, rtol=0
    )
    assert torch.equal(actual.completion_lengths_B, expected.completion_lengths_B)
    if expected.topk_ids_MK is None:
        assert actual.topk_ids_MK is None
        return
    top_k = actual.topk_ids_MK.shape[1]
    torch.testing.assert_close(
        actual.topk_logprobs_MK, expected.topk_logprobs_MK[:, :top_k], atol=1e-5, rtol=0
    )
    # Ids must agree except between near-tied neighbours: a server batch pads differently from
    # the one-request reference, and 1e-7 of rounding may swap two tokens 1e-6 apart.
    values_MK = expected.topk_logprobs_MK
    gaps_MK = (values_MK[:, :-1] - values_MK[:, 1:]).abs()
    tied_MK = torch.zeros_like(values_MK, dtype=torch.bool)
    tied_MK[:, :-1] |= gaps_MK < 2e-5
    tied_MK[:, 1:] |= gaps_MK < 2e-5
    kept_MK = ~tied_MK[:, :top_k]
    assert torch.equal(actual.topk_ids_MK.long()[kept_MK], expected.topk_ids_MK[:, :top_k][kept_MK])


def _random_request(seed: int) -> ScoreRequest:
    """1-4 sequences of random ids; top-k and temperature vary with the seed."""
    generator = torch.Generator().manual_seed(seed)

    def ids(low: int, high: int) -> list[int]:
        length = int(torch.randint(low, high, (1,), generator=generator))
        return torch.randint(0, VOCAB, (length,), generator=generator).tolist()

    num_sequences = 1 + seed % 4
    return make_request(
        [ids(1, 20) for _ in range(num_sequences)],
        [ids(1, 12) for _ in range(num_sequences)],
        top_k=4 if seed % 2 else 0,
        temperature=0.7 if seed % 3 == 0 else 1.0,
    )


def _batch() -> RolloutBatch:
    """Five rows: a privileged teacher context (row 2), an all-masked row (3), a masked hole (4)."""
    generator = torch.Generator().manual_seed(0)
    return RolloutBatch(
        prompt_ids=[[4, 13], [5, 6, 7, 13], [4], [8, 9], [10, 11, 12]],
        completion_ids_BT=torch.randint(3, VOCAB, (5, 7), generator=generator),
        completion_mask_BT=torch.tensor(
            [[1] * 7, [1, 1, 1, 0, 0, 0, 0], [1] * 5 + [0, 0], [0] * 7, [1, 1, 0, 0, 1, 1, 0]]
        ),
        teacher_prompt_ids=[[4, 13], [5, 6, 7, 13], [20, 21, 22, 4], [8, 9], [10, 11, 12]],
    )


def _assert_batch_scores_equal(actual, expected) -> None:
    torch.testing.assert_close(
        actual.sampled_logprobs_BT, expected.sampled_logprobs_BT, atol=1e-5, rtol=0
    )
    assert torch.equal(actual.topk_ids_BTK, expected.topk_ids_BTK)
    torch.testing.assert_close(
        actual.topk_logprobs_BTK, expected.topk_logprobs_BTK, atol=1e-5, rtol=0
    )


# ------------------------------------------------------------------------------------------------
# Batching pieces, in-process
# ------------------------------------------------------------------------------------------------


def test_merge_then_split_equals_separate_forwards(reference):
    requests = [_random_request(seed) for seed in (1, 5, 7)]  # same top-k and temperature
    assert group_requests(requests) == [[0, 1, 2]]
    parts = split_scores(
        reference.score_sequences(merge_requests(requests)), [r.num_sequences for r in requests]
    )
    for request, part in zip(requests, parts, strict=True):
        _assert_scores_equal(part, reference.score_sequences(request))


def test_group_requests_by_top_k_and_temperature():
    requests = [_random_request(seed) for seed in range(6)]  # (top_k, temperature) per seed
    assert group_requests(requests) == [[0], [1, 5], [2, 4], [3]]


def test_batcher_fills_the_token_budget_and_runs_a_big_request_alone(reference):
    """Requests queued together are scored in budget-sized batches, each with its own answer."""
    requests = [make_request([[5] * 10], [[6] * 10], top_k=2) for _ in range(5)]  # 20 tokens each
    requests.append(make_request([[7] * 40], [[8] * 30], top_k=2))  # 70 tokens: over the budget

    async def score_all():
        batcher = ScoreBatcher(reference, max_batch_tokens=60)
        results = await asyncio.gather(*(batcher.score(r) for r in requests))
        await batcher.close()
        return results, batcher.stats

    results, stats = asyncio.run(score_all())
    # 3 + 2 requests fit in 60 tokens; the 70-token one runs alone.
    assert (stats.batches, stats.requests, stats.sequences, stats.tokens) == (3, 6, 6, 170)
    for request, result in zip(requests, results, strict=True):
        _assert_scores_equal(result, reference.score_sequences(request))


def test_plan_padded_calls_keeps_each_call_within_the_padded_budget():
    request = make_request([[1] * 9, [1], [1, 1], [1] * 9, [1]], [[2]] * 5)  # 10, 2, 3, 10, 2
    # Shortest first: 3 x 3 = 9 fits 12; a 10-token sequence with them would pad to 40.
    assert plan_padded_calls(request, max_padded_tokens=12) == [[1, 4, 2], [0], [3]]
    assert plan_padded_calls(request, max_padded_tokens=50) == [[0, 1, 2, 3, 4]]  # 5 x 10


def test_a_padding_backend_gets_calls_within_the_budget_and_the_same_scores(reference):
    """A spy around the real `LocalTeacher` records each call's padded size (B x longest)."""

    class PaddedSizes:
        def __init__(self, inner):
            self.inner, self.padded_sizes = inner, []

        def score_sequences(self, request):
            lengths = request.context_lengths_B + request.completion_lengths_B
            self.padded_sizes.append(request.num_sequences * int(lengths.max()))
            return self.inner.score_sequences(request)

    long_one = make_request([list(range(3, 23))], [[30, 31, 32, 33]], top_k=2)  # 24 tokens
    short_ones = make_request([[4, 5], [6, 7], [8, 9], [10, 11]], [[12], [13], [14], [15]], top_k=2)
    requests = [long_one, short_ones]  # 36 real tokens; merged, 5 sequences pad to 5 x 24
    spy = PaddedSizes(reference)

    async def score_all():
        batcher = ScoreBatcher(spy, max_batch_tokens=40, pads_batches=True)
        results = await asyncio.gather(*(batcher.score(r) for r in requests))
        await batcher.close()
        return results, batcher.stats

    results, stats = asyncio.run(score_all())
    # One batch (36 real tokens fit 40), two calls: the short ones together (4 x 3), the long one
    # alone (1 x 24); merged, they would have padded to 120.
    assert (stats.batches, stats.backend_calls) == (1, 2)
    assert sorted(spy.padded_sizes) == [12, 24]
    for request, result in zip(requests, results, strict=True):
        _assert_scores_equal(result, reference.score_sequences(request))


def test_max_sequence_tokens_defaults_to_the_teachers_context(tiny_teacher, teacher_backend):
    def limit(**overrides) -> int:
        return max_sequence_tokens(_serve_arguments(tiny_teacher, **overrides), teacher_backend)

    assert teacher_backend.model.config.max_position_embeddings == 128
    assert limit(max_sequence_tokens=None) == 128
    assert limit(max_sequence_tokens=32768) == 128  # capped to the context
    assert limit(max_sequence_tokens=64) == 64
    assert limit(max_sequence_tokens=None, max_batch_tokens=100) == 100  # one call holds one
    no_positions = SimpleNamespace()
    assert transformers_context_length(no_positions, SimpleNamespace(model_max_length=512)) == 512
    assert transformers_context_length(no_positions, SimpleNamespace(model_max_length=1e30)) is None


# ------------------------------------------------------------------------------------------------
# Through HTTP
# ------------------------------------------------------------------------------------------------


def test_server_scores_equal_local_forward(server_url, reference, tiny_teacher):
    batch = _batch()
    expected = LocalTeacher(reference.model, temperature=1.3).score(batch, top_k=4)
    with ServerTeacher([server_url], api_key=API_KEY, temperature=1.3, batch_size=2) as teacher:
        actual = teacher.score(batch, top_k=4)
        sampled_only = teacher.score(batch)
    _assert_batch_scores_equal(actual, expected)
    assert torch.equal(actual.sampled_logprobs_BT, sampled_only.sampled_logprobs_BT)
    assert sampled_only.topk_ids_BTK is None
    assert actual.sampled_logprobs_BT[3].eq(0).all() and actual.sampled_logprobs_BT[4, 2] == 0
    assert actual.teacher_id == tiny_teacher.name and actual.temperature == 1.3
    assert (
        actual.metrics["teacher/request_bytes"] > 0 and actual.metrics["teacher/response_bytes"] > 0
    )
    assert actual.metrics["teacher/latency_s"] > 0


def test_info_describes_the_teacher(server_url, tiny_teacher):
    assert httpx.get(f"{server_url}/health").json() == {"status": "ok"}  # no auth needed
    with ServerTeacher([server_url], api_key=API_KEY) as teacher:
        info = teacher.info()
        assert teacher.teacher_id == tiny_teacher.name  # the folder's name, never its path
    assert info["model"] == tiny_teacher.name and info["backend"] == "transformers"
    assert info["vocab_size"] == VOCAB and info["eos_token_ids"] == [2]
    assert info["tokenizer"] == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_teacher))
    assert (info["max_top_k"], info["max_sequence_tokens"], info["max_sequences"]) == (8, 64, 64)
    assert (info["max_body_bytes"], info["max_batch_tokens"]) == (MAX_BODY_BYTES, 2048)
    assert (info["max_response_bytes"], info["max_headers"]) == (DEFAULT_MAX_RESPONSE_BYTES, 100)
    assert info["wire_format"] == CONTENT_TYPE and info["version"] == opd.__version__
    assert set(info["stats"]) == {"requests", "sequences", "tokens", "batches", "backend_calls"}


def _tensors(**overrides) -> dict[str, torch.Tensor]:
    tensors = {
        "context_ids": torch.tensor([3, 4, 5]),
        "context_lengths": torch.tensor([2, 1]),
        "completion_ids": torch.tensor([6, 7, 8]),
        "completion_lengths": torch.tensor([1, 2]),
    }
    return {**tensors, **overrides}


def _body(metadata=None, **overrides) -> bytes:
    return safetensors_save(_tensors(**overrides), metadata=metadata)


BAD_REQUESTS = {
    "malformed body": (b"\x00not safetensors", {}, 400, "not a valid safetensors blob"),
    "wrong dtype": (_body(context_ids=torch.tensor([3, 4, 5]).short()), {}, 400, "dtype int16"),
    "wrong shape": (_body(completion_ids=torch.tensor([[6, 7, 8]])), {}, 400, "1 dimension"),
    "negative id": (_body(context_ids=torch.tensor([3, -1, 5])), {}, 400, "token id -1 is outside"),
    "out-of-vocab id": (_body(completion_ids=torch.tensor([6, VOCAB, 8])), {}, 400, "[0, 49)"),
    "empty sequence": (
        _body(completion_lengths=torch.tensor([0, 3])), {}, 400, "sequence 0 has an empty"
    ),
    "over-long input": (
        _body(context_ids=torch.ones(65, dtype=torch.int64), context_lengths=torch.tensor([64, 1])),
        {},
        413,
        "sequence 0 has 65 tokens; the limit is 64",
    ),
    "too-big body": (b"x" * (MAX_BODY_BYTES + 1), {}, 413, f"larger than {MAX_BODY_BYTES} bytes"),
    "too-big chunked body": (
        iter([b"x" * MAX_BODY_BYTES, b"x"]), {}, 413, f"larger than {MAX_BODY_BYTES} bytes"
    ),
    "top_k above limit": (_body({"top_k": "9"}), {}, 400, "top_k=9 is outside [0, 8]"),
    "missing token": (_body(), {"api_key": None}, 401, "missing bearer token"),
    "wrong token": (_body(), {"api_key": "wrong"}, 401, "wrong API key"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_4xx_and_the_server_keeps_serving(server_url, reference, case):
    body, kwargs, status, message = BAD_REQUESTS[case]
    response = _post(server_url, body, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]

    good = _random_request(seed=7)
    response = _post(server_url, encode_request(good))
    assert response.status_code == 200 and response.headers["content-type"] == CONTENT_TYPE
    _assert_scores_equal(decode_scores(response.content)[0], reference.score_sequences(good))


def test_info_needs_the_key(server_url):
    assert httpx.get(f"{server_url}/info").status_code == 401
    teacher = ServerTeacher([server_url], api_key="wrong")
    with teacher, pytest.raises(TeacherRequestError, match=r"HTTP 401\): wrong API key"):
        teacher.info()


def test_client_rejects_top_k_above_the_server_limit(server_url):
    before = _stats(server_url)["requests"]
    teacher = ServerTeacher([server_url], api_key=API_KEY)
    with teacher, pytest.raises(ConfigError, match=r"teacher_top_k=9 is above .* max_top_k=8"):
        teacher.score(_batch(), top_k=9)
    assert _stats(server_url)["requests"] == before  # refused before sending


def test_concurrent_requests_are_batched_and_answered_separately(server_url, reference):
    requests = [_random_request(seed) for seed in range(32)]
    before = _stats(server_url)
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(lambda r: _post(server_url, encode_request(r)), requests))
    after = _stats(server_url)
    for request, response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        one_more = dataclasses.replace(request, top_k=request.top_k + 1 if request.top_k else 0)
        _assert_scores_equal(
            decode_scores(response.content)[0], reference.score_sequences(one_more)
        )
    assert after["requests"] - before["requests"] == 32
    assert after["sequences"] - before["sequences"] == sum(r.num_sequences for r in requests)
    assert after["batches"] - before["batches"] < 32


BACKEND_ERRORS = {
    "crash": (RuntimeError("CUDA out of memory (simulated)"), 500, "RuntimeError: CUDA out of"),
    "backend limit": (WireError("temperature 1 only", status=422), 422, "temperature 1 only"),
}


@pytest.mark.parametrize("case", list(BACKEND_ERRORS))
def test_backend_failure_fails_one_request_and_the_server_keeps_serving(
    teacher_backend, tiny_teacher, reference, case, serve_in_thread
):
    """A fake backend here: the real one cannot be made to fail on demand."""
    error, status, message = BACKEND_ERRORS[case]

    class FailsOnce:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0
            self.model, self.vocab_size, self.tokenizer = (
                inner.model, inner.vocab_size, inner.tokenizer
            )  # fmt: skip

        def score_sequences(self, request):
            self.calls += 1
            if self.calls == 1:
                raise error
            return self.inner.score_sequences(request)

    app = build_app(_serve_arguments(tiny_teacher), FailsOnce(teacher_backend))
    request = _random_request(seed=2)
    with serve_in_thread(app) as url:
        failed = _post(url, encode_request(request))
        assert failed.status_code == status and message in failed.json()["detail"]
        response = _post(url, encode_request(request))
    assert response.status_code == 200
    _assert_scores_equal(decode_scores(response.content)[0], reference.score_sequences(request))


def test_two_urls_share_the_load(server_url, cli_server_url, reference, tiny_teacher):
    cli_url, log_path = cli_server_url
    banner = f"opd teacher serve: {tiny_teacher.name} (transformers) on {cli_url}"
    assert banner in log_path.read_text()
    before = [_stats(server_url)["requests"], _stats(cli_url)["requests"]]
    batch = _batch()
    with ServerTeacher([server_url, cli_url], api_key=API_KEY, batch_size=1) as teacher:
        teacher.check_student_tokenizer(AutoTokenizer.from_pretrained(tiny_teacher))
        actual = teacher.score(batch, top_k=3)
    # Four non-empty rows, one per chunk: chunks 0 and 2 start at the first URL, 1 and 3 at the
    # second, and healthy servers keep them there.
    after = [_stats(server_url)["requests"], _stats(cli_url)["requests"]]
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 2]
    _assert_batch_scores_equal(actual, reference.score(batch, top_k=3))


def test_servers_of_different_teachers_are_refused(
    server_url, tiny_student, tiny_teacher, serve_in_thread
):
    student_args = _serve_arguments(tiny_student)
    with serve_in_thread(build_app(student_args, build_backend(student_args))) as other_url:
        teacher = ServerTeacher([server_url, other_url], api_key=API_KEY)
        message = re.escape(f"disagree on their model: {server_url} has '{tiny_teacher.name}'")
        with teacher, pytest.raises(ConfigError, match=message):
            teacher.server_info()
    teacher = ServerTeacher([server_url], api_key=API_KEY, expected_model="Qwen/Qwen3-8B")
    message = re.escape(
        f"serves '{tiny_teacher.name}', but teacher_model_name_or_path is 'Qwen/Qwen3-8B'"
    )
    with teacher, pytest.raises(ConfigError, match=message):
        teacher.server_info()


def test_student_tokenizer_mismatch_names_the_server(server_url, tiny_student):
    with ServerTeacher([server_url], api_key=API_KEY) as teacher:
        teacher.check_student_tokenizer(AutoTokenizer.from_pretrained(tiny_student))  # same tokens
        message = re.escape(f"{server_url}/info") + ".*vocab_size: student 6 vs teacher"
        with pytest.raises(ConfigError, match=message):
            teacher.check_student_tokenizer(build_char_tokenizer("abc"))


def test_unreachable_url_fails_within_the_budget(free_port):
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    teacher = ServerTeacher([url], retry=RetryPolicy(budget_s=1.0, first_backoff_s=0.1))
    message = re.escape(url) + ".*teacher_retry_budget_s"
    with teacher, pytest.raises(TeacherUnavailableError, match=message):
        teacher.score(_batch())
    assert time.monotonic() - start < 5


def test_a_server_that_comes_back_within_the_budget_is_used(
    teacher_backend, tiny_teacher, reference, serve_in_thread, free_port
):
    port = free_port()
    batch = _batch()
    results = {}

    def score() -> None:
        with ServerTeacher([f"http://127.0.0.1:{port}"], api_key=API_KEY, retry=FAST_RETRY) as t:
            results["scores"] = t.score(batch, top_k=2)

    client = threading.Thread(target=score)
    client.start()
    time.sleep(1.0)  # the client is retrying against a closed port by now
    with serve_in_thread(build_app(_serve_arguments(tiny_teacher), teacher_backend), port=port):
        client.join(timeout=30)
    assert "scores" in results
    _assert_batch_scores_equal(results["scores"], reference.score(batch, top_k=2))


def test_serve_main_reports_a_missing_model(capsys):
    assert serve_main(["--model", "/nonexistent/teacher"]) == 2
    err = capsys.readouterr().err
    assert "'/nonexistent/teacher' does not exist" in err and "Traceback" not in err


def test_serve_main_help_lists_both_flag_spellings(capsys):
    assert serve_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--api_key" in out and "--api-key" in out and "--max_top_k" in out


def test_api_key_falls_back_to_the_environment(
    tiny_teacher, teacher_backend, monkeypatch, serve_in_thread
):
    monkeypatch.setenv("OPD_TEACHER_API_KEY", "from-env")
    with serve_in_thread(
        build_app(_serve_arguments(tiny_teacher, api_key=None), teacher_backend)
    ) as url:
        assert _post(url, _body(), api_key=None).status_code == 401
        assert _post(url, _body(), api_key="from-env").status_code == 200
