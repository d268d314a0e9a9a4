"""`--bf16 true` alone on a machine without a GPU: opd sets `use_cpu` (transformers would refuse
bf16 otherwise) and says so in one line; with a GPU the choice stays transformers'. A whole
`opd distill --bf16 true` step on the CPU: `tests/integration/test_bf16_cpu.py`.
"""

from __future__ import annotations

import pytest
import torch

import opd.config
from opd.config import OPDConfig

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only case")
SWITCH_LINE = "opd: bf16 with no GPU: training on the CPU (use_cpu set to true).\n"


def _config(tmp_path, **overrides) -> OPDConfig:
    fields = {"output_dir": str(tmp_path), "teacher_model_name_or_path": "t", "report_to": "none"}
    return OPDConfig(**{**fields, **overrides})


def test_bf16_without_a_gpu_trains_on_the_cpu(tmp_path, capsys):
    config = _config(tmp_path, bf16=True)
    assert config.bf16 and config.use_cpu
    assert capsys.readouterr().out == SWITCH_LINE


def test_fp32_and_an_explicit_use_cpu_are_left_alone(tmp_path, capsys):
    assert not _config(tmp_path, bf16=False).use_cpu
    assert _config(tmp_path, bf16=True, use_cpu=True).use_cpu
    assert capsys.readouterr().out == ""  # nothing switched, nothing said


def test_with_an_accelerator_the_bf16_check_stays_transformers(tmp_path, monkeypatch):
    """A GPU cannot be had here: the probe is made to report one. opd must then not move the run
    to the CPU, so transformers' own check runs and (this machine having none) refuses bf16."""
    monkeypatch.setattr(opd.config, "_accelerator_available", lambda: True)
    with pytest.raises(ValueError, match="doesn't support bf16/gpu"):
        _config(tmp_path, bf16=True)
