"""Unit tests of the demo's synthetic task (`opd.demo.task`): answers, grading, splits, tokens.

Fast (no model): `pytest tests/unit/test_demo_task.py`.
"""

from __future__ import annotations

import random

import pytest

from opd.demo import task
from opd.demo.tiny import build_char_tokenizer


@pytest.mark.parametrize(
    ("a", "b", "prompt", "answer"),
    [
        (37, 5, "37+5=", "42"),
        (10, 0, "10+0=", "10"),
        (99, 9, "99+9=", "108"),
        (45, 5, "45+5=", "50"),
    ],
)
def test_hand_made_examples(a, b, prompt, answer):
    assert task.format_prompt(a, b) == prompt
    train, held_out = task.build_splits(task.NUM_PROBLEMS, 0, seed=0)
    by_prompt = dict(zip(train["prompt"], train["answer"], strict=True))
    assert by_prompt[prompt] == answer
    assert len(held_out) == 0


def test_make_example_is_a_correct_sum_and_seeded():
    rng = random.Random(3)
    examples = [task.make_example(rng) for _ in range(200)]
    for example in examples:
        a, b = example["prompt"].removesuffix("=").split("+")
        assert 10 <= int(a) <= 99 and 0 <= int(b) <= 9
        assert example["answer"] == str(int(a) + int(b))
    rng = random.Random(3)
    assert examples == [task.make_example(rng) for _ in range(200)]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("42", "42"),
        (" 42 ", "42"),
        ("108", "108"),
        ("082", "082"),
        ("", None),
        ("   ", None),
        ("4 2", None),
        ("42+1", None),
        ("x42", None),
        ("42abc", None),
        ("-42", None),
    ],
)
def test_extract_answer(completion, expected):
    assert task.extract_answer(completion) == expected


def test_accuracy_reward_grades_each_completion():
    completions = ["42", "43", "", "4x", " 108", "082"]
    answers = ["42", "42", "42", "4", "108", "82"]
    rewards = task.accuracy_reward(completions, answers, prompt=["ignored"] * 6)
    assert rewards == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_accuracy_reward_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        task.accuracy_reward(["42"], ["42", "43"])


def test_splits_are_disjoint_deterministic_and_sized():
    train, held_out = task.build_splits(700, 200, seed=0)
    assert (len(train), len(held_out)) == (700, 200)
    assert len(set(train["prompt"])) == 700
    assert set(train["prompt"]).isdisjoint(held_out["prompt"])
    again_train, again_held_out = task.build_splits(700, 200, seed=0)
    assert again_train["prompt"] == train["prompt"]
    assert again_held_out["prompt"] == held_out["prompt"]
    other_train, other_held_out = task.build_splits(700, 200, seed=1)
    assert other_held_out["prompt"] != held_out["prompt"]
    assert set(other_train["prompt"]).isdisjoint(other_held_out["prompt"])


def test_splits_reject_more_problems_than_exist():
    with pytest.raises(ValueError, match="900"):
        task.build_splits(800, 200, seed=0)


def test_build_dataset_rows_are_correct_sums():
    dataset = task.build_dataset(50, seed=4)
    assert dataset.column_names == ["prompt", "answer", "route"]
    assert len(set(dataset["prompt"])) == 50
    for prompt, answer in zip(dataset["prompt"], dataset["answer"], strict=True):
        a, b = prompt.removesuffix("=").split("+")
        assert answer == str(int(a) + int(b))


def test_prompts_round_trip_through_the_tokenizer_without_special_tokens():
    tokenizer = build_char_tokenizer()
    train, held_out = task.build_splits(100, 20, seed=0)
    for prompt in [*train["prompt"], *held_out["prompt"]]:
        ids = tokenizer(prompt)["input_ids"]
        # One token per character and no <bos>/<eos>: the prompt is exactly what the model sees.
        assert len(ids) == len(prompt) == 5
        special_ids = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
        assert not set(ids) & special_ids
        assert tokenizer.decode(ids) == prompt
    answer_ids = [*tokenizer("108")["input_ids"], tokenizer.eos_token_id]
    assert tokenizer.decode(answer_ids, skip_special_tokens=True) == "108"
    assert len(answer_ids) == task.MAX_ANSWER_CHARS + 1
