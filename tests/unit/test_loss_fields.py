"""Every loss option of TRL's `GRPOConfig` is either implemented by opd's loss or refused.

The set of loss options is derived from TRL's source: the `GRPOConfig` fields that
`GRPOTrainer._compute_loss` (and the helpers it calls) reads, directly (`self.args.x`) or through
the attribute `GRPOTrainer.__init__` copies the field to (`self.epsilon_low = args.epsilon`). A
TRL release that adds a loss option fails `test_every_trl_loss_field_is_classified` until the
option is added to `SUPPORTED_LOSS_FIELDS` or `REFUSED_LOSS_FIELDS` (opd/trainer/build.py).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
from types import SimpleNamespace

import pytest
from trl import GRPOConfig, GRPOTrainer

from opd.config import ConfigError, OPDConfig
from opd.trainer.build import (
    LOSS_FIELDS,
    REFUSED_LOSS_FIELDS,
    SUPPORTED_LOSS_FIELDS,
    check_loss_options,
    check_trainer_loss_state,
)

GRPO_FIELDS = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
LOSS_METHODS = (
    "compute_loss", "_compute_loss", "_get_per_token_logps_and_entropies",
    "get_off_policy_mask", "get_gamma_weights", "get_high_entropy_mask",
)  # fmt: skip
# A value other than the default for each refused field.
NON_DEFAULTS = {
    "importance_sampling_level": "sequence", "top_entropy_quantile": 0.2,
    "off_policy_mask_threshold": 0.5, "router_aux_loss_coef": 0.001, "entropy_coef": 0.01,
    "use_adaptive_entropy": True, "entropy_coef_min": 0.1, "entropy_coef_max": 0.5,
    "entropy_coef_delta": 0.01, "entropy_target": 0.3, "sapo_temperature_neg": 2.0,
    "sapo_temperature_pos": 2.0, "vespo_k_pos": 1.0, "vespo_lambda_pos": 1.0,
    "vespo_k_neg": 1.0, "vespo_lambda_neg": 1.0,
}  # fmt: skip


def trl_loss_fields() -> set[str]:
    """`GRPOConfig` fields read by TRL's loss methods, from their source."""
    attribute_to_field = {}
    for line in inspect.getsource(GRPOTrainer.__init__).splitlines():
        match = re.match(r"\s*self\.(\w+)\s*=.*?\bargs\.(\w+)", line)
        if match:
            attribute_to_field.setdefault(match.group(1), match.group(2))
    fields = set()
    for name in LOSS_METHODS:
        source = inspect.getsource(getattr(GRPOTrainer, name))
        fields |= set(re.findall(r"\bself\.args\.(\w+)", source))
        for attribute in re.findall(r"\bself\.(\w+)", source):
            fields.add(attribute_to_field.get(attribute, attribute))
    return fields & GRPO_FIELDS.keys()


@pytest.fixture(scope="module")
def base_config(tmp_path_factory) -> OPDConfig:
    return OPDConfig(
        output_dir=str(tmp_path_factory.mktemp("out")),
        teacher_model_name_or_path="t",
        report_to="none",
    )


def with_values(config: OPDConfig, **values) -> OPDConfig:
    """A copy with fields set after `__post_init__` (TRL validates some combinations there)."""
    changed = copy.copy(config)
    for name, value in values.items():
        setattr(changed, name, value)
    return changed


def test_every_trl_loss_field_is_classified():
    derived = trl_loss_fields()
    assert {"epsilon", "beta", "delta", "loss_type"} <= derived  # the derivation itself works
    assert derived - LOSS_FIELDS == set(), "classify these in opd/trainer/build.py"
    assert not LOSS_FIELDS - GRPO_FIELDS.keys(), "classified fields TRL no longer has"
    assert not SUPPORTED_LOSS_FIELDS.keys() & REFUSED_LOSS_FIELDS.keys()
    assert NON_DEFAULTS.keys() == REFUSED_LOSS_FIELDS.keys()


def test_defaults_pass(base_config):
    check_loss_options(base_config)
    check_loss_options(with_values(base_config, router_aux_loss_coef=0.0))  # the way out


@pytest.mark.parametrize("name", sorted(NON_DEFAULTS))
def test_refused_field_names_itself(base_config, name):
    value = NON_DEFAULTS[name]
    with pytest.raises(ConfigError) as raised:
        check_loss_options(with_values(base_config, **{name: value}))
    assert str(raised.value) == f"{name}={value!r}: {REFUSED_LOSS_FIELDS[name]}"
    assert name in REFUSED_LOSS_FIELDS[name]


def test_refusal_messages_say_what_to_do():
    assert "tip_rule" in REFUSED_LOSS_FIELDS["top_entropy_quantile"]
    assert "router_aux_loss_coef: 0" in REFUSED_LOSS_FIELDS["router_aux_loss_coef"]
    assert "entropy_coef at 0" in REFUSED_LOSS_FIELDS["use_adaptive_entropy"]
    assert "loss_type 'vespo'" in REFUSED_LOSS_FIELDS["vespo_k_pos"]
    assert "loss_type 'sapo'" in REFUSED_LOSS_FIELDS["sapo_temperature_pos"]


@pytest.mark.parametrize("loss_type", ["sapo", "vespo", "luspo"])
def test_unimplemented_loss_types_are_refused(base_config, loss_type):
    with pytest.raises(ConfigError, match=rf"loss_type='{loss_type}' is not supported"):
        check_loss_options(with_values(base_config, loss_type=loss_type))


def test_delta_needs_the_ppo_ratio(base_config):
    check_loss_options(with_values(base_config, delta=2.0, opd_ratio="ppo"))
    for ratio in ("plain", "cispo"):
        with pytest.raises(ConfigError, match=rf"delta=2.0 .*set opd_ratio: ppo.*'{ratio}'"):
            check_loss_options(with_values(base_config, delta=2.0, opd_ratio=ratio))


def test_moe_router_aux_loss_enabled_by_the_model_is_refused():
    """A namespace stands in for the trainer after `GRPOTrainer.__init__` (building one needs
    an MoE model): TRL's `aux_loss_enabled` is what the check reads."""
    moe = SimpleNamespace(aux_loss_enabled=True, model=SimpleNamespace())
    with pytest.raises(ConfigError, match=r"Mixture-of-Experts.*router_aux_loss_coef: 0"):
        check_trainer_loss_state(moe)
    check_trainer_loss_state(SimpleNamespace(aux_loss_enabled=False, model=None))
