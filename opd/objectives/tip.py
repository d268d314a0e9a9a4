"""TIP token selection: the completion tokens the distillation loss sees (METHODS.md s.3).

Two normalised axes per token, both in [0, 1]:

    h_t = H_t / ln V                 student entropy H_t (nats) over a vocabulary of V tokens
    j_t = JSD(p_s, p_t) / ln 2       student-teacher Jensen-Shannon divergence (nats)

Rules, with N the number of valid (mask = 1) tokens of the whole batch and n = floor(rho * N):

    none            every valid token
    entropy_sample  n tokens sampled without replacement, P ∝ h_t^alpha * j_t^gamma
    q3              h_t < quantile(h, q_h) and j_t >= quantile(j, q_j)   ("overconfident and wrong")
    type_aware      the n highest-entropy tokens ∪ q3

All statistics are taken over the valid tokens of the batch, so a padded or masked position never
moves a threshold, and the returned mask is always a subset of the completion mask. The loss is
then computed only on kept tokens; the memory saving comes from selecting positions before the
lm_head.

Test: `pytest tests/unit/test_tip.py`.
"""

from __future__ import annotations

import math

import torch

from opd.types import TipRule


def tip_keep_mask(
    rule: TipRule,
    entropy_BT: torch.Tensor,
    divergence_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    vocab_size: int,
    keep_ratio: float = 0.5,
    alpha: float = 1.0,
    gamma: float = 0.0,
    entropy_quantile: float = 0.5,
    divergence_quantile: float = 0.8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boolean mask of the completion tokens a TIP rule keeps.

    Args:
        rule: a `TipRule` (or its string).
        entropy_BT: float [B, T] student entropy H_t in nats.
        divergence_BT: float [B, T] JSD(p_s, p_t) in nats (top-k renormalised is fine).
        mask_BT: [B, T] 1 on completion tokens, 0 elsewhere.
        vocab_size: V, so that h_t = H_t / ln V lies in [0, 1].
        keep_ratio: rho; `entropy_sample` and the entropy half of `type_aware` keep
            floor(rho * N) tokens, at least 1 when N > 0.
        alpha: exponent of h_t in the `entropy_sample` weight.
        gamma: exponent of j_t in the `entropy_sample` weight (0: entropy only; 0^0 = 1).
        entropy_quantile: q_h, the `q3` entropy threshold is this quantile of the valid h_t.
        divergence_quantile: q_j, the `q3` divergence threshold is this quantile of the valid j_t.
        generator: RNG of the `entropy_sample` draw (None: torch's global RNG).

    Returns:
        bool [B, T], True on kept tokens; always False where `mask_BT` is 0.

    Raises:
        ValueError: unknown rule, or a ratio, exponent or quantile out of range.
    """
    _check_arguments(rule, keep_ratio, alpha, gamma, entropy_quantile, divergence_quantile)
    assert entropy_BT.shape == divergence_BT.shape == mask_BT.shape, "TIP inputs differ in shape"
    valid_BT = mask_BT.bool()
    if rule == TipRule.NONE:
        return valid_BT.clone()
    keep_BT = torch.zeros(valid_BT.shape, dtype=torch.bool, device=valid_BT.device)
    valid_index_N = valid_BT.flatten().nonzero().squeeze(-1)
    n_valid = valid_index_N.numel()
    if n_valid == 0:
        return keep_BT
    h_BT, j_BT = tip_axes(entropy_BT, divergence_BT, vocab_size=vocab_size)
    h_N = h_BT.flatten()[valid_index_N]
    j_N = j_BT.flatten()[valid_index_N]
    n_keep = _keep_count(keep_ratio, n_valid)
    if rule == TipRule.ENTROPY_SAMPLE:
        keep_N = _sample_by_weight(h_N.pow(alpha) * j_N.pow(gamma), n_keep, generator)
    elif rule == TipRule.Q3:
        keep_N = _q3(h_N, j_N, entropy_quantile, divergence_quantile)
    else:  # type_aware
        keep_N = _q3(h_N, j_N, entropy_quantile, divergence_quantile)
        keep_N[torch.topk(h_N, n_keep).indices] = True
    keep_BT.view(-1)[valid_index_N] = keep_N
    return keep_BT


def tip_axes(
    entropy_BT: torch.Tensor, divergence_BT: torch.Tensor, *, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two TIP axes, `h = H / ln V` and `j = JSD / ln 2`, float32, detached, clamped to [0, 1].

    ln V and ln 2 are the maxima of the entropy and of the JSD, so both axes are comparable
    across models and vocabularies; the clamp absorbs round-off (a JSD of -1e-7, a top-k entropy
    estimate a hair above ln V).
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2 (ln V > 0), got {vocab_size}")
    h_BT = (entropy_BT.detach().float() / math.log(vocab_size)).clamp(0.0, 1.0)
    j_BT = (divergence_BT.detach().float() / math.log(2.0)).clamp(0.0, 1.0)
    return h_BT, j_BT


def kept_fraction(keep_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    """Kept tokens over valid tokens (0.0 when there are no valid tokens); a metric to log."""
    valid_BT = mask_BT.bool()
    n_valid = int(valid_BT.sum())
    return float((keep_BT.bool() & valid_BT).sum()) / n_valid if n_valid else 0.0


def batch_quantile(values_N: torch.Tensor, q: float) -> torch.Tensor:
    """`torch.quantile(values_N, q)` (linear interpolation) without its 2^24-element limit.

    A batch of long completions easily holds more than 16.7M valid tokens, where torch.quantile
    raises; a sort and the same interpolation, `v[lo] + (pos - lo) * (v[hi] - v[lo])` with
    `pos = q * (N - 1)`, has no such limit.
    """
    sorted_N = values_N.float().sort().values
    position = q * (sorted_N.numel() - 1)
    lo, hi = math.floor(position), math.ceil(position)
    return sorted_N[lo] + (position - lo) * (sorted_N[hi] - sorted_N[lo])


# Values this close to a Q3 threshold (relative) count as equal to it. Tokens that tie exactly
# in one process (e.g. the same position of a group's copies, computed in one batch) differ by an
# ulp or two when other batch shapes compute them (2 processes x 2 rows: 0.34397417 and
# 0.34397420 where 1 x 4 rows gave 0.34397420 four times), and a strict threshold at a tied value
# would then keep a different set of tokens in each layout.
_THRESHOLD_TOLERANCE = 1e-6


def _q3(h_N: torch.Tensor, j_N: torch.Tensor, q_h: float, q_j: float) -> torch.Tensor:
    """Low entropy (strictly below its q_h quantile) and high divergence (at or above its q_j),
    with values within float noise of a threshold treated as equal to it."""
    h_threshold, j_threshold = batch_quantile(h_N, q_h), batch_quantile(j_N, q_j)
    h_margin = _THRESHOLD_TOLERANCE * h_threshold.abs().clamp_min(1e-6)
    j_margin = _THRESHOLD_TOLERANCE * j_threshold.abs().clamp_min(1e-6)
    return (h_N < h_threshold - h_margin) & (j_N >= j_threshold - j_margin)


def _sample_by_weight(
    weight_N: torch.Tensor, n_keep: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Bool [N]: `n_keep` indices drawn without replacement with P ∝ weight.

    torch.multinomial without replacement fails when fewer than `n_keep` weights are positive.
    Then every positive-weight token is kept and the remainder is drawn uniformly among the
    zero-weight ones: "fill with the rest". Adding an epsilon to all weights instead would let a
    zero-entropy token be drawn, with tiny probability, even when enough positive ones exist.
    """
    keep_N = torch.zeros_like(weight_N, dtype=torch.bool)
    positive_N = weight_N > 0
    n_positive = int(positive_N.sum())
    if n_positive >= n_keep:
        keep_N[torch.multinomial(weight_N, n_keep, generator=generator)] = True
        return keep_N
    keep_N[positive_N] = True
    zero_index_M = (~positive_N).nonzero().squeeze(-1)
    uniform_M = torch.ones(zero_index_M.numel(), device=weight_N.device)
    fill_M = torch.multinomial(uniform_M, n_keep - n_positive, generator=generator)
    keep_N[zero_index_M[fill_M]] = True
    return keep_N


def _keep_count(keep_ratio: float, n_valid: int) -> int:
    """floor(rho * N), at least 1; the 1e-9 stops float products like 0.29 * 100 = 28.999...96."""
    return min(n_valid, max(1, math.floor(keep_ratio * n_valid + 1e-9)))


def _check_arguments(
    rule: TipRule, keep_ratio: float, alpha: float, gamma: float, q_h: float, q_j: float
) -> None:
    if rule not in list(TipRule):
        raise ValueError(f"unknown TIP rule {rule!r}; allowed rules: {', '.join(TipRule)}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if alpha < 0.0 or gamma < 0.0:
        raise ValueError(f"alpha and gamma must be >= 0 (h^alpha * j^gamma), got {alpha}, {gamma}")
    if not (0.0 <= q_h <= 1.0 and 0.0 <= q_j <= 1.0):
        raise ValueError(f"quantiles must be in [0, 1], got {q_h}, {q_j}")
