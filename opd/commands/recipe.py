"""Reading a recipe: `opd distill`'s parser (TRL's `TrlParser`, YAML values as defaults), shared
with `opd sft`, which reads the same recipe file.

Test: `pytest tests/integration/test_cli.py tests/integration/test_sft_then_opd.py`.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from typing import Any


def parse_distill(types: tuple[type, ...], argv: list[str], description: str) -> tuple[Any, ...]:
    from trl import TrlParser

    parser = TrlParser(
        types,
        prog="opd distill",
        description=description + " Options: --config RECIPE.yaml (values become the defaults; "
        "without it the embedded demo recipe is used) then any --field value below.",
    )
    if "--config" not in argv:  # the embedded demo is the default recipe (also for --help)
        argv = ["--config", default_demo_config(), *argv]
    check_yaml_keys(argv[argv.index("--config") + 1], types)
    return tuple(parser.parse_args_and_config(argv))


def default_demo_config() -> str:
    return str(resources.files("opd.demo") / "default.yaml")


def check_yaml_keys(path: str, dataclass_types: tuple[type, ...]) -> None:
    """Fail on a YAML key that no dataclass field takes, suggesting the closest field name.

    TRL's parser would report it too, but only after validating the rest of the config, so a
    typo in a required field would be reported as that field being missing.
    """
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
