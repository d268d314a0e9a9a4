"""Imitation of expert traces as an auxiliary term of on-policy RL/OPD: CHORD and DYPO (METHODS.md
s.10, "Imitation and guidance").

Pure torch and arithmetic; the trainer owns the expert stream and the reduction over tokens.

CHORD (Zhang et al. 2025, arXiv:2508.11408; code: modelscope/Trinity-RFT `examples/mix_chord`,
`trinity/algorithm/policy_loss_fn/chord_policy_loss.py`):

    L_CHORD = (1 - mu) * L_GRPO + mu * L_SFT    L_GRPO on the on-policy batch (here any RL/OPD
                                                loss), L_SFT on a separate expert batch
    L_SFT   = token-mean over expert tokens of -w_t * log pi(y*_t)
    w_t     = 1                                 CHORD-mu
    w_t     = sg(p_t (1 - p_t)),  p_t = pi(y*_t | x, y*_<t)       CHORD-phi
    mu(s)   = peak * s / warmup                 s < warmup (linear warm-up from 0)
            = valley + (peak - valley) * (1 + cos(pi * (s - warmup) / decay)) / 2
                                                warmup <= s < warmup + decay (cosine decay)
            = valley                            s >= warmup + decay

  The phi weight is a stop-gradient coefficient, as the paper states (ms-swift fixed its CHORD-phi
  to detach it, PR #6952).
  Defaults (the CHORD-mu setting in the comments of Trinity-RFT's `mix_chord.yaml`): peak 0.9,
  valley 0.05, warmup 0, decay 200 steps. CHORD-phi there uses a constant mu = 0.1:
  `ImitationSchedule(peak=0.1, valley=0.1, warmup_steps=0, decay_steps=0)` with kind="phi".
  With warmup 0, mu(0) = peak.

DYPO (Zhu et al. 2026, "Bridging SFT and RL: Dynamic Policy Optimization for Robust Reasoning",
arXiv:2604.08926; code: Tocci-Zhu/DYPO, README "Method Overview"):
each prompt's group of G rollouts is routed by its number of successes n:

    n = 0          hard     -> SFT on the expert trace (the group's RL rows are dropped)
    0 < n < G      partial  -> RL (GRPO; DYPO adds its Group Alignment Loss, not implemented here)
    n = G          easy     -> filtered out

  The hard-sample rule (0 / G successes) is "all_fail", the default here. Rule "any_fail"
  (imitate unless every rollout succeeded) is a looser gate offered for OPD, where a partly failed
  group still has a dense teacher signal worth keeping beside the trace; it is not from the paper.
  The SFT term of hard samples is weighted by `sft_loss_coef` = 1.0 (README, "Core
  Hyperparameters"). Under GRPO with 0/1 rewards both all-fail and all-pass groups have zero
  advantage, so "drop RL on gated rows" and "filter easy groups" change only the normaliser; under
  OPD the caller must drop the OPD term on gated rows itself to match the paper.

Test: `pytest tests/unit/test_imitation.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImitationSchedule:
    """CHORD's global coefficient mu over optimizer steps: linear warm-up from 0 to `peak`, cosine
    decay from `peak` to `valley`, then constant `valley`."""

    peak: float = 0.9
    """mu at the end of the warm-up (CHORD-mu: 0.9)."""
    valley: float = 0.05
    """mu after the decay (CHORD-mu: 0.05)."""
    warmup_steps: int = 0
    """Steps of the linear ramp 0 -> peak (CHORD-mu: 0)."""
    decay_steps: int = 200
    """Steps of the cosine decay peak -> valley (CHORD-mu: 200)."""

    def __post_init__(self) -> None:
        if not (0.0 <= self.valley <= 1.0 and 0.0 <= self.peak <= 1.0):
            raise ValueError(
                f"CHORD mu must stay in [0, 1]: got peak={self.peak}, valley={self.valley}"
            )
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError(
                f"CHORD warmup_steps and decay_steps must be >= 0: got {self.warmup_steps}, "
                f"{self.decay_steps}"
            )


def imitation_coefficient(step: int, schedule: ImitationSchedule) -> float:
    """mu(step), the weight of the imitation term in `(1 - mu) * L_rl + mu * L_sft`.

    Args:
        step: optimizer steps taken so far, counted from 0.
        schedule: the warm-up / cosine-decay shape.

    Returns:
        mu in [0, 1].
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < schedule.warmup_steps:
        return schedule.peak * step / schedule.warmup_steps
    decayed = step - schedule.warmup_steps
    if decayed >= schedule.decay_steps:
        return schedule.valley
    cosine = 0.5 * (1.0 + math.cos(math.pi * decayed / schedule.decay_steps))
    return schedule.valley + (schedule.peak - schedule.valley) * cosine


def expert_token_weight_N(logprobs_N: torch.Tensor, *, kind: str) -> torch.Tensor:
    """Per-token weight w_t of the imitation term on expert tokens (detached).

    kind "none" (CHORD-mu, plain SFT): w = 1. kind "phi" (CHORD-phi): w = sg(p (1 - p)) with
    p = exp(logprob), the student's probability of the expert token. It peaks at p = 0.5 (w = 1/4)
    and vanishes for tokens the student already knows (p -> 1) and for tokens far from its
    distribution (p -> 0), which would otherwise pull the policy hardest.

    Args:
        logprobs_N: float [N] student logprob of each expert token.
        kind: "none" or "phi".

    Returns:
        float32 [N] detached weights.
    """
    logprobs_N = logprobs_N.detach().float()
    if kind == "none":
        return torch.ones_like(logprobs_N)
    if kind == "phi":
        p_N = logprobs_N.exp()
        return p_N * (1.0 - p_N)
    raise ValueError(f"expert token weight kind must be 'none' or 'phi', got {kind!r}")


def imitation_loss_N(logprobs_N: torch.Tensor, weight_N: torch.Tensor) -> torch.Tensor:
    """Per-token weighted NLL `-w_t * log pi(y*_t)` on expert tokens.

    The weight is detached here as well, so the gradient with respect to each logprob is exactly
    `-w_t` whatever the caller passes. Reduce with a token mean over the expert batch (CHORD's
    `use_token_level_loss: true`).

    Args:
        logprobs_N: float [N] student logprob of each expert token (with grad).
        weight_N: float [N] weights, e.g. from `expert_token_weight_N`.

    Returns:
        [N] per-token loss, differentiable with respect to `logprobs_N`.
    """
    assert logprobs_N.shape == weight_N.shape, "logprobs_N and weight_N must match"
    return -weight_N.detach().to(logprobs_N.dtype) * logprobs_N


def dypo_gate_B(
    correct_B: torch.Tensor, *, group_size: int, rule: str = "all_fail"
) -> torch.Tensor:
    """DYPO's per-prompt gate: which rows' prompts get the imitation (SFT) term.

    Rows [g*G, (g+1)*G) are the G rollouts of prompt g. With n_g the number of correct rollouts:
    rule "all_fail" (DYPO's hard samples, the default) gates groups with n_g = 0; rule "any_fail"
    (not from the paper) gates groups with n_g < G.

    Args:
        correct_B: bool [B] (or 0/1) whether each rollout succeeded.
        group_size: G; B must be a multiple of it.
        rule: "all_fail" or "any_fail".

    Returns:
        bool [B], the same value on every row of a group.
    """
    batch_size = correct_B.shape[0]
    assert correct_B.dim() == 1, "correct_B must be [B]"
    if group_size < 1 or batch_size % group_size != 0:
        raise ValueError(
            f"batch size {batch_size} is not a multiple of group_size {group_size}: rows "
            "[g*G, (g+1)*G) must be the G rollouts of prompt g (set group_size to "
            "num_generations)"
        )
    successes_G = correct_B.bool().view(-1, group_size).sum(-1)
    if rule == "all_fail":
        gate_G = successes_G == 0
    elif rule == "any_fail":
        gate_G = successes_G < group_size
    else:
        raise ValueError(f"DYPO gate rule must be 'all_fail' or 'any_fail', got {rule!r}")
    return gate_G.repeat_interleave(group_size)
