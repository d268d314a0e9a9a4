"""Outcome rewards for math prompts, usable as TRL reward functions.

Contract (TRL's reward-function signature): `fn(completions, **columns) -> list[float | None]`,
one value per completion. A completion is a string or a conversational list of messages
(`[{"role": "assistant", "content": "..."}]`); dataset columns arrive as keyword lists aligned
with `completions`. `None` means "unscorable" (TRL skips it), used when the gold answer cannot be
parsed, so a bad dataset row never reads as a wrong answer.

The answer rule, shared by both rewards: a completion's final answer is either a `\\boxed{...}`
or a `#### value` line (GSM8K's convention). Free text such as "the answer is 72" earns nothing:
a model trained on these rewards must learn to mark its answer.

Parsing and equivalence come from math-verify (`parse`/`verify`). Its timeouts use
`signal.alarm`, which raises in any thread but the main one, and TRL may call reward functions
from a worker thread; so every call here disables them (`parsing_timeout=None`,
`timeout_seconds=None`). The price: a pathological expression is not interrupted.

Test: `pytest tests/unit/test_rewards.py`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

ANSWER_MARK = "####"
_BOXED_RE = re.compile(r"\\boxed\s*\{\s*[^\s}]")  # a non-empty \boxed{...}
# A bare value with any of these is LaTeX ("2\sqrt{2}", "x^2", "(1, 2)"); math-verify only reads
# LaTeX inside delimiters and would otherwise grab the first number ("2\sqrt{2}" -> 2).
_LATEX_HINT_RE = re.compile(r"[\\^_{}()\[\]]")
# \boxed{} first and no anchorless LaTeX: in a worked solution every `$x = 3$` is a candidate.
_BOXED_CONFIG = (LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False),)
_LATEX_CONFIG = (LatexExtractionConfig(),)
# LaTeX, then plain expressions: reads "72", "1,000", "1/2", "0.5" and "$18".
_TEXT_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def math_accuracy_reward(
    completions: list, answer: list | None = None, solution: list | None = None, **kwargs
) -> list[float | None]:
    """1.0 when the completion's final answer equals the gold answer, else 0.0.

    Args:
        completions: strings or conversational message lists, one per sample.
        answer: gold answers (GSM8K "... #### 72", a `\\boxed{}` solution or a bare value);
            preferred over `solution` when a dataset has both, as it is the short form.
        solution: the gold column under its other common name (MATH, TRL's `accuracy_reward`).
        **kwargs: the other dataset columns and trainer extras, ignored.

    Returns:
        One reward per completion: 1.0 or 0.0, or None where the gold answer cannot be parsed.
    """
    golds = answer if answer is not None else solution
    if golds is None:
        raise ValueError(
            "math_accuracy_reward needs the gold answer as a dataset column named 'answer' or "
            f"'solution'; got columns {sorted(kwargs)}."
        )
    rewards: list[float | None] = []
    for completion, gold_text in zip(completions, golds, strict=True):
        gold = _extract_gold(gold_text)
        if not gold:
            rewards.append(None)
            continue
        predicted = _extract_completion_answer(_completion_text(completion))
        rewards.append(1.0 if predicted and verify(gold, predicted, timeout_seconds=None) else 0.0)
    return rewards


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 when the completion marks exactly one final answer, else 0.0.

    The rule: count the non-empty `\\boxed{...}` plus the `####` followed by a value on the same
    line; the count must be 1. A `\\boxed{}` written as the value of a `####` line
    ("#### \\boxed{72}") is that line's marker, not a second one. No marker, an empty one
    ("####" alone, `\\boxed{}`), or two answers (a hedge) all score 0.0.
    """
    return [float(_count_answer_markers(_completion_text(c)) == 1) for c in completions]


def _completion_text(completion: str | list[dict]) -> str:
    """The text of a completion: the string itself, or the last message's content.

    TRL passes conversational completions as a list of messages; the answer is in the last one
    (earlier ones, if any, are tool calls and results). A message with no content reads as "".
    """
    if isinstance(completion, str):
        return completion
    return completion[-1].get("content") or ""


def _extract_gold(gold_text: object) -> list:
    """The parsed gold answer: the value after `####` if present, else the whole text.

    Non-string golds (an int column) are read as their decimal text; `None` is unparsable.
    Returns math-verify's parse (sympy object + string), empty when nothing parses.
    """
    if gold_text is None:
        return []
    text = str(gold_text)
    if ANSWER_MARK in text:
        return _parse_value(_marked_value(text))
    if "\\boxed" in text:
        return _parse(text, _BOXED_CONFIG)
    return _parse_value(text)


def _extract_completion_answer(text: str) -> list:
    """The parsed final answer of a completion: the last `####` line's value, else its `\\boxed{}`.

    `####` wins when both appear. Several `\\boxed{}` are read by math-verify as one set
    ("\\boxed{3} ... \\boxed{5}" -> {3, 5}), so a hedged answer does not equal a single gold value.
    Without either marker the answer is empty (reward 0.0), even if the text states a value.
    """
    if ANSWER_MARK in text:
        return _parse_value(_marked_value(text))
    if "\\boxed" in text:
        return _parse(text, _BOXED_CONFIG)
    return []


def _marked_value(text: str) -> str:
    """The rest of the line after the last `####` ("" when nothing follows on that line)."""
    after = text.rsplit(ANSWER_MARK, 1)[1]
    return after.split("\n", 1)[0].strip()


def _parse_value(value: str) -> list:
    """Parse a value given on its own ("72", "1,000", "\\frac{1}{2}", "2\\sqrt{2}", "\\boxed{5}").

    Delimited or boxed text is parsed as is. Otherwise LaTeX-looking text is wrapped in `$...$`,
    since math-verify reads bare LaTeX only partly ("3\\pi" -> 3); plain text is parsed as an
    expression, which reads numbers with thousands separators and leaves prose unparsed (empty).
    """
    if not value:
        return []
    if "$" in value or "\\boxed" in value:
        return _parse(value, _TEXT_CONFIG)
    if _LATEX_HINT_RE.search(value):
        return _parse(f"${value}$", _LATEX_CONFIG)
    return _parse(value, _TEXT_CONFIG)


def _parse(text: str, config: Sequence) -> list:
    """math-verify's `parse` with its signal-based timeout off (see the module docstring)."""
    # math-verify annotates `parsing_timeout: int` but documents and handles None (no timeout).
    return parse(text, extraction_config=list(config), parsing_timeout=None)  # pyright: ignore[reportArgumentType]


def _count_answer_markers(text: str) -> int:
    """How many final-answer markers `text` has (the rule is in `format_reward`)."""
    count = 0
    for line in text.splitlines():
        head, *values = line.split(ANSWER_MARK)
        count += len(_BOXED_RE.findall(head))
        count += sum(1 for value in values if value.strip())
    return count
