"""The `opd` command: the only argv parser, and one error and exit-code policy for every command.

    opd distill [--config recipe.yaml] [--field value ...]   (no --config: the embedded demo)
    opd sft [--config recipe.yaml] [--sft_output_dir DIR] [--sft_max_steps N] ...  (then distill)
    opd rollout --model_name_or_path M --dataset_name D --output_dir OUT
    opd teacher serve --model M [--backend transformers|vllm] [--port 8000]
    opd teacher precompute --rollouts DIR --teacher_mode ... --output_dir OUT
    opd eval --model_name_or_path M --dataset_name D --output_dir OUT  (--teacher_...: side by side)
    opd report RUN_DIR [--output_dir DIR]                     (default DIR: RUN_DIR/report)

Each command is a module of `opd.commands` with its `<Module>Arguments` dataclass (distill adds
the trainer's) and `run(...)`.
`opd distill` is parsed the TRL way (`TrlParser`: YAML values become defaults, flags override
them); the others with transformers' `HfArgumentParser` (`--a_b` and `--a-b`, `--help`). Unknown
keys and wrong types fail with a message that names the field.

Exit codes: 0 done; 2 bad input the user can fix (arguments, config, data, models: one line
`opd <command>: error: ...`); 1 a teacher that stayed unreachable or refused requests (one line
that says what was kept and how to resume). Any other exception is a bug and keeps its traceback,
as do these with a command's `--debug`.

Test: `pytest tests/integration/test_cli.py tests/unit/test_config.py`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import Any, NamedTuple

DESCRIPTION = "opd: on-policy distillation of language models (vLLM + teacher + TRL)."


class Command(NamedTuple):
    """One `opd` command, known without importing it (the top-level help stays fast)."""

    module: str  # in opd.commands
    help: str  # one line, for `opd --help`
    extra_types: tuple[str, ...] = ()  # dataclasses parsed after `<Module>Arguments`

    def argument_types(self) -> tuple[str, ...]:
        """The names of the arguments dataclasses, in parsing order."""
        return (f"{self.module.capitalize()}Arguments", *self.extra_types)


COMMANDS = {
    "distill": Command("distill", "Train a student on its own samples, scored per token by a "
                       "teacher (default: the embedded CPU demo).",
                       extra_types=("OPDConfig", "StudentModelConfig")),
    "sft": Command("sft", "Fine-tune the student on a recipe's expert traces (TRL SFTTrainer): "
                   "stage 1 of SFT -> OPD, then opd distill from its output."),
    "rollout": Command("rollout", "Sample completions for a prompt dataset with the student "
                       "(vLLM), once, to shards."),
    "teacher serve": Command("serve", "Serve a teacher's per-token scores over HTTP "
                             "(transformers or vLLM backend)."),
    "teacher precompute": Command("precompute", "Score a rollout set with a teacher and write "
                                  "parquet shards (offline OPD)."),
    "eval": Command("eval", "Sample and grade a dataset with vLLM: mean@n, pass@k, length, "
                    "truncation (student and teacher side by side)."),
    "report": Command("report", "Plot a run's logged metrics as PNGs plus one HTML page "
                      "(RUN_DIR/report)."),
}  # fmt: skip
BAD_INPUT, TEACHER_STOPPED = 2, 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(top_level_help())
        return 0
    name, rest = argv[0], argv[1:]
    if name == "teacher":
        if not rest or rest[0] not in ("serve", "precompute"):
            print("opd teacher: choose `opd teacher serve` or `opd teacher precompute` "
                  "(add --help for their options).", file=sys.stderr)  # fmt: skip
            return BAD_INPUT
        name, rest = f"teacher {rest[0]}", rest[1:]
    if name not in COMMANDS:
        print(f"opd: unknown command {name!r}.\n\n{top_level_help()}", file=sys.stderr)
        return BAD_INPUT
    return run_command(name, rest)


def run_logged(argv: list[str], log_path: str | Path) -> None:
    """`opd ARGV` in this process with its console output in `log_path` (scripts that chain
    several jobs, e.g. `scripts/experiments/`); a RuntimeError with the log's tail on failure."""
    import contextlib

    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(log_path, "w") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"opd {' '.join(argv)} exited {code}:\n{log_path.read_text()[-3000:]}")


def run_command(name: str, argv: list[str]) -> int:
    """Parse `argv` for command `name` and run it, under the one exit-code policy."""
    from opd.arguments import ConfigError
    from opd.teacher.http import (
        TeacherRequestError,
        TeacherStoppedError,
        TeacherUnavailableError,
    )

    teacher_errors = (TeacherUnavailableError, TeacherRequestError, TeacherStoppedError)
    prog = f"opd {name}"
    quiet_known_warnings()
    command = import_module(f"opd.commands.{COMMANDS[name].module}")
    try:
        parsed = parse(name, command, argv)
    except SystemExit as exit_:  # --help (0), or argparse's own usage error (2, printed)
        return int(exit_.code or 0)
    except (ValueError, FileNotFoundError) as error:  # unknown keys, bad values or combinations
        print(f"{prog}: error: {error}", file=sys.stderr)
        return BAD_INPUT
    try:
        command.run(*parsed)
    except (ConfigError, *teacher_errors) as error:
        if getattr(parsed[0], "debug", False):  # a command's --debug: the traceback, for a report
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        # Bad data or models found at start-up: 2; a teacher that stopped: 1. Others keep traces.
        return BAD_INPUT if isinstance(error, ConfigError) else TEACHER_STOPPED
    return 0


def parse(name: str, command, argv: list[str]) -> tuple[Any, ...]:
    """The command's arguments dataclasses, filled from `argv` (and a recipe for distill)."""
    known = COMMANDS[name]
    types = tuple(_argument_type(command, type_name) for type_name in known.argument_types())
    description = getattr(command, "DESCRIPTION", known.help)
    positional = getattr(command, "POSITIONAL", None)
    if positional and argv and not argv[0].startswith("-"):  # `opd report RUN_DIR`
        argv = [f"--{positional}", *argv]
    if name == "distill":
        from opd.commands.recipe import parse_distill

        return parse_distill(types, argv, description)
    from transformers import HfArgumentParser

    # transformers types dataclass_types as a NewType that no dataclass matches for pyright.
    parser = HfArgumentParser(types, prog=f"opd {name}", description=description)  # pyright: ignore[reportArgumentType]
    return tuple(parser.parse_args_into_dataclasses(argv))


def _argument_type(command, type_name: str) -> type:
    if hasattr(command, type_name):
        return getattr(command, type_name)
    from opd import config  # OPDConfig: shared by distill and the trainer

    return getattr(config, type_name)


def top_level_help() -> str:
    lines = [DESCRIPTION, "", "usage: opd <command> [options]", "", "commands:"]
    lines += [f"  {name:19} {command.help}" for name, command in COMMANDS.items()]
    lines += ["", "Run `opd <command> --help` for the fields of a command."]
    return "\n".join(lines)


def quiet_known_warnings() -> None:
    """Silence warnings that repeat on every run and that a user cannot act on.

    TRL warns six times that vLLM 0.32 is outside its tested range (opd's tests run that pair);
    torch warns that pin_memory has no effect without a GPU at every generation step.
    """
    import warnings

    warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")
    warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true")
    warnings.filterwarnings("ignore", message=".*torch.distributed.reduce_op.* is deprecated")


def command_runner(name: str) -> Callable[[list[str]], int]:
    """`argv -> exit code` for one command (tests call a command without its name)."""
    return lambda argv: run_command(name, list(argv))


if __name__ == "__main__":
    raise SystemExit(main())
