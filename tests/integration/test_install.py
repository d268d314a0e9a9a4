"""Packaging: `kernels/` ships as `opd.kernels`, never as a top-level `kernels` package.

`kernels` is the import name of Hugging Face's `kernels` library (transformers may import it), so
the folder is mapped with setuptools' `package-dir`. These tests install a copy of the project
with pip, regularly and editable, into throwaway venvs and import it from a neutral folder (from
the repo root the `kernels/` folder itself would be importable, which proves nothing):

- `import opd.kernels` works and comes from the install (regular) or from the source (editable);
- `import kernels` fails, or finds something other than this project (e.g. HF's library);
- the explicit package list in pyproject.toml names every package folder under `opd/` and
  `kernels/`, so a new subpackage cannot silently go missing from the wheel.

Speed: the venvs reuse the current interpreter's installed dependencies through a `.pth` line
(`pip install --no-deps --no-build-isolation --no-index`), so no download and ~15 s in all.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Printed by a `python -c` in the throwaway venv, from a folder that holds no `kernels/`.
PROBE = textwrap.dedent(
    """
    import json, sys
    import opd, opd.kernels
    assert callable(opd.kernels.use_triton) and isinstance(opd.kernels.TRITON_AVAILABLE, bool)
    try:
        import kernels
        kernels_file = kernels.__file__ or repr(kernels.__path__)
    except ModuleNotFoundError:
        kernels_file = None
    print(json.dumps({
        "opd": opd.__file__,
        "opd.kernels": opd.kernels.__file__,
        "kernels": kernels_file,
        "prefix": sys.prefix,
    }))
    """
)


def _host_site_dirs() -> list[str]:
    """Where the current interpreter's dependencies (torch, triton, ...) are installed."""
    paths = sysconfig.get_paths()
    dirs = [*site.getsitepackages(), paths["purelib"], paths["platlib"]]
    return list(dict.fromkeys(d for d in dirs if Path(d).is_dir()))


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OPD_KERNELS")}
    env.update(PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _run(args: list[str], cwd: Path) -> str:
    result = subprocess.run(
        args, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, (
        f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


def _copy_project(dest: Path) -> Path:
    """What a clone holds that the build reads; a copy, so builds leave nothing in the repo."""
    dest.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("opd", "kernels"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    return dest


def _make_venv(path: Path) -> tuple[Path, Path]:
    """A bare venv that sees the current interpreter's packages (a plain path in a `.pth` adds
    the folder to sys.path without running that folder's own `.pth` files, so an editable opd
    installed there stays inactive)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site_dir = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], path
        ).strip()
    )
    (site_dir / "_opd_test_host_deps.pth").write_text("\n".join(_host_site_dirs()) + "\n")
    return python, site_dir


def _install(tmp_path: Path, editable: bool) -> tuple[dict[str, str | None], Path, Path]:
    src = _copy_project(tmp_path / "src")
    python, site_dir = _make_venv(tmp_path / "venv")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install"]
    pip += ["--no-deps", "--no-build-isolation", "--no-index", "--quiet"]
    _run([*pip, *(["-e"] if editable else []), str(src)], cwd=tmp_path)
    probe = json.loads(_run([str(python), "-c", PROBE], cwd=tmp_path).strip().splitlines()[-1])
    assert Path(probe["prefix"]) == tmp_path / "venv", "the probe ran outside the throwaway venv"
    return probe, src, site_dir


def _source_files(folder: Path) -> set[Path]:
    return {
        f
        for f in folder.rglob("*")
        if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"
    }


def _assert_no_top_level_kernels(probe: dict[str, str | None], src: Path, site_dir: Path) -> None:
    assert not (site_dir / "kernels").exists(), "the install put a top-level `kernels` package"
    if probe["kernels"] is not None:  # e.g. Hugging Face's `kernels`, if installed
        ours = {src / "kernels", ROOT / "kernels", site_dir / "kernels", site_dir / "opd/kernels"}
        found = Path(probe["kernels"]).resolve().parent
        assert found not in ours, f"`import kernels` found this project's folder: {found}"


def test_regular_install_ships_kernels_as_opd_kernels(tmp_path: Path) -> None:
    probe, src, site_dir = _install(tmp_path, editable=False)
    assert probe["opd"] == str(site_dir / "opd" / "__init__.py")
    assert probe["opd.kernels"] == str(site_dir / "opd" / "kernels" / "__init__.py")
    _assert_no_top_level_kernels(probe, src, site_dir)

    # Every source file ships (py.typed, the demo's YAML, ...), each at its mapped place.
    expected = {Path("opd", f.relative_to(src / "opd")) for f in _source_files(src / "opd")}
    expected |= {
        Path("opd/kernels", f.relative_to(src / "kernels")) for f in _source_files(src / "kernels")
    }
    installed = {f.relative_to(site_dir) for f in _source_files(site_dir / "opd")}
    assert Path("opd/py.typed") in expected
    missing = sorted(map(str, expected - installed))
    assert not missing, (
        f"left out of the wheel (see packages and package-data in pyproject.toml): {missing}"
    )


def test_editable_install_maps_kernels_folder_to_opd_kernels(tmp_path: Path) -> None:
    probe, src, site_dir = _install(tmp_path, editable=True)
    assert probe["opd"] == str(src / "opd" / "__init__.py")
    assert probe["opd.kernels"] == str(src / "kernels" / "__init__.py")
    _assert_no_top_level_kernels(probe, src, site_dir)

    # Editable means live: a kernel file added after the install imports without reinstalling.
    (src / "kernels" / "added_after_install.py").write_text("VALUE = 42\n")
    python = tmp_path / "venv" / "bin" / "python"
    code = "from opd.kernels.added_after_install import VALUE; print(VALUE)"
    assert _run([str(python), "-c", code], cwd=tmp_path).strip() == "42"


def _package_folders(folder: Path, name: str) -> set[str]:
    """`name` plus a dotted name for every folder below `folder` that holds a .py file."""
    found = {name}
    for path in folder.rglob("*.py"):
        parts = path.parent.relative_to(folder).parts
        if parts and "__pycache__" not in parts:
            found.add(".".join((name, *parts)))
    return found


def test_pyproject_lists_every_package_and_maps_kernels() -> None:
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools_cfg["package-dir"] == {"opd": "opd", "opd.kernels": "kernels"}
    listed = set(setuptools_cfg["packages"])
    assert not any(p == "kernels" or p.startswith("kernels.") for p in listed)
    on_disk = _package_folders(ROOT / "opd", "opd") | _package_folders(
        ROOT / "kernels", "opd.kernels"
    )
    missing = on_disk - listed
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {missing}"
    stale = {p for p in listed - on_disk if not _package_dir(p).is_dir()}
    assert not stale, f"pyproject.toml lists packages with no folder: {stale}"


def _package_dir(package: str) -> Path:
    if package == "opd.kernels" or package.startswith("opd.kernels."):
        return ROOT / "kernels" / Path(*package.split(".")[2:])
    return ROOT / Path(*package.split("."))
