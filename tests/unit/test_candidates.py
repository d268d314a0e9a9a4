"""The candidate sets of `opd/objectives/candidates.py` on constructed ids, the student's top-k
pass on a real tiny model, and how the top-k kernel and the top-k baseline read them: padding
anywhere in a row changes nothing, and exact scores give the in-process values."""

from __future__ import annotations

import pytest
import torch

import opd.kernels as kernels
from opd.kernels import reference as kernels_reference
from opd.objectives.candidates import (
    CandidatePlan,
    candidate_ids,
    candidate_logprobs_from_hidden,
    completion_student_topk,
    dedupe_ids,
    scored_candidates,
    student_topk_ids,
    union_extras,
)
from opd.objectives.hidden import output_weight
from opd.objectives.token_stats import completion_token_stats
from opd.types import DivergenceSupport

INF = torch.inf


def test_dedupe_keeps_each_ids_first_copy_and_pads_repeats_and_negatives():
    ids = torch.tensor([[[5, 3, 5, -1, 3, 7], [2, 2, 2, 0, -7, 0]]])
    expected = torch.tensor([[[5, 3, -1, -1, -1, 7], [2, -1, -1, 0, -1, -1]]])
    assert torch.equal(dedupe_ids(ids), expected)


def test_union_extras_drop_the_students_ids_teacher_padding_and_repeats():
    student = torch.tensor([[1, 2, 3], [4, 5, 6]])
    teacher = torch.tensor([[2, 9, 1, 9, 4], [7, 8, 4, 0, 6]])
    teacher_lp = torch.tensor([[-0.1, -0.2, -0.3, -0.4, -INF], [-0.1, torch.nan, -0.3, -INF, -1]])
    extras = union_extras(student, teacher, teacher_lp)
    # row 0: 2 and 1 are the student's, the second 9 repeats, 4 is padding (-inf)
    # row 1: 8 has a NaN logprob (padding), 4 and 6 are the student's, 0 is padding
    assert torch.equal(extras, torch.tensor([[-1, 9, -1, -1, -1], [7, -1, -1, -1, -1]]))


def _union_plan() -> CandidatePlan:
    return CandidatePlan(divergence_support=DivergenceSupport.UNION, divergence_k=2, baseline_k=3)


def test_candidate_rows_and_what_each_use_reads():
    # one row of 3 positions, the last masked; the student's top 3 (M = max(K=2, k=3))
    student = torch.tensor([[[4, 1, 7], [2, 3, 9], [-1, -1, -1]]])
    teacher = torch.tensor([[[1, 7, 5], [8, 2, 3], [6, 6, 6]]])
    teacher_lp = torch.tensor([[[-0.5, -1.0, -2.0], [-0.2, -0.9, -INF], [-1.0, -1.0, -1.0]]])
    mask = torch.tensor([[1, 1, 0]])
    ids = candidate_ids(student, _union_plan(), mask, teacher, teacher_lp)
    # [student top 3 | teacher ids not among the student's top 2]; 7 is the student's 3rd
    # but not in its top 2, so the union keeps it (and the teacher scores it twice).
    expected = torch.tensor([[[4, 1, 7, -1, 7, 5], [2, 3, 9, 8, -1, -1], [-1] * 6]])
    assert torch.equal(ids, expected)

    teacher_answer = torch.arange(18, dtype=torch.float32).reshape(1, 3, 6).neg()
    scores = scored_candidates(ids, teacher_answer, student.shape[-1], _union_plan())
    assert torch.equal(scores.logprobs_BTC == -INF, ids < 0)  # padding reads as padding
    div_ids, div_lp = scores.divergence_support_BTK()
    assert div_ids.tolist() == [[[4, 1, -1, 7, 5], [2, 3, 8, -1, -1], [-1] * 5]]
    assert div_lp[0, 0].tolist() == [-0.0, -1.0, -INF, -4.0, -5.0]
    for row in div_ids.reshape(-1, div_ids.shape[-1]).tolist():  # no id twice in a support
        valid = [i for i in row if i >= 0]
        assert len(valid) == len(set(valid))
    base_ids, base_lp = scores.baseline_support_BTK()
    assert torch.equal(base_ids, ids[..., :3]) and torch.equal(base_lp[0, 1], -torch.arange(6.0, 9))


def test_student_support_is_the_first_k_columns():
    plan = CandidatePlan(divergence_support=DivergenceSupport.STUDENT, divergence_k=2)
    student = torch.tensor([[[4, 1], [2, 3]]])
    ids = candidate_ids(student, plan, torch.ones(1, 2))
    assert torch.equal(ids, student)
    scores = scored_candidates(ids, torch.zeros(1, 2, 2), 2, plan)
    assert torch.equal(scores.divergence_support_BTK()[0], student)


def test_student_topk_ids_match_the_full_logits_in_chunks():
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(7, 5, generator=generator), torch.randn(11, 5, generator=generator)
    expected = (hidden @ weight.T).topk(4, -1).indices
    assert torch.equal(student_topk_ids(hidden, weight, 4, chunk_rows=3), expected)
    assert student_topk_ids(hidden, weight, 50).shape == (7, 11)  # k above V: the vocabulary


def test_completion_student_topk_of_a_real_model(tiny_student):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32).eval()
    prompt = torch.tensor([[0, 4, 13], [5, 13, 6]])  # the first prompt left-padded
    completion = torch.tensor([[6, 7, 2], [8, 2, 0]])
    input_ids = torch.cat([prompt, completion], 1)
    attention = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    mask = attention[:, 3:]
    top = completion_student_topk(
        model, output_weight(model), input_ids, attention, mask, 5, rows_per_forward=1
    )
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, 2:-1]
    expected = logits.topk(5, -1).indices
    valid = mask.bool()
    assert torch.equal(top[valid], expected[valid])
    assert (top[~valid] == -1).all()


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(6, 13, generator=generator) * 2
    teacher = torch.randn(6, 13, generator=generator) * 2
    return student, teacher


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_the_kernels_read_minus_one_padding_anywhere_as_absent(logits, impl, monkeypatch):
    """The divergence on a candidate support plus a tail bucket, with exact teacher values,
    equals the hand-computed one in every implementation, in the statistics kernel and in the
    fused loss the trainer uses; -1 / -inf columns anywhere in the row change nothing. (Triton
    runs in its CPU interpreter here, TRITON_INTERPRET=1.)"""
    student, teacher = logits
    ls, lt = student.log_softmax(-1), teacher.log_softmax(-1)
    support = ls.topk(4, -1).indices
    padded = torch.cat([support[:, :2], torch.full((6, 2), -1), support[:, 2:]], -1)
    values = lt.gather(-1, padded.clamp(min=0)).masked_fill(padded < 0, -INF)
    ls_s, lt_s = ls.gather(-1, support), lt.gather(-1, support)
    ls_b = torch.cat([ls_s, torch.log1p(-ls_s.exp().sum(-1, keepdim=True))], -1)
    lt_b = torch.cat([lt_s, torch.log1p(-lt_s.exp().sum(-1, keepdim=True))], -1)
    expected = (ls_b.exp() * (ls_b - lt_b)).sum(-1)
    ops = kernels_reference if impl == "reference" else kernels
    monkeypatch.delenv("OPD_KERNELS", raising=False)
    with kernels.override_impl(None if impl == "reference" else impl):
        got = ops.topk_divergence(student, padded, values, kind="reverse_kl", tail=True)
        loss, per_row = ops.fused_linear_divergence_loss(
            student, torch.eye(13), teacher_topk_ids=padded, teacher_topk_logprobs=values,
            kind="reverse_kl",
        )  # fmt: skip
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_row, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, expected.sum(), atol=1e-5, rtol=1e-5)


def test_topk_baseline_from_exact_scores_equals_the_in_process_one(logits):
    student, teacher = logits
    hidden, weight = student, torch.eye(13)  # hidden @ weight.T == the student logits
    ids = torch.randint(0, 13, (6,), generator=torch.Generator().manual_seed(4))
    support = student_topk_ids(hidden, weight, 5)
    exact = teacher.log_softmax(-1).gather(-1, support)
    stats = completion_token_stats(
        hidden, weight, ids, baseline="topk", baseline_top_k=5,
        teacher_support_ids_NK=support, teacher_support_logprobs_NK=exact,
    )  # fmt: skip
    in_process = completion_token_stats(
        hidden, weight, ids, baseline="topk", baseline_top_k=5,
        teacher_hidden_NH=teacher, teacher_weight_VH=torch.eye(13),
    )  # fmt: skip
    torch.testing.assert_close(stats.baseline_kl, in_process.baseline_kl, atol=1e-5, rtol=0)
    # and the tail-share estimate from the teacher's own top-3 is measurably different
    top = teacher.log_softmax(-1).topk(3, -1)
    estimate = completion_token_stats(
        hidden, weight, ids, baseline="topk", baseline_top_k=5,
        teacher_topk_ids_NK=top.indices, teacher_topk_logprobs_NK=top.values,
    )  # fmt: skip
    assert (estimate.baseline_kl - in_process.baseline_kl).abs().max() > 1e-3


def test_candidate_logprobs_from_hidden_states(logits):
    """What a `FullDistributionTeacher` without `score_candidates` answers: its tempered
    log-softmax at each id, -inf at -1."""
    _, teacher = logits
    hidden_BTH = teacher.reshape(2, 3, 13)  # hidden @ eye(13).T == the teacher logits
    ids_BTC = torch.tensor([[[0, 5, -1], [12, 12, 3], [-1, -1, -1]]] * 2)
    got = candidate_logprobs_from_hidden(
        hidden_BTH, torch.eye(13), ids_BTC, temperature=0.5, chunk_rows=4
    )
    expected = torch.log_softmax(hidden_BTH / 0.5, -1).gather(-1, ids_BTC.clamp(min=0))
    expected = expected.masked_fill(ids_BTC < 0, -INF)
    torch.testing.assert_close(got, expected)
