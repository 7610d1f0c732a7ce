"""Expert, SharedExpert and GroupedExperts against hand-written SwiGLU references."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import rel_err
from torch import nn

from moe_kit import Expert, GroupedExperts, SharedExpert
from moe_kit.ops import moe_ffn

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def ref_swiglu_mlp(x, w_gate, w_up, w_down, limit=None):
    """down(silu(gate(x)) * up(x)) with weights in nn.Linear layout ([out, in])."""
    g = x @ w_gate.T
    u = x @ w_up.T
    if limit is not None:
        g = g.clamp(max=limit)
        u = u.clamp(-limit, limit)
    return (g * torch.sigmoid(g) * u) @ w_down.T


def grads(out, params, cot):
    return torch.autograd.grad(out, params, grad_outputs=cot)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5,), (2, 3), (2, 3, 4)], ids=["N", "BS", "ABC"])
@pytest.mark.parametrize("limit", [None, 0.3], ids=["no-limit", "limit"])
def test_expert_is_swiglu(shape, dtype, limit):
    torch.manual_seed(0)
    d, i = 12, 7
    expert = Expert(d, i, swiglu_limit=limit).to(dtype)
    assert expert.gate_proj.weight.shape == (i, d) and expert.up_proj.weight.shape == (i, d)
    assert expert.down_proj.weight.shape == (d, i)
    assert all(m.bias is None for m in (expert.gate_proj, expert.up_proj, expert.down_proj))
    x = torch.randn(*shape, d, dtype=dtype, requires_grad=True)
    params = [x, expert.gate_proj.weight, expert.up_proj.weight, expert.down_proj.weight]
    cot = torch.randn(*shape, d, dtype=dtype)
    out = expert(x)
    ref = ref_swiglu_mlp(x, *params[1:], limit)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_err(out, ref) <= TOL[dtype]
    for g, r in zip(grads(out, params, cot), grads(ref, params, cot), strict=True):
        assert rel_err(g, r) <= TOL[dtype]


def test_expert_swiglu_limit_clamps():
    torch.manual_seed(1)
    d, i, limit = 8, 6, 0.25
    expert = Expert(d, i, swiglu_limit=limit).double()
    free = Expert(d, i).double()
    free.load_state_dict(expert.state_dict())
    x = 5 * torch.randn(20, d, dtype=torch.float64)
    g = x @ expert.gate_proj.weight.T
    u = x @ expert.up_proj.weight.T
    assert bool((g > limit).any()) and bool((u.abs() > limit).any())
    act = torch.nn.functional.silu(g.clamp(max=limit)) * u.clamp(-limit, limit)
    assert rel_err(expert(x), act @ expert.down_proj.weight.T) <= 1e-12
    assert rel_err(expert(x), free(x)) > 1e-3
    # the activation fed to down_proj is bounded: |silu(g) * u| <= max|silu(g <= limit)| * limit
    silu_bound = max(limit / (1 + math.exp(-limit)), 0.27846454276107380)  # min of silu is -0.2784645...
    assert float(act.detach().abs().max()) <= silu_bound * limit + 1e-12


@pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated"])
def test_shared_expert(gated):
    torch.manual_seed(2)
    d, i = 10, 6
    shared = SharedExpert(d, i, gated=gated).double()
    if gated:
        assert isinstance(shared.gate, nn.Linear) and shared.gate.weight.shape == (1, d) and shared.gate.bias is None
    else:
        assert shared.gate is None
    x = torch.randn(3, 4, d, dtype=torch.float64, requires_grad=True)
    ref = ref_swiglu_mlp(x, shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight)
    if gated:
        ref = torch.sigmoid(x @ shared.gate.weight.T) * ref
    out = shared(x)
    assert out.shape == x.shape
    assert rel_err(out, ref) <= 1e-12
    params = [x] + list(shared.parameters())
    cot = torch.randn_like(out)
    for g, r in zip(grads(out, params, cot), grads(ref, params, cot), strict=True):
        assert rel_err(g, r) <= 1e-12


def test_shared_expert_gated_with_limit():
    torch.manual_seed(3)
    d, i, limit = 8, 4, 0.5
    shared = SharedExpert(d, i, gated=True, swiglu_limit=limit).double()
    x = 4 * torch.randn(9, d, dtype=torch.float64)
    ref = torch.sigmoid(x @ shared.gate.weight.T) * ref_swiglu_mlp(
        x, shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight, limit
    )
    assert rel_err(shared(x), ref) <= 1e-12


def test_grouped_experts_shapes_and_init():
    e, d, i = 5, 48, 20
    experts = GroupedExperts(e, d, i).requires_grad_(False)
    assert experts.gate_up_proj.shape == (e, 2 * i, d)
    assert experts.down_proj.shape == (e, d, i)
    assert isinstance(experts.gate_up_proj, nn.Parameter) and isinstance(experts.down_proj, nn.Parameter)
    assert GroupedExperts(e, d, i).gate_up_proj.requires_grad
    assert {name for name, _ in experts.named_parameters()} == {"gate_up_proj", "down_proj"}
    assert experts.gate_up_proj.dtype == torch.float32
    # nn.Linear's default init per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound_gu, bound_dn = 1 / math.sqrt(d), 1 / math.sqrt(i)
    assert float(experts.gate_up_proj.abs().max()) <= bound_gu
    assert float(experts.gate_up_proj.abs().max()) > 0.9 * bound_gu
    assert float(experts.down_proj.abs().max()) <= bound_dn
    assert float(experts.down_proj.abs().max()) > 0.9 * bound_dn
    assert float(experts.gate_up_proj.std()) == pytest.approx(bound_gu / math.sqrt(3), rel=0.1)
    # experts differ from each other
    assert not torch.equal(experts.gate_up_proj[0], experts.gate_up_proj[1])


@pytest.mark.parametrize("backend", ["torch", "loop"])
@pytest.mark.parametrize(
    "d, i, dtype",
    [
        pytest.param(16, 8, torch.float32, id="aligned-fp32"),
        pytest.param(33, 17, torch.float32, id="odd-fp32"),
        pytest.param(12, 5, torch.float64, id="fp64"),
    ],
)
def test_grouped_expert_e_equals_expert_with_copied_weights(d, i, dtype, backend):
    """Expert e of GroupedExperts through moe_ffn (every token on e, weight 1) == an Expert holding
    gate_up_proj[e][:I], gate_up_proj[e][I:], down_proj[e]; gradients land in row e only."""
    torch.manual_seed(4)
    e_count = 4
    experts = GroupedExperts(e_count, d, i).to(dtype)
    x = torch.randn(7, d, dtype=dtype)
    cot = torch.randn(7, d, dtype=dtype)
    for e in range(e_count):
        expert = Expert(d, i).to(dtype)
        with torch.no_grad():
            expert.gate_proj.weight.copy_(experts.gate_up_proj[e][:i])
            expert.up_proj.weight.copy_(experts.gate_up_proj[e][i:])
            expert.down_proj.weight.copy_(experts.down_proj[e])
        weights = torch.ones(7, 1, dtype=dtype)
        indices = torch.full((7, 1), e)
        experts.zero_grad()
        out = moe_ffn(x, weights, indices, experts.gate_up_proj, experts.down_proj, backend)
        out.backward(cot)
        ref = expert(x)
        ref.backward(cot)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert rel_err(out, ref) <= tol
        gu_grad, dn_grad = experts.gate_up_proj.grad, experts.down_proj.grad
        assert rel_err(gu_grad[e][:i], expert.gate_proj.weight.grad) <= tol
        assert rel_err(gu_grad[e][i:], expert.up_proj.weight.grad) <= tol
        assert rel_err(dn_grad[e], expert.down_proj.weight.grad) <= tol
        others = [j for j in range(e_count) if j != e]
        assert not bool(gu_grad[others].any()) and not bool(dn_grad[others].any())


# ----------------------------------------------------------------------------- expert biases, swiglu_oai (gpt-oss)


def test_grouped_experts_biases_shapes_init_and_meta():
    """bias=True (MoEConfig.expert_proj_bias): gate_up_proj_bias [E, 2I], down_proj_bias [E, D],
    zero at init (as transformers' gpt-oss); bias=False registers them as None (as nn.Linear).
    A meta build materializes with to_empty + reset_parameters."""
    e, d, i = 3, 8, 5
    plain = GroupedExperts(e, d, i)
    assert plain.gate_up_proj_bias is None and plain.down_proj_bias is None
    assert set(plain.state_dict()) == {"gate_up_proj", "down_proj"}
    assert plain.biases() == dict(gate_up_proj_bias=None, down_proj_bias=None)
    biased = GroupedExperts(e, d, i, bias=True)
    assert biased.gate_up_proj_bias.shape == (e, 2 * i) and biased.down_proj_bias.shape == (e, d)
    assert isinstance(biased.down_proj_bias, nn.Parameter) and biased.down_proj_bias.requires_grad
    assert not biased.gate_up_proj_bias.any() and not biased.down_proj_bias.any()
    assert set(biased.state_dict()) == {"gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"}
    assert "bias=True" in repr(biased)
    cast = biased.biases(torch.float64)
    assert cast["gate_up_proj_bias"].dtype == torch.float64 and cast["down_proj_bias"].dtype == torch.float64
    assert biased.biases()["down_proj_bias"] is biased.down_proj_bias
    with torch.device("meta"):
        meta = GroupedExperts(e, d, i, bias=True)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    with torch.no_grad():
        meta.down_proj_bias.fill_(7.0)  # garbage to_empty might leave
    meta.reset_parameters()
    assert not meta.down_proj_bias.any() and meta.gate_up_proj.abs().max() <= 1 / math.sqrt(d)


@pytest.mark.parametrize("backend", ["torch", "loop"])
def test_grouped_expert_with_biases_and_swiglu_oai_equals_gpt_oss_math(backend):
    """Expert e of biased GroupedExperts through moe_ffn == gpt-oss's expert written out:
    (clamp(up) + 1) * g * sigmoid(1.702 g), g = clamp(gate), gate/up = x @ W^T + b1, then @ down^T + b2,
    times the routing weight; bias gradients are the per-expert sums of their rows' gradients."""
    torch.manual_seed(2)
    e_count, d, i, limit = 3, 8, 4, 0.9
    experts = GroupedExperts(e_count, d, i, bias=True).double()
    with torch.no_grad():
        experts.gate_up_proj.mul_(4)
        experts.gate_up_proj_bias.normal_()
        experts.down_proj_bias.normal_()
    x = torch.randn(6, d, dtype=torch.float64)
    w = torch.rand(6, 1, dtype=torch.float64)
    cot = torch.randn(6, d, dtype=torch.float64)
    indices = torch.tensor([[0], [2], [0], [0], [2], [2]])
    out = moe_ffn(x, w, indices, experts.gate_up_proj, experts.down_proj, backend, swiglu_limit=limit,
                  activation="swiglu_oai", **experts.biases())
    grads_got = torch.autograd.grad(out, list(experts.parameters()), cot)
    params = [p.detach().clone().requires_grad_(True) for p in experts.parameters()]
    gate_up, down, b1, b2 = params
    rows = []
    for n in range(6):
        e = int(indices[n, 0])
        h = gate_up[e] @ x[n] + b1[e]
        gate, up = h[:i].clamp(max=limit), h[i:].clamp(-limit, limit)
        assert bool((h[:i] > limit).any() or (h[i:].abs() > limit).any()), "the clamp must bite"
        rows.append(w[n, 0] * (down[e] @ ((up + 1) * gate * torch.sigmoid(1.702 * gate)) + b2[e]))
    ref = torch.stack(rows)
    assert rel_err(out, ref) <= 1e-12
    for got, want in zip(grads_got, torch.autograd.grad(ref, params, cot), strict=True):
        assert rel_err(got, want) <= 1e-12
    assert not grads_got[3][1].any() and grads_got[3][0].any()  # expert 1 got no rows: zero bias grad


def test_expert_and_shared_expert_take_swiglu_oai():
    """Expert / SharedExpert stay bias-free; with activation="swiglu_oai" they compute
    down((clamp(up) + 1) * g * sigmoid(1.702 g))."""
    torch.manual_seed(3)
    expert = SharedExpert(8, 4, swiglu_limit=0.5, activation="swiglu_oai").double()
    x = torch.randn(5, 8, dtype=torch.float64) * 3
    g = (x @ expert.gate_proj.weight.T).clamp(max=0.5)
    u = (x @ expert.up_proj.weight.T).clamp(-0.5, 0.5)
    assert rel_err(expert(x), ((u + 1) * g * torch.sigmoid(1.702 * g)) @ expert.down_proj.weight.T) <= 1e-12
