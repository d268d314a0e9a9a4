"""Prompt datasets for `opd distill`, `opd rollout` and `opd eval`: tasks the repo generates,
files or hub data.

Contract: a `datasets.Dataset` with a `prompt` column (text, or a list of chat messages that TRL
renders with the chat template); any other columns (e.g. `answer`) reach the reward functions.
The `dataset_*` arguments of those commands are one dataclass, `PromptDataArguments`, and the
prompts are shaped here, in one place for every command, by its `PromptFormat` (the
`dataset_prompt_template`, `dataset_system_prompt` and `dataset_chat_template` fields), so
distill, rollout and eval see identical prompts.

Test: `pytest tests/unit/test_prompt_format.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opd.arguments import ConfigError, help_field

if TYPE_CHECKING:  # `datasets` loads only with the prompts, not for `--help` or parsing
    from datasets import Dataset

DEMO_DATASET = "demo:arithmetic"
WORD_PROBLEMS = "demo:word_problems"  # the real-model recipe's task (opd/demo/word_problems.py)
DEMO_DATASETS = (DEMO_DATASET, WORD_PROBLEMS)
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
PROMPT_PLACEHOLDER = "{prompt}"
DATASET_NAME_HELP = (
    "Prompts: a .jsonl/.json/.parquet/.csv file, a hub name, or a task opd generates "
    "('demo:arithmetic', 'demo:word_problems'; their 'test' split is held out)."
)

Prompt = str | list[dict[str, Any]]


@dataclass(frozen=True)
class PromptFormat:
    """How a dataset's prompts are shown to the model.

    `template` wraps the question text (`{prompt}` is replaced; other braces are kept as
    written, so "{prompt} Put the final answer in \\boxed{}." works). `system_prompt` (or
    `as_chat`) turns a text prompt into chat messages, `[system?, user]`, rendered with the chat
    template. In a chat prompt the template fills the last user message (the question the
    completion answers) and the system prompt is put first.
    """

    as_chat: bool = False
    system_prompt: str | None = None
    template: str | None = None

    def __post_init__(self):
        if self.template is not None and PROMPT_PLACEHOLDER not in self.template:
            raise ConfigError(
                f"dataset_prompt_template={self.template!r} has no {PROMPT_PLACEHOLDER} "
                "placeholder for the dataset's prompt; add one, e.g. "
                "'{prompt} Put the final answer in \\boxed{}.'"
            )

    @property
    def changes_prompts(self) -> bool:
        return self.as_chat or bool(self.system_prompt) or self.template is not None

    def apply(self, prompt: Prompt) -> Prompt:
        """The prompt the model sees; `prompt` (text or messages) is not modified."""
        if isinstance(prompt, str):
            text = self._fill(prompt)
            if not (self.as_chat or self.system_prompt):
                return text
            messages = [{"role": "user", "content": text}]
        else:
            messages = self._fill_last_user_message(prompt)
        if not self.system_prompt:
            return messages
        if messages and messages[0]["role"] == "system":
            raise ConfigError(
                "dataset_system_prompt is set but the dataset's prompts already open with a "
                "system message; unset one of them."
            )
        return [{"role": "system", "content": self.system_prompt}, *messages]

    def _fill(self, text: str) -> str:
        return text if self.template is None else self.template.replace(PROMPT_PLACEHOLDER, text)

    def _fill_last_user_message(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        messages = [dict(message) for message in messages]
        if self.template is None:
            return messages
        user_turns = [i for i, message in enumerate(messages) if message["role"] == "user"]
        last = messages[user_turns[-1]] if user_turns else {}
        if not isinstance(last.get("content"), str):
            raise ConfigError(
                "dataset_prompt_template needs a text user message in each chat prompt; this "
                f"prompt has none: {messages!r}"
            )
        last["content"] = self._fill(last["content"])
        return messages

    def apply_to(self, dataset: Dataset) -> Dataset:
        if not self.changes_prompts:
            return dataset
        return dataset.map(lambda row: {"prompt": self.apply(row["prompt"])})


def load_prompt_dataset(
    name: str,
    *,
    config: str | None = None,
    split: str = "train",
    prompt_column: str = "prompt",
    as_chat: bool = False,
    system_prompt: str | None = None,
    prompt_template: str | None = None,
) -> Dataset:
    """Load `name` (demo task, local file or hub name) and expose its prompts as `prompt`,
    shaped by `PromptFormat(as_chat, system_prompt, prompt_template)`.

    `as_chat` turns each text prompt into a one-message conversation, which TRL renders with the
    student's chat template (what instruct and reasoning models expect).
    """
    from datasets import load_dataset

    prompt_format = PromptFormat(as_chat, system_prompt, prompt_template)  # checked before loading
    if name in DEMO_DATASETS:
        return prompt_format.apply_to(load_demo_dataset(name, split))
    path = Path(name)
    if path.suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise ConfigError(f"dataset_name={name!r}: no such file.")
        if path.stat().st_size == 0:  # `datasets` would fail on it with an unrelated message
            raise ConfigError(f"dataset_name={name!r} is an empty file.")
        dataset = load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    else:
        dataset = load_dataset(name, config, split=split)
    if prompt_column not in dataset.column_names:
        raise ConfigError(
            f"dataset {name!r} has no column {prompt_column!r} (columns: "
            f"{', '.join(dataset.column_names)}); set dataset_prompt_column."
        )
    if prompt_column != "prompt":
        if "prompt" in dataset.column_names:
            dataset = dataset.remove_columns("prompt")
        dataset = dataset.rename_column(prompt_column, "prompt")
    if len(dataset) == 0:
        raise ConfigError(f"dataset {name!r} (split {split!r}) is empty.")
    return prompt_format.apply_to(dataset)


def load_demo_dataset(name: str, split: str) -> Dataset:
    """A dataset the repo generates: its `train` split, or its held-out `test` split."""
    if split not in ("train", "test"):
        raise ConfigError(f"dataset {name!r} has the splits 'train' and 'test', not {split!r}.")
    if name == DEMO_DATASET:
        from opd.demo.pretrain import demo_splits

        train, held_out = demo_splits()
        return held_out if split == "test" else train
    from opd.demo.word_problems import load_word_problems

    return load_word_problems(split)


@dataclass(kw_only=True)
class PromptDataArguments:
    """The `dataset_*` fields that `opd distill`, `opd rollout` and `opd eval` share: which
    prompts, and how the model sees them (`PromptFormat`). Each command's arguments extend it
    with its own split field (`dataset_train_split`, eval's `dataset_split`) and pass it to
    `load_prompts`.

    Keyword-only, so that a command may add required fields (`output_dir`) after these.
    """

    dataset_name: str = help_field(help=DATASET_NAME_HELP)
    dataset_config: str | None = help_field(None, "Hub dataset config.")
    dataset_prompt_column: str = help_field(
        "prompt", "Column holding the prompt (text or chat messages)."
    )
    dataset_chat_template: bool = help_field(
        False, "Wrap each text prompt as a user message (rendered by the chat template)."
    )
    dataset_system_prompt: str | None = help_field(
        None,
        "System message put before each prompt (makes text prompts chat messages, rendered by "
        "the chat template).",
    )
    dataset_prompt_template: str | None = help_field(
        None,
        "Template for each prompt, with a {prompt} placeholder, e.g. "
        "'{prompt} Put the final answer in \\boxed{}.'",
    )

    def __post_init__(self):
        self.prompt_format()  # a bad template fails at parse time, before any loading

    def prompt_format(self) -> PromptFormat:
        return PromptFormat(
            as_chat=self.dataset_chat_template,
            system_prompt=self.dataset_system_prompt,
            template=self.dataset_prompt_template,
        )

    def load_prompts(self, split: str) -> Dataset:
        """`load_prompt_dataset` of these fields and the command's `split`."""
        return load_prompt_dataset(
            self.dataset_name,
            config=self.dataset_config,
            split=split,
            prompt_column=self.dataset_prompt_column,
            as_chat=self.dataset_chat_template,
            system_prompt=self.dataset_system_prompt,
            prompt_template=self.dataset_prompt_template,
        )
