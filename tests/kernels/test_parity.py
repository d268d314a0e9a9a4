"""Parity of every implementation of the kernel functions (issue 3) with float64 references.

Each test runs for the `ops` fixture's three implementations (tests/kernels/conftest.py): the
plain-autograd spec `opd.kernels.reference`, the chunked torch path and the Triton kernels (in
Triton's CPU interpreter here, compiled on CUDA in scripts/gpu_check.sh).

Three kinds of checks, all on CPU in a few seconds:
- hand-computed values on a 2-row, 4-token example for every `kind` (numbers in the comments);
- parity, forward and backward (non-uniform `grad_output`), against the straightforward float64
  re-implementations below (unchunked, per-row loops for the top-k supports) on an odd shape,
  fp32 and bf16 inputs, fully masked rows holding garbage, `-inf` padded teacher entries and
  temperature != 1;
- `fused_linear_token_stats` with several chunks in both directions equals the unfused float64
  computation in value and in gradients w.r.t. hidden and weight, and never creates a tensor as
  large as the `[N, V]` logits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from opd.kernels import fused_linear_token_stats, override_impl

LN = math.log
N, V, K, H = 37, 1423, 5, 96
TEMP = 1.3
MASKED = [0, 11, 36]
# (dtype, atol, rtol): both sides see the same (quantised) inputs; bf16 tolerances cover the
# bf16 gradients returned for bf16 inputs.
DTYPES = [(torch.float32, 2e-5, 2e-4), (torch.bfloat16, 2e-3, 2e-2)]
KINDS = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0), ("jsd", 1.0)]


# --------------------------------------------------------------------------------------------
# hand-computed values: row 0 p_s = [.1, .2, .3, .4], p_t = uniform;
#                       row 1 p_s = [.5, .25, .125, .125], p_t = [.25, .5, .125, .125]
# --------------------------------------------------------------------------------------------
PS = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.125, 0.125]])
PT = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.25, 0.5, 0.125, 0.125]])
HAND = {
    # row 0: sum p_s ln(4 p_s);              row 1: .5 ln 2 + .25 ln .5 = .25 ln 2
    ("reverse_kl", 0.5): [0.10644013528622318, 0.17328679513998632],
    # row 0: ln .25 - .25 (ln .1 + ln .2 + ln .3 + ln .4);   row 1: .25 ln .5 + .5 ln 2 = .25 ln 2
    ("forward_kl", 0.5): [0.12177727428716867, 0.17328679513998632],
    # m = (p_t + p_s) / 2; .5 KL(p_t||m) + .5 KL(p_s||m); row 1: .25 ln(2/3) + .5 ln(4/3)
    ("jsd", 0.5): [0.02786561345727674, 0.04247475919884931],
    # convention: beta = 0 is forward KL, beta = 1 is reverse KL
    ("jsd", 0.0): [0.12177727428716867, 0.17328679513998632],
    ("jsd", 1.0): [0.10644013528622318, 0.17328679513998632],
}


@pytest.mark.parametrize(("kind", "beta"), KINDS)
def test_full_divergence_hand_values(ops, kind: str, beta: float) -> None:
    got = ops.full_divergence(PS.log() + 3.0, PT.log() - 1.0, kind=kind, beta=beta)
    torch.testing.assert_close(got, torch.tensor(HAND[(kind, beta)]), atol=1e-6, rtol=1e-6)
    # temperature 2 on logits 2 ln p gives back p
    got_t = ops.full_divergence(2 * PS.log(), 2 * PT.log(), kind=kind, beta=beta, temperature=2.0)
    torch.testing.assert_close(got_t, got, atol=1e-6, rtol=1e-6)


def test_sampled_logprob_entropy_hand_values(ops) -> None:
    logprob, entropy = ops.sampled_logprob_entropy(PS.log(), torch.tensor([3, 0]))
    # ln .4, ln .5; H0 = -sum p ln p = 1.27985..., H1 = -(.5 ln .5 + .25 ln .25 + .25 ln .125)
    torch.testing.assert_close(logprob, torch.tensor([LN(0.4), LN(0.5)]))
    torch.testing.assert_close(entropy, torch.tensor([1.2798542258336676, 1.2130075659799042]))


@pytest.mark.parametrize(("kind", "beta"), KINDS)
def test_topk_teacher_support_hand_values(ops, kind: str, beta: float) -> None:
    # row 1, teacher top-2 = ids [1, 0]; buckets {1, 0, tail}: p_s = [.25, .5, .25],
    # p_t = [.5, .25, .25]: the swapped row-1 example of HAND minus one equal bucket.
    ids, lps = torch.tensor([[1, 0]]), torch.tensor([[LN(0.5), LN(0.25)]])
    got = ops.topk_divergence(PS[1:].log(), ids, lps, kind=kind, beta=beta)
    torch.testing.assert_close(got, torch.tensor(HAND[(kind, beta)][1:]), atol=1e-6, rtol=1e-6)


def test_topk_supports_hand_values(ops) -> None:
    s_logits = PS[1:].log()
    ids, lps = torch.tensor([[1, 0, 2]]), torch.tensor([[LN(0.5), LN(0.25), -math.inf]])
    # tail=False: renormalised on {1, 0}: p_s = [1/3, 2/3], p_t = [2/3, 1/3]; KL = ln(2) / 3
    got = ops.topk_divergence(s_logits, ids, lps, tail=False)
    torch.testing.assert_close(got, torch.tensor([LN(2) / 3]))
    # row 0 with a top-1 teacher (id 0, p .25): the other 3 ids share the tail .75 -> .25 each.
    s0, t_ids, t_lps = PS[:1].log(), torch.tensor([[0]]), torch.tensor([[LN(0.25)]])
    # student top-2 = {3, 2}: buckets {3, 2, tail}: p_s = [.4, .3, .3], p_t = [.25, .25, .5]
    got = ops.topk_divergence(s0, t_ids, t_lps, support="student", student_top_k=2)
    expected = 0.4 * LN(0.4 / 0.25) + 0.3 * LN(0.3 / 0.25) + 0.3 * LN(0.3 / 0.5)
    torch.testing.assert_close(got, torch.tensor([expected]))
    # union {0} + {3, 2}: p_s = [.1, .4, .3, tail .2], p_t = [.25, .25, .25, tail .25]
    got = ops.topk_divergence(s0, t_ids, t_lps, support="union", student_top_k=2)
    expected = 0.1 * LN(0.4) + 0.4 * LN(1.6) + 0.3 * LN(1.2) + 0.2 * LN(0.8)
    torch.testing.assert_close(got, torch.tensor([expected]))


def test_bad_arguments_raise(ops) -> None:
    with pytest.raises(ValueError, match="kind"):
        ops.full_divergence(PS, PT, kind="tv")
    with pytest.raises(ValueError, match="support"):
        ops.topk_divergence(PS, torch.zeros(2, 1, dtype=torch.long), PT[:, :1], support="both")
    with pytest.raises(ValueError, match="beta"):
        ops.full_divergence(PS, PT, kind="jsd", beta=1.5)


# --------------------------------------------------------------------------------------------
# float64 re-implementations (independent of the library's vectorised code)
# --------------------------------------------------------------------------------------------
def ref_div(p: torch.Tensor, q: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """D(p_s = p, p_t = q) on 1-D probability vectors with positive entries."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return (q * (q.log() - p.log())).sum()
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return (p * (p.log() - q.log())).sum()
    m = beta * q + (1 - beta) * p
    return beta * (q * (q / m).log()).sum() + (1 - beta) * (p * (p / m).log()).sum()


def ref_stats(z, ids, keep):
    ls = torch.log_softmax(z.double() / TEMP, -1)
    lp = torch.stack([ls[i, ids[i]] if keep[i] else ls.new_zeros(()) for i in range(len(z))])
    ent = torch.stack([-(ls[i].exp() * ls[i]).sum() * keep[i] for i in range(len(z))])
    return lp, ent


def ref_full(zs, zt, keep, kind, beta):
    ps = torch.softmax(zs.double() / TEMP, -1)
    pt = torch.softmax(zt.double() / TEMP, -1)
    rows = [ref_div(ps[i], pt[i], kind, beta) if keep[i] else ps.new_zeros(()) for i in range(N)]
    return torch.stack(rows)


def ref_topk_row(ps, t_ids, t_lps, kind, beta, support, tail, k):
    teacher = {int(i): math.exp(lp) for i, lp in zip(t_ids, t_lps, strict=True) if lp > -math.inf}
    rest = (1.0 - sum(teacher.values())) / (len(ps) - len(teacher))
    s_top = [int(i) for i in ps.topk(k).indices]
    support_ids = {
        "teacher": list(teacher),
        "student": s_top,
        "union": list(teacher) + [i for i in s_top if i not in teacher],
    }[support]
    p = ps[support_ids]
    q = torch.tensor([teacher.get(i, rest) for i in support_ids], dtype=torch.float64)
    if tail:
        p, q = torch.cat([p, 1 - p.sum(0, keepdim=True)]), torch.cat([q, 1 - q.sum(0, True)])
    else:
        p, q = p / p.sum(), q / q.sum()
    return ref_div(p, q, kind, beta)


def ref_topk(zs, t_ids, t_lps, keep, kind, beta, support="teacher", tail=True, k=K):
    ps = torch.softmax(zs.double() / TEMP, -1)
    return torch.stack(
        [
            ref_topk_row(ps[i], t_ids[i], t_lps[i], kind, beta, support, tail, k)
            if keep[i]
            else ps.new_zeros(())
            for i in range(N)
        ]
    )


# --------------------------------------------------------------------------------------------
# inputs: odd shapes, garbage in masked rows, -inf padded teacher entries
# --------------------------------------------------------------------------------------------
def make_inputs(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    zs = (2 * torch.randn(N, V, generator=g)).to(dtype)
    zt = (2 * torch.randn(N, V, generator=g)).to(dtype)
    ids = torch.randint(0, V, (N,), generator=g)
    keep = torch.ones(N, dtype=torch.bool)
    keep[MASKED] = False
    t_lps, t_ids = torch.log_softmax(zt.float() / TEMP, -1).topk(K, -1)
    t_lps[1, 3:] = -math.inf  # padded entries (ids -1 there, as a server would pad)
    t_ids[1, 3:] = -1
    t_lps[2, 1:] = -math.inf
    zs[MASKED] = torch.nan  # masked rows may hold anything
    ids[MASKED] = -100
    t_lps[MASKED] = -math.inf
    return zs, zt, ids, keep, t_ids, t_lps


def check_value_and_grad(got, want, leaf, leaf64, keep, atol, rtol, g):
    """Values equal, masked rows exactly 0; gradients equal, masked rows' gradient exactly 0."""
    torch.testing.assert_close(got, want.float(), atol=atol, rtol=rtol)
    assert got.dtype == torch.float32
    assert (got[~keep] == 0).all()
    (grad,) = torch.autograd.grad((got * g).sum(), leaf)
    (grad64,) = torch.autograd.grad((want * g.double()).sum(), leaf64)
    assert grad.dtype == leaf.dtype
    assert (grad[~keep] == 0).all()
    torch.testing.assert_close(grad.float()[keep], grad64.float()[keep], atol=atol, rtol=rtol)


def leaves(zs: torch.Tensor, keep: torch.Tensor):
    """The tested leaf and a float64 copy with finite masked rows (the reference skips them)."""
    z64 = torch.where(keep[:, None], zs.double(), 0.0).requires_grad_(True)
    return zs.clone().requires_grad_(True), z64


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
def test_sampled_logprob_entropy_parity(ops, dtype, atol, rtol) -> None:
    zs, _, ids, keep, _, _ = make_inputs(dtype)
    g = torch.randn(2, N)
    for out_index in (0, 1):
        z, z64 = leaves(zs, keep)
        got = ops.sampled_logprob_entropy(z, ids, temperature=TEMP, mask=keep)[out_index]
        want = ref_stats(z64, ids, keep)[out_index]
        check_value_and_grad(got, want, z, z64, keep, atol, rtol, g[out_index])


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize(("kind", "beta"), KINDS)
def test_full_divergence_parity(ops, dtype, atol, rtol, kind, beta) -> None:
    zs, zt, _, keep, _, _ = make_inputs(dtype)
    z, z64 = leaves(zs, keep)
    got = ops.full_divergence(z, zt, kind=kind, beta=beta, temperature=TEMP, mask=keep)
    want = ref_full(z64, zt, keep, kind, beta)
    check_value_and_grad(got, want, z, z64, keep, atol, rtol, torch.randn(N))


TOPK_CASES = [
    ("teacher", True),
    ("teacher", False),
    ("student", True),
    ("student", False),
    ("union", True),
    ("union", False),
]


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize(("support", "tail"), TOPK_CASES)
@pytest.mark.parametrize(("kind", "beta"), [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
def test_topk_divergence_parity(ops, dtype, atol, rtol, support, tail, kind, beta) -> None:
    zs, _, _, keep, t_ids, t_lps = make_inputs(dtype)
    z, z64 = leaves(zs, keep)
    got = ops.topk_divergence(
        z, t_ids, t_lps, kind=kind, beta=beta, support=support, tail=tail,
        temperature=TEMP, mask=keep, student_top_k=7,
    )  # fmt: skip
    want = ref_topk(z64, t_ids, t_lps, keep, kind, beta, support, tail, k=7)
    check_value_and_grad(got, want, z, z64, keep, atol, rtol, torch.randn(N))


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_topk_jsd_beta_limits_are_the_kls(ops, beta: float) -> None:
    zs, _, _, keep, t_ids, t_lps = make_inputs(torch.float32)
    kl = "forward_kl" if beta == 0.0 else "reverse_kl"
    for support in ("teacher", "union"):
        got = ops.topk_divergence(
            zs, t_ids, t_lps, kind="jsd", beta=beta, support=support, mask=keep
        )
        want = ops.topk_divergence(zs, t_ids, t_lps, kind=kl, support=support, mask=keep)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------
# fused_linear_token_stats
# --------------------------------------------------------------------------------------------
FUSED_TEACHERS = ["none", "full_reverse_kl", "full_forward_kl", "full_jsd", "topk_jsd"]


class FusedInputs(NamedTuple):
    """Inputs of the fused functions: the tested leaves, the student's hidden states `xl [N, H]`
    (NaN in masked rows) and lm_head `wl [V, H]`; their float64 copies `x64` (masked rows 0),
    `w64` and logits `z64`; a float32 teacher `xt [N, 64]`, `wt [V, 64]` and its top-K (row 1
    padded with `-inf`, ids -1)."""

    xl: torch.Tensor
    wl: torch.Tensor
    x64: torch.Tensor
    w64: torch.Tensor
    z64: torch.Tensor
    xt: torch.Tensor
    wt: torch.Tensor
    t_ids: torch.Tensor
    t_lps: torch.Tensor


def make_fused_inputs(dtype: torch.dtype, gen: torch.Generator, keep: torch.Tensor) -> FusedInputs:
    x = (torch.randn(N, H, generator=gen) / 4).to(dtype)
    w = (torch.randn(V, H, generator=gen) / 2).to(dtype)
    xt, wt = torch.randn(N, 64, generator=gen) / 4, torch.randn(V, 64, generator=gen) / 2
    x[MASKED] = torch.nan
    t_lps, t_ids = torch.log_softmax(xt @ wt.T / TEMP, -1).topk(K, -1)
    t_lps[1, 2:], t_ids[1, 2:] = -math.inf, -1
    xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    x64 = torch.where(keep[:, None], x.double(), 0.0).requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    return FusedInputs(xl, wl, x64, w64, x64 @ w64.T, xt, wt, t_ids, t_lps)


def fused_teacher(teacher: str, inputs: FusedInputs, keep: torch.Tensor, kind: str):
    """`teacher` ("full_*" or "topk_*"): the fused functions' teacher arguments and the float64
    reference divergence (beta 0.4)."""
    if teacher.startswith("full"):
        zt64 = inputs.xt.double() @ inputs.wt.double().T
        kw = {"teacher_hidden": inputs.xt, "teacher_weight": inputs.wt}
        return kw, ref_full(inputs.z64, zt64, keep, kind, 0.4)
    kw = {"teacher_topk_ids": inputs.t_ids, "teacher_topk_logprobs": inputs.t_lps}
    return kw, ref_topk(inputs.z64, inputs.t_ids, inputs.t_lps, keep, kind, 0.4)


def check_fused_grads(inputs: FusedInputs, loss, loss64, keep, dtype, atol, rtol) -> None:
    """Gradients w.r.t. hidden states and weight equal the float64 ones, in the input dtype;
    masked rows' hidden-state gradient exactly 0."""
    grads = torch.autograd.grad(loss, (inputs.xl, inputs.wl))
    grads64 = torch.autograd.grad(loss64, (inputs.x64, inputs.w64))
    assert (grads[0][~keep] == 0).all()
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    torch.testing.assert_close(
        grads[0].float()[keep], grads64[0].float()[keep], atol=atol, rtol=rtol
    )
    torch.testing.assert_close(grads[1].float(), grads64[1].float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize("teacher", FUSED_TEACHERS)
def test_fused_linear_token_stats_matches_unfused(ops, dtype, atol, rtol, teacher) -> None:
    _, _, ids, keep, _, _ = make_inputs(torch.float32)
    inputs = make_fused_inputs(dtype, torch.Generator().manual_seed(1), keep)
    kind = teacher.split("_", 1)[-1]
    want = dict(zip(("logprob", "entropy"), ref_stats(inputs.z64, ids, keep), strict=True))
    kw = {}
    if teacher != "none":
        kw, want["divergence"] = fused_teacher(teacher, inputs, keep, kind)
    out = ops.fused_linear_token_stats(
        inputs.xl, inputs.wl, ids, kind=kind if teacher != "none" else "reverse_kl", beta=0.4,
        temperature=TEMP, mask=keep, **ops.fused_options, **kw,
    )  # fmt: skip
    assert set(out) == set(want)
    g = {name: torch.randn(N) for name in want}
    loss = sum((out[name] * g[name]).sum() for name in want)
    loss64 = sum((want[name] * g[name].double()).sum() for name in want)
    for name in want:
        torch.testing.assert_close(out[name], want[name].float(), atol=atol, rtol=rtol)
        assert (out[name][~keep] == 0).all()
    check_fused_grads(inputs, loss, loss64, keep, dtype, atol, rtol)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
@pytest.mark.parametrize("teacher", ["full_reverse_kl", "full_jsd", "topk_forward_kl"])
def test_fused_linear_divergence_loss_matches_unfused(ops, dtype, atol, rtol, teacher) -> None:
    """The scalar loss `sum_r w_r D_r` and its gradients (computed in the forward, then scaled
    by a `grad_output` != 1) equal the float64 computation."""
    _, _, _, keep, _, _ = make_inputs(torch.float32)
    gen = torch.Generator().manual_seed(2)
    inputs = make_fused_inputs(dtype, gen, keep)
    weight = torch.rand(N, generator=gen) + 0.5
    kind = teacher.split("_", 1)[-1]
    kw, div64 = fused_teacher(teacher, inputs, keep, kind)
    options = {"chunk_rows": 8} if ops.fused_options else {}
    loss, div = ops.fused_linear_divergence_loss(
        inputs.xl, inputs.wl, weight=weight, kind=kind, beta=0.4, temperature=TEMP, mask=keep,
        **options, **kw,
    )  # fmt: skip
    loss64 = (div64 * weight.double()).sum()
    assert loss.shape == () and loss.dtype == torch.float32 and not div.requires_grad
    torch.testing.assert_close(div, div64.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(loss, loss64.float(), atol=atol * N, rtol=rtol)
    check_fused_grads(inputs, loss * 0.7, loss64 * 0.7, keep, dtype, atol, rtol)


def test_all_rows_masked_give_zeros_and_zero_gradients(ops) -> None:
    """Every row masked (a batch of padding): all outputs 0, every gradient exactly 0."""
    zs, zt, ids, _, t_ids, t_lps = make_inputs(torch.float32)
    none = torch.zeros(N, dtype=torch.bool)
    z = zs.clone().requires_grad_(True)
    outs = [
        *ops.sampled_logprob_entropy(z, ids, mask=none),
        ops.full_divergence(z, zt, kind="jsd", mask=none),
        ops.topk_divergence(z, t_ids, t_lps, support="union", mask=none),
    ]
    x = torch.randn(N, H).requires_grad_(True)
    w = torch.randn(V, H).requires_grad_(True)
    fused = ops.fused_linear_token_stats(
        x, w, ids, teacher_topk_ids=t_ids, teacher_topk_logprobs=t_lps, mask=none,
        **ops.fused_options,
    )  # fmt: skip
    outs += list(fused.values())
    for out in outs:
        assert (out == 0).all()
    grads = torch.autograd.grad(sum(o.sum() for o in outs), (z, x, w))
    for grad in grads:
        assert (grad == 0).all()


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (to prove no [N, V] logits exist)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_fused_never_materialises_full_logits() -> None:
    """No tensor as large as `[N, V]` on the torch path: the largest is the `[V, H]` weight
    (gradient). (The spec, `opd.kernels.reference`, holds the logits: memory is not its job.)"""
    n, v, h = 256, 1000, 32  # N*V = 256000 >> V*H = 32000 > one 16-row chunk of 16000
    x = torch.randn(n, h, requires_grad=True)
    w = torch.randn(v, h, requires_grad=True)
    xt, wt = torch.randn(n, h), torch.randn(v, h)
    with LargestTensor() as probe, override_impl("torch"):
        out = fused_linear_token_stats(
            x, w, torch.randint(0, v, (n,)), teacher_hidden=xt, teacher_weight=wt,
            kind="jsd", chunk_rows=16,
        )  # fmt: skip
        sum(o.sum() for o in out.values()).backward()
    assert probe.largest <= v * h
    assert w.grad is not None and torch.isfinite(w.grad).all()
