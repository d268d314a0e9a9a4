"""`opd.kernels` on CUDA: the compiled Triton kernels against the reference, larger shapes.

Run by scripts/gpu_check.sh (marked `gpu`, deselected on CPU). On CUDA tensors the dispatch
picks Triton without any override; the test asserts it did. The comparator is the plain-torch
spec `opd.kernels.reference` (float32 maths, unfused) on the same inputs given in float64, so it
sees exactly the quantised values the kernels see; the float64 parity proper runs on CPU in
tests/kernels/test_parity.py for the same kernels under the interpreter. Shapes: an odd one and
a large one (too slow for the CPU interpreter).
"""

from __future__ import annotations

import math

import pytest
import torch

import opd.kernels as kernels
from opd.kernels import reference

pytestmark = pytest.mark.gpu

SHAPES = [(37, 1423, 5, 96), (2048, 32000, 64, 1024)]  # N, V, K, H
DTYPES = [(torch.float32, 1e-4, 1e-3), (torch.bfloat16, 5e-3, 3e-2)]


def _inputs(n, v, k, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    zs = (2 * torch.randn(n, v, device="cuda", generator=gen)).to(dtype)
    zt = 2 * torch.randn(n, v, device="cuda", generator=gen)
    ids = torch.randint(0, v, (n,), device="cuda", generator=gen)
    keep = torch.rand(n, device="cuda", generator=gen) > 0.1
    t_lp, t_ids = torch.log_softmax(zt, -1).topk(k, -1)
    t_lp[0, k // 2 :], t_ids[0, k // 2 :] = -math.inf, -1
    return zs, zt, ids, keep, t_ids, t_lp


def _check(fn_name, args64, args, kwargs, leaf, leaf64, atol, rtol):
    got = getattr(kernels, fn_name)(*args, **kwargs)
    want = getattr(reference, fn_name)(*args64, **kwargs)
    got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
    torch.testing.assert_close(got, want.float(), atol=atol, rtol=rtol)
    g = torch.randn_like(got)
    (grad,) = torch.autograd.grad((got * g).sum(), leaf)
    (grad64,) = torch.autograd.grad((want * g.double()).sum(), leaf64)
    torch.testing.assert_close(grad.float(), grad64.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize(("n", "v", "k", "h"), SHAPES)
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
def test_logits_kernels_on_cuda(n, v, k, h, dtype, atol, rtol):
    assert torch.cuda.is_available(), "this test needs a CUDA GPU"
    zs, zt, ids, keep, t_ids, t_lp = _inputs(n, v, k, dtype)
    assert kernels.use_triton(zs), "CUDA tensors must dispatch to Triton"
    for fn_name, extra, kwargs in [
        ("sampled_logprob_entropy", (ids,), {"temperature": 1.3, "mask": keep}),
        ("full_divergence", (zt,), {"kind": "jsd", "beta": 0.3, "mask": keep}),
        ("topk_divergence", (t_ids, t_lp), {"support": "union", "mask": keep}),
    ]:
        leaf = zs.clone().requires_grad_(True)
        leaf64 = zs.double().requires_grad_(True)
        _check(fn_name, (leaf64, *extra), (leaf, *extra), kwargs, leaf, leaf64, atol, rtol)


@pytest.mark.parametrize(("n", "v", "k", "h"), SHAPES)
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
def test_fused_linear_on_cuda(n, v, k, h, dtype, atol, rtol):
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(n, h, device="cuda", generator=gen) / h**0.5).to(dtype)
    w = torch.randn(v, h, device="cuda", generator=gen).to(dtype)
    xt = torch.randn(n, 64, device="cuda", generator=gen) / 8
    wt = torch.randn(v, 64, device="cuda", generator=gen)
    ids = torch.randint(0, v, (n,), device="cuda", generator=gen)
    xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    kw = {"teacher_hidden": xt, "teacher_weight": wt, "kind": "reverse_kl", "temperature": 0.9}
    out = kernels.fused_linear_token_stats(xl, wl, ids, **kw)
    want = reference.fused_linear_token_stats(x64, w64, ids, **kw)
    g = {name: torch.randn(n, device="cuda") for name in want}
    loss = sum((out[name] * g[name]).sum() for name in want)
    loss64 = sum((want[name] * g[name].double()).sum() for name in want)
    grads = torch.autograd.grad(loss, (xl, wl))
    grads64 = torch.autograd.grad(loss64, (x64, w64))
    for name in want:
        torch.testing.assert_close(out[name], want[name].float(), atol=atol, rtol=rtol)
    for got, ref in zip(grads, grads64, strict=True):
        torch.testing.assert_close(got.float(), ref.float(), atol=atol * 10, rtol=rtol)
