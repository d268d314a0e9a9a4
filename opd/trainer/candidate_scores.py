"""Phase 1's candidate request: the teacher's exact logprobs at ids the student chose.

`OPDTrainer._candidate_scores` calls `request_candidate_scores` right after the teacher's usual
scores. When the run's `CandidatePlan` (`opd/trainer/build.py` `build_candidate_plan`) asks for
candidates (the divergence on the student's or the union support; the top-k baseline with a
teacher that scores candidates but is not in-process), it:

1. runs one no-grad pass of the student, rows in micro-batches, that keeps only each valid
   position's top ids (never `[B, T, V]` logits): the candidates must be known before the
   teacher is asked, and the statistics pass needs the answer, so this forward is extra;
2. builds the candidate rows (`opd/objectives/candidates.py`: the student's top ids, plus the
   teacher's own top-k for the union, deduplicated, -1 padding);
3. reads the values off the step's teacher hidden states when phase 1 has them, else asks
   `teacher.score_candidates` (or, for a `FullDistributionTeacher` without it, its hidden
   states) and returns the answer as `CandidateScores`, which the
   statistics pass (baseline) and the loss fields (divergence support) read.

A teacher that stays down past its retry budget checkpoints and stops the run as `_teacher_scores`
does. A server too narrow for the candidates is found at start-up from its `/info`
(`check_method_capabilities`, `build_candidate_plan`); one that changes under a running job
answers with a ConfigError: fatal for the divergence support; for the baseline alone the run
warns once and keeps the top-k estimate.

Test: `pytest tests/integration/test_candidate_scores.py`.
"""

from __future__ import annotations

import warnings

import torch

from opd.arguments import ConfigError
from opd.objectives.candidates import (
    CandidateScores,
    candidate_ids,
    candidate_logprobs_from_hidden,
    completion_student_topk,
    scored_candidates,
)
from opd.objectives.hidden import prompt_completion_ids
from opd.teacher.http import TeacherUnavailableError
from opd.teacher.protocol import CandidateScorer, FullDistributionTeacher
from opd.trainer.resume import stopped_for_outage
from opd.trainer.sharding import full_lm_head_weight
from opd.trainer.step import StepState


@torch.no_grad()
def request_candidate_scores(
    trainer, step: StepState, output, teacher_hidden_BTH: torch.Tensor | None = None
) -> CandidateScores | None:
    """The teacher's logprobs at this step's candidate ids, or None when the run asks for none.

    Args:
        trainer: the `OPDTrainer` (its `candidate_plan`, student, teacher and arguments).
        step: the step so far: `batch`, `scores` (the teacher's top-k) and `mask_BT` are set.
        output: TRL's batch dict (prompt and completion ids and masks).
        teacher_hidden_BTH: the step's teacher hidden states when phase 1 has them (a
            full-distribution method): the values come from them, without another teacher call.
    """
    plan = trainer.candidate_plan
    if plan is None:
        return None
    scores, mask_BT = step.scores, step.mask_BT
    assert scores is not None and mask_BT is not None, "the teacher scored the batch first"
    input_ids, attention_mask = prompt_completion_ids(output)
    student_weight_VH = full_lm_head_weight(trainer.accelerator.unwrap_model(trainer.model))
    student_BTM = completion_student_topk(
        trainer.model, student_weight_VH, input_ids, attention_mask, mask_BT, plan.student_k,
        rows_per_forward=trainer.args.per_device_train_batch_size,
    )  # fmt: skip
    ids_BTC = candidate_ids(
        student_BTM, plan, mask_BT, scores.topk_ids_BTK, scores.topk_logprobs_BTK
    )
    try:
        logprobs_BTC = _ask_teacher(trainer, step, ids_BTC, teacher_hidden_BTH)
    except TeacherUnavailableError as error:
        raise stopped_for_outage(trainer, step.rng_state, error) from error
    except ConfigError as error:  # e.g. a server whose backend cannot score candidates
        if plan.divergence_support is not None or not trainer.args.teacher_top_k:
            raise
        warnings.warn(
            f"opd: {error} The top-k baseline uses the teacher's own top-k with a uniform tail "
            "share for the other ids instead (an estimate).",
            stacklevel=1,
        )
        trainer.candidate_plan = None  # the server's abilities do not change mid-run
        return None
    return scored_candidates(ids_BTC, logprobs_BTC, student_BTM.shape[-1], plan)


def _ask_teacher(
    trainer, step: StepState, ids_BTC: torch.Tensor, teacher_hidden_BTH: torch.Tensor | None
) -> torch.Tensor:
    """The teacher's `[B, T, C]` logprobs at the candidate ids: from the step's hidden states
    when it has them, else asked of the teacher (its own hidden states for a
    `FullDistributionTeacher` that scores no candidates)."""
    teacher, batch = trainer.teacher, step.batch
    assert batch is not None, "the batch is generated before its candidates"
    if teacher_hidden_BTH is None:
        if isinstance(teacher, CandidateScorer):
            return teacher.score_candidates(batch, ids_BTC.cpu())
        assert isinstance(teacher, FullDistributionTeacher), "checked by check_method_capabilities"
        teacher_hidden_BTH = teacher.completion_hidden_states(batch)
    head_VH = trainer.teacher_output_weight()  # on the student's device, as the hidden states go
    return candidate_logprobs_from_hidden(
        teacher_hidden_BTH.to(head_VH.device), head_VH, ids_BTC,
        temperature=trainer.args.teacher_temperature,
    )  # fmt: skip
