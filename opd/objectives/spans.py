"""TRACE: distil only on annotated critical spans, GRPO everywhere else (METHODS.md s.11).

TRACE, "Distilling Where It Matters via Token-Routed Self On-Policy Alignment" (arXiv:2605.10194),
routes each completion token to one loss term:

    key span of a correct rollout      -> forward KL  (family-B divergence), weight kl_coef(step)
    error span of an incorrect rollout -> reverse KL  (sampled-token distillation), optional
    every other valid token            -> the outcome policy gradient (GRPO)

and anneals the KL channels away after a warm-up: kl_coef = 1 for `warmup_steps`, then linear to 0
over `decay_steps`. A token whose channel is off (disabled, or its coefficient has reached 0) goes
back to GRPO, so after the anneal TRACE is plain GRPO.

Spans are character ranges `[start, end)` into the decoded completion, so an annotator (an LLM
judge, a regex) works on text and never sees token ids; `char_spans_to_mask` maps them back to
tokens through `token_char_offsets`. The default annotator needs no text at all:
`divergence_span_masks` marks runs of tokens where teacher and student disagree most.

The result is a `TermMasks` (opd/objectives/compose.py), which the composer and the loss phase
read per term.

Test: `pytest -n 0 -q tests/unit/test_spans.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from opd.objectives.compose import TermMasks

Span = tuple[int, int, str]
"""`(start, end, kind)`: character offsets `[start, end)` into the decoded completion text."""

SPAN_KINDS = ("key", "error")


class SpanAnnotator(Protocol):
    """Marks the critical spans of one completion (an LLM judge, a heuristic).

    TRACE asks for "key" spans (the steps that made a correct answer correct) on correct
    rollouts and "error" spans (where an incorrect one went wrong) on incorrect rollouts.
    """

    def __call__(self, prompt: str, completion: str, correct: bool) -> list[Span]: ...


@dataclass(frozen=True)
class SpanMasks:
    """Token masks of the annotated spans of a batch."""

    key_BT: torch.Tensor
    """bool [B, T]: valid tokens inside a "key" span."""
    error_BT: torch.Tensor
    """bool [B, T]: valid tokens inside an "error" span."""


def _decode(ids: list[int], tokenizer) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _common_prefix_from(prefix: str, text: str, start: int) -> int:
    """Length of the common prefix of `prefix` and `text` when it is at least `start`, else
    `start` (the caller keeps offsets monotone, so a shorter one is never needed)."""
    if prefix[:start] != text[:start]:
        return start
    i, limit = start, min(len(prefix), len(text))
    while i < limit and prefix[i] == text[i]:
        i += 1
    return i


def _decoded_offsets(ids: list[int], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text and each token's `[start, end)` in it (see `token_char_offsets`):
    incrementally (linear in the length), or, when the pieces do not add up to the text (a
    decoder whose windows disagree with the whole), from whole prefixes (quadratic)."""
    text = _decode(ids, tokenizer)
    offsets_N = _incremental_offsets(ids, tokenizer, text)
    return text, offsets_N if offsets_N is not None else _prefix_offsets(ids, tokenizer, text)


def _incremental_offsets(ids: list[int], tokenizer, text: str) -> list[tuple[int, int]] | None:
    """The offsets of `_prefix_offsets` from short decodes, as vLLM's incremental detokenizer:
    each step decodes a window that starts at the previous clean boundary's predecessor (so a
    decoder's special handling of a sequence start, e.g. SentencePiece's leading space, cancels
    out) and assigns the token the new complete characters. None when the pieces do not add up
    to `text`."""
    offsets_N: list[tuple[int, int]] = []
    pieces: list[str] = []
    pending = 0  # tokens holding part of a char, waiting for the token that completes it
    start = read = 0  # the window ids[start:]; ids[start:read] are fully assigned
    consumed = 0  # characters of the window already assigned
    end = 0
    for i in range(len(ids)):
        window = _decode(ids[start : i + 1], tokenizer)
        partial = window.endswith("\ufffd")
        stable = window.rstrip("\ufffd") if partial else window
        if len(stable) > consumed:
            pieces.append(stable[consumed:])
            new_end = end + len(stable) - consumed
            offsets_N.extend((end, new_end) for _ in range(pending + 1))
            pending, end, consumed = 0, new_end, len(stable)
        elif partial:
            pending += 1
            continue
        else:
            offsets_N.extend((end, end) for _ in range(pending + 1))
            pending = 0
        if not partial:  # a clean boundary: slide the window
            start, read = read, i + 1
            consumed = len(_decode(ids[start:read], tokenizer))
    offsets_N.extend((end, end) for _ in range(pending))
    return offsets_N if "".join(pieces) == text else None


def _prefix_offsets(ids: list[int], tokenizer, text: str) -> list[tuple[int, int]]:
    """Each token's extent from whole decoded prefixes (one decode of `ids[:i+1]` per token)."""
    offsets_N: list[tuple[int, int]] = []
    pending_N: list[int] = []  # tokens holding only part of a char, waiting for its last byte
    end = 0
    for i in range(len(ids)):
        prefix = _decode(ids[: i + 1], tokenizer)
        new_end = _common_prefix_from(prefix, text, end)
        if new_end > end:
            # This token completes text[end:new_end]; earlier partial pieces share its extent.
            offsets_N.extend((end, new_end) for _ in range(len(pending_N) + 1))
            pending_N, end = [], new_end
        elif len(prefix) > end:
            # The prefix runs past the text it shares (a trailing replacement char): a partial
            # multi-byte char, whose completing token is still to come.
            pending_N.append(i)
        else:
            # Adds nothing (a special token): an empty extent. Pending pieces left before it
            # get one too, which keeps the offsets monotone.
            offsets_N.extend((end, end) for _ in range(len(pending_N) + 1))
            pending_N = []
    offsets_N.extend((end, end) for _ in pending_N)
    return offsets_N


def token_char_offsets(completion_ids: list[int], tokenizer) -> list[tuple[int, int]]:
    """`[start, end)` of each token in `tokenizer.decode(completion_ids, skip_special_tokens=True)`.

    Computed from decoded prefixes: token i ends where `decode(ids[:i+1])` stops agreeing with
    the full text, and starts where token i-1 ended. This follows whatever the decoder does
    (byte-level spaces, SentencePiece's leading space, merged whitespace). Choices:

    - special tokens (skipped by the decode) get an empty extent `(p, p)`;
    - a multi-byte char split over several tokens (byte-level BPE, byte fallback): the partial
      prefixes decode to a replacement char, which is not text; the char belongs to the token that
      completes it, and the earlier pieces get that SAME extent, so a span over the char marks
      every token that spells it. Consecutive distinct extents therefore tile the text;
    - a token that completes one char and starts the next covers the completed one only.

    Offsets are monotone non-decreasing in both start and end. Costs two short decodes per token
    (an incremental detokenizer), checked against the whole text; a decoder that disagrees falls
    back to one decode of each prefix (quadratic in the completion length).

    Args:
        completion_ids: the completion's token ids (valid tokens only).
        tokenizer: a Hugging Face tokenizer (anything with `decode(ids, skip_special_tokens=)`).

    Returns:
        One `(start, end)` per id.
    """
    return _decoded_offsets(completion_ids, tokenizer)[1]


def _check_spans(spans: list[Span], text_length: int) -> None:
    for start, end, kind in spans:
        if kind not in SPAN_KINDS:
            raise ValueError(f"Span kind {kind!r} is not one of {SPAN_KINDS}.")
        if not 0 <= start <= end <= text_length:
            raise ValueError(
                f"Span [{start}, {end}) is not a range inside the completion text "
                f"[0, {text_length}] (need 0 <= start <= end <= {text_length})."
            )


def _offsets_to_mask(offsets_N: list[tuple[int, int]], spans: list[Span], kind: str) -> list[bool]:
    # Half-open ranges overlap when each starts before the other ends; an empty extent or an
    # empty span overlaps nothing.
    ranges = [(start, end) for start, end, span_kind in spans if span_kind == kind and start < end]
    return [
        token_start < token_end
        and any(token_start < end and start < token_end for start, end in ranges)
        for token_start, token_end in offsets_N
    ]


def char_spans_to_mask(
    completion_ids: list[int], spans: list[Span], tokenizer, *, kind: str
) -> list[bool]:
    """Per token: True when the token's extent overlaps a span of `kind`.

    Empty-extent tokens (special tokens) are never marked; a span straddling a token boundary
    marks every token it touches.

    Raises:
        ValueError: on an unknown `kind` (argument or span), or a span outside
            `[0, len(text)]` or with start > end (all spans are checked, whatever their kind).
    """
    if kind not in SPAN_KINDS:
        raise ValueError(f"Span kind {kind!r} is not one of {SPAN_KINDS}.")
    text, offsets_N = _decoded_offsets(completion_ids, tokenizer)
    _check_spans(spans, len(text))
    return _offsets_to_mask(offsets_N, spans, kind)


def annotated_span_masks(
    spans_B: list[list[Span]],
    completion_ids_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    tokenizer,
) -> SpanMasks:
    """Map each row's character spans to token masks.

    Args:
        spans_B: per row, the spans of its completion text, i.e. of
            `decode(valid ids of the row, skip_special_tokens=True)`.
        completion_ids_BT: int [B, T] completion token ids.
        mask_BT: [B, T] 1 on valid tokens; only these are decoded and can be marked.
        tokenizer: the tokenizer that decoded the completions for the annotator.

    Returns:
        `SpanMasks`, bool [B, T] on the device of `mask_BT`.
    """
    if len(spans_B) != completion_ids_BT.shape[0]:
        raise ValueError(
            f"Got spans for {len(spans_B)} rows, the batch has {completion_ids_BT.shape[0]}."
        )
    valid_BT = mask_BT.bool()
    key_BT = torch.zeros_like(valid_BT)
    error_BT = torch.zeros_like(valid_BT)
    for row, spans in enumerate(spans_B):
        if not spans:
            continue  # nothing to mark: skip the decodes
        positions_N = valid_BT[row].nonzero().squeeze(1)
        ids_N = completion_ids_BT[row, positions_N.to(completion_ids_BT.device)].tolist()
        text, offsets_N = _decoded_offsets(ids_N, tokenizer)
        _check_spans(spans, len(text))
        for kind, out_BT in (("key", key_BT), ("error", error_BT)):
            marked_N = _offsets_to_mask(offsets_N, spans, kind)
            out_BT[row, positions_N] = torch.tensor(
                marked_N, dtype=torch.bool, device=out_BT.device
            )
    return SpanMasks(key_BT=key_BT, error_BT=error_BT)


def divergence_span_masks(
    divergence_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    correct_B: torch.Tensor,
    *,
    quantile: float,
    min_tokens: int,
) -> SpanMasks:
    """The default annotator: runs of tokens where the teacher and the student disagree most.

    threshold = the quantile (linear interpolation, as `torch.quantile`, which refuses inputs over
    2^24 values: a large global batch has more) of the divergence over ALL valid tokens
    of the batch; a span is a maximal run of consecutive valid tokens with divergence >= threshold
    (a masked position breaks a run), kept when it has at least `min_tokens` tokens. Spans of
    correct rows are "key", of incorrect rows "error".

    Args:
        divergence_BT: float [B, T] per-token divergence, e.g. |lp_teacher - lp_student| of the
            sampled token. Pass the global batch: the threshold is a batch statistic.
        mask_BT: [B, T] 1 on valid tokens.
        correct_B: bool [B] whether each rollout was verified correct.
        quantile: in [0, 1].
        min_tokens: >= 1, the shortest run kept.

    Returns:
        `SpanMasks`, bool [B, T]; all False when no token is valid.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}.")
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens}.")
    valid_BT = mask_BT.bool()
    if not valid_BT.any():
        empty_BT = torch.zeros_like(valid_BT)
        return SpanMasks(key_BT=empty_BT, error_BT=empty_BT.clone())
    divergence_BT = divergence_BT.detach().float()
    threshold = _quantile(divergence_BT[valid_BT], quantile)
    high_BT = valid_BT & (divergence_BT >= threshold)
    # Label runs: a run starts where a high token follows a non-high one (or opens a row); a
    # cumulative count of starts over the flattened batch gives each run its own id.
    previous_BT = torch.nn.functional.pad(high_BT[:, :-1], (1, 0), value=False)
    starts_BT = high_BT & ~previous_BT
    run_id_BT = torch.cumsum(starts_BT.flatten().long(), 0).view_as(high_BT)
    run_length_R = torch.bincount(run_id_BT[high_BT], minlength=int(run_id_BT.max()) + 1)
    kept_BT = high_BT & (run_length_R[run_id_BT] >= min_tokens)
    correct_B1 = correct_B.bool().to(kept_BT.device)[:, None]
    return SpanMasks(key_BT=kept_BT & correct_B1, error_BT=kept_BT & ~correct_B1)


def kl_anneal_coefficient(step: int, *, warmup_steps: int, decay_steps: int) -> float:
    """TRACE's KL-channel weight: 1.0 before `warmup_steps`, then linear to 0 over `decay_steps`
    (1.0 at `warmup_steps`, 0.0 from `warmup_steps + decay_steps` on; `decay_steps = 0` cuts it
    at `warmup_steps`)."""
    if warmup_steps < 0 or decay_steps < 0:
        raise ValueError(
            f"warmup_steps and decay_steps must be >= 0, got {warmup_steps}, {decay_steps}."
        )
    if step < warmup_steps:
        return 1.0
    if decay_steps == 0:
        return 0.0
    return max(0.0, 1.0 - (step - warmup_steps) / decay_steps)


def route_term_masks(
    spans: SpanMasks,
    mask_BT: torch.Tensor,
    kl_coef: float,
    *,
    forward_on_key: bool = True,
    reverse_on_error: bool = False,
) -> TermMasks:
    """TRACE's token routing, float32 [B, T] masks, all 0 outside `mask_BT`.

    forward_kl = kl_coef on key tokens (if `forward_on_key`), reverse_kl = kl_coef on error
    tokens (if `reverse_on_error`), outcome = 1 on every valid token not routed to an active KL
    channel: with a channel disabled or its coefficient at 0, its tokens go back to GRPO.

    Args:
        spans: the key and error masks (`annotated_span_masks`, `divergence_span_masks`).
        mask_BT: [B, T] 1 on valid tokens.
        kl_coef: in [0, 1], usually `kl_anneal_coefficient(step, ...)`.
        forward_on_key: distil key spans with forward KL.
        reverse_on_error: distil error spans with reverse KL.
    """
    if not 0.0 <= kl_coef <= 1.0:
        raise ValueError(f"kl_coef must be in [0, 1], got {kl_coef}.")
    mask_BT = mask_BT.float()
    zeros_BT = torch.zeros_like(mask_BT)
    active = kl_coef > 0.0
    forward_BT = spans.key_BT.float() if forward_on_key and active else zeros_BT
    reverse_BT = spans.error_BT.float() if reverse_on_error and active else zeros_BT
    routed_BT = torch.maximum(forward_BT, reverse_BT)  # a token in both spans leaves GRPO once
    return TermMasks(
        outcome_BT=(1.0 - routed_BT) * mask_BT,
        reverse_kl_BT=kl_coef * reverse_BT * mask_BT,
        forward_kl_BT=kl_coef * forward_BT * mask_BT,
    )


def _quantile(values_N: torch.Tensor, q: float) -> torch.Tensor:
    """`torch.quantile(values_N, q)` (linear interpolation) for any number of values."""
    sorted_N = torch.sort(values_N).values
    position = q * (sorted_N.numel() - 1)
    low = int(position)
    high = min(low + 1, sorted_N.numel() - 1)
    return sorted_N[low] + (sorted_N[high] - sorted_N[low]) * (position - low)
