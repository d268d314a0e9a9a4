"""What one generation step of `OPDTrainer` learns, and what of it the loss phase reads.

TRL calls opd's hooks (`_generate`, `_calculate_rewards`) from inside its own
`_generate_and_score_completions`, without a way to pass extra values. Instead of leaving loose
attributes on the trainer, the step's values live in one `StepState`, created when a generation
step starts and handed explicitly to every function of phase 1 (scoring, advantages, selection,
metrics). Nothing in it outlives the step.

The loss phase (phase 2) sees only TRL's batch dict, which TRL shuffles and splits by rows into
micro-batches; what opd adds to it travels there as an `OPDBatchFields` (`opd/types.py`).

Test: `pytest tests/integration/test_methods.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from opd.objectives.compose import TermMasks
from opd.types import RolloutBatch, TeacherScores, TokenStats


@dataclass
class StepState:
    """One generation step, on this process.

    All `_B`/`_BT` tensors hold this process's rows (its slice of the global generation batch).
    """

    inputs: list[dict[str, Any]]
    """The dataset rows of this process's slice, as TRL passed them (one per completion)."""
    rng_state: dict[str, Any]
    """The random states before the step sampled (what a checkpoint written mid-step keeps)."""
    offpolicy_B: list[bool] = field(default_factory=list)
    """True where the row is an off-policy trace (LUFFY/StableOPD), not a student sample."""
    rewards_BF: torch.Tensor | None = None
    """This process's rows of TRL's `[B, num_reward_funcs]` rewards (NaN where not applicable)."""
    batch: RolloutBatch | None = None
    """The generated batch in opd's contract, once TRL has generated it."""
    scores: TeacherScores | None = None
    """The teacher's scores of `batch`."""
    mask_BT: torch.Tensor | None = None
    """Float completion mask (TRL's mask times its tool mask)."""
    student_old_BT: torch.Tensor | None = None
    """lp_old: the behaviour policy's logprob of each sampled token."""
    stats_BT: TokenStats | None = None
    """No-grad `[B, T]` per-token student statistics; None when the method reads none of them
    and the teacher gave no top-k (or this process has no valid token)."""

    log_weights_BT: torch.Tensor | None = None
    """VCPO: log importance weights of the current policy against the sampler (0 on-policy)."""
    completions: list[Any] | None = None
    """This process's completions as TRL gave them to the rewards (text or chat messages)."""
    rewards_GF: torch.Tensor | None = None
    """TRL's rewards of the whole global batch `[N*B, num_reward_funcs]` (MOPD's peers)."""
    prefix_ids_B: list[list[int] | None] | None = None
    """Prefix-guided rollouts: each row's guiding prefix ids (None: unguided; the list is None
    when the step guides nothing)."""
    prefix_len_B: list[int] | None = None
    """Prefix-RFT: the prefix tokens at the head of each row's completion (0: none)."""
    context_B: torch.Tensor | None = None
    """MOPD: bool [B], whether the row's teacher had a context (else no distillation term)."""
    term_masks: TermMasks | None = None
    """TRACE's per-term masks (and MOPD's rows without a context); None: one mask for all."""
    cross_span_start_BT: torch.Tensor | None = None
    """A teacher of another tokenizer: bool [B, T], the first student token of each span."""
    teacher_unmatched_BTK: torch.Tensor | None = None
    """Its top-k logprobs of the ids no student token string matches (the ULD term)."""

    def global_correct(self) -> torch.Tensor:
        """bool [N*B]: `correct_B` of every row of the global batch."""
        assert self.rewards_GF is not None, "rewards are computed before correctness is read"
        return torch.nan_to_num(self.rewards_GF[:, 0].float().cpu(), nan=0.0) >= 0.5

    def correct_B(self) -> torch.Tensor:
        """Correct = the first reward function's reward >= 0.5 (a verifier's 0/1)."""
        assert self.rewards_BF is not None, "rewards are computed before correctness is read"
        return torch.nan_to_num(self.rewards_BF[:, 0], nan=0.0) >= 0.5
