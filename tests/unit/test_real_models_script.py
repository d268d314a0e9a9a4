"""`scripts/real_models.py`'s arguments: none means both models (the README's form), names pick
models, an unknown name fails naming the choices. Parsing only: nothing is downloaded or built.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from opd.demo.pypi_models import PYPI_MODELS

SCRIPT = Path(__file__).parents[2] / "scripts" / "real_models.py"
SMALL, LARGE = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"


@pytest.fixture(scope="module")
def parse_models():
    spec = importlib.util.spec_from_file_location("real_models", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines functions only: `main` runs under __main__
    return module.parse_models


def test_no_arguments_means_both_models(parse_models):
    assert sorted(PYPI_MODELS) == [SMALL, LARGE]
    assert parse_models([]) == [SMALL, LARGE]


def test_named_models_in_the_order_given(parse_models):
    assert parse_models([LARGE]) == [LARGE]
    assert parse_models([LARGE, SMALL]) == [LARGE, SMALL]


def test_unknown_model_fails_naming_the_choices(parse_models, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_models([SMALL, "qwen3-8b"])
    assert exit_info.value.code == 2
    assert f"unknown model 'qwen3-8b'; choose from {SMALL}, {LARGE}" in capsys.readouterr().err
