"""The argument helpers every command and stage shares, light enough for any process to import.

`ConfigError` and `help_field` live here rather than in `opd.config` because importing
`opd.config` imports TRL's `GRPOConfig` (and with it transformers' training arguments, peft and
vLLM: ~10 s on 2 CPU cores). `opd teacher serve`, `opd report` and the teacher clients need
neither, and start without paying for it.
"""

from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any


class ConfigError(ValueError):
    """A user-fixable problem with the configuration, the data or the models; the message says
    what to change. The CLI prints it without a traceback."""


def help_field(default: Any = MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with its `--help` text: TRL's `field(default=..., metadata={"help":
    ...})`, which `HfArgumentParser` and `TrlParser` read, in one short call. No default (and no
    `default_factory`): a required field."""
    return field(default=default, metadata={"help": help}, **kwargs)


def check_at_least_one(settings: Any, *names: str) -> None:
    """Each named count of `settings` is >= 1 (None: not set, allowed)."""
    for name in names:
        value = getattr(settings, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}.")
