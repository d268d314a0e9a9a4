"""opd: on-policy distillation of language models (vLLM rollouts, teacher scoring, TRL training).

`from opd import OPDConfig, OPDTrainer`. The names are imported lazily so that `opd --help` does
not pay for importing TRL, transformers and vLLM.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import TYPE_CHECKING, Any

__version__ = version("opd")  # one source: pyproject.toml
__all__ = ["OPDConfig", "OPDTrainer", "__version__"]

if TYPE_CHECKING:
    from opd.config import OPDConfig
    from opd.trainer import OPDTrainer


def __getattr__(name: str) -> Any:
    if name == "OPDConfig":
        from opd.config import OPDConfig

        return OPDConfig
    if name == "OPDTrainer":
        from opd.trainer import OPDTrainer

        return OPDTrainer
    raise AttributeError(f"module 'opd' has no attribute {name!r}")
