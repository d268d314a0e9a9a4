"""A teacher of another tokenizer: scores mapped onto the student's positions, the start-up check
of what must still match, and the settings cross-tokenizer mode refuses.

Test: `pytest -n 0 -q tests/unit/test_cross_tokenizer.py`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from opd.arguments import ConfigError
from opd.config import OPDConfig
from opd.demo.tiny import build_char_tokenizer
from opd.teacher.alignment import AlignedSpan, CompletionAlignment
from opd.teacher.cross_tokenizer import (
    LocalTeacherTokens,
    check_cross_tokenizer,
    scores_at_student_positions,
    valid_lengths_B,
)
from opd.types import TeacherScores

NEG = float("-inf")


def test_scores_land_on_the_student_positions_of_each_span():
    """Student tokens [s0 s1 | s2 | s3 s4] against teacher tokens [t0 | t1 t2 | t3]: each span's
    teacher logprobs summed at its last student token, its first teacher token's top-k at its
    first student token, -inf and id 0 elsewhere; row 1 is shorter (padding stays 0)."""
    alignments = [
        CompletionAlignment([7, 8, 9, 10], [AlignedSpan(0, 2, 0, 1), AlignedSpan(2, 3, 1, 3),
                                            AlignedSpan(3, 5, 3, 4)]),
        CompletionAlignment([5], [AlignedSpan(0, 2, 0, 1)]),
    ]  # fmt: skip
    teacher = TeacherScores(
        sampled_logprobs_BT=torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, 0.0, 0.0, 0.0]]),
        completion_mask_BT=torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]]),
        topk_ids_BTK=torch.arange(16).reshape(2, 4, 2),
        topk_logprobs_BTK=-torch.arange(16, dtype=torch.float32).reshape(2, 4, 2) / 10,
        metrics={"teacher/latency_s": 1.0},
    )
    scores = scores_at_student_positions(teacher, alignments, (2, 6))
    assert scores.sampled_logprobs_BT.tolist() == [
        [0.0, -1.0, -5.0, 0.0, -4.0, 0.0],
        [0.0, -0.5, 0.0, 0.0, 0.0, 0.0],
    ]
    assert scores.span_start_BT.tolist() == [
        [True, False, True, True, False, False],
        [True, False, False, False, False, False],
    ]
    assert scores.completion_mask_BT.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]
    assert scores.topk_ids_BTK[0, :, 0].tolist() == [0, 0, 2, 6, 0, 0]  # teacher rows 0, 1, 3
    assert scores.topk_logprobs_BTK[0, 2].tolist() == pytest.approx([-0.2, -0.3])
    assert scores.topk_logprobs_BTK[0, 1].tolist() == [NEG, NEG]
    assert scores.topk_ids_BTK[1, 0].tolist() == [8, 9]
    assert scores.metrics["teacher/latency_s"] == 1.0
    assert scores.metrics["teacher/cross_spans_per_token"] == pytest.approx(4 / 7)
    assert scores.metrics["teacher/cross_teacher_tokens_per_token"] == pytest.approx(5 / 7)


def test_valid_lengths_keep_masked_tokens_inside_a_completion():
    mask_BT = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert valid_lengths_B(mask_BT) == [4, 0, 5]


def test_the_same_tokenizer_passes_and_the_line_says_the_mode_is_on():
    tokenizer = build_char_tokenizer()
    line = check_cross_tokenizer(tokenizer, LocalTeacherTokens(tokenizer, name="teacher"))
    assert "cross-tokenizer mode is on" in line and "span rule 'all'" in line


def test_a_teacher_that_cannot_spell_the_students_text_is_refused():
    student = build_char_tokenizer()
    digits_only = build_char_tokenizer("0123456789+=")
    with pytest.raises(ConfigError, match="spells the student's text") as error:
        check_cross_tokenizer(student, LocalTeacherTokens(digits_only, name="digits"))
    assert "'digits'" in str(error.value)


def test_a_chat_template_on_one_side_only_is_refused():
    student, teacher = build_char_tokenizer(), build_char_tokenizer()
    teacher.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ConfigError, match="teacher's tokenizer has a chat template and the"):
        check_cross_tokenizer(student, LocalTeacherTokens(teacher, name="chat"))


def _config(**fields) -> OPDConfig:
    fields = {"teacher_model_name_or_path": "teacher", **fields}
    return OPDConfig(output_dir="/tmp/unused", report_to="none", teacher_cross_tokenizer=True,
                     **fields)  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"teacher_mode": "self", "teacher_model_name_or_path": None}, "teacher_mode self"),
        ({"opd_divergence": "jsd", "opd_divergence_support": "full"}, "'full' (use topk)"),
        (
            {"opd_divergence": "jsd", "opd_divergence_support": "union", "teacher_top_k": 4},
            "'union'",
        ),
        ({"opd_baseline": "topk", "teacher_top_k": 4}, "opd_baseline 'topk'"),
        ({"tip_rule": "q3", "teacher_top_k": 4}, "tip_rule 'q3'"),
        ({"mopd_peers": "successes"}, "mopd_peers"),
        ({"opd_prefix_column": "solution"}, "opd_prefix_column"),
    ],
)
def test_settings_that_read_the_teacher_in_the_students_ids_are_refused(fields, named):
    with pytest.raises(ConfigError, match="teacher_cross_tokenizer cannot be combined") as error:
        _config(**fields)
    assert named in str(error.value)


def test_the_divergence_term_needs_the_teachers_top_k():
    with pytest.raises(ValueError, match="teacher_top_k > 0"):
        _config(opd_divergence="jsd")
    config = _config(opd_divergence="jsd", teacher_top_k=4, opd_cross_vocab="uld")
    assert config.opd_cross_vocab == "uld" and config.teacher_span_rule == "all"


def test_unknown_span_rule_and_cross_vocab_are_named():
    with pytest.raises(ValueError, match="teacher_span_rule='first'"):
        _config(teacher_span_rule="first")
    with pytest.raises(ValueError, match="opd_cross_vocab='both'"):
        _config(opd_cross_vocab="both")
    with pytest.raises(ValueError, match="opd_cross_vocab_uld_weight must be >= 0"):
        _config(opd_cross_vocab_uld_weight=-1.0)


def test_tokens_the_teacher_cannot_spell_are_penalised_not_free(tmp_path):
    """Row 1 holds special tokens only (the student may sample BOS at temperature 1), which the
    BPE teacher has no token for: each is its own span at `UNSPELLABLE_LOGPROB`, so its reward
    is -20 - lp_old, a penalty (with advantage 0, or joined to a span, it would be free: the
    demo's student learnt to answer with special tokens). Row 0 keeps its span reward."""
    from types import SimpleNamespace

    from opd.demo.bpe import save_tiny_bpe
    from opd.teacher.cross_tokenizer import UNSPELLABLE_LOGPROB, CrossTokenizerTeacher
    from opd.teacher.local import LocalTeacher
    from opd.trainer.cross_vocab import CrossVocabMixin
    from opd.trainer.step import StepState
    from opd.types import RolloutBatch

    student = build_char_tokenizer()
    teacher = LocalTeacher.from_pretrained(str(save_tiny_bpe(tmp_path / "bpe")))
    cross = CrossTokenizerTeacher(teacher, LocalTeacherTokens(teacher.tokenizer), student)
    bos, eos = student.bos_token_id, student.eos_token_id
    digits = student("42", add_special_tokens=False)["input_ids"]
    batch = RolloutBatch(
        prompt_ids=[[5], [5]],
        completion_ids_BT=torch.tensor([[*digits, eos, 0], [bos, bos, bos, bos]]),
        completion_mask_BT=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
        teacher_prompt_ids=cross.render_prompt_ids(["7+8=", "7+8="]),
    )
    scores = cross.score(batch)
    assert scores.metrics["teacher/cross_unspellable_fraction"] == pytest.approx(4 / 7)
    assert scores.completion_mask_BT.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    # the BPE tokenizer makes "42" one token: a span of 2 student tokens, split by the
    # teacher's prefix probabilities into one per token, then EOS
    assert scores.span_start_BT.tolist() == [[True, True, True, False], [True] * 4]
    assert scores.sampled_logprobs_BT[1].tolist() == [UNSPELLABLE_LOGPROB] * 4
    step = StepState(inputs=[], rng_state={})
    step.scores, step.mask_BT = scores, batch.completion_mask_BT.float()
    step.student_old_BT = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-3.0, -3.0, -3.0, -3.0]])
    trainer = SimpleNamespace(args=SimpleNamespace(teacher_span_rule="last"),
                              cross_vocab_map_V=None)  # fmt: skip
    CrossVocabMixin.in_student_terms(trainer, step)
    teacher_BT = step.scores.sampled_logprobs_BT
    advantage_BT = (teacher_BT - step.student_old_BT) * step.mask_BT
    assert advantage_BT[1].tolist() == [-17.0] * 4  # -20 - (-3): a penalty on each
    assert torch.equal(teacher_BT[0, :3], scores.sampled_logprobs_BT[0, :3])  # 1-token spans


def test_the_boundary_of_a_teacher_token_goes_to_the_student_token_that_decides_it():
    """Teacher vocabulary {EOS, "4", "42", "43"}; the student writes "4" then EOS, one token
    per character. p("4") = 0.1 says "the number is 4 and stops": of it, the text "4" has
    p("4") + p("42") + p("43") = 1 (kept by the span "4"), and stopping, 0.1 / 1, moves to
    the EOS span, the student's decision to stop. A student token with a longer token keeps it."""
    import math

    from opd.teacher.cross_tokenizer import BoundaryCredit, extended_ids, shifted_span_sums

    assert sorted(extended_ids({"4": 0, "42": 1, "43": 2, "5": 3, "": 4})) == [0, 4]
    credit = BoundaryCredit(("<e>", "4", "42", "43"), frozenset(), frozenset({0}))
    log = math.log
    scores = TeacherScores(
        sampled_logprobs_BT=torch.tensor([[log(0.1), log(0.9)]]),
        completion_mask_BT=torch.ones(1, 2, dtype=torch.long),
        topk_ids_BTK=torch.tensor([[[2, 3, 1], [0, 1, 2]]]),
        topk_logprobs_BTK=torch.tensor([[[log(0.6), log(0.3), log(0.1)], [log(0.9), -5.0, -6.0]]]),
    )
    terms_BT = credit.terms_BT(scores, torch.tensor([[1, 0]]))
    assert terms_BT[0].tolist() == pytest.approx([log(0.1), 0.0], abs=1e-6)  # EOS: special
    alignment = CompletionAlignment([1, 0], [AlignedSpan(0, 1, 0, 1), AlignedSpan(1, 2, 1, 2)])
    totals_BT, received = shifted_span_sums(scores, [alignment], terms_BT, [[True, True]])
    assert received == {(0, 1): pytest.approx(log(0.1))}
    shifted = scores_at_student_positions(
        dataclasses.replace(scores, sampled_logprobs_BT=totals_BT), [alignment], (1, 2),
        span_sums_at_first=True,
    )  # fmt: skip
    assert shifted.sampled_logprobs_BT[0].tolist() == pytest.approx([0.0, log(0.09)], abs=1e-6)
    totals_BT, received = shifted_span_sums(scores, [alignment], terms_BT, [[False, True]])
    assert received == {}  # the student's own token decided the boundary: kept
    assert totals_BT[0].tolist() == pytest.approx([log(0.1), log(0.9)], abs=1e-6)


def test_a_teacher_token_over_several_student_tokens_is_split_by_its_prefix_probabilities():
    """The student writes "4", "3" where the teacher has one token "43": p("4...") = p("4") +
    p("42") + p("43") = 1 goes to "4", and p("43") / p("4...") = 0.3 to "3" (as a teacher
    with the student's tokens would score them); texts that disagree keep one span."""
    import math

    from opd.teacher.cross_tokenizer import BoundaryCredit

    texts = {0: "", 1: "4", 2: "42", 3: "43"}
    credit = BoundaryCredit(
        ("<e>", "4", "42", "43"), frozenset(), frozenset({0}), teacher_text=texts.get,
        student_text=lambda ids: "".join(texts[i] for i in ids),
    )  # fmt: skip
    candidates = [(3, torch.tensor(math.log(0.3))), (2, torch.tensor(math.log(0.6))),
                  (1, torch.tensor(math.log(0.1)))]  # fmt: skip
    [mass] = credit.prefix_logprobs([1, 1], 3, candidates) or [None]
    assert mass is None  # "44" does not spell "43"
    [mass] = credit.prefix_logprobs([1, 1], 2, candidates) or [None]
    assert mass is None
    texts[4] = "3"
    [mass] = credit.prefix_logprobs([1, 4], 3, candidates)
    assert float(mass) == pytest.approx(0.0, abs=1e-6)  # log p("4...") = log 1
    assert credit.prefix_logprobs([1, 4], 0, candidates) is None  # a special token: no split
