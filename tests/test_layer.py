"""MoELayer end to end against an independent plain-torch reference built from the layer's own
parameters (router -> top-k -> dense experts -> shared expert), plus stats, capacity, hash
routing, errors, state_dict and presets."""

from __future__ import annotations

import copy
import math
from functools import partial
from unittest import mock

import conftest
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import moe_kit
from moe_kit import HashGate, MoEConfig, MoELayer, RoutingStats, TopKGate

HYP = settings(max_examples=20, deadline=None)
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


# ----------------------------------------------------------------------------- helpers / references


rel_err = partial(conftest.rel_err, floor=1e-2)  # floor: see conftest.rel_err


def ref_scores(logits, score_func):
    if score_func == "softmax":
        z = (logits - logits.max(dim=-1, keepdim=True).values).exp()
        return z / z.sum(dim=-1, keepdim=True)
    if score_func == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-logits))
    if score_func == "sqrtsoftplus":
        return torch.nn.functional.softplus(logits).clamp(min=torch.finfo(logits.dtype).tiny).sqrt()
    raise AssertionError(score_func)


def ref_route(layer, x_flat, input_ids=None, batch_shape=None):
    """Router reference (the gate semantics, step by step): returns weights [N, k], indices [N, k], loss term."""
    cfg = layer.cfg
    rd = cfg.router_dtype
    logits = x_flat.to(rd) @ layer.gate.weight.to(rd).T  # [N, E]
    if layer.gate.bias is not None:  # router_bias: the router linear's own bias
        logits = logits + layer.gate.bias.to(rd)
    s = ref_scores(logits, cfg.score_func)
    if cfg.uses_hash_gate(layer.layer_id):
        idx = layer.gate.tid2eid[input_ids.reshape(-1)]
    else:
        c = s.detach()
        bias = getattr(layer.gate, "expert_bias", None)
        if bias is not None:
            c = c + bias.to(c.dtype)
        n, e = c.shape
        if cfg.n_groups > 1:
            g = c.view(n, cfg.n_groups, e // cfg.n_groups)
            top = g.sort(dim=-1, descending=True).values
            group_score = top[..., :2].sum(-1) if bias is not None else top[..., 0]
            keep = group_score.argsort(dim=-1, descending=True)[:, : cfg.topk_groups]
            masked = torch.ones(n, cfg.n_groups, dtype=torch.bool)
            masked[torch.arange(n).unsqueeze(1), keep] = False
            c = g.masked_fill(masked.unsqueeze(-1), float("-inf")).view(n, e)
        idx = c.argsort(dim=-1, descending=True)[:, : cfg.top_k]
    w = s.gather(1, idx)
    if cfg.norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    w = w * cfg.route_scale
    aux = z = None
    if x_flat.shape[0]:
        e = cfg.num_experts
        if cfg.aux_loss_coef > 0:
            p = s / s.sum(dim=-1, keepdim=True)
            plain = s.detach().argsort(dim=-1, descending=True)[:, : cfg.top_k]  # f: unbiased top-k, all experts
            if cfg.aux_loss_type == "sequence":
                b, sq = batch_shape
                p = p.view(b, sq, e)
                ids = plain.reshape(b, sq * cfg.top_k)
            else:
                p, ids = p.unsqueeze(0), plain.reshape(1, -1)
            f = torch.stack([torch.bincount(row, minlength=e).to(p.dtype) / row.numel() for row in ids])
            aux = cfg.aux_loss_coef * e * (f * p.mean(dim=1)).sum(-1).mean()
        if cfg.z_loss_coef > 0:
            z = cfg.z_loss_coef * torch.logsumexp(logits, dim=-1).square().mean()
    return w, idx, aux, z


def ref_drop(weights, indices, num_experts, cf):
    """Plain-python capacity: per expert keep the ceil(cf*N*k/E) heaviest slots (ties: earlier first)."""
    n, k = indices.shape
    cap = math.ceil(cf * n * k / num_experts)
    flat_w, flat_e = weights.detach().reshape(-1).tolist(), indices.reshape(-1).tolist()
    kept = list(flat_e)
    for e in range(num_experts):
        slots = sorted((s for s in range(n * k) if flat_e[s] == e), key=lambda s: (-flat_w[s], s))
        for s in slots[cap:]:
            kept[s] = num_experts
    return torch.tensor(kept, dtype=torch.long).view(n, k)


def ref_act(g, activation="silu"):
    """The gated activation written out: silu, erf-gelu, tanh-gelu, relu."""
    if activation == "silu":
        return g * torch.sigmoid(g)
    if activation == "gelu":
        return 0.5 * g * (1.0 + torch.erf(g / math.sqrt(2.0)))
    if activation == "gelu_tanh":
        return 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g**3)))
    return g.clamp_min(0)


def ref_experts(x, weights, indices, gate_up, down, limit=None, activation="silu"):
    """Dense: every expert on every token, select by a dense [N, E] weight matrix (id E = dropped)."""
    e, two_i, _ = gate_up.shape
    i = two_i // 2
    h = torch.einsum("nd,emd->nem", x, gate_up)
    g, u = h[..., :i], h[..., i:]
    if limit is not None:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    y = torch.einsum("nei,edi->ned", ref_act(g, activation) * u, down)
    dense = torch.zeros(x.shape[0], e + 1, dtype=x.dtype).scatter_add(1, indices, weights.to(x.dtype))[:, :e]
    return torch.einsum("ne,ned->nd", dense, y)


def ref_layer(layer, x, input_ids=None):
    """Returns (output, kept indices, extra loss to add for the gradient, aux, z)."""
    cfg = layer.cfg
    x_flat = x.reshape(-1, cfg.hidden_size)
    w, idx, aux, z = ref_route(layer, x_flat, input_ids, tuple(x.shape[:-1]))
    if cfg.capacity_factor is not None:
        idx = ref_drop(w, idx, cfg.num_experts, cfg.capacity_factor)
    gu, dn = layer.experts.gate_up_proj.to(x.dtype), layer.experts.down_proj.to(x.dtype)
    out = ref_experts(x_flat, w, idx, gu, dn, cfg.swiglu_limit, cfg.activation)
    sh = layer.shared_experts
    if sh is not None:
        g = x_flat @ sh.gate_proj.weight.to(x.dtype).T
        u = x_flat @ sh.up_proj.weight.to(x.dtype).T
        if cfg.swiglu_limit is not None:
            g, u = g.clamp(max=cfg.swiglu_limit), u.clamp(-cfg.swiglu_limit, cfg.swiglu_limit)
        shared = (ref_act(g, cfg.activation) * u) @ sh.down_proj.weight.to(x.dtype).T
        if cfg.shared_expert_gate:
            shared = torch.sigmoid(x_flat @ sh.gate.weight.to(x.dtype).T) * shared
        out = out + shared
    extra = sum(t for t in (aux, z) if t is not None)
    return out.view(x.shape), idx, extra, aux, z


def grads_of(out, params, cot, extra=0):
    loss = (out * cot).sum() + extra
    return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)


def build(cfg, layer_id=0, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = MoELayer(cfg, layer_id).to(dtype)
    if layer.gate.expert_bias is not None:  # a non-trivial expert bias so it really steers selection
        with torch.no_grad():
            layer.gate.expert_bias.copy_(0.05 * torch.randn(cfg.num_experts))
    if layer.gate.bias is not None:  # a non-zero router bias, so a reference that ignores it fails
        with torch.no_grad():
            layer.gate.bias.copy_(0.5 * torch.randn(cfg.num_experts))
    return layer


def ids_for(cfg, shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, shape, generator=gen)


def check_layer(layer, x, input_ids=None, tol=None):
    """Layer output, stats and every gradient against the reference; returns the layer output."""
    dtype = x.dtype
    tol = tol or TOL[dtype]
    x = x.detach().requires_grad_(True)
    params = [x] + [p for p in layer.parameters()]
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    cot = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9)).to(dtype)

    out = layer(x, input_ids) if input_ids is not None else layer(x)
    assert out.shape == x.shape and out.dtype == dtype
    got = grads_of(out, params, cot)
    ref_out, idx, extra, aux, z = ref_layer(layer, x, input_ids)
    ref = grads_of(ref_out, params, cot, extra)
    assert rel_err(out, ref_out) <= tol, f"output: {rel_err(out, ref_out):.2e}"
    for name, g, r in zip(names, got, ref, strict=True):
        assert rel_err(g, r) <= tol, f"grad {name}: {rel_err(g, r):.2e}"

    cfg = layer.cfg
    stats = layer.stats
    assert isinstance(stats, RoutingStats)
    assert stats.load.dtype == torch.int64 and stats.load.shape == (cfg.num_experts,)
    assert torch.equal(stats.load, torch.bincount(idx.reshape(-1), minlength=cfg.num_experts + 1)[:-1])
    n_slots = idx.numel()
    dropped = int((idx == cfg.num_experts).sum())
    assert int(stats.load.sum()) == n_slots - dropped
    assert isinstance(stats.dropped_fraction, float)
    assert stats.dropped_fraction == pytest.approx(dropped / n_slots if n_slots else 0.0, abs=1e-12)
    for value, ref_value in ((stats.aux_loss, aux), (stats.z_loss, z)):
        if ref_value is None:
            assert value is None
        else:
            assert isinstance(value, float)
            assert value == pytest.approx(float(ref_value.detach()), rel=1e-5)
    if layer.gate.expert_bias is None:
        assert stats.bias is None
    else:
        assert torch.equal(stats.bias, layer.gate.expert_bias.cpu())
    return out


# ----------------------------------------------------------------------------- configs

D, INTER = 16, 8
CONFIGS = {
    "softmax": dict(hidden_size=D, intermediate_size=INTER, num_experts=6, top_k=2),
    "softmax-norm-shared-gated": dict(
        hidden_size=D, intermediate_size=INTER, num_experts=6, top_k=2, norm_topk_prob=True,
        num_shared_experts=1, shared_intermediate_size=12, shared_expert_gate=True,
    ),
    "sigmoid-groups-bias-shared": dict(
        hidden_size=D, intermediate_size=INTER, num_experts=8, top_k=3, score_func="sigmoid", n_groups=4,
        topk_groups=2, expert_bias=True, route_scale=2.5, num_shared_experts=1,
    ),
    "sigmoid-groups-nobias": dict(
        hidden_size=D, intermediate_size=INTER, num_experts=8, top_k=2, score_func="sigmoid", n_groups=4, topk_groups=2,
    ),
    "sqrtsoftplus-limit-bias-shared": dict(
        hidden_size=D, intermediate_size=INTER, num_experts=6, top_k=3, score_func="sqrtsoftplus", swiglu_limit=0.3,
        route_scale=1.5, expert_bias=True, num_shared_experts=2,
    ),
    "odd-D33-I17": dict(hidden_size=33, intermediate_size=17, num_experts=5, top_k=2, num_shared_experts=1),
    "aux-z-losses": dict(
        hidden_size=D, intermediate_size=INTER, num_experts=6, top_k=2, aux_loss_coef=0.05, z_loss_coef=0.01,
    ),
    "k=E": dict(hidden_size=D, intermediate_size=INTER, num_experts=4, top_k=4),
    "k=1-prime-E": dict(hidden_size=D, intermediate_size=INTER, num_experts=7, top_k=1),
    "hash": dict(hidden_size=D, intermediate_size=INTER, num_experts=6, top_k=2, hash_routing=True, vocab_size=40),
    "gelu-shared": dict(hidden_size=D, intermediate_size=INTER, num_experts=6, top_k=2, activation="gelu",
                        num_shared_experts=1),
    "gelu_tanh-limit": dict(hidden_size=D, intermediate_size=INTER, num_experts=6, top_k=2, activation="gelu_tanh",
                            swiglu_limit=0.3),
    "relu-router-bias": dict(hidden_size=D, intermediate_size=INTER, num_experts=6, top_k=2, activation="relu",
                             router_bias=True),
}
SHAPES = {"N": (7,), "BS": (2, 5), "ABC": (2, 3, 4)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_matches_reference(name, shape, dtype):
    extra = {"router_dtype": torch.float64} if dtype == torch.float64 else {}
    cfg = MoEConfig(**CONFIGS[name], **extra)
    layer = build(cfg, dtype=dtype)
    x = torch.randn(*shape, cfg.hidden_size, dtype=dtype, generator=torch.Generator().manual_seed(1))
    ids = ids_for(cfg, shape) if cfg.routes_by_hash else None
    check_layer(layer, x, ids)


def test_layer_aux_loss_sequence():
    cfg = MoEConfig(
        hidden_size=D, intermediate_size=INTER, num_experts=6, top_k=2, aux_loss_coef=0.1, aux_loss_type="sequence",
        z_loss_coef=0.01,
    )
    layer = build(cfg)
    check_layer(layer, torch.randn(3, 5, D))
    with pytest.raises(ValueError, match="sequence"):
        layer(torch.randn(15, D))


@pytest.mark.parametrize("shape", [(0,), (2, 0), (0, 3)], ids=["N=0", "B2-S0", "B0-S3"])
@pytest.mark.parametrize("name", ["softmax-norm-shared-gated", "sigmoid-groups-bias-shared", "aux-z-losses", "hash"])
def test_layer_no_tokens(name, shape):
    cfg = MoEConfig(**CONFIGS[name])
    layer = build(cfg)
    x = torch.randn(*shape, cfg.hidden_size, requires_grad=True)
    ids = ids_for(cfg, shape) if cfg.routes_by_hash else None
    out = layer(x, ids) if ids is not None else layer(x)
    assert out.shape == x.shape
    assert layer.stats.load.tolist() == [0] * cfg.num_experts
    assert layer.stats.dropped_fraction == 0.0
    assert layer.stats.aux_loss is None and layer.stats.z_loss is None
    out.sum().backward()  # must not fail
    assert layer.experts.gate_up_proj.grad is not None and not bool(layer.experts.gate_up_proj.grad.any())


@HYP
@given(
    n=st.integers(0, 12),
    e=st.integers(1, 7),
    score_func=st.sampled_from(["softmax", "sigmoid", "sqrtsoftplus"]),
    shared=st.integers(0, 1),
    bias=st.booleans(),
    d=st.sampled_from([8, 12, 9]),
    i=st.sampled_from([4, 8, 5]),
    data=st.data(),
)
def test_layer_matches_reference_hypothesis(n, e, score_func, shared, bias, d, i, data):
    k = data.draw(st.integers(1, e), label="k")
    seed = data.draw(st.integers(0, 1000), label="seed")
    cfg = MoEConfig(
        hidden_size=d, intermediate_size=i, num_experts=e, top_k=k, score_func=score_func,
        num_shared_experts=shared, expert_bias=bias, router_dtype=torch.float64,
    )
    layer = build(cfg, dtype=torch.float64, seed=seed)
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    check_layer(layer, x)


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("shared", [0, 1], ids=["no-shared", "shared"])
def test_layer_bf16_model(shared):
    """A bf16 model (layer.to(bf16)) keeps bf16 activations, routes in fp32."""
    cfg = MoEConfig(hidden_size=D, intermediate_size=INTER, num_experts=6, top_k=2, num_shared_experts=shared)
    layer = build(cfg, dtype=torch.bfloat16)
    x = torch.randn(2, 5, D).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    weights, indices = layer.gate(x)
    assert weights.dtype == torch.float32 and indices.dtype == torch.int64
    ref_out = ref_layer(copy.deepcopy(layer).float(), x.float())[0]  # same bf16 values, upcast
    assert rel_err(out, ref_out) <= 3e-2
    out.float().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16, name
        assert bool(p.grad.isfinite().all()), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
@pytest.mark.parametrize("shared", [0, 1], ids=["no-shared", "shared"])
def test_fp32_layer_other_input_dtype(dtype, shared):
    """forward(x) returns x's dtype: an fp32 layer fed bf16/fp64 activations runs the routed experts in
    x's dtype (the layer casts expert weights) -- the shared expert must do the same."""
    cfg = MoEConfig(hidden_size=D, intermediate_size=INTER, num_experts=6, top_k=2, num_shared_experts=shared)
    layer = build(cfg)
    x = torch.randn(7, D, dtype=torch.float64).to(dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == x.shape
    ref_out = ref_layer(layer, x.double())[0]
    assert rel_err(out, ref_out) <= (3e-2 if dtype == torch.bfloat16 else 1e-6)


def test_expert_bias_stays_fp32_in_bf16_model():
    """Contract: gate.expert_bias is an fp32 buffer; a bf16 model must not round the bias to bf16
    (1e-3 updates vanish next to a bias of ~1 in bf16)."""
    cfg = MoEConfig(hidden_size=D, intermediate_size=INTER, num_experts=4, top_k=2, expert_bias=True)
    layer = MoELayer(cfg).to(torch.bfloat16)
    layer(torch.randn(3, D, dtype=torch.bfloat16))
    assert layer.gate.expert_bias.dtype == torch.float32
    assert layer.gate.expert_counts.dtype == torch.float32  # bf16 counts stop at 256 exact integers
    assert layer.stats.bias.dtype == torch.float32


# ----------------------------------------------------------------------------- backends


@pytest.mark.parametrize(
    "name, cf",
    [
        ("softmax-norm-shared-gated", None),
        ("sqrtsoftplus-limit-bias-shared", None),
        ("odd-D33-I17", None),
        ("aux-z-losses", 0.5),
        ("hash", 1.0),
    ],
)
def test_backends_agree_through_layer(name, cf):
    cfg = MoEConfig(**CONFIGS[name], capacity_factor=cf)
    layers = {b: build(cfg.replace(backend=b)) for b in ("torch", "loop", "auto")}
    state = layers["torch"].state_dict()
    for layer in layers.values():
        layer.load_state_dict(state)
    x = torch.randn(3, 6, cfg.hidden_size)
    ids = ids_for(cfg, (3, 6)) if cfg.routes_by_hash else None
    results = {}
    for b, layer in layers.items():
        xb = x.clone().requires_grad_(True)
        out = layer(xb, ids) if ids is not None else layer(xb)
        params = [xb] + list(layer.parameters())
        results[b] = (out, *grads_of(out, params, torch.ones_like(out)))
        assert torch.equal(layer.stats.load, layers["torch"].stats.load if b != "torch" else layer.stats.load)
    for b in ("loop", "auto"):
        for got, ref in zip(results[b], results["torch"], strict=True):
            assert rel_err(got, ref) <= 1e-5
    assert layers["loop"].stats.dropped_fraction == layers["torch"].stats.dropped_fraction


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the triton backend builds")
def test_triton_backend_rejected_at_build_without_cuda(monkeypatch):
    """No CUDA and no Triton interpreter: backend="triton" fails when the layer is built."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = MoEConfig(hidden_size=D, intermediate_size=INTER, num_experts=4, top_k=2, backend="triton")
    with pytest.raises(ValueError, match="triton"):
        MoELayer(cfg)


# ----------------------------------------------------------------------------- stats


def test_stats_before_and_after_forward():
    cfg = MoEConfig(hidden_size=D, intermediate_size=INTER, num_experts=5, top_k=2, aux_loss_coef=0.01)
    layer = build(cfg)
    assert layer.stats is None
    layer(torch.randn(2, 8, D))
    s = layer.stats
    assert s.load.dtype == torch.int64 and int(s.load.sum()) == 2 * 8 * 2
    assert isinstance(s.aux_loss, float) and s.aux_loss > 0 and s.z_loss is None
    assert s.dropped_fraction == 0.0 and s.bias is None
    assert s.max_over_mean_load == pytest.approx(float(s.load.max()) / (32 / 5))
    # stats describe the latest forward
    layer(torch.randn(3, D))
    assert int(layer.stats.load.sum()) == 6


def test_stats_bias_is_a_snapshot():
    cfg = MoEConfig(hidden_size=D, intermediate_size=INTER, num_experts=4, top_k=2, expert_bias=True)
    layer = build(cfg)
    layer(torch.randn(5, D))
    before = layer.stats.bias.clone()
    with torch.no_grad():
        layer.gate.expert_bias.add_(1.0)
    assert torch.equal(layer.stats.bias, before)


def test_routing_stats_collects_every_layer():
    cfg = MoEConfig(hidden_size=D, intermediate_size=INTER, num_experts=4, top_k=2)
    hash_cfg = cfg.replace(hash_routing=True, vocab_size=30)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(build(cfg, seed=1), nn.Linear(D, D), build(cfg.replace(top_k=1), seed=2))
            self.extra = nn.ModuleDict({"moe": build(cfg.replace(capacity_factor=0.5), seed=3)})
            self.hashed = build(hash_cfg, seed=4)

        def forward(self, x, ids):
            x = self.blocks(x)
            return self.hashed(self.extra["moe"](x), ids)

    model = Model()
    x = torch.randn(2, 9, D)
    model(x, ids_for(hash_cfg, (2, 9)))
    found = moe_kit.routing_stats(model)
    expected = {"blocks.0", "blocks.2", "extra.moe", "hashed"}
    assert set(found) == expected
    for name in expected:
        layer = model.get_submodule(name)
        assert isinstance(found[name], RoutingStats)
        assert torch.equal(found[name].load, layer.stats.load)
        assert found[name].dropped_fraction == layer.stats.dropped_fraction
    assert int(found["blocks.0"].load.sum()) == 36 and int(found["blocks.2"].load.sum()) == 18
    assert found["extra.moe"].dropped_fraction > 0


# ----------------------------------------------------------------------------- capacity


CAPACITY_CASES = [
    pytest.param(name, n, id=f"{name}-N={n}")
    for name in ("softmax", "sigmoid-groups-bias-shared", "k=1-prime-E", "odd-D33-I17")
    for n in (0, 1, 3, 20)
    if not (n == 0 and name == "sigmoid-groups-bias-shared")  # N=0 with groups: test_layer_no_tokens
]


@pytest.mark.parametrize("cf", [0.1, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("name, n", CAPACITY_CASES)
def test_capacity_factor(name, n, cf):
    cfg = MoEConfig(**CONFIGS[name], capacity_factor=cf)
    layer = build(cfg)
    x = torch.randn(n, cfg.hidden_size)
    check_layer(layer, x)  # output, gradients, load and dropped_fraction against the reference
    # dropped_fraction == slots beyond ceil(cf * N * k / E) per expert
    _, idx, _, _ = ref_route(layer, x)
    cap = math.ceil(cf * n * cfg.top_k / cfg.num_experts)
    counts = torch.bincount(idx.reshape(-1), minlength=cfg.num_experts)
    overflow = int((counts - cap).clamp(min=0).sum())
    assert layer.stats.dropped_fraction == pytest.approx(overflow / (n * cfg.top_k) if n else 0.0)
    assert torch.equal(layer.stats.load, counts.clamp(max=cap))


def test_capacity_large_equals_dropless():
    cfg = MoEConfig(**CONFIGS["sqrtsoftplus-limit-bias-shared"])
    dropless = build(cfg)
    capped = build(cfg.replace(capacity_factor=float(cfg.num_experts)))  # cap = N*k: nothing can overflow
    capped.load_state_dict(dropless.state_dict())
    x = torch.randn(4, 6, cfg.hidden_size)
    a, b = dropless(x), capped(x)
    assert capped.stats.dropped_fraction == 0.0
    assert torch.equal(capped.stats.load, dropless.stats.load)
    assert rel_err(b, a) <= 1e-6


def test_capacity_drops_lowest_weights():
    """All tokens identical -> all on the same experts; capacity keeps the first ones (equal weights)."""
    cfg = MoEConfig(hidden_size=D, intermediate_size=INTER, num_experts=4, top_k=1, capacity_factor=1.0)
    layer = build(cfg)
    x = torch.randn(1, D).repeat(8, 1)
    out = layer(x)
    assert layer.stats.load.sum() == 2 and layer.stats.dropped_fraction == pytest.approx(6 / 8)
    assert bool(out[:2].any()) and not bool(out[2:].any())  # dropped tokens get zero (no shared expert)


# ----------------------------------------------------------------------------- hash routing


def test_gate_selection():
    base = dict(hidden_size=D, intermediate_size=INTER, num_experts=6, top_k=2)
    assert type(MoELayer(MoEConfig(**base)).gate) is TopKGate
    hashed = MoEConfig(**base, hash_routing=True, vocab_size=20)
    assert all(type(MoELayer(hashed, layer_id=i).gate) is HashGate for i in (0, 3, 10))
    partial = MoEConfig(**base, n_hash_layers=2, vocab_size=20)
    kinds = [type(MoELayer(partial, layer_id=i).gate) for i in range(4)]
    assert kinds == [HashGate, HashGate, TopKGate, TopKGate]


def test_hash_layer_routes_by_table():
    cfg = MoEConfig(hidden_size=D, intermediate_size=INTER, num_experts=6, top_k=2, n_hash_layers=1, vocab_size=25)
    layer = build(cfg, layer_id=0)
    assert torch.equal(layer.gate.tid2eid, moe_kit.hash_table(25, 6, 2))
    assert not layer.gate.tid2eid.requires_grad
    assert "gate.tid2eid" in dict(layer.named_buffers())
    ids = torch.tensor([[3, 3, 7], [0, 24, 3]])
    x = torch.randn(2, 3, D)
    check_layer(layer, x, ids)
    expected = torch.bincount(layer.gate.tid2eid[ids.reshape(-1)].reshape(-1), minlength=6)
    assert torch.equal(layer.stats.load, expected)
    # the same token routes to the same experts whatever x is
    layer(torch.randn(2, 3, D), ids)
    assert torch.equal(layer.stats.load, expected)
    with pytest.raises(ValueError, match="input_ids"):
        layer(x)


# ----------------------------------------------------------------------------- errors


def _good_forward(layer, ids=None):
    x = torch.randn(2, 3, layer.cfg.hidden_size)
    out = layer(x, ids) if ids is not None else layer(x)
    ref = ref_layer(layer, x, ids)[0]
    assert rel_err(out, ref) <= 1e-5
    return out


@pytest.mark.parametrize(
    "x, exc, match",
    [
        pytest.param(torch.randn(3, D + 1), ValueError, str(D), id="wrong-last-dim"),
        pytest.param(torch.randn(D, 3), ValueError, str(D), id="transposed"),
        pytest.param(torch.tensor(1.0), ValueError, str(D), id="scalar"),
        pytest.param(torch.ones(3, D, dtype=torch.long), TypeError, "floating", id="integer-x"),
        pytest.param(torch.ones(3, D, dtype=torch.bool), TypeError, "floating", id="bool-x"),
        pytest.param([[0.0] * D], TypeError, "floating", id="list-x"),
    ],
)
def test_layer_bad_x(x, exc, match):
    cfg = MoEConfig(**CONFIGS["sigmoid-groups-bias-shared"])
    layer = build(cfg)
    with pytest.raises(exc, match=match):
        layer(x)
    _good_forward(layer)


@pytest.mark.parametrize(
    "ids, exc",
    [
        pytest.param(None, ValueError, id="missing"),
        pytest.param(torch.zeros(2, 3), TypeError, id="float-ids"),
        pytest.param(torch.zeros(2, 3, dtype=torch.bool), TypeError, id="bool-ids"),
        pytest.param(torch.tensor([[0, 1, -1], [2, 3, 4]]), ValueError, id="negative"),
        pytest.param(torch.tensor([[0, 1, 40], [2, 3, 4]]), ValueError, id="equal-vocab"),
        pytest.param(torch.tensor([[0, 1, 10**6], [2, 3, 4]]), ValueError, id="far-out-of-range"),
        pytest.param(torch.tensor([[0, 1], [2, 3]]), ValueError, id="too-few"),
        pytest.param(torch.arange(7), ValueError, id="too-many"),
        pytest.param([[0, 1, 2], [3, 4, 5]], TypeError, id="list-ids"),
    ],
)
def test_hash_layer_bad_ids(ids, exc):
    cfg = MoEConfig(**CONFIGS["hash"])
    layer = build(cfg)
    x = torch.randn(2, 3, D)
    with pytest.raises(exc, match="input_ids|ids|token"):
        layer(x, ids)
    _good_forward(layer, torch.tensor([[0, 39, 5], [1, 2, 3]]))


def test_hash_layer_ids_any_integer_dtype_and_shape():
    cfg = MoEConfig(**CONFIGS["hash"])
    layer = build(cfg)
    x = torch.randn(2, 3, D)
    ids = torch.tensor([[0, 39, 5], [1, 2, 3]])
    ref = layer(x, ids)
    for other in (ids.int(), ids.to(torch.int16), ids.reshape(-1), ids.reshape(3, 2)):
        assert torch.equal(layer(x, other), ref)


# ----------------------------------------------------------------------------- state dict


@pytest.mark.parametrize("name", ["sigmoid-groups-bias-shared", "softmax-norm-shared-gated", "hash"])
def test_state_dict_round_trip(name):
    cfg = MoEConfig(**CONFIGS[name])
    src = build(cfg, seed=1)
    if cfg.routes_by_hash:  # a table no fresh layer would build: proves tid2eid is saved and loaded
        with torch.no_grad():
            src.gate.tid2eid.copy_(src.gate.tid2eid.roll(1, dims=0).flip(1))
    state = src.state_dict()
    if src.gate.expert_bias is not None:
        assert "gate.expert_bias" in state
    if cfg.routes_by_hash:
        assert "gate.tid2eid" in state
    dst = build(cfg, seed=2)
    x = torch.randn(2, 4, D)
    ids = ids_for(cfg, (2, 4)) if cfg.routes_by_hash else None
    run = (lambda m: m(x, ids)) if ids is not None else (lambda m: m(x))
    assert not torch.equal(run(dst), run(src))
    dst.load_state_dict(state)
    assert torch.equal(run(dst), run(src))
    assert torch.equal(dst.stats.load, src.stats.load)
    if src.gate.expert_bias is not None:
        assert torch.equal(dst.gate.expert_bias, src.gate.expert_bias)


# ----------------------------------------------------------------------------- presets


def preset_layers():
    small = dict(hidden_size=64, intermediate_size=32)
    return [
        pytest.param("mixtral-8x7b", dict(small), 0, id="mixtral-8x7b"),
        pytest.param("qwen3-30b-a3b", dict(small, num_experts=16, top_k=4), 0, id="qwen3-30b-a3b"),
        pytest.param("deepseek-v3", dict(small, num_experts=16, top_k=4), 0, id="deepseek-v3"),
        pytest.param("deepseek-v4", dict(small, num_experts=16, vocab_size=1000), 0, id="deepseek-v4-layer0-hash"),
        pytest.param("deepseek-v4", dict(small, num_experts=16, vocab_size=1000), 2, id="deepseek-v4-layer2-hash"),
        pytest.param("deepseek-v4", dict(small, num_experts=16, vocab_size=1000), 5, id="deepseek-v4-layer5"),
    ]


@pytest.mark.parametrize("name, overrides, layer_id", preset_layers())
def test_presets_build_and_run(name, overrides, layer_id):
    cfg = MoEConfig.preset(name, **overrides)
    layer = build(cfg, layer_id=layer_id)
    expect_hash = name == "deepseek-v4" and layer_id < 3
    assert type(layer.gate) is (HashGate if expect_hash else TopKGate)
    assert (layer.shared_experts is not None) == (cfg.num_shared_experts > 0)
    x = torch.randn(2, 6, 64)
    ids = ids_for(cfg, (2, 6)) if expect_hash else None
    out = check_layer(layer, x, ids)  # also backward: every gradient vs the reference
    assert out.shape == x.shape
    assert int(layer.stats.load.sum()) == 2 * 6 * cfg.top_k


def test_layer_non_contiguous_input():
    cfg = MoEConfig(**CONFIGS["softmax-norm-shared-gated"])
    layer = build(cfg)
    x = torch.randn(5, 3, D)
    x_t = x.transpose(0, 1)  # [3, 5, D], not contiguous
    assert not x_t.is_contiguous()
    out = layer(x_t)
    assert out.shape == x_t.shape
    assert rel_err(out, layer(x_t.contiguous())) <= 1e-6
    check_layer(layer, x_t)


# ----------------------------------------------------------------------------- torch.compile(fullgraph=True)


COMPILE_CONFIGS = {
    "softmax-pad-to-capacity": dict(capacity_factor=2.0, pad_to_capacity=True),
    "bias-groups-aux-z": dict(score_func="sigmoid", expert_bias=True, n_groups=2, topk_groups=1,
                              aux_loss_coef=0.1, z_loss_coef=1e-2),
    "capacity-position-router-bias": dict(capacity_factor=0.75, drop_policy="position", router_bias=True,
                                          expert_bias=True),
    "hash-shared-sequence-aux": dict(hash_routing=True, vocab_size=50, num_shared_experts=1, aux_loss_coef=0.1,
                                     aux_loss_type="sequence"),
    "global-batch-aux": dict(aux_loss_type="global_batch", aux_loss_coef=0.1),
}


@pytest.mark.parametrize(
    "name,masked",
    [
        pytest.param("softmax-pad-to-capacity", False, id="softmax-pad-to-capacity"),
        pytest.param("bias-groups-aux-z", True, id="bias-groups-aux-z-token-mask"),
        pytest.param("capacity-position-router-bias", True, id="capacity-position-router-bias-token-mask"),
        pytest.param("hash-shared-sequence-aux", False, id="hash-shared-sequence-aux"),
        pytest.param("global-batch-aux", True, id="global-batch-aux-token-mask"),
    ],
)
def test_layer_compiles_fullgraph_with_dynamic_tokens(name, masked):
    """torch.compile(layer, fullgraph=True, dynamic=True): no graph break, two token counts, and
    outputs, every gradient and the expert-bias counts equal eager (aot_eager keeps the test fast;
    the graph capture is the same one inductor receives)."""
    cfg = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2, backend="torch",
                    **COMPILE_CONFIGS[name])
    torch._dynamo.reset()  # every test compiles the same forward afresh (no recompile limit across tests)
    eager = build(cfg, seed=3).train()
    compiled_layer = build(cfg, seed=3).train()
    compiled = torch.compile(compiled_layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for seq in (5, 11):
        g = torch.Generator().manual_seed(seq)
        x = torch.randn(2, seq, cfg.hidden_size, generator=g)
        ids = torch.randint(0, 50, (2, seq), generator=g) if cfg.routes_by_hash else None
        mask = (torch.rand(2, seq, generator=g) > 0.3) if masked else None
        results = []
        for layer, fn in ((eager, eager), (compiled_layer, compiled)):
            xx = x.clone().requires_grad_(True)
            layer.zero_grad()
            out = fn(xx, ids, mask)
            out.square().sum().backward()
            counts = getattr(layer.gate, "expert_counts", None)
            results.append((out, [xx.grad] + [p.grad for p in layer.parameters()],
                            None if counts is None else counts.clone()))
        (out0, grads0, counts0), (out1, grads1, counts1) = results
        torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-6)
        for g0, g1 in zip(grads0, grads1, strict=True):
            torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)
        if counts0 is not None:
            assert torch.equal(counts0, counts1) and counts0.sum() > 0


@pytest.mark.parametrize("name", [*COMPILE_CONFIGS, "plain-softmax"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_layer_compiles_fullgraph_for_inference(name, mode):
    """torch.compile(eval layer, fullgraph=True, dynamic=True) under no_grad / inference_mode (how
    compiled generation runs): no graph break, equal to the eager inference path, decode (1 token)
    and prefill sizes. Eager takes the CPU inference path; compiled, the sorted FFN's custom op."""
    cfg = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2, backend="torch",
                    **COMPILE_CONFIGS.get(name, {}))
    torch._dynamo.reset()
    layer = build(cfg, seed=5).eval()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    for batch, seq in ((1, 1), (2, 7), (3, 5)):
        g = torch.Generator().manual_seed(seq)
        x = torch.randn(batch, seq, cfg.hidden_size, generator=g)
        ids = torch.randint(0, 50, (batch, seq), generator=g) if cfg.routes_by_hash else None
        with context():
            want, got = layer(x, ids), compiled(x, ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_checkpointed_compiled_layer_counts_each_forward_once():
    """checkpoint(compiled layer): the backward replays the compiled forward, and the expert-bias
    counter (a custom op that checks for a running backward when it runs) must not count it again."""
    torch._dynamo.reset()
    cfg = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2, expert_bias=True, backend="torch")
    layer = build(cfg, seed=4).train()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(10, 16, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(compiled, x, use_reentrant=False)
    after_forward = layer.gate.expert_counts.clone()
    assert after_forward.sum() == 10 * cfg.top_k
    out.sum().backward()
    assert torch.equal(layer.gate.expert_counts, after_forward)


def test_checkpointed_compiled_layer_adds_global_batch_counts_once():
    """aux_loss_type "global_batch" under checkpoint(torch.compile(layer, fullgraph=True)): the
    forward adds its counts once (the replay in the backward must not: a custom op checks at run
    time), and the gradients equal an eager run without checkpointing."""
    torch._dynamo.reset()
    cfg = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2, aux_loss_type="global_batch",
                    aux_loss_coef=0.5, backend="torch")
    layer, eager = build(cfg, seed=4).train(), build(cfg, seed=4).train()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(10, 16)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    out = torch.utils.checkpoint.checkpoint(compiled, xs[0], use_reentrant=False)
    after_forward = layer.gate.global_batch_counts.clone()
    assert after_forward[-1] == 10 * cfg.top_k
    out.square().sum().backward()
    assert torch.equal(layer.gate.global_batch_counts, after_forward)
    eager(xs[1]).square().sum().backward()
    assert torch.equal(eager.gate.global_batch_counts, after_forward)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.gate.weight.grad, eager.gate.weight.grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- eager CPU inference path


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 12),
    e=st.sampled_from([4, 8, 64]),
    score_func=st.sampled_from(["softmax", "sigmoid", "sqrtsoftplus"]),
    bias=st.booleans(),
    groups=st.booleans(),
    norm=st.booleans(),
    shared=st.integers(0, 1),
    losses=st.booleans(),
    hashed=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    data=st.data(),
)
def test_inference_path_equals_general_path(n, e, score_func, bias, groups, norm, shared, losses, hashed, dtype,
                                            data):
    """An eval forward under no_grad on CPU takes the inference path (torch_ops.inference_ffn:
    small_ffn or lean_forward, no routing plan); it equals the general forward of the same
    layer with grad enabled: output, routing weights and indices, and every stat (load, aux and
    z loss values, expert bias), on softmax/sigmoid/sqrtsoftplus, expert bias, groups, shared
    experts, losses, hash layers, fp32 and bf16, decode-size and many-expert batches."""
    import moe_kit.ops as layer_module  # ops picks the inference path

    k = data.draw(st.integers(1, min(e // 2, 4) if groups else min(e, 6)), label="k")
    bias = bias and not hashed  # a hash gate has no expert bias
    cfg = MoEConfig(
        hidden_size=16, intermediate_size=8, num_experts=e, top_k=k, score_func=score_func, norm_topk_prob=norm,
        expert_bias=bias, n_groups=4 if groups else 1, topk_groups=2 if groups else 1, num_shared_experts=shared,
        aux_loss_coef=0.01 if losses else 0.0, z_loss_coef=1e-3 if losses else 0.0,
        hash_routing=hashed, vocab_size=50 if hashed else None,
    )
    seed = data.draw(st.integers(0, 1000), label="seed")
    layer = build(cfg, seed=seed).to(dtype).eval()
    if bias:
        layer.gate.expert_bias.copy_(torch.randn(e, generator=torch.Generator().manual_seed(seed)) * 0.05)
    x = torch.randn(2, n, 16, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    ids = torch.randint(0, 50, (2, n), generator=torch.Generator().manual_seed(seed + 2)) if hashed else None
    taken = []
    real = layer_module.inference_ffn
    with mock.patch.object(layer_module, "inference_ffn", lambda *a: taken.append(1) or real(*a)), torch.no_grad():
        fast, fast_route = layer(x, ids), layer.gate(x, input_ids=ids)
    fast_stats = layer.stats
    assert taken, "the eval no_grad forward did not take the inference path"
    with mock.patch.object(layer_module, "inference_ffn", lambda *a: taken.append(1) or real(*a)):
        general = layer(x, ids)  # grad enabled: the general path
        general_route = layer.gate(x, input_ids=ids)
    assert len(taken) == 1
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(fast, general) <= tol
    assert torch.equal(fast_route[1], general_route[1])
    assert torch.allclose(fast_route[0], general_route[0].detach(), rtol=1e-6, atol=1e-7)
    stats = layer.stats
    assert torch.equal(fast_stats.load, stats.load)
    for name in ("aux_loss", "z_loss"):
        a, b = getattr(fast_stats, name), getattr(stats, name)
        assert (a is None) == (b is None) == (not losses), name
        if losses:
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), name


@pytest.mark.parametrize("case", ["grad", "mask", "capacity", "loop", "deterministic", "autocast"])
def test_inference_path_only_where_it_applies(case, monkeypatch):
    """The inference path is taken only under no_grad without token_mask, capacity, another
    backend or forced determinism; elsewhere the general path runs (and gives the same output).
    Under autocast it runs in the autocast dtype (the experts' dtype there)."""
    import moe_kit.ops as layer_module

    over = {"capacity": dict(capacity_factor=2.0), "loop": dict(backend="loop"),
            "deterministic": dict(deterministic=True)}.get(case, {})
    layer = build(MoEConfig(hidden_size=D, intermediate_size=INTER, num_experts=6, top_k=2, **over)).eval()
    x = torch.randn(3, 4, D)
    taken = []
    real = layer_module.inference_ffn
    monkeypatch.setattr(layer_module, "inference_ffn", lambda *a: taken.append(1) or real(*a))
    kwargs = dict(token_mask=torch.ones(3, 4, dtype=torch.bool)) if case == "mask" else {}
    context = torch.enable_grad() if case == "grad" else torch.no_grad()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast")
    with context, autocast:
        out = layer(x, **kwargs)
    assert bool(taken) == (case == "autocast")
    ref = layer(x)  # grad enabled: the general path
    assert rel_err(out.float(), ref) <= (2e-2 if case == "autocast" else 1e-6)


def test_training_mode_no_grad_forward_still_counts():
    """A training-mode forward under no_grad (what reentrant checkpointing runs first) keeps the
    gate's training steps (expert-bias counts) while its experts take the inference path."""
    layer = build(MoEConfig(hidden_size=D, intermediate_size=INTER, num_experts=6, top_k=2, expert_bias=True))
    x = torch.randn(3, 4, D)
    with torch.no_grad():
        out = layer(x)
    assert float(layer.gate.expert_counts.sum()) == 3 * 4 * 2
    assert rel_err(out, layer(x)) <= 1e-6


# ----------------------------------------------------------------------------- expert biases, swiglu_oai (gpt-oss)

GPT_OSS_SMALL = dict(hidden_size=16, intermediate_size=8, num_experts=8, top_k=2, swiglu_limit=1.0, aux_loss_coef=0.0)


def build_gpt_oss(backend="torch", dtype=torch.float32, **overrides):
    """The gpt-oss-20b preset shrunk: router bias, swiglu_oai clamped at 1, expert biases (non-zero)."""
    layer = build(MoEConfig.preset("gpt-oss-20b", **GPT_OSS_SMALL, backend=backend, **overrides), dtype=dtype)
    with torch.no_grad():
        layer.experts.gate_up_proj.mul_(4.0)  # the clamp bites
        layer.experts.gate_up_proj_bias.normal_()
        layer.experts.down_proj_bias.normal_()
    return layer


@pytest.mark.parametrize(
    "overrides, masked",
    [
        pytest.param({}, False, id="dropless"),
        pytest.param(dict(capacity_factor=0.5), False, id="capacity"),
        pytest.param(dict(capacity_factor=0.5, pad_to_capacity=True), False, id="pad-to-capacity"),
        pytest.param({}, True, id="token-mask"),
    ],
)
def test_gpt_oss_layer_torch_backend_equals_loop(overrides, masked):
    """MoELayer with expert_proj_bias and swiglu_oai: the torch backend (dropped slots, static
    padded GEMMs, padding) equals the loop reference in the output and every gradient, expert biases
    included; a padded token gets no expert, so no expert bias either."""
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1))
    cot = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(2))
    mask = (torch.arange(7) < torch.tensor([[7], [4], [0]])) if masked else None
    results = {}
    for backend in ("torch", "loop"):
        layer = build_gpt_oss(backend, **overrides)
        xb = x.clone().requires_grad_(True)
        out = layer(xb, token_mask=mask)
        params = [xb, *layer.parameters()]
        results[backend] = (out, *grads_of(out, params, cot))
        if masked:
            assert not out[~mask].any()
        if "capacity_factor" in overrides:
            assert layer.stats.dropped_fraction > 0.2
    assert [n for n, _ in layer.named_parameters()][-2:] == ["experts.gate_up_proj_bias", "experts.down_proj_bias"]
    for got, ref in zip(results["torch"], results["loop"], strict=True):
        assert rel_err(got, ref) <= 1e-5
    assert results["torch"][-1].abs().sum() > 0  # the down bias got its gradient


def test_gpt_oss_layer_inference_keeps_the_biases():
    """No-grad CPU forwards (the layer's inference path where it applies) keep swiglu_oai and the
    expert biases: equal to the loop backend, and not equal with the biases zeroed."""
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    layers = {b: build_gpt_oss(b).eval() for b in ("torch", "loop")}
    with torch.no_grad():
        got, want = layers["torch"](x), layers["loop"](x)
        layers["torch"].experts.down_proj_bias.zero_()
        unbiased = layers["torch"](x)
    assert rel_err(got, want) <= 1e-5 and rel_err(unbiased, want) > 0.1


def test_gpt_oss_layer_meta_build_and_reset():
    """A meta-built layer with expert biases materializes: to_empty + reset_parameters zero them."""
    cfg = MoEConfig.preset("gpt-oss-20b", **GPT_OSS_SMALL)
    with torch.device("meta"):
        layer = MoELayer(cfg)
    assert layer.experts.down_proj_bias.is_meta
    layer.to_empty(device="cpu")
    with torch.no_grad():
        layer.experts.gate_up_proj_bias.fill_(float("nan"))
    layer.reset_parameters()
    assert not layer.experts.gate_up_proj_bias.any() and not layer.experts.down_proj_bias.any()
    assert torch.isfinite(layer(torch.randn(5, 16))).all()


def _ep_biases_rank(rank: int, world: int) -> dict:
    """Rank `rank` of an expert-parallel gpt-oss layer (capacity over the group) loaded from the
    single-process layer's state: this rank's slice of every [E, ...] expert tensor, biases included."""
    import torch.distributed as dist

    full = build_gpt_oss("torch", torch.float64, capacity_factor=1.0, router_dtype=torch.float64)
    layer = MoELayer(full.cfg, ep_group=dist.group.WORLD).to(torch.float64)
    count = full.cfg.num_experts // world
    state = {k: v[rank * count:(rank + 1) * count] if k.startswith("experts.") else v
             for k, v in full.state_dict().items()}
    layer.load_state_dict(state)
    x, cot = _ep_inputs(rank)
    x.requires_grad_(True)
    out = layer(x)
    (out * cot).sum().backward()
    return dict(out=out.detach(), grad_x=x.grad, grads={n: p.grad for n, p in layer.named_parameters()},
                dropped=layer.stats.dropped_fraction)


def _ep_inputs(rank: int):
    gen = torch.Generator().manual_seed(100 + rank)
    n = (9, 4)[rank]
    return torch.randn(n, 16, generator=gen, dtype=torch.float64), torch.randn(n, 16, generator=gen,
                                                                               dtype=torch.float64)


def test_gpt_oss_layer_expert_parallel_matches_single_process(tmp_path):
    """2 gloo ranks, 4 experts each: outputs, input gradients and expert gradients (biases included,
    each rank its slice) equal one process holding all 8 experts; capacity drops over the group."""
    from gloo_ranks import run_ranks

    results = run_ranks(_ep_biases_rank, 2, tmp_path)
    ref = build_gpt_oss("torch", torch.float64, capacity_factor=1.0, router_dtype=torch.float64)
    parts = [_ep_inputs(r) for r in range(2)]
    x = torch.cat([p[0] for p in parts]).requires_grad_(True)
    out = ref(x)
    (out * torch.cat([p[1] for p in parts])).sum().backward()
    assert rel_err(torch.cat([r["out"] for r in results]), out) <= 1e-10
    assert rel_err(torch.cat([r["grad_x"] for r in results]), x.grad) <= 1e-10
    for name, p in ref.named_parameters():
        grads = [r["grads"][name] for r in results]
        got = torch.cat(grads) if name.startswith("experts.") else sum(grads)
        assert rel_err(got, p.grad) <= 1e-10, name
    assert results[0]["dropped"] == pytest.approx(ref.stats.dropped_fraction) and ref.stats.dropped_fraction > 0


@pytest.mark.parametrize("deterministic", [True, False])
def test_config_deterministic_reaches_the_dispatch(deterministic):
    """MoEConfig.deterministic is moe_ffn's combine choice for the layer's experts; outputs and
    gradients agree with the default."""
    import moe_kit.experts as layer_module  # GroupedExperts.forward calls ops.dispatch

    cfg = MoEConfig(hidden_size=D, intermediate_size=INTER, num_experts=6, top_k=2, deterministic=deterministic)
    layer, default = build(cfg), build(cfg.replace(deterministic=None))
    x = torch.randn(5, D)
    seen = []
    real = layer_module.dispatch

    def recording(*args, **kwargs):
        seen.append(kwargs["deterministic"])
        return real(*args, **kwargs)

    with mock.patch.object(layer_module, "dispatch", recording):
        out = layer(x)
    assert seen == [deterministic]
    ref = default(x)
    assert rel_err(out, ref) <= 1e-6
    out.sum().backward()
    ref.sum().backward()
    assert rel_err(layer.experts.gate_up_proj.grad, default.experts.gate_up_proj.grad) <= 1e-6


# ----------------------------------------------------------------------------- router -> dispatcher -> experts


@pytest.mark.parametrize("over", [
    pytest.param({}, id="dropless"),
    pytest.param(dict(capacity_factor=0.5, pad_to_capacity=True), id="capacity-padded"),
    pytest.param(dict(routing="expert_choice", capacity_factor=1.0), id="expert-choice"),
])
def test_expert_module_hooks_see_every_expert_call(over):
    """GroupedExperts.forward runs the routed experts: a forward hook on layer.experts sees the rows,
    routing weights and dispatched indices (dropped / unrouted slots as E), and what it returns is
    the routed output (the layer's output minus nothing else: no shared experts here)."""
    layer = build(MoEConfig(hidden_size=D, intermediate_size=INTER, num_experts=4, top_k=2, **over))
    seen = []
    layer.experts.register_forward_hook(lambda module, args, out: seen.append((args, out)))
    x = torch.randn(3, 5, D)
    out = layer(x)
    assert len(seen) == 1
    (rows, weights, indices), routed = seen[0]
    assert rows.shape == (15, D) and weights.shape == indices.shape and indices.shape[0] == 15
    assert torch.equal(routed, out.view(15, D))
    if over:
        assert bool((indices == 4).any())  # capacity / expert choice left some slots without expert


class _FirstExpertsGate(nn.Module):
    """A routing scheme the layer has never heard of: tokens go to experts 0 and 1 with weight 1/2."""

    def __init__(self):
        super().__init__()
        self.expert_bias = None
        self.aux_loss = self.z_loss = None
        self.marks_unrouted = False

    def forward(self, x, *, input_ids=None, token_mask=None):
        n = x.reshape(-1, x.shape[-1]).shape[0]
        return torch.full((n, 2), 0.5), torch.tensor([[0, 1]]).expand(n, 2)

    def capacity_rule(self):
        return None


def test_any_gate_with_the_router_signature_drives_the_layer():
    """The layer calls gate(x, input_ids=..., token_mask=...) and nothing else per forward: a new
    routing scheme needs no change in the layer (no branch on gate types)."""
    layer = build(MoEConfig(hidden_size=D, intermediate_size=INTER, num_experts=4, top_k=2))
    layer.gate = _FirstExpertsGate()
    layer.dispatcher = layer._make_dispatcher()
    x = torch.randn(6, D)
    ref = moe_kit.ops.moe_ffn(x, torch.full((6, 2), 0.5), torch.tensor([[0, 1]]).expand(6, 2),
                              layer.experts.gate_up_proj, layer.experts.down_proj, backend="loop")
    assert rel_err(layer(x), ref) <= 1e-6
    assert torch.equal(layer.stats.load, torch.tensor([6, 6, 0, 0]))
