"""The METHODS.md s.11 fields of `OPDConfig` (MOPD, prefix-guided rollouts, TRACE) fail early,
in one line naming the field to change.

Test: `pytest tests/unit/test_config_guidance.py`.
"""

from __future__ import annotations

import pytest

from opd import OPDConfig
from opd.arguments import ConfigError
from opd.trainer.build import check_trainer_args
from opd.trainer.guidance import _load_annotator
from opd.types import PeerContext, PrefixGate, PrefixPlacement

BASE = {"output_dir": "/tmp/opd-config-guidance", "teacher_mode": "self"}
TRACE = {"trace_annotator": "divergence", "opd_divergence": "forward_kl"}


def test_switches_parse_into_their_enums_and_properties():
    config = OPDConfig(mopd_peers="contrastive", opd_prefix_column="solution",
                       opd_prefix_placement="completion", opd_prefix_gate="failed",
                       **TRACE, **BASE)  # fmt: skip
    assert config.mopd_peers == PeerContext.CONTRASTIVE and config.uses_mopd
    assert config.opd_prefix_placement == PrefixPlacement.COMPLETION and config.uses_prefix
    assert config.opd_prefix_gate == PrefixGate.FAILED and config.uses_trace_routing
    assert config.reads_correctness == ["mopd_peers", "opd_prefix_gate", "trace_annotator"]
    plain = OPDConfig(**BASE)
    assert not (plain.uses_mopd or plain.uses_prefix or plain.uses_trace_routing)
    assert plain.reads_correctness == []


def test_methods_that_read_correctness_need_a_verifier():
    for fields in ({"mopd_peers": "successes"}, TRACE,
                   {"opd_prefix_column": "s", "opd_prefix_gate": "failed"},
                   {"opd_prefix_rollouts": "/tmp/rollouts"}):  # fmt: skip
        config = OPDConfig(**fields, **BASE)
        with pytest.raises(ConfigError, match="pass reward_funcs"):
            check_trainer_args(config, None)
    check_trainer_args(OPDConfig(opd_prefix_column="s", **BASE), None)  # 'always': no verifier


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mopd_peers": "peers"}, "mopd_peers"),
        ({"mopd_peers": "successes", "teacher_mode": "offline", "teacher_shards": "/tmp/s"},
         "precomputed teacher_shards"),
        ({"mopd_peers": "successes", "mopd_max_successes": 0}, "could hold no peer"),
        ({"mopd_max_failures": -1}, "mopd_max_failures must be >= 0"),
        ({"opd_prefix_column": "a", "opd_prefix_rollouts": "b"}, "set one prefix source"),
        ({"opd_prefix_column": "a", "opd_prefix_guided": 9}, "opd_prefix_guided must be in"),
        ({"opd_prefix_column": "a", "opd_trace_column": "t"}, "cannot be combined with "
         "opd_trace_column"),
        ({"opd_prefix_column": "a", "opd_prefix_placement": "completion", "opd_ratio": "ctpo"},
         "use opd_ratio plain, ppo or cispo"),
        ({"opd_prefix_fraction_end": 1.5}, "opd_prefix_fraction_end must be in"),
        ({"opd_prefix_placement": "middle"}, "opd_prefix_placement"),
        ({"trace_annotator": "divergence"}, "set opd_divergence"),
        ({**TRACE, "trace_forward_kl": False}, "routes to no KL channel"),
        ({**TRACE, "trace_reverse_kl": True, "opd_kl_coef": 0.0}, "set opd_kl_coef > 0"),
        ({**TRACE, "tip_rule": "q3", "teacher_top_k": 4}, "cannot be combined with tip_rule"),
        ({"trace_span_quantile": 1.5}, "trace_span_quantile must be in"),
        ({"trace_span_min_tokens": 0}, "trace_span_min_tokens must be >= 1"),
        ({"trace_kl_decay_steps": -1}, "trace_kl_decay_steps must be >= 0"),
    ],
)  # fmt: skip
def test_bad_settings_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        OPDConfig(**{**BASE, **fields})


def test_trace_annotator_import_paths():
    assert _load_annotator("none") is None and _load_annotator("divergence") is None
    assert _load_annotator("os.path.join").__name__ == "join"
    with pytest.raises(ValueError, match=r"an import path module\.function"):
        _load_annotator("judge")
    with pytest.raises(ValueError, match="cannot be imported"):
        _load_annotator("opd.no_such_module.annotate")
