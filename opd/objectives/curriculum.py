"""TCOD, temporal curriculum OPD: apply the OPD term to the first D(step) steps (turns) or tokens
of each trajectory, with D growing over training (METHODS.md s.10).

Source: Wang et al. 2026, "TCOD: Exploring Temporal Curriculum in On-Policy Distillation for
Multi-turn Autonomous Agents", arXiv:2604.24005; the schedule as its author states it in the
verl RFC (verl-project/verl#6552) and the vime RFC (vllm-project/vime#231):

    k(n) = min(k_start + floor(n / eta), k_max)           n = training step

Here the same staircase is parametrised by where it ends instead of its step width:

    D(s) = start + floor((end - start) * min(s, ramp_steps) / ramp_steps)    (ramp_steps > 0)
    D(s) = end                                                               (ramp_steps = 0)

which equals the paper's k(n) with k_start = start, k_max = end and eta = ramp_steps /
(end - start) whenever that is a whole number. The papers' numeric defaults for k_start and eta
could not be found; the dataclass has no defaults and recipes must state theirs.

The mask: TCOD-f2b has the student roll out only its first k turns. On the loss side that is the
OPD term restricted to the first D steps, which this module computes; the rollout may still stop
early to save generation. With per-token OPD advantages that look only at the prefix (vanilla OPD,
gamma = 0) masking the tail gives the same gradient as truncating it. Steps are delimited as in
SOD (`weightings.sod_step_weights`): a step ends, inclusively, at a valid token whose
`step_end_BT` is True, the last step ends at the last valid token, and step ends on masked tokens
are ignored. For single-turn data the unit is tokens: the first D valid tokens of each row.
TCOD-b2f (a teacher trajectory replays the first L - k turns with loss mask 0 and the student
plays the last k) needs no loss-side mask beyond the completion mask; it is a rollout feature and
not implemented here.

Test: `pytest tests/unit/test_curriculum.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DEPTH_UNITS = ("tokens", "steps")


@dataclass(frozen=True)
class DepthSchedule:
    """Trajectory depth exposed to the OPD term, growing from `start` to `end` over
    `ramp_steps` optimizer steps."""

    start: int
    """Depth at step 0 (k_start; >= 0)."""
    end: int
    """Depth from `ramp_steps` on (k_max; >= start)."""
    ramp_steps: int
    """Optimizer steps of the staircase from start to end (>= 0; 0 means `end` at once)."""
    unit: str = "steps"
    """"steps" (turns, delimited by step ends; the paper's unit) or "tokens" (single-turn)."""

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(
                f"TCOD depth needs 0 <= start <= end: got start={self.start}, end={self.end}"
            )
        if self.ramp_steps < 0:
            raise ValueError(f"TCOD ramp_steps must be >= 0, got {self.ramp_steps}")
        if self.unit not in _DEPTH_UNITS:
            raise ValueError(f"TCOD unit must be one of {_DEPTH_UNITS}, got {self.unit!r}")


def curriculum_depth(step: int, schedule: DepthSchedule) -> int:
    """D(step): the staircase from `start` to `end` over `ramp_steps`, then `end`.

    Args:
        step: optimizer steps taken so far, counted from 0.
        schedule: the depth schedule.

    Returns:
        The depth, an int in [start, end].
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if schedule.ramp_steps == 0 or step >= schedule.ramp_steps:
        return schedule.end
    # Integer arithmetic: floor((end - start) * s / ramp) without float rounding at the treads.
    return schedule.start + (schedule.end - schedule.start) * step // schedule.ramp_steps


def depth_mask_BT(
    mask_BT: torch.Tensor, depth: int, *, step_end_BT: torch.Tensor | None = None
) -> torch.Tensor:
    """Float [B, T] mask of the first `depth` valid tokens, or the first `depth` steps, per row.

    Args:
        mask_BT: [B, T] 1 on completion tokens, 0 on prompt, padding and environment tokens.
        depth: D >= 0. Units are tokens when `step_end_BT` is None, steps otherwise.
        step_end_BT: bool [B, T] True on the last token of a step (SOD's convention).

    Returns:
        float32 [B, T]: 1 inside the first D tokens/steps of the row's valid tokens, 0 elsewhere
        and wherever `mask_BT` is 0.
    """
    if depth < 0:
        raise ValueError(f"TCOD depth must be >= 0, got {depth}")
    valid_BT = mask_BT.bool()
    if step_end_BT is None:
        # 1-based rank of each valid token in its row; masked tokens repeat the previous rank
        # but are dropped by `valid_BT` below.
        rank_BT = valid_BT.long().cumsum(-1)
        return (valid_BT & (rank_BT <= depth)).float()
    assert step_end_BT.shape == mask_BT.shape, "step_end_BT must match mask_BT"
    end_BT = (step_end_BT.bool() & valid_BT).long()
    # Exclusive count of ends: a step's end token still belongs to that step (0-based index).
    step_BT = end_BT.cumsum(-1) - end_BT
    return (valid_BT & (step_BT < depth)).float()
