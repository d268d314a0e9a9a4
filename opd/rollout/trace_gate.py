"""Per-prompt gate and cache for LUFFY trace insertion (HAPO-style gating, BEPA's trace cache).

`opd.rollout.traces` puts one off-policy trace into every group of `num_generations` rows. This
module decides, per group, whether the group gets its trace this step, and which text the trace
is. It holds pure state only: the trainer calls it once per generation step with the global batch
(identical on every process) and saves the ledger with its checkpoints.

Gates (`insert_groups_G`), for group g with on-policy correctness `c_gn` (n rollouts):
- `always`: insert into every group (today's LUFFY behaviour).
- `all_fail`: insert iff `not any_n c_gn` (the group's on-policy rollouts all failed).
- `thompson` (HAPO): per prompt p a Beta posterior of the policy's success rate,
  `theta_p ~ Beta(alpha0 + S_p, beta0 + F_p)`, with `S_p` / `F_p` the correct / incorrect on-policy
  rollouts of p summed over all earlier steps (the posterior BEFORE this step's update); insert
  iff `theta_p < threshold`. As successes accumulate the posterior moves right and
  `P(insert) = I_threshold(alpha0 + S_p, beta0 + F_p)` (the regularized incomplete beta function,
  i.e. the Beta CDF at the threshold) falls to 0, so the guidance fades as the policy improves.
  The draw is made by inversion: `theta = F^-1(u)` with `u ~ U[0, 1)` from the caller's
  `torch.Generator`, and `F^-1(u) < threshold  <=>  u < F(threshold)`, so the gate tests
  `u < I_threshold(a, b)` directly. This is the same Bernoulli event as sampling theta, needs one
  uniform per group (deterministic for a seeded generator: every process passes an identically
  seeded one), and avoids `torch.distributions.Beta`, whose sampler takes no generator.

BEPA's trace cache (`PromptLedger.update(..., cache_successes=True)` and `trace_for`): when a
prompt's group has a verified on-policy success, the first correct completion of that group
replaces the prompt's cached trace; the trace inserted for a prompt is its cached own success if
present, else the dataset trace.

Sources and defaults:
- HAPO: Wu, Wang, Chen, Wei, "Hindsight-Anchored Policy Optimization: Turning Failure into
  Feedback in Sparse Reward Settings", arXiv 2603.11321 (2026). The abstract gives the mechanism
  (teacher demonstrations injected on failure, a Thompson-sampling-inspired gate, the teacher
  signal anneals as the policy improves); a third-party summary calls the gate "Beta-Binomial".
  The paper's method section and its defaults could not be read from here, so these are NOT the
  paper's numbers: `DEFAULT_ALPHA0 = DEFAULT_BETA0 = 1` (the uniform prior, standard for
  Beta-Bernoulli Thompson sampling), `DEFAULT_THRESHOLD = 0.5` (insert while the sampled success
  rate is below one half; at the uniform prior with no data that is probability 1/2), counts per
  rollout (Beta-Binomial: a group of n adds its successes to S and the rest to F), no forgetting
  of old counts, and the gate alone decides (the abstract's "during failure" can be had by the
  caller AND-ing this gate with `all_fail`). The "threshold annealing" a summary mentions is not
  implemented.
- BEPA: Wang, Zhang, Zhang, Qian, Lu, "From Off-Policy to On-Policy: Enhancing GUI Agents via
  Bi-level Expert-to-Policy Assimilation", arXiv 2601.05787 (ACL 2026). Its LEVEL-2 (README of
  github.com/LEON-gittech/Verl_GUI): "a per-task cache, injecting guided trajectories into GRPO
  updates only upon total on-policy failure. The cache is continuously refreshed with the
  policy's own successful executions." So BEPA is gate `all_fail` plus `cache_successes=True`.
  Which success refreshes the cache is not stated there; here each step's first correct
  completion of the group replaces the entry (the newest success wins). LEVEL-1 (plan-conditioned
  self-rolled expert traces, made offline) is a data-preparation step and is not here.

Reductions (tested): `thompson` with `threshold=1` is `always`; with `threshold=0` it never
inserts; `trace_for` with an empty cache is the dataset trace (today's LUFFY).

Shape suffixes: `_G` groups (prompts) in the global batch, `_N` on-policy rollouts per group.

Test: `pytest -n 0 tests/unit/test_trace_gate.py`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from opd.types import TraceGate

DEFAULT_ALPHA0 = 1.0
DEFAULT_BETA0 = 1.0
DEFAULT_THRESHOLD = 0.5
# 16 hex digits = 64 bits: a collision among 1e6 prompts has probability ~3e-8.
_KEY_HEX_DIGITS = 16


def prompt_key(prompt: str | list[dict]) -> str:
    """A stable key of a prompt (a string or a chat message list): the first 16 hex digits of the
    sha256 of its canonical JSON (sorted keys, no spaces, unicode kept), so it is the same on
    every process and across restarts (unlike `hash`, which is salted per process)."""
    canonical = json.dumps(prompt, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:_KEY_HEX_DIGITS]


@dataclass
class PromptLedger:
    """Per-prompt state, identical on every process (updated from the global batch)."""

    alpha0: float = DEFAULT_ALPHA0
    """Beta prior pseudo-count of successes (Thompson gate)."""
    beta0: float = DEFAULT_BETA0
    """Beta prior pseudo-count of failures (Thompson gate)."""
    successes: dict[str, int] = field(default_factory=dict)
    """Correct on-policy rollouts of each prompt key, summed over all steps so far."""
    failures: dict[str, int] = field(default_factory=dict)
    """Incorrect on-policy rollouts of each prompt key, summed over all steps so far."""
    cached_traces: dict[str, str] = field(default_factory=dict)
    """BEPA: the newest verified own success of each prompt key (completion text)."""

    def update(
        self,
        keys_G: list[str],
        correct_GN: torch.Tensor,
        completions_GN: list[list[str]] | None = None,
        *,
        cache_successes: bool,
    ) -> None:
        """Add one generation step's outcomes.

        Args:
            keys_G: `prompt_key` of each group's prompt (a key may repeat; its counts add).
            correct_GN: bool [G, n], whether each on-policy rollout was verified correct (rows
                replaced by a trace are left out by the caller: they are not the policy's).
            completions_GN: the completion texts [G][n]; needed with `cache_successes`.
            cache_successes: BEPA: a group with a correct rollout puts its first correct
                completion in the prompt's cache (replacing an older one).
        """
        correct_GN = _check_correct(keys_G, correct_GN)
        num_correct_G = correct_GN.sum(dim=1).tolist()
        num_rollouts = correct_GN.shape[1]
        for key, num_correct in zip(keys_G, num_correct_G, strict=True):
            self.successes[key] = self.successes.get(key, 0) + num_correct
            self.failures[key] = self.failures.get(key, 0) + num_rollouts - num_correct
        if not cache_successes:
            return
        assert completions_GN is not None, "cache_successes needs the completion texts"
        assert [len(row) for row in completions_GN] == [num_rollouts] * len(keys_G), (
            f"completions_GN must be [G={len(keys_G)}][n={num_rollouts}]"
        )
        for key, row_N, completions_N in zip(keys_G, correct_GN, completions_GN, strict=True):
            if row_N.any():
                self.cached_traces[key] = completions_N[int(row_N.nonzero()[0, 0])]

    def trace_for(self, key: str, dataset_trace: str | None) -> str | None:
        """BEPA: the prompt's cached own success if there is one, else the dataset trace."""
        return self.cached_traces.get(key, dataset_trace)

    def insert_probability(self, key: str, threshold: float) -> float:
        """`P(theta < threshold)` under the prompt's current posterior (the Thompson gate's
        insertion probability; handy to log)."""
        alpha = self.alpha0 + self.successes.get(key, 0)
        beta = self.beta0 + self.failures.get(key, 0)
        return _beta_cdf(threshold, alpha, beta)

    def state_dict(self) -> dict:
        """A JSON-serialisable copy of the state (saved with checkpoints)."""
        return {
            "alpha0": self.alpha0,
            "beta0": self.beta0,
            "successes": dict(self.successes),
            "failures": dict(self.failures),
            "cached_traces": dict(self.cached_traces),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> PromptLedger:
        """The ledger `state_dict` saved (also after a JSON round trip)."""
        return cls(
            alpha0=float(state["alpha0"]),
            beta0=float(state["beta0"]),
            successes={key: int(n) for key, n in state["successes"].items()},
            failures={key: int(n) for key, n in state["failures"].items()},
            cached_traces=dict(state["cached_traces"]),
        )


def save_ledger(ledger: PromptLedger, path: Path) -> None:
    """Write `ledger` to `path` atomically (a crash leaves the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(ledger.state_dict()))
    temporary.replace(path)


def load_ledger(path: Path) -> PromptLedger | None:
    """The ledger `save_ledger` wrote at `path`; None when there is none."""
    if not path.is_file():
        return None
    return PromptLedger.from_state_dict(json.loads(path.read_text()))


def insert_groups_G(
    gate: TraceGate | str,
    keys_G: list[str],
    correct_GN: torch.Tensor,
    ledger: PromptLedger,
    *,
    threshold: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Which groups receive a trace this step.

    Call it before `ledger.update` for the same step: the Thompson gate samples the posterior of
    the earlier steps. The ledger is not changed.

    Args:
        gate: `always`, `all_fail` or `thompson` (a `TraceGate` or its string).
        keys_G: `prompt_key` of each group's prompt.
        correct_GN: bool [G, n], this step's on-policy correctness (read by `all_fail`).
        threshold: the Thompson gate's threshold in [0, 1] (unused by the other gates).
        generator: CPU generator, seeded identically on every process; only `thompson` draws
            from it (G uniforms per call).

    Returns:
        bool [G]: True where the group gets a trace.
    """
    correct_GN = _check_correct(keys_G, correct_GN)
    if gate == "always":
        return torch.ones(len(keys_G), dtype=torch.bool)
    if gate == "all_fail":
        return ~correct_GN.any(dim=1)
    if gate == "thompson":
        return _thompson_G(keys_G, ledger, threshold, generator)
    raise ValueError(f"unknown trace gate {gate!r}: use 'always', 'all_fail' or 'thompson'")


def _thompson_G(
    keys_G: list[str], ledger: PromptLedger, threshold: float, generator: torch.Generator
) -> torch.Tensor:
    """`theta_g < threshold` for `theta_g ~ Beta(alpha0 + S, beta0 + F)`, drawn by inversion."""
    assert 0.0 <= threshold <= 1.0, f"threshold {threshold} must be in [0, 1]"
    uniform_G = torch.rand(len(keys_G), generator=generator, dtype=torch.float64)
    probability_G = torch.tensor(
        [ledger.insert_probability(key, threshold) for key in keys_G], dtype=torch.float64
    )
    # u in [0, 1): a probability of 1 always inserts, 0 never does.
    return uniform_G < probability_G


def _check_correct(keys_G: list[str], correct_GN: torch.Tensor) -> torch.Tensor:
    assert correct_GN.dtype == torch.bool, (
        f"correct_GN must be bool (verified correct or not), got {correct_GN.dtype}"
    )
    assert correct_GN.dim() == 2 and correct_GN.shape[0] == len(keys_G), (
        f"correct_GN must be [G={len(keys_G)}, n], got {tuple(correct_GN.shape)}"
    )
    return correct_GN.cpu()


def _beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function `I_x(a, b)` (the Beta(a, b) CDF at x), for
    a, b > 0: the continued fraction of Abramowitz & Stegun 26.5.8, evaluated by the modified
    Lentz method on the side where it converges fast (x < (a + 1) / (a + b + 2)), else through
    `I_x(a, b) = 1 - I_{1-x}(b, a)`. torch has no betainc; float64 in plain Python."""
    assert a > 0 and b > 0, f"Beta parameters must be positive, got a={a}, b={b}"
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(1.0 - x, b, a) / b


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """`1 / (1 + d1 / (1 + d2 / (1 + ...)))` with A&S 26.5.8's coefficients
    `d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))` and
    `d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m))`, by modified Lentz. It needs about
    `sqrt(max(a, b))` terms on the fast side, so the cap allows counts in the millions."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 10_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < eps:
            return result
    raise ArithmeticError(f"incomplete beta did not converge for x={x}, a={a}, b={b}")
