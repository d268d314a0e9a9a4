"""Unit tests of the outcome rewards (`opd.rewards`) on hand-written completions and golds.

Real math-verify, no model: `pytest tests/unit/test_rewards.py`.
"""

from __future__ import annotations

import logging
import threading

import pytest

from opd import rewards
from opd.rewards import build_reward_funcs, format_reward, math_accuracy_reward


def _accuracy(completion, gold: str, column: str = "answer") -> float | None:
    """The reward of one completion against one gold answer given in `column`."""
    return math_accuracy_reward([completion], **{column: [gold]})[0]


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        # \boxed{} answers against a GSM8K gold.
        (r"So she has 72 apples. The answer is \boxed{72}.", "48 + 24 = 72\n#### 72", 1.0),
        (r"So she has 73 apples. \boxed{73}", "48 + 24 = 72\n#### 72", 0.0),
        # `####` answers: the last `####` line counts, not earlier numbers nor a later boxed.
        ("First 10, then 5 more.\n#### 15", "#### 15", 1.0),
        ("First 10, then 5 more.\n#### 16", "#### 15", 0.0),
        ("#### 3\nWait, recount.\n#### 15", "#### 15", 1.0),
        ("#### 15\nAlso \\boxed{16}", "#### 15", 1.0),
        ("#### \\boxed{15}", "#### 15", 1.0),
        ("#### $18", "#### 18", 1.0),
        # Equivalent forms.
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        ("#### 1/2", r"\frac{1}{2}", 1.0),
        (r"\boxed{1000}", "#### 1,000", 1.0),
        ("#### 1,000", "1000", 1.0),
        (r"\boxed{1{,}000}", "1,000", 1.0),
        ("#### 1,000", "#### 1001", 0.0),
        # Bare LaTeX gold is read whole: "2\sqrt{2}" is not 2, and "3\pi" is not 3.
        (r"\boxed{2\sqrt{2}}", r"2\sqrt{2}", 1.0),
        (r"\boxed{2}", r"2\sqrt{2}", 0.0),
        (r"\boxed{3}", r"3\pi", 0.0),
        # No marker: a stated value earns nothing; an empty `####` line neither.
        ("The answer is 72.", "72", 0.0),
        ("The final answer is $72$", "72", 0.0),
        ("####\n72", "72", 0.0),
        # Two boxed answers are read as a set, so a hedge never equals the single gold value.
        (r"\boxed{3} or maybe \boxed{5}", "5", 0.0),
    ],
)
def test_math_accuracy_hand_made(completion, gold, expected):
    assert _accuracy(completion, gold) == expected


def test_conversational_completion_uses_the_last_message():
    completions = [
        [{"role": "assistant", "content": r"It is \boxed{42}."}],
        [{"role": "assistant", "content": r"It is \boxed{41}."}],
        [
            {"role": "assistant", "content": r"Let me call a tool. \boxed{1}"},
            {"role": "assistant", "content": "#### 42"},
        ],
    ]
    assert math_accuracy_reward(completions, answer=["42", "42", "42"]) == [1.0, 0.0, 1.0]


def test_gold_from_solution_column_with_boxed():
    # A MATH-style worked solution: earlier inline maths ($x = 3$) must not be taken as the gold.
    solution = r"We have $x = 3$, so $2x + 1 = 7$ and the answer is $\boxed{\frac{7}{2}}$."
    completions = [r"\boxed{3.5}", r"\boxed{3}", r"\boxed{7}"]
    rewards = math_accuracy_reward(completions, solution=[solution] * 3, prompts=["p"] * 3)
    assert rewards == [1.0, 0.0, 0.0]


def test_answer_column_wins_over_solution():
    rewards = math_accuracy_reward([r"\boxed{5}"], answer=["5"], solution=[r"\boxed{6}"])
    assert rewards == [1.0]


def test_missing_gold_column_raises_naming_the_columns():
    with pytest.raises(ValueError, match=r"'answer' or 'solution'.*\['prompts'\]"):
        math_accuracy_reward([r"\boxed{1}"], prompts=["1+0="])


def test_unparsable_gold_is_none_not_zero():
    completions = [r"\boxed{1}", r"\boxed{1}", r"\boxed{1}", r"\boxed{1}"]
    golds = ["no answer here", "#### ", "", None]
    assert math_accuracy_reward(completions, answer=golds) == [None, None, None, None]


def test_integer_gold_column():
    assert math_accuracy_reward(["#### 72", "#### 7"], answer=[72, 72]) == [1.0, 0.0]


def test_lengths_must_match():
    with pytest.raises(ValueError):
        math_accuracy_reward([r"\boxed{1}", r"\boxed{2}"], answer=["1"])


def test_math_accuracy_from_a_worker_thread():
    """math-verify's default timeouts use signal.alarm, which raises outside the main thread;
    TRL may score rewards in a worker thread, so this must return real values there."""
    results: dict[str, object] = {}

    def score() -> None:
        try:
            results["rewards"] = math_accuracy_reward(
                [r"\boxed{\frac{1}{2}}", "#### 3", r"\boxed{4}"],
                answer=["#### 0.5", "#### 4", "not a number"],
            )
        except Exception as error:  # reported by the assert below, with its message
            results["error"] = error

    worker = threading.Thread(target=score)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert "error" not in results, results.get("error")
    assert results["rewards"] == [1.0, 0.0, None]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (r"Adding gives \boxed{72}.", 1.0),
        ("Adding gives 72.\n#### 72", 1.0),
        ("#### \\boxed{72}", 1.0),  # the boxed value of a `####` line is that line's marker
        ([{"role": "assistant", "content": "#### 72"}], 1.0),
        ("Adding gives 72.", 0.0),  # no marker
        (r"The answer is \boxed{} maybe", 0.0),  # empty boxed
        ("####\n72", 0.0),  # `####` with no value on its line
        (r"\boxed{72} or \boxed{73}", 0.0),  # two boxed
        ("\\boxed{72}\n#### 72", 0.0),  # boxed and a `####` line
        ("#### 72\n#### 73", 0.0),  # two `####` lines
    ],
)
def test_format_reward(completion, expected):
    assert format_reward([completion]) == [expected]


def test_build_reward_funcs_maps_names_to_the_functions():
    assert build_reward_funcs(["math_accuracy", "format"]) == [math_accuracy_reward, format_reward]


@pytest.fixture
def unmarked_warning_armed(monkeypatch):
    """The once-per-process warning not yet shown, whatever ran earlier in this process."""
    monkeypatch.setattr(rewards, "_unmarked_warning_shown", False)


@pytest.mark.usefixtures("unmarked_warning_armed")
def test_warns_once_when_most_answers_are_unmarked(caplog):
    unmarked = ["The answer is 72.", "It is 72", r"\boxed{72}"]  # 2 of 3 without a marker
    with caplog.at_level(logging.WARNING, logger="opd.rewards"):
        assert math_accuracy_reward(unmarked, answer=["72"] * 3) == [0.0, 0.0, 1.0]
        math_accuracy_reward(unmarked, answer=["72"] * 3)  # later steps: no repeat
    [record] = [r for r in caplog.records if r.name == "opd.rewards"]
    message = record.getMessage()
    assert message.startswith("opd rewards: 2 of 3 completions have no final-answer marker")
    assert r"(\boxed{...} or a '#### value' line)" in message
    assert "--dataset_prompt_template '{prompt} Put the final answer in \\boxed{}.'" in message
    assert "--dataset_system_prompt" in message and "\n" not in message


@pytest.mark.usefixtures("unmarked_warning_armed")
def test_no_warning_when_half_or_more_are_marked(caplog):
    half = ["The answer is 72.", "#### 72", r"\boxed{71}", "72"]  # 2 of 4: not more than half
    conversational = [[{"role": "assistant", "content": "#### 72"}], "72"]
    with caplog.at_level(logging.WARNING, logger="opd.rewards"):
        math_accuracy_reward(half, answer=["72"] * 4)
        math_accuracy_reward(conversational, answer=["72"] * 2)
    assert [r for r in caplog.records if r.name == "opd.rewards"] == []
    assert not rewards._unmarked_warning_shown
