"""Multi-rollout MOPD: each rollout's teacher context from the other rollouts of its group.

Source: Yu et al. 2026, "Multi-Rollout On-Policy Distillation via Peer Successes and Failures",
arXiv:2605.12652 (METHODS.md s.11). After rewards, the teacher scores rollout i of a group after
a context built from its *peers* (the group's other rollouts, never i itself): verified successes
as positive patterns, and in the contrastive form failures as negative examples, each under a
label. The text goes into `teacher_context_template`'s {context}, exactly where OPSD puts the
reference solution (`opd/teacher/context.py`), so the teacher's prompt is rendered the same way.

A row whose peers hold no success falls back to the row's reference solution, unchanged, when
the dataset has one (then the teacher prompt is OPSD's, bit for bit), else gets no context (None):
the caller drops its OPD term. Peers are taken in group order, successes first, at most
`max_successes` and `max_failures` of each.

Test: `pytest tests/unit/test_peer_context.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from opd.types import PeerContext


@dataclass(frozen=True)
class PeerContextSettings:
    """How a peer context is built (`mopd_*` fields of `OPDConfig`)."""

    peers: PeerContext
    """'successes' or 'contrastive' (successes and failures)."""
    max_successes: int = 2
    max_failures: int = 1
    success_label: str = "Correct solution:"
    """The line before each peer success; `{n}` is replaced by its 1-based number."""
    failure_label: str = "A known failed solution (avoid repeating this mistake):"
    """The line before each peer failure; `{n}` as above."""

    def __post_init__(self) -> None:
        if self.peers == PeerContext.NONE:
            raise ValueError("PeerContextSettings needs peers 'successes' or 'contrastive'")
        if self.max_successes < 0 or self.max_failures < 0:
            raise ValueError("max_successes and max_failures must be >= 0")


def peer_contexts(
    completions_G: list[str],
    correct_G: list[bool],
    *,
    group_size: int,
    settings: PeerContextSettings,
    references_G: list[str | None] | None = None,
) -> list[str | None]:
    """The teacher context of every row of a generation batch (groups are consecutive).

    Args:
        completions_G: the completion text of every row of the global batch.
        correct_G: whether each row was verified correct.
        group_size: rollouts per prompt (`num_generations`).
        settings: which peers, how many, how labelled.
        references_G: each row's reference solution (the fallback), or None.

    Returns:
        One context per row: the labelled peers joined by blank lines; the reference solution
        when the row's peers hold no success; None when there is neither.
    """
    num_rows = len(completions_G)
    if len(correct_G) != num_rows or num_rows % group_size:
        raise ValueError(
            f"{num_rows} completions, {len(correct_G)} verdicts: need equal counts, a multiple "
            f"of group_size={group_size}"
        )
    if references_G is not None and len(references_G) != num_rows:
        raise ValueError(f"{len(references_G)} references for {num_rows} rows")
    contexts: list[str | None] = []
    for row in range(num_rows):
        start = row - row % group_size
        peers = [peer for peer in range(start, start + group_size) if peer != row]
        successes = [peer for peer in peers if correct_G[peer]][: settings.max_successes]
        if not successes:
            reference = None if references_G is None else references_G[row]
            contexts.append(reference or None)
            continue
        blocks = [
            _block(settings.success_label, n, completions_G[peer])
            for n, peer in enumerate(successes, start=1)
        ]
        if settings.peers == PeerContext.CONTRASTIVE:
            failures = [peer for peer in peers if not correct_G[peer]][: settings.max_failures]
            blocks += [
                _block(settings.failure_label, n, completions_G[peer])
                for n, peer in enumerate(failures, start=1)
            ]
        contexts.append("\n\n".join(blocks))
    return contexts


def groups_with_success(correct_G: list[bool], *, group_size: int) -> float:
    """The fraction of groups with at least one verified success (logged by MOPD and POPE)."""
    groups = [correct_G[i : i + group_size] for i in range(0, len(correct_G), group_size)]
    return sum(any(group) for group in groups) / max(len(groups), 1)


def _block(label: str, number: int, text: str) -> str:
    return f"{label.replace('{n}', str(number))}\n{text.strip()}"
