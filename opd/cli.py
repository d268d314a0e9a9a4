"""The `opd` command: thin dispatch to the stage entry points.

    opd distill [--config recipe.yaml] [--field value ...]   (no --config: the embedded demo)
    opd rollout --model_name_or_path M --dataset_name D --output_dir OUT
    opd teacher serve --model M [--backend transformers|vllm] [--port 8000]
    opd teacher precompute --rollouts DIR --teacher_mode ... --output_dir OUT
    opd eval --model_name_or_path M --dataset_name D --output_dir OUT  (--teacher_...: side by side)
    opd report RUN_DIR [--output_dir DIR]                     (default DIR: RUN_DIR/report)

Arguments are parsed the TRL way (`TrlParser`): YAML values become defaults, flags override them,
unknown keys and wrong types fail with a message that names the field.
"""

from __future__ import annotations

import sys
from importlib import resources

DESCRIPTION = "opd: on-policy distillation of language models (vLLM + teacher + TRL)."
COMMANDS = {
    "distill": "Train a student on its own samples, scored per token by a teacher (default: "
    "the embedded CPU demo).",
    "rollout": "Sample completions for a prompt dataset with the student (vLLM), once, to shards.",
    "teacher serve": "Serve a teacher's per-token scores over HTTP (transformers or vLLM backend).",
    "teacher precompute": "Score a rollout set with a teacher and write parquet shards (offline "
    "OPD).",
    "eval": "Sample and grade a dataset with vLLM: mean@n, pass@k, length, truncation (student "
    "and teacher side by side).",
    "report": "Plot a run's logged metrics as PNGs plus one HTML page (RUN_DIR/report).",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(top_level_help())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "distill":
        return distill_main(rest)
    if command == "rollout":
        from opd.rollout.job import rollout_main

        return rollout_main(rest)
    if command == "eval":
        from opd.evaluation.job import eval_main

        return eval_main(rest)
    if command == "report":
        from opd.report.write import report_main

        return report_main(rest)
    if command == "teacher":
        if not rest or rest[0] not in ("serve", "precompute"):
            print("opd teacher: choose `opd teacher serve` or `opd teacher precompute` "
                  "(add --help for their options).", file=sys.stderr)  # fmt: skip
            return 2
        if rest[0] == "serve":
            from opd.teacher.serve import serve_main

            return serve_main(rest[1:])
        from opd.teacher.precompute import precompute_main

        return precompute_main(rest[1:])
    print(f"opd: unknown command {command!r}.\n\n{top_level_help()}", file=sys.stderr)
    return 2


def top_level_help() -> str:
    lines = [DESCRIPTION, "", "usage: opd <command> [options]", "", "commands:"]
    lines += [f"  {name:19} {text}" for name, text in COMMANDS.items()]
    lines += ["", "Run `opd <command> --help` for the fields of a command."]
    return "\n".join(lines)


def default_demo_config() -> str:
    return str(resources.files("opd.demo") / "default.yaml")


def quiet_known_warnings() -> None:
    """Silence warnings that repeat on every run and that a user cannot act on.

    TRL warns six times that vLLM 0.32 is outside its tested range (opd's tests run that pair);
    torch warns that pin_memory has no effect without a GPU at every generation step.
    """
    import warnings

    warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions")
    warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true")
    warnings.filterwarnings("ignore", message=".*torch.distributed.reduce_op.* is deprecated")


def distill_main(argv: list[str]) -> int:
    quiet_known_warnings()
    from trl import TrlParser

    from opd.config import ConfigError, OPDConfig
    from opd.distill import DistillArguments, StudentModelConfig, run_distill

    dataclass_types = (DistillArguments, OPDConfig, StudentModelConfig)
    parser = TrlParser(
        dataclass_types,
        prog="opd distill",
        description=COMMANDS["distill"] + " Options: --config RECIPE.yaml (values become the "
        "defaults; without it the embedded demo recipe is used) then any --field value below.",
    )
    if "--config" not in argv:  # the embedded demo is the default recipe (also for --help)
        argv = ["--config", default_demo_config(), *argv]
    try:
        check_yaml_keys(argv[argv.index("--config") + 1], dataclass_types)
        script_args, config, model_args = parser.parse_args_and_config(argv)
    except (ValueError, FileNotFoundError) as error:  # unknown keys, bad values, bad combinations
        print(f"opd distill: error: {error}", file=sys.stderr)
        return 2
    from opd.teacher.http import TeacherRequestError, TeacherUnavailableError

    try:
        run_distill(script_args, config, model_args)
    except ConfigError as error:  # bad data or models found at start-up; other errors keep traces
        print(f"opd distill: error: {error}", file=sys.stderr)
        return 2
    except (TeacherUnavailableError, TeacherRequestError) as error:  # the message says what to do
        print(f"opd distill: error: {error}", file=sys.stderr)
        return 1
    return 0


def run_dataclass_command(arguments_type, run, argv: list[str], *, prog: str, description: str):
    """Parse `argv` into `arguments_type` (HfArgumentParser: `--help`, `--a_b`/`--a-b`) and
    `run(args)`; a `ConfigError` is printed as `prog: error: ...` with exit code 2."""
    from transformers import HfArgumentParser

    from opd.config import ConfigError

    # transformers types dataclass_types as a NewType that no dataclass matches for pyright.
    parser = HfArgumentParser([arguments_type], prog=prog, description=description)  # pyright: ignore[reportArgumentType]
    try:
        (args,) = parser.parse_args_into_dataclasses(argv)
        run(args)
    except ConfigError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


def check_yaml_keys(path: str, dataclass_types: tuple[type, ...]) -> None:
    """Fail on a YAML key that no dataclass field takes, suggesting the closest field name.

    TRL's parser would report it too, but only after validating the rest of the config, so a
    typo in a required field would be reported as that field being missing.
    """
    import dataclasses
    import difflib

    import yaml

    with open(path) as file:
        recipe = yaml.safe_load(file)
    if not isinstance(recipe, dict):
        raise ValueError(f"{path} must hold a YAML mapping of field: value.")
    known = {f.name for cls in dataclass_types for f in dataclasses.fields(cls)} | {"env"}
    for key in recipe:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{path}: unknown field {key!r}{hint}.")


if __name__ == "__main__":
    raise SystemExit(main())
