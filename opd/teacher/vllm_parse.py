"""vLLM prompt logprobs -> `SequenceScores`: pure functions, no vLLM import.

vLLM scores a prompt when asked for `prompt_logprobs=k`: at every prompt position after the
first it returns the logprob of the actual prompt token plus the k most likely tokens, keyed by
token id (k entries when the actual token is among the top k, k + 1 otherwise; position 0 is
`None`). A teacher scores `context + completion` as one prompt and keeps positions
`C .. C+T-1` (context length C, completion length T): the entry for the completion token is the
sampled logprob, the k best entries (sorted descending, padded with -inf / id 0 when fewer) are
the top-k. Two sources share that core:

- `scores_from_request_outputs`: the in-process `vllm.LLM.generate` outputs (`RequestOutput`,
  whose `prompt_logprobs` maps ids to `Logprob(logprob, rank, decoded_token)`, or is a
  `FlatLogprobs` of flat lists with `flat_logprobs=True`, which the backend uses);
- `scores_from_completion_response`: the JSON of a stock OpenAI server's `/v1/completions`
  (`choices[i].prompt_logprobs`, ids as strings, `-inf` clamped to -9999.0 by the server).

Anything that does not fit (a missing position or completion token, a positive "logprob" from a
server that returns logits) raises `VLLMOutputError` naming the sequence and position.

Test: `pytest tests/unit/test_vllm_parse.py`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from itertools import chain
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from opd.teacher.wire import ScoreRequest, SequenceScores

# The OpenAI server writes -inf logprobs as -9999.0 (JSON has no infinity); map them back so the
# scores equal an in-process forward's.
OPENAI_NEG_INF = -9999.0
# A log-softmax is <= 0; allow for rounding, but a clearly positive value is a logit.
MAX_LOGPROB = 1e-4


class VLLMOutputError(RuntimeError):
    """vLLM's answer does not hold the prompt logprobs a score request needs."""


def vocab_size_from_error(message: str) -> int | None:
    """The vocabulary size a vLLM server names when it rejects an out-of-vocab `logit_bias` id.

    A stock server exposes no vocabulary size, yet asking it for more prompt logprobs than the
    vocabulary holds kills its engine (`torch.topk` out of range), so the client asks this way.
    """
    match = re.search(r"Vocabulary size: (\d+)", message)
    return int(match.group(1)) if match else None


def scores_from_request_outputs(outputs: Sequence[Any], request: ScoreRequest) -> SequenceScores:
    """Scores of `request` from `LLM.generate` outputs, one per sequence, in request order.

    Args:
        outputs: objects with `prompt_logprobs`: a sequence over prompt positions of `None` or a
            mapping token id -> object with a `.logprob` float; or a `FlatLogprobs`
            (`start_indices`, `end_indices`, `token_ids`, `logprobs`).
        request: what was scored; sequence i was the prompt `context_i + completion_i`.
    """
    if len(outputs) != request.num_sequences:
        raise VLLMOutputError(
            f"vLLM returned {len(outputs)} outputs for {request.num_sequences} sequences"
        )
    positions_per_sequence = [
        _output_positions(_prompt_logprobs(output, i), len(context))
        for i, (output, context) in enumerate(zip(outputs, request.contexts(), strict=True))
    ]
    return _scores(positions_per_sequence, request)


def scores_from_completion_response(
    payload: Mapping[str, Any], request: ScoreRequest
) -> SequenceScores:
    """Scores of `request` from a `/v1/completions` JSON answer (one prompt per sequence).

    Choices are matched to sequences by their `index`, not by their order in the list.
    """
    choices = payload.get("choices")
    if not isinstance(choices, list) or len(choices) != request.num_sequences:
        count = len(choices) if isinstance(choices, list) else "no"
        raise VLLMOutputError(
            f"the server returned {count} choices for {request.num_sequences} prompts"
        )
    choices = sorted(choices, key=lambda choice: choice["index"])
    if [choice["index"] for choice in choices] != list(range(request.num_sequences)):
        raise VLLMOutputError(
            f"choice indices {[c['index'] for c in choices]} are not "
            f"0..{request.num_sequences - 1} (n must be 1)"
        )
    positions_per_sequence = []
    for i, (choice, context) in enumerate(zip(choices, request.contexts(), strict=True)):
        entries = choice.get("prompt_logprobs")
        if entries is None:
            raise VLLMOutputError(
                f"choice {i} has no prompt_logprobs; the request must set prompt_logprobs"
            )
        positions_per_sequence.append(_convert_tail(entries, len(context), _json_position))
    return _scores(positions_per_sequence, request)


def sequence_scores(
    positions: Sequence[Mapping[int, float] | None],
    context_length: int,
    completion: Sequence[int],
    top_k: int,
    *,
    sequence: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One sequence's scores from its per-position `{token id: logprob}` entries.

    Args:
        positions: one entry per prompt token of `context + completion` (entry 0 is unused).
        context_length: C; completion token t sits at position C + t.
        completion: the T completion ids.
        top_k: K, the width of the top-k arrays (0: none).
        sequence: the sequence's index, for error messages.

    Returns:
        sampled logprobs float32 [T]; top-k ids int64 [T, K] and logprobs float32 [T, K],
        descending, padded with id 0 / -inf (both None when K == 0).
    """
    expected = context_length + len(completion)
    if len(positions) != expected:
        raise VLLMOutputError(
            f"sequence {sequence}: prompt_logprobs cover {len(positions)} positions, expected "
            f"{expected} (context {context_length} + completion {len(completion)})"
        )
    entries = [
        _checked_entry(
            positions[context_length + t], token, sequence=sequence, position=context_length + t
        )
        for t, token in enumerate(completion)
    ]
    sampled_T = torch.tensor(
        [entry[token] for entry, token in zip(entries, completion, strict=True)],
        dtype=torch.float32,
    )
    if not top_k:
        return sampled_T, None, None
    topk_ids_TK, topk_logprobs_TK = _top_k(entries, top_k)
    return sampled_T, topk_ids_TK, topk_logprobs_TK


def _top_k(entries: list[Mapping[int, float]], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top_k` best of each position's k or k + 1 entries, descending, padded.

    The entries go into one `[T, W]` array (W the widest position, -inf filled) through flat
    numpy buffers: per-position Python lists would cost more than vLLM's own output processing.
    """
    counts_T = np.fromiter((len(entry) for entry in entries), dtype=np.int64, count=len(entries))
    total, width = int(counts_T.sum()), int(counts_T.max(initial=0))
    ids_N = np.fromiter(chain.from_iterable(entries), dtype=np.int64, count=total)
    values = chain.from_iterable(entry.values() for entry in entries)
    logprobs_N = np.fromiter(values, dtype=np.float32, count=total)
    rows_N = np.repeat(np.arange(len(entries)), counts_T)
    columns_N = np.arange(total) - np.repeat(np.cumsum(counts_T) - counts_T, counts_T)
    ids_TW = np.zeros((len(entries), width), dtype=np.int64)
    logprobs_TW = np.full((len(entries), width), -np.inf, dtype=np.float32)
    ids_TW[rows_N, columns_N] = ids_N
    logprobs_TW[rows_N, columns_N] = logprobs_N
    values_TK, order_TK = torch.from_numpy(logprobs_TW).topk(min(top_k, width), dim=-1)
    ids_TK = torch.from_numpy(ids_TW).gather(-1, order_TK)
    missing = top_k - values_TK.shape[1]
    if missing > 0:
        values_TK = F.pad(values_TK, (0, missing), value=-torch.inf)
        ids_TK = F.pad(ids_TK, (0, missing), value=0)
    return ids_TK, values_TK


def _scores(
    positions_per_sequence: list[list[Mapping[int, float] | None]], request: ScoreRequest
) -> SequenceScores:
    parts = [
        sequence_scores(positions, len(context), completion, request.top_k, sequence=i)
        for i, (positions, context, completion) in enumerate(
            zip(positions_per_sequence, request.contexts(), request.completions(), strict=True)
        )
    ]
    topk_ids = [ids for _, ids, _ in parts if ids is not None]
    topk_logprobs = [logprobs for _, _, logprobs in parts if logprobs is not None]
    return SequenceScores(
        completion_lengths_B=request.completion_lengths_B.clone(),
        sampled_logprobs_M=torch.cat([sampled for sampled, _, _ in parts]),
        topk_ids_MK=torch.cat(topk_ids) if request.top_k else None,
        topk_logprobs_MK=torch.cat(topk_logprobs) if request.top_k else None,
    )


def _prompt_logprobs(output: Any, sequence: int) -> Sequence[Any]:
    prompt_logprobs = getattr(output, "prompt_logprobs", None)
    if prompt_logprobs is None:
        raise VLLMOutputError(
            f"output {sequence} has no prompt_logprobs; SamplingParams must set prompt_logprobs"
        )
    return prompt_logprobs


def _output_positions(prompt_logprobs: Any, context_length: int) -> list[Any]:
    """`RequestOutput.prompt_logprobs` as `{id: logprob}` per position (completion part only)."""
    if not hasattr(prompt_logprobs, "start_indices"):
        return _convert_tail(prompt_logprobs, context_length, _logprob_position)
    # vLLM's `FlatLogprobs` (SamplingParams(flat_logprobs=True)): flat lists plus per-position
    # ranges, read directly instead of through a `Logprob` object per entry.
    starts, ends = prompt_logprobs.start_indices, prompt_logprobs.end_indices
    ids, logprobs = prompt_logprobs.token_ids, prompt_logprobs.logprobs
    return [None] * min(context_length, len(starts)) + [
        dict(zip(ids[start:end], logprobs[start:end], strict=True))
        for start, end in zip(starts[context_length:], ends[context_length:], strict=True)
    ]


def _convert_tail(entries: Sequence[Any], context_length: int, convert) -> list[Any]:
    """Convert only the completion positions: the context's are never read (and may be many)."""
    return [None] * min(context_length, len(entries)) + [
        None if entry is None else convert(entry) for entry in entries[context_length:]
    ]


def _logprob_position(entry: Mapping[int, Any]) -> dict[int, float]:
    """`{17: Logprob(logprob=-1.2, rank=3, decoded_token=...)}` -> `{17: -1.2}`."""
    return {int(token): float(logprob.logprob) for token, logprob in entry.items()}


def _json_position(entry: Mapping[str, Any]) -> dict[int, float]:
    """`{"17": {"logprob": -1.2, ...}}` -> `{17: -1.2}` (-9999.0 back to -inf)."""
    position = {}
    for token, value in entry.items():
        logprob = float(value["logprob"])
        position[int(token)] = -float("inf") if logprob <= OPENAI_NEG_INF else logprob
    return position


def _checked_entry(
    entry: Mapping[int, float] | None, token: int, *, sequence: int, position: int
) -> Mapping[int, float]:
    if entry is None or token not in entry:
        ids = sorted(entry)[:20] if entry else []
        raise VLLMOutputError(
            f"sequence {sequence}, position {position}: prompt_logprobs lack the completion "
            f"token {token} (ids present: {ids}); vLLM always returns the actual prompt token, "
            "so this output does not belong to the request"
        )
    worst = max(entry.values())
    if worst > MAX_LOGPROB:
        raise VLLMOutputError(
            f"sequence {sequence}, position {position}: a prompt 'logprob' of {worst:.4g} > 0; "
            "the vLLM engine must run with logprobs_mode raw_logprobs (its default), "
            "not *_logits"
        )
    return entry
