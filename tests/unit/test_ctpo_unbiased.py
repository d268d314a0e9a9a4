"""CTPO's cumulative ratio is an unbiased prefix correction with lower variance (arXiv:2605.07331).

A tabular behaviour policy q and target policy p over sequences of T = 4 tokens from a vocabulary
of 3, each token drawn given the previous one (a start state for the first), and a reward r_t per
token (a table over (previous token, token)). From sequences sampled from q, E_p[sum_t r_t] is
estimated with
  (a) CTPO's weight at token t, the cumulative ratio prod_{u<=t} rho_u (opd's own `weight_BT`,
      bounds far out of reach so nothing is clipped), and
  (b) the full-sequence ratio prod_{u<=T} rho_u on every token.
Both must match the exact value (enumeration of the 3^4 sequences) within 4 standard errors, and
(a)'s variance must be clearly lower: the weight of r_t ignores the tokens after t, whose ratios
have mean 1 under q but only add spread.
"""

from __future__ import annotations

import itertools

import torch

from opd.objectives.offpolicy import RatioSettings, offpolicy_surrogate_BT
from opd.types import Ratio

VOCAB, LENGTH, SAMPLES = 3, 4, 200_000
START = VOCAB  # the state before the first token
UNCLIPPED = RatioSettings(ctpo_log_clip_low=1e6, ctpo_log_clip_high=1e6, ctpo_log_clip_dual=1e6)


def _sample(log_q, generator):
    """Token ids [N, T] and their states (the previous token; START first) drawn from q."""
    tokens, state = [], torch.full((SAMPLES,), START)
    for _ in range(LENGTH):
        token = torch.multinomial(log_q[state].exp(), 1, generator=generator)[:, 0]
        tokens.append(token)
        state = token
    tokens = torch.stack(tokens, dim=1)
    states = torch.cat([torch.full((SAMPLES, 1), START), tokens[:, :-1]], dim=1)
    return tokens, states


def _exact_value(log_p, reward):
    """E_p[sum_t r_t] by enumerating every sequence."""
    total = 0.0
    for sequence in itertools.product(range(VOCAB), repeat=LENGTH):
        states = (START, *sequence[:-1])
        log_prob = sum(float(log_p[s, y]) for s, y in zip(states, sequence, strict=True))
        rewards = sum(float(reward[s, y]) for s, y in zip(states, sequence, strict=True))
        total += torch.tensor(log_prob).exp().item() * rewards
    return total


def test_cumulative_ratio_is_unbiased_with_lower_variance_than_the_sequence_ratio():
    generator = torch.Generator().manual_seed(0)
    logits_q = torch.randn(VOCAB + 1, VOCAB, generator=generator, dtype=torch.float64)
    logits_p = logits_q + 0.6 * torch.randn(
        VOCAB + 1, VOCAB, generator=generator, dtype=torch.float64
    )
    log_q, log_p = torch.log_softmax(logits_q, -1), torch.log_softmax(logits_p, -1)
    reward = torch.randn(VOCAB + 1, VOCAB, generator=generator, dtype=torch.float64)

    tokens, states = _sample(log_q, generator)
    lp_target, lp_behaviour = log_p[states, tokens], log_q[states, tokens]
    rewards = reward[states, tokens]  # [N, T]
    terms = offpolicy_surrogate_BT(
        lp_target, lp_behaviour, torch.ones_like(lp_target), torch.ones_like(lp_target), None,
        ratio=Ratio.CTPO, settings=UNCLIPPED,
    )  # fmt: skip
    assert not terms.clipped_BT.any()
    log_sequence = (lp_target - lp_behaviour).sum(dim=1)
    assert log_sequence.abs().max() < 10  # CTPO's cap on the cumulative log-ratio stays idle
    torch.testing.assert_close(terms.weight_BT[:, -1], log_sequence.exp())  # R_T: the full ratio

    cumulative = (terms.weight_BT * rewards).sum(dim=1)  # (a) sum_t prod_{u<=t} rho_u r_t
    sequence = log_sequence.exp() * rewards.sum(dim=1)  # (b) prod_{u<=T} rho_u sum_t r_t
    exact = _exact_value(log_p, reward)
    for estimate in (cumulative, sequence):
        std_error = estimate.std() / SAMPLES**0.5
        assert abs(estimate.mean().item() - exact) < 4 * std_error.item(), (estimate.mean(), exact)
    assert cumulative.var() < 0.8 * sequence.var(), (cumulative.var(), sequence.var())
