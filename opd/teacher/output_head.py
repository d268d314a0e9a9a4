"""The teacher's output head (lm_head weight `[V, H]`) on the wire: served once, cached by hash.

In hidden-state mode a server answers with the teacher's final hidden states (H values per token,
not V logits) and the client applies the teacher's head itself. The head is large (152k x 896
float32: 545 MB), so it travels once: `/info` names its shape, dtype and `sha256`, `GET
/v1/output_head` serves it as a safetensors blob, and the client keeps it in `HeadCache` under
its hash. Every hidden-state answer carries the hash again (`HEAD_HASH_KEY` in its metadata), so
a server restarted with another model mid-run is refused instead of silently mixing heads.

The hash is over the tensor's raw bytes in its served dtype: the same weights in another dtype
are another head.

Test: `pytest tests/integration/test_teacher_hidden.py`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from opd.arguments import ConfigError

HEAD_HASH_KEY = "output_head_sha256"
CACHE_ENV = "OPD_CACHE_DIR"


def head_digest(weight_VH: torch.Tensor) -> str:
    """sha256 of the weight's bytes (row-major, its own dtype)."""
    values = weight_VH.detach().cpu().contiguous()
    return hashlib.sha256(values.view(torch.uint8).numpy().data).hexdigest()


def head_info(weight_VH: torch.Tensor, digest: str) -> dict[str, Any]:
    """What `/info` says of the head: enough to check a cached copy without fetching it."""
    return {
        "shape": list(weight_VH.shape),
        "dtype": str(weight_VH.dtype).removeprefix("torch."),
        "sha256": digest,
    }


def encode_head(weight_VH: torch.Tensor, digest: str) -> bytes:
    values = weight_VH.detach().cpu().contiguous()
    return safetensors_save({"weight": values}, metadata={"sha256": digest})


def decode_head(body: bytes, expected: dict[str, Any], *, source: str) -> torch.Tensor:
    """The head in `body`, refused unless its bytes hash to `expected["sha256"]` (from `/info`)
    and its shape and dtype are the announced ones."""
    try:
        weight_VH = safetensors_load(body)["weight"]
    except Exception as error:
        raise ConfigError(f"{source} is not an output head blob: {error}") from error
    actual = head_info(weight_VH, head_digest(weight_VH))
    if actual != expected:
        raise ConfigError(
            f"the teacher's output head from {source} does not match what its /info announced "
            f"({actual} vs {expected}): the server changed its model while we fetched it, or the "
            "cached copy is corrupt; restart the teacher server and the run."
        )
    return weight_VH


class HeadCache:
    """Output heads on disk by sha256 (`$OPD_CACHE_DIR/teacher_heads`, else
    `~/.cache/opd/teacher_heads`): a run restarted against the same teacher fetches nothing."""

    def __init__(self, directory: str | Path | None = None):
        default = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "opd")
        self.directory = Path(directory) if directory else default / "teacher_heads"

    def path(self, digest: str) -> Path:
        return self.directory / f"{digest}.safetensors"

    def load(self, expected: dict[str, Any]) -> torch.Tensor | None:
        """The cached head with `expected`'s hash, or None (absent, or not what it claims)."""
        path = self.path(expected["sha256"])
        if not path.is_file():
            return None
        try:
            return decode_head(path.read_bytes(), expected, source=str(path))
        except ConfigError:  # a damaged file: fetch again
            path.unlink(missing_ok=True)
            return None

    def store(self, body: bytes, digest: str) -> None:
        """Write atomically: a crash never leaves a half-written head under a valid name."""
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.path(digest).with_suffix(f".{os.getpid()}.partial")
        partial.write_bytes(body)
        partial.replace(self.path(digest))
