"""TopKGate / HashGate / hash_table against plain-torch references written here.

Every reference spells out the gate semantics step by step (logits in fp32, scores, selection-only
expert bias, group limit, top-k, unbiased weights, normalization, route scale) and
never calls moe_kit internals.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import moe_kit
from moe_kit import HashGate, MoEConfig, TopKGate

SCORE_FUNCS = ["softmax", "sigmoid", "sqrtsoftplus"]
HYP = settings(max_examples=35, deadline=None)


# ----------------------------------------------------------------------------- references


def ref_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    if score_func == "softmax":
        z = logits - logits.max(dim=-1, keepdim=True).values
        e = z.exp()
        return e / e.sum(dim=-1, keepdim=True)
    if score_func == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-logits))
    if score_func == "sqrtsoftplus":
        return torch.sqrt(torch.nn.functional.softplus(logits))
    raise AssertionError(score_func)


def ref_logits(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Router math in fp32 whatever the model dtype: x.float() @ W.float().T on flattened tokens."""
    return x.reshape(-1, w.shape[1]).float() @ w.float().T


def ref_select(scores, bias, n_groups, topk_groups, k):
    """Selection indices [N, k] (descending selection score) with DeepSeek-V3 group limiting."""
    choice = scores if bias is None else scores + bias.float()
    n, e = choice.shape
    if n_groups > 1:
        grouped = choice.reshape(n, n_groups, e // n_groups)
        ordered = grouped.sort(dim=-1, descending=True).values
        group_score = ordered[..., :2].sum(-1) if bias is not None else ordered[..., 0]
        keep = group_score.argsort(dim=-1, descending=True)[:, :topk_groups]
        masked = torch.ones(n, n_groups, dtype=torch.bool)
        masked[torch.arange(n).unsqueeze(1), keep] = False
        choice = grouped.masked_fill(masked.unsqueeze(-1), float("-inf")).reshape(n, e)
    return choice.argsort(dim=-1, descending=True)[:, :k]


def ref_topk_gate(x, w, bias, cfg):
    logits = ref_logits(x, w)
    scores = ref_scores(logits, cfg.score_func)
    idx = ref_select(scores, bias, cfg.n_groups, cfg.topk_groups, cfg.top_k)
    weights = ref_finish(scores, idx, cfg)
    return weights, idx


def ref_finish(scores, idx, cfg):
    weights = torch.gather(scores, 1, idx.long())  # the unbiased scores of the chosen experts
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * cfg.route_scale


def by_expert(weights, idx):
    """Sort each token's (expert, weight) pairs by expert id: order-free comparison of top-k."""
    order = idx.argsort(dim=-1)
    return weights.gather(1, order), idx.gather(1, order)


def assert_same_routing(got, ref, atol=1e-6, rtol=1e-5):
    (w, i), (rw, ri) = got, ref
    assert w.dtype == torch.float32
    assert i.dtype == torch.int64
    assert w.shape == rw.shape and i.shape == ri.shape
    w_s, i_s = by_expert(w, i)
    rw_s, ri_s = by_expert(rw, ri.long())
    assert torch.equal(i_s, ri_s), f"expert sets differ:\n{i_s}\nvs\n{ri_s}"
    torch.testing.assert_close(w_s, rw_s, atol=atol, rtol=rtol)


def make_cfg(**kw):
    base = dict(hidden_size=8, intermediate_size=4, num_experts=8, top_k=2)
    base.update(kw)
    return MoEConfig(**base)


def make_topk_gate(cfg, seed=0, bias_scale=0.5):
    torch.manual_seed(seed)
    gate = TopKGate(cfg)
    with torch.no_grad():
        gate.weight.normal_(0.0, cfg.hidden_size**-0.5)  # logits ~ N(0, 1): no saturated (tied) scores
        if cfg.expert_bias:
            gate.expert_bias.copy_(torch.randn(cfg.num_experts) * bias_scale)
    return gate


# ----------------------------------------------------------------------------- TopKGate


@st.composite
def topk_setups(draw):
    n_groups = draw(st.sampled_from([1, 1, 2, 4]))
    per_group = draw(st.integers(1, 6))
    num_experts = n_groups * per_group
    topk_groups = draw(st.integers(1, n_groups))
    reachable = topk_groups * per_group if n_groups > 1 else num_experts
    top_k = draw(st.integers(1, reachable))
    return dict(
        hidden_size=draw(st.integers(2, 24)),
        num_experts=num_experts,
        top_k=top_k,
        n_groups=n_groups,
        topk_groups=topk_groups,
        score_func=draw(st.sampled_from(SCORE_FUNCS)),
        expert_bias=draw(st.booleans()),
        norm_topk_prob=draw(st.booleans()),
        route_scale=draw(st.sampled_from([1.0, 2.5, 0.75])),
        n_tokens=draw(st.integers(1, 40)),
        seed=draw(st.integers(0, 2**16)),
    )


@HYP
@given(topk_setups())
def test_topk_gate_matches_reference(setup):
    n_tokens, seed = setup.pop("n_tokens"), setup.pop("seed")
    cfg = make_cfg(intermediate_size=4, **setup)
    gate = make_topk_gate(cfg, seed)
    x = torch.randn(n_tokens, cfg.hidden_size)
    got = gate(x)
    ref = ref_topk_gate(x, gate.weight.detach(), gate.expert_bias, cfg)
    assert_same_routing(got, ref)
    # distinct experts per token, and with group limiting at most topk_groups groups touched
    idx = got[1]
    assert all(len(set(row.tolist())) == cfg.top_k for row in idx)
    if cfg.n_groups > 1:
        groups = idx // (cfg.num_experts // cfg.n_groups)
        assert all(len(set(row.tolist())) <= cfg.topk_groups for row in groups)


@HYP
@given(
    score_func=st.sampled_from(SCORE_FUNCS),
    norm=st.booleans(),
    scale=st.sampled_from([1.0, 2.5]),
    seed=st.integers(0, 2**16),
)
def test_weights_are_unbiased_scores_of_biased_choice(score_func, norm, scale, seed):
    """A large bias changes the selection, but the weights stay the unbiased scores s of the chosen experts."""
    cfg = make_cfg(score_func=score_func, expert_bias=True, norm_topk_prob=norm, route_scale=scale)
    gate = make_topk_gate(cfg, seed, bias_scale=3.0)
    x = torch.randn(32, cfg.hidden_size)
    w, idx = gate(x)
    s = ref_scores(ref_logits(x, gate.weight.detach()), score_func)
    # chosen by s + bias ...
    ref_idx = (s + gate.expert_bias).argsort(dim=-1, descending=True)[:, : cfg.top_k]
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    # ... which here differs from choosing by s alone for some tokens (the bias matters) ...
    plain = s.argsort(dim=-1, descending=True)[:, : cfg.top_k]
    assert not torch.equal(idx.sort(-1).values, plain.sort(-1).values)
    # ... and weighted by s (no bias) of the chosen experts
    picked = torch.stack([s[t, idx[t]] for t in range(32)])
    if norm:
        picked = picked / picked.sum(-1, keepdim=True)
    torch.testing.assert_close(w, picked * scale, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "score_func,use_bias,expected",
    [
        # selection scores [0.9, 0.0 | 0.6, 0.59]: top-2 sum picks group 1 (1.19 > 0.9), max would pick group 0
        pytest.param("sigmoid", True, 2, id="bias-top2-sum-beats-max"),
        # scores sigmoid([2, -5 | 1, 0.9]) = [.88, .007 | .73, .71]: max picks group 0, a sum would pick group 1
        pytest.param("sigmoid", False, 0, id="no-bias-uses-group-max"),
    ],
)
def test_group_score_rule(score_func, use_bias, expected):
    cfg = make_cfg(hidden_size=1, num_experts=4, top_k=1, n_groups=2, topk_groups=1,
                   score_func=score_func, expert_bias=use_bias)
    gate = TopKGate(cfg)
    with torch.no_grad():
        if use_bias:
            gate.weight.zero_()  # every score 0.5
            gate.expert_bias.copy_(torch.tensor([0.4, -0.5, 0.1, 0.09]))
        else:
            gate.weight.copy_(torch.tensor([[2.0], [-5.0], [1.0], [0.9]]))
    w, idx = gate(torch.ones(3, 1))
    assert idx.tolist() == [[expected]] * 3
    torch.testing.assert_close(w, torch.ones(3, 1))  # sigmoid -> norm_topk_prob default True -> 1


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((7, 8), id="N,D"),
        pytest.param((2, 5, 8), id="B,S,D"),
        pytest.param((2, 3, 2, 8), id="A,B,S,D"),
        pytest.param((8,), id="D-only"),
        pytest.param((0, 8), id="no-tokens"),
        pytest.param((2, 0, 8), id="empty-seq"),
    ],
)
@pytest.mark.parametrize(
    "expert_bias,n_groups",
    [
        pytest.param(False, 1, id="plain"),
        pytest.param(True, 1, id="bias"),
        pytest.param(False, 2, id="groups"),
        pytest.param(True, 2, id="bias-groups"),
    ],
)
def test_leading_shapes_flatten_to_tokens(shape, expert_bias, n_groups):
    cfg = make_cfg(score_func="sigmoid", expert_bias=expert_bias, n_groups=n_groups, topk_groups=1)
    gate = make_topk_gate(cfg, 3)
    x = torch.randn(shape)
    w, idx = gate(x)
    n = math.prod(shape[:-1])
    assert w.shape == (n, cfg.top_k) and idx.shape == (n, cfg.top_k)
    assert_same_routing((w, idx), ref_topk_gate(x, gate.weight.detach(), gate.expert_bias, cfg))


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
@pytest.mark.parametrize("expert_bias", [False, True], ids=["nobias", "bias"])
def test_bf16_input_and_weight_route_in_fp32(score_func, expert_bias):
    cfg = make_cfg(hidden_size=64, num_experts=16, top_k=4, score_func=score_func, expert_bias=expert_bias,
                   n_groups=4, topk_groups=2)
    gate = make_topk_gate(cfg, 5)
    gate.weight = nn.Parameter(gate.weight.detach().to(torch.bfloat16))
    x = torch.randn(50, 3, 64).to(torch.bfloat16)
    w, idx = gate(x)
    assert w.dtype == torch.float32 and idx.dtype == torch.int64
    # reference computed from the bf16 values upcast to fp32, not from a bf16 matmul
    assert_same_routing((w, idx), ref_topk_gate(x, gate.weight.detach(), gate.expert_bias, cfg))
    w.sum().backward()
    assert gate.weight.grad is not None and gate.weight.grad.dtype == torch.bfloat16


def test_bias_stays_fp32_after_module_to_bf16():
    """Contract: `gate.expert_bias` is an fp32 buffer. `model.to(torch.bfloat16)` is the usual way to run a model in
    bf16; a bf16 bias cannot take the 1e-3 update steps (bf16 spacing near 0.5 is 2**-8)."""
    cfg = make_cfg(num_experts=4, top_k=1, score_func="sigmoid", expert_bias=True, bias_update_rate=1e-3)
    gate = make_topk_gate(cfg, 0).to(torch.bfloat16)
    assert gate.expert_bias.dtype == torch.float32
    with torch.no_grad():
        gate.expert_bias.fill_(0.5)
        gate.expert_counts.copy_(torch.tensor([9.0, 1.0, 5.0, 5.0]))
    moe_kit.update_expert_bias(gate)
    torch.testing.assert_close(gate.expert_bias.float(), torch.tensor([0.499, 0.501, 0.5, 0.5]), rtol=0, atol=1e-6)


def test_counts_stay_exact_after_module_to_bf16():
    """Token counts are exact integers: after `gate.to(torch.bfloat16)` they must not round (bf16 holds
    integers exactly only up to 256)."""
    cfg = make_cfg(num_experts=2, top_k=1, score_func="sigmoid", expert_bias=True)
    gate = make_topk_gate(cfg, 0).to(torch.bfloat16).train()
    expected = torch.zeros(2)
    for _ in range(150):
        _, idx = gate(torch.randn(3, cfg.hidden_size, dtype=torch.bfloat16))
        expected += torch.bincount(idx.flatten(), minlength=2).float()
    assert torch.equal(gate.expert_counts.float(), expected)
    assert gate.expert_counts.dtype == torch.float32


# ----------------------------------------------------------------------------- sqrtsoftplus at -1e4


def _huge_negative_setup(mixed: bool):
    """x and W such that logits = x @ W.T are about -1e4 (every expert, or half of them when mixed)."""
    d, e = 4, 8
    x = torch.full((6, d), 50.0) + torch.randn(6, d) * 0.1
    w = -torch.full((e, d), 50.0) - torch.arange(e, dtype=torch.float32).unsqueeze(1)
    if mixed:
        w[e // 2:] = torch.randn(e // 2, d) * 0.01  # logits about +-1
    logits = x @ w.T
    assert logits[:, : e // 2].max() < -9000
    return x, w


@pytest.mark.parametrize("mixed", [False, True], ids=["all-huge-negative", "half-huge-negative"])
@pytest.mark.parametrize("norm", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("aux", [False, True], ids=["noloss", "losses"])
def test_sqrtsoftplus_huge_negative_logits_finite(mixed, norm, aux):
    x, w = _huge_negative_setup(mixed)
    cfg = make_cfg(hidden_size=4, num_experts=8, top_k=2, score_func="sqrtsoftplus", norm_topk_prob=norm,
                   aux_loss_coef=0.1 if aux else 0.0, z_loss_coef=1e-6 if aux else 0.0)
    gate = TopKGate(cfg)
    with torch.no_grad():
        gate.weight.copy_(w)
    x = x.clone().requires_grad_(True)
    weights, idx = gate(x)
    assert torch.isfinite(weights).all()
    assert (weights >= 0).all()
    (weights * torch.randn_like(weights)).sum().backward()
    assert torch.isfinite(gate.weight.grad).all()
    assert torch.isfinite(x.grad).all()
    if mixed:  # the moderate experts win and their weights carry gradient
        assert (idx >= 4).all()
        assert gate.weight.grad[4:].abs().sum() > 0


def test_sqrtsoftplus_huge_negative_normalized_weights_sum_to_route_scale():
    """All logits about -1e4: every score is the same clamped floor, so the normalized top-k weights are
    exactly 1/k each (normalization: weights /= weights.sum(-1)), whatever floor eps is used."""
    x, w = _huge_negative_setup(mixed=False)
    cfg = make_cfg(hidden_size=4, num_experts=8, top_k=2, score_func="sqrtsoftplus", route_scale=1.5)
    gate = TopKGate(cfg)
    with torch.no_grad():
        gate.weight.copy_(w)
    weights, _ = gate(x)
    torch.testing.assert_close(weights, torch.full_like(weights, 1.5 / 2), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- HashGate


def make_hash_gate(cfg, seed=0):
    torch.manual_seed(seed)
    gate = HashGate(cfg)
    with torch.no_grad():
        gate.weight.normal_(0.0, cfg.hidden_size**-0.5)
    return gate


@HYP
@given(
    vocab=st.integers(1, 200),
    experts=st.integers(1, 12),
    k_frac=st.floats(0, 1),
    score_func=st.sampled_from(SCORE_FUNCS),
    norm=st.booleans(),
    scale=st.sampled_from([1.0, 2.5]),
    lead=st.sampled_from([(9,), (2, 5), (1, 1), (3, 2, 2)]),
    id_dtype=st.sampled_from([torch.int64, torch.int32]),
    seed=st.integers(0, 2**16),
)
def test_hash_gate_matches_reference(vocab, experts, k_frac, score_func, norm, scale, lead, id_dtype, seed):
    k = 1 + int(k_frac * (experts - 1))
    cfg = make_cfg(num_experts=experts, top_k=k, score_func=score_func, norm_topk_prob=norm,
                   route_scale=scale, vocab_size=vocab)
    gate = make_hash_gate(cfg, seed)
    assert gate.tid2eid.shape == (vocab, k) and not gate.tid2eid.is_floating_point()
    assert torch.equal(gate.tid2eid.long(), moe_kit.hash_table(vocab, experts, k, seed=0).long())
    assert "tid2eid" not in dict(gate.named_parameters())
    x = torch.randn(*lead, cfg.hidden_size)
    ids = torch.randint(0, vocab, lead, dtype=id_dtype)
    w, idx = gate(x, input_ids=ids)
    flat_ids = ids.reshape(-1).long()
    assert idx.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(idx, gate.tid2eid[flat_ids].long())  # order too: indices ARE the table rows
    s = ref_scores(ref_logits(x, gate.weight.detach()), score_func)
    torch.testing.assert_close(w, ref_finish(s, idx, cfg), atol=1e-6, rtol=1e-5)


def test_hash_gate_routes_by_its_buffer():
    """Indices come from the tid2eid buffer (e.g. one loaded from a checkpoint), not a recomputed table."""
    cfg = make_cfg(num_experts=6, top_k=2, score_func="sigmoid", vocab_size=10)
    gate = make_hash_gate(cfg)
    table = torch.stack([torch.randperm(6)[:2] for _ in range(10)])
    gate.load_state_dict({"weight": gate.weight.detach().clone(), "tid2eid": table})
    ids = torch.tensor([3, 3, 0, 9, 5])
    w, idx = gate(torch.randn(5, cfg.hidden_size), input_ids=ids)
    assert torch.equal(idx, table[ids])


@pytest.mark.parametrize(
    "ids,exc,match",
    [
        pytest.param(None, ValueError, "input_ids", id="missing"),
        pytest.param(torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError, "integer", id="float-ids"),
        pytest.param(torch.tensor([0, 1, -1, 3]), ValueError, "vocab_size", id="negative"),
        pytest.param(torch.tensor([0, 1, 10, 3]), ValueError, "vocab_size", id="equal-vocab"),
        pytest.param(torch.tensor([0, 1, 99, 3]), ValueError, "vocab_size", id="above-vocab"),
        pytest.param(torch.tensor([0, 1, 2]), ValueError, "3 ids but x has 4 tokens", id="too-few"),
        pytest.param(torch.tensor([0, 1, 2, 3, 4]), ValueError, "5 ids but x has 4 tokens", id="too-many"),
    ],
)
def test_hash_gate_bad_ids(ids, exc, match):
    cfg = make_cfg(num_experts=4, top_k=2, vocab_size=10)
    gate = make_hash_gate(cfg)
    with pytest.raises(exc, match=match):
        gate(torch.randn(4, cfg.hidden_size), input_ids=ids)


def test_hash_gate_needs_vocab_size():
    with pytest.raises(ValueError, match="vocab_size"):
        HashGate(make_cfg())


# ----------------------------------------------------------------------------- hash_table


def check_table(table, vocab, experts, k):
    assert table.shape == (vocab, k)
    assert not table.is_floating_point() and table.dtype != torch.bool
    assert int(table.min()) >= 0 and int(table.max()) < experts
    srt = table.long().sort(dim=1).values  # sorted rows have no equal neighbours <=> distinct experts
    assert (srt[:, 1:] != srt[:, :-1]).all(), "repeated expert in a row"


@pytest.mark.parametrize(
    "vocab,experts,k",
    [
        pytest.param(1000, 64, 6, id="1000x64k6"),
        pytest.param(1000, 7, 3, id="E-not-divisible-by-k"),
        pytest.param(1000, 5, 1, id="k1"),
        pytest.param(1000, 8, 8, id="k-equals-E"),
        pytest.param(1001, 9, 4, id="odd-sizes"),
        pytest.param(5000, 256, 6, id="5000x256k6"),
        pytest.param(129280, 256, 6, id="deepseek-v4-vocab"),
    ],
)
def test_hash_table_distinct_in_range_balanced(vocab, experts, k):
    table = moe_kit.hash_table(vocab, experts, k, 0)
    check_table(table, vocab, experts, k)
    load = torch.bincount(table.long().flatten(), minlength=experts).float()
    assert load.sum() == vocab * k
    assert (load > 0).all()
    assert load.max() / load.mean() <= 1.05


@settings(max_examples=40, deadline=None)
@given(vocab=st.integers(1, 300), experts=st.integers(1, 40), k_frac=st.floats(0, 1), seed=st.integers(0, 1000))
def test_hash_table_rows_distinct_any_sizes(vocab, experts, k_frac, seed):
    k = 1 + int(k_frac * (experts - 1))
    check_table(moe_kit.hash_table(vocab, experts, k, seed), vocab, experts, k)


def test_hash_table_seeded():
    a = moe_kit.hash_table(1000, 16, 4, seed=1)
    b = moe_kit.hash_table(1000, 16, 4, seed=1)
    c = moe_kit.hash_table(1000, 16, 4, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(moe_kit.hash_table(50, 8, 2), moe_kit.hash_table(50, 8, 2, seed=0))


@pytest.mark.parametrize(
    "vocab,experts,k",
    [pytest.param(10, 4, 5, id="k-above-E"), pytest.param(10, 4, 0, id="k0"), pytest.param(0, 4, 2, id="vocab0")],
)
def test_hash_table_bad_args(vocab, experts, k):
    with pytest.raises(ValueError):
        moe_kit.hash_table(vocab, experts, k)


# ----------------------------------------------------------------------------- state_dict


def test_topk_gate_state_dict_round_trip():
    cfg = make_cfg(score_func="sigmoid", expert_bias=True, n_groups=2, topk_groups=1)
    gate = make_topk_gate(cfg, 11).train()
    gate(torch.randn(20, cfg.hidden_size))  # non-zero counts, which must not be saved
    assert gate.expert_counts.sum() == 20 * cfg.top_k
    sd = gate.state_dict()
    assert set(sd) == {"weight", "expert_bias"}
    assert sd["expert_bias"].dtype == torch.float32
    fresh = TopKGate(cfg)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.expert_bias, gate.expert_bias) and torch.equal(fresh.weight, gate.weight)
    assert torch.equal(fresh.expert_counts, torch.zeros(cfg.num_experts))
    x = torch.randn(30, cfg.hidden_size)
    gate.eval()
    fresh.eval()
    assert_same_routing(fresh(x), gate(x), atol=0, rtol=0)
    assert_same_routing(fresh(x), ref_topk_gate(x, gate.weight.detach(), gate.expert_bias, cfg))


def test_state_dict_from_before_the_rename_loads_the_expert_bias():
    """State dicts written when the noaux_tc buffer was called `gate.bias` still load into
    `gate.expert_bias` (and never into the router's own linear bias)."""
    cfg = make_cfg(score_func="sigmoid", expert_bias=True)
    gate = make_topk_gate(cfg, 12)
    with torch.no_grad():
        gate.expert_bias.copy_(torch.linspace(-0.3, 0.3, cfg.num_experts))
    old_format = {"weight": gate.weight.detach().clone(), "bias": gate.expert_bias.clone()}
    fresh = TopKGate(cfg)
    fresh.load_state_dict(old_format)
    assert fresh.bias is None
    assert torch.equal(fresh.expert_bias, gate.expert_bias)


def test_router_bias_is_a_trained_linear_bias():
    """router_bias=True: gate.bias [E] enters the logits (x W^T + b) and gets a gradient."""
    cfg = make_cfg(router_bias=True)
    gate = make_topk_gate(cfg, 13)
    with torch.no_grad():
        gate.bias.copy_(torch.linspace(-1.0, 1.0, cfg.num_experts))
    assert set(gate.state_dict()) == {"weight", "bias"}
    x = torch.randn(25, cfg.hidden_size)
    weights, indices = gate(x)
    logits = x @ gate.weight.detach().T + gate.bias.detach()
    ref_w, ref_i = logits.softmax(-1).topk(cfg.top_k, dim=-1)
    if cfg.norm_topk_prob:
        ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    torch.testing.assert_close(weights, ref_w)
    assert torch.equal(indices, ref_i)
    weights.sum().backward()
    assert gate.bias.grad is not None and gate.bias.grad.abs().sum() > 0


def test_topk_gate_without_bias_state_dict():
    gate = make_topk_gate(make_cfg(), 1)
    assert set(gate.state_dict()) == {"weight"}


def test_hash_gate_state_dict_round_trip():
    cfg = make_cfg(num_experts=6, top_k=3, vocab_size=40)
    gate = make_hash_gate(cfg, 2)
    with torch.no_grad():
        gate.tid2eid.copy_(gate.tid2eid.flip(0))  # a table differing from the default
    sd = gate.state_dict()
    assert set(sd) == {"weight", "tid2eid"}
    fresh = HashGate(cfg)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.tid2eid, gate.tid2eid)
    ids = torch.arange(40)
    x = torch.randn(40, cfg.hidden_size)
    (w1, i1), (w2, i2) = gate(x, input_ids=ids), fresh(x, input_ids=ids)
    assert torch.equal(i1, i2) and torch.equal(w1, w2)
    assert torch.equal(i2, moe_kit.hash_table(40, 6, 3).flip(0))


@pytest.mark.parametrize("aux_type", ["global", "sequence"])
@pytest.mark.parametrize("over", [dict(), dict(expert_bias=True, n_groups=4, topk_groups=2, score_func="sigmoid")],
                         ids=["plain", "biased-groups"])
def test_eval_no_grad_forward_equals_general_forward(aux_type, over):
    """An eval gate under no_grad (nothing attached; the plain top-k's values are the weights):
    weights, indices, the aux and z loss values and the tracked entropy equal a forward with grad
    enabled, and a 2-D input with the sequence aux loss still raises."""
    cfg = make_cfg(num_experts=8, top_k=2, aux_loss_coef=0.01, aux_loss_type=aux_type, z_loss_coef=1e-3, **over)
    gate = make_topk_gate(cfg).eval()
    gate.track_entropy = True
    x = torch.randn(3, 5, cfg.hidden_size)
    with torch.no_grad():
        fast = gate(x)
    fast_values = (gate.aux_loss, gate.z_loss, gate.entropy)
    general = gate(x)
    assert torch.equal(fast[1], general[1])
    assert torch.allclose(fast[0], general[0].detach(), rtol=1e-6, atol=1e-7)
    for a, b in zip(fast_values, (gate.aux_loss, gate.z_loss, gate.entropy), strict=True):
        assert a is not None and math.isclose(float(a), float(b), rel_tol=1e-6)
    if aux_type == "sequence":
        with torch.no_grad(), pytest.raises(ValueError, match="sequence"):
            gate(x.reshape(15, -1))
