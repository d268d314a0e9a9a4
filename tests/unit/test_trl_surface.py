"""Pins every private TRL name opd relies on (the tables of `opd/trainer/trl_seams.py`) against
the installed TRL, so that an upgrade that renames, removes or re-signs one fails here first.

Checks read TRL's source (`inspect`, `ast`) instead of building a trainer: building one needs a
model, a dataset and minutes. Two checks run the other way, so the tables cannot drift from the
code: the hooks `OPDTrainer` really overrides are exactly `OVERRIDDEN_HOOKS`, and no module of
opd except `trl_seams.py` touches a private TRL name.

Test: `pytest tests/unit/test_trl_surface.py`.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import re
from pathlib import Path

import pytest
import transformers
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import RepeatSampler, add_fused_lm_head

from opd.trainer import OPDTrainer
from opd.trainer import trl_seams as seams

OPD_ROOT = Path(__file__).resolve().parents[2]


def _leading_parameters(function, count: int) -> tuple[str, ...]:
    return tuple(inspect.signature(function).parameters)[:count]


def _assigned_in(source: str, name: str) -> bool:
    """Whether `source` assigns `self.<name>` (plain or annotated assignment)."""
    return re.search(rf"\bself\.{re.escape(name)}\s*(:[^=\n]*)?=(?!=)", source) is not None


@pytest.mark.parametrize(
    ("name", "parameters"), [*seams.OVERRIDDEN_HOOKS.items(), *seams.CALLED_PRIVATE.items()]
)
def test_private_method_exists_with_its_parameters(name, parameters):
    method = getattr(GRPOTrainer, name, None)
    assert method is not None, f"GRPOTrainer.{name} is gone"
    assert _leading_parameters(method, len(parameters)) == parameters


def test_overridden_hooks_are_exactly_opds_overrides():
    """Every GRPOTrainer method OPDTrainer (or one of its mixins) redefines is in the table."""
    overridden = {
        name
        for cls in OPDTrainer.__mro__[: OPDTrainer.__mro__.index(GRPOTrainer)]
        for name in vars(cls)
        if hasattr(GRPOTrainer, name) and not name.startswith("__")
    }
    assert overridden == set(seams.OVERRIDDEN_HOOKS)


@pytest.mark.parametrize("key", [*seams.BATCH_KEYS, *seams.OPTIONAL_BATCH_KEYS])
def test_batch_key_is_written_by_trl(key):
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    assert f'"{key}"' in source, f"TRL's batch no longer has {key!r}"


def test_opd_batch_keys_do_not_collide_with_trls():
    module_source = inspect.getsource(inspect.getmodule(GRPOTrainer))
    for key in seams.OPD_BATCH_KEYS:
        assert key.startswith("opd_")
        assert f'"{key}"' not in module_source and f"'{key}'" not in module_source


@pytest.mark.parametrize("name", seams.TRAINER_ATTRIBUTES)
def test_trainer_attribute_is_set_by_grpo_init(name):
    assert _assigned_in(inspect.getsource(GRPOTrainer.__init__), name)


@pytest.mark.parametrize("name", seams.HF_TRAINER_ATTRIBUTES)
def test_transformers_trainer_attribute_is_set(name):
    assert _assigned_in(inspect.getsource(transformers.Trainer), name)


def test_generate_returns_the_tuple_trace_injection_unpacks():
    returns = re.findall(r"^\s*return (.+)$", inspect.getsource(GRPOTrainer._generate), re.M)
    assert returns, "GRPOTrainer._generate returns nothing"
    names = tuple(item.strip() for item in returns[-1].split(","))
    assert names[: len(seams.GENERATE_RESULT)] == seams.GENERATE_RESULT


def test_config_fields_exist():
    fields = {field.name for field in dataclasses.fields(GRPOConfig)}
    assert set(seams.CONFIG_FIELDS) - fields == set()


def test_add_fused_lm_head_takes_what_opd_passes():
    assert seams.add_fused_lm_head is add_fused_lm_head
    parameters = seams.FUSED_LM_HEAD_PARAMS
    assert _leading_parameters(add_fused_lm_head, len(parameters)) == parameters


def test_repeat_sampler_stores_what_opds_subclass_copies_and_reads():
    """`EpochSeededRepeatSampler.from_sampler` rebuilds TRL's training sampler from its stored
    constructor arguments, and re-seeds its `generator` over `num_samples` each epoch."""
    assert seams.RepeatSampler is RepeatSampler
    assert "RepeatSampler(" in inspect.getsource(GRPOTrainer._get_train_sampler)
    parameters = inspect.signature(RepeatSampler.__init__).parameters
    required = {name for name, p in parameters.items() if p.default is p.empty} - {"self"}
    assert required <= set(seams.REPEAT_SAMPLER_PARAMS) <= set(parameters)
    source = inspect.getsource(RepeatSampler.__init__)
    for name in (*seams.REPEAT_SAMPLER_PARAMS, *seams.REPEAT_SAMPLER_ATTRIBUTES):
        assert _assigned_in(source, name), f"RepeatSampler no longer stores {name}"


def _vllm_generation_tree() -> ast.Module:
    """TRL's generation module, parsed (importing it would import vLLM: tens of seconds)."""
    spec = importlib.util.find_spec(seams.VLLM_GENERATION_MODULE)
    assert spec is not None and spec.origin is not None
    return ast.parse(Path(spec.origin).read_text())


def test_vllm_generation_builds_its_engine_through_the_patched_llm_name():
    """`vllm_engine_kwargs` patches the module-level `LLM`; TRL must import it under that name
    and call it by that name."""
    tree = _vllm_generation_tree()
    imported = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "vllm"
        for alias in node.names
    }
    assert "LLM" in imported
    generation = next(
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef) and node.name == "VLLMGeneration"
    )
    calls = [
        node
        for node in ast.walk(generation)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "LLM"
    ]
    assert calls, "VLLMGeneration no longer calls LLM(...)"


def test_vllm_generation_has_the_members_opd_uses():
    tree = _vllm_generation_tree()
    generation = next(
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef) and node.name == "VLLMGeneration"
    )
    methods = {node.name for node in generation.body if isinstance(node, ast.FunctionDef)}
    assigned = {
        target.attr
        for node in ast.walk(generation)
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Attribute)
        and isinstance(target.value, ast.Name)
        and target.value.id == "self"
    }
    assert set(seams.VLLM_GENERATION_MEMBERS) - (methods | assigned) == set()


def _private_trl_names() -> set[str]:
    private_attributes = {name for name in seams.TRAINER_ATTRIBUTES if name.startswith("_")}
    return set(seams.CALLED_PRIVATE) | private_attributes | {"_iter_named_params", "_is_vlm"}


def test_no_private_trl_touch_outside_the_seam_module():
    """Private TRL names and private TRL modules appear only in trl_seams.py."""
    names = _private_trl_names()
    offenders = []
    for path in [*(OPD_ROOT / "opd").rglob("*.py"), *(OPD_ROOT / "kernels").rglob("*.py")]:
        if path.name == "trl_seams.py":
            continue
        source = path.read_text()
        for name in names:
            if re.search(rf"\.{re.escape(name)}\b", source):
                offenders.append(f"{path.relative_to(OPD_ROOT)}: .{name}")
        for module in re.findall(r"^\s*(?:from|import) (trl\.[\w.]+)", source, re.M):
            offenders.append(f"{path.relative_to(OPD_ROOT)}: {module}")
    assert offenders == []


def test_seam_module_reads_only_listed_private_names():
    """Every private attribute trl_seams reads off a trainer or a generation is in a table."""
    source = inspect.getsource(seams)
    used = set(re.findall(r"\b(?:trainer|generation)\.(_\w+)", source))
    listed = set(seams.CALLED_PRIVATE) | set(seams.TRAINER_ATTRIBUTES)
    assert used - listed - set(seams.VLLM_GENERATION_MEMBERS) == set()
