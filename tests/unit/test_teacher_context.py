"""Privileged teacher prompts (OPSD): templating, checks, and TRL-identical tokenization."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from trl import GRPOTrainer

from opd.demo.tiny import build_char_tokenizer
from opd.teacher.context import teacher_prompt, teacher_prompt_ids
from opd.trainer.methods import MethodMixin

TEMPLATE = "{prompt} hint: {context}"
CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "1+1=?"},
    {"role": "assistant", "content": "2"},
    {"role": "user", "content": "2+2=?"},
]
# A minimal chat template over the tiny tokenizer's alphabet (it ships none); the `think` kwarg
# shows that chat_template_kwargs reach the template.
CHAT_TEMPLATE = (
    "{% for m in messages %}#{{ m.role }}: {{ m.content }}.{% endfor %}"
    "{% if add_generation_prompt %}#assistant:{% if think %} think{% endif %}{% endif %}"
)


def _tokenizer(chat: bool = False):
    tokenizer = build_char_tokenizer()
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _char_ids(tokenizer, text: str) -> list[int]:
    """The char tokenizer's ids spelled out one character at a time (independent of encode)."""
    return tokenizer.convert_tokens_to_ids(list(text))


def _trainer(tokenizer, **render):
    """A namespace standing in for the trainer: what `privileged_prompt_ids` and TRL's
    `GRPOTrainer._tokenize_prompts` read (a real trainer needs a model, data and rewards)."""
    return SimpleNamespace(
        args=SimpleNamespace(teacher_context_column="solution", teacher_context_template=TEMPLATE),
        processing_class=tokenizer,
        _is_vlm=False,
        environment_factories=None,
        **{"tools": None, "chat_template": None, "chat_template_kwargs": {}, **render},
    )


def test_string_prompt_is_filled():
    assert teacher_prompt("2+2=?", "4", TEMPLATE) == "2+2=? hint: 4"


def test_chat_prompt_changes_only_the_last_user_message():
    before = [dict(message) for message in CHAT]
    messages = teacher_prompt(CHAT, "4", TEMPLATE)
    assert messages[:3] == CHAT[:3]
    assert messages[3] == {"role": "user", "content": "2+2=? hint: 4"}
    assert before == CHAT  # the student's prompt is not modified


def test_chat_prompt_without_a_user_message_raises():
    with pytest.raises(ValueError, match="no user message"):
        teacher_prompt([{"role": "system", "content": "be brief"}], "4", TEMPLATE)


@pytest.mark.parametrize(
    ("template", "missing"),
    [("{prompt} only", "context"), ("{context} only", "prompt"), ("no fields", "prompt")],
)
def test_template_needs_both_placeholders(template, missing):
    with pytest.raises(
        ValueError, match=rf"\{{prompt\}} and \{{context\}}.*missing: .*'{missing}'"
    ):
        teacher_prompt("x", "y", template)


def test_template_with_another_placeholder_raises():
    with pytest.raises(ValueError, match=r"unknown: \['answer'\]"):
        teacher_prompt("x", "y", "{prompt} {context} {answer}")


def test_string_prompt_ids_are_the_tokenizers_encoding():
    tokenizer = _tokenizer()
    ids = teacher_prompt_ids(["2+2=?", "3*3=?"], ["4", "9"], TEMPLATE, tokenizer)
    assert ids == [
        _char_ids(tokenizer, "2+2=? hint: 4"),
        _char_ids(tokenizer, "3*3=? hint: 9"),
    ]
    assert ids[0] == tokenizer("2+2=? hint: 4")["input_ids"]


@pytest.mark.parametrize("think", [False, True])
def test_chat_prompt_ids_are_the_rendered_chat(think):
    tokenizer = _tokenizer(chat=True)
    ids = teacher_prompt_ids(
        [CHAT], ["4"], TEMPLATE, tokenizer, chat_template_kwargs={"think": think}
    )
    text = "#system: be brief.#user: 1+1=?.#assistant: 2.#user: 2+2=? hint: 4.#assistant:"
    text += " think" if think else ""
    assert ids == [_char_ids(tokenizer, text)]
    assert ids[0] == tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("chat", [False, True])
def test_ids_equal_trl_tokenizing_the_teacher_prompt(chat):
    """Against TRL's own `GRPOTrainer._tokenize_prompts` on the expected teacher prompts (the
    trainer is `_trainer`'s namespace). If a TRL upgrade changes how prompts are tokenized, this
    test fails."""
    tokenizer = _tokenizer(chat=chat)
    prompts = [CHAT, CHAT] if chat else ["2+2=?", "3*3=?"]
    kwargs = {"think": True} if chat else {}
    trainer = _trainer(tokenizer, chat_template_kwargs=kwargs)
    expected = [teacher_prompt(p, c, TEMPLATE) for p, c in zip(prompts, ["4", "9"], strict=True)]
    trl_ids, _, _ = GRPOTrainer._tokenize_prompts(trainer, expected)
    ids = teacher_prompt_ids(prompts, ["4", "9"], TEMPLATE, tokenizer, chat_template_kwargs=kwargs)
    assert ids == [list(row) for row in trl_ids]
    assert ids[0] != ids[1]


def test_prompts_and_contexts_must_pair_up():
    with pytest.raises(ValueError, match="2 prompts but 1 contexts"):
        teacher_prompt_ids(["a", "b"], ["c"], TEMPLATE, _tokenizer())


# The trainer's own template (GRPOConfig has no field for it; TRL sets it for tool training): it
# renders the tools and the `think` kwarg, so each of the three render inputs changes the ids.
TRAINER_TEMPLATE = "{% if tools %}#tools: {{ tools | length }}.{% endif %}" + CHAT_TEMPLATE
TOOL = {"type": "function", "function": {"name": "add", "description": "a", "parameters": {}}}


@pytest.mark.parametrize(
    "render",
    [
        {"chat_template_kwargs": {"think": True}},
        {"chat_template_kwargs": {"think": False}},
        {"tools": [TOOL], "chat_template": TRAINER_TEMPLATE, "chat_template_kwargs": {"think": 1}},
    ],
)
def test_trainer_renders_teacher_prompt_like_trls_student_prompt(render):
    """The OPSD teacher prompt gets the trainer's chat_template_kwargs, tools and chat_template:
    it equals TRL's rendering of the teacher messages, and shares the student prompt's rendered
    head (system turn, tools) and generation prompt (the `think` flag)."""
    tokenizer = _tokenizer(chat=True)
    trainer = _trainer(tokenizer, **render)
    inputs = [{"prompt": CHAT, "solution": "4"}]
    ids = MethodMixin.privileged_prompt_ids(trainer, inputs)
    teacher_messages = teacher_prompt(CHAT, "4", TEMPLATE)
    assert ids == [list(GRPOTrainer._tokenize_prompts(trainer, [teacher_messages])[0][0])]
    student = list(GRPOTrainer._tokenize_prompts(trainer, [CHAT])[0][0])
    head = "#tools: 1." if render.get("tools") else ""
    head += "#system: be brief.#user: 1+1=?.#assistant: 2.#user: 2+2=?"
    tail = ".#assistant:" + (" think" if render["chat_template_kwargs"]["think"] else "")
    for row in (student, ids[0]):
        assert row[: len(head)] == _char_ids(tokenizer, head)
        assert row[-len(tail) :] == _char_ids(tokenizer, tail)
    assert ids[0][len(head) : -len(tail)] == _char_ids(tokenizer, " hint: 4")


def test_teacher_context_with_environment_factories_is_refused():
    trainer = _trainer(_tokenizer(chat=True))
    trainer.environment_factories = {None: object}
    with pytest.raises(ValueError, match="environment_factory is not supported"):
        MethodMixin.privileged_prompt_ids(trainer, [{"prompt": CHAT, "solution": "4"}])
