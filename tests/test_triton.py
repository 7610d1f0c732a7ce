"""moe_kit.ops.triton in Triton's interpreter (fp32, tiny shapes) against the loop reference.

Legend: N tokens, k slots per token, S = N*k rows, E experts, D model width, I expert hidden width.

The interpreter only works when triton itself is first imported with TRITON_INTERPRET=1 (its
standard library, tl.cdiv, tl.sum, ..., is decorated at import). So at collection this module
imports triton and moe_kit.ops.triton with the variable set, then restores it: other test
modules still see it unset, and the `tk` fixture sets it again around these tests only. When
another module imported triton first (or a GPU is present, whose triton must stay compiled),
test_module_in_fresh_process reruns this file in a fresh interpreted process and the in-process
tests skip. Errors are normwise: ||a - b|| / ||b||. Both per-token combines are tested: "fused"
(deterministic=False, atomic adds in the GEMM epilogue; the default on CPU) and "slot-order"
(deterministic=True, the [S, D] buffer; the default on CUDA). The interpreter runs atomics one
after another, so only the GPU shows the fused combine's run-to-run differences. Nothing here
runs on a GPU: benchmarks/gpu_suite.py is the GPU check.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_kit.ops.loop import moe_ffn_loop

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

HYP = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = 1e-5
_CHILD_ENV = "MOE_KIT_TRITON_TEST_CHILD"  # set in the fresh process test_module_in_fresh_process starts


def _import_interpreted() -> bool:
    """Import triton and moe_kit.ops.triton for the interpreter if this process still can."""
    if "triton" in sys.modules:
        import triton.language as tl

        return type(tl.cdiv).__name__ == "InterpretedFunction"  # was triton's first import interpreted?
    if torch.cuda.is_available() and os.environ.get(_CHILD_ENV) != "1":
        return False  # keep this process's triton compiling for the GPU
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        importlib.import_module("moe_kit.ops.triton")
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    return True


IN_PROCESS = _import_interpreted()


@pytest.fixture(scope="module")
def tk():
    """The moe_kit.ops.triton package, with TRITON_INTERPRET=1 set while this module's tests run."""
    if not IN_PROCESS:
        pytest.skip("triton was imported without the interpreter: test_module_in_fresh_process runs these")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        package = importlib.import_module("moe_kit.ops.triton")
        if not package.compat.INTERPRETED:
            pytest.skip("moe_kit.ops.triton was imported earlier without TRITON_INTERPRET=1")
        yield package
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def test_module_in_fresh_process():
    """Rerun this file in a fresh process when this one cannot interpret (see the module docstring)."""
    if IN_PROCESS:
        pytest.skip("this process runs the interpreter tests itself")
    env = {**os.environ, "TRITON_INTERPRET": "1", _CHILD_ENV: "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


# ----------------------------------------------------------------------------- helpers


def make_indices(gen, n, e, k, mode):
    """int64 [n, k] expert ids for a routing `mode`."""
    if n == 0:
        return torch.empty(0, k, dtype=torch.long)
    if mode == "random":  # distinct experts per token
        return torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    if mode == "subset":  # few experts used, the others empty
        used = torch.randperm(e, generator=gen)[: max(k, e // 3)]
        return torch.stack([used[torch.randperm(used.numel(), generator=gen)[:k]] for _ in range(n)])
    if mode == "one":  # every token picks the same k experts (k = 1: all tokens on one expert)
        return torch.randperm(e, generator=gen)[:k].repeat(n, 1)
    if mode == "dup":  # drawn with replacement: a token may name one expert twice
        return torch.randint(0, e, (n, k), generator=gen)
    raise AssertionError(mode)


def make_case(n, e, k, d, i, mode="random", seed=0, drop_every=0):
    """fp32 leaves x [n, d], weights [n, k], gate_up [e, 2i, d], down [e, d, i]; ids int64 [n, k].

    Weights are scaled by 1/sqrt(width) so h ~ N(0, 1) and a limit near 1 clamps some entries.
    drop_every > 0 marks every drop_every-th slot dropped (id e).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    weights = torch.rand(n, k, generator=gen)
    gate_up = torch.randn(e, 2 * i, d, generator=gen) / d**0.5
    down = torch.randn(e, d, i, generator=gen) / i**0.5
    indices = make_indices(gen, n, e, k, mode)
    if drop_every:
        indices.view(-1)[::drop_every] = e
    leaves = [t.requires_grad_() for t in (x, weights, gate_up, down)]
    return leaves, indices


def grads(out, leaves, seed=1):
    """Gradients of <out, g> for a fixed random g; zeros for leaves out is independent of."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)  # fp32 values
    got = torch.autograd.grad(out, leaves, g, allow_unused=True)
    return [torch.zeros_like(t) if d is None else d for d, t in zip(got, leaves, strict=True)]


def check_against_loop(tk, leaves, indices, limit=None, has_dropped=False, deterministic=False):
    """Triton (fp32) output and all four gradients against moe_ffn_loop run in fp64 on the same
    inputs, so the error measured is the kernels' own; returns the worst error. deterministic
    picks the combine: False the fused atomic one, True the slot-order buffer.

    Every tensor is judged normwise, ||a - b|| / ||b||, except the routing-weight gradient: each
    of its entries is one dot product <grad_out[n], y[n, j]> (y the slot's expert output), which
    can cancel to far below its terms (N = 1 gives a 1 x k vector of such sums), so its error is
    taken relative to the scale of those terms: ||a - b|| / ||(|grad_out[n]| * |y[n, j]|)||.
    """
    out = tk.moe_ffn_triton(*leaves[:2], indices, *leaves[2:], limit, has_dropped, deterministic)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    ref = moe_ffn_loop(*exact[:2], indices, *exact[2:], limit)
    worst = rel_err(out, ref)
    assert worst <= TOL, f"output: {worst:.2e}"
    if out.numel() == 0:
        return worst
    got, want = grads(out, leaves), grads(ref, exact)
    for name, g, w in zip(("x", "gate_up", "down"), got[::2] + got[3:], want[::2] + want[3:], strict=True):
        err = rel_err(g, w)
        assert err <= TOL, f"grad {name}: {err:.2e}"
        worst = max(worst, err)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).double()  # the g of grads()
    ones = torch.ones(indices.shape[0], 1, dtype=torch.float64)
    with torch.no_grad():
        slot_out = torch.stack([moe_ffn_loop(exact[0], ones, indices[:, j : j + 1], *exact[2:], limit)
                                for j in range(indices.shape[1])], 1)  # [N, k, D]: y[n, j]
    scale = (grad_out.abs().unsqueeze(1) * slot_out.abs()).sum(-1)  # [N, k]
    err = (got[1].double() - want[1]).norm().item() / max(scale.norm().item(), 1e-300)
    assert err <= TOL, f"grad weights: {err:.2e} (relative to the scale of its dot products)"
    return max(worst, err)


# ----------------------------------------------------------------------------- routing plan + schedule


@HYP
@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=9),
    block_m=st.sampled_from([16, 32, 64]),
)
def test_tile_schedule_invariants(tk, counts, block_m):
    from moe_kit.ops.routing import routing_plan
    from moe_kit.ops.triton.schedule import num_row_blocks, tile_schedule, tile_schedule_reference

    num_experts = len(counts)
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)] + [torch.empty(0, dtype=torch.long)])
    ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(0))].view(-1, 1)
    plan = routing_plan(ids, num_experts)
    num_rows = ids.numel()
    # routing plan: counts sum to S, offsets are their prefix sum, slot_of_row a permutation
    assert plan.counts.tolist() == counts
    assert plan.offsets[0] == 0 and torch.equal(plan.offsets[1:], torch.cumsum(plan.counts, 0))
    assert torch.equal(torch.sort(plan.slot_of_row).values, torch.arange(num_rows))
    assert torch.equal(plan.row_of_slot[plan.slot_of_row], torch.arange(num_rows))

    table = tile_schedule(plan.counts, plan.offsets, num_rows, block_m)
    assert table.dtype == torch.int32
    assert table.shape == (3, num_row_blocks(num_rows, num_experts, block_m))
    assert torch.equal(table, tile_schedule_reference(plan.offsets, num_rows, block_m))
    expert, start, end = table.long()
    live = expert >= 0
    assert bool(live[: int(live.sum())].all()), "idle blocks must come last"
    covered = torch.zeros(num_rows, dtype=torch.long)
    for e, lo, hi in zip(expert[live].tolist(), start[live].tolist(), end[live].tolist(), strict=True):
        assert plan.offsets[e] <= lo < hi == plan.offsets[e + 1]
        covered[lo : min(lo + block_m, hi)] += 1
        assert bool((plan.expert_of_row[lo : min(lo + block_m, hi)] == e).all())
    assert bool((covered == 1).all()), "every row in exactly one block"


def test_tile_schedule_dropped_rows_are_unowned(tk):
    from moe_kit.ops.routing import routing_plan
    from moe_kit.ops.triton.schedule import tile_schedule

    ids = torch.tensor([[0, 3], [3, 1], [2, 3], [0, 1]])  # E = 3: id 3 is a dropped slot
    plan = routing_plan(ids, 3, has_dropped=True)
    table = tile_schedule(plan.counts, plan.offsets, ids.numel(), 16)
    live = table[0] >= 0
    assert int(table[2][live].max()) == int(plan.offsets[-1]) == 5


def test_tile_of_program_visits_every_tile_once(tk):
    import triton
    import triton.language as tl

    global tile_of_program  # the interpreter resolves a kernel's callees in its module's globals
    from moe_kit.ops.triton.schedule import tile_of_program

    @triton.jit
    def visit(out_ptr, num_blocks, num_n, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        block, pid_n = tile_of_program(pid, num_blocks, num_n, GROUP_M)
        tl.store(out_ptr + pid * 2, block)
        tl.store(out_ptr + pid * 2 + 1, pid_n)

    for num_blocks, num_n in ((1, 1), (13, 3), (8, 5), (20, 1)):
        out = torch.full((num_blocks * num_n, 2), -1, dtype=torch.int32)
        visit[(num_blocks * num_n,)](out, num_blocks, num_n, GROUP_M=8)
        pairs = {tuple(p) for p in out.tolist()}
        assert pairs == {(b, n) for b in range(num_blocks) for n in range(num_n)}


# ----------------------------------------------------------------------------- single kernels vs their references


def _plan_case(n=11, e=4, k=2, d=37, i=21, seed=3):
    from moe_kit.ops.routing import routing_plan
    from moe_kit.ops.triton.schedule import tile_schedule

    (x, w, gu, dn), ids = make_case(n, e, k, d, i, "random", seed)
    plan = routing_plan(ids, e)
    table = tile_schedule(plan.counts, plan.offsets, ids.numel(), 16)
    return x.detach(), w.detach(), gu.detach(), dn.detach(), plan, table


@pytest.mark.parametrize("limit", [None, 0.8], ids=["no-limit", "limit"])
def test_gemm1_swiglu_kernel(tk, limit):
    from moe_kit.ops.triton import gemm1_swiglu as mod

    x, _, gu, _, plan, table = _plan_case()
    h, act = mod.gemm1_swiglu(x, gu, plan.token_of_row, table, 16, limit, store_h=True)
    h_ref, act_ref = mod._reference(x, gu, plan.token_of_row, plan.expert_of_row, limit)
    assert rel_err(h, h_ref) <= TOL and rel_err(act, act_ref) <= TOL
    h_none, act_again = mod.gemm1_swiglu(x, gu, plan.token_of_row, table, 16, limit, store_h=False)
    assert h_none.shape == (0, h.shape[1]) and torch.equal(act_again, act)


@pytest.mark.parametrize("transpose", [True, False], ids=["gemm2-down", "dx-gate-up"])
def test_scatter_gemm_kernel(tk, transpose):
    from moe_kit.ops.triton import scatter_gemm as mod

    x, w, gu, dn, plan, table = _plan_case()
    weight = dn if transpose else gu  # [E, D, I] used as W^T, or [E, 2I, D] used as W
    width_k = weight.shape[2] if transpose else weight.shape[1]
    a = torch.randn(plan.slot_of_row.numel(), width_k)
    scale = w.reshape(-1) if transpose else None
    out = mod.scatter_gemm(a, weight, transpose, plan.slot_of_row, table, 16, scale=scale)
    w_km = weight.transpose(1, 2) if transpose else weight
    assert rel_err(out, mod._reference(a, w_km, plan.expert_of_row, plan.slot_of_row, scale)) <= TOL


@pytest.mark.parametrize("transpose", [True, False], ids=["gemm2-down", "dx-gate-up"])
def test_combine_gemm_kernel(tk, transpose):
    """The fused epilogue: rows summed per token in fp32, dropped slots (id E) adding nothing."""
    from moe_kit.ops.routing import routing_plan
    from moe_kit.ops.triton import scatter_gemm as mod
    from moe_kit.ops.triton.schedule import tile_schedule

    (_, w, gu, dn), ids = make_case(11, 4, 3, 37, 21, "dup", seed=3, drop_every=4)
    plan = routing_plan(ids, 4, has_dropped=True)
    table = tile_schedule(plan.counts, plan.offsets, ids.numel(), 16)
    weight = (dn if transpose else gu).detach()
    width_k = weight.shape[2] if transpose else weight.shape[1]
    a = torch.randn(ids.numel(), width_k)
    scale = w.detach().reshape(-1) if transpose else None
    out = mod.combine_gemm(a, weight, transpose, plan.token_of_row, plan.slot_of_row, 11, table, 16, scale=scale)
    w_km = weight.transpose(1, 2) if transpose else weight
    ref = mod._combine_reference(a, w_km, plan.expert_of_row, plan.slot_of_row, plan.token_of_row, 11, scale)
    assert out.shape == (11, w_km.shape[2]) and rel_err(out, ref) <= TOL
    # 16-bit inputs still accumulate in fp32 (fp16 here: the interpreter's bf16 dot is unreliable)
    half = mod.combine_gemm(a.half(), weight.half(), transpose, plan.token_of_row, plan.slot_of_row, 11,
                            table, 16, scale=scale)
    assert half.dtype == torch.float32 and rel_err(half, ref) <= 5e-3


@pytest.mark.parametrize("limit", [None, 0.8], ids=["no-limit", "limit"])
def test_swiglu_backward_kernel(tk, limit):
    from moe_kit.ops.triton import swiglu_backward as mod

    x, w, gu, dn, plan, table = _plan_case()
    h = torch.randn(plan.slot_of_row.numel(), 2 * dn.shape[2])
    grad_out = torch.randn_like(x)
    w_flat = w.reshape(-1)
    d_h, d_w = mod.swiglu_backward(grad_out, dn, h, plan.token_of_row, plan.slot_of_row, w_flat, table, 16, limit)
    d_h_ref, d_w_ref = mod._reference(grad_out, dn, h, plan.token_of_row, plan.expert_of_row, plan.slot_of_row,
                                      w_flat, limit)
    assert rel_err(d_h, d_h_ref) <= TOL and rel_err(d_w, d_w_ref) <= TOL


def test_weight_grad_kernel(tk):
    from moe_kit.ops.triton import weight_grad as mod

    x, w, gu, dn, plan, _ = _plan_case(e=5, k=1)  # k = 1 over 5 experts leaves some empty
    num_rows = plan.slot_of_row.numel()
    a, b = torch.randn(num_rows, 19), torch.randn(num_rows, 23)
    out = mod.expert_weight_grad(a, x, plan.offsets, torch.float32, b_index=plan.token_of_row)
    assert rel_err(out, mod._reference(a, x, plan.offsets, b_index=plan.token_of_row)) <= TOL
    scale = w.reshape(-1)
    out = mod.expert_weight_grad(x, b, plan.offsets, torch.float32, a_index=plan.token_of_row, scale=scale,
                                 scale_index=plan.slot_of_row)
    ref = mod._reference(x, b, plan.offsets, a_index=plan.token_of_row, scale=scale[plan.slot_of_row])
    assert rel_err(out, ref) <= TOL
    assert bool((out[plan.counts == 0] == 0).all())
    for limit in (None, 0.7):  # b = swiglu(h) recomputed in the kernel from h [S, 2P]
        h = 2 * torch.randn(num_rows, 2 * 23)
        out = mod.expert_weight_grad(x, h, plan.offsets, torch.float32, a_index=plan.token_of_row, scale=scale,
                                     scale_index=plan.slot_of_row, b_gated=True, limit=limit)
        ref = mod._reference(x, h, plan.offsets, a_index=plan.token_of_row, scale=scale[plan.slot_of_row],
                             b_gated=True, limit=limit)
        assert out.shape == (5, x.shape[1], 23) and rel_err(out, ref) <= TOL


def test_other_activations_run_torch_under_auto(tk):
    """The kernels compute silu only: backend="triton" with another activation raises (test_ops), "auto"
    runs the torch backend, gradients included."""
    from moe_kit.ops import moe_ffn

    leaves, indices = make_case(9, 3, 2, 24, 16)
    got = moe_ffn(*leaves[:2], indices, *leaves[2:], backend="auto", activation="gelu_tanh")
    ref = moe_ffn_loop(*leaves[:2], indices, *leaves[2:], None, "gelu_tanh")
    assert rel_err(got, ref) <= TOL
    for a, b in zip(grads(got, leaves), grads(ref, leaves), strict=True):
        assert rel_err(a, b) <= TOL


def test_backward_keeps_only_h(tk):
    """Between forward and backward the triton path keeps x, the weights, h [S, 2I] and the small
    plan tensors: no act [S, I] and no gathered x rows [S, D]."""
    leaves, indices = make_case(9, 3, 2, 24, 16)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = tk.moe_ffn_triton(*leaves[:2], indices, *leaves[2:])
    assert [s for s in shapes if len(s) == 2 and s[0] == 18] == [(18, 32)], shapes
    out.sum().backward()


# ----------------------------------------------------------------------------- the whole FFN vs the loop reference

CASES = [
    pytest.param(dict(n=0, e=3, k=2, d=33, i=17), id="N=0"),
    pytest.param(dict(n=1, e=3, k=2, d=33, i=17), id="N=1"),
    pytest.param(dict(n=5, e=4, k=2, d=33, i=17), id="S<block"),
    pytest.param(dict(n=13, e=5, k=3, d=97, i=47), id="odd-D97-I47"),
    pytest.param(dict(n=12, e=7, k=2, d=24, i=16), id="prime-E7"),
    pytest.param(dict(n=9, e=5, k=1, d=24, i=16), id="k=1"),
    pytest.param(dict(n=6, e=5, k=5, d=24, i=16), id="k=E"),
    pytest.param(dict(n=12, e=9, k=2, d=24, i=16, mode="subset"), id="empty-experts"),
    pytest.param(dict(n=20, e=5, k=1, d=24, i=16, mode="one"), id="one-hot-expert"),
    pytest.param(dict(n=10, e=4, k=3, d=24, i=16, mode="dup"), id="repeated-expert"),
    pytest.param(dict(n=48, e=7, k=2, d=20, i=16), id="blocks>GROUP_M"),
    pytest.param(dict(n=13, e=5, k=3, d=40, i=24, limit=0.9), id="swiglu-limit"),
    pytest.param(dict(n=11, e=4, k=2, d=24, i=16, drop_every=3), id="dropped-slots"),
]


SLOT_ORDER_CASES = [c for c in CASES if c.id in ("N=0", "one-hot-expert", "repeated-expert", "swiglu-limit",
                                                  "dropped-slots")]


def _run_case(tk, case, deterministic):
    case = dict(case)
    limit, drop_every = case.pop("limit", None), case.pop("drop_every", 0)
    leaves, indices = make_case(**case, drop_every=drop_every)
    check_against_loop(tk, leaves, indices, limit, has_dropped=drop_every > 0, deterministic=deterministic)


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_loop(tk, case):
    """The fused atomic combine (deterministic=False) on every case."""
    _run_case(tk, case, deterministic=False)


@pytest.mark.parametrize("case", SLOT_ORDER_CASES)
def test_slot_order_combine_matches_loop(tk, case):
    """The deterministic slot-order combine on the edge cases (the kernels are shared otherwise)."""
    _run_case(tk, case, deterministic=True)


@HYP
@given(
    n=st.sampled_from([0, 1, 3, 7, 15, 21]),
    e=st.sampled_from([1, 2, 3, 5, 7]),
    k_frac=st.floats(0.0, 1.0),
    d=st.sampled_from([16, 29, 97]),
    i=st.sampled_from([8, 16, 47]),
    mode=st.sampled_from(["random", "subset", "one", "dup"]),
    limit=st.sampled_from([None, 0.7]),
    seed=st.integers(0, 2**16),
    deterministic=st.booleans(),
)
def test_triton_matches_loop_hypothesis(tk, n, e, k_frac, d, i, mode, limit, seed, deterministic):
    k = 1 + round(k_frac * (e - 1))  # 1..E
    leaves, indices = make_case(n, e, k, d, i, mode, seed)
    check_against_loop(tk, leaves, indices, limit, deterministic=deterministic)


def test_strided_inputs_and_expanded_grad(tk):
    """Column-major x / weights / expert weights, and the stride-0 grad of out.sum()."""
    (x, w, gu, dn), indices = make_case(11, 4, 2, 24, 16)
    strided = [t.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_() for t in (x, w, gu, dn)]
    out = tk.moe_ffn_triton(*strided[:2], indices, *strided[2:], 0.9)
    out.sum().backward()
    ref = moe_ffn_loop(x, w, indices, gu, dn, 0.9)
    ref.sum().backward()
    assert rel_err(out, ref) <= TOL
    for got, want in zip(strided, (x, w, gu, dn), strict=True):
        assert rel_err(got.grad, want.grad) <= TOL


def test_triton_is_deterministic(tk):
    """deterministic=True: bitwise equal outputs and gradients run to run (dropped slots included)."""
    leaves, indices = make_case(17, 5, 3, 24, 16, "dup", seed=5, drop_every=5)
    runs = []
    for _ in range(2):
        out = tk.moe_ffn_triton(*leaves[:2], indices, *leaves[2:], 0.9, True, deterministic=True)
        runs.append([out, *grads(out, leaves)])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def _allocations(run) -> list[int]:
    """Bytes of every CPU allocation made while `run()` executes (autograd engine included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return [ev.self_cpu_memory_usage for ev in prof.events() if ev.self_cpu_memory_usage > 0]


@pytest.mark.parametrize("has_dropped", [False, True], ids=["dropless", "dropped"])
def test_fused_combine_makes_no_slot_buffer(tk, has_dropped):
    """deterministic=False: neither the forward nor the backward allocates an [S, D] buffer;
    deterministic=True allocates it (y, then the d_x rows), so the probe sees what it looks for.
    D = 64 > 2I = 16 and S*D differs from every other tensor's size."""
    leaves, indices = make_case(8, 5, 4, 64, 8, drop_every=3 if has_dropped else 0)
    slot_buffer = indices.numel() * 64 * 4  # S*D fp32 bytes

    def step(deterministic):
        def run():
            out = tk.moe_ffn_triton(*leaves[:2], indices, *leaves[2:], None, has_dropped, deterministic)
            torch.autograd.grad(out, leaves, torch.ones_like(out))
        return run

    assert _allocations(step(True)).count(slot_buffer) == 2  # forward y, backward d_x rows
    assert slot_buffer not in _allocations(step(False))


def test_combine_choice(tk, monkeypatch):
    """None = slot order on CUDA, fused on CPU; torch.use_deterministic_algorithms forces slot order."""
    from moe_kit.ops.triton import autograd
    from moe_kit.ops.triton.scatter_gemm import scatter_gemm

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert tk.deterministic_combine(None, cuda) and not tk.deterministic_combine(None, cpu)
    assert tk.deterministic_combine(True, cpu) and not tk.deterministic_combine(False, cuda)
    calls = []
    monkeypatch.setattr(autograd, "scatter_gemm", lambda *a, **kw: calls.append(1) or scatter_gemm(*a, **kw))
    leaves, indices = make_case(7, 3, 2, 24, 16)
    out = tk.moe_ffn_triton(*leaves[:2], indices, *leaves[2:])  # CPU default: fused
    grads(out, leaves)
    assert not calls
    half = [t.detach().half() for t in leaves]  # k = 1 in 16 bits: slot order, it allocates less
    tk.moe_ffn_triton(half[0], half[1][:, :1], indices[:, :1], *half[2:], deterministic=False)
    assert len(calls) == 1
    calls.clear()
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert tk.deterministic_combine(False, cpu)
        out = tk.moe_ffn_triton(*leaves[:2], indices, *leaves[2:], deterministic=False)
        grads(out, leaves)
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    assert len(calls) == 2  # forward y and backward d_x went through the slot-order buffer


def test_no_grad_forward(tk):
    """Inference: GEMM 1 runs with STORE_H off (no h buffer) and still gives the same output."""
    leaves, indices = make_case(9, 3, 2, 24, 16)
    with torch.no_grad():
        out = tk.moe_ffn_triton(*leaves[:2], indices, *leaves[2:])
    assert rel_err(out, moe_ffn_loop(*leaves[:2], indices, *leaves[2:])) <= TOL


# ----------------------------------------------------------------------------- wiring: backend choice, layer


def test_backend_resolution(tk, monkeypatch):
    from moe_kit.ops import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("triton", torch.device("cpu")) == "triton"  # the interpreter runs CPU tensors
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="triton.*CUDA"):
        resolve_backend("triton", torch.device("cpu"))


def test_moe_ffn_and_dispatch_use_triton(tk, monkeypatch):
    from moe_kit.ops import dispatch, moe_ffn

    calls = []
    real = tk.moe_ffn_triton
    monkeypatch.setattr(tk, "moe_ffn_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    leaves, indices = make_case(7, 4, 2, 24, 16, drop_every=4)
    ref = moe_ffn_loop(*leaves[:2], indices, *leaves[2:])
    out = dispatch(*leaves[:2], indices, *leaves[2:], "triton", None, has_dropped=True)
    assert rel_err(out, ref) <= TOL and calls
    leaves, indices = make_case(7, 4, 2, 24, 16)
    out = moe_ffn(*leaves[:2], indices, *leaves[2:], backend="triton", swiglu_limit=0.9)
    assert rel_err(out, moe_ffn_loop(*leaves[:2], indices, *leaves[2:], 0.9)) <= TOL
    calls.clear()
    x64 = [t.detach().double() for t in leaves]
    out = moe_ffn(*x64[:2], indices, *x64[2:], backend="triton")  # float64: no kernels, torch backend
    assert not calls and rel_err(out, moe_ffn_loop(*x64[:2], indices, *x64[2:])) <= 1e-12


def test_layer_with_triton_backend(tk):
    from moe_kit import MoEConfig, MoELayer

    torch.manual_seed(0)
    layers = {}
    for backend in ("triton", "torch"):
        cfg = MoEConfig(hidden_size=24, intermediate_size=16, num_experts=5, top_k=2, backend=backend,
                        capacity_factor=1.0, swiglu_limit=1.5)
        layers[backend] = MoELayer(cfg)
    layers["triton"].load_state_dict(layers["torch"].state_dict())
    x = torch.randn(2, 9, 24)
    results = {}
    for backend, layer in layers.items():
        xb = x.clone().requires_grad_()
        out = layer(xb)
        params = [xb, *layer.parameters()]
        results[backend] = [out, *torch.autograd.grad(out, params, torch.ones_like(out))]
    for got, want in zip(results["triton"], results["torch"], strict=True):
        assert rel_err(got, want) <= TOL


# ----------------------------------------------------------------------------- torch.library / torch.compile


def _op_args(tk, limit=0.9, has_dropped=False, deterministic=True):
    from moe_kit.ops.routing import routing_plan
    from moe_kit.ops.triton.schedule import tile_schedule

    leaves, indices = make_case(9, 3, 2, 24, 16, drop_every=4 if has_dropped else 0)
    plan = routing_plan(indices, 3, has_dropped)
    table = tile_schedule(plan.counts, plan.offsets, indices.numel(), 16)
    return (*leaves, plan.token_of_row, plan.slot_of_row, plan.offsets, table, limit, 16, has_dropped, deterministic,
            True)


@pytest.mark.parametrize(("has_dropped", "deterministic"), [(False, False), (True, False), (True, True)],
                         ids=["dropless-fused", "dropped-fused", "dropped-slot-order"])
def test_opcheck_custom_ops(tk, has_dropped, deterministic):
    args = _op_args(tk, has_dropped=has_dropped, deterministic=deterministic)
    torch.library.opcheck(torch.ops.moe_kit.routed_swiglu_fwd.default, args)
    x, weights, gate_up, down, token, slot, offsets, table, limit, block_m, dropped, det, _ = args
    with torch.no_grad():
        _, h = torch.ops.moe_kit.routed_swiglu_fwd(*args)
    grad_out = torch.randn_like(x)
    bwd_args = (grad_out, x.detach(), weights.detach(), gate_up.detach(), down.detach(), h, token, slot, offsets,
                table, limit, block_m, dropped, det, True, True, True, True)
    torch.library.opcheck(torch.ops.moe_kit.routed_swiglu_bwd.default, bwd_args)


@pytest.mark.parametrize(("compiler", "deterministic_mode"),
                         [("aot_eager", False), ("inductor", False), ("aot_eager", True)],
                         ids=["aot_eager", "inductor", "aot_eager-use_deterministic_algorithms"])
def test_compiled_dispatch_has_no_graph_break(tk, compiler, deterministic_mode):
    """fullgraph: the expert path (plan, schedule, custom ops, autograd) compiles as one graph,
    with the fused combine (the CPU default) and with the slot-order one that
    torch.use_deterministic_algorithms(True) selects (read while tracing, guarded by dynamo).

    Under the interpreter the ops are opaque custom_ops, so Inductor compiles the torch code
    around them for the CPU; the triton_op path Inductor takes on a GPU is in the next test.
    """
    from moe_kit.ops import dispatch

    leaves, indices = make_case(9, 3, 2, 24, 16)

    def expert_path(x, w, ids, gu, dn):
        return dispatch(x, w, ids, gu, dn, "triton", 0.9)

    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(deterministic_mode, warn_only=True)
    try:
        torch._dynamo.reset()
        compiled = torch.compile(expert_path, backend=compiler, fullgraph=True)
        out = compiled(*leaves[:2], indices, *leaves[2:])
        eager = expert_path(*leaves[:2], indices, *leaves[2:])
        assert rel_err(out, eager) <= TOL
        for a, b in zip(grads(out, leaves), grads(eager, leaves), strict=True):
            assert rel_err(a, b) <= TOL
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


def test_compiled_layer_expert_path_has_no_graph_break(tk):
    from moe_kit import MoEConfig, MoELayer

    cfg = MoEConfig(hidden_size=24, intermediate_size=16, num_experts=5, top_k=2, backend="triton")
    layer = MoELayer(cfg)
    x = torch.randn(2, 7, 24, requires_grad=True)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(layer)(x)
    in_ops = [r for r in explain.break_reasons if any("moe_kit/ops" in f.filename for f in r.user_stack)]
    assert not in_ops, [r.reason for r in in_ops]
    torch._dynamo.reset()
    out = torch.compile(layer, backend="aot_eager")(x)
    assert rel_err(out, layer(x)) <= TOL


_TRITON_OP_SCRIPT = """
import torch, triton
from torch._subclasses.fake_tensor import FakeTensorMode
from moe_kit.ops.triton import moe_ffn_triton
from moe_kit.ops.triton.compat import INTERPRETED, _triton_op
if INTERPRETED or _triton_op is None:
    print("SKIP: no torch.library.triton_op"); raise SystemExit
# 1) the triton_op body is the fake implementation: shapes without launching a kernel
for det in (False, True):
    with FakeTensorMode():
        x = torch.randn(9, 24, requires_grad=True); w = torch.rand(9, 2, requires_grad=True)
        gu = torch.randn(3, 32, 24, requires_grad=True); dn = torch.randn(3, 24, 16, requires_grad=True)
        out = moe_ffn_triton(x, w, torch.randint(0, 3, (9, 2)), gu, dn, 0.5, deterministic=det)
        g = torch.autograd.grad(out.sum(), (x, w, gu, dn))
    assert out.shape == (9, 24) and [t.shape for t in g] == [x.shape, w.shape, gu.shape, dn.shape]
# 2) AOTAutograd (what torch.compile runs before Inductor) sees the kernels: a fake sm90 target
#    lets torch read which arguments each kernel writes; the joint graph must split into fw/bw.
try:
    from triton.backends.compiler import GPUTarget
    class _Driver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)
    triton.runtime.driver.set_active(_Driver())
except Exception as exc:
    print("SKIP: cannot fake a GPU target:", exc); raise SystemExit
from functorch.compile import aot_function, default_partition
graphs = {}
class Stop(Exception):
    pass
def partition(joint, inputs, **kw):
    graphs["fw"], graphs["bw"] = default_partition(joint, inputs, **kw)
    raise Stop
x = torch.randn(9, 24, requires_grad=True); w = torch.rand(9, 2, requires_grad=True)
gu = torch.randn(3, 32, 24, requires_grad=True); dn = torch.randn(3, 24, 16, requires_grad=True)
for det in (False, True):  # fused: the combine kernel's atomic adds must count as writes of its accumulator
    graphs.clear()
    try:
        aot_function(lambda *a: moe_ffn_triton(*a, 0.5, deterministic=det), fw_compiler=lambda g, _: g,
                     partition_fn=partition)(x, w, torch.randint(0, 3, (9, 2)), gu, dn)
    except Stop:
        pass
    kernels = {name: sum("triton_kernel_wrapper" in str(n.target) for n in gm.graph.nodes)
               for name, gm in graphs.items()}
    print("KERNELS", "slot-order" if det else "fused", kernels["fw"], kernels["bw"])
"""


def test_triton_op_path_traces_without_gpu(tk):
    """The GPU path (triton_op, no interpreter) in a fresh process, both combines: fake shapes,
    fw/bw kernel graphs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_TRITON_OP_SCRIPT)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "SKIP:" in proc.stdout:
        pytest.skip(proc.stdout.strip())
    for combine in ("fused", "slot-order"):
        assert f"KERNELS {combine} 2 4" in proc.stdout, proc.stdout + proc.stderr[-3000:]


_SM90_COMPILE_SCRIPT = r"""
import contextlib, io, json, re, sys
import torch, triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:
    print("SKIP:", exc); raise SystemExit
import moe_kit.ops.triton.gemm1_swiglu as g1
import moe_kit.ops.triton.scatter_gemm as sg
import moe_kit.ops.triton.swiglu_backward as sb
import moe_kit.ops.triton.weight_grad as wg

T = "bf16"
ROW_TYPES = dict(num_blocks="i32", ROWS_BUCKET="i32")
SHARED_CONSTS = dict(BLOCK_M=128, GROUP_M=8, DOT_PRECISION="tf32")
WG_TYPES = dict(a_ptr="*" + T, b_ptr="*" + T, a_index_ptr="*i64", b_index_ptr="*i64", scale_index_ptr="*i64",
                scale_ptr="*fp32", offsets_ptr="*i64", out_ptr="*" + T, M="i32", P="i32", limit="fp32",
                stride_ar="i32", stride_br="i32", stride_oe="i32", stride_om="i32")
VARIANTS = [  # (label, kernel, runtime arg types, constexprs as a launch specializes them)
    ("gemm1_swiglu", g1._gemm1_swiglu_kernel, dict(x_ptr="*" + T, w_ptr="*" + T, token_ptr="*i64",
     table_ptr="*i32", h_ptr="*" + T, act_ptr="*" + T, D="i32", INTER="i32", limit="fp32", stride_xn="i32",
     stride_we="i32", stride_wm="i32", stride_hs="i32", stride_as="i32"),
     dict(stride_xd=1, stride_wd=1, HAS_LIMIT=True, STORE_H=True)),
    ("scatter_gemm", sg._scatter_gemm_kernel, dict(a_ptr="*" + T, w_ptr="*" + T, slot_ptr="*i64",
     scale_ptr="*fp32", table_ptr="*i32", out_ptr="*" + T, K="i32", M="i32", stride_as="i32", stride_we="i32",
     stride_wm="i32", stride_os="i32"), dict(stride_ak=1, stride_wk=1, HAS_SCALE=True)),
    ("combine_gemm", sg._combine_gemm_kernel, dict(a_ptr="*" + T, w_ptr="*" + T, token_ptr="*i64", slot_ptr="*i64",
     scale_ptr="*fp32", table_ptr="*i32", out_ptr="*fp32", K="i32", M="i32", stride_as="i32", stride_we="i32",
     stride_wm="i32", stride_on="i32"), dict(stride_ak=1, stride_wk=1, HAS_SCALE=True)),
    ("swiglu_backward", sb._swiglu_backward_kernel, dict(g_ptr="*" + T, w_ptr="*" + T, h_ptr="*" + T,
     token_ptr="*i64", slot_ptr="*i64", scale_ptr="*fp32", table_ptr="*i32", dh_ptr="*" + T, dw_ptr="*fp32",
     D="i32", INTER="i32", limit="fp32", stride_gn="i32", stride_we="i32", stride_wd="i32", stride_hs="i32",
     stride_dhs="i32", stride_dws="i32"), dict(stride_gd=1, stride_wi=1, HAS_LIMIT=True)),
    ("weight_grad_down", wg._weight_grad_kernel, WG_TYPES,  # d_down: a = grad_out by token, b = swiglu(h)
     dict(stride_am=1, stride_bp=1, stride_op=1, A_GATHER=True, B_GATHER=False, HAS_SCALE=True, B_GATED=True,
          HAS_LIMIT=True)),
    ("weight_grad_gate_up", wg._weight_grad_kernel, WG_TYPES,  # d_gate_up: a = dH, b = x by token
     dict(stride_am=1, stride_bp=1, stride_op=1, A_GATHER=False, B_GATHER=True, HAS_SCALE=False, B_GATED=False,
          HAS_LIMIT=False)),
]
SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")
triton.knobs.nvidia.dump_ptxas_log = True
only = sys.argv[1:]
results = []
for label, kernel, types, consts in VARIANTS:
    if only and label not in only:
        continue
    fn = kernel.fn
    for cfg in kernel.configs:
        constexprs = {k: v for k, v in SHARED_CONSTS.items() if k in fn.arg_names}
        constexprs.update(consts)
        constexprs.update(cfg.kwargs)
        all_types = {**ROW_TYPES, **types}
        signature = {n: "constexpr" if n in constexprs else all_types[n] for n in fn.arg_names}
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        spills = [int(a) + int(b) for a, b in SPILL.findall(log.getvalue())]
        regs = [int(r) for r in REGS.findall(log.getvalue())]
        ptx = compiled.asm["ptx"]
        results.append(dict(kernel=label, config=str(cfg), shared=compiled.metadata.shared,
                            cubin="cubin" in compiled.asm, wgmma="wgmma.mma_async" in ptx,
                            spill_bytes=max(spills) if spills else None, registers=max(regs) if regs else None))
print("RESULTS", json.dumps(results))
"""


def test_kernels_compile_for_sm90(tk, tmp_path):
    """Every kernel (both GEMM 2 / dX epilogues, both weight-gradient uses) x every autotune config,
    bf16 (the fused combine's accumulator fp32), BLOCK_M = 128 (the
    larger schedule block, the most registers), through Triton's compiler and bundled ptxas for
    sm_90 (H100) in a fresh process with an empty Triton cache (so ptxas runs and its -v log is
    read): a cubin comes out, every tl.dot lowers to wgmma, ptxas reports zero spill bytes, and the
    shared memory fits (<= 227 KiB). No GPU needed; nothing is launched."""
    import json

    from moe_kit.ops.triton import configs

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOE_KIT_TRITON_CONFIG")}
    env.update(PYTHONWARNINGS="ignore", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_SM90_COMPILE_SCRIPT)], env=env,
                          capture_output=True, text=True, timeout=900)
    if "SKIP:" in proc.stdout:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    expected = sum(len(v) for v in configs._ROW_TILED.values()) + 2 * len(configs._WEIGHT_GRAD)
    assert len(results) == expected
    for r in results:
        what = (r["kernel"], r["config"])
        assert r["cubin"] and r["shared"] <= 227 * 1024, what
        assert r["wgmma"], ("no wgmma in the PTX", *what)
        assert r["spill_bytes"] == 0, ("register spills", r["spill_bytes"], *what)


def test_autotune_key_buckets_the_row_count(tk):
    from moe_kit.ops.triton import configs, gemm1_swiglu, scatter_gemm, swiglu_backward, weight_grad

    assert [configs.rows_bucket(s) for s in (1, 1024, 1025, 60_000, 10**6)] == [1024, 1024, 8192, 65536, 2**31]
    for kernel in (gemm1_swiglu._gemm1_swiglu_kernel, scatter_gemm._scatter_gemm_kernel,
                   scatter_gemm._combine_gemm_kernel, swiglu_backward._swiglu_backward_kernel,
                   weight_grad._weight_grad_kernel):
        assert "ROWS_BUCKET" in kernel.keys, kernel.fn.__name__
    # autotuning runs the atomic combine once per config: its accumulator is zeroed before each
    # timed run and before the real one
    assert scatter_gemm._combine_gemm_kernel.reset_to_zero == ["out_ptr"]


# ----------------------------------------------------------------------------- configs


def test_config_pin_parsing(tk, monkeypatch):
    from moe_kit.ops.triton import configs

    pin = configs.parse_config("BLOCK_M=64, BLOCK_N=128,BLOCK_K=32,num_warps=8,num_stages=3")
    assert pin == dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)
    for bad in ("BLOCK_M=64", "BLOCK_M=48,BLOCK_N=64,BLOCK_K=32,num_warps=4,num_stages=3", "TILE=3"):
        with pytest.raises(ValueError, match=configs.ENV_VAR):
            configs.parse_config(bad)
    monkeypatch.setenv(configs.ENV_VAR, "BLOCK_M=32,BLOCK_N=64,BLOCK_K=16,num_warps=2,num_stages=2")
    assert configs.block_m(10_000, 8) == 32
    (only,) = configs.row_tiled_configs("gemm1_swiglu")
    assert only.kwargs == dict(BLOCK_N=64, BLOCK_K=16) and only.num_warps == 2
    monkeypatch.delenv(configs.ENV_VAR)
    assert [c.kwargs["BLOCK_K"] for c in configs.weight_grad_configs()] == [16]  # interpreter default
    monkeypatch.delenv("TRITON_INTERPRET")
    for kernel in ("gemm1_swiglu", "scatter_gemm", "combine_gemm", "swiglu_backward"):
        assert len(configs.row_tiled_configs(kernel)) > 1
    assert configs.block_m(128 * 8, 8) == 128 and configs.block_m(128 * 8 - 1, 8) == 64
