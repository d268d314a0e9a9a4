"""Off-policy traces in the rollout group (LUFFY; StableOPD's anchor trajectories).

A dataset column holds a completion the student did not sample (a teacher's or a reference
solution). It replaces the last member of each group, after generation and before rewards, so the
group's outcome advantage is computed over the mixed group. The trace has no behaviour logprob:
its sampler logprobs are NaN (TRL then leaves its importance ratio at 1, and opd recomputes
`lp_old` with the trainer), and the loss uses the shaped ratio `p / (p + gamma)` on its tokens.

Test: `pytest tests/unit/test_traces.py`.
"""

from __future__ import annotations

import math


def trace_rows(num_rows: int, *, group_size: int, first_global_index: int) -> list[int]:
    """Local row indices that are the last member of their group (groups are consecutive in
    TRL's global generation batch, which processes split into contiguous slices)."""
    return [
        row for row in range(num_rows) if (first_global_index + row) % group_size == group_size - 1
    ]


def inject_traces(
    generated: tuple,
    traces: list[str | None],
    rows: list[int],
    *,
    tokenizer,
    max_completion_length: int,
    conversational: bool,
) -> tuple[tuple, list[bool]]:
    """Replace `rows` of TRL's `_generate` result by the tokenized traces.

    Args:
        generated: `(prompt_ids, completion_ids, tool_mask, completions, logprobs, ...)` as
            `GRPOTrainer._generate` returns it.
        traces: the trace text of every local row (only `rows` are read); an empty or missing
            trace leaves that row on-policy.

    Returns:
        the updated tuple and a per-row flag: True where the row is now an off-policy trace.
    """
    prompt_ids, completion_ids, tool_mask, completions, logprobs, *rest = generated
    completion_ids, completions = list(completion_ids), list(completions)
    logprobs = None if logprobs is None else list(logprobs)
    offpolicy = [False] * len(completion_ids)
    for row in rows:
        text = traces[row]
        if not text:
            continue
        ids = tokenizer.encode(text, add_special_tokens=False)
        ids = [*ids[: max_completion_length - 1], tokenizer.eos_token_id]
        completion_ids[row] = ids[:max_completion_length]
        completions[row] = [{"role": "assistant", "content": text}] if conversational else text
        if logprobs is not None:
            logprobs[row] = (
                [[math.nan]] * len(completion_ids[row])
                if _nested(logprobs)
                else [math.nan] * len(completion_ids[row])
            )
        if tool_mask is not None:
            tool_mask = list(tool_mask)
            tool_mask[row] = [1] * len(completion_ids[row])
        offpolicy[row] = True
    return (prompt_ids, completion_ids, tool_mask, completions, logprobs, *rest), offpolicy


def _nested(logprobs: list) -> bool:
    """TRL's logprobs are `[row][token]` floats, or `[row][token][k]` with top-k logprobs."""
    for row in logprobs:
        if row:
            return isinstance(row[0], list)
    return False
