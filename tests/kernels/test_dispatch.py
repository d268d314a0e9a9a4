"""The one kernel dispatch rule, `opd.kernels.use_triton`.

Rule: `override_impl` or `OPD_KERNELS=torch|triton` forces one (forcing Triton where it cannot run
raises); otherwise Triton when Triton imports AND (a tensor is on CUDA OR TRITON_INTERPRET=1);
otherwise torch.

These tests run on CPU. CUDA tensors and a missing Triton cannot be produced here, so two stand-ins
are used and say so: a `SimpleNamespace(is_cuda=True)` for a CUDA tensor (the rule reads only
`.is_cuda`), and `monkeypatch` of `TRITON_AVAILABLE` for a machine without Triton.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import opd.kernels as kernels_mod
from opd.kernels import override_impl, use_triton

CUDA_TENSOR = SimpleNamespace(is_cuda=True)  # stand-in: no GPU on the CI machines


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from the automatic rule, whatever the caller's shell exported."""
    monkeypatch.delenv("OPD_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def cpu_tensor() -> torch.Tensor:
    return torch.zeros(2, 3)


@pytest.fixture
def with_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels_mod, "TRITON_AVAILABLE", True)


@pytest.fixture
def without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in for a machine where Triton does not import."""
    monkeypatch.setattr(kernels_mod, "TRITON_AVAILABLE", False)


def test_triton_available_reflects_whether_triton_imports() -> None:
    try:
        import triton  # noqa: F401

        imports = True
    except ImportError:
        imports = False
    assert imports == kernels_mod.TRITON_AVAILABLE


# --- automatic rule ---------------------------------------------------------------------------


def test_cpu_tensors_default_to_torch(with_triton: None, cpu_tensor: torch.Tensor) -> None:
    assert use_triton(cpu_tensor, cpu_tensor) is False


def test_no_tensors_default_to_torch(with_triton: None) -> None:
    assert use_triton() is False


def test_cuda_tensor_selects_triton(with_triton: None, cpu_tensor: torch.Tensor) -> None:
    assert use_triton(cpu_tensor, CUDA_TENSOR) is True  # type: ignore[arg-type]  # stand-in


def test_cuda_tensor_without_triton_falls_back_to_torch(without_triton: None) -> None:
    assert use_triton(CUDA_TENSOR) is False  # type: ignore[arg-type]  # stand-in


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "on", "yes"])
def test_interpret_mode_selects_triton_on_cpu(
    monkeypatch: pytest.MonkeyPatch, with_triton: None, cpu_tensor: torch.Tensor, value: str
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert use_triton(cpu_tensor) is True


@pytest.mark.parametrize("value", ["0", "", "false", "off"])
def test_interpret_off_values_keep_torch(
    monkeypatch: pytest.MonkeyPatch, with_triton: None, cpu_tensor: torch.Tensor, value: str
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert use_triton(cpu_tensor) is False


def test_interpret_mode_without_triton_is_torch(
    monkeypatch: pytest.MonkeyPatch, without_triton: None, cpu_tensor: torch.Tensor
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(cpu_tensor) is False


# --- OPD_KERNELS forcing --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "device", "expected"),
    [
        ({"OPD_KERNELS": "torch"}, "cuda", False),
        ({"OPD_KERNELS": "torch", "TRITON_INTERPRET": "1"}, "cpu", False),
        ({"OPD_KERNELS": "triton"}, "cuda", True),
        ({"OPD_KERNELS": "triton", "TRITON_INTERPRET": "1"}, "cpu", True),
    ],
    ids=["torch-even-on-cuda", "torch-over-interpret-mode", "triton-on-cuda", "triton-interpret"],
)
def test_env_forces_one_where_it_can_run(
    monkeypatch: pytest.MonkeyPatch,
    with_triton: None,
    cpu_tensor: torch.Tensor,
    env: dict[str, str],
    device: str,
    expected: bool,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    tensor = CUDA_TENSOR if device == "cuda" else cpu_tensor  # stand-in for a CUDA tensor
    assert use_triton(tensor) is expected  # type: ignore[arg-type]


def test_env_forcing_triton_on_cpu_raises_and_says_how_to_fix(
    monkeypatch: pytest.MonkeyPatch, with_triton: None, cpu_tensor: torch.Tensor
) -> None:
    monkeypatch.setenv("OPD_KERNELS", "triton")
    with pytest.raises(RuntimeError, match=r"OPD_KERNELS=triton.*not on a CUDA device") as info:
        use_triton(cpu_tensor)
    assert "TRITON_INTERPRET=1" in str(info.value)
    assert "OPD_KERNELS=torch" in str(info.value)


def test_env_forcing_triton_without_triton_raises(
    monkeypatch: pytest.MonkeyPatch, without_triton: None
) -> None:
    monkeypatch.setenv("OPD_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match=r"Triton does not import.*pip install triton"):
        use_triton(CUDA_TENSOR)  # type: ignore[arg-type]  # stand-in


@pytest.mark.parametrize("value", ["cuda", "Triton", "auto", "torch,triton"])
def test_invalid_env_value_raises_value_error(
    monkeypatch: pytest.MonkeyPatch, cpu_tensor: torch.Tensor, value: str
) -> None:
    monkeypatch.setenv("OPD_KERNELS", value)
    expected = rf"OPD_KERNELS='{value}' is not a kernel implementation; use one of \('torch', "
    with pytest.raises(ValueError, match=expected):
        use_triton(cpu_tensor)


def test_empty_env_value_means_automatic(
    monkeypatch: pytest.MonkeyPatch, with_triton: None, cpu_tensor: torch.Tensor
) -> None:
    monkeypatch.setenv("OPD_KERNELS", "")
    assert use_triton(cpu_tensor) is False
    assert use_triton(CUDA_TENSOR) is True  # type: ignore[arg-type]  # stand-in


# --- override_impl (tests) ------------------------------------------------------------------


def test_override_takes_precedence_over_env_and_is_restored(
    monkeypatch: pytest.MonkeyPatch, with_triton: None
) -> None:
    monkeypatch.setenv("OPD_KERNELS", "triton")
    with override_impl("torch"):
        assert use_triton(CUDA_TENSOR) is False  # type: ignore[arg-type]  # stand-in
        with override_impl(None):  # back to automatic; the env var applies again
            assert use_triton(CUDA_TENSOR) is True  # type: ignore[arg-type]  # stand-in
        assert use_triton(CUDA_TENSOR) is False  # type: ignore[arg-type]  # stand-in
    assert kernels_mod._override is None
    assert use_triton(CUDA_TENSOR) is True  # type: ignore[arg-type]  # stand-in


def test_override_triton_on_cpu_raises(with_triton: None, cpu_tensor: torch.Tensor) -> None:
    with (
        override_impl("triton"),
        pytest.raises(RuntimeError, match=r"override_impl\('triton'\).*TRITON_INTERPRET=1"),
    ):
        use_triton(cpu_tensor)


def test_override_is_restored_after_an_exception() -> None:
    with pytest.raises(KeyError), override_impl("torch"):
        raise KeyError("boom")
    assert kernels_mod._override is None


def test_override_rejects_unknown_names() -> None:
    with (
        pytest.raises(ValueError, match=r"override_impl='cuda' is not a kernel implementation"),
        override_impl("cuda"),  # type: ignore[arg-type]  # the wrong value is the point
    ):
        pass


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_fused_functions_accept_zero_rows(impl):
    """A TIP selection may keep no token of a micro-batch: empty outputs, zero gradients."""
    from opd.kernels import fused_linear_divergence_loss, fused_linear_token_stats, override_impl

    hidden = torch.zeros(0, 4, requires_grad=True)
    weight = torch.randn(7, 4, requires_grad=True)
    topk = {"teacher_topk_ids": torch.zeros(0, 2, dtype=torch.long),
            "teacher_topk_logprobs": torch.zeros(0, 2)}  # fmt: skip
    with override_impl(impl):
        stats = fused_linear_token_stats(hidden, weight, torch.zeros(0, dtype=torch.long), **topk)
        loss, divergence = fused_linear_divergence_loss(hidden, weight, **topk)
    assert {name: tuple(t.shape) for name, t in stats.items()} == {
        "logprob": (0,), "entropy": (0,), "divergence": (0,)}  # fmt: skip
    assert loss.item() == 0.0 and divergence.shape == (0,)
    (loss + stats["logprob"].sum()).backward()
    assert not weight.grad.any()
