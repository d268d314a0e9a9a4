"""Cross-tokenizer teachers: per-token teacher logprobs from spans, vocabulary mapping and ULD.

When the teacher uses another tokenizer than the student, a completion is aligned into spans:
one or more student tokens <-> one or more teacher tokens covering the same text. The teacher's
scores reach the loss mapped onto the student's positions:

    teacher_span_BT  float [B, T]  T_S = sum of the teacher's logprobs of span S's teacher tokens,
                                   stored at the LAST student token of S (0 elsewhere)
    span_start_BT    bool  [B, T]  True at the FIRST student token of each span

The spans tile the valid tokens (`mask_BT`) of each row; padding is never a span start.

Family A (policy-gradient OPD) needs one teacher logprob per student token. Only the span total
is known: the span's reward is r_S = T_S - sum_{t in S} lp_s[t], the log-ratio of the span's
joint probabilities. `span_teacher_logprobs` turns it into a per-token teacher logprob `out` so
that the advantage `out_t - lp_s[t]` is, per rule:

- "all" (the default): r_S on every token of S. The span is one action of probability
  prod_{t in S} p_s(y_t), so r_S * grad log p_s(S) = sum_{t in S} r_S * grad log p_s(y_t):
  vanilla OPD's per-token estimator applied to the span, which a single-token span reduces to.
- "spread": r_S / |S| on each token (the same direction, 1/|S| the step).
- "last": r_S on the span's last token, 0 on the others. Its earlier tokens get no gradient: on
  the demo (a character student, a teacher whose numbers are one token) the student's first
  digits were never trained and it collapsed within 10 steps (accuracy 0.31 -> 0); kept for
  comparison.

"spread" and "last" keep the span total, sum_{t in S} (out_t - lp_s[t]) = r_S. A single-token
span gives out = T_S bit for bit under every rule.

Family B (a divergence on a top-k support) needs the teacher's distribution in the student's
vocabulary. Following GOLD (TRL `trl/experimental/gold/gold_trainer.py`, `ULDLoss`), a teacher
token is "matched" when its token string is exactly a student token string
(`vocabulary_map`); matched top-k entries are re-indexed into the student vocabulary
(`map_topk`), and the unmatched part is compared with Universal Logit Distillation (ULD,
Boizard et al., arXiv:2402.12030, eq. 4): the L1 distance between the two distributions'
probabilities sorted in decreasing order, which needs no token correspondence
(`unmatched_topk`, `student_matched_mask`, `uld_sorted_l1`).

Test: `pytest -n 0 -q tests/unit/test_cross_vocab.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SPAN_RULES = ("all", "spread", "last")


def _span_index_BT(span_start_BT: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A batch-wide span id per position (int64 [B, T]) and the number of ids.

    Within a row the id is the running count of span starts, so all tokens of a span share it;
    rows are offset by T + 1 so that ids never collide across rows. Padding positions get the id
    of the row's last span: every reduction below zeroes them with the mask first.
    """
    B, T = span_start_BT.shape
    local_BT = span_start_BT.long().cumsum(dim=1)
    row_B1 = torch.arange(B, device=span_start_BT.device).unsqueeze(1) * (T + 1)
    return row_B1 + local_BT, B * (T + 1)


def _span_sum(values_BT: torch.Tensor, index_BT: torch.Tensor, n_spans: int) -> torch.Tensor:
    """Per-span sums of `values_BT` (already 0 where they must not count), gathered back to
    [B, T]."""
    flat_index = index_BT.reshape(-1)
    sums_S = values_BT.new_zeros(n_spans).scatter_add_(0, flat_index, values_BT.reshape(-1))
    return sums_S[flat_index].view_as(values_BT)


def _span_last_BT(index_BT: torch.Tensor, mask_BT: torch.Tensor, n_spans: int) -> torch.Tensor:
    """bool [B, T]: True at the last valid token of each span (the largest position carrying
    the span's id; robust to holes in the mask)."""
    B, T = index_BT.shape
    pos_BT = torch.arange(T, device=index_BT.device).expand(B, T)
    masked_pos_BT = torch.where(mask_BT, pos_BT, -1)
    flat_index = index_BT.reshape(-1)
    last_S = torch.full((n_spans,), -1, dtype=torch.long, device=index_BT.device)
    last_S.scatter_reduce_(0, flat_index, masked_pos_BT.reshape(-1), reduce="amax")
    return mask_BT & (pos_BT == last_S[flat_index].view(B, T))


def span_sizes_BT(span_start_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """int64 [B, T]: the number of valid tokens in the span each valid token belongs to (0 on
    padding)."""
    mask_BT = mask_BT.bool()
    index_BT, n_spans = _span_index_BT(span_start_BT)
    return _span_sum(mask_BT.long(), index_BT, n_spans) * mask_BT


def span_teacher_logprobs(
    teacher_span_BT: torch.Tensor,
    span_start_BT: torch.Tensor,
    student_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    rule: str = "all",
) -> torch.Tensor:
    """An effective teacher logprob per student token from each span's reward
    r_S = T_S - sum_S lp_s (see the module docstring for the rules):

    - "all": out[t] = lp_s[t] + r_S on every token of S;
    - "spread": out[t] = lp_s[t] + r_S / |S|;
    - "last": out[last] = T_S - sum_{t in S, t != last} lp_s[t]; out[t] = lp_s[t] on the other
      tokens of S (advantage 0 there).

    A single-token span gives out = T_S exactly under every rule (a special case, since
    a + (b - a) need not round back to b). Vectorised over the batch; no loop over tokens.
    Pass detached student logprobs: the result is meant for an advantage.

    Args:
        teacher_span_BT: float32 [B, T], T_S at the last student token of each span, 0 elsewhere.
        span_start_BT: bool [B, T], True at the first student token of each span.
        student_logprobs_BT: float32 [B, T], the student's logprob of each sampled token.
        mask_BT: bool [B, T], valid completion tokens.
        rule: "all", "spread" or "last".

    Returns:
        float32 [B, T] (the inputs' dtype), 0 at masked positions.
    """
    if rule not in SPAN_RULES:
        raise ValueError(f"span rule must be one of {SPAN_RULES}, got {rule!r}")
    shape = teacher_span_BT.shape
    assert span_start_BT.shape == student_logprobs_BT.shape == mask_BT.shape == shape, (
        f"shapes differ: teacher {tuple(shape)}, start {tuple(span_start_BT.shape)}, "
        f"student {tuple(student_logprobs_BT.shape)}, mask {tuple(mask_BT.shape)}"
    )
    mask_BT = mask_BT.bool()
    index_BT, n_spans = _span_index_BT(span_start_BT)
    last_BT = _span_last_BT(index_BT, mask_BT, n_spans)
    zero = student_logprobs_BT.new_zeros(())
    # torch.where, not a product, so that padding garbage (inf, nan) never reaches a sum.
    student_BT = torch.where(mask_BT, student_logprobs_BT, zero)
    teacher_BT = _span_sum(torch.where(last_BT, teacher_span_BT, zero), index_BT, n_spans)
    size_BT = _span_sum(mask_BT.long(), index_BT, n_spans)
    if rule == "last":
        others_BT = _span_sum(torch.where(last_BT, zero, student_BT), index_BT, n_spans)
        out_BT = torch.where(last_BT, teacher_BT - others_BT, student_BT)
    else:
        total_BT = _span_sum(student_BT, index_BT, n_spans)
        # clamp: padding has size 0; its value is discarded but must not put nan in a backward.
        share_BT = size_BT.clamp(min=1) if rule == "spread" else 1
        out_BT = student_BT + (teacher_BT - total_BT) / share_BT
    out_BT = torch.where(size_BT == 1, teacher_BT, out_BT)
    return torch.where(mask_BT, out_BT, zero)


def vocabulary_map(
    student_vocab: dict[str, int], teacher_vocab: dict[str, int], teacher_vocab_size: int
) -> torch.Tensor:
    """int64 [V_t]: the student id of each teacher id whose token string is exactly a student
    token string (GOLD's rule), -1 elsewhere.

    Teacher ids outside [0, teacher_vocab_size) are ignored; ids in range that no teacher string
    has (e.g. embedding rows past the tokenizer's vocabulary) stay -1.
    """
    map_V = torch.full((teacher_vocab_size,), -1, dtype=torch.long)
    pairs = [
        (teacher_id, student_vocab[token])
        for token, teacher_id in teacher_vocab.items()
        if 0 <= teacher_id < teacher_vocab_size and token in student_vocab
    ]
    if pairs:
        teacher_ids, student_ids = zip(*pairs, strict=True)
        map_V[list(teacher_ids)] = torch.tensor(student_ids, dtype=torch.long)
    return map_V


def _lookup(teacher_topk_ids_NK: torch.Tensor, map_V: torch.Tensor):
    """(student id or -1, in-range flag) of each teacher top-k id."""
    ids = teacher_topk_ids_NK.long()
    in_range = (ids >= 0) & (ids < map_V.numel())
    student_ids = map_V.to(ids.device)[ids.clamp(0, map_V.numel() - 1)]
    return student_ids, in_range


def _sort_desc(logprobs_NK: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Sort the last axis by logprob, descending (stable, so -inf entries keep their order)."""
    logprobs_NK, order_NK = logprobs_NK.sort(dim=-1, descending=True, stable=True)
    return [logprobs_NK, *(x.gather(-1, order_NK) for x in others)]


def map_topk(
    teacher_topk_ids_NK: torch.Tensor, teacher_topk_logprobs_NK: torch.Tensor, map_V: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k in the student's vocabulary.

    Ids go through `map_V`; an entry whose teacher id is unmatched, padded (-inf logprob) or out of
    range becomes id 0 with logprob -inf. The result is re-sorted by logprob, descending, with the
    -inf entries last. Any leading shape [..., K].

    Returns:
        (int64 [..., K] student ids, [..., K] logprobs in the input dtype).
    """
    student_ids, in_range = _lookup(teacher_topk_ids_NK, map_V)
    keep = in_range & (student_ids >= 0) & (teacher_topk_logprobs_NK > float("-inf"))
    ids = torch.where(keep, student_ids, 0)
    logprobs = teacher_topk_logprobs_NK.masked_fill(~keep, float("-inf"))
    logprobs, ids = _sort_desc(logprobs, ids)
    return ids, logprobs


def unmatched_topk(
    teacher_topk_ids_NK: torch.Tensor, teacher_topk_logprobs_NK: torch.Tensor, map_V: torch.Tensor
) -> torch.Tensor:
    """float32 [..., K]: the teacher's top-k logprobs of UNMATCHED ids only, sorted descending,
    -inf elsewhere (matched ids, -inf padding, and out-of-range ids, which are invalid and counted
    in neither part)."""
    student_ids, in_range = _lookup(teacher_topk_ids_NK, map_V)
    keep = in_range & (student_ids < 0)
    (logprobs,) = _sort_desc(teacher_topk_logprobs_NK.masked_fill(~keep, float("-inf")))
    return logprobs


def student_matched_mask(map_V: torch.Tensor, student_vocab_size: int) -> torch.Tensor:
    """bool [V_s]: True at the student ids that some teacher id maps to."""
    student_ids = map_V[map_V >= 0]
    assert student_ids.numel() == 0 or int(student_ids.max()) < student_vocab_size, (
        f"map_V holds student id {int(student_ids.max())} >= student_vocab_size "
        f"{student_vocab_size}"
    )
    matched_V = torch.zeros(student_vocab_size, dtype=torch.bool, device=map_V.device)
    matched_V[student_ids] = True
    return matched_V


def uld_sorted_l1(
    student_logits_NV: torch.Tensor,
    student_matched_V: torch.Tensor,
    teacher_unmatched_logprobs_NK: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token ULD distance on the unmatched part: sum_k |p_s_sorted[k] - p_t_sorted[k]|.

    p_t_sorted are the teacher's unmatched top-k probabilities (exp of the input, -inf -> 0),
    sorted descending. p_s_sorted are the student's K largest probabilities over UNMATCHED student
    ids: softmax(logits / temperature) over the FULL student vocabulary, matched ids excluded,
    then top-K, with K = teacher_unmatched_logprobs_NK.shape[-1] (zeros pad it when the student
    has fewer than K unmatched ids, as GOLD pads the shorter side).

    Approximation: ULD (arXiv:2402.12030, eq. 4) and GOLD take the L1 between the FULL sorted
    unmatched distributions. The teacher only returns its top-k, so this keeps the first K sorted
    entries of each side and drops the tails (both tails are small and sorted, so their L1 is at
    most the sum of the two tail masses).

    Differentiable w.r.t. `student_logits_NV`: the gradient flows through the K selected student
    probabilities (and, through the softmax, into every logit). The selection itself is
    piecewise constant.

    Args:
        student_logits_NV: [..., V] student logits (any float dtype; computed in float32, or
            float64 when the logits are float64).
        student_matched_V: bool [V], from `student_matched_mask`.
        teacher_unmatched_logprobs_NK: [..., K], from `unmatched_topk`.
        temperature: softmax temperature of the student, > 0.

    Returns:
        [...] distance per token (float32, or float64 for float64 logits).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    V, K = student_logits_NV.shape[-1], teacher_unmatched_logprobs_NK.shape[-1]
    assert student_matched_V.shape == (V,), f"matched mask {tuple(student_matched_V.shape)} != {V}"
    dtype = torch.promote_types(student_logits_NV.dtype, torch.float32)
    student_p_NV = torch.softmax(student_logits_NV.to(dtype) / temperature, dim=-1)
    # Matched ids become 0, so top-K never prefers them over an unmatched id with mass; if it
    # picks one (fewer than K unmatched ids) it contributes a constant 0, i.e. zero padding.
    student_p_NV = student_p_NV.masked_fill(student_matched_V.to(student_p_NV.device), 0.0)
    student_top_NK = student_p_NV.topk(min(K, V), dim=-1).values
    student_top_NK = F.pad(student_top_NK, (0, K - student_top_NK.shape[-1]))
    teacher_p_NK = teacher_unmatched_logprobs_NK.to(dtype).exp()
    teacher_p_NK = teacher_p_NK.sort(dim=-1, descending=True).values
    return (student_top_NK - teacher_p_NK).abs().sum(dim=-1)
