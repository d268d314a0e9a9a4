"""Outcome rewards for math prompts, usable as TRL reward functions, and `--reward_funcs`.

`build_reward_funcs(names)` resolves `opd distill --reward_funcs` as `trl grpo` does: a built-in
name (`BUILTIN_REWARDS`) or an import path `module.function` / `package.module.function`
(importlib; the working directory is searched too, as TRL does). Each function is checked at
start-up against the call TRL makes (`TRL_REWARD_KEYWORDS` plus the dataset columns), so a
wrong path or signature fails in one line before any model loads.

Contract (TRL's reward-function signature): `fn(completions, **columns) -> list[float | None]`,
one value per completion. A completion is a string or a conversational list of messages
(`[{"role": "assistant", "content": "..."}]`); dataset columns arrive as keyword lists aligned
with `completions`. `None` means "unscorable" (TRL skips it), used when the gold answer cannot be
parsed, so a bad dataset row never reads as a wrong answer.

The answer rule, shared by both rewards: a completion's final answer is either a `\\boxed{...}`
or a `#### value` line (GSM8K's convention). Free text such as "the answer is 72" earns nothing:
a model trained on these rewards must learn to mark its answer. When most completions of a call
have no marker, the accuracy reward warns once per process and suggests asking for one in the
prompt (`dataset_prompt_template` / `dataset_system_prompt`).

Parsing and equivalence come from math-verify (`parse`/`verify`). Its timeouts use
`signal.alarm`, which raises in any thread but the main one, and TRL may call reward functions
from a worker thread; so every call here disables them (`parsing_timeout=None`,
`timeout_seconds=None`). The price: a pathological expression is not interrupted. math-verify
warns "Timeout is disabled" for that once per process and module; its two loggers are set to
ERROR here, which hides only that warning: with timeouts off they log nothing else above DEBUG.

Test: `pytest tests/unit/test_rewards.py tests/unit/test_rewards_quiet.py
tests/unit/test_reward_funcs.py tests/integration/test_distill_user_inputs.py`.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from opd.arguments import ConfigError

for _name in ("math_verify.parser", "math_verify.grader"):  # see the module docstring
    logging.getLogger(_name).setLevel(logging.ERROR)

logger = logging.getLogger(__name__)

BUILTIN_REWARDS = ("demo_accuracy", "math_accuracy", "format")
# What TRL's GRPOTrainer passes every reward function by keyword besides the dataset columns
# (trl 1.16.0, GRPOTrainer._calculate_rewards; `environments` only with environment factories,
# which opd does not use).
TRL_REWARD_KEYWORDS = (
    "prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
)  # fmt: skip

ANSWER_MARK = "####"
_unmarked_warning_shown = False  # `warn_if_answers_unmarked` warns once per process
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
    texts = [completion_text(completion) for completion in completions]
    rewards: list[float | None] = []
    for text, gold_text in zip(texts, golds, strict=True):
        gold = _extract_gold(gold_text)
        if not gold:
            rewards.append(None)
            continue
        predicted = _extract_completion_answer(text)
        rewards.append(1.0 if predicted and verify(gold, predicted, timeout_seconds=None) else 0.0)
    warn_if_answers_unmarked(texts)
    return rewards


def warn_if_answers_unmarked(texts: list[str]) -> None:
    """Warn, once per process, when more than half of `texts` have no answer marker.

    Such completions score 0.0 even when they state the right value ("the answer is 72"), which
    reads as a model that cannot solve the task; usually the prompt never asked for a marker.
    """
    global _unmarked_warning_shown
    unmarked = sum(ANSWER_MARK not in text and "\\boxed" not in text for text in texts)
    if unmarked * 2 <= len(texts) or _unmarked_warning_shown:
        return
    _unmarked_warning_shown = True
    logger.warning(
        "opd rewards: %d of %d completions have no final-answer marker (\\boxed{...} or a "
        "'#### value' line), so math_accuracy scores them 0 whatever value they state; ask for "
        "one in the prompt, e.g. --dataset_prompt_template '{prompt} Put the final answer in "
        "\\boxed{}.' or --dataset_system_prompt. (Shown once.)",
        unmarked,
        len(texts),
    )


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 when the completion marks exactly one final answer, else 0.0.

    The rule: count the non-empty `\\boxed{...}` plus the `####` followed by a value on the same
    line; the count must be 1. A `\\boxed{}` written as the value of a `####` line
    ("#### \\boxed{72}") is that line's marker, not a second one. No marker, an empty one
    ("####" alone, `\\boxed{}`), or two answers (a hedge) all score 0.0.
    """
    return [float(_count_answer_markers(completion_text(c)) == 1) for c in completions]


def completion_text(completion: str | list[dict]) -> str:
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


# ------------------------------------------------------------------------------------------------
# `--reward_funcs`: built-in names and import paths
# ------------------------------------------------------------------------------------------------


def build_reward_funcs(
    names: Sequence[str], columns: Sequence[str] | None = None
) -> list[Callable]:
    """The reward functions named by `--reward_funcs`, each checked against TRL's call.

    Args:
        names: built-in names (`BUILTIN_REWARDS`) or import paths (`my_module.my_reward`).
        columns: the dataset columns TRL will pass as keywords (all but `prompt`); None when not
            known yet (start-up), which checks only the keywords TRL always passes.

    Returns:
        The functions, in the order given (TRL logs each as `rewards/<__name__>/mean`).

    Raises:
        ConfigError: an unknown name, a module that does not import, a missing attribute,
            something not callable, or a signature that cannot take TRL's call.
    """
    funcs = []
    for name in names:
        func = _builtin_reward(name) or _imported_reward(name)
        check_reward_signature(func, name, columns)
        funcs.append(func)
    return funcs


def _builtin_reward(name: str) -> Callable | None:
    match name:
        case "demo_accuracy":
            from opd.demo.task import accuracy_reward

            return accuracy_reward
        case "math_accuracy":
            return math_accuracy_reward
        case "format":
            return format_reward
    return None


def _imported_reward(name: str) -> Callable:
    """`module.function` imported as TRL's `trl grpo --reward_funcs` does (scripts/grpo.py)."""
    module_name, _, attribute = name.rpartition(".")
    if not module_name or not attribute:
        raise ConfigError(
            f"reward_funcs: unknown {name!r}; give a built-in ({', '.join(BUILTIN_REWARDS)}) or "
            "an import path such as my_module.my_reward."
        )
    # TRL puts the working directory on the path, so `my_rewards.py` beside the command imports.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # appended: a local file never shadows an installed module
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        # The module itself (or its package) is missing, not something it imports.
        missing = error.name is not None and f"{module_name}.".startswith(f"{error.name}.")
        hint = "; put its folder on PYTHONPATH or run from it" if missing else ""
        raise ConfigError(
            f"reward_funcs: cannot import module {module_name!r} (for {name!r}): {error}{hint}."
        ) from error
    if not hasattr(module, attribute):
        raise ConfigError(f"reward_funcs: module {module_name!r} has no attribute {attribute!r}.")
    func = getattr(module, attribute)
    if not callable(func):
        raise ConfigError(
            f"reward_funcs: {name!r} is a {type(func).__name__}, not a function; TRL calls it as "
            "fn(prompts=..., completions=..., **kwargs)."
        )
    return func


def check_reward_signature(func: Callable, name: str, columns: Sequence[str] | None) -> None:
    """Raise ConfigError unless `func` accepts TRL's reward call by keyword.

    TRL calls `func(prompts=..., completions=..., completion_ids=..., trainer_state=...,
    log_extra=..., log_metric=..., **dataset_columns)`: the function must name each of these or
    take `**kwargs`. With `columns` known, its required parameters must also all be supplied
    (e.g. `answer` must be a dataset column).
    """
    keywords = dict.fromkeys([*TRL_REWARD_KEYWORDS, *(columns or ())])
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # a builtin or C function without one: TRL will call it
        return
    try:
        if columns is None:
            signature.bind_partial(**keywords)
        else:
            signature.bind(**keywords)
    except TypeError as error:
        raise ConfigError(
            f"reward_funcs: {name!r} cannot take TRL's reward call ({error}); TRL passes "
            f"{', '.join(TRL_REWARD_KEYWORDS)} and every dataset column by keyword: define it as "
            f"def {getattr(func, '__name__', 'reward')}(completions, **kwargs) -> list[float]."
        ) from error
