"""Candidate sets: the ids at which the teacher is asked for its exact logprobs.

A remote teacher returns its logprob of each sampled token and its own top-k. Two things need its
values at ids it did not choose: the divergence term on the student's top-k or on the union of
both top-k sets (`opd_divergence_support: student|union`), and vOPD's top-k baseline, which is a
KL on the student's top-k (METHODS.md s.2). A `CandidateScorer` teacher
(`opd/teacher/protocol.py`) answers `[B, T, C]` logprobs at `[B, T, C]` requested ids; this
module chooses those ids and hands each use its part of the answer. A `FullDistributionTeacher`
without `score_candidates` (offline shards with stored hidden states) gets the same values from
its hidden states (`candidate_logprobs_from_hidden`).

Contract:
- The candidate row of a position is `[student's top M | teacher extras]`: the student's M best
  ids in rank order (M = the largest k any use needs), then, for the union support only, the
  teacher's top-k ids that are not among the student's top K (K = `teacher_top_k`). Padding is
  -1 with logprob -inf; masked positions are all padding.
- Each use takes columns of that row with no id twice: the top-k baseline the first k, the
  student support the first K, the union support the first K and the extras. The kernels would
  count a repeated id's mass twice, so `dedupe_ids` removes repeats before anything is scored.
  (The teacher may still see an id twice in a row, an extra that is also among the student's
  ranks K..M; it scores each copy.)
- The student's top ids are those of the weights that generated the batch; later updates on the
  same generation (`num_iterations`, `steps_per_generation`) keep that support, a detached choice
  like the teacher's own top-k.

Cost: one extra no-grad student forward per generation step (`completion_student_topk`). The
candidates must be known before the teacher is asked, and the statistics pass that computes the
baseline needs the teacher's answer, so the student's top-k cannot come from that pass.

Test: `pytest tests/unit/test_candidates.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.objectives.hidden import completion_hidden_states
from opd.types import DivergenceSupport


@dataclass(frozen=True)
class CandidatePlan:
    """Which uses read candidate scores in a run, and how many of the student's ids each takes."""

    divergence_support: DivergenceSupport | None = None
    """STUDENT or UNION: the divergence term's support; None: the divergence does not use them."""
    divergence_k: int = 0
    """K, the student's share of the divergence support (`teacher_top_k`)."""
    baseline_k: int = 0
    """k of the top-k vOPD baseline (`opd_baseline_top_k`); 0: the baseline does not use them."""

    def __post_init__(self):
        support = self.divergence_support
        assert support is None or support.scores_candidates, f"{support!r} scores no candidates"
        assert (support is None) == (self.divergence_k == 0), "a divergence support needs its K"
        assert support is not None or self.baseline_k > 0, "a plan has at least one use"

    @property
    def student_k(self) -> int:
        """M, how many of the student's top ids the candidate row starts with."""
        return max(self.divergence_k, self.baseline_k)

    @property
    def adds_teacher_topk(self) -> bool:
        """The row also holds the teacher's own top-k (the union support)."""
        return self.divergence_support == DivergenceSupport.UNION


@dataclass(frozen=True)
class CandidateScores:
    """The teacher's answer at one generation step's candidate ids (this process's rows)."""

    ids_BTC: torch.Tensor
    """int64 [B, T, C] the candidate ids, -1 = padding."""
    logprobs_BTC: torch.Tensor
    """float32 [B, T, C] the teacher's logprobs at them, -inf at padding."""
    student_k: int
    """How many leading columns are the student's top ids (M, or the vocabulary if smaller)."""
    plan: CandidatePlan

    def __post_init__(self):
        assert self.ids_BTC.shape == self.logprobs_BTC.shape, "one logprob per candidate id"
        assert self.logprobs_BTC.dtype == torch.float32, "candidate logprobs are float32"

    def divergence_support_BTK(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(ids, logprobs)` of the divergence term's support: the student's top K, plus the
        teacher's extras for the union."""
        assert self.plan.divergence_support is not None, "the plan has no candidate divergence"
        k = min(self.plan.divergence_k, self.student_k)
        if not self.plan.adds_teacher_topk:
            return self.ids_BTC[..., :k], self.logprobs_BTC[..., :k]
        columns = [*range(k), *range(self.student_k, self.ids_BTC.shape[-1])]
        return self.ids_BTC[..., columns], self.logprobs_BTC[..., columns]

    def baseline_support_BTK(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(ids, logprobs)` of the top-k baseline's support: the student's top k."""
        assert self.plan.baseline_k > 0, "the plan's baseline does not use candidates"
        k = min(self.plan.baseline_k, self.student_k)
        return self.ids_BTC[..., :k], self.logprobs_BTC[..., :k]


def dedupe_ids(ids_NC: torch.Tensor) -> torch.Tensor:
    """`ids_NC` (any leading dims) with every repeat of an id in its row after the first, and
    every negative id, set to -1."""
    sorted_NC, order_NC = ids_NC.sort(dim=-1, stable=True)  # stable: a row's first copy leads
    repeat_sorted_NC = torch.zeros_like(sorted_NC, dtype=torch.bool)
    repeat_sorted_NC[..., 1:] = sorted_NC[..., 1:] == sorted_NC[..., :-1]
    repeat_NC = torch.zeros_like(repeat_sorted_NC).scatter(-1, order_NC, repeat_sorted_NC)
    return ids_NC.masked_fill(repeat_NC | (ids_NC < 0), -1)


def union_extras(
    student_ids_NK: torch.Tensor, teacher_ids_NK: torch.Tensor, teacher_logprobs_NK: torch.Tensor
) -> torch.Tensor:
    """int64 `[N, K_t]` the teacher's top-k ids that are not among `student_ids_NK` (nor padding,
    logprob -inf or NaN, nor a repeat), in the teacher's order; -1 elsewhere."""
    teacher_ids_NK = teacher_ids_NK.long().masked_fill(~(teacher_logprobs_NK > -torch.inf), -1)
    both_NC = dedupe_ids(torch.cat([student_ids_NK.long(), teacher_ids_NK], dim=-1))
    return both_NC[..., student_ids_NK.shape[-1] :]


def candidate_ids(
    student_topk_BTM: torch.Tensor,
    plan: CandidatePlan,
    mask_BT: torch.Tensor,
    teacher_topk_ids_BTK: torch.Tensor | None = None,
    teacher_topk_logprobs_BTK: torch.Tensor | None = None,
) -> torch.Tensor:
    """int64 `[B, T, C]` the candidate row of every position (module docstring), -1 padding.

    Args:
        student_topk_BTM: int64 the student's top ids in rank order (-1 at masked positions).
        plan: what the run uses them for; the union needs the teacher's top-k.
        mask_BT: the completion mask; masked positions get only padding.
        teacher_topk_ids_BTK, teacher_topk_logprobs_BTK: the teacher's top-k (-inf = padding).
    """
    candidates_BTC = student_topk_BTM.long()
    if plan.adds_teacher_topk:
        assert teacher_topk_ids_BTK is not None and teacher_topk_logprobs_BTK is not None
        device = candidates_BTC.device
        extras_BTK = union_extras(
            candidates_BTC[..., : plan.divergence_k],
            teacher_topk_ids_BTK.to(device),
            teacher_topk_logprobs_BTK.to(device),
        )
        candidates_BTC = torch.cat([candidates_BTC, extras_BTK], dim=-1)
    return candidates_BTC.masked_fill(~mask_BT.bool()[..., None].to(candidates_BTC.device), -1)


def scored_candidates(
    ids_BTC: torch.Tensor, logprobs_BTC: torch.Tensor, student_k: int, plan: CandidatePlan
) -> CandidateScores:
    """The teacher's answer as `CandidateScores` on the ids' device, -inf wherever an id is
    padding (what the kernels read as padding: a finite value there would gather at id -1)."""
    assert logprobs_BTC.shape == ids_BTC.shape, (
        f"the teacher answered {tuple(logprobs_BTC.shape)} for {tuple(ids_BTC.shape)} candidates"
    )
    logprobs_BTC = logprobs_BTC.to(device=ids_BTC.device, dtype=torch.float32)
    logprobs_BTC = logprobs_BTC.masked_fill(ids_BTC < 0, -torch.inf)
    return CandidateScores(ids_BTC, logprobs_BTC, student_k, plan)


@torch.no_grad()
def candidate_logprobs_from_hidden(
    teacher_hidden_BTH: torch.Tensor,
    teacher_weight_VH: torch.Tensor,
    ids_BTC: torch.Tensor,
    *,
    temperature: float,
    chunk_rows: int = 512,
) -> torch.Tensor:
    """float32 `[B, T, C]` `log_softmax(hidden @ weight.T / temperature)` at `ids_BTC` (-inf
    where an id is -1): a teacher's candidate scores from its hidden states and lm_head, for a
    `FullDistributionTeacher` that has no `score_candidates` (e.g. offline shards that store
    hidden states); `[chunk_rows, V]` logits at a time."""
    hidden_NH = teacher_hidden_BTH.reshape(-1, teacher_hidden_BTH.shape[-1])
    ids_NC = ids_BTC.reshape(-1, ids_BTC.shape[-1]).to(hidden_NH.device)
    weight_VH = teacher_weight_VH.to(hidden_NH.device).float()
    chunks = []
    for lo in range(0, hidden_NH.shape[0], chunk_rows):
        logits = hidden_NH[lo : lo + chunk_rows].float() @ weight_VH.T
        logprobs = torch.log_softmax(logits / temperature, dim=-1)
        chunks.append(logprobs.gather(-1, ids_NC[lo : lo + chunk_rows].clamp(min=0)))
    values_NC = torch.cat(chunks) if chunks else ids_NC.new_zeros(ids_NC.shape, dtype=torch.float)
    values_NC = values_NC.masked_fill(ids_NC < 0, -torch.inf)
    return values_NC.reshape(ids_BTC.shape).to(ids_BTC.device)


@torch.no_grad()
def student_topk_ids(
    student_hidden_NH: torch.Tensor, student_weight_VH: torch.Tensor, k: int, chunk_rows: int = 512
) -> torch.Tensor:
    """int64 `[N, min(k, V)]` the student's top-k ids per position, best first, from final
    hidden states and the lm_head (a temperature does not change the order); `[chunk_rows, V]`
    logits at a time."""
    k = min(k, student_weight_VH.shape[0])
    weight_VH = student_weight_VH.float()
    chunks = [
        (student_hidden_NH[lo : lo + chunk_rows].float() @ weight_VH.T).topk(k, dim=-1).indices
        for lo in range(0, student_hidden_NH.shape[0], chunk_rows)
    ]
    if not chunks:
        return torch.empty(0, k, dtype=torch.long, device=student_hidden_NH.device)
    return torch.cat(chunks)


@torch.no_grad()
def completion_student_topk(
    model,
    student_weight_VH: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_BT: torch.Tensor,
    k: int,
    *,
    rows_per_forward: int,
) -> torch.Tensor:
    """int64 `[B, T, min(k, V)]` the student's top-k ids at each valid completion position (-1
    elsewhere), from no-grad forwards of `rows_per_forward` rows: never `[B, T, V]` logits.

    Every process runs the same number of forwards, valid tokens or not (under FSDP a forward is
    a collective).
    """
    num_tokens = mask_BT.shape[1]
    k = min(k, student_weight_VH.shape[0])
    keep_BT = mask_BT.bool()
    top_BTK = torch.full((*keep_BT.shape, k), -1, dtype=torch.long, device=keep_BT.device)
    for lo in range(0, input_ids.shape[0], rows_per_forward):
        rows = slice(lo, lo + rows_per_forward)
        hidden_BTH = completion_hidden_states(
            model, input_ids[rows], attention_mask[rows], num_tokens
        )
        keep = keep_BT[rows].to(hidden_BTH.device)
        if keep.any():
            top_NK = student_topk_ids(hidden_BTH[keep], student_weight_VH, k)
            top_BTK[rows][keep.to(top_BTK.device)] = top_NK.to(top_BTK.device)
    return top_BTK


def support_at(
    support_BTK: tuple[torch.Tensor, torch.Tensor], rows: slice, keep_BT: torch.Tensor, device
) -> dict[str, torch.Tensor]:
    """The baseline support's `(ids, logprobs)` at the kept positions of `rows`, as the
    `teacher_support_*_NK` arguments of `completion_token_stats`."""
    ids_BTK, logprobs_BTK = support_BTK
    keep_BT = keep_BT.to(ids_BTK.device)
    return {
        "teacher_support_ids_NK": ids_BTK[rows][keep_BT].to(device),
        "teacher_support_logprobs_NK": logprobs_BTK[rows][keep_BT].to(device),
    }
