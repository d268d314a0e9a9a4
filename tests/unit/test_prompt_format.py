"""Dataset system prompt and prompt template (`opd/data.py`, `PromptFormat`): the prompt rows for
text and chat datasets, the errors, and one set of prompt ids for distill, rollout and eval.

Real parts: jsonl files in tmp_path loaded by `PromptDataArguments.load_prompts` /
`load_eval_dataset`, the tiny character tokenizer with a small chat template, and TRL's own
`GRPOTrainer._tokenize_prompts` (what `opd distill` encodes with) against `encode_prompt` (what
`opd rollout` and `opd eval` encode with).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from trl import GRPOTrainer

from opd.cli import main
from opd.commands.distill import DistillArguments
from opd.commands.eval import EvalArguments, load_eval_dataset
from opd.commands.rollout import RolloutArguments, load_prompts, teacher_prompts
from opd.config import ConfigError
from opd.data import PromptFormat
from opd.demo.tiny import build_char_tokenizer
from opd.prompts import encode_prompt

SYSTEM = "be brief."
TEMPLATE = "{prompt} put the answer in \\boxed{}."
# A minimal chat template over the tiny tokenizer's alphabet (it ships none).
CHAT_TEMPLATE = (
    "{% for m in messages %}#{{ m.role }}: {{ m.content }}.{% endfor %}"
    "{% if add_generation_prompt %}#assistant:{% endif %}"
)
TEXT_ROWS = [
    {"prompt": "1+1=?", "answer": "2", "hint": "two. 1+1=?"},
    {"prompt": "2+3=?", "answer": "5", "hint": "five. 2+3=?"},
]
CHAT_ROWS = [
    {"prompt": [{"role": "user", "content": "1+1=?"}], "answer": "2"},
    {
        "prompt": [
            {"role": "user", "content": "2+2=?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 2+3=?"},
        ],
        "answer": "5",
    },
]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _dataset_fields(data: str, **fields) -> dict:
    """The same dataset_* fields, for every command's arguments."""
    return {"dataset_name": data, "dataset_system_prompt": SYSTEM,
            "dataset_prompt_template": TEMPLATE, **fields}  # fmt: skip


def _distill_prompts(**fields):
    """The prompts `opd distill` trains on, for these `DistillArguments` fields."""
    return DistillArguments(**fields).load_prompts("train")


def _chat_tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_text_prompts_get_the_template_and_become_chat_with_a_system_prompt(tmp_path):
    data = _jsonl(tmp_path / "text.jsonl", TEXT_ROWS)
    only_template = _distill_prompts(**_dataset_fields(data, dataset_system_prompt=None))
    assert only_template["prompt"] == [
        "1+1=? put the answer in \\boxed{}.",
        "2+3=? put the answer in \\boxed{}.",
    ]
    assert only_template["answer"] == ["2", "5"]  # the other columns are kept
    with_system = _distill_prompts(**_dataset_fields(data))
    assert with_system["prompt"][1] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "2+3=? put the answer in \\boxed{}."},
    ]
    as_chat = _distill_prompts(
        **_dataset_fields(data, dataset_system_prompt=None, dataset_prompt_template=None),
        dataset_chat_template=True,
    )
    assert as_chat["prompt"][0] == [{"role": "user", "content": "1+1=?"}]


def test_chat_prompts_get_the_system_prompt_first_and_the_template_in_the_last_user_turn(
    tmp_path,
):
    data = _jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    dataset = _distill_prompts(**_dataset_fields(data))
    assert dataset["prompt"] == [
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "1+1=? put the answer in \\boxed{}."},
        ],
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "2+2=?"},  # earlier turns are kept as they are
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 2+3=? put the answer in \\boxed{}."},
        ],
    ]


def test_no_format_leaves_the_rows_as_loaded(tmp_path):
    data = _jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    assert _distill_prompts(dataset_name=data)["prompt"] == [row["prompt"] for row in CHAT_ROWS]


@pytest.mark.parametrize(
    ("prompt_format", "prompt", "message"),
    [
        (
            {"template": "Put the final answer in \\boxed{}."},
            "1+1=?",
            r"dataset_prompt_template=.* has no \{prompt\} placeholder",
        ),
        (
            {"system_prompt": SYSTEM},
            [{"role": "system", "content": "x"}, {"role": "user", "content": "1+1=?"}],
            "already open with a system message",
        ),
        (
            {"template": "{prompt}!"},
            [{"role": "system", "content": "x"}],
            "needs a text user message in each chat prompt",
        ),
    ],
)
def test_format_errors(prompt_format, prompt, message):
    with pytest.raises(ConfigError, match=message):
        PromptFormat(**prompt_format).apply(prompt)


def test_system_prompt_needs_a_chat_template(tmp_path):
    tokenizer = build_char_tokenizer()  # no chat template
    prompt = PromptFormat(system_prompt=SYSTEM).apply("1+1=?")
    with pytest.raises(ConfigError, match="dataset_system_prompt unset") as raised:
        encode_prompt(tokenizer, prompt)
    assert "has no chat template" in str(raised.value)


def test_cli_refuses_a_template_without_placeholder_at_parse_time(tmp_path, capsys):
    args = ["distill", "--dataset_prompt_template", "Answer in \\boxed{}.", "--dry_run", "true",
            "--output_dir", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 2
    assert "opd distill: error: dataset_prompt_template=" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("rows", [TEXT_ROWS, CHAT_ROWS], ids=["text", "chat"])
def test_distill_rollout_and_eval_see_the_same_prompt_ids(tmp_path, rows):
    """The same dataset_* fields give the same ids whichever command loads them: distill's
    prompts through TRL's tokenization, rollout's and eval's through `encode_prompt`.

    A namespace stands in for the trainer in `GRPOTrainer._tokenize_prompts` (a real trainer
    needs a model, data and rewards); it carries exactly the attributes that method reads.
    """
    data = _jsonl(tmp_path / "data.jsonl", rows)
    fields = _dataset_fields(data)
    tokenizer = _chat_tokenizer()
    trainer = SimpleNamespace(
        _is_vlm=False, environment_factories=None, processing_class=tokenizer, tools=None,
        chat_template=None, chat_template_kwargs={},
    )  # fmt: skip
    distill_prompts = list(_distill_prompts(**fields)["prompt"])
    distill_ids = [list(ids) for ids in GRPOTrainer._tokenize_prompts(trainer, distill_prompts)[0]]

    rollout_args = RolloutArguments(model_name_or_path="m", output_dir="unused", **fields)
    rollout_ids = [encode_prompt(tokenizer, p) for p in load_prompts(rollout_args)["prompt"]]
    eval_args = EvalArguments(
        model_name_or_path="m", output_dir="unused", dataset_split="train", **fields
    )
    eval_ids = [encode_prompt(tokenizer, p) for p in load_eval_dataset(eval_args)["prompt"]]

    assert rollout_ids == distill_ids == eval_ids
    # ... and spell the formatted prompt: the system turn first, the template in the last
    # user turn (the char tokenizer adds no special tokens; \, { and } read as <pad>)
    history, question = (
        ("#user: 2+2=?.#assistant: 4.", "and 2+3=?") if rows is CHAT_ROWS else ("", "2+3=?")
    )
    formatted = (
        f"#system: be brief..{history}#user: {question} put the answer in \\boxed{{}}..#assistant:"
    )
    assert distill_ids[1] == tokenizer(formatted)["input_ids"]


def test_rollout_teacher_prompts_get_the_same_format(tmp_path):
    """A privileged teacher prompt (OPSD) is shaped like the student's: system prompt, template."""
    data = _jsonl(tmp_path / "text.jsonl", TEXT_ROWS)
    args = RolloutArguments(
        model_name_or_path="m", output_dir="unused", teacher_prompt_column="hint",
        **_dataset_fields(data),
    )  # fmt: skip
    tokenizer = _chat_tokenizer()
    expected = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "two. 1+1=? put the answer in \\boxed{}."},
    ]
    ids = teacher_prompts(args, load_prompts(args), tokenizer)
    assert ids is not None and ids[0] == encode_prompt(tokenizer, expected)
