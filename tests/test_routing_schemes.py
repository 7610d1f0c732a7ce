"""Routing beyond token choice: expert choice, Sinkhorn balanced assignment, routing replay.

Every scheme runs through MoELayer against a plain-torch reference written here from the layer's
own parameters (expert choice: a loop over experts picking tokens; Sinkhorn: the textbook
iteration in exp space), outputs and all gradients, fp64; hypothesis over N, E, c, k. Then
replay (bitwise for one backend, across backends, through torch.save), torch.compile without
graph breaks, and expert choice over 2 gloo ranks.
"""

from __future__ import annotations

import math
import os
import sys
from fractions import Fraction
from functools import partial

import conftest
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from gloo_ranks import run_ranks
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import moe_kit
from moe_kit import MoEConfig, MoELayer
from moe_kit.gates import ExpertChoiceGate, SinkhornGate, sinkhorn_log_plan
from moe_kit.gates import sinkhorn as sinkhorn_module

D, INTER = 8, 6
HYP = settings(max_examples=25, deadline=None)
TOL64 = 1e-10


rel_err = partial(conftest.rel_err, floor=1e-2)  # floor: see conftest.rel_err


def make_layer(seed: int = 0, dtype=torch.float64, **cfg) -> MoELayer:
    cfg.setdefault("num_experts", 4)
    cfg.setdefault("top_k", 2)
    if dtype == torch.float64:
        cfg.setdefault("router_dtype", torch.float64)
    torch.manual_seed(seed)
    return MoELayer(MoEConfig(hidden_size=D, intermediate_size=INTER, **cfg)).to(dtype)


def inputs(n: int, seed: int = 1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=gen, dtype=torch.float64).to(dtype)
    cot = torch.randn(n, D, generator=gen, dtype=torch.float64).to(dtype)
    return x, cot


def run(layer, x, cot, token_mask=None):
    """Output and the gradients of x and every parameter for loss = sum(out * cot)."""
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    out = layer(x) if token_mask is None else layer(x, token_mask=token_mask)
    (out * cot).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def params(layer):
    """Detached leaf copies of (router weight, gate_up, down) for a reference to differentiate."""
    return [t.detach().clone().requires_grad_(True)
            for t in (layer.gate.weight, layer.experts.gate_up_proj, layer.experts.down_proj)]


def ffn(x_t, gate_up, down):
    """SwiGLU expert on one token: down(silu(gate) * up)."""
    h = gate_up @ x_t
    gate, up = h.chunk(2)
    return down @ (F.silu(gate) * up)


def scores_of(logits, score_func):
    return logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()


def combine(x, weight, gate_up, down, picks, scores, norm, scale):
    """out[t] = sum over the experts e of picks[t] of w[t, e] * FFN_e(x_t), w from `scores`."""
    rows = []
    for t in range(x.shape[0]):
        experts = sorted(picks[t])
        ws = [scores[t, e] for e in experts]
        if norm and experts:
            total = sum(ws)
            ws = [w / total for w in ws]
        out = x.new_zeros(x.shape[1])
        for e, w in zip(experts, ws, strict=True):
            out = out + scale * w * ffn(x[t], gate_up[e], down[e])
        rows.append(out)
    return torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])


def compare(layer_result, ref_out, x_ref, refs, names=("gate.weight", "experts.gate_up_proj", "experts.down_proj")):
    out, grad_x, grads = layer_result
    assert rel_err(out, ref_out) < TOL64
    assert rel_err(grad_x, x_ref.grad if x_ref.grad is not None else torch.zeros_like(x_ref)) < TOL64
    for name, ref in zip(names, refs, strict=True):
        want = ref.grad if ref.grad is not None else torch.zeros_like(ref)
        assert rel_err(grads.get(name, torch.zeros_like(want)), want) < TOL64, name


# ============================================================================= expert choice


def ec_reference(layer, x, cot, c, mask=None):
    """Expert choice by a loop over experts: expert e takes the C real tokens with the highest
    score (ties: the earlier token). Returns (picks, C); backpropagates sum(out * cot) into leaves."""
    cfg = layer.cfg
    weight, gate_up, down = refs = params(layer)
    x = x.clone().requires_grad_(True)
    scores = scores_of(x @ weight.T, cfg.score_func)
    real = [t for t in range(x.shape[0]) if mask is None or bool(mask[t])]
    capacity = min(math.ceil(Fraction(repr(c)) * len(real) / cfg.num_experts), len(real))  # c as written
    picks = {t: [] for t in range(x.shape[0])}
    s = scores.detach()
    for e in range(cfg.num_experts):
        for t in sorted(real, key=lambda t: (-s[t, e].item(), t))[:capacity]:
            picks[t].append(e)
    out = combine(x, weight, gate_up, down, picks, scores, cfg.norm_topk_prob, cfg.route_scale)
    if out.requires_grad:  # no token took any expert: every gradient is zero
        (out * cot).sum().backward()
    return out.detach(), x, refs, picks, capacity


EC_CASES = [
    pytest.param(dict(n=12, e=4, c=1.0), id="N12-E4-c1"),
    pytest.param(dict(n=12, e=4, c=2.0, backend="loop"), id="N12-E4-c2-loop"),
    pytest.param(dict(n=7, e=3, c=0.5), id="N7-prime-E3-c0.5-unrouted"),
    pytest.param(dict(n=5, e=4, c=8.0), id="C-capped-at-N"),
    pytest.param(dict(n=40, e=8, c=1.25), id="N40-E8-above-small-path"),
    pytest.param(dict(n=9, e=1, c=1.0), id="E1"),
    pytest.param(dict(n=1, e=4, c=1.0), id="N1"),
    pytest.param(dict(n=0, e=4, c=1.0), id="N0"),
    pytest.param(dict(n=100, e=10, c=1.1), id="c-as-decimal-1.1x100/10=11-not-12"),
    pytest.param(dict(n=10, e=4, c=1.5, score_func="sigmoid", route_scale=2.5), id="sigmoid-norm-scale"),
    pytest.param(dict(n=16, e=4, c=1.0, mask=True), id="padding"),
    pytest.param(dict(n=16, e=4, c=2.0, mask=True, backend="loop"), id="padding-loop"),
]


@pytest.mark.parametrize("case", EC_CASES)
def test_expert_choice_matches_loop_reference(case):
    case = dict(case)
    n, e, c = case.pop("n"), case.pop("e"), case.pop("c")
    use_mask = case.pop("mask", False)
    layer = make_layer(num_experts=e, top_k=1, routing="expert_choice", capacity_factor=c, **case)
    x, cot = inputs(n)
    mask = (torch.arange(n) % 3 != 1) if use_mask else None
    result = run(layer, x, cot, mask)
    ref_out, x_ref, refs, picks, capacity = ec_reference(layer, x, cot, c, mask)
    compare(result, ref_out, x_ref, refs)
    assert layer.stats.load.tolist() == [capacity] * e  # exactly C per expert
    real = [t for t in range(n) if mask is None or mask[t]]
    unrouted = sum(1 for t in real if not picks[t]) / max(len(real), 1)
    assert float(layer.gate.unrouted_fraction) == pytest.approx(unrouted)
    assert layer.stats.unrouted_fraction == pytest.approx(unrouted)
    assert int(layer.gate.capacity) == capacity


@HYP
@given(n=st.integers(0, 33), e=st.integers(1, 8), c=st.sampled_from([0.25, 0.5, 1.0, 1.3, 2.0, 3.0, 10.0]),
       k=st.integers(1, 8), backend=st.sampled_from(["torch", "loop"]), masked=st.booleans(),
       seed=st.integers(0, 2**16))
def test_expert_choice_hypothesis(n, e, c, k, backend, masked, seed):
    """top_k plays no part in the selection: any k <= E gives the same routing."""
    layer = make_layer(seed, num_experts=e, top_k=min(k, e), routing="expert_choice", capacity_factor=c,
                       backend=backend)
    x, cot = inputs(n, seed)
    mask = (torch.rand(n, generator=torch.Generator().manual_seed(seed)) > 0.3) if masked else None
    result = run(layer, x, cot, mask)
    ref_out, x_ref, refs, _, capacity = ec_reference(layer, x, cot, c, mask)
    compare(result, ref_out, x_ref, refs)
    assert layer.stats.load.tolist() == [capacity] * e


def test_expert_choice_padding_equals_real_tokens_alone():
    layer = make_layer(num_experts=4, routing="expert_choice", capacity_factor=1.5)
    x, cot = inputs(14)
    mask = torch.ones(14, dtype=torch.bool)
    mask[[0, 5, 6, 13]] = False
    out, *_ = run(layer, x, cot, mask)
    alone, *_ = run(layer, x[mask], cot[mask])
    assert torch.equal(out[mask], alone)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))  # padding gets no expert (and no shared one here)


def test_expert_choice_three_dim_input_and_stats():
    layer = make_layer(num_experts=4, routing="expert_choice", capacity_factor=1.0, z_loss_coef=1e-2)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    out = layer(x)
    assert out.shape == x.shape
    stats = layer.stats
    assert stats.load.tolist() == [3] * 4 and stats.dropped_fraction == 0.0 and stats.z_loss is not None
    assert stats.max_over_mean_load == 1.0


def test_expert_choice_needs_capacity_factor():
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEConfig(hidden_size=D, intermediate_size=INTER, num_experts=4, top_k=1, routing="expert_choice")
    with pytest.raises(ValueError, match="capacity_factor"):
        ExpertChoiceGate(MoEConfig(hidden_size=D, intermediate_size=INTER, num_experts=4, top_k=1))


def test_expert_choice_indices_layout():
    """Eager: K = the most experts of one token, each row ascending then the marker E."""
    layer = make_layer(num_experts=6, routing="expert_choice", capacity_factor=2.0)
    x, _ = inputs(9)
    with torch.no_grad():
        _, indices = layer.gate(x)
    per_token = (indices < 6).sum(1)
    assert indices.shape[1] == max(1, int(per_token.max()))
    for row in indices.tolist():
        real = [i for i in row if i < 6]
        assert real == sorted(set(real)) and row == real + [6] * (len(row) - len(real))


# ============================================================================= Sinkhorn


def sinkhorn_textbook(logits: torch.Tensor, iters: int, mask=None) -> torch.Tensor:
    """Megatron's sinkhorn in exp space, a fixed number of iterations, fp64, real rows only."""
    cost = logits.double().exp()
    real = torch.ones(cost.shape[0], dtype=torch.bool) if mask is None else mask
    n, e = int(real.sum()), cost.shape[1]
    d1 = torch.ones(e, dtype=torch.float64)
    for _ in range(iters):
        d0 = 1.0 / (n * (cost @ d1))
        d1 = 1.0 / (e * (d0[real] @ cost[real]))
    return d0.unsqueeze(1) * cost * d1


@pytest.mark.parametrize("iters", [1, 3, 20])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padding"])
def test_sinkhorn_plan_matches_textbook(iters, masked):
    gen = torch.Generator().manual_seed(iters)
    logits = 2.0 * torch.randn(37, 5, generator=gen, dtype=torch.float64)
    mask = (torch.arange(37) % 4 != 0) if masked else None
    plan, ran = sinkhorn_log_plan(logits, mask, max_iters=iters, tol=0.0)
    ref = sinkhorn_textbook(logits, iters, mask)
    real = slice(None) if mask is None else mask
    assert ran == iters
    assert rel_err(plan.exp()[real], ref[real]) < 1e-12
    if iters == 20:  # converged: rows 1/N, columns 1/E (over the real rows)
        p = plan.exp()[real]
        assert torch.allclose(p.sum(0), torch.full((5,), 1 / 5, dtype=torch.float64), atol=1e-9)
        assert torch.allclose(p.sum(1), torch.full((p.shape[0],), 1 / p.shape[0], dtype=torch.float64), rtol=1e-3)


def test_sinkhorn_plan_fp32_and_large_logits_stay_finite():
    gen = torch.Generator().manual_seed(0)
    for scale in (1.0, 1e3, 1e5):
        logits = scale * torch.randn(64, 8, generator=gen)
        plan, _ = sinkhorn_log_plan(logits)
        assert plan.dtype == torch.float32 and torch.isfinite(plan).all()
        assert torch.allclose(plan.exp().sum(0), torch.full((8,), 1 / 8), rtol=1e-3)
    # exp space overflows here (exp(1e3) = inf) while the log-space plan is finite; same answer at small scale
    small = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    assert rel_err(sinkhorn_log_plan(small, max_iters=10, tol=0.0)[0].exp(), sinkhorn_textbook(small, 10)) < 1e-12


def test_sinkhorn_tolerance_stops_early_and_matches_full_run():
    """Early stop (eager) and the frozen full run (what torch.compile executes) give the same plan."""
    logits = torch.randn(128, 8, generator=torch.Generator().manual_seed(3))
    early, ran = sinkhorn_log_plan(logits, max_iters=64, tol=1e-4)
    assert ran < 64
    full, _ = sinkhorn_log_plan(logits, max_iters=64, tol=1e-4, check_every=10**9)
    assert torch.equal(early, full)


def sinkhorn_reference(layer, x, cot, training, iters, mask=None):
    """Training: top-k of the textbook plan; eval: top-k of the scores. Weights: the scores."""
    cfg = layer.cfg
    weight, gate_up, down = refs = params(layer)
    x = x.clone().requires_grad_(True)
    logits = x @ weight.T
    scores = scores_of(logits, cfg.score_func)
    choice = sinkhorn_textbook(logits.detach(), iters, mask) if training else scores.detach()
    indices = choice.topk(cfg.top_k, dim=-1).indices
    picks = {t: ([] if mask is not None and not mask[t] else indices[t].tolist()) for t in range(x.shape[0])}
    out = combine(x, weight, gate_up, down, picks, scores, cfg.norm_topk_prob, cfg.route_scale)
    if out.requires_grad:  # no token took any expert: every gradient is zero
        (out * cot).sum().backward()
    return out.detach(), x, refs


@pytest.fixture
def fixed_sinkhorn(monkeypatch):
    """The gate runs exactly 12 iterations (tol 0), as the textbook reference does."""
    monkeypatch.setattr(sinkhorn_module, "SINKHORN_MAX_ITERS", 12)
    monkeypatch.setattr(sinkhorn_module, "SINKHORN_TOL", 0.0)
    return 12


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", [
    pytest.param(dict(n=24, e=4, k=2), id="k2"),
    pytest.param(dict(n=24, e=4, k=1, score_func="sigmoid"), id="k1-sigmoid-megatron"),
    pytest.param(dict(n=40, e=8, k=3, route_scale=1.5, backend="loop"), id="k3-loop"),
    pytest.param(dict(n=30, e=5, k=2, mask=True), id="padding"),
    pytest.param(dict(n=12, e=4, k=4), id="k=E"),
])
def test_sinkhorn_matches_textbook_reference(fixed_sinkhorn, training, case):
    case = dict(case)
    n, e, k = case.pop("n"), case.pop("e"), case.pop("k")
    use_mask = case.pop("mask", False)
    layer = make_layer(num_experts=e, top_k=k, routing="sinkhorn", **case)
    layer.train(training)
    x, cot = inputs(n, seed=n + e)
    x = 3.0 * x  # sharper router: the balanced choice differs from the plain top-k
    mask = (torch.arange(n) % 5 != 2) if use_mask else None
    result = run(layer, x, cot, mask)
    ref_out, x_ref, refs = sinkhorn_reference(layer, x, cot, training, fixed_sinkhorn, mask)
    compare(result, ref_out, x_ref, refs)


@settings(HYP, suppress_health_check=[HealthCheck.function_scoped_fixture])  # the fixture only pins constants
@given(n=st.integers(1, 30), e=st.integers(1, 8), k=st.integers(1, 8), training=st.booleans(),
       seed=st.integers(0, 2**16))
def test_sinkhorn_hypothesis(fixed_sinkhorn, n, e, k, training, seed):
    layer = make_layer(seed, num_experts=e, top_k=min(k, e), routing="sinkhorn")
    layer.train(training)
    x, cot = inputs(n, seed)
    if training and k < e:  # a balanced plan can tie exactly (N = 1: every entry 1/E): the choice is then arbitrary
        with torch.no_grad():
            plan = sinkhorn_textbook(x @ layer.gate.weight.T, fixed_sinkhorn).sort(-1, descending=True).values
        assume(bool(((plan[:, k - 1] - plan[:, k]) > 1e-9 * plan[:, 0]).all()))
    result = run(layer, x, cot)
    ref_out, x_ref, refs = sinkhorn_reference(layer, x, cot, training, fixed_sinkhorn)
    compare(result, ref_out, x_ref, refs)


def skewed_layer(routing: str, e=8, k=2):
    """A router that sends almost every token to experts 0 and 1 (the collapse Sinkhorn cures)."""
    layer = make_layer(0, dtype=torch.float32, num_experts=e, top_k=k, routing=routing,
                       **({"capacity_factor": float(k)} if routing == "expert_choice" else {}))
    with torch.no_grad():
        layer.gate.weight.mul_(0.3)
        layer.gate.weight[0] += 1.0
        layer.gate.weight[1] += 0.8
    return layer


def test_sinkhorn_balances_a_skewed_router():
    x = torch.randn(1024, D, generator=torch.Generator().manual_seed(0)) + 1.0
    balance = {}
    for routing, training in (("token_choice", True), ("sinkhorn", True), ("sinkhorn", False), ("expert_choice", True)):
        layer = skewed_layer(routing).train(training)
        with torch.no_grad():
            layer(x)
        balance[routing, training] = layer.stats.max_over_mean_load
    assert balance["token_choice", True] > 3.0  # collapsed
    assert balance["sinkhorn", False] == balance["token_choice", True]  # eval: plain top-k
    assert balance["sinkhorn", True] < 1.6  # measured 1.50: the soft plan is balanced, its top-2 roughly
    assert balance["expert_choice", True] == 1.0


def test_sinkhorn_rejects_expert_bias_and_groups():
    base = dict(hidden_size=D, intermediate_size=INTER, num_experts=4, top_k=2, routing="sinkhorn")
    with pytest.raises(ValueError, match="expert_bias"):
        SinkhornGate(MoEConfig(**base, expert_bias=True))
    with pytest.raises(ValueError, match="n_groups"):
        SinkhornGate(MoEConfig(**base, n_groups=2))


# ============================================================================= routing replay


class TwoLayers(nn.Module):
    def __init__(self, **cfg):
        super().__init__()
        self.first = make_layer(0, **cfg)
        self.second = make_layer(1, **cfg)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


SCHEMES = {
    "token_choice": dict(aux_loss_coef=0.1),
    "token_choice-bias-groups": dict(expert_bias=True, n_groups=2, topk_groups=1, score_func="sigmoid"),
    "expert_choice": dict(routing="expert_choice", capacity_factor=1.5),
    "sinkhorn": dict(routing="sinkhorn", z_loss_coef=0.01),
    "sinkhorn-capacity": dict(routing="sinkhorn", capacity_factor=0.75, drop_policy="position"),
    "capacity": dict(capacity_factor=0.75),
}


@pytest.mark.parametrize("backend", ["torch", "loop"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_replay_is_bitwise_equal_on_the_same_backend(scheme, backend):
    model = TwoLayers(num_experts=4, backend=backend, **SCHEMES[scheme]).train()
    x, cot = inputs(20)
    with moe_kit.record_routing(model) as rec:
        out0, gx0, g0 = run(model, x, cot)
    assert sorted(rec) == ["first", "second"] and all(len(v) == 1 for v in rec.values())
    with moe_kit.replay_routing(model, rec):
        out1, gx1, g1 = run(model, x, cot)
    assert torch.equal(out0, out1) and torch.equal(gx0, gx1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[n], g1[n]) for n in g0)
    assert model.first.routing_hook is None  # hooks removed on exit


def test_replay_hash_layer_and_padding():
    layer = make_layer(num_experts=4, hash_routing=True, vocab_size=30, capacity_factor=1.0).train()
    x, cot = inputs(12)
    ids = torch.randint(0, 30, (12,), generator=torch.Generator().manual_seed(0))
    mask = torch.arange(12) % 4 != 3
    with moe_kit.record_routing(layer) as rec:
        out0 = layer(x, ids, token_mask=mask)
    with moe_kit.replay_routing(layer, rec):
        out1 = layer(x, torch.zeros_like(ids), token_mask=mask)  # ids ignored: the record decides
    assert torch.equal(out0, out1) and torch.equal(rec[""][0][mask], layer.gate.tid2eid[ids[mask]])


def test_routing_monitor_and_stats_with_new_schemes():
    for routing, extra in (("expert_choice", {"capacity_factor": 1.0}), ("sinkhorn", {})):
        model = TwoLayers(num_experts=4, routing=routing, **extra).train()
        monitor = moe_kit.RoutingMonitor(model)
        model(inputs(32)[0])
        monitor.record(0)
        rows = monitor.history
        assert len(rows) == 2 and all(r["entropy"] is not None for r in rows)
        if routing == "expert_choice":
            assert all(r["max_over_mean"] == 1.0 for r in rows)
        monitor.close()


def test_replay_routes_as_recorded_after_the_router_changed(tmp_path):
    """RL-style: rollout routing recorded, saved, loaded; the trained router would now route
    elsewhere, but the replayed forward uses the recorded experts with the current scores."""
    model = TwoLayers(num_experts=4, top_k=2)
    x, cot = inputs(16)
    with torch.no_grad(), moe_kit.record_routing(model) as rec:
        model(x)
    loads = {n: moe_kit.routing_stats(model)[n].load.clone() for n in ("first", "second")}
    torch.save(rec, tmp_path / "routing.pt")
    loaded = torch.load(tmp_path / "routing.pt", weights_only=True)
    with torch.no_grad():
        for layer in (model.first, model.second):
            layer.gate.weight.copy_(torch.randn_like(layer.gate.weight) * 5)
    with moe_kit.replay_routing(model, loaded):
        out, _, grads = run(model, x, cot)
    for name in ("first", "second"):
        assert torch.equal(moe_kit.routing_stats(model)[name].load, loads[name])
    assert grads["first.gate.weight"].abs().sum() > 0  # the router keeps its gradient
    # the replayed first layer equals a reference: current softmax scores gathered at the recorded experts
    layer = model.first
    weight, gate_up, down = params(layer)
    scores = (x @ weight.T).softmax(-1)
    picks = {t: loaded["first"][0][t].tolist() for t in range(16)}
    ref = combine(x, weight, gate_up, down, picks, scores, False, 1.0)
    with moe_kit.replay_routing(layer, {"": loaded["first"][0]}):
        assert rel_err(layer(x), ref) < TOL64


@pytest.mark.parametrize("scheme", ["token_choice", "expert_choice", "sinkhorn"])
def test_replay_across_backends(scheme):
    """Recorded on the loop backend, replayed on the torch backend: same routing, same math."""
    cfg = {k: v for k, v in SCHEMES[scheme].items() if k != "aux_loss_coef"}
    loop = make_layer(num_experts=4, backend="loop", **cfg).train()
    fast = make_layer(num_experts=4, backend="torch", **cfg).train()
    x, cot = inputs(40)
    with moe_kit.record_routing(loop) as rec:
        out_loop, gx_loop, g_loop = run(loop, x, cot)
    with moe_kit.replay_routing(fast, rec):
        out, gx, g = run(fast, x, cot)
    assert rel_err(out, out_loop) < TOL64 and rel_err(gx, gx_loop) < TOL64
    assert all(rel_err(g[n], g_loop[n]) < TOL64 for n in g_loop)


def test_replay_several_forwards_and_nesting():
    layer = make_layer(num_experts=4, routing="expert_choice", capacity_factor=1.0)
    a, b = inputs(10, 1)[0], inputs(6, 2)[0]
    with moe_kit.record_routing(layer) as rec:
        ya, yb = layer(a), layer(b)
    assert [t.shape[0] for t in rec[""]] == [10, 6]
    with moe_kit.replay_routing(layer, rec), moe_kit.record_routing(layer) as again:
        assert torch.equal(layer(a), ya) and torch.equal(layer(b), yb)
        with pytest.raises(ValueError, match="runs forward 3 but the record holds 2"):
            layer(a)
    assert all(torch.equal(p, q) for p, q in zip(rec[""], again[""], strict=True))


def test_replay_errors_name_the_layer():
    model = TwoLayers(num_experts=4, top_k=2)
    x, _ = inputs(8)
    with torch.no_grad(), moe_kit.record_routing(model) as rec:
        model(x)
    with pytest.raises(ValueError, match=r"layer 'first'.*\(8, 2\).*\[16, 2\]"), moe_kit.replay_routing(model, rec):
        model(torch.cat([x, x]))  # first layer: 16 tokens against 8 recorded
    bad = {"first": rec["first"], "second": [rec["second"][0][:, :1]]}
    with pytest.raises(ValueError, match=r"layer 'second'.*\(8, 1\).*\[8, 2\]"), moe_kit.replay_routing(model, bad):
        model(x)
    with pytest.raises(ValueError, match="outside 0..3"), moe_kit.replay_routing(
            model, {"first": [rec["first"][0] + 4], "second": rec["second"]}):
        model(x)
    twice = rec["second"][0].clone()
    twice[3, 1] = twice[3, 0]  # token 3 would run one expert twice (top-2)
    with pytest.raises(ValueError, match=r"layer 'second'.*same expert twice"), moe_kit.replay_routing(
            model, {"first": rec["first"], "second": [twice]}):
        model(x)
    with pytest.raises(ValueError, match="no routing for layer.*second"):
        with moe_kit.replay_routing(model, {"first": rec["first"]}):
            pass
    with pytest.raises(ValueError, match="does not have"):
        with moe_kit.replay_routing(model, {**rec, "third": rec["first"]}):
            pass
    with pytest.raises(ValueError, match="no MoELayer"):
        with moe_kit.record_routing(nn.Linear(2, 2)):
            pass


# ============================================================================= torch.compile


@pytest.mark.parametrize("scheme,training", [
    ("expert_choice", True), ("sinkhorn", True), ("sinkhorn", False), ("expert_choice-padding", True),
])
def test_compile_without_graph_breaks_matches_eager(scheme, training):
    """fullgraph=True: no graph break. Expert choice compiles to the K = E layout, eager to the
    compact one; Sinkhorn runs every iteration compiled and stops early in eager: same results."""
    import copy

    cfg = dict(SCHEMES[scheme.split("-")[0]])
    layer = make_layer(num_experts=4, backend="torch", **cfg).train(training)
    compiled_layer = copy.deepcopy(layer)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True)
    x, cot = inputs(40)
    mask = (torch.arange(40) % 3 != 0) if scheme.endswith("padding") else None
    eager = run(layer, x, cot, mask)
    compiled_layer.zero_grad()
    xc = x.clone().requires_grad_(True)
    out = compiled(xc) if mask is None else compiled(xc, token_mask=mask)
    (out * cot).sum().backward()
    assert rel_err(out, eager[0]) < TOL64 and rel_err(xc.grad, eager[1]) < TOL64
    for name, p in compiled_layer.named_parameters():
        if p.grad is not None:
            assert rel_err(p.grad, eager[2][name]) < TOL64, name
    assert torch.equal(compiled_layer.stats.load, layer.stats.load)


def test_meta_build_and_forward():
    for routing, extra in (("expert_choice", {"capacity_factor": 1.0}), ("sinkhorn", {})):
        with torch.device("meta"):
            layer = MoELayer(MoEConfig(hidden_size=D, intermediate_size=INTER, num_experts=4, top_k=2,
                                       routing=routing, **extra)).train()
            assert layer(torch.randn(5, D)).shape == (5, D)


def test_record_and_replay_through_a_compiled_layer():
    layer = make_layer(num_experts=4, routing="expert_choice", capacity_factor=1.0)
    x, _ = inputs(20)
    with moe_kit.record_routing(layer) as rec:
        eager = layer(x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager")
    with moe_kit.replay_routing(layer, rec), moe_kit.record_routing(layer) as again:
        assert torch.equal(compiled(x), eager)
    assert torch.equal(again[""][0], rec[""][0])


# ============================================================================= triton backend (interpreter)

_TRITON_CHILD = """
import os
os.environ["TRITON_INTERPRET"] = "1"
import triton  # first import with the interpreter on
import torch
import moe_kit
from moe_kit import MoEConfig, MoELayer

def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-6))

x = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
for routing, extra in (("expert_choice", dict(capacity_factor=1.5)), ("sinkhorn", {})):
    layers = {}
    for backend in ("loop", "triton"):
        torch.manual_seed(0)
        layers[backend] = MoELayer(MoEConfig(hidden_size=16, intermediate_size=16, num_experts=4, top_k=2,
                                             routing=routing, backend=backend, **extra)).train()
    got = {}
    for backend, layer in layers.items():
        xx = x.clone().requires_grad_(True)
        with moe_kit.record_routing(layer) as rec:
            out = layer(xx)
        out.square().sum().backward()
        got[backend] = (out.detach(), xx.grad, layer.gate.weight.grad, layer.experts.gate_up_proj.grad,
                        layer.experts.down_proj.grad, rec)
    assert torch.equal(got["loop"][5][""][0], got["triton"][5][""][0]), routing
    errs = [rel(a, b) for a, b in zip(got["triton"][:5], got["loop"][:5])]
    assert max(errs) < 1e-5, (routing, errs)
print("ok")
"""


def test_new_schemes_on_the_triton_backend_in_the_interpreter(tmp_path):
    """Expert choice (marker E in the indices) and Sinkhorn through the Triton kernels, run by
    Triton's interpreter in a fresh process (see tests/test_triton.py), against the loop backend."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    script = tmp_path / "child.py"
    script.write_text(_TRITON_CHILD)
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# ============================================================================= expert parallel (gloo)

EP_SIZES = (11, 6)  # tokens per rank


def _ep_case(rank: int, world: int) -> dict:
    from moe_kit.distributed import shard_state_dict

    full = make_layer(0, num_experts=4, routing="expert_choice", capacity_factor=1.5)
    layer = MoELayer(full.cfg, ep_group=dist.group.WORLD).to(torch.float64)
    layer.load_state_dict(shard_state_dict(full.state_dict(), layer))
    x, cot = inputs(EP_SIZES[rank], seed=10 + rank)
    out, grad_x, grads = run(layer, x, cot)
    return dict(out=out, grad_x=grad_x, grads=grads, load=layer.stats.load)


def test_expert_choice_over_two_gloo_ranks_equals_one_process(tmp_path):
    """Each rank's experts choose among that rank's tokens: rank r equals one process holding
    every expert run on rank r's batch; expert gradients are the sum over the ranks' batches."""
    results = run_ranks(_ep_case, 2, tmp_path)
    full = make_layer(0, num_experts=4, routing="expert_choice", capacity_factor=1.5)
    expert_grads = {}
    load = torch.zeros(4, dtype=torch.long)
    for rank, got in enumerate(results):
        x, cot = inputs(EP_SIZES[rank], seed=10 + rank)
        out, grad_x, grads = run(full, x, cot)
        load += full.stats.load
        assert rel_err(got["out"], out) < TOL64 and rel_err(got["grad_x"], grad_x) < TOL64
        assert rel_err(got["grads"]["gate.weight"], grads["gate.weight"]) < TOL64  # the gate stays rank-local
        for name in ("experts.gate_up_proj", "experts.down_proj"):
            expert_grads[name] = expert_grads.get(name, 0) + grads[name]
    for name, want in expert_grads.items():
        got = torch.cat([r["grads"][name] for r in results])  # rank r holds experts 2r, 2r + 1
        assert rel_err(got, want) < TOL64, name
    assert all(torch.equal(r["load"], load) for r in results)  # the group's load: sum of each rank's C
