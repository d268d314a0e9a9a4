"""vOPD's baseline leaves the expected OPD gradient unchanged and lowers its variance (s.2).

A tabular student (one softmax per state) against a fixed teacher: each simulated batch samples
tokens from the student in every state and differentiates opd's own surrogate with the vanilla,
the full-baseline and the top-k-baseline advantages (same samples for all three). Over many
batches each mean gradient must match the exact gradient of the reverse KL, `grad KL(p_s || p_t)`
averaged over states, within a few standard errors; only the variance may differ.

Many batches are simulated in one call: a group of G batches gives each (batch, state) pair its
own one-hot hidden column, so the student's weight is G copies of the tabular logits side by
side, and one backward leaves each batch's gradient in its own columns. Advantages are laid out
one row per batch, and every row of opd's token stats, advantage and surrogate depends on that
row only, so the group's gradients are those of G separate batches.
"""

from __future__ import annotations

import torch

from opd.objectives.compose import compose_advantage, opd_term
from opd.objectives.surrogate import policy_loss_N
from opd.objectives.token_stats import completion_token_stats

STATES, VOCAB, TOKENS_PER_STATE, BATCHES, TOP_K = 3, 6, 4, 1500, 3
TOKENS_PER_BATCH = STATES * TOKENS_PER_STATE
# Batches per backward: the one-hot hidden states are [G * TOKENS_PER_BATCH, G * STATES].
GROUP = 300


def _group_gradients(student_logits, teacher_logits, generator):
    """Per-estimator surrogate gradients of GROUP sampled batches, [GROUP, STATES * VOCAB] each."""
    states_N = torch.arange(STATES).repeat_interleave(TOKENS_PER_STATE).repeat(GROUP)
    batch_N = torch.arange(GROUP).repeat_interleave(TOKENS_PER_BATCH)
    probs = torch.softmax(student_logits.detach(), -1)
    ids_N = torch.multinomial(probs[states_N], 1, generator=generator)[:, 0]
    # logits = W[:, batch * STATES + state]: each batch differentiates its own copy of the table
    hidden_NH = torch.nn.functional.one_hot(batch_N * STATES + states_N, GROUP * STATES).float()
    teacher_hidden_NH = torch.nn.functional.one_hot(states_N, STATES).float()
    teacher_lp = torch.log_softmax(teacher_logits, -1)[states_N, ids_N]
    gradients = {}
    for baseline in ("none", "full", "topk"):
        weight = student_logits.detach().T.repeat(1, GROUP).requires_grad_(True)  # [V, G*S]
        stats = completion_token_stats(
            hidden_NH, weight.detach(), ids_N, teacher_hidden_NH=teacher_hidden_NH,
            teacher_weight_VH=teacher_logits.T, baseline=baseline, baseline_top_k=TOP_K,
        )  # fmt: skip
        term = opd_term(stats.logprob.view(GROUP, -1), teacher_lp.view(GROUP, -1))
        base = None if baseline == "none" else -stats.baseline_kl.view(GROUP, -1)
        advantages = compose_advantage(term, torch.ones_like(term), baseline_BT=base).flatten()
        logprobs = torch.log_softmax(hidden_NH @ weight.T, -1)[torch.arange(len(ids_N)), ids_N]
        loss_N = policy_loss_N(logprobs, logprobs.detach(), advantages)
        # a sum of per-batch token means: each batch's columns get that batch's mean gradient
        loss_N.view(GROUP, TOKENS_PER_BATCH).mean(1).sum().backward()
        gradients[baseline] = weight.grad.view(VOCAB, GROUP, STATES).permute(1, 2, 0).flatten(1)
    return gradients


def test_baselines_keep_the_expected_gradient_and_reduce_variance():
    generator = torch.Generator().manual_seed(0)
    student_logits = torch.randn(STATES, VOCAB, generator=generator)
    teacher_logits = torch.randn(STATES, VOCAB, generator=generator) * 2
    samples = {"none": [], "full": [], "topk": []}
    for _ in range(BATCHES // GROUP):
        for name, gradients in _group_gradients(student_logits, teacher_logits, generator).items():
            samples[name].append(gradients)
    logits = student_logits.clone().requires_grad_(True)
    ls, lt = torch.log_softmax(logits, -1), torch.log_softmax(teacher_logits, -1)
    (ls.exp() * (ls - lt)).sum(-1).mean().backward()  # each state carries 1/STATES of the tokens
    exact = logits.grad.flatten()
    variance = {}
    for name, groups in samples.items():
        stacked = torch.cat(groups)
        assert stacked.shape == (BATCHES, STATES * VOCAB)
        mean, std_error = stacked.mean(0), stacked.std(0) / BATCHES**0.5
        assert ((mean - exact).abs() <= 4 * std_error + 1e-4).all(), name  # unbiased
        variance[name] = ((stacked - mean) ** 2).sum(-1).mean().item()
    assert variance["full"] < 0.9 * variance["none"], variance
    assert variance["topk"] < variance["none"], variance
