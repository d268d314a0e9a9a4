"""The repo's word-problem task: exact golds, disjoint splits, graded by the real math-verify."""

from __future__ import annotations

import re

import pytest

from opd.config import ConfigError
from opd.data import load_prompt_dataset
from opd.demo.word_problems import TEMPLATES, generate_word_problems, load_word_problems
from opd.rewards import math_accuracy_reward


def test_splits_are_deterministic_disjoint_and_cover_every_template():
    train, test = load_word_problems("train"), load_word_problems("test")
    assert len(test) == 200 and 1900 < len(train) <= 2000
    assert not set(train["prompt"]) & set(test["prompt"])
    assert list(load_word_problems("test")["prompt"]) == list(test["prompt"])
    assert set(test["template"]) == set(TEMPLATES)
    assert all(answer.isdigit() for answer in [*train["answer"], *test["answer"]])


@pytest.mark.parametrize(
    ("template", "draws", "shown", "expected"),
    [
        # 4 boxes x 6 items x $3 = 72
        ("shop", (4, 6, 3), (4, 6, 3), 72),
        # 5 friends, 7 each, 3 kept: the text shows 5 x 7 + 3 = 38 items; each friend gets 7
        ("share", (5, 7, 3), (38, 3, 5), 7),
        # 20 + 4 a day x 5 days - 6 lost = 34
        ("collect", (20, 4, 5, 6), (20, 5, 4, 6), 34),
    ],
)
def test_answer_is_the_arithmetic_of_the_numbers_in_the_text(template, draws, shown, expected):
    class Scripted:  # stands in for random.Random: randint returns the given draws in order
        def __init__(self, values):
            self.values = list(values)

        def randint(self, low, high):
            return self.values.pop(0)

        def choice(self, options):
            return options[0]

    text, answer = TEMPLATES[template](Scripted(draws))
    assert answer == expected
    assert [int(number) for number in re.findall(r"\d+", text)] == list(shown)


def test_every_generated_gold_is_verified_by_math_verify():
    rows = generate_word_problems(60, seed=3)
    right = [f"... so the answer is \\boxed{{{row['answer']}}}." for row in rows]
    wrong = [f"\\boxed{{{int(row['answer']) + 1}}}" for row in rows]
    answers = [row["answer"] for row in rows]
    assert math_accuracy_reward(right, answer=answers) == [1.0] * len(rows)
    assert math_accuracy_reward(wrong, answer=answers) == [0.0] * len(rows)


def test_dataset_names_and_splits_through_opd_data():
    test = load_prompt_dataset("demo:word_problems", split="test", as_chat=True)
    assert test[0]["prompt"][0]["role"] == "user"
    assert "\\boxed{N}" in test[0]["prompt"][0]["content"]
    assert len(load_prompt_dataset("demo:arithmetic", split="test")) == 200
    with pytest.raises(ConfigError, match="splits 'train' and 'test'"):
        load_prompt_dataset("demo:word_problems", split="validation")
