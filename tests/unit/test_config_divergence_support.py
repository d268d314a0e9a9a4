"""`OPDConfig`'s switches for the divergence supports (teacher, student, union, full) and the
candidate-scoring refusals it raises itself; the trainer's side is in
tests/integration/test_candidate_scores.py."""

from __future__ import annotations

import pytest

from opd import OPDConfig
from opd.arguments import ConfigError


def make_config(tmp_path, **overrides) -> OPDConfig:
    fields = {"output_dir": str(tmp_path), "teacher_model_name_or_path": "t", "report_to": "none"}
    return OPDConfig(**{**fields, **overrides})


@pytest.mark.parametrize(
    ("support", "topk_path", "candidates", "full"),
    [
        ("topk", True, False, False),
        ("student", True, True, False),
        ("union", True, True, False),
        ("full", False, False, True),
    ],
)
def test_support_switches(tmp_path, support, topk_path, candidates, full):
    config = make_config(
        tmp_path, opd_divergence="jsd", opd_divergence_support=support, teacher_top_k=8
    )
    assert config.uses_topk_divergence is topk_path  # the kernel path with ids + tail bucket
    assert config.uses_candidate_divergence is candidates
    assert config.uses_full_divergence is full
    assert config.needs_teacher_topk is topk_path  # K of every top-k support is teacher_top_k
    without = make_config(tmp_path, opd_divergence_support=support, teacher_top_k=8)
    assert not (without.uses_topk_divergence or without.uses_candidate_divergence)


def test_the_top_k_baseline_without_a_top_k_needs_a_full_or_candidate_teacher(tmp_path):
    config = make_config(tmp_path, opd_baseline="topk")
    assert config.needs_full_teacher_distribution
    assert not config.needs_full_teacher_distribution_beyond_candidates
    tip = make_config(tmp_path, tip_rule="q3")  # TIP's JSD on the teacher's top-k: none here
    assert tip.needs_full_teacher_distribution_beyond_candidates


def test_candidate_supports_refuse_a_stock_vllm_teacher_before_contacting_it(tmp_path):
    fields = {"teacher_urls": ["http://127.0.0.1:1"], "teacher_mode": "vllm", "teacher_top_k": 8}
    with pytest.raises(ConfigError, match="vLLM RFC #56860") as refused:
        make_config(
            tmp_path, opd_divergence="reverse_kl", opd_divergence_support="student", **fields
        )
    message = str(refused.value)
    assert "opd teacher serve --backend transformers" in message
    assert "teacher_mode: server" in message
    # the teacher's own top-k is what such a teacher can give
    make_config(tmp_path, opd_divergence="reverse_kl", **fields)
    # offline shards may store hidden states: checked once the teacher is loaded
    make_config(
        tmp_path, teacher_mode="offline", teacher_shards="scores/", teacher_top_k=8,
        opd_divergence="reverse_kl", opd_divergence_support="union",
    )  # fmt: skip


def test_help_texts_name_the_supports_and_the_vllm_limit():
    import dataclasses

    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(OPDConfig)}
    support_help = helps["opd_divergence_support"]
    assert all(f"'{name}'" in support_help for name in ("topk", "student", "union", "full"))
    assert "stock vLLM" in support_help and "stock vLLM" in helps["opd_baseline"]
