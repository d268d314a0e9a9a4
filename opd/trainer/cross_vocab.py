"""`CrossVocabMixin`: a teacher of another tokenizer, in the student's terms (phase 1 and loss).

A cross-tokenizer teacher (`opd/teacher/cross_tokenizer.py`, or offline shards written by one)
returns span sums and its own top-k ids on the student's positions. Right after scoring, phase 1
turns them into what every later stage already reads:

- the sampled-token term: `span_teacher_logprobs` (`teacher_span_rule`) gives a per-token
  teacher logprob whose advantage over lp_old carries each span's reward (the span's teacher
  logprob minus the student's) to its tokens, so the composer and every weighting run
  unchanged;
- the family-B divergence, at the first student token of each span only (inside a span the two
  sides' next-token distributions are over different text): 'gold' maps the teacher's top-k ids
  through the exact-string vocabulary map into student ids (unmatched mass joins the tail
  bucket; the teacher's EOS counts as the student's EOS, as in the alignment), 'uld'
  compares the sorted probabilities of the unmatched ids, 'hybrid' both.

Test: `pytest tests/integration/test_cross_tokenizer.py`.
"""

from __future__ import annotations

import dataclasses
from math import nan

import torch

from opd.objectives.cross_vocab import (
    map_topk,
    span_teacher_logprobs,
    student_matched_mask,
    uld_sorted_l1,
    unmatched_topk,
    vocabulary_map,
)
from opd.types import CrossVocab

ULD_CHUNK_ROWS = 256  # rows of student logits at a time in the ULD term: [256, V] floats


class CrossVocabMixin:
    """Methods of `OPDTrainer`; `self` is the trainer."""

    def build_cross_vocab(self) -> None:
        """The teacher-to-student id map of the divergence term (None without one)."""
        self.cross_vocab_map_V = None
        self.cross_matched_V = None
        args = self.args
        if not (args.teacher_cross_tokenizer and args.uses_divergence_term):
            return
        teacher_vocab = self.teacher_vocabulary()
        student = getattr(self.processing_class, "tokenizer", self.processing_class)
        student_vocab_size = int(self.accelerator.unwrap_model(self.model).config.vocab_size)
        map_V = vocabulary_map(student.get_vocab(), teacher_vocab, max(teacher_vocab.values()) + 1)
        teacher_eos = self.teacher_eos_token_id()
        if teacher_eos is not None and student.eos_token_id is not None:  # as the alignment does
            map_V[teacher_eos] = student.eos_token_id
        # a tokenizer may list added tokens beyond the model's rows, which it never produces
        self.cross_vocab_map_V = torch.where(map_V < student_vocab_size, map_V, -1)
        self.cross_matched_V = student_matched_mask(self.cross_vocab_map_V, student_vocab_size)
        matched = int((self.cross_vocab_map_V >= 0).sum())
        print(
            f"opd: cross-tokenizer divergence ({args.opd_cross_vocab.value}): {matched} of "
            f"{len(teacher_vocab)} teacher tokens have a student token of the same string."
        )

    def teacher_eos_token_id(self) -> int | None:
        tokens = getattr(self.teacher, "tokens", None)
        if tokens is not None:
            return tokens.eos_token_id
        return self.teacher.teacher_tokenizer().eos_token_id  # offline shards

    def teacher_vocabulary(self) -> dict[str, int]:
        """The teacher tokenizer's `{token string: id}` (the divergence term's map)."""
        tokens = getattr(self.teacher, "tokens", None)
        tokenizer = getattr(tokens, "tokenizer", None)
        if tokenizer is None and self.offline is not None:  # shards: the recorded tokenizer
            tokenizer = self.teacher.teacher_tokenizer()
        if tokenizer is None:
            raise ValueError(
                "the cross-tokenizer divergence term maps the teacher's top-k ids by their "
                "strings, which needs the teacher's vocabulary: set "
                "teacher_tokenizer_name_or_path (a stock vLLM server's /tokenize gives none)."
            )
        return tokenizer.get_vocab()

    def in_student_terms(self, step) -> None:
        """Replace a cross-tokenizer teacher's span scores in `step` by per-token ones (above)."""
        scores = step.scores
        step.cross_span_start_BT = scores.span_start_BT
        if scores.span_start_BT is None:
            return
        if scores.top_k:  # the divergence reads span starts with a teacher top-k only (not the
            # tokens the teacher has no token for)
            has_topk_BT = scores.topk_logprobs_BTK[..., 0] > float("-inf")
            step.cross_span_start_BT = scores.span_start_BT & has_topk_BT
        device = step.student_old_BT.device
        span_start_BT = scores.span_start_BT.to(device)
        student_BT = step.student_old_BT.float()
        # Every valid token is in a span (a teacherless one in its own, penalised).
        teacher_BT = span_teacher_logprobs(
            scores.sampled_logprobs_BT.to(device), span_start_BT, student_BT, step.mask_BT,
            rule=str(self.args.teacher_span_rule),
        )  # fmt: skip
        topk = {"topk_ids_BTK": None, "topk_logprobs_BTK": None}
        if self.cross_vocab_map_V is not None and scores.top_k:
            ids_BTK, logprobs_BTK = scores.topk_ids_BTK.long(), scores.topk_logprobs_BTK
            mapped_ids_BTK, mapped_BTK = map_topk(ids_BTK, logprobs_BTK, self.cross_vocab_map_V)
            topk = {"topk_ids_BTK": mapped_ids_BTK, "topk_logprobs_BTK": mapped_BTK}
            step.teacher_unmatched_BTK = unmatched_topk(
                ids_BTK, logprobs_BTK, self.cross_vocab_map_V
            )
        step.scores = dataclasses.replace(
            scores, sampled_logprobs_BT=teacher_BT.float().cpu(), span_start_BT=None, **topk
        )

    def cross_vocab_fields(self, step, device) -> dict[str, torch.Tensor]:
        """The loss phase's fields: the divergence only at span starts, ULD's teacher part."""
        span_start_BT = getattr(step, "cross_span_start_BT", None)
        if span_start_BT is None or not self.args.uses_divergence_term:
            return {}
        fields = {"divergence_mask_BT": span_start_BT.to(device).float()}
        if self.args.opd_cross_vocab != CrossVocab.GOLD:
            fields["teacher_unmatched_logprobs_BTK"] = step.teacher_unmatched_BTK.to(device)
        return fields

    def uld_loss(self, fields, hidden_NH, weight_VH, weight_N, rows_N, cols_N) -> torch.Tensor:
        """sum over kept span starts of weight * ULD distance (the caller's normalisation)."""
        unmatched_NK = fields.teacher_unmatched_logprobs_BTK[rows_N, cols_N]
        total = hidden_NH.new_zeros(())
        distances = []
        for lo in range(0, hidden_NH.shape[0], ULD_CHUNK_ROWS):
            rows = slice(lo, lo + ULD_CHUNK_ROWS)
            live = weight_N[rows] != 0
            if not live.any():
                continue
            logits_NV = hidden_NH[rows][live] @ weight_VH.T
            distance_N = uld_sorted_l1(
                logits_NV.float(), self.cross_matched_V.to(logits_NV.device),
                unmatched_NK[rows][live], temperature=self.args.opd_divergence_temperature,
            )  # fmt: skip
            total = total + (distance_N * weight_N[rows][live]).sum()
            distances.append(distance_N.detach())
        distance = torch.cat(distances).mean() if distances else torch.tensor(nan)
        self.record("opd/uld_distance", float(distance))
        return total
