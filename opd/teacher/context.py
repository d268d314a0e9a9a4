"""Privileged teacher context (OPSD): the teacher reads the prompt plus extra information.

In on-policy self-distillation the teacher is the student itself shown something the student is
not, e.g. a reference solution. The student samples after its own prompt; the teacher scores the
same completion ids after `teacher_prompt(prompt, context, template)`. Its ids go to
`RolloutBatch.teacher_prompt_ids`, tokenized exactly as TRL tokenizes the student's prompt, so
the only difference the teacher sees is the added context, never a formatting artefact.

Test: `pytest tests/unit/test_teacher_context.py`.
"""

from __future__ import annotations

import string
from typing import Any

from trl import is_conversational

Prompt = str | list[dict[str, Any]]
PLACEHOLDERS = ("prompt", "context")


def teacher_prompt(prompt: Prompt, context: str, template: str) -> Prompt:
    """The teacher's version of `prompt`: `template` filled with the prompt and the context.

    A conversational prompt keeps its system turns and earlier history; only the last user
    message, the question the completion answers, gets the context. The input is not modified.
    """
    check_template(template)
    if isinstance(prompt, str):
        return template.format(prompt=prompt, context=context)
    user_turns = [i for i, message in enumerate(prompt) if message["role"] == "user"]
    if not user_turns:
        raise ValueError("the conversational prompt has no user message to add the context to")
    messages = [dict(message) for message in prompt]
    last = messages[user_turns[-1]]
    if not isinstance(last["content"], str):
        raise ValueError(
            f"the last user message's content is {type(last['content']).__name__}; "
            "privileged context needs text content"
        )
    last["content"] = template.format(prompt=last["content"], context=context)
    return messages


def check_template(template: str) -> None:
    """Raise ValueError unless `template` uses exactly the {prompt} and {context} placeholders.

    A template without {context} would silently train on an unprivileged teacher; one with
    another placeholder would fail on the first example, deep inside training.
    """
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    missing = [name for name in PLACEHOLDERS if name not in fields]
    unknown = sorted(fields - set(PLACEHOLDERS))
    if missing or unknown:
        raise ValueError(
            "the teacher context template needs the placeholders {prompt} and {context} "
            f"and no others (missing: {missing}, unknown: {unknown}); write a literal brace "
            "as {{ or }}."
        )


def teacher_prompt_ids(
    prompts: list[Prompt],
    contexts: list[str],
    template: str,
    tokenizer,
    *,
    chat_template_kwargs: dict[str, Any] | None = None,
    tools: list | None = None,
    chat_template: str | None = None,
) -> list[list[int]]:
    """Token ids of each teacher prompt, tokenized the way TRL tokenizes the student's.

    Mirrors `GRPOTrainer._tokenize_prompts` (trl 1.16.0, trl/trainer/grpo_trainer.py:1684-1761):
    the batch is conversational when its first prompt is (`is_conversational`); then one batched
    `apply_chat_template(conversation=..., tools=tools or None, chat_template=...,
    add_generation_prompt=True, tokenize=True, return_dict=True, **chat_template_kwargs)`
    (lines 1737-1746); otherwise `tokenizer(text=prompts)["input_ids"]` (line 1758), which adds
    the tokenizer's special tokens (`add_special_tokens` defaults to True). Pass the trainer's
    `chat_template_kwargs`, `tools` and `chat_template` so both sides render alike.

    Args:
        prompts: the student prompts, all strings or all message lists.
        contexts: the privileged text for each prompt.
        template: a format string with {prompt} and {context}.
        tokenizer: the student's tokenizer (the teacher scores the student's token ids).

    Returns:
        One list of int ids per prompt (ragged).
    """
    if len(prompts) != len(contexts):
        raise ValueError(f"{len(prompts)} prompts but {len(contexts)} contexts")
    if not prompts:
        return []
    texts = [
        teacher_prompt(prompt, context, template)
        for prompt, context in zip(prompts, contexts, strict=True)
    ]
    return rendered_prompt_ids(
        texts, tokenizer, chat_template_kwargs=chat_template_kwargs, tools=tools,
        chat_template=chat_template,
    )  # fmt: skip


def rendered_prompt_ids(
    prompts: list[Prompt],
    tokenizer,
    *,
    chat_template_kwargs: dict[str, Any] | None = None,
    tools: list | None = None,
    chat_template: str | None = None,
) -> list[list[int]]:
    """`prompts` tokenized as TRL tokenizes the student's (see `teacher_prompt_ids`): one
    batched chat template for conversational prompts, else the tokenizer with its special
    tokens. Also a teacher of another tokenizer renders the prompts with it (its own template)."""
    if not prompts:
        return []
    texts = list(prompts)
    if not is_conversational({"prompt": texts[0]}):
        return [list(ids) for ids in tokenizer(text=texts)["input_ids"]]
    encoded = tokenizer.apply_chat_template(
        conversation=texts,
        tools=tools or None,  # as TRL: some templates render tool boilerplate for tools=[]
        chat_template=chat_template,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        **(chat_template_kwargs or {}),
    )
    return [list(ids) for ids in encoded["input_ids"]]
