"""moe_kit.ops: routing plan, capacity, and moe_ffn backends against plain-torch references.

The reference `ref_moe_ffn` is dense: it runs every expert on every token, then combines the
outputs with a dense [N, E] routing-weight matrix. It never calls moe_kit.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_kit import GroupedExperts
from moe_kit.ops import moe_ffn, routing_plan, torch_ops
from moe_kit.ops.loop import moe_ffn_loop
from moe_kit.ops.torch_ops import moe_ffn_torch

HYP = settings(max_examples=30, deadline=None)
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
BACKENDS = ["torch", "loop"]


# ----------------------------------------------------------------------------- helpers


def assert_close(a, b, tol, what="", floor=1.0):
    """rel_err <= tol; the floor (values here are O(1)) keeps a small result formed by cancellation,
    e.g. one routing-weight gradient <cot, y> of a single token, from failing on rounding alone."""
    err = rel_err(a, b, floor)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


REF_ACT = {
    "silu": lambda g: g * torch.sigmoid(g),
    "gelu": lambda g: 0.5 * g * (1 + torch.erf(g / math.sqrt(2))),
    "gelu_tanh": lambda g: 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))),
    "relu": lambda g: g.clamp(min=0),
}


def ref_moe_ffn(x, weights, indices, gate_up, down, limit=None, activation="silu"):
    """Dense reference: every expert on every token, then select with a dense [N, E] weight matrix.

    Ids equal to E (dropped slots) land in an extra column that is thrown away.
    """
    num_experts, two_i, _ = gate_up.shape
    inter = two_i // 2
    h = torch.einsum("nd,emd->nem", x, gate_up)  # [N, E, 2I]
    gate, up = h[..., :inter], h[..., inter:]
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
    act = REF_ACT[activation](gate) * up  # silu: silu(gate) * up
    y = torch.einsum("nei,edi->ned", act, down)  # [N, E, D]
    dense = torch.zeros(x.shape[0], num_experts + 1, dtype=x.dtype)
    dense = dense.scatter_add(1, indices.long(), weights.to(x.dtype))[:, :num_experts]
    return torch.einsum("ne,ned->nd", dense, y)


def make_indices(gen, n, e, k, mode):
    """int64 [n, k] expert ids for a routing `mode`."""
    if mode == "random":  # distinct experts per token
        return torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)]) if n else torch.empty(0, k).long()
    if mode == "subset":  # only a few experts used: the others are empty
        used = torch.randperm(e, generator=gen)[: max(k, e // 3)]
        rows = [used[torch.randperm(used.numel(), generator=gen)[:k]] for _ in range(n)]
        return torch.stack(rows) if n else torch.empty(0, k).long()
    if mode == "one":  # every token picks the same k experts (k = 1: all tokens on one expert)
        return torch.randperm(e, generator=gen)[:k].repeat(n, 1)
    if mode == "dup":  # ids drawn with replacement: a token may name one expert twice
        return torch.randint(0, e, (n, k), generator=gen)
    raise AssertionError(mode)


def make_case(n, e, k, d, i, dtype, mode="random", seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(n, d, generator=gen, dtype=torch.float64)).to(dtype)
    weights = torch.rand(n, k, generator=gen, dtype=torch.float64).to(dtype)
    gate_up = (torch.randn(e, 2 * i, d, generator=gen, dtype=torch.float64) / math.sqrt(d)).to(dtype)
    down = (torch.randn(e, d, i, generator=gen, dtype=torch.float64) / math.sqrt(i)).to(dtype)
    indices = make_indices(gen, n, e, k, mode)
    cot = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    return x, weights, indices, gate_up, down, cot


def value_and_grads(fn, x, weights, gate_up, down, cot):
    """fn(x, weights, gate_up, down) -> out; returns (out, dx, dweights, dgate_up, ddown) for <out, cot>."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weights, gate_up, down)]
    out = fn(*leaves)
    if not out.requires_grad:  # a graph-less output (see test_moe_ffn_output_stays_in_autograd_graph)
        return (out.detach(), *(torch.zeros_like(t) for t in leaves))
    grads = torch.autograd.grad(out, leaves, grad_outputs=cot, allow_unused=True, materialize_grads=True)
    return (out.detach(), *grads)


NAMES = ("out", "grad_x", "grad_weights", "grad_gate_up", "grad_down")


def check_against_reference(n, e, k, d, i, dtype, mode, limit, backend, seed=0, int32=False):
    scale = 3.0 if limit is not None else 1.0  # make the clamp bite
    x, weights, indices, gate_up, down, cot = make_case(n, e, k, d, i, dtype, mode, seed, scale)
    if int32:
        indices = indices.int()
    got = value_and_grads(
        lambda *a: moe_ffn(a[0], a[1], indices, a[2], a[3], backend, swiglu_limit=limit), x, weights, gate_up, down, cot
    )
    wide = [t.double() for t in (x, weights, gate_up, down, cot)]  # the reference runs in fp64
    ref = value_and_grads(lambda *a: ref_moe_ffn(a[0], a[1], indices, a[2], a[3], limit), *wide)
    loop = value_and_grads(
        lambda *a: moe_ffn_loop(a[0], a[1], indices, a[2], a[3], limit), x, weights, gate_up, down, cot
    )
    for name, g, r, lp in zip(NAMES, got, ref, loop, strict=True):
        assert g.dtype == dtype and lp.dtype == dtype, name
        assert_close(g, r, TOL[dtype], f"{backend} {name} vs dense reference")
        assert_close(g, lp, TOL[dtype], f"{backend} {name} vs loop backend")
    return got


@pytest.fixture(autouse=True)
def sorted_path(monkeypatch):
    """Tiny cases here would take the decode path (N*k <= SMALL_ROWS); the tests of this module run
    the sorted path unless they ask for the decode path (small=True, see the decode-path section)."""
    monkeypatch.setattr(torch_ops, "SMALL_ROWS", 0)


@pytest.fixture
def gemm_paths(monkeypatch):
    """Record, for every torch-backend call, whether it took grouped_mm (True) or padded bmm (False)."""
    seen = []
    original = torch_ops.GroupedGemm

    class Spy(original):
        def __init__(self, plan, num_rows, use_grouped):
            seen.append(use_grouped)
            super().__init__(plan, num_rows, use_grouped)

    monkeypatch.setattr(torch_ops, "GroupedGemm", Spy)
    return seen


# ----------------------------------------------------------------------------- routing plan


def check_plan(indices, num_experts):
    n, k = indices.shape
    s = n * k
    flat = indices.reshape(-1).long()
    plan = routing_plan(indices, num_experts, has_dropped=bool((flat == num_experts).any()))
    kept = int((flat < num_experts).sum())
    assert plan.counts.dtype == torch.int64 and plan.counts.shape == (num_experts,)
    assert int(plan.counts.sum()) == kept
    assert torch.equal(plan.counts, torch.bincount(flat, minlength=num_experts + 1)[:num_experts])
    assert plan.offsets.shape == (num_experts + 1,) and int(plan.offsets[0]) == 0
    assert torch.equal(plan.offsets[1:], torch.cumsum(plan.counts, 0))
    # permutation and inverse
    assert torch.equal(plan.slot_of_row.sort().values, torch.arange(s))
    assert torch.equal(plan.row_of_slot[plan.slot_of_row], torch.arange(s))
    assert torch.equal(plan.slot_of_row[plan.row_of_slot], torch.arange(s))
    # expert order, token of each row, expert of each row
    assert bool((plan.expert_of_row[1:] >= plan.expert_of_row[:-1]).all())
    assert torch.equal(plan.token_of_row, plan.slot_of_row // k)
    assert torch.equal(plan.expert_of_row, flat[plan.slot_of_row])
    for e in range(num_experts):
        lo, hi = int(plan.offsets[e]), int(plan.offsets[e + 1])
        assert bool((plan.expert_of_row[lo:hi] == e).all())
        seg = plan.slot_of_row[lo:hi]
        assert bool((seg[1:] > seg[:-1]).all()), "slots of one expert keep token order (stable sort)"
    # dropped slots (id E) come last, after every kept row
    assert bool((plan.expert_of_row[kept:] == num_experts).all())
    assert int(plan.offsets[-1]) == kept
    return plan


@HYP
@given(
    n=st.integers(0, 24),
    e=st.integers(1, 9),
    data=st.data(),
)
def test_routing_plan_invariants(n, e, data):
    k = data.draw(st.integers(1, e), label="k")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    mode = data.draw(st.sampled_from(["random", "subset", "one", "dup"]), label="mode")
    drop = data.draw(st.floats(0.0, 1.0), label="drop_prob")
    gen = torch.Generator().manual_seed(seed)
    indices = make_indices(gen, n, e, k, mode)
    mask = torch.rand(indices.shape, generator=gen) < drop
    indices = torch.where(mask, torch.full_like(indices, e), indices)
    check_plan(indices, e)


@pytest.mark.parametrize(
    "indices, num_experts",
    [
        pytest.param(torch.empty(0, 2, dtype=torch.long), 4, id="N=0"),
        pytest.param(torch.tensor([[3, 1]]), 4, id="N=1"),
        pytest.param(torch.tensor([[2], [2], [2], [2]]), 5, id="all-on-one-expert"),
        pytest.param(torch.tensor([[5, 5], [5, 5]]), 5, id="all-dropped"),
        pytest.param(torch.tensor([[0, 1, 2], [2, 1, 0]], dtype=torch.int32), 3, id="k=E-int32"),
        pytest.param(torch.tensor([[4, 0], [0, 4], [1, 4]]), 4, id="some-dropped"),
    ],
)
def test_routing_plan_edge_cases(indices, num_experts):
    plan = check_plan(indices, num_experts)
    for t in (plan.slot_of_row, plan.token_of_row, plan.row_of_slot, plan.expert_of_row, plan.offsets):
        assert t.dtype == torch.int64


def test_routing_plan_known_values():
    indices = torch.tensor([[2, 0], [0, 1], [2, 3]])
    plan = routing_plan(indices, 5)
    assert plan.counts.tolist() == [2, 1, 2, 1, 0]
    assert plan.offsets.tolist() == [0, 2, 3, 5, 6, 6]
    assert plan.slot_of_row.tolist() == [1, 2, 3, 0, 4, 5]
    assert plan.token_of_row.tolist() == [0, 1, 1, 0, 2, 2]
    assert plan.expert_of_row.tolist() == [0, 0, 1, 2, 2, 3]


# ----------------------------------------------------------------------------- moe_ffn vs reference

F32, F64 = torch.float32, torch.float64

EDGE_CASES = [
    # n, e, k, d, i, dtype, mode, limit
    pytest.param(0, 4, 2, 8, 4, F32, "random", None, id="N=0"),
    pytest.param(1, 4, 2, 8, 4, F32, "random", None, id="N=1"),
    pytest.param(3, 16, 2, 8, 4, F32, "random", None, id="fewer-tokens-than-experts"),
    pytest.param(11, 7, 3, 12, 8, F32, "random", None, id="prime-E"),
    pytest.param(9, 5, 1, 8, 4, F32, "random", None, id="k=1"),
    pytest.param(6, 5, 5, 8, 4, F32, "random", None, id="k=E"),
    pytest.param(10, 8, 2, 8, 4, F32, "subset", None, id="empty-experts"),
    pytest.param(10, 6, 1, 8, 4, F32, "one", None, id="all-tokens-one-expert"),
    pytest.param(7, 6, 3, 8, 4, F32, "one", None, id="all-tokens-same-experts"),
    pytest.param(8, 4, 3, 8, 4, F32, "dup", None, id="duplicate-ids-in-a-row"),
    pytest.param(13, 5, 2, 33, 17, F32, "random", None, id="odd-D33-I17-fallback"),
    pytest.param(13, 5, 2, 33, 17, F32, "subset", None, id="odd-D33-I17-empty-experts"),
    pytest.param(16, 6, 2, 32, 16, F32, "random", None, id="aligned-fp32-grouped"),
    pytest.param(17, 6, 2, 20, 12, F32, "subset", None, id="aligned-fp32-grouped-empty-experts"),
    pytest.param(12, 5, 2, 16, 8, F64, "random", None, id="fp64-fallback"),
    pytest.param(0, 3, 2, 5, 3, F64, "random", None, id="fp64-N=0"),
    pytest.param(12, 5, 2, 16, 8, F32, "random", 1.0, id="swiglu-limit-grouped"),
    pytest.param(12, 5, 2, 33, 17, F32, "random", 1.0, id="swiglu-limit-fallback"),
    pytest.param(12, 5, 2, 16, 8, F64, "random", 0.7, id="swiglu-limit-fp64"),
]


def expected_grouped(dtype, d, i):
    return dtype == torch.float32 and d % 4 == 0 and i % 4 == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, e, k, d, i, dtype, mode, limit", EDGE_CASES)
def test_moe_ffn_edge_cases(n, e, k, d, i, dtype, mode, limit, backend, gemm_paths):
    got = check_against_reference(n, e, k, d, i, dtype, mode, limit, backend)
    assert got[0].shape == (n, d)
    if backend == "torch":
        assert gemm_paths, "torch backend did not run the sorted-experts GEMMs"
        if torch_ops._grouped_mm is not None and torch_ops._grouped_mm_works("cpu", torch.float32):
            assert set(gemm_paths) == {expected_grouped(dtype, d, i)}
    else:
        assert not gemm_paths


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_ffn_int32_indices(backend):
    check_against_reference(9, 5, 2, 8, 4, F32, "random", None, backend, int32=True)


@HYP
@given(
    n=st.integers(0, 20),
    e=st.integers(1, 8),
    d=st.sampled_from([4, 8, 16, 5, 9, 33]),
    i=st.sampled_from([4, 8, 3, 17]),
    dtype=st.sampled_from([F32, F64]),
    mode=st.sampled_from(["random", "subset", "one", "dup"]),
    limit=st.sampled_from([None, 1.0]),
    backend=st.sampled_from(BACKENDS),
    data=st.data(),
)
def test_moe_ffn_matches_reference_hypothesis(n, e, d, i, dtype, mode, limit, backend, data):
    k = data.draw(st.integers(1, e), label="k")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    check_against_reference(n, e, k, d, i, dtype, mode, limit, backend, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, drop_all", [pytest.param(0, False, id="N=0"), pytest.param(5, True, id="all-dropped")])
def test_moe_ffn_output_stays_in_autograd_graph(backend, n, drop_all):
    """Differentiable in x, weights and both weight tensors even when no slot reaches an expert:
    `loss.backward()` must work (zero gradients) rather than fail with "does not require grad"."""
    x, weights, indices, gate_up, down, _ = make_case(n, 4, 2, 8, 4, F32, seed=1)
    leaves = [t.requires_grad_(True) for t in (x, weights, gate_up, down)]
    if drop_all:  # ids == E mark dropped slots (internal entry points; moe_ffn rejects them)
        indices = torch.full_like(indices, 4)
        if backend == "torch":
            out = moe_ffn_torch(x, weights, indices, gate_up, down, has_dropped=True)
        else:
            out = moe_ffn_loop(x, weights, indices, gate_up, down)
    else:
        out = moe_ffn(x, weights, indices, gate_up, down, backend)
    assert out.requires_grad, f"{backend}: output of an empty dispatch is cut off from autograd"
    (out.sum() * 2).backward()
    for t in leaves:
        assert t.grad is not None and not bool(t.grad.any())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d, i", [pytest.param(16, 8, id="grouped"), pytest.param(9, 5, id="fallback")])
def test_moe_ffn_non_contiguous_inputs(d, i, backend):
    """Strided views (transposed storage, as HF or a user might hand over) give the same result."""
    x, weights, indices, gate_up, down, cot = make_case(11, 5, 2, d, i, F32, seed=8)
    x_t = x.t().contiguous().t()
    w_t = weights.t().contiguous().t()
    idx_t = indices.t().contiguous().t()
    gu_t = gate_up.transpose(1, 2).contiguous().transpose(1, 2)
    dn_t = down.transpose(0, 2).contiguous().transpose(0, 2)
    assert not (x_t.is_contiguous() or w_t.is_contiguous() or gu_t.is_contiguous() or dn_t.is_contiguous())
    got = value_and_grads(
        lambda *a: moe_ffn(a[0], a[1], idx_t, a[2], a[3], backend), x_t, w_t, gu_t, dn_t, cot
    )
    ref = value_and_grads(lambda *a: ref_moe_ffn(a[0], a[1], indices, a[2], a[3]), x, weights, gate_up, down, cot)
    for name, g, r in zip(NAMES, got, ref, strict=True):
        assert_close(g, r, 1e-5, f"{backend} {name}")


def test_moe_ffn_known_value():
    """One token, one expert, hand-computed: out = w * down @ (silu(g) * u)."""
    x = torch.tensor([[1.0, 2.0]], dtype=F64)
    gate_up = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=F64)  # I = 1: gate = x0, up = x1
    down = torch.tensor([[[3.0], [-1.0]]], dtype=F64)
    out = moe_ffn(x, torch.tensor([[0.5]], dtype=F64), torch.tensor([[0]]), gate_up, down, "torch")
    act = 1.0 / (1.0 + math.exp(-1.0)) * 2.0
    expected = torch.tensor([[0.5 * 3.0 * act, 0.5 * -1.0 * act]], dtype=F64)
    assert_close(out, expected, 1e-14, "known value")


def test_moe_ffn_weights_dtype_differs_from_x():
    """fp32 routing weights with fp64 activations: weights are cast for the combine, grads keep their dtype."""
    x, weights, indices, gate_up, down, cot = make_case(9, 4, 2, 8, 4, F64, seed=3)
    w32 = weights.float()
    for backend in BACKENDS:
        got = value_and_grads(
            lambda *a, b=backend: moe_ffn(a[0], a[1], indices, a[2], a[3], b), x, w32, gate_up, down, cot
        )
        ref = value_and_grads(lambda *a: ref_moe_ffn(a[0], a[1], indices, a[2], a[3]), x, w32, gate_up, down, cot)
        assert got[0].dtype == F64 and got[2].dtype == F32
        for name, g, r in zip(NAMES, got, ref, strict=True):
            assert_close(g, r, 1e-6, f"{backend} {name}")


# ----------------------------------------------------------------------------- gradcheck (fp64, fallback)


@pytest.mark.parametrize("limit", [None, 0.8], ids=["no-limit", "swiglu-limit"])
def test_moe_ffn_torch_gradcheck_fp64(limit, gemm_paths):
    gen = torch.Generator().manual_seed(1)
    n, e, k, d, i = 5, 3, 2, 4, 3
    x = torch.randn(n, d, generator=gen, dtype=F64, requires_grad=True)
    weights = torch.rand(n, k, generator=gen, dtype=F64, requires_grad=True)
    gate_up = torch.randn(e, 2 * i, d, generator=gen, dtype=F64, requires_grad=True)
    down = torch.randn(e, d, i, generator=gen, dtype=F64, requires_grad=True)
    indices = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [0, 2]])

    def fn(x, weights, gate_up, down):
        return moe_ffn(x, weights, indices, gate_up, down, "torch", swiglu_limit=limit)

    assert torch.autograd.gradcheck(fn, (x, weights, gate_up, down), eps=1e-6, atol=1e-7, rtol=1e-6)
    assert gemm_paths and not any(gemm_paths), "fp64 must take the padded-bmm fallback"


# ----------------------------------------------------------------------------- moe_ffn_torch internals


@pytest.mark.parametrize(
    "n, e, k, d, i",
    [
        pytest.param(14, 6, 2, 16, 8, id="grouped"),
        pytest.param(14, 6, 2, 33, 17, id="fallback"),
        pytest.param(0, 6, 2, 16, 8, id="N=0"),
    ],
)
def test_moe_ffn_torch_deterministic_flag(n, e, k, d, i):
    x, weights, indices, gate_up, down, cot = make_case(n, e, k, d, i, F32, seed=5)
    det = value_and_grads(
        lambda *a: moe_ffn_torch(a[0], a[1], indices, a[2], a[3], deterministic=True), x, weights, gate_up, down, cot
    )
    fast = value_and_grads(
        lambda *a: moe_ffn_torch(a[0], a[1], indices, a[2], a[3], deterministic=False), x, weights, gate_up, down, cot
    )
    ref = value_and_grads(lambda *a: ref_moe_ffn(a[0], a[1], indices, a[2], a[3]), x, weights, gate_up, down, cot)
    for name, a, b, r in zip(NAMES, det, fast, ref, strict=True):
        assert_close(a, b, 1e-6, f"{name} deterministic vs index_add")
        assert_close(a, r, 1e-5, f"{name} deterministic vs reference")


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize(
    "n, e, k, d, i, dtype, drop",
    [
        pytest.param(15, 5, 2, 16, 8, F32, 0.3, id="grouped"),
        pytest.param(15, 5, 2, 33, 17, F32, 0.3, id="fallback"),
        pytest.param(15, 5, 3, 6, 5, F64, 0.5, id="fp64"),
        pytest.param(6, 4, 2, 8, 4, F32, 1.0, id="all-dropped"),
        pytest.param(6, 4, 2, 8, 4, F32, 0.0, id="none-dropped"),
        pytest.param(0, 4, 2, 8, 4, F32, 0.5, id="N=0"),
    ],
)
def test_moe_ffn_torch_has_dropped_equals_loop(n, e, k, d, i, dtype, drop, deterministic):
    x, weights, indices, gate_up, down, cot = make_case(n, e, k, d, i, dtype, seed=7)
    gen = torch.Generator().manual_seed(11)
    indices = torch.where(torch.rand(indices.shape, generator=gen) < drop, torch.full_like(indices, e), indices)
    got = value_and_grads(
        lambda *a: moe_ffn_torch(a[0], a[1], indices, a[2], a[3], has_dropped=True, deterministic=deterministic),
        x, weights, gate_up, down, cot,
    )
    loop = value_and_grads(lambda *a: moe_ffn_loop(a[0], a[1], indices, a[2], a[3]), x, weights, gate_up, down, cot)
    ref = value_and_grads(lambda *a: ref_moe_ffn(a[0], a[1], indices, a[2], a[3]), x, weights, gate_up, down, cot)
    for name, g, lp, r in zip(NAMES, got, loop, ref, strict=True):
        assert_close(g, lp, TOL[dtype], f"{name} vs loop")
        assert_close(g, r, TOL[dtype], f"{name} vs reference")
    if n:  # dropped slots get no routing-weight gradient
        assert bool((got[2][indices == e] == 0).all())


# ----------------------------------------------------------------------------- memory discipline


def test_moe_ffn_torch_saves_no_gathered_rows():
    """The torch backend keeps h [S, 2I] (and x, the weights) between forward and backward, never x[token]
    [S, D] or the activation [S, I]; recompute="gemm1" keeps no [S, .] tensor at all."""
    n, e, k, d, i = 40, 4, 2, 24, 8
    x, weights, indices, gate_up, down, _ = make_case(n, e, k, d, i, F32, seed=3)
    leaves = [t.requires_grad_(True) for t in (x, weights, gate_up, down)]
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    for recompute, expected in (("act", [(n * k, 2 * i)]), ("gemm1", [])):
        shapes.clear()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = moe_ffn_torch(leaves[0], leaves[1], indices, leaves[2], leaves[3], recompute=recompute)
        row_shaped = [s for s in shapes if len(s) == 2 and s[0] == n * k]
        assert row_shaped == expected, (recompute, shapes)
        out.sum().backward()


@pytest.mark.parametrize("recompute", ["act", "gemm1"])
@pytest.mark.parametrize("d, i, limit", [pytest.param(16, 8, None, id="grouped"),
                                          pytest.param(33, 17, 1.0, id="fallback-limit")])
def test_moe_ffn_torch_recompute_and_column_chunks(recompute, d, i, limit, monkeypatch):
    """The backward's dX and d_gate_up made one group of experts at a time (forced with a tiny
    CHUNK_BYTES; the padded path never chunks) and the recompute="gemm1" mode equal the loop
    reference in the output and every gradient."""
    monkeypatch.setattr(torch_ops, "CHUNK_BYTES", 6 * d * 4)  # groups of about 6 rows: several experts each or one
    x, weights, indices, gate_up, down, cot = make_case(20, 7, 2, d, i, F32, "subset", seed=4, scale=3.0)
    plan = routing_plan(indices, 7)
    gemm = torch_ops.GroupedGemm(plan, 40, True)
    chunks = torch_ops._expert_chunks(plan, 40, d * 4, gemm, False, x.device)
    assert len(chunks) > 2 and chunks[0][0] == chunks[0][2] == 0 and chunks[-1][1] == 7 and chunks[-1][3] == 40
    assert all(a[1] == b[0] and a[3] == b[2] for a, b in zip(chunks, chunks[1:], strict=False))  # consecutive
    got = value_and_grads(lambda *a: moe_ffn_torch(a[0], a[1], indices, a[2], a[3], limit, recompute=recompute),
                          x, weights, gate_up, down, cot)
    loop = value_and_grads(lambda *a: moe_ffn_loop(a[0], a[1], indices, a[2], a[3], limit), x, weights, gate_up,
                           down, cot)
    for name, g, lp in zip(NAMES, got, loop, strict=True):
        assert_close(g, lp, 1e-5, f"{recompute} {name} vs loop")


# ----------------------------------------------------------------------------- decode path (small N*k)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 8),
    e=st.integers(1, 9),
    d=st.sampled_from([4, 8, 5, 16]),
    i=st.sampled_from([4, 3, 8]),
    dtype=st.sampled_from([F32, F64]),
    mode=st.sampled_from(["random", "subset", "one", "dup"]),
    limit=st.sampled_from([None, 1.0]),
    activation=st.sampled_from(["silu", "gelu", "gelu_tanh", "relu"]),
    drop=st.sampled_from([0.0, 0.4, 1.0]),
    data=st.data(),
)
def test_decode_path_matches_loop_hypothesis(n, e, d, i, dtype, mode, limit, activation, drop, data):
    """small_ffn (gathered expert weights, no plan) equals the loop reference in the output and all
    gradients, with dropped slots (id E), clamps and every activation; moe_ffn takes it when N*k is small."""
    k = data.draw(st.integers(1, e), label="k")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    x, weights, indices, gate_up, down, cot = make_case(n, e, k, d, i, dtype, mode, seed, 3.0 if limit else 1.0)
    gen = torch.Generator().manual_seed(seed)
    indices = torch.where(torch.rand(indices.shape, generator=gen) < drop, torch.full_like(indices, e), indices)
    got = value_and_grads(
        lambda *a: moe_ffn_torch(a[0], a[1], indices, a[2], a[3], limit, has_dropped=True, small=True,
                                 activation=activation), x, weights, gate_up, down, cot)
    loop = value_and_grads(lambda *a: moe_ffn_loop(a[0], a[1], indices, a[2], a[3], limit, activation), x, weights,
                           gate_up, down, cot)
    for name, g, lp in zip(NAMES, got, loop, strict=True):
        assert g.dtype == dtype, name
        assert_close(g, lp, TOL[dtype], f"decode {name} vs loop")


def test_moe_ffn_takes_decode_path_for_small_batches(monkeypatch, gemm_paths):
    monkeypatch.setattr(torch_ops, "SMALL_ROWS", 32)
    monkeypatch.setattr(torch_ops, "SMALL_EXPERTS_PER_ROW", 0)
    x, weights, indices, gate_up, down, cot = make_case(4, 6, 2, 16, 8, F32, seed=9)
    got = value_and_grads(lambda *a: moe_ffn(a[0], a[1], indices, a[2], a[3], "torch"), x, weights, gate_up, down, cot)
    assert not gemm_paths, "N*k = 8 must not build a routing plan"
    ref = value_and_grads(lambda *a: ref_moe_ffn(a[0], a[1], indices, a[2], a[3]), x, weights, gate_up, down, cot)
    for name, g, r in zip(NAMES, got, ref, strict=True):
        assert_close(g, r, 1e-5, f"{name} vs reference")
    x, weights, indices, gate_up, down, cot = make_case(17, 6, 2, 16, 8, F32, seed=9)
    value_and_grads(lambda *a: moe_ffn(a[0], a[1], indices, a[2], a[3], "torch"), x, weights, gate_up, down, cot)
    assert gemm_paths, "N*k = 34 > SMALL_ROWS takes the sorted path"


@pytest.mark.parametrize("n, e, k, d, i, dtype, mode, limit", EDGE_CASES)
def test_inference_path_matches_loop(n, e, k, d, i, dtype, mode, limit, monkeypatch):
    """Under no_grad on CPU the torch backend takes lean_forward (fp32, aligned widths) or the sorted
    forward without autograd.Function; both equal the loop reference."""
    taken = []
    real = torch_ops.lean_forward
    monkeypatch.setattr(torch_ops, "lean_forward", lambda *a: taken.append(1) or real(*a))
    x, weights, indices, gate_up, down, _ = make_case(n, e, k, d, i, dtype, mode, seed=3, scale=3.0)
    with torch.no_grad():
        got = moe_ffn(x, weights, indices, gate_up, down, "torch", swiglu_limit=limit)
        ref = moe_ffn_loop(x, weights, indices, gate_up, down, limit)
    assert_close(got, ref, TOL[dtype], "inference output vs loop")
    usable = torch_ops.use_grouped_mm(dtype, x.device, 2 * i, d, i)
    assert bool(taken) == (usable and n > 0)


# ----------------------------------------------------------------------------- activations


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("limit", [None, 1.0], ids=["no-limit", "limit"])
def test_moe_ffn_activations(activation, backend, limit):
    x, weights, indices, gate_up, down, cot = make_case(13, 5, 2, 16, 8, F32, seed=6, scale=3.0)
    got = value_and_grads(
        lambda *a: moe_ffn(a[0], a[1], indices, a[2], a[3], backend, swiglu_limit=limit, activation=activation),
        x, weights, gate_up, down, cot)
    wide = [t.double() for t in (x, weights, gate_up, down, cot)]
    ref = value_and_grads(lambda *a: ref_moe_ffn(a[0], a[1], indices, a[2], a[3], limit, activation), *wide)
    for name, g, r in zip(NAMES, got, ref, strict=True):
        assert_close(g, r, 1e-5, f"{backend} {activation} {name} vs dense reference")


def test_moe_ffn_recompute_keyword():
    x, weights, indices, gate_up, down, cot = make_case(21, 5, 2, 16, 8, F32, seed=12)
    lean = value_and_grads(lambda *a: moe_ffn(a[0], a[1], indices, a[2], a[3], "torch", recompute="gemm1"), x,
                           weights, gate_up, down, cot)
    default = value_and_grads(lambda *a: moe_ffn(a[0], a[1], indices, a[2], a[3], "torch"), x, weights, gate_up,
                              down, cot)
    for name, a, b in zip(NAMES, lean, default, strict=True):
        assert_close(a, b, 1e-6, f"recompute=gemm1 {name}")
    with pytest.raises(ValueError, match="recompute"):
        moe_ffn(x, weights, indices, gate_up, down, "torch", recompute="everything")


@pytest.mark.parametrize("deterministic", [None, True, False])
def test_moe_ffn_deterministic_keyword(deterministic, monkeypatch):
    """deterministic= picks the combine (fixed-order gather + sum, or index_add); every choice equals
    the loop reference in the output and all gradients, reaches the Triton backend unchanged through
    dispatch, and use_deterministic_algorithms turns False into True."""
    x, weights, indices, gate_up, down, cot = make_case(19, 6, 3, 16, 8, F32, seed=14)
    got = value_and_grads(lambda *a: moe_ffn(a[0], a[1], indices, a[2], a[3], "torch", deterministic=deterministic),
                          x, weights, gate_up, down, cot)
    ref = value_and_grads(lambda *a: moe_ffn(a[0], a[1], indices, a[2], a[3], "loop"), x, weights, gate_up, down, cot)
    for name, g, r in zip(NAMES, got, ref, strict=True):
        assert_close(g, r, 1e-5, f"deterministic={deterministic} {name}")
    seen = []
    monkeypatch.setattr(torch_ops, "moe_ffn_torch", lambda *a, **kw: seen.append(a[7]) or a[0])
    import moe_kit.ops as ops

    monkeypatch.setattr(ops, "moe_ffn_torch", torch_ops.moe_ffn_torch)
    ops.dispatch(x, weights, indices, gate_up, down, "torch", deterministic=deterministic)
    torch.use_deterministic_algorithms(True)
    try:
        ops.dispatch(x, weights, indices, gate_up, down, "torch", deterministic=deterministic)
    finally:
        torch.use_deterministic_algorithms(False)
    assert seen == [deterministic, True if deterministic is False else deterministic]


def test_moe_ffn_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        moe_ffn(*_good().values(), activation="swish")


# ----------------------------------------------------------------------------- torch.compile, autocast


def test_moe_ffn_compiles_fullgraph_dynamic():
    """torch.compile(fullgraph=True, dynamic=True): no graph break (fullgraph raises on one), forward and
    backward equal to eager, two token counts; the decode path is not taken while compiling."""
    def fn(x, weights, indices, gate_up, down):
        return moe_ffn(x, weights, indices, gate_up, down, "torch", swiglu_limit=2.0)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for n, seed in ((9, 1), (23, 2)):
        x, weights, indices, gate_up, down, cot = make_case(n, 6, 2, 16, 8, F32, seed=seed, scale=2.0)
        got = value_and_grads(lambda *a, ids=indices: compiled(a[0], a[1], ids, a[2], a[3]), x, weights, gate_up,
                              down, cot)
        eager = value_and_grads(lambda *a, ids=indices: fn(a[0], a[1], ids, a[2], a[3]), x, weights, gate_up, down,
                                cot)
        for name, g, r in zip(NAMES, got, eager, strict=True):
            assert_close(g, r, 1e-6, f"compiled {name} (N={n}) vs eager")


@pytest.mark.parametrize("d, i, dtype", [pytest.param(9, 5, F32, id="padded-fp32"), pytest.param(8, 4, F64, id="fp64")])
def test_dispatch_compiles_with_drops(d, i, dtype):
    """dispatch with dropped slots (id E) and the padded-bmm path trace with no graph break (aot_eager)."""
    from moe_kit.ops import dispatch

    def fn(x, weights, indices, gate_up, down):
        return dispatch(x, weights, indices, gate_up, down, "torch", has_dropped=True)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (11, 19):
        x, weights, indices, gate_up, down, cot = make_case(n, 5, 2, d, i, dtype, seed=n)
        indices[::3, 0] = 5  # dropped
        got = value_and_grads(lambda *a, ids=indices: compiled(a[0], a[1], ids, a[2], a[3]), x, weights, gate_up,
                              down, cot)
        loop = value_and_grads(lambda *a, ids=indices: moe_ffn_loop(a[0], a[1], ids, a[2], a[3]), x, weights,
                               gate_up, down, cot)
        for name, g, r in zip(NAMES, got, loop, strict=True):
            assert_close(g, r, TOL[dtype], f"compiled {name} (N={n}) vs loop")


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_ffn_under_autocast(backend):
    """torch.autocast(bf16) on CPU: no dtype error (the loop backend's index_add used to fail), the
    output keeps x's dtype and stays within bf16 rounding of the fp32 result."""
    x, weights, indices, gate_up, down, _ = make_case(12, 4, 2, 16, 8, F32, seed=8)
    ref = ref_moe_ffn(x, weights, indices, gate_up, down)
    leaves = [t.clone().requires_grad_(True) for t in (x, weights, gate_up, down)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe_ffn(leaves[0], leaves[1], indices, leaves[2], leaves[3], backend)
    assert out.dtype == F32
    assert rel_err(out, ref) < 3e-2
    out.sum().backward()
    assert all(t.grad is not None and t.grad.dtype == F32 for t in leaves)


# ----------------------------------------------------------------------------- swiglu_limit


def test_swiglu_limit_clamps_and_gradients():
    """With a limit, the result differs from the unclamped one and matches the clamped reference."""
    x, weights, indices, gate_up, down, cot = make_case(12, 4, 2, 8, 4, F64, seed=2, scale=4.0)
    limit = 0.5
    h = torch.einsum("nd,emd->nem", x, gate_up)
    assert bool((h[..., :4] > limit).any()) and bool((h[..., 4:].abs() > limit).any()), "clamp must bite"
    for backend in BACKENDS:
        got = value_and_grads(
            lambda *a, b=backend: moe_ffn(a[0], a[1], indices, a[2], a[3], b, swiglu_limit=limit),
            x, weights, gate_up, down, cot,
        )
        ref = value_and_grads(
            lambda *a: ref_moe_ffn(a[0], a[1], indices, a[2], a[3], limit), x, weights, gate_up, down, cot
        )
        free = value_and_grads(lambda *a: ref_moe_ffn(a[0], a[1], indices, a[2], a[3]), x, weights, gate_up, down, cot)
        for name, g, r, f in zip(NAMES, got, ref, free, strict=True):
            assert_close(g, r, 1e-12, f"{backend} {name} clamped")
            assert rel_err(g, f) > 1e-3, f"{backend} {name}: limit had no effect"


def test_swiglu_limit_huge_is_identity():
    x, weights, indices, gate_up, down, _ = make_case(10, 4, 2, 8, 4, F64, seed=4)
    a = moe_ffn(x, weights, indices, gate_up, down, "torch", swiglu_limit=1e6)
    b = moe_ffn(x, weights, indices, gate_up, down, "torch")
    assert_close(a, b, 1e-15, "huge limit")


# ----------------------------------------------------------------------------- expert biases, swiglu_oai (gpt-oss)


OAI = 1.702  # gpt-oss's swiglu_alpha


def ref_gpt_oss_gate(gate, up, limit):
    """transformers' GptOssExperts._apply_gate on [gate | up] halves, written out."""
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(gate * OAI))


def ref_biased_ffn(x, weights, indices, gate_up, down, b1, b2, limit=None, activation="silu"):
    """Dense reference with biases: every expert on every token (h + b1, y + b2), selected by a dense
    [N, E] weight matrix, so the down bias is weighted like the rest of the expert output."""
    num_experts, two_i, _ = gate_up.shape
    h = torch.einsum("nd,emd->nem", x, gate_up)  # [N, E, 2I]
    if b1 is not None:
        h = h + b1
    gate, up = h[..., : two_i // 2], h[..., two_i // 2:]
    if activation == "swiglu_oai":
        act = ref_gpt_oss_gate(gate, up, limit)
    else:
        if limit is not None:
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        act = REF_ACT[activation](gate) * up
    y = torch.einsum("nei,edi->ned", act, down)  # [N, E, D]
    if b2 is not None:
        y = y + b2
    dense = torch.zeros(x.shape[0], num_experts + 1, dtype=x.dtype)
    dense = dense.scatter_add(1, indices.long(), weights.to(x.dtype))[:, :num_experts]
    return torch.einsum("ne,ned->nd", dense, y)


BIAS_NAMES = (*NAMES, "grad_gate_up_bias", "grad_down_bias")


def make_biases(e, d, i, dtype, seed, which="both"):
    gen = torch.Generator().manual_seed(seed + 1)
    b1 = torch.randn(e, 2 * i, generator=gen, dtype=torch.float64).to(dtype)
    b2 = torch.randn(e, d, generator=gen, dtype=torch.float64).to(dtype)
    return (None if which == "down" else b1), (None if which == "gate_up" else b2)


def biased_value_and_grads(fn, tensors, cot):
    """fn(x, weights, gate_up, down, b1, b2) -> out; (out, and the gradient of <out, cot> for each of
    the six tensors: zeros for a bias that is None)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_outputs=cot, allow_unused=True, materialize_grads=True))
    return (out.detach(), *(torch.zeros(0) if t is None else next(grads) for t in leaves))


def test_swiglu_oai_matches_gpt_oss_and_its_hand_written_backward():
    """gated_act / gated_act_parts / gated_act_backward for "swiglu_oai" against transformers' formula
    and autograd, with values exactly on the clamp bounds (torch.clamp passes the gradient there)."""
    from moe_kit.activations import gated_act, gated_act_backward, gated_act_parts, gated_activation

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(9, 2 * 6, generator=gen, dtype=F64) * 3
    h[0, :3] = 1.5  # gate on the bound
    h[1, 6:9] = -1.5  # up on both bounds
    h[2, 6:9] = 1.5
    for limit in (None, 1.5):
        leaf = h.clone().requires_grad_(True)
        want = ref_gpt_oss_gate(leaf[:, :6], leaf[:, 6:], limit)
        grad_act = torch.randn(want.shape, generator=gen, dtype=F64)
        (want_grad,) = torch.autograd.grad(want, leaf, grad_act)
        assert_close(gated_activation(h, limit, "swiglu_oai"), want, 1e-15, "swiglu")
        assert_close(gated_act(h, "swiglu_oai", limit), want, 1e-15, "gated_act")
        out, activated = gated_act_parts(h, "swiglu_oai", limit)
        assert_close(out, want, 1e-15, "gated_act_parts")
        for known in (None, activated):
            got = gated_act_backward(grad_act, h, "swiglu_oai", limit, known)
            assert_close(got, want_grad, 1e-14, f"backward (activated given: {known is not None})")
    oai, silu = gated_activation(h, None, "swiglu_oai"), gated_activation(h, None, "silu")
    assert not torch.equal(oai, silu), "the offset and slope matter"


def test_gated_activation_is_named_for_what_it_computes_and_its_names_are_defined_once():
    """gated_activation(h, activation="gelu") is GeGLU (no function calls it swiglu any more), and
    the activation and backend names live in moe_kit.config only (the others import them)."""
    import moe_kit.activations as activations
    import moe_kit.config as config
    import moe_kit.ops as ops

    h = torch.randn(5, 2 * 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    gate, up = h.chunk(2, dim=-1)
    for name in ("gelu", "silu"):
        assert_close(activations.gated_activation(h, None, name), REF_ACT[name](gate) * up, 1e-14, name)
    assert not hasattr(activations, "swiglu") and not hasattr(ops, "swiglu")
    assert activations.ACTIVATIONS is config.ACTIVATIONS
    assert ops.BACKENDS is config.BACKENDS


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 16),
    e=st.integers(1, 7),
    d=st.sampled_from([4, 8, 16, 5]),
    i=st.sampled_from([4, 8, 3]),
    dtype=st.sampled_from([F32, F64]),
    mode=st.sampled_from(["random", "subset", "one", "dup"]),
    limit=st.sampled_from([None, 1.0]),
    activation=st.sampled_from(["swiglu_oai", "silu"]),
    which=st.sampled_from(["both", "both", "gate_up", "down"]),
    drop=st.sampled_from([0.0, 0.3, 1.0]),
    path=st.sampled_from(["sorted", "deterministic", "gemm1", "small", "pad_to"]),
    data=st.data(),
)
def test_expert_biases_match_reference_hypothesis(n, e, d, i, dtype, mode, limit, activation, which, drop, path,
                                                  data):
    """Output and all six gradients (x, weights, both weights, both biases) of the torch backend on
    each of its paths (sorted with index_add or the deterministic combine and segmented bias sums,
    recompute="gemm1", the decode path, static pad_to) and of the loop reference, against a dense
    fp64 reference; dropped slots (id E) contribute nothing, biases included."""
    k = data.draw(st.integers(1, e), label="k")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    x, weights, indices, gate_up, down, cot = make_case(n, e, k, d, i, dtype, mode, seed, 3.0 if limit else 1.0)
    gen = torch.Generator().manual_seed(seed)
    indices = torch.where(torch.rand(indices.shape, generator=gen) < drop, torch.full_like(indices, e), indices)
    b1, b2 = make_biases(e, d, i, dtype, seed, which)
    options = dict(sorted={}, deterministic=dict(deterministic=True), gemm1=dict(recompute="gemm1"),
                   small=dict(small=True))
    if path == "pad_to":
        counts = torch.bincount(indices.reshape(-1), minlength=e + 1)[:e]
        options["pad_to"] = dict(pad_to=int(counts.max()) + 1 if counts.numel() else 1)

    def torch_backend(a0, a1, a2, a3, a4, a5):
        return moe_ffn_torch(a0, a1, indices, a2, a3, limit, True, activation=activation, gate_up_proj_bias=a4,
                             down_proj_bias=a5, **options[path])

    def loop_backend(a0, a1, a2, a3, a4, a5):
        return moe_ffn_loop(a0, a1, indices, a2, a3, limit, activation, gate_up_proj_bias=a4, down_proj_bias=a5)

    tensors = (x, weights, gate_up, down, b1, b2)
    got = biased_value_and_grads(torch_backend, tensors, cot)
    loop = biased_value_and_grads(loop_backend, tensors, cot)
    wide = [None if t is None else t.double() for t in tensors]
    ref = biased_value_and_grads(lambda *a: ref_biased_ffn(a[0], a[1], indices, *a[2:], limit, activation), wide,
                                 cot.double())
    for name, g, lp, r in zip(BIAS_NAMES, got, loop, ref, strict=True):
        assert g.dtype == lp.dtype == dtype or not g.numel(), name
        assert_close(lp, r, TOL[dtype], f"loop {name} vs dense reference")
        assert_close(g, r, TOL[dtype], f"torch ({path}) {name} vs dense reference")


@pytest.mark.parametrize("small", [False, True], ids=["sorted", "decode"])
def test_expert_biases_gradcheck_fp64(small):
    """torch.autograd.gradcheck of the torch backend's hand-written backward with both biases,
    swiglu_oai and a clamp that bites, one dropped slot."""
    x, weights, indices, gate_up, down, _ = make_case(5, 3, 2, 4, 3, F64, seed=5, scale=2.0)
    indices[1, 0] = 3  # dropped
    b1, b2 = make_biases(3, 4, 3, F64, seed=5)
    leaves = [t.clone().requires_grad_(True) for t in (x, weights, gate_up, down, b1, b2)]
    assert torch.autograd.gradcheck(
        lambda *a: moe_ffn_torch(a[0], a[1], indices, a[2], a[3], 0.8, True, activation="swiglu_oai", small=small,
                                 gate_up_proj_bias=a[4], down_proj_bias=a[5]), leaves)


def test_expert_biases_compile_fullgraph_with_drops():
    """dispatch with biases, swiglu_oai and dropped slots traces with no graph break (the custom ops
    take the optional bias tensors); forward and every gradient equal the loop reference."""
    from moe_kit.ops import dispatch

    def fn(x, weights, indices, gate_up, down, b1, b2):
        return dispatch(x, weights, indices, gate_up, down, "torch", 1.0, has_dropped=True, activation="swiglu_oai",
                        gate_up_proj_bias=b1, down_proj_bias=b2)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x, weights, indices, gate_up, down, cot = make_case(15, 5, 2, 16, 8, F32, seed=3, scale=3.0)
    indices[::4, 1] = 5  # dropped
    tensors = (x, weights, gate_up, down, *make_biases(5, 16, 8, F32, seed=3))
    got = biased_value_and_grads(lambda *a: compiled(a[0], a[1], indices, *a[2:]), tensors, cot)
    loop = biased_value_and_grads(
        lambda *a: moe_ffn_loop(a[0], a[1], indices, a[2], a[3], 1.0, "swiglu_oai", gate_up_proj_bias=a[4],
                                down_proj_bias=a[5]), tensors, cot)
    for name, g, r in zip(BIAS_NAMES, got, loop, strict=True):
        assert_close(g, r, 1e-5, f"compiled {name} vs loop")


def test_expert_biases_without_grad_skip_lean_forward(monkeypatch):
    """Inference (no_grad, CPU, fp32, aligned widths) with biases takes the sorted forward, not
    lean_forward (which has no biases); the result equals the loop reference."""
    taken = []
    real = torch_ops.lean_forward
    monkeypatch.setattr(torch_ops, "lean_forward", lambda *a: taken.append(1) or real(*a))
    x, weights, indices, gate_up, down, _ = make_case(21, 6, 2, 16, 8, F32, seed=4, scale=3.0)
    b1, b2 = make_biases(6, 16, 8, F32, seed=4)
    with torch.no_grad():
        got = moe_ffn(x, weights, indices, gate_up, down, "torch", swiglu_limit=1.0, activation="swiglu_oai",
                      gate_up_proj_bias=b1, down_proj_bias=b2)
        ref = moe_ffn_loop(x, weights, indices, gate_up, down, 1.0, "swiglu_oai", gate_up_proj_bias=b1,
                           down_proj_bias=b2)
    assert_close(got, ref, 1e-5, "no-grad output vs loop")
    assert not taken


@pytest.mark.parametrize("kw, feature", [
    pytest.param(dict(bias=True), "expert biases", id="both-biases"),
    pytest.param(dict(down_bias=True), "expert biases", id="down-bias"),
    pytest.param(dict(activation="swiglu_oai"), "swiglu_oai", id="swiglu_oai"),
    pytest.param(dict(activation="gelu"), "gelu", id="gelu"),
])
def test_triton_by_name_raises_for_features_its_kernels_lack(kw, feature, monkeypatch):
    """backend="triton" asked for by name with expert biases or another activation than silu (no
    Triton kernels for them) raises a ValueError naming the feature, never runs the torch backend
    silently; "auto" runs the torch backend and equals the loop reference."""
    import moe_kit.ops as ops

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, weights, indices, gate_up, down, _ = make_case(9, 4, 2, 16, 8, F32, seed=1)
    b1, b2 = make_biases(4, 16, 8, F32, seed=1)
    call = dict(activation=kw.get("activation", "silu"))
    if kw.get("bias"):
        call.update(gate_up_proj_bias=b1, down_proj_bias=b2)
    if kw.get("down_bias"):
        call.update(down_proj_bias=b2)
    with pytest.raises(ValueError, match=feature):
        moe_ffn(x, weights, indices, gate_up, down, "triton", **call)
    with pytest.raises(ValueError, match=feature):  # at build time too, on any machine
        GroupedExperts(4, 16, 8, bias=bool(kw.get("bias") or kw.get("down_bias")), activation=call["activation"],
                       backend="triton")
    got = moe_ffn(x, weights, indices, gate_up, down, "auto", **call)
    ref = moe_ffn_loop(x, weights, indices, gate_up, down, None, call["activation"],
                       gate_up_proj_bias=call.get("gate_up_proj_bias"), down_proj_bias=call.get("down_proj_bias"))
    assert_close(got, ref, 1e-5, f"auto fallback {sorted(kw)}")
    assert ops.resolve_backend("auto", x.device) == "torch"


@pytest.mark.parametrize(
    "bias, value, exc, match",
    [
        pytest.param("gate_up_proj_bias", lambda e, d, i: torch.zeros(e, i), ValueError, r"gate_up_proj_bias \(3, 4\)",
                     id="gate-up-bias-shape"),
        pytest.param("down_proj_bias", lambda e, d, i: torch.zeros(e + 1, d), ValueError, r"down_proj_bias \(4, 8\)",
                     id="down-bias-shape"),
        pytest.param("down_proj_bias", lambda e, d, i: torch.zeros(e, d, dtype=F64), TypeError,
                     r"down_proj_bias \(torch.float64\)", id="down-bias-dtype"),
        pytest.param("gate_up_proj_bias", lambda e, d, i: torch.zeros(e, 2 * i, dtype=torch.long), TypeError,
                     "gate_up_proj_bias must be a floating-point", id="gate-up-bias-int"),
    ],
)
def test_expert_bias_inputs_are_checked(bias, value, exc, match):
    args = _good()
    with pytest.raises(exc, match=match):
        moe_ffn(*args.values(), "torch", **{bias: value(3, 8, 4)})


# ----------------------------------------------------------------------------- errors


def _good(n=4, e=3, k=2, d=8, i=4, dtype=F32):
    x, weights, indices, gate_up, down, _ = make_case(n, e, k, d, i, dtype, seed=0)
    return dict(x=x, weights=weights, indices=indices, gate_up_proj=gate_up, down_proj=down)


def _call(args, backend="torch"):
    return moe_ffn(args["x"], args["weights"], args["indices"], args["gate_up_proj"], args["down_proj"], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_id", [-1, 3, 7], ids=["negative", "equal-E", "above-E"])
def test_moe_ffn_expert_id_out_of_range(bad_id, backend):
    args = _good()
    args["indices"] = args["indices"].clone()
    args["indices"][2, 1] = bad_id
    with pytest.raises(IndexError) as info:
        _call(args, backend)
    message = str(info.value)
    assert str(bad_id) in message and "expert" in message, message


@pytest.mark.parametrize(
    "field, value, exc",
    [
        pytest.param("weights", torch.rand(4, 3), ValueError, id="weights-k-mismatch"),
        pytest.param("weights", torch.rand(5, 2), ValueError, id="weights-N-mismatch"),
        pytest.param("indices", torch.zeros(4, 3, dtype=torch.long), ValueError, id="indices-k-mismatch"),
        pytest.param("indices", torch.zeros(4, dtype=torch.long), ValueError, id="indices-1d"),
        pytest.param("indices", torch.zeros(4, 2), TypeError, id="float-indices"),
        pytest.param("x", torch.ones(4, 8, dtype=torch.long), TypeError, id="integer-x"),
        pytest.param("x", torch.ones(4, 8, dtype=torch.int32), TypeError, id="int32-x"),
        pytest.param("x", torch.randn(2, 2, 8), ValueError, id="3d-x"),
        pytest.param("weights", torch.ones(4, 2, dtype=torch.long), TypeError, id="integer-weights"),
        pytest.param("gate_up_proj", torch.randn(3, 8, 9), ValueError, id="gate_up-wrong-D"),
        pytest.param("gate_up_proj", torch.randn(3, 7, 8), ValueError, id="gate_up-odd-2I"),
        pytest.param("gate_up_proj", torch.randn(3, 8, 8, 1), ValueError, id="gate_up-4d"),
        pytest.param("down_proj", torch.randn(3, 8, 5), ValueError, id="down-wrong-I"),
        pytest.param("down_proj", torch.randn(2, 8, 4), ValueError, id="down-wrong-E"),
        pytest.param("down_proj", torch.randn(3, 4, 8), ValueError, id="down-transposed"),
        pytest.param("gate_up_proj", torch.randn(3, 8, 8, dtype=F64), TypeError, id="gate_up-dtype"),
        pytest.param("down_proj", torch.randn(3, 8, 4, dtype=torch.bfloat16), TypeError, id="down-dtype"),
    ],
)
def test_moe_ffn_bad_inputs(field, value, exc):
    args = _good()
    args[field] = value
    with pytest.raises(exc):
        _call(args)


def test_moe_ffn_error_messages_name_the_problem():
    args = _good()
    args["weights"] = torch.rand(4, 3)
    with pytest.raises(ValueError, match="weights"):
        _call(args)
    args = _good()
    args["x"] = args["x"].long()
    with pytest.raises(TypeError, match="x"):
        _call(args)
    args = _good()
    args["gate_up_proj"] = args["gate_up_proj"].double()
    with pytest.raises(TypeError, match="dtype|float64"):
        _call(args)


def test_auto_is_torch_until_the_gpu_suite_passed(monkeypatch):
    """backend="auto" resolves to "torch" on CUDA too while TRITON_GPU_SUITE_PASSED is False
    (the Triton kernels have not yet passed benchmarks/gpu_suite.py on a real GPU)."""
    from moe_kit import ops

    assert ops.TRITON_GPU_SUITE_PASSED is False
    assert ops.resolve_backend("auto", torch.device("cuda")) == "torch"
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setattr(ops, "TRITON_GPU_SUITE_PASSED", True)
    assert ops.resolve_backend("auto", torch.device("cuda")) == ("triton" if ops.triton_importable() else "torch")
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_moe_ffn_backend_names():
    args = _good()
    with pytest.raises(ValueError, match="cuda-magic"):
        _call(args, "cuda-magic")
    with pytest.raises(ValueError, match="triton"):
        _call(args, "triton")
    auto = _call(args, "auto")
    ref = ref_moe_ffn(args["x"], args["weights"], args["indices"], args["gate_up_proj"], args["down_proj"])
    assert_close(auto, ref, 1e-5, "auto backend")
