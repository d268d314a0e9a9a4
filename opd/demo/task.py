"""The embedded demo's synthetic task: add a one-digit number to a two-digit one.

Contract:
- a prompt is the exact text the model sees, e.g. `"37+5="`; the char tokenizer of
  `opd.demo.tiny` adds no special tokens, so prompts carry no `<bos>`;
- the completion is the decimal sum followed by EOS, e.g. `"42"` then `<eos>`;
- `build_splits` draws train and held-out prompts from disjoint sets of operand pairs,
  deterministically from a seed;
- `accuracy_reward` has TRL's reward-function signature: 1.0 when the completion's answer equals
  the reference, else 0.0.

The first operand is 10..99 and the second 0..9, so every prompt is 5 tokens, answers are 2 or 3
digits, and there are 900 distinct problems. Why this size: a tiny teacher learns it to ~99% in
under a minute of CPU, a tiny student gets about a third right after a short warm start (the
units digit, a 100-entry lookup, is what it lacks), and 100 OPD steps close most of the gap.
Two-digit plus two-digit addition needs ~1000 teacher steps, too slow for the demo's budget
(measured with `scripts/experiments/demo_opd_check.py` and its notes).

Test with `pytest tests/unit/test_demo_task.py`.
"""

from __future__ import annotations

import random
import re

from datasets import Dataset

FIRST_OPERANDS = range(10, 100)
SECOND_OPERANDS = range(10)
NUM_PROBLEMS = len(FIRST_OPERANDS) * len(SECOND_OPERANDS)
# The longest answer is "108" (3 chars); a completion needs one more token for EOS.
MAX_ANSWER_CHARS = 3
_ANSWER_RE = re.compile(r"\s*(\d+)\s*")


def format_prompt(a: int, b: int) -> str:
    """The prompt text for `a + b`."""
    return f"{a}+{b}="


def make_example(rng: random.Random) -> dict:
    """One random problem: `{"prompt": "37+5=", "answer": "42"}`."""
    a = rng.choice(FIRST_OPERANDS)
    b = rng.choice(SECOND_OPERANDS)
    return {"prompt": format_prompt(a, b), "answer": str(a + b)}


def _all_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in FIRST_OPERANDS for b in SECOND_OPERANDS]


def _to_dataset(pairs: list[tuple[int, int]]) -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [format_prompt(a, b) for a, b in pairs],
            "answer": [str(a + b) for a, b in pairs],
            # Which teacher grades the example in the multi-teacher demo recipe (MOPD).
            "route": ["even" if (a + b) % 2 == 0 else "odd" for a, b in pairs],
        }
    )


def build_splits(num_train: int, num_eval: int, seed: int) -> tuple[Dataset, Dataset]:
    """Train and held-out datasets (columns `prompt`, `answer`) with disjoint prompts.

    The held-out set is the first `num_eval` pairs of a seeded shuffle of all 900 problems;
    the train set is the next `num_train`, so both are deterministic in `seed` and never overlap.
    """
    if num_train + num_eval > NUM_PROBLEMS:
        raise ValueError(f"num_train + num_eval must be <= {NUM_PROBLEMS} (distinct problems)")
    pairs = _all_pairs()
    random.Random(seed).shuffle(pairs)
    eval_pairs = pairs[:num_eval]
    train_pairs = pairs[num_eval : num_eval + num_train]
    return _to_dataset(train_pairs), _to_dataset(eval_pairs)


def build_dataset(num_examples: int, seed: int) -> Dataset:
    """`num_examples` distinct problems from a seeded shuffle (the train split of `build_splits`
    with no held-out part); use `build_splits` when a held-out set is needed."""
    return build_splits(num_examples, 0, seed)[0]


def extract_answer(completion: str) -> str | None:
    """The integer a completion states, or None if it is not a bare number.

    Accepts surrounding whitespace; anything else (letters, a second number, an empty string)
    is malformed. The digits are returned as written, so "082" does not match "82".
    """
    match = _ANSWER_RE.fullmatch(completion)
    return None if match is None else match.group(1)


def accuracy_reward(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """TRL reward function: 1.0 where `extract_answer(completion) == answer`, else 0.0."""
    del kwargs  # TRL passes the other dataset columns and trainer state; not needed here.
    return [
        1.0 if extract_answer(completion) == str(ref).strip() else 0.0
        for completion, ref in zip(completions, answer, strict=True)
    ]
