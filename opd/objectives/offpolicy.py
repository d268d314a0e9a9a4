"""Off-policy importance-ratio forms of METHODS.md s.10 on `[B, T]` rows, and IS statistics.

Token-level versions: `A_t` is the per-token advantage of opd's composer, `rho_t = exp(lp_s[t] -
lp_old[t])`, and "positive" means `correct_B` (DISPO, BAPO) when given, else `A_t > 0`. Each form
yields a per-token loss, the detached weight `w_t` its gradient carries (`grad loss_t = -w_t A_t
grad lp_s[t]`, `w_t = 1` on-policy) and the tokens it clipped, truncated or gated away.

    TOPR   w = 1 if A >= 0 else clip(rho, a, b)                    loss = -sg(w) A lp_s
    DISPO  w = clip(rho, 1 - e_low, 1 + e_high), e by correctness  loss = -sg(w) A lp_s
    MINPRO w = min_{u<=t} rho_u                                    loss = -sg(w / rho) rho A
    CTPO   R = prod_{u<=t} rho_u, clipped in log space at +-c t^p  loss = -R~ A (PPO dual-clip)
    SAPO   f(rho) = (4 / tau) sigmoid(tau (rho - 1)), w = f'(rho) rho          loss = -f(rho) A
    BAPO   PPO clip [c_low, c_high], bounds raised per batch until positive share >= rho_0

At `lp_s == lp_old` every gradient is plain's `-A grad lp_s`. The values are plain's `-A` for
MINPRO, CTPO and BAPO; TOPR and DISPO are REINFORCE-style (value `-A lp_s`); SAPO's is `-2A/tau`.

Sources and defaults (RatioSettings):
- TOPR, Le Roux et al. 2025, arXiv:2503.14286 eq. 8: positive examples without IS, negative ones
  with the ratio truncated to [0, 1] (`topr_neg_low`, `topr_neg_high`); the paper's ratio is the
  sequence's, this is the token-level version.
- DISPO, Karaman et al. 2026, arXiv:2602.00983 (AISTATS 2026): the paper text was not reachable
  here. Form and values (e+_low 0.2, e+_high 10, e-_low 1, e-_high 100, "Table 1") come from a
  public secondary summary of the paper; they agree with its abstract (loose clips for incorrect
  responses). Check them against the paper before a reproduction run.
- MINPRO, Lei et al. 2026, arXiv:2601.22718 ("A Step Back"): its equation was not reachable; the
  abstract's "minimum token-level ratio observed in the preceding prefix" is read as the running
  minimum up to and including t, applied as the token's weight with no further clip (no knobs).
- CTPO, Zhang et al. 2026, arXiv:2605.07331, as its code (github horizon-llm/CTPO,
  `_compute_policy_loss_cum_token_la_impl`, `ctpo.sh`): log R_t = sg(sum_{u<=t} clamp(log rho_u,
  +-20)) + lp_s - sg(lp_s), capped at 10; t counts kept tokens from 1; ratio window
  [exp(-c_low t^p), exp(c_high t^p)], dual clip exp(c_dual t^p) for A < 0; c_low 0.025,
  c_high 0.05, c_dual 0.05, p 0.5.
- SAPO, Gao et al. 2025 (Qwen), arXiv:2511.20347: tau_pos 1.0 (A > 0), tau_neg 1.05 (A <= 0),
  the paper's recommendation as ms-swift's SAPO page and Trinity-RFT's defaults give it. SAPO
  never clips; `clipped_BT` marks tokens whose gate keeps under half the IS weight (4 s (1-s) < .5).
- BAPO, Xi et al. 2025, arXiv:2510.18927 eq. 8, Algorithm 1 and s.5.1: starting at (a-, a+), raise
  c_high by d1 up to b+, then c_low by d2 up to b-, until the positive tokens carry a share
  rho_0 of |sum_t min(rho A, clip(rho, c_low, c_high) A)|. rho_0 0.4, [a-, b-] = [0.6, 0.9],
  [a+, b+] = [1.2, 3.0], d1 0.05, d2 0.02 (s.5.1; the authors' README says rho_0 0.5). The share
  is over the batch given; raising c_low adds negative mass, so the search moves c_high first.

Masked tokens (mask 0) get loss 0, weight 0 and are never clipped; their log-ratio is 0 in prefix
sums and +inf in prefix minima, so neither their values nor their presence move later tokens.

Test: `pytest tests/unit/test_offpolicy_ratios.py tests/unit/test_ctpo_unbiased.py`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from opd.types import Ratio

# CTPO's numeric guards (horizon-llm/CTPO core_algos.py): per-token log-ratio, cumulative log-ratio.
CTPO_TOKEN_LOG_RATIO_MAX = 20.0
CTPO_LOG_RATIO_MAX = 10.0
# SAPO has no hard clip: a token counts as gated once the gate keeps less than half its IS weight.
SAPO_GATED_BELOW = 0.5


CLIP_TOLERANCE = 1e-6
"""Relative distance from its bound below which a ratio is not counted as clipped (TOPR)."""


@dataclass(frozen=True)
class RatioSettings:
    """Every form's knobs with the papers' defaults (sources in the module docstring)."""

    topr_neg_low: float = 0.0
    """TOPR: lower truncation of a negative token's ratio (eq. 8: 0)."""
    topr_neg_high: float = 1.0
    """TOPR: upper truncation of a negative token's ratio (eq. 8: 1)."""
    dispo_pos_low: float = 0.2
    """DISPO: weight floor 1 - e for correct responses (secondary summary of Table 1: 0.2)."""
    dispo_pos_high: float = 10.0
    """DISPO: weight cap 1 + e for correct responses (10)."""
    dispo_neg_low: float = 1.0
    """DISPO: weight floor 1 - e for incorrect responses (1: no floor)."""
    dispo_neg_high: float = 100.0
    """DISPO: weight cap 1 + e for incorrect responses (100)."""
    ctpo_log_clip_low: float = 0.025
    """CTPO: log-space lower clip base, times t^p (ctpo.sh LA_CLIP_LOW)."""
    ctpo_log_clip_high: float = 0.05
    """CTPO: log-space upper clip base, times t^p (ctpo.sh LA_CLIP_HIGH)."""
    ctpo_log_clip_dual: float = 0.05
    """CTPO: log-space dual-clip base for A < 0, times t^p (ctpo.sh LA_CLIP_C)."""
    ctpo_position_power: float = 0.5
    """CTPO: p in t^p; 0.5 follows the sqrt(t) growth of the cumulative log-ratio's spread."""
    sapo_tau_pos: float = 1.0
    """SAPO: gate temperature for A > 0."""
    sapo_tau_neg: float = 1.05
    """SAPO: gate temperature for A <= 0 (> tau_pos: negative gradients decay faster)."""
    bapo_target: float = 0.4
    """BAPO: rho_0, the positive tokens' target share of the loss (s.5.1)."""
    bapo_low_start: float = 0.6
    """BAPO: a-, the starting lower ratio bound."""
    bapo_low_max: float = 0.9
    """BAPO: b-, the highest lower bound."""
    bapo_low_step: float = 0.02
    """BAPO: d2, the lower bound's step."""
    bapo_high_start: float = 1.2
    """BAPO: a+, the starting upper ratio bound."""
    bapo_high_max: float = 3.0
    """BAPO: b+, the highest upper bound."""
    bapo_high_step: float = 0.05
    """BAPO: d1, the upper bound's step."""

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{item.name}={value!r}: a number is needed (RatioSettings)")
            if not math.isfinite(value):
                raise ValueError(f"{item.name}={value!r}: must be finite (RatioSettings)")
        for name, ok, rule in _RULES:
            if not ok(self):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be {rule} (RatioSettings)")

    @classmethod
    def from_mapping(cls, mapping: dict | None) -> RatioSettings:
        """Settings from a config mapping; unknown keys, non-numbers and bad ranges raise."""
        mapping = dict(mapping or {})
        valid = [item.name for item in dataclasses.fields(cls)]
        unknown = sorted(set(mapping) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown ratio setting(s) {', '.join(map(repr, unknown))}; valid keys: "
                f"{', '.join(valid)}"
            )
        for key, value in mapping.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key}={value!r}: a number is needed (RatioSettings)")
        return cls(**{key: float(value) for key, value in mapping.items()})


# (field, check, rule). Every window must hold rho = 1, so each form reduces to plain on-policy.
_RULES = [
    ("topr_neg_low", lambda s: 0.0 <= s.topr_neg_low <= 1.0, "in [0, 1]"),
    ("topr_neg_high", lambda s: s.topr_neg_high >= 1.0, ">= 1"),
    ("dispo_pos_low", lambda s: 0.0 <= s.dispo_pos_low <= 1.0, "in [0, 1]"),
    ("dispo_pos_high", lambda s: s.dispo_pos_high >= 0.0, ">= 0"),
    ("dispo_neg_low", lambda s: 0.0 <= s.dispo_neg_low <= 1.0, "in [0, 1]"),
    ("dispo_neg_high", lambda s: s.dispo_neg_high >= 0.0, ">= 0"),
    ("ctpo_log_clip_low", lambda s: s.ctpo_log_clip_low > 0.0, "> 0"),
    ("ctpo_log_clip_high", lambda s: s.ctpo_log_clip_high > 0.0, "> 0"),
    ("ctpo_log_clip_dual", lambda s: s.ctpo_log_clip_dual > 0.0, "> 0"),
    ("sapo_tau_pos", lambda s: s.sapo_tau_pos > 0.0, "> 0"),
    ("sapo_tau_neg", lambda s: s.sapo_tau_neg > 0.0, "> 0"),
    ("bapo_target", lambda s: 0.0 <= s.bapo_target <= 1.0, "in [0, 1]"),
    ("bapo_low_start", lambda s: 0.0 < s.bapo_low_start <= s.bapo_low_max, "in (0, bapo_low_max]"),
    ("bapo_low_max", lambda s: s.bapo_low_max <= 1.0, "<= 1"),
    ("bapo_low_step", lambda s: s.bapo_low_step > 0.0, "> 0"),
    ("bapo_high_start", lambda s: 1.0 <= s.bapo_high_start <= s.bapo_high_max,
     "in [1, bapo_high_max]"),
    ("bapo_high_step", lambda s: s.bapo_high_step > 0.0, "> 0"),
]  # fmt: skip


@dataclass
class RatioTerms:
    """One form's per-token output; every tensor is `[B, T]`."""

    loss_BT: torch.Tensor
    """Per-token surrogate, 0 where the mask is 0, differentiable through the logprobs only."""
    weight_BT: torch.Tensor
    """Detached weight each token's gradient `-A grad lp_s` is multiplied by (1 on-policy)."""
    clipped_BT: torch.Tensor
    """bool: tokens whose weight was clipped, truncated or gated away."""


def offpolicy_surrogate_BT(
    logprobs_BT: torch.Tensor,
    behaviour_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    correct_B: torch.Tensor | None,
    *,
    ratio: Ratio,
    settings: RatioSettings,
    bapo_bounds: tuple[float, float] | None = None,
) -> RatioTerms:
    """The off-policy form `ratio` on rows of tokens (formulas in the module docstring).

    Args:
        logprobs_BT: float [B, T], lp_s (carries the gradient).
        behaviour_logprobs_BT: float [B, T], lp_old (detached here).
        advantages_BT: float [B, T], A_t (detached here).
        mask_BT: [B, T], 1 on kept tokens.
        correct_B: bool [B] or None: DISPO's and BAPO's split (None: the sign of A_t).
        bapo_bounds: BAPO's (c_low, c_high) chosen elsewhere (the trainer picks them once per
            generation batch, over all processes); None: `bapo_clip_bounds` of these rows.
    """
    assert logprobs_BT.dim() == 2, logprobs_BT.shape
    for other in (behaviour_logprobs_BT, advantages_BT, mask_BT):
        assert other.shape == logprobs_BT.shape, (other.shape, logprobs_BT.shape)
    keep_BT = mask_BT.bool()
    zeros_BT = torch.zeros_like(logprobs_BT)
    # where (not a product) keeps -inf / nan logprobs of padding out of values and gradients
    lp_BT = torch.where(keep_BT, logprobs_BT, zeros_BT)
    log_ratio_BT = torch.where(keep_BT, lp_BT.detach() - behaviour_logprobs_BT.detach(), zeros_BT)
    adv_BT = torch.where(keep_BT, advantages_BT.detach(), zeros_BT)
    if correct_B is None:
        positive_BT = adv_BT > 0
    else:
        assert correct_B.shape == logprobs_BT.shape[:1], (correct_B.shape, logprobs_BT.shape)
        positive_BT = correct_B.bool()[:, None].expand_as(keep_BT)
    if ratio == Ratio.TOPR:
        loss, weight, clipped = _topr(lp_BT, log_ratio_BT, adv_BT, settings)
    elif ratio == Ratio.DISPO:
        loss, weight, clipped = _dispo(lp_BT, log_ratio_BT, adv_BT, positive_BT, settings)
    elif ratio == Ratio.MINPRO:
        loss, weight, clipped = _minpro(lp_BT, log_ratio_BT, adv_BT, keep_BT)
    elif ratio == Ratio.CTPO:
        loss, weight, clipped = _ctpo(lp_BT, log_ratio_BT, adv_BT, keep_BT, settings)
    elif ratio == Ratio.SAPO:
        loss, weight, clipped = _sapo(lp_BT, log_ratio_BT, adv_BT, settings)
    elif ratio == Ratio.BAPO:
        low, high = bapo_bounds or bapo_clip_bounds(
            log_ratio_BT, adv_BT, keep_BT, positive_BT, settings
        )
        loss, weight, clipped = _ppo_window(lp_BT, log_ratio_BT, adv_BT, low, high)
    else:
        raise ValueError(
            f"ratio={ratio!r} is not an off-policy form (topr, dispo, minpro, ctpo, sapo, bapo); "
            "plain/ppo/cispo are computed by objectives/surrogate.py policy_loss_N"
        )
    return RatioTerms(
        loss_BT=torch.where(keep_BT, loss, zeros_BT),
        weight_BT=torch.where(keep_BT, weight.detach(), zeros_BT.detach()),
        clipped_BT=clipped & keep_BT,
    )


def _reweighted(weight_BT, lp_BT):
    """A ratio with value `weight` and gradient `weight * grad lp_s` (CTPO's sg decomposition)."""
    return weight_BT.detach() * torch.exp(lp_BT - lp_BT.detach())


def _topr(lp_BT, log_ratio_BT, adv_BT, settings):
    rho_BT = torch.exp(log_ratio_BT)
    negative_BT = adv_BT < 0
    truncated_BT = rho_BT.clamp(settings.topr_neg_low, settings.topr_neg_high)
    weight_BT = torch.where(negative_BT, truncated_BT, torch.ones_like(rho_BT))
    # counted as clipped beyond float noise: an on-policy ratio is 1 within ~1e-6, not exactly
    clipped_BT = negative_BT & ((rho_BT - truncated_BT).abs() > CLIP_TOLERANCE * rho_BT)
    return -weight_BT * adv_BT * lp_BT, weight_BT, clipped_BT


def _dispo(lp_BT, log_ratio_BT, adv_BT, positive_BT, settings):
    rho_BT = torch.exp(log_ratio_BT)
    low_BT = torch.where(positive_BT, 1.0 - settings.dispo_pos_low, 1.0 - settings.dispo_neg_low)
    high_BT = torch.where(positive_BT, 1.0 + settings.dispo_pos_high, 1.0 + settings.dispo_neg_high)
    weight_BT = torch.minimum(torch.maximum(rho_BT, low_BT), high_BT)
    return -weight_BT * adv_BT * lp_BT, weight_BT, rho_BT != weight_BT


def _minpro(lp_BT, log_ratio_BT, adv_BT, keep_BT):
    # +inf is min's neutral element: a masked token never lowers a later token's minimum
    masked_BT = torch.where(keep_BT, log_ratio_BT, torch.full_like(log_ratio_BT, math.inf))
    log_min_BT = torch.cummin(masked_BT, dim=1).values
    log_min_BT = torch.where(keep_BT, log_min_BT, torch.zeros_like(log_min_BT))
    weight_BT = torch.exp(log_min_BT)
    loss_BT = -_reweighted(weight_BT, lp_BT) * adv_BT
    return loss_BT, weight_BT, log_min_BT < log_ratio_BT  # an earlier token set the weight


def _ctpo(lp_BT, log_ratio_BT, adv_BT, keep_BT, settings):
    token_BT = log_ratio_BT.clamp(-CTPO_TOKEN_LOG_RATIO_MAX, CTPO_TOKEN_LOG_RATIO_MAX)
    log_cum_BT = torch.cumsum(token_BT, dim=1).clamp(max=CTPO_LOG_RATIO_MAX)
    position_BT = torch.cumsum(keep_BT.to(log_cum_BT.dtype), dim=1).clamp(min=1.0)
    scale_BT = position_BT.pow(settings.ctpo_position_power)
    negative_BT = adv_BT < 0
    # PPO's min with the dual clip, per sign: A >= 0 only the upper bound acts; A < 0 the lower
    # bound and the dual cap (as the authors' max/min of the two surrogates; zero gradient there)
    lower_BT = torch.where(negative_BT, -settings.ctpo_log_clip_low * scale_BT, -math.inf)
    upper_BT = torch.where(
        negative_BT, settings.ctpo_log_clip_dual * scale_BT, settings.ctpo_log_clip_high * scale_BT
    )
    clipped_BT = (log_cum_BT < lower_BT) | (log_cum_BT > upper_BT)
    bounded_BT = torch.exp(torch.minimum(torch.maximum(log_cum_BT, lower_BT), upper_BT))
    cumulative_BT = torch.exp(log_cum_BT)
    ratio_BT = torch.where(clipped_BT, bounded_BT, _reweighted(cumulative_BT, lp_BT))
    weight_BT = torch.where(clipped_BT, torch.zeros_like(cumulative_BT), cumulative_BT)
    return -ratio_BT * adv_BT, weight_BT, clipped_BT


def _sapo(lp_BT, log_ratio_BT, adv_BT, settings):
    tau_BT = torch.where(adv_BT > 0, settings.sapo_tau_pos, settings.sapo_tau_neg)
    rho_BT = torch.exp(lp_BT - (lp_BT.detach() - log_ratio_BT))  # exp(lp_s - lp_old), with grad
    loss_BT = -torch.sigmoid(tau_BT * (rho_BT - 1.0)) * (4.0 / tau_BT) * adv_BT
    # d f / d lp = f'(rho) rho, f'(rho) = 4 s (1 - s): 1 at rho = 1 (the 4 / tau normalisation)
    gate_BT = torch.sigmoid(tau_BT * (rho_BT.detach() - 1.0))
    slope_BT = 4.0 * gate_BT * (1.0 - gate_BT)
    return loss_BT, slope_BT * rho_BT.detach(), slope_BT < SAPO_GATED_BELOW


def _ppo_window(lp_BT, log_ratio_BT, adv_BT, low, high):
    """PPO's clipped surrogate with explicit ratio bounds (no gradient where it clips)."""
    rho_BT = torch.exp(log_ratio_BT)
    clipped_BT = ((adv_BT > 0) & (rho_BT > high)) | ((adv_BT < 0) & (rho_BT < low))
    ratio_BT = torch.where(clipped_BT, rho_BT.clamp(low, high), _reweighted(rho_BT, lp_BT))
    weight_BT = torch.where(clipped_BT, torch.zeros_like(rho_BT), rho_BT)
    return -ratio_BT * adv_BT, weight_BT, clipped_BT


def bapo_clip_bounds(
    log_ratio_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    positive_BT: torch.Tensor,
    settings: RatioSettings,
) -> tuple[float, float]:
    """BAPO's (c_low, c_high) for this batch (Algorithm 1): the first pair on the search path
    whose positive share reaches `bapo_target`, else the path's last pair.

    The path does not depend on the data (c_high steps to b+, then c_low to b-; the loop runs
    while c_low + d2 <= b-), so every pair's share is computed with one host sync.
    """
    s = settings
    steps_high = math.floor((s.bapo_high_max - s.bapo_high_start) / s.bapo_high_step + 1e-9)
    steps_low = math.floor((s.bapo_low_max - s.bapo_low_start) / s.bapo_low_step + 1e-9)
    path = [(s.bapo_low_start, s.bapo_high_start)]
    if steps_low > 0:  # Algorithm 1 line 10: no step at all when c_low cannot move
        path += [(s.bapo_low_start, s.bapo_high_start + k * s.bapo_high_step)
                 for k in range(1, steps_high + 1)]  # fmt: skip
        top = path[-1][1]
        path += [(s.bapo_low_start + k * s.bapo_low_step, top) for k in range(1, steps_low + 1)]
    path = [(round(low, 12), round(high, 12)) for low, high in path]  # 1.2 + 0.05 k float noise
    rho_BT = torch.exp(log_ratio_BT.detach())
    keep_BT = mask_BT.bool()
    magnitude_BT = torch.where(keep_BT, advantages_BT.detach().abs(), torch.zeros_like(rho_BT))
    positive_BT = positive_BT & keep_BT
    shares = []
    for low, high in path:
        # |min(rho A, clip(rho, low, high) A)| = |A| * (min(rho, high) if A > 0 else max(rho, low))
        effective_BT = torch.where(advantages_BT > 0, rho_BT.clamp(max=high), rho_BT.clamp(min=low))
        contribution_BT = magnitude_BT * effective_BT
        total = contribution_BT.sum()
        positive = (contribution_BT * positive_BT).sum()  # a product, not indexing: no host sync
        shares.append(torch.where(total > 0, positive / total, 1.0))
    for (low, high), share in zip(path, torch.stack(shares).tolist(), strict=True):
        if share >= s.bapo_target:
            return low, high
    return path[-1]


def effective_sample_size(weights_N: torch.Tensor) -> float:
    """Kish's ESS `(sum w)^2 / sum w^2` of importance weights (nan for no tokens)."""
    weights = weights_N.detach().double().flatten()
    if weights.numel() == 0:
        return math.nan
    squares = float((weights * weights).sum())
    return float(weights.sum()) ** 2 / squares if squares > 0 else math.nan


def importance_stats(
    log_ratio_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    clipped_BT: torch.Tensor | None = None,
) -> dict[str, float]:
    """ESS, its fraction of the kept tokens, ratio quantiles, and the clipped share per sign of A.

    `clip_fraction_pos`/`_neg` are the clipped share among kept tokens with A > 0 / A < 0 (nan
    when there are none, or when `clipped_BT` is None).
    """
    keep_BT = mask_BT.bool()
    ratio_N = torch.exp(log_ratio_BT.detach()[keep_BT].double())
    ess = effective_sample_size(ratio_N)
    stats = {"ess": ess, "ess_fraction": ess / ratio_N.numel() if ratio_N.numel() else math.nan}
    for name, q in (("ratio_p05", 0.05), ("ratio_p50", 0.5), ("ratio_p95", 0.95)):
        stats[name] = float(torch.quantile(ratio_N, q)) if ratio_N.numel() else math.nan
    sides = (("clip_fraction_pos", advantages_BT > 0), ("clip_fraction_neg", advantages_BT < 0))
    for name, side_BT in sides:
        chosen_BT = keep_BT & side_BT
        if clipped_BT is None or not bool(chosen_BT.any()):
            stats[name] = math.nan
        else:
            stats[name] = float(clipped_BT[chosen_BT].double().mean())
    return stats
