"""`ops`: the four kernel functions from each implementation, for the parity tests.

- "reference": `opd.kernels.reference` (the plain-autograd spec itself);
- "torch": the public `opd.kernels` functions forced to the chunked torch path;
- "triton": the public `opd.kernels` functions forced to Triton, run by Triton's CPU interpreter
  (`TRITON_INTERPRET=1`, which tests/conftest.py sets before anything imports triton). On a CUDA
  machine the same kernels compile instead: tests/gpu/test_kernels_cuda.py via
  `scripts/gpu_check.sh`.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest

import opd.kernels as kernels
from opd.kernels import reference

FUNCTIONS = ("sampled_logprob_entropy", "topk_divergence", "full_divergence",
             "fused_linear_token_stats", "fused_linear_divergence_loss")  # fmt: skip


@pytest.fixture(params=["reference", "torch", "triton"])
def ops(request, monkeypatch) -> SimpleNamespace:
    """The functions of one implementation, plus `fused_options`: a chunk size small enough that
    the test shapes span several row chunks (the reference accepts and ignores it)."""
    if request.param == "reference":
        fns = {f: getattr(reference, f) for f in FUNCTIONS}
        yield SimpleNamespace(**fns, fused_options={"chunk_rows": 8})
        return
    fns = {f: getattr(kernels, f) for f in FUNCTIONS}
    if request.param == "torch":  # several checkpointed row chunks on the N = 37 test shapes
        for f in FUNCTIONS[:3]:
            fns[f] = partial(fns[f], chunk_rows=8)
    monkeypatch.delenv("OPD_KERNELS", raising=False)
    with kernels.override_impl(request.param):
        yield SimpleNamespace(**fns, fused_options={"chunk_rows": 8})
