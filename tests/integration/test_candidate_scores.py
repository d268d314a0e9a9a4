"""Candidate-set scoring in `OPDTrainer` on real tiny models (transformers generation, no vLLM).

The teacher is remote: `opd teacher serve` (transformers backend) on loopback, or a real
`LocalTeacher` seen only through `score` and `score_candidates` (`CandidateOnlyTeacher`, which
hides its hidden states and lm_head), so it is not a `FullDistributionTeacher` and the trainer
must take the candidate path. Its values are compared with the in-process definitions computed
from both models' full distributions: the top-k vOPD baseline and the student/union divergence
are exact. Then 2-step training runs, a server too narrow for the candidate sets, and the checks
that refuse a teacher that cannot score candidates (a stock vLLM server, offline shards) with a
message saying why and what to run instead.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset

from opd import OPDConfig, OPDTrainer
from opd.arguments import ConfigError
from opd.cli import main
from opd.kernels.reference import topk_divergence
from opd.teacher.local import LocalTeacher
from opd.teacher.protocol import CandidateScorer, FullDistributionTeacher
from opd.teacher.vllm_client import VLLMTeacher
from opd.trainer.build import check_method_capabilities
from opd.types import OPDBatchFields, TeacherMode

PROMPTS = [{"prompt": "1+1=", "answer": "2"}] * 2 + [{"prompt": "2+2=", "answer": "4"}] * 2


class CandidateOnlyTeacher:
    """A real `LocalTeacher` behind the two calls a remote candidate scorer offers (records the
    candidate ids it is asked for)."""

    def __init__(self, local: LocalTeacher):
        self.local = local
        self.teacher_id = local.teacher_id
        self.requests: list[torch.Tensor] = []

    def check_student_tokenizer(self, student_tokenizer) -> None:
        self.local.check_student_tokenizer(student_tokenizer)

    def score(self, batch, top_k: int = 0):
        return self.local.score(batch, top_k)

    def score_candidates(self, batch, candidate_ids_BTC, *, temperature=None):
        self.requests.append(candidate_ids_BTC.clone())
        return self.local.score_candidates(batch, candidate_ids_BTC, temperature=temperature)


class HiddenOnlyTeacher:
    """A real `LocalTeacher` as a `FullDistributionTeacher` without `score_candidates`, as offline
    shards that store the teacher's hidden states are: the candidates' values come from its
    hidden states and lm_head."""

    def __init__(self, local: LocalTeacher):
        self.local = local
        self.teacher_id = local.teacher_id

    def check_student_tokenizer(self, student_tokenizer) -> None:
        self.local.check_student_tokenizer(student_tokenizer)

    def score(self, batch, top_k: int = 0):
        return self.local.score(batch, top_k)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.local.output_weight

    def completion_hidden_states(self, batch) -> torch.Tensor:
        return self.local.completion_hidden_states(batch)


MAX_CANDIDATES = 16


@pytest.fixture(scope="module")
def candidate_teacher_model(tiny_teacher):
    return LocalTeacher.from_pretrained(str(tiny_teacher))


@pytest.fixture(scope="module")
def server_url(tiny_teacher, teacher_backend, serve_teacher):
    """`opd teacher serve`'s app (transformers backend) on loopback, candidate rows up to 16."""
    from opd.commands.serve import ServeArguments

    args = ServeArguments(
        model=str(tiny_teacher), port=0, log_level="warning", max_candidates=MAX_CANDIDATES
    )
    with serve_teacher(args, teacher_backend) as url:
        yield url


def make_trainer(tmp_path, tiny_student, tiny_teacher, teacher, **fields) -> OPDTrainer:
    fields = {"teacher_model_name_or_path": str(tiny_teacher), **fields}
    args = OPDConfig(
        output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=2,
        num_generations=2, max_completion_length=4, loss_type="bnpo", seed=0, **fields,
    )  # fmt: skip
    dataset = Dataset.from_dict({"prompt": ["1+1=", "2+2="], "answer": ["2", "4"]})
    trainer = OPDTrainer(model=str(tiny_student), args=args, train_dataset=dataset, teacher=teacher)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def _log_softmax_at_completions(model, output):
    """[B, T, V] float32 log-probs predicting each completion token, from the full logits."""
    input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
    attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    num_tokens = output["completion_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention).logits
    return torch.log_softmax(logits[:, -num_tokens - 1 : -1].float(), -1)


def _reverse_kl(ls_b, lt_b):
    return (ls_b.exp() * (ls_b - lt_b)).sum(-1)


def _tail_buckets(lp_NV, support_NS):
    """Log-probs on `support` (a list of id sets per row) plus the tail bucket."""
    rows = []
    for lp_V, ids in zip(lp_NV, support_NS, strict=True):
        at = lp_V[sorted(ids)]
        rows.append(torch.cat([at, torch.log1p(-at.exp().sum())[None]]))
    return rows


def test_the_wrapper_is_a_candidate_scorer_and_not_in_process(candidate_teacher_model):
    teacher = CandidateOnlyTeacher(candidate_teacher_model)
    assert isinstance(teacher, CandidateScorer)
    assert not isinstance(teacher, FullDistributionTeacher)


def _remote_teacher(kind, candidate_teacher_model, request) -> tuple[object, dict]:
    """`(teacher, config fields)` of a remote teacher: the wrapper, or a client of the server."""
    if kind == "wrapper":
        return CandidateOnlyTeacher(candidate_teacher_model), {}
    if kind == "hidden":
        return HiddenOnlyTeacher(candidate_teacher_model), {}
    url = request.getfixturevalue("server_url")
    return None, {
        "teacher_mode": "server",
        "teacher_urls": [url],
        "teacher_model_name_or_path": None,
    }


@pytest.mark.parametrize("kind", ["wrapper", "server", "hidden"])
@pytest.mark.parametrize("support", ["student", "union"])
def test_candidate_scores_give_the_exact_baseline_and_divergence(
    tmp_path, tiny_student, tiny_teacher, candidate_teacher_model, support, kind, request
):
    teacher, teacher_fields = _remote_teacher(kind, candidate_teacher_model, request)
    trainer = make_trainer(
        tmp_path, tiny_student, tiny_teacher, teacher, opd_baseline="topk",
        opd_baseline_top_k=6, opd_divergence="reverse_kl", opd_divergence_support=support,
        teacher_top_k=4, **teacher_fields,
    )  # fmt: skip
    assert isinstance(trainer.teacher, FullDistributionTeacher) is (kind == "hidden")
    assert isinstance(trainer.teacher, CandidateScorer) is (kind != "hidden")
    output = trainer._generate_and_score_completions(PROMPTS)
    if kind == "wrapper":
        assert len(teacher.requests) == 1
    ls = _log_softmax_at_completions(trainer.model, output)
    lt = _log_softmax_at_completions(candidate_teacher_model.model, output)
    mask = output["completion_mask"].bool()
    ids = output["completion_ids"]

    # the top-k baseline: both renormalised on the student's top 6, teacher values exact
    top6 = ls.topk(6, -1).indices
    ls6, lt6 = ls.gather(-1, top6).log_softmax(-1), lt.gather(-1, top6).log_softmax(-1)
    k1 = (lt.gather(-1, ids[..., None]) - ls.gather(-1, ids[..., None]))[..., 0]
    expected = (k1 + _reverse_kl(ls6, lt6)) * mask
    torch.testing.assert_close(output["advantages"], expected, atol=1e-5, rtol=0)

    # the divergence support: the student's top 4 (and the teacher's), each id once, exact values
    fields = OPDBatchFields.unpack(output)
    ids_BTK, lp_BTK = fields.teacher_topk_ids_BTK, fields.teacher_topk_logprobs_BTK
    supports = []
    for b, t in mask.nonzero().tolist():
        valid = ids_BTK[b, t][ids_BTK[b, t] >= 0].tolist()
        want = set(ls[b, t].topk(4).indices.tolist())
        if support == "union":
            want |= set(lt[b, t].topk(4).indices.tolist())
        assert len(valid) == len(set(valid)) and set(valid) == want
        torch.testing.assert_close(lp_BTK[b, t][ids_BTK[b, t] >= 0], lt[b, t][valid])
        supports.append(want)
    assert (lp_BTK[~mask] == -torch.inf).all()

    # the loss's divergence term is the exact reverse KL on that support plus a tail bucket
    loss = trainer._compute_loss(trainer.model, output)
    divergence = torch.stack([
        _reverse_kl(s, t)
        for s, t in zip(_tail_buckets(ls[mask], supports), _tail_buckets(lt[mask], supports),
                        strict=True)
    ])  # fmt: skip
    policy = -(output["advantages"] * mask).sum() / mask.sum()  # rho = 1 before any update
    assert loss.item() == pytest.approx((policy + divergence.mean()).item(), abs=1e-5)


@pytest.mark.parametrize(
    ("fields", "width"),
    [
        ({"opd_divergence": "jsd", "opd_divergence_support": "student"}, 3),
        ({"opd_divergence": "reverse_kl", "opd_divergence_support": "union"}, 6),
        ({"opd_baseline": "topk", "opd_baseline_top_k": 5, "teacher_top_k": 0}, 5),
    ],
    ids=["student", "union", "topk_baseline"],
)
def test_two_training_steps_with_a_candidate_teacher(
    tmp_path, tiny_student, tiny_teacher, candidate_teacher_model, fields, width
):
    fields = {"teacher_top_k": 3, **fields}
    teacher = CandidateOnlyTeacher(candidate_teacher_model)
    trainer = make_trainer(tmp_path, tiny_student, tiny_teacher, teacher, max_steps=2, **fields)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert [r.shape[-1] for r in teacher.requests] == [width, width]  # one request per step
    logged = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    assert math.isfinite(logged["train_loss"])
    metric = "opd/divergence" if "opd_divergence" in fields else "opd/baseline_kl"
    assert math.isfinite(logged[metric]) and logged[metric] > 0
    moved = [not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True)]
    assert any(moved)


def test_a_server_too_narrow_for_the_baseline_leaves_it_an_estimate(
    tmp_path, tiny_student, tiny_teacher, server_url
):
    narrow = f"scores at most {MAX_CANDIDATES} candidate ids per position"
    with pytest.warns(UserWarning, match=narrow):  # at start-up, from the server's /info
        trainer = make_trainer(
            tmp_path, tiny_student, tiny_teacher, None, teacher_mode="server",
            teacher_urls=[server_url], teacher_model_name_or_path=None, opd_baseline="topk",
            opd_baseline_top_k=MAX_CANDIDATES + 4, teacher_top_k=4,
        )  # fmt: skip
    assert trainer.candidate_plan is None  # the server is never asked for candidates
    output = trainer._generate_and_score_completions(PROMPTS)
    ls = _log_softmax_at_completions(trainer.model, output)
    mask = output["completion_mask"].bool()
    scores = trainer.step_state.scores
    ids = output["completion_ids"][..., None]
    k1 = (scores.sampled_logprobs_BT[..., None] - ls.gather(-1, ids))[..., 0][mask]
    estimate = topk_divergence(
        ls[mask], scores.topk_ids_BTK[mask], scores.topk_logprobs_BTK[mask], kind="reverse_kl",
        support="student", tail=False, student_top_k=MAX_CANDIDATES + 4,
    )  # fmt: skip
    torch.testing.assert_close(output["advantages"][mask], k1 + estimate, atol=1e-5, rtol=0)


def test_a_server_too_narrow_for_the_divergence_support_is_refused_at_start(
    tmp_path, tiny_student, tiny_teacher, server_url
):
    with pytest.raises(ConfigError, match="raise its --max_candidates"):  # before training
        make_trainer(
            tmp_path, tiny_student, tiny_teacher, None, teacher_mode="server",
            teacher_urls=[server_url], teacher_model_name_or_path=None, opd_divergence="jsd",
            opd_divergence_support="union", teacher_top_k=MAX_CANDIDATES // 2 + 1,
        )  # fmt: skip


def _server_args(tmp_path, **fields) -> OPDConfig:
    fields = {"teacher_top_k": 4, "opd_divergence": "jsd", **fields}
    return OPDConfig(
        output_dir=str(tmp_path), teacher_mode="server", teacher_urls=["http://127.0.0.1:1"],
        report_to="none", **fields,
    )  # fmt: skip


class StockVLLMTeacher:
    """Stands in for `VLLMTeacher`, whose `teacher_id` asks its server: Python 3.11's protocol
    isinstance check reads every protocol attribute, so a real client would wait out its retry
    budget on a dead URL. What it lacks is what matters: no `score_candidates`."""

    teacher_id = "stock-vllm"

    def score(self, batch, top_k: int = 0): ...

    def check_student_tokenizer(self, student_tokenizer) -> None: ...


@pytest.mark.parametrize("support", ["student", "union"])
def test_a_stock_vllm_teacher_is_refused_with_why_and_what_to_run(tmp_path, support):
    with pytest.raises(ConfigError, match="RFC #56860") as refused:
        OPDConfig(
            output_dir=str(tmp_path), teacher_mode="vllm", teacher_urls=["http://127.0.0.1:1"],
            report_to="none", teacher_top_k=4, opd_divergence="jsd",
            opd_divergence_support=support,
        )  # fmt: skip
    assert "opd teacher serve --backend transformers" in str(refused.value)
    # the trainer's check, given a stock vLLM client (a multi-teacher route can hold one)
    args = _server_args(tmp_path, opd_divergence_support=support)
    args.teacher_mode = TeacherMode.VLLM
    assert not hasattr(VLLMTeacher, "score_candidates")
    with pytest.raises(ConfigError, match="only for the sampled token and its own top-k"):
        check_method_capabilities(args, StockVLLMTeacher(), reward_funcs=None)


def test_top_k_only_offline_shards_and_other_teachers_are_refused(tmp_path):
    args = _server_args(tmp_path, opd_divergence_support="student")
    args.teacher_mode = TeacherMode.OFFLINE  # shards without hidden states: top-k only
    with pytest.raises(ConfigError, match="offline shards hold only") as refused:
        check_method_capabilities(args, StockVLLMTeacher(), reward_funcs=None)
    assert "--store_hidden_states true" in str(refused.value)
    args = _server_args(tmp_path, opd_divergence_support="union")
    with pytest.raises(ConfigError, match="StockVLLMTeacher\\) cannot score ids"):
        check_method_capabilities(args, StockVLLMTeacher(), reward_funcs=None)


def test_the_top_k_baseline_needs_no_teacher_top_k_from_a_candidate_scorer(
    tmp_path, candidate_teacher_model
):
    args = _server_args(tmp_path, teacher_top_k=0, opd_divergence="none", opd_baseline="topk")
    check_method_capabilities(args, CandidateOnlyTeacher(candidate_teacher_model), None)
    with pytest.raises(ConfigError, match="in-process teacher"):  # the tail share needs a top-k
        check_method_capabilities(args, StockVLLMTeacher(), reward_funcs=None)


def test_cli_refuses_a_candidate_support_with_a_stock_vllm_teacher(capsys):
    code = main([
        "distill", "--teacher_mode", "vllm", "--teacher_urls", "http://127.0.0.1:1",
        "--teacher_top_k", "4", "--opd_divergence", "jsd", "--opd_divergence_support", "union",
    ])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "opd_divergence_support='union'" in err and "--backend transformers" in err


def test_cli_trains_two_steps_on_the_union_support(
    tiny_student, tiny_teacher, prompt_file, tmp_path
):
    """`opd distill` with no recipe: the local teacher scores the union support (its own
    `score_candidates`) and gives the top-k baseline from its hidden states."""
    out = tmp_path / "out"
    code = main([
        "distill", "--model_name_or_path", str(tiny_student),
        "--teacher_model_name_or_path", str(tiny_teacher), "--dataset_name", str(prompt_file),
        "--opd_divergence", "reverse_kl", "--opd_divergence_support", "union",
        "--teacher_top_k", "4", "--opd_baseline", "topk", "--opd_baseline_top_k", "8",
        "--max_steps", "2", "--use_vllm", "false", "--output_dir", str(out),
        "--eval_before_after", "false", "--write_report", "false", "--report_to", "none",
        "--per_device_train_batch_size", "4", "--num_generations", "2",
        "--max_completion_length", "8",
    ])  # fmt: skip
    assert code == 0
    assert "opd_divergence_support: union" in (out / "opd_config.yaml").read_text()
    history = json.loads((out / "opd_results.json").read_text())["log_history"]
    steps = [entry for entry in history if "opd/divergence" in entry]
    assert len(steps) == 2
    assert all(entry["opd/divergence"] > 0 and entry["opd/baseline_kl"] > 0 for entry in steps)
