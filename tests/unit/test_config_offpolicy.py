"""The METHODS.md s.10 fields of `OPDConfig` fail early, naming the field to change."""

from __future__ import annotations

import pytest

from opd import OPDConfig
from opd.arguments import ConfigError
from opd.trainer.build import check_trainer_args
from opd.types import Ratio, TraceGate

BASE = {"output_dir": "/tmp/opd-config-offpolicy", "teacher_mode": "self"}


def test_ratio_settings_parse_from_json_and_must_belong_to_the_form():
    config = OPDConfig(opd_ratio="sapo", opd_ratio_settings='{"sapo_tau_pos": 2.0}', **BASE)
    assert config.opd_ratio == Ratio.SAPO and config.opd_ratio_settings == {"sapo_tau_pos": 2.0}
    assert config.uses_offpolicy_ratio
    with pytest.raises(ValueError, match="sets sapo_tau_pos, not knobs of opd_ratio='plain'"):
        OPDConfig(opd_ratio_settings='{"sapo_tau_pos": 2.0}', **BASE)
    with pytest.raises(ValueError, match="opd_ratio_settings must be a JSON object"):
        OPDConfig(opd_ratio="sapo", opd_ratio_settings=[1], **BASE)


def test_unknown_ratio_knob_is_refused_by_the_trainer_check():
    config = OPDConfig(opd_ratio="topr", opd_ratio_settings='{"topr_typo": 1.0}', **BASE)
    with pytest.raises(ConfigError, match="topr_typo"):
        check_trainer_args(config, None)


def test_gates_need_a_trace_column_and_a_verifier():
    with pytest.raises(ValueError, match="set opd_trace_column"):
        OPDConfig(opd_trace_gate="all_fail", **BASE)
    config = OPDConfig(opd_trace_column="answer", opd_trace_gate="thompson", **BASE)
    assert config.opd_trace_gate == TraceGate.THOMPSON
    with pytest.raises(ConfigError, match="pass reward_funcs"):
        check_trainer_args(config, None)
    with pytest.raises(ValueError, match="set opd_imitation_column"):
        OPDConfig(opd_imitation_gate="all_fail", **BASE)
    with pytest.raises(ValueError, match="opd_trace_gate_threshold must be in"):
        OPDConfig(opd_trace_column="a", opd_trace_gate_threshold=0.0, **BASE)


def test_imitation_and_curriculum_ranges():
    with pytest.raises(ValueError, match="opd_imitation_peak must be in"):
        OPDConfig(opd_imitation_column="a", opd_imitation_peak=1.5, **BASE)
    with pytest.raises(ValueError, match="opd_imitation_token_weight='sqrt'"):
        OPDConfig(opd_imitation_column="a", opd_imitation_token_weight="sqrt", **BASE)
    with pytest.raises(ValueError, match="tcod_end"):
        OPDConfig(tcod_unit="tokens", tcod_start=8, tcod_end=4, **BASE)
    with pytest.raises(ValueError, match="tcod_ramp_steps must be >= 0"):
        OPDConfig(tcod_unit="tokens", tcod_ramp_steps=-1, **BASE)


def test_min_variance_baseline_reads_no_student_statistics():
    config = OPDConfig(opd_baseline="min_variance", **BASE)
    assert config.needs_importance_weights and not config.needs_student_token_stats
    assert OPDConfig(opd_lr_ess_scaling=True, **BASE).needs_importance_weights
