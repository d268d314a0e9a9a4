"""Prefix-guided rollouts (POPE, PrefixRL, Prefix-RFT; METHODS.md s.11).

Some rollouts of a group start from a prefix of a reference solution or of an earlier successful
trace: vLLM generates from `prompt + prefix`, so a hard prompt yields non-zero rewards. The three
methods differ in where the prefix goes and which prompts get one:

- POPE (Qu, Setlur, Smith, Salakhutdinov, Kumar, arXiv:2601.18779): prefixes of oracle solutions
  guide hard prompts; the prefix stays in the prompt (no gradient) and unguided copies are kept.
  Here: `guided_per_group < group_size` keeps unguided rows in every group, and gate `failed`
  picks the prompts the `PromptLedger` has seen only fail (our reading of "hard": the policy's
  own record; the paper's selection of its hard set is not reproduced).
- PrefixRL (Setlur, Wang, Cohen, Rashidinejad, Xie, arXiv:2601.18795): the prefix of a
  successful off-policy trace (rejection-sampled by the base model: `successful_rollout_traces`
  reads them from an `opd rollout` set) in the prompt, its length setting the difficulty;
  `PrefixSchedule` moves the fraction linearly (decreasing = harder).
- Prefix-RFT (arXiv:2507.01679): the prefix is part of the completion (off-policy tokens
  trained by NLL or LUFFY shaping) and the student continues it. `prefix_into_completion` moves
  it from the prompt to the completion after generation, with NaN sampler logprobs (no
  behaviour logprob, as `opd.rollout.traces`), and `prefix_source_mask` is the per-token source
  flag `prefix`. The paper decays the fraction with a cosine schedule (a third-party summary says
  0.95 to 0.05); `PrefixSchedule` is linear only.

Conventions chosen here:
- `cut_prefix_ids` keeps `floor(fraction * n)` tokens, capped by `max_tokens`, and never the
  whole source unless `fraction == 1` (then it is the whole source, up to the cap): a guided
  rollout must have something left to generate.
- Rows: groups are consecutive in TRL's global batch; guided rows are the first
  `guided_per_group` of each group, so they never collide with LUFFY's trace row (the last one)
  while `guided_per_group < group_size`.
- `successful_rollout_traces` calls the reward function as TRL does (`prompts`, `completions`,
  `completion_ids` and the dataset's own columns; chat prompts get chat completions), and a
  reward >= 0.5 (not None) is a success.

Test: `pytest -n 0 tests/unit/test_prefix.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from opd.rollout.trace_gate import PromptLedger, prompt_key
from opd.shards import ROLLOUT_COLUMNS, TEACHER_COLUMNS, load_shard_set
from opd.types import PrefixGate, PrefixShape

PREFIX_GATES = tuple(gate.value for gate in PrefixGate)
PREFIX_SCHEDULES = tuple(shape.value for shape in PrefixShape)
SUCCESS_REWARD = 0.5
"""A completion with reward >= this is a success (binary verifiers give 0 or 1)."""


@dataclass(frozen=True)
class PrefixSchedule:
    """Fraction of the source's tokens given as prefix, moving from `start` to `end` over
    `ramp_steps` optimizer steps, linearly or along a half cosine (Prefix-RFT's decay);
    PrefixRL: decreasing makes the problem harder."""

    start: float
    """Fraction at step 0, in [0, 1]."""
    end: float
    """Fraction from `ramp_steps` on, in [0, 1]."""
    ramp_steps: int
    """Optimizer steps of the ramp (>= 0; 0 means `end` at once)."""
    shape: str = "linear"
    """'linear' or 'cosine': `end + (start - end) * (1 + cos(pi * s / ramp_steps)) / 2`."""

    def __post_init__(self) -> None:
        if self.shape not in PREFIX_SCHEDULES:
            raise ValueError(
                f"prefix schedule shape must be one of {PREFIX_SCHEDULES}, got {self.shape!r}"
            )
        # `not 0 <= x <= 1` is also True for NaN.
        if not 0.0 <= self.start <= 1.0:
            raise ValueError(f"prefix schedule start must be in [0, 1], got {self.start}")
        if not 0.0 <= self.end <= 1.0:
            raise ValueError(f"prefix schedule end must be in [0, 1], got {self.end}")
        if self.ramp_steps < 0:
            raise ValueError(f"prefix schedule ramp_steps must be >= 0, got {self.ramp_steps}")


def prefix_fraction(step: int, schedule: PrefixSchedule) -> float:
    """Linear from start to end over ramp_steps optimizer steps, then end.

    Args:
        step: optimizer steps taken so far, counted from 0.
        schedule: the prefix schedule.

    Returns:
        `start + (end - start) * min(step, ramp_steps) / ramp_steps` (`end` when ramp_steps = 0).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if schedule.ramp_steps == 0 or step >= schedule.ramp_steps:
        return schedule.end
    progress = step / schedule.ramp_steps
    if schedule.shape == "cosine":
        return (
            schedule.end + (schedule.start - schedule.end) * (1 + math.cos(math.pi * progress)) / 2
        )
    return schedule.start + (schedule.end - schedule.start) * progress


def guided_rows(
    num_rows: int, *, group_size: int, first_global_index: int, guided_per_group: int
) -> list[int]:
    """Local rows whose position in their group is < guided_per_group.

    Groups are consecutive in the global batch; this process holds global rows
    `[first_global_index, first_global_index + num_rows)`, so a group may straddle processes.
    Requires `0 <= guided_per_group <= group_size` (equal: every row guided, no unguided copy).
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if not 0 <= guided_per_group <= group_size:
        raise ValueError(
            f"guided_per_group must be in [0, group_size={group_size}], got {guided_per_group}"
        )
    return [
        row for row in range(num_rows) if (first_global_index + row) % group_size < guided_per_group
    ]


def cut_prefix_ids(source_ids: list[int], fraction: float, *, max_tokens: int) -> list[int]:
    """The first `floor(fraction * len(source_ids))` ids, at most `max_tokens`.

    A prefix is a strict prefix of a non-empty source unless `fraction == 1` (then the whole
    source, up to the cap), so a guided rollout always has something left to generate. An empty
    source gives an empty prefix.

    Args:
        source_ids: token ids of the reference solution or successful trace (no special tokens).
        fraction: in [0, 1], e.g. `prefix_fraction(step, schedule)`.
        max_tokens: the cap (>= 0), e.g. to leave room for the continuation.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"prefix fraction must be in [0, 1], got {fraction}")
    if max_tokens < 0:
        raise ValueError(f"prefix max_tokens must be >= 0, got {max_tokens}")
    # A schedule's float round-off (cos(pi/2) is 6e-17, not 0) must not drop a whole token.
    num_tokens = math.floor(fraction * len(source_ids) + 1e-9)
    if fraction < 1.0:  # states the contract; floor(f * n) < n for f < 1 in float64 anyway
        num_tokens = min(num_tokens, max(len(source_ids) - 1, 0))
    return list(source_ids[: min(num_tokens, max_tokens)])


def gated_prompts(gate: str, keys: list[str], ledger: PromptLedger | None) -> list[bool]:
    """Which prompts get a prefix.

    Args:
        gate: `always` (every prompt) or `failed` (POPE's hard prompts: the ledger has seen the
            prompt and never a success, i.e. successes == 0 and failures > 0; an unseen prompt
            is not guided).
        keys: `prompt_key` of each prompt.
        ledger: the run's `PromptLedger` (its earlier steps); required by `failed`.

    Returns:
        One flag per key.
    """
    if gate not in PREFIX_GATES:
        raise ValueError(f"unknown prefix gate {gate!r}: use one of {PREFIX_GATES}")
    if gate == "always":
        return [True] * len(keys)
    if ledger is None:
        raise ValueError("prefix gate 'failed' needs a PromptLedger of earlier outcomes")
    return [ledger.successes.get(key, 0) == 0 and ledger.failures.get(key, 0) > 0 for key in keys]


def successful_rollout_traces(folder: str, reward_func, tokenizer) -> dict[str, str]:
    """The prefix source from an `opd rollout` shard set: the first verified success per prompt.

    Each completion is decoded (`skip_special_tokens=True`) and graded in one call
    `reward_func(prompts=..., completions=..., completion_ids=..., **columns)` with the
    dataset's own columns carried in the shard rows (TRL's call; with chat prompts the
    completions are `[{"role": "assistant", "content": text}]`, as TRL passes them).

    Returns:
        `{prompt_key(prompt): text}` of the first completion (lowest `prompt_index`, then
        `sample_index`) with reward >= 0.5; prompts without a success are absent.

    Raises:
        ValueError: the set has no `prompt` column, or no completion succeeded.
    """
    _, dataset = load_shard_set(folder, kind="rollouts", rerun_hint="opd rollout")
    if "prompt" not in dataset.column_names:
        raise ValueError(f"rollout set {folder} has no 'prompt' column to key the traces by")
    rows = sorted(dataset.to_list(), key=lambda row: (row["prompt_index"], row["sample_index"]))
    texts = tokenizer.batch_decode(
        [row["completion_ids"] for row in rows], skip_special_tokens=True
    )
    rewards = reward_func(
        prompts=[row["prompt"] for row in rows],
        completions=[
            _as_completion(row["prompt"], text) for row, text in zip(rows, texts, strict=True)
        ],
        completion_ids=[row["completion_ids"] for row in rows],
        **_dataset_columns(rows, dataset.column_names),
    )
    assert len(rewards) == len(rows), f"reward_func gave {len(rewards)} rewards for {len(rows)}"
    traces: dict[str, str] = {}
    for row, text, reward in zip(rows, texts, rewards, strict=True):
        # None is "unscorable" (TRL's convention), never a success.
        if reward is not None and reward >= SUCCESS_REWARD:
            traces.setdefault(prompt_key(row["prompt"]), text)
    if not traces:
        raise ValueError(f"rollout set {folder} has no completion with reward >= {SUCCESS_REWARD}")
    return traces


def _dataset_columns(rows: list[dict], column_names: list[str]) -> dict[str, list]:
    """The prompt dataset's own columns as keyword lists (TRL leaves out `prompt`, passed as
    `prompts`, and opd's rollout/teacher columns are not the dataset's)."""
    skip = {"prompt", *ROLLOUT_COLUMNS, *TEACHER_COLUMNS}
    return {name: [row[name] for row in rows] for name in column_names if name not in skip}


def _as_completion(prompt, text: str):
    """A chat prompt (a message list) is graded with a chat completion, as TRL does."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def prefix_into_completion(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    logprobs: list | None,
    prefix_ids: list[list[int] | None],
    *,
    max_completion_length: int,
) -> tuple[list[list[int]], list[list[int]], list | None, list[int]]:
    """Prefix-RFT: move each row's prefix from the end of its prompt to the front of its
    completion (vLLM generated from `prompt + prefix`).

    Args:
        prompt_ids: [B][*] ids vLLM generated from; a guided row ends with its prefix.
        completion_ids: [B][*] the generated continuations.
        logprobs: sampler logprobs, `[B][token]` floats or `[B][token][k]`, or None.
        prefix_ids: [B] the prefix of each row; None or empty for an unguided row.
        max_completion_length: the completion cap; prefix + continuation is cut to it (the
            caller should have asked vLLM for `max_completion_length - len(prefix)` tokens).

    Returns:
        `(prompt_ids, completion_ids, logprobs, prefix_len_B)`: prompts without the prefix,
        `(prefix + continuation)[:max_completion_length]`, logprobs with NaN on the prefix
        tokens (nested rows get `[NaN] * k`, k the row's own width, else 1), and the number of
        prefix tokens at the front of each completion (0 for unguided rows; less than the
        prefix when truncated). New lists; unguided rows are copied unchanged.
    """
    num_rows = len(prompt_ids)
    assert len(completion_ids) == num_rows and len(prefix_ids) == num_rows, (
        f"prompt_ids, completion_ids and prefix_ids must have B={num_rows} rows"
    )
    assert logprobs is None or len(logprobs) == num_rows, f"logprobs must have B={num_rows} rows"
    nested = logprobs is not None and _nested(logprobs)
    new_prompts, new_completions, prefix_len_B = [], [], []
    new_logprobs = None if logprobs is None else []
    for row in range(num_rows):
        prefix = list(prefix_ids[row] or [])
        prompt, completion = list(prompt_ids[row]), list(completion_ids[row])
        if prefix:
            assert prompt[len(prompt) - len(prefix) :] == prefix, (
                f"row {row}: prompt_ids does not end with its prefix_ids"
            )
            prompt = prompt[: len(prompt) - len(prefix)]
            completion = (prefix + completion)[:max_completion_length]
        new_prompts.append(prompt)
        new_completions.append(completion)
        num_prefix = min(len(prefix), len(completion))
        prefix_len_B.append(num_prefix)
        if new_logprobs is not None and logprobs is not None:
            new_logprobs.append(
                _prefixed_logprobs(logprobs[row], len(prefix), len(completion), nested=nested)
            )
    return new_prompts, new_completions, new_logprobs, prefix_len_B


def _prefixed_logprobs(row: list, num_prefix: int, num_tokens: int, *, nested: bool) -> list:
    """NaN for each prefix token (no behaviour logprob), then the row's own, cut to num_tokens."""
    if num_prefix == 0:
        return list(row)
    width = len(row[0]) if nested and row else 1
    pad = [[math.nan] * width for _ in range(num_prefix)] if nested else [math.nan] * num_prefix
    return (pad + list(row))[:num_tokens]


def _nested(logprobs: list) -> bool:
    """TRL's logprobs are `[row][token]` floats, or `[row][token][k]` with top-k logprobs."""
    for row in logprobs:
        if row:
            return isinstance(row[0], list)
    return False


def prefix_source_mask(prefix_len_B: list[int], num_tokens: int) -> torch.Tensor:
    """bool [B, T]: True on the first `prefix_len_B[b]` completion positions of row b (the
    per-token source flag `prefix`; completions are right-padded to T = num_tokens)."""
    assert all(0 <= n <= num_tokens for n in prefix_len_B), (
        f"prefix lengths {prefix_len_B} must be in [0, T={num_tokens}]"
    )
    length_B = torch.tensor(prefix_len_B, dtype=torch.long).reshape(-1, 1)
    return torch.arange(num_tokens).reshape(1, -1) < length_B
