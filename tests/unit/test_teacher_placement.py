"""The in-process teacher's precision and placement (`teacher_dtype`, `teacher_device_map`,
`teacher_model_init_kwargs`), on a real tiny teacher loaded from disk.

Run: `pytest tests/unit/test_teacher_placement.py`.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from opd.config import OPDConfig
from opd.teacher.build import build_teacher, resolve_teacher_dtype
from opd.types import RolloutBatch

BATCH = RolloutBatch(
    prompt_ids=[[4, 13, 5, 16], [6, 13, 7, 16]],
    completion_ids_BT=torch.tensor([[8, 10, 2], [9, 2, 0]]),
    completion_mask_BT=torch.tensor([[1, 1, 1], [1, 1, 0]]),
    sampler_logprobs_BT=None,
    policy_version=0,
)


def _teacher(tiny_teacher, **fields):
    args = OPDConfig(
        output_dir="unused", teacher_model_name_or_path=str(tiny_teacher), report_to="none",
        **fields,
    )  # fmt: skip
    return build_teacher(args)  # the tokenizer check has its own tests


def test_bf16_teacher_loads_in_bf16_and_scores_near_fp32(tiny_teacher, capsys):
    fp32 = _teacher(tiny_teacher)  # 'auto' without bf16/fp16: float32
    bf16 = _teacher(tiny_teacher, teacher_dtype="bfloat16")
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    mask = BATCH.completion_mask_BT.bool()
    fp32_N = fp32.score(BATCH, top_k=4).sampled_logprobs_BT[mask]
    bf16_N = bf16.score(BATCH, top_k=4).sampled_logprobs_BT[mask]
    gap = (fp32_N - bf16_N).abs().max().item()
    assert 0 < gap < 0.1  # bf16 arithmetic really ran, and stays close to fp32
    # The load is logged once per teacher with its parameter memory (half of fp32's in bf16).
    lines = re.findall(
        r"opd: teacher \S+ loaded in (\w+) on (\S+): ([\d.]+) MiB", capsys.readouterr().out
    )
    assert [(dtype, device) for dtype, device, _ in lines] == [
        ("float32", "cpu"),
        ("bfloat16", "cpu"),
    ]
    fp32_mib = sum(p.numel() * 4 for p in fp32.model.parameters()) / 2**20
    assert float(lines[0][2]) == pytest.approx(fp32_mib, abs=0.1)
    assert float(lines[1][2]) == pytest.approx(fp32_mib / 2, abs=0.1)


@pytest.mark.parametrize("device_map", ["cpu", '{"": "cpu"}', "auto"])
def test_device_map_and_init_kwargs_reach_from_pretrained(tiny_teacher, monkeypatch, device_map):
    """transformers 5 records no `hf_device_map` for a one-device map, so a spy around the real
    `from_pretrained` checks what it was given; the loaded teacher then runs on that device."""
    from transformers import AutoModelForCausalLM

    calls = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    teacher = _teacher(
        tiny_teacher, teacher_device_map=device_map,
        teacher_model_init_kwargs='{"attn_implementation": "eager"}',
    )  # fmt: skip
    expected = {"": "cpu"} if device_map.startswith("{") else device_map
    assert calls[-1]["device_map"] == expected and calls[-1]["dtype"] == torch.float32
    assert teacher.model.config._attn_implementation == "eager"
    assert {p.device.type for p in teacher.model.parameters()} == {"cpu"}
    assert teacher.score(BATCH).sampled_logprobs_BT.isfinite().all()


@pytest.mark.parametrize(
    ("bf16", "fp16", "name", "expected"),
    [
        (True, False, "auto", torch.bfloat16),
        (False, True, "auto", torch.float16),
        (False, False, "auto", torch.float32),
        (True, False, "float32", torch.float32),
        (False, False, "float16", torch.float16),
    ],
)
def test_auto_teacher_dtype_follows_the_student_precision(bf16, fp16, name, expected):
    args = SimpleNamespace(bf16=bf16, fp16=fp16, teacher_dtype=name)
    assert resolve_teacher_dtype(args) == expected
