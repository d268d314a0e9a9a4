"""Teacher v2 on a real loopback server: hidden-state mode and candidate-set scoring.

The server is `opd teacher serve`'s own app (transformers backend, tiny teacher) in a thread.
Expected values come from an in-process `LocalTeacher` of the same weights: its hidden states,
its head, and the per-token divergences, baselines and gradients the fused kernels compute from
them. Run: `.venv/bin/pytest tests/integration/test_teacher_hidden.py`.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.arguments import ConfigError
from opd.commands.serve import ServeArguments, build_backend
from opd.kernels import fused_linear_divergence_loss
from opd.objectives.token_stats import completion_token_stats
from opd.teacher.client import ServerTeacher
from opd.teacher.hidden_client import HiddenStateServerTeacher
from opd.teacher.http import RetryPolicy
from opd.teacher.local import LocalTeacher
from opd.teacher.output_head import HeadCache, decode_head, head_digest, head_info
from opd.teacher.protocol import CandidateScorer, FullDistributionTeacher
from opd.teacher.wire import CONTENT_TYPE, encode_request, request_from_batch
from opd.types import Baseline, RolloutBatch

FAST_RETRY = RetryPolicy(budget_s=5.0, first_backoff_s=0.05, max_backoff_s=0.2)
VOCAB = 49  # the char tokenizer of opd.demo.tiny


def _args(model, **overrides) -> ServeArguments:
    values = {"model": str(model), "batch_size": 4, "port": 0, "log_level": "warning"}
    return ServeArguments(**{**values, **overrides})


@pytest.fixture(scope="module")
def server_url(tiny_teacher, teacher_backend, serve_teacher):
    with serve_teacher(_args(tiny_teacher), teacher_backend) as url:
        yield url


@pytest.fixture(scope="module")
def local(tiny_teacher) -> LocalTeacher:
    """An independent in-process copy of the served weights (the expected values)."""
    return LocalTeacher(AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32))


@pytest.fixture(scope="module")
def student():
    """A student head and hidden states of the teacher's vocabulary (fixed random values)."""
    generator = torch.Generator().manual_seed(0)
    return {
        "weight_VH": torch.randn(VOCAB, 24, generator=generator) * 0.3,
        "generator": generator,
    }


def _batch(seed: int = 0, rows: int = 5, tokens: int = 7) -> RolloutBatch:
    """Ragged rows: different prompt lengths, right padding, a masked token inside a row and an
    all-masked row."""
    generator = torch.Generator().manual_seed(seed)
    ids_BT = torch.randint(3, VOCAB, (rows, tokens), generator=generator)
    mask_BT = torch.ones(rows, tokens)
    mask_BT[1, 4:] = 0
    mask_BT[2, 2] = 0  # e.g. a tool output: context for the tokens after it, never scored
    mask_BT[3] = 0
    prompts = [[1 + (i + j) % 40 for j in range(2 + 3 * i)] for i in range(rows)]
    return RolloutBatch(prompt_ids=prompts, completion_ids_BT=ids_BT, completion_mask_BT=mask_BT)


def _hidden_teacher(url, tmp_path, **kwargs) -> HiddenStateServerTeacher:
    return HiddenStateServerTeacher(
        [url], retry=FAST_RETRY, head_cache=HeadCache(tmp_path / "heads"), **kwargs
    )


# ------------------------------------------------------------------------------------------------
# Hidden-state mode
# ------------------------------------------------------------------------------------------------


def test_hidden_state_mode_equals_the_in_process_teacher(server_url, local, student, tmp_path):
    """Scores, hidden states, head, and from them the exact reverse KL, the full vOPD baseline
    and the full-divergence loss and its gradient: as the in-process teacher gives them (fp32)."""
    remote = _hidden_teacher(server_url, tmp_path)
    assert isinstance(remote, FullDistributionTeacher)
    assert not isinstance(ServerTeacher([server_url]), FullDistributionTeacher)
    batch = _batch()
    scores = remote.score(batch, top_k=5)
    expected_scores = local.score(batch, top_k=5)
    torch.testing.assert_close(
        scores.sampled_logprobs_BT, expected_scores.sampled_logprobs_BT, atol=1e-5, rtol=0
    )
    hidden_BTH = remote.completion_hidden_states(batch)
    expected_BTH = local.completion_hidden_states(batch)
    keep_BT = batch.completion_mask_BT.bool()
    assert torch.equal(remote.output_weight, local.output_weight)
    torch.testing.assert_close(hidden_BTH[keep_BT], expected_BTH[keep_BT], atol=1e-5, rtol=0)
    assert hidden_BTH[~keep_BT].abs().max() == 0

    student_NH = torch.randn(int(keep_BT.sum()), 24, generator=student["generator"])
    ids_N = batch.completion_ids_BT[keep_BT]

    def stats(teacher_NH, teacher_VH):
        return completion_token_stats(
            student_NH, student["weight_VH"], ids_N, teacher_hidden_NH=teacher_NH,
            teacher_weight_VH=teacher_VH, baseline=Baseline.FULL,
        )  # fmt: skip

    got = stats(hidden_BTH[keep_BT], remote.output_weight)
    want = stats(expected_BTH[keep_BT], local.output_weight)
    torch.testing.assert_close(got.reverse_kl, want.reverse_kl, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.baseline_kl, want.baseline_kl, atol=1e-5, rtol=0)

    def loss_and_grad(teacher_NH, teacher_VH):
        hidden_NH = student_NH.clone().requires_grad_(True)
        loss, _ = fused_linear_divergence_loss(
            hidden_NH, student["weight_VH"], teacher_hidden=teacher_NH, teacher_weight=teacher_VH,
            kind="reverse_kl",
        )  # fmt: skip
        loss.backward()
        return loss.detach(), hidden_NH.grad

    loss, grad = loss_and_grad(hidden_BTH[keep_BT], remote.output_weight)
    expected_loss, expected_grad = loss_and_grad(expected_BTH[keep_BT], local.output_weight)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=0)
    remote.close()


def test_one_request_gives_scores_and_hidden_states(server_url, tmp_path):
    """`score` then `completion_hidden_states` of the same batch is one request, not two."""
    remote = _hidden_teacher(server_url, tmp_path)
    batch = _batch(seed=1)
    remote.output_weight  # noqa: B018 (fetch the head first: it is not a score request)
    before = remote.info()["stats"]["requests"]
    remote.score(batch, top_k=2)
    remote.completion_hidden_states(batch)
    assert remote.info()["stats"]["requests"] == before + 1
    remote.completion_hidden_states(_batch(seed=2))  # another batch: asked for
    assert remote.info()["stats"]["requests"] == before + 2
    remote.close()


def test_bfloat16_hidden_states_stay_within_the_measured_tolerance(
    server_url, local, student, tmp_path
):
    """bf16 on the wire rounds each hidden value to 8 significant bits (relative error <= 2^-9
    each). Measured on this tiny teacher: hidden states off by 2.3e-3 of their largest value,
    per-token reverse KL by 3.4e-4 at most; the bounds are 4e-3 and 1e-3."""
    remote = _hidden_teacher(server_url, tmp_path, hidden_dtype="bfloat16")
    batch = _batch()
    remote.score(batch)
    hidden_BTH = remote.completion_hidden_states(batch)
    keep_BT = batch.completion_mask_BT.bool()
    expected_BTH = local.completion_hidden_states(batch)
    relative = (hidden_BTH[keep_BT] - expected_BTH[keep_BT]).abs().max() / expected_BTH.abs().max()
    assert 0 < relative < 4e-3  # rounded, and not further than bf16's rounding
    student_NH = torch.randn(int(keep_BT.sum()), 24, generator=student["generator"])
    ids_N = batch.completion_ids_BT[keep_BT]
    kl = [
        completion_token_stats(
            student_NH,
            student["weight_VH"],
            ids_N,
            teacher_hidden_NH=hidden[keep_BT],
            teacher_weight_VH=local.output_weight,
        ).reverse_kl
        for hidden in (hidden_BTH, expected_BTH)
    ]
    assert (kl[0] - kl[1]).abs().max() < 1e-3
    remote.close()


def test_the_head_is_fetched_once_and_a_damaged_cache_is_fetched_again(server_url, tmp_path):
    cache = HeadCache(tmp_path / "heads")
    first = HiddenStateServerTeacher([server_url], retry=FAST_RETRY, head_cache=cache)
    expected = first.hidden_info()["output_head"]
    head_VH = first.output_weight
    path = cache.path(expected["sha256"])
    assert path.is_file() and head_info(head_VH, head_digest(head_VH)) == expected
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)  # one weight damaged on disk
    second = HiddenStateServerTeacher([server_url], retry=FAST_RETRY, head_cache=cache)
    assert torch.equal(second.output_weight, head_VH)  # refetched, not the damaged copy
    assert decode_head(path.read_bytes(), expected, source="cache") is not None


def test_a_head_that_is_not_the_announced_one_is_refused(local):
    weight_VH = local.output_weight.detach()
    expected = head_info(weight_VH, head_digest(weight_VH))
    other_VH = weight_VH.clone()
    other_VH[0, 0] += 1.0
    from opd.teacher.output_head import encode_head

    with pytest.raises(ConfigError, match="does not match what its /info announced"):
        decode_head(encode_head(other_VH, head_digest(other_VH)), expected, source="the server")


def test_a_teacher_restarted_with_another_head_is_refused(
    tiny_teacher, teacher_backend, serve_teacher, free_port, tmp_path
):
    """The run fetched head A; the server at the same URL comes back with a changed head B: the
    next answer's hash is B's, and the client stops with a message instead of mixing heads."""
    port = free_port()
    with serve_teacher(_args(tiny_teacher, port=port), teacher_backend) as url:
        remote = _hidden_teacher(url, tmp_path)
        remote.output_weight  # noqa: B018
        remote.score(_batch())
    changed = build_backend(_args(tiny_teacher))
    with torch.no_grad():
        changed.output_weight[0, 0] += 1.0
    refused = pytest.raises(ConfigError, match="the server was restarted with another model")
    with serve_teacher(_args(tiny_teacher, port=port), changed), refused:
        remote.score(_batch())
    remote.close()


class _ScoresOnly:
    """A backend that, like vLLM's prompt logprobs, gives sampled and top-k scores only (no
    hidden states, no candidate sets); the real vLLM backend's /info is checked in
    tests/integration/test_teacher_vllm.py."""

    def __init__(self, backend: LocalTeacher):
        self.score_sequences = backend.score_sequences
        self.model = backend.model  # the server reads the context length from its config
        self.vocab_size = backend.vocab_size
        self.tokenizer = backend.tokenizer


def test_a_backend_without_hidden_states_or_candidates_is_refused_with_the_fix(
    tiny_teacher, teacher_backend, serve_teacher, tmp_path
):
    with serve_teacher(_args(tiny_teacher), _ScoresOnly(teacher_backend)) as url:
        info = httpx.get(f"{url}/info").json()
        assert info["hidden_states"] is None and info["max_candidates"] == 0
        with pytest.raises(ConfigError, match="--backend transformers"):
            _hidden_teacher(url, tmp_path).hidden_info()
        with pytest.raises(ConfigError, match="cannot score candidate sets"):
            ServerTeacher([url]).score_candidates(_batch(), torch.zeros(5, 7, 2).long())
        request, _ = request_from_batch(_batch(), hidden_dtype="float32")
        response = httpx.post(
            f"{url}/v1/score", content=encode_request(request),
            headers={"Content-Type": CONTENT_TYPE},
        )  # fmt: skip
        assert response.status_code == 422
        assert "cannot return hidden states" in response.json()["detail"]
        assert httpx.get(f"{url}/v1/output_head").status_code == 404


# ------------------------------------------------------------------------------------------------
# Candidate sets
# ------------------------------------------------------------------------------------------------


def test_candidate_logprobs_equal_local_logprobs_at_those_ids(server_url, local):
    """Low-ranked ids, duplicates and -1 padding: the served values are the in-process
    teacher's full log-softmax at exactly those ids (-inf at padding and masked positions)."""
    batch = _batch(seed=3)
    rows, tokens = batch.completion_ids_BT.shape
    generator = torch.Generator().manual_seed(4)
    candidates_BTC = torch.randint(0, VOCAB, (rows, tokens, 6), generator=generator)
    candidates_BTC[..., 1] = candidates_BTC[..., 0]  # a duplicate
    candidates_BTC[:, :, 5] = -1  # padding
    candidates_BTC[0, :, 4] = -1
    hidden_BTH = local.completion_hidden_states(batch)
    logprobs_BTV = torch.log_softmax(hidden_BTH @ local.output_weight.T, dim=-1)
    # the teacher's lowest-ranked id at each position is among the candidates
    candidates_BTC[..., 2] = logprobs_BTV.argmin(dim=-1)
    expected_BTC = logprobs_BTV.gather(-1, candidates_BTC.clamp(min=0))
    keep_BTC = (candidates_BTC >= 0) & batch.completion_mask_BT.bool()[..., None]
    expected_BTC = torch.where(keep_BTC, expected_BTC, -torch.inf)
    remote = ServerTeacher([server_url], retry=FAST_RETRY)
    assert isinstance(remote, CandidateScorer) and isinstance(local, CandidateScorer)
    for teacher in (remote, local):
        got_BTC = teacher.score_candidates(batch, candidates_BTC)
        assert got_BTC.shape == (rows, tokens, 6) and got_BTC.dtype == torch.float32
        assert torch.equal(torch.isinf(got_BTC), ~keep_BTC)
        torch.testing.assert_close(got_BTC[keep_BTC], expected_BTC[keep_BTC], atol=1e-5, rtol=0)
    remote.close()


def test_candidate_sets_are_checked_at_the_boundary(server_url):
    remote = ServerTeacher([server_url], retry=FAST_RETRY)
    batch = _batch()
    with pytest.raises(ConfigError, match="max_candidates=256"):
        remote.score_candidates(batch, torch.zeros(5, 7, 257).long())
    bad = torch.zeros(5, 7, 2).long()
    bad[0, 0, 0] = VOCAB
    request, _ = request_from_batch(batch, candidate_ids_BTC=bad)
    response = httpx.post(
        f"{server_url}/v1/score", content=encode_request(request),
        headers={"Content-Type": CONTENT_TYPE},
    )  # fmt: skip
    assert response.status_code == 400
    assert f"candidate token id {VOCAB} is outside" in response.json()["detail"]
    remote.close()


# ------------------------------------------------------------------------------------------------
# Through `opd distill`
# ------------------------------------------------------------------------------------------------


def _distill(student, prompt_file, output_dir, *teacher_args) -> dict:
    """2 steps of `opd distill` (the CLI entry, in process) with the full-vocabulary divergence
    and baseline; returns the logged steps and the trained weights."""
    from safetensors.torch import load_file

    from opd.cli import main

    assert main([
        "distill", "--model_name_or_path", str(student), "--dataset_name", str(prompt_file),
        "--output_dir", str(output_dir), "--use_vllm", "false", "--eval_before_after", "false",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "2",
        "--max_completion_length", "6", "--learning_rate", "1e-3", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--seed", "0", "--write_report", "false",
        "--opd_divergence", "reverse_kl", "--opd_divergence_support", "full",
        "--opd_divergence_coef", "0.5", "--opd_baseline", "full", *teacher_args,
    ]) == 0  # fmt: skip
    results = json.loads((output_dir / "opd_results.json").read_text())
    steps = [entry for entry in results["log_history"] if "opd/divergence" in entry]
    return {"steps": steps, "weights": load_file(output_dir / "model.safetensors")}


@pytest.mark.slow
def test_distill_with_a_served_teacher_in_hidden_state_mode_equals_the_local_teacher(
    tiny_student, tiny_teacher, prompt_file, teacher_backend, serve_teacher, tmp_path, monkeypatch
):
    """teacher_mode server with the full divergence and the full baseline: the same metrics and
    weights as teacher_mode local (fp32; the teacher's batching differs, so not bit for bit)."""
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "cache"))
    local_run = _distill(
        tiny_student, prompt_file, tmp_path / "local", "--teacher_mode", "local",
        "--teacher_model_name_or_path", str(tiny_teacher),
    )  # fmt: skip
    with serve_teacher(_args(tiny_teacher), teacher_backend) as url:
        served_run = _distill(
            tiny_student, prompt_file, tmp_path / "served", "--teacher_mode", "server",
            "--teacher_urls", url, "--teacher_model_name_or_path", str(tiny_teacher),
        )  # fmt: skip
        served_requests = httpx.get(f"{url}/info").json()["stats"]["requests"]
    assert served_requests == 2  # one request per step: scores and hidden states together
    assert list((tmp_path / "cache" / "teacher_heads").glob("*.safetensors"))
    assert [entry["step"] for entry in served_run["steps"]] == [1, 2]
    for served, local in zip(served_run["steps"], local_run["steps"], strict=True):
        for name in ("opd/divergence", "opd/reverse_kl", "opd/teacher_logprob"):
            assert served[name] == pytest.approx(local[name], abs=1e-5), name
    for name, tensor in local_run["weights"].items():
        torch.testing.assert_close(served_run["weights"][name], tensor, atol=1e-5, rtol=0)
