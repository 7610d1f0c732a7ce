"""Balancing losses (Switch aux, z-loss), their self-attached gradients, and the expert-bias update.

References are plain torch written here, from the definitions: the Switch aux loss E * sum_i f_i * P_i,
the z-loss mean(logsumexp(logits)^2), and the expert-bias step bias += rate * sign(mean_load - load).
"""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import moe_kit
from moe_kit import HashGate, MoEConfig, TopKGate

SCORE_FUNCS = ["softmax", "sigmoid", "sqrtsoftplus"]
HYP = settings(max_examples=30, deadline=None)


# ----------------------------------------------------------------------------- references


def ref_scores(logits, score_func):
    if score_func == "softmax":
        return torch.softmax(logits, dim=-1)
    if score_func == "sigmoid":
        return torch.sigmoid(logits)
    return torch.sqrt(torch.nn.functional.softplus(logits))


def ref_aux(scores, idx, num_experts):
    """E * sum_i f_i * P_i over one set of tokens: scores [N, E], idx [N, k]."""
    n, k = idx.shape
    f = torch.stack([(idx == i).sum() for i in range(num_experts)]).to(scores.dtype) / (n * k)
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=0)
    return num_experts * (f * p).sum()


def ref_aux_sequence(scores, idx, num_experts, batch, seq):
    per_seq = [
        ref_aux(scores[b * seq:(b + 1) * seq], idx[b * seq:(b + 1) * seq], num_experts) for b in range(batch)
    ]
    return torch.stack(per_seq).mean()


def ref_z(logits):
    m = logits.max(dim=-1, keepdim=True).values
    lse = m.squeeze(-1) + torch.log(torch.exp(logits - m).sum(dim=-1))
    return (lse**2).mean()


def ref_select(scores, bias, k):
    choice = scores if bias is None else scores + bias
    return choice.argsort(dim=-1, descending=True)[:, :k]


def make_cfg(**kw):
    base = dict(hidden_size=8, intermediate_size=4, num_experts=6, top_k=2)
    base.update(kw)
    return MoEConfig(**base)


def make_gate(cfg, seed=0, cls=TopKGate):
    torch.manual_seed(seed)
    gate = cls(cfg)
    with torch.no_grad():
        gate.weight.normal_(0.0, cfg.hidden_size**-0.5)
    return gate


# ----------------------------------------------------------------------------- loss values


@HYP
@given(
    score_func=st.sampled_from(SCORE_FUNCS),
    experts=st.integers(2, 10),
    k_frac=st.floats(0, 1),
    kind=st.sampled_from(["global", "sequence"]),
    batch=st.integers(1, 4),
    seq=st.integers(1, 12),
    aux_coef=st.sampled_from([0.0, 0.01, 0.5]),
    z_coef=st.sampled_from([0.0, 1e-3, 0.2]),
    seed=st.integers(0, 2**16),
)
def test_loss_values_match_hand_formula(score_func, experts, k_frac, kind, batch, seq, aux_coef, z_coef, seed):
    k = 1 + int(k_frac * (experts - 1))
    cfg = make_cfg(num_experts=experts, top_k=k, score_func=score_func, aux_loss_coef=aux_coef,
                   aux_loss_type=kind, z_loss_coef=z_coef)
    gate = make_gate(cfg, seed)
    x = torch.randn(batch, seq, cfg.hidden_size)
    _, idx = gate(x)
    logits = x.reshape(-1, cfg.hidden_size) @ gate.weight.detach().T
    s = ref_scores(logits, score_func)
    assert torch.equal(idx.sort(-1).values, ref_select(s, None, k).sort(-1).values)
    if aux_coef > 0:
        aux = ref_aux(s, idx, experts) if kind == "global" else ref_aux_sequence(s, idx, experts, batch, seq)
        assert gate.aux_loss is not None and not gate.aux_loss.requires_grad
        torch.testing.assert_close(gate.aux_loss.float(), aux_coef * aux, rtol=1e-5, atol=1e-7)
    else:
        assert gate.aux_loss is None
    if z_coef > 0:
        assert gate.z_loss is not None and not gate.z_loss.requires_grad
        torch.testing.assert_close(gate.z_loss.float(), z_coef * ref_z(logits), rtol=1e-5, atol=1e-7)
    else:
        assert gate.z_loss is None


def test_sequence_and_global_differ():
    """Sequence-wise aux is the mean of per-sequence losses, not the loss over all tokens."""
    cfg = make_cfg(num_experts=4, top_k=1, aux_loss_coef=1.0, aux_loss_type="sequence")
    seq_gate = make_gate(cfg, 1)
    glob_gate = make_gate(cfg.replace(aux_loss_type="global"), 1)
    x = torch.randn(2, 16, cfg.hidden_size)
    x[1] += 3 * seq_gate.weight[0].detach()  # second sequence leans to expert 0
    _, idx = seq_gate(x)
    _, idx_g = glob_gate(x)
    assert torch.equal(idx, idx_g)
    s = torch.softmax(x.reshape(-1, cfg.hidden_size) @ seq_gate.weight.detach().T, -1)
    torch.testing.assert_close(seq_gate.aux_loss, ref_aux_sequence(s, idx, 4, 2, 16))
    torch.testing.assert_close(glob_gate.aux_loss, ref_aux(s, idx, 4))
    assert abs(float(seq_gate.aux_loss) - float(glob_gate.aux_loss)) > 1e-3


@pytest.mark.parametrize("kind", ["global", "sequence"])
def test_uniform_scores_give_aux_one(kind):
    """Uniform softmax scores: P_i = 1/E, so E * sum_i f_i / E = 1 whatever the routing."""
    cfg = make_cfg(num_experts=8, top_k=3, aux_loss_coef=0.25, aux_loss_type=kind)
    gate = TopKGate(cfg)
    with torch.no_grad():
        gate.weight.zero_()
    gate(torch.randn(3, 5, cfg.hidden_size))
    torch.testing.assert_close(gate.aux_loss, torch.tensor(0.25))


def test_all_tokens_on_one_expert_aux():
    """k=1, every token on expert 0 with score p there: loss = E * 1 * mean_p0."""
    cfg = make_cfg(hidden_size=1, num_experts=4, top_k=1, aux_loss_coef=1.0)
    gate = TopKGate(cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([[2.0], [0.0], [0.0], [0.0]]))
    x = torch.ones(10, 1)
    _, idx = gate(x)
    assert (idx == 0).all()
    p0 = torch.exp(torch.tensor(2.0)) / (torch.exp(torch.tensor(2.0)) + 3)
    torch.testing.assert_close(gate.aux_loss, 4 * p0)


def test_hash_gate_aux_uses_table_routing():
    cfg = make_cfg(num_experts=5, top_k=2, vocab_size=30, score_func="sigmoid", aux_loss_coef=0.3, z_loss_coef=0.1)
    gate = make_gate(cfg, 4, cls=HashGate)
    x = torch.randn(40, cfg.hidden_size)
    ids = torch.randint(0, 30, (40,))
    _, idx = gate(x, input_ids=ids)
    logits = x @ gate.weight.detach().T
    torch.testing.assert_close(gate.aux_loss, 0.3 * ref_aux(torch.sigmoid(logits), gate.tid2eid[ids], 5))
    torch.testing.assert_close(gate.z_loss, 0.1 * ref_z(logits))


@pytest.mark.parametrize(
    "shape",
    [pytest.param((12, 8), id="2D"), pytest.param((2, 2, 3, 8), id="4D")],
)
def test_sequence_aux_needs_3d_input(shape):
    gate = make_gate(make_cfg(aux_loss_coef=0.1, aux_loss_type="sequence"))
    with pytest.raises(ValueError, match="sequence"):
        gate(torch.randn(shape))


# ----------------------------------------------------------------------------- loss gradients


def reference_grads(gate, x, cfg, upstream, bias=None):
    """(grad of sum(upstream * weights), grad of the coef-weighted losses) w.r.t. (W, x), plain autograd."""
    w = gate.weight.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    logits = xr.reshape(-1, cfg.hidden_size) @ w.T
    s = ref_scores(logits, cfg.score_func)
    idx = ref_select(s.detach(), bias, cfg.top_k)
    weights = s.gather(1, idx)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights * cfg.route_scale
    main = (upstream * weights).sum()
    losses = torch.zeros(())
    if cfg.aux_loss_coef > 0:
        plain = ref_select(s.detach(), None, cfg.top_k)  # f counts the unbiased top-k (Megatron, DeepSeek-V3)
        if cfg.aux_loss_type == "global":
            aux = ref_aux(s, plain, cfg.num_experts)
        else:
            aux = ref_aux_sequence(s, plain, cfg.num_experts, x.shape[0], x.shape[1])
        losses = losses + cfg.aux_loss_coef * aux
    if cfg.z_loss_coef > 0:
        losses = losses + cfg.z_loss_coef * ref_z(logits)
    g_main = torch.autograd.grad(main, [w, xr], retain_graph=True)
    if not losses.requires_grad:  # no loss configured
        return g_main, (torch.zeros_like(w), torch.zeros_like(xr)), idx
    g_loss = torch.autograd.grad(losses, [w, xr])
    return g_main, g_loss, idx


@pytest.mark.parametrize("score_func", SCORE_FUNCS)
@pytest.mark.parametrize(
    "aux_coef,z_coef,kind",
    [
        pytest.param(6.0, 0.0, "global", id="aux-global"),
        pytest.param(6.0, 0.0, "sequence", id="aux-sequence"),
        pytest.param(0.0, 0.2, "global", id="z-only"),
        pytest.param(6.0, 0.2, "sequence", id="aux+z"),
        pytest.param(0.0, 0.0, "global", id="no-loss"),
    ],
)
@pytest.mark.parametrize("scale", [1.0, 0.25], ids=["scale1", "scale0.25"])
def test_losses_reach_gradient_by_themselves(score_func, aux_coef, z_coef, kind, scale):
    cfg = make_cfg(num_experts=6, top_k=2, score_func=score_func, aux_loss_coef=aux_coef, z_loss_coef=z_coef,
                   aux_loss_type=kind, expert_bias=True, route_scale=1.5)
    gate = make_gate(cfg, 7)
    with torch.no_grad():
        gate.expert_bias.copy_(torch.randn(6) * 0.3)
    wrapper = nn.ModuleDict({"router": gate})
    moe_kit.set_aux_loss_scale(wrapper, scale)
    x = torch.randn(3, 10, cfg.hidden_size, requires_grad=True)
    upstream = torch.randn(30, 2)
    weights, idx = gate(x)
    (weights * upstream).sum().backward()

    g_main, g_loss, ref_idx = reference_grads(gate, x, cfg, upstream, bias=gate.expert_bias.clone())
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    if aux_coef or z_coef:  # the loss gradient is large enough that dropping or mis-scaling it is visible
        assert g_loss[0].norm() > 0.02 * g_main[0].norm()
    expected_w = g_main[0] + scale * g_loss[0]
    expected_x = g_main[1] + scale * g_loss[1]
    torch.testing.assert_close(gate.weight.grad, expected_w, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(x.grad, expected_x, rtol=1e-4, atol=1e-6)


def test_loss_gradient_counted_once_when_weights_used_twice():
    cfg = make_cfg(aux_loss_coef=0.5, z_loss_coef=0.05, score_func="sigmoid")
    gate = make_gate(cfg, 9)
    x = torch.randn(20, cfg.hidden_size)
    weights, _ = gate(x)
    (weights.sum() + (weights**2).sum()).backward()

    w = gate.weight.detach().clone().requires_grad_(True)
    logits = x @ w.T
    s = torch.sigmoid(logits)
    idx = ref_select(s.detach(), None, 2)
    ww = s.gather(1, idx)
    ww = ww / ww.sum(-1, keepdim=True)
    total = ww.sum() + (ww**2).sum() + 0.5 * ref_aux(s, idx, 6) + 0.05 * ref_z(logits)
    (expected,) = torch.autograd.grad(total, [w])
    torch.testing.assert_close(gate.weight.grad, expected, rtol=1e-4, atol=1e-6)


def test_no_loss_in_graph_under_no_grad():
    cfg = make_cfg(aux_loss_coef=0.5)
    gate = make_gate(cfg)
    with torch.no_grad():
        weights, _ = gate(torch.randn(5, cfg.hidden_size))
    assert not weights.requires_grad
    assert gate.aux_loss is not None  # still logged


# ----------------------------------------------------------------------------- expert counts


def bias_gate(seed=0, **kw):
    cfg = make_cfg(score_func="sigmoid", expert_bias=True, **kw)
    return make_gate(cfg, seed)


def loads(idx, e):
    return torch.bincount(idx.reshape(-1), minlength=e).float()


def test_counts_accumulate_over_micro_batches_not_in_eval():
    gate = bias_gate(1).train()
    assert gate.expert_counts.dtype == torch.float32 and gate.expert_counts.shape == (6,)
    assert torch.equal(gate.expert_counts, torch.zeros(6))
    _, i1 = gate(torch.randn(13, 8))
    _, i2 = gate(torch.randn(2, 9, 8))
    expected = loads(i1, 6) + loads(i2, 6)
    assert torch.equal(gate.expert_counts, expected)
    assert expected.sum() == (13 + 18) * 2
    with torch.no_grad():  # a training forward without grad still counts
        _, i3 = gate(torch.randn(5, 8))
    expected += loads(i3, 6)
    assert torch.equal(gate.expert_counts, expected)
    gate.eval()
    gate(torch.randn(50, 8))
    assert torch.equal(gate.expert_counts, expected)


class _Block(nn.Module):
    def __init__(self, gate):
        super().__init__()
        self.gate = gate
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        weights, _ = self.gate(self.proj(x))
        return weights


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_counts_not_double_counted_under_checkpoint(use_reentrant):
    torch.manual_seed(0)
    block = _Block(bias_gate(2)).train()
    x = torch.randn(24, 8, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=use_reentrant)
    assert out.requires_grad
    with torch.no_grad():
        _, idx = block.gate.eval()(block.proj(x))
    block.gate.train()
    expected = loads(idx, 6)
    assert torch.equal(block.gate.expert_counts, expected)
    out.sum().backward()  # recomputes the forward
    assert x.grad is not None and block.gate.weight.grad is not None
    assert torch.equal(block.gate.expert_counts, expected)
    # a second checkpointed step adds exactly its own tokens
    out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=use_reentrant)
    out.sum().backward()
    assert torch.equal(block.gate.expert_counts, 2 * expected)


# ----------------------------------------------------------------------------- update_expert_bias


def test_update_expert_bias_by_hand():
    gate = bias_gate(bias_update_rate=0.01)
    with torch.no_grad():
        gate.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3, 0.0, 0.0]))
        gate.expert_counts.copy_(torch.tensor([10.0, 0.0, 5.0, 6.0, 4.0, 5.0]))  # mean 5
    moe_kit.update_expert_bias(gate)
    # sign(5 - load) = [-1, +1, 0, -1, +1, 0]
    expected = torch.tensor([0.1 - 0.01, -0.2 + 0.01, 0.0, 0.3 - 0.01, 0.01, 0.0])
    torch.testing.assert_close(gate.expert_bias, expected, rtol=0, atol=1e-7)
    assert gate.expert_bias.dtype == torch.float32
    assert torch.equal(gate.expert_counts, torch.zeros(6))
    moe_kit.update_expert_bias(gate)  # all loads 0 = mean: no change
    torch.testing.assert_close(gate.expert_bias, expected, rtol=0, atol=1e-7)


def test_update_expert_bias_clamps():
    gate = bias_gate(bias_update_rate=0.05, bias_max=0.5)
    with torch.no_grad():
        gate.expert_bias.copy_(torch.tensor([0.48, -0.48, 0.5, -0.5, 0.2, -0.2]))
        gate.expert_counts.copy_(torch.tensor([0.0, 10.0, 0.0, 10.0, 0.0, 10.0]))  # mean 5
    moe_kit.update_expert_bias(gate)
    expected = torch.tensor([0.5, -0.5, 0.5, -0.5, 0.25, -0.25])
    torch.testing.assert_close(gate.expert_bias, expected, rtol=0, atol=1e-7)


def test_update_expert_bias_over_model_from_forwards():
    """Several gates of different sizes in one model, counts from real forwards; others untouched."""
    g1 = bias_gate(3, bias_update_rate=0.02)
    g2 = make_gate(make_cfg(num_experts=4, top_k=1, score_func="sigmoid", expert_bias=True,
                            bias_update_rate=0.1), 4)
    plain = make_gate(make_cfg(), 5)
    hashed = make_gate(make_cfg(vocab_size=16), 6, cls=HashGate)
    model = nn.ModuleList([g1, g2, plain, hashed]).train()
    with torch.no_grad():
        g2.expert_bias.copy_(torch.tensor([0.3, -0.3, 0.0, 0.1]))
    b1, b2 = g1.expert_bias.clone(), g2.expert_bias.clone()
    _, i1 = g1(torch.randn(40, 8))
    _, i2a = g2(torch.randn(17, 8))
    _, i2b = g2(torch.randn(9, 8))
    plain(torch.randn(4, 8))
    hashed(torch.randn(4, 8), input_ids=torch.arange(4))
    w_plain = plain.weight.detach().clone()
    l1, l2 = loads(i1, 6), loads(i2a, 4) + loads(i2b, 4)
    moe_kit.update_expert_bias(model)
    torch.testing.assert_close(g1.expert_bias, (b1 + 0.02 * torch.sign(l1.mean() - l1)).clamp(-1, 1), rtol=0, atol=1e-7)
    torch.testing.assert_close(g2.expert_bias, (b2 + 0.1 * torch.sign(l2.mean() - l2)).clamp(-1, 1), rtol=0, atol=1e-7)
    assert torch.equal(g1.expert_counts, torch.zeros(6)) and torch.equal(g2.expert_counts, torch.zeros(4))
    assert torch.equal(plain.weight, w_plain) and plain.expert_bias is None


# ----------------------------------------------------------------------------- balancing dynamics


def _skewed_run(balance: bool, steps: int):
    torch.manual_seed(0)
    cfg = make_cfg(hidden_size=16, num_experts=8, top_k=2, score_func="sigmoid", expert_bias=True,
                   bias_update_rate=1e-2)
    gate = TopKGate(cfg).train()
    with torch.no_grad():
        gate.weight.normal_(0.0, 0.3)
        gate.weight[:2, 0] += 3.0  # feature 0 is always 1: experts 0 and 1 score about sigmoid(3)
    history = []
    for _ in range(steps):
        x = torch.randn(256, 16)
        x[:, 0] = 1.0
        with torch.no_grad():
            _, idx = gate(x)
        history.append(loads(idx, 8))
        assert torch.equal(gate.expert_counts, history[-1])
        if balance:
            moe_kit.update_expert_bias(gate)
        else:
            gate.expert_counts.zero_()
    return torch.stack(history), gate


def test_expert_bias_balances_skewed_router():
    unbalanced, _ = _skewed_run(balance=False, steps=300)
    ratio = unbalanced.max(dim=1).values / unbalanced.mean(dim=1)
    assert (ratio > 2).all(), "the skewed router must be badly unbalanced on its own"

    balanced, gate = _skewed_run(balance=True, steps=300)
    last = balanced[-50:].sum(0)
    assert last.max() / last.mean() < 1.3, last
    # the bias pushed the two hot experts down and the others up, within the clamp
    assert (gate.expert_bias[:2] < 0).all() and (gate.expert_bias[2:] > gate.expert_bias[:2].max()).all()
    assert gate.expert_bias.abs().max() <= gate.cfg.bias_max


# ----------------------------------------------------------------------------- issue 11: exact to the references


def ref_group_limited_choice(scores, bias, n_groups, topk_groups, k):
    """DeepSeek-V3's Gate, one token at a time: groups by the sum of their top-2 biased scores."""
    chosen = []
    for row in scores:
        c = row + bias
        groups = c.view(n_groups, -1)
        group_score = groups.sort(descending=True).values[:, :2].sum(-1)
        keep = group_score.argsort(descending=True)[:topk_groups].tolist()
        allowed = torch.full_like(c, float("-inf")).view(n_groups, -1)
        for g in keep:
            allowed[g] = groups[g]
        chosen.append(allowed.view(-1).argsort(descending=True)[:k])
    return torch.stack(chosen)


@given(
    seed=st.integers(0, 10_000),
    k=st.integers(1, 4),
    kind=st.sampled_from(["global", "sequence"]),
    score_func=st.sampled_from(SCORE_FUNCS),
)
@HYP
def test_aux_counts_unbiased_topk_with_bias_and_groups(seed, k, kind, score_func):
    """Megatron (compute_routing_scores_for_aux_loss) and DeepSeek-V3's sequence-wise loss count
    the plain top-k of the unbiased scores over all experts, not the biased group-limited choice."""
    cfg = make_cfg(num_experts=8, top_k=k, score_func=score_func, expert_bias=True, n_groups=4, topk_groups=2,
                   aux_loss_coef=0.5, aux_loss_type=kind)
    gate = make_gate(cfg, seed)
    with torch.no_grad():
        gate.expert_bias.copy_(torch.randn(8, generator=torch.Generator().manual_seed(seed)) * 0.5)
    x = torch.randn(2, 6, cfg.hidden_size, generator=torch.Generator().manual_seed(seed + 1))
    _, idx = gate(x)
    s = ref_scores(x.reshape(-1, cfg.hidden_size) @ gate.weight.detach().T, score_func)
    assert torch.equal(idx, ref_group_limited_choice(s, gate.expert_bias, 4, 2, k))
    plain = s.argsort(dim=-1, descending=True)[:, :k]
    expected = ref_aux(s, plain, 8) if kind == "global" else ref_aux_sequence(s, plain, 8, 2, 6)
    torch.testing.assert_close(gate.aux_loss, 0.5 * expected, rtol=1e-5, atol=1e-7)


def test_aux_loss_types_combine_with_their_own_coefficients():
    """Megatron's list form: moe_router_load_balancing_type=[...] with one coefficient each."""
    both = make_cfg(num_experts=6, top_k=2, aux_loss_type=("global", "sequence"), aux_loss_coef=(0.3, 0.05))
    gate = make_gate(both, 3)
    x = torch.randn(3, 5, both.hidden_size)
    gate(x)
    s = torch.softmax(x.reshape(-1, both.hidden_size) @ gate.weight.detach().T, -1)
    plain = s.argsort(dim=-1, descending=True)[:, :2]
    expected = 0.3 * ref_aux(s, plain, 6) + 0.05 * ref_aux_sequence(s, plain, 6, 3, 5)
    torch.testing.assert_close(gate.aux_loss, expected, rtol=1e-5, atol=1e-7)


def megatron_seq_aux(scores, idx, num_experts, batch, seq, real):
    """Megatron-Core's seq_aux_loss with a padding mask (router._apply_seq_aux_loss,
    get_tokens_per_expert_and_token_count, switch_load_balancing_loss_func), ported as written in
    its [S, B] layout: the B sequences folded into the expert dim, T = real tokens / B, / B.
    scores [B*S, E], idx [B*S, k], real bool [B*S] (moe_kit's [B, S] order)."""
    k = idx.shape[1]
    probs = scores / scores.sum(-1, keepdim=True)
    routing_map = torch.zeros_like(probs).scatter(1, idx, 1.0)
    probs, routing_map = probs * real.unsqueeze(-1), routing_map * real.unsqueeze(-1)
    fold = lambda t: t.view(batch, seq, num_experts).transpose(0, 1).reshape(seq, batch * num_experts)  # noqa: E731
    probs, routing_map = fold(probs), fold(routing_map)
    tokens_per_expert = routing_map.sum(dim=0)
    total_num_tokens = tokens_per_expert.sum() / (k * batch)
    loss = (probs.sum(dim=0) * tokens_per_expert).sum() * num_experts / (k * total_num_tokens**2)
    return loss / batch


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_sequence_aux_norm_with_unequal_real_lengths(score_func):
    """Lengths 20 / 12 / 4 of S = 20: "per_sequence" (the default) = the mean of each sequence's
    loss over its own real tokens; "megatron" = Megatron-Core's seq_aux_loss, every sequence divided
    by the mean real length. They differ here, and both equal the plain rule without a mask."""
    batch, seq = 3, 20
    real = (torch.arange(seq) < torch.tensor([[20], [12], [4]])).reshape(-1)
    values = {}
    for norm in ("per_sequence", "megatron"):
        cfg = make_cfg(num_experts=6, top_k=2, aux_loss_type="sequence", aux_loss_coef=1.0,
                       score_func=score_func, sequence_aux_norm=norm, router_dtype=torch.float64)
        gate = make_gate(cfg, 11).double()
        x = torch.randn(batch, seq, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        gate(x, token_mask=real.view(batch, seq))
        s = ref_scores(x.reshape(-1, cfg.hidden_size) @ gate.weight.detach().T, score_func)
        plain = ref_select(s, None, 2)
        if norm == "per_sequence":
            rows = real.view(batch, seq)
            want = torch.stack([ref_aux(s.view(batch, seq, 6)[b][rows[b]], plain.view(batch, seq, 2)[b][rows[b]], 6)
                                for b in range(batch)]).mean()
        else:
            want = megatron_seq_aux(s, plain, 6, batch, seq, real)
        torch.testing.assert_close(gate.aux_loss, want, rtol=1e-12, atol=0)
        values[norm] = gate.aux_loss.item()
        gate(x)  # no mask: both are the plain per-sequence mean
        torch.testing.assert_close(gate.aux_loss, ref_aux_sequence(s, plain, 6, batch, seq), rtol=1e-12, atol=0)
        unmasked = megatron_seq_aux(s, plain, 6, batch, seq, torch.ones(batch * seq, dtype=torch.bool))
        torch.testing.assert_close(gate.aux_loss, unmasked, rtol=1e-12, atol=0)
    assert abs(values["megatron"] - values["per_sequence"]) > 1e-3 * values["per_sequence"]


def test_sequence_aux_norm_megatron_in_the_group_losses(monkeypatch):
    """group_balancing_losses (ep_group) with "megatron": on one rank (the all-reduce an identity)
    it gives switch_aux_loss's value and gradient, padding included."""
    import moe_kit.group_balancing as gb

    monkeypatch.setattr(gb, "_all_reduce_pieces", lambda pieces, group: {n: p.detach() for n, p in pieces.items()})
    real = (torch.arange(8) < torch.tensor([[8], [5], [0]])).reshape(-1)
    for norm in ("per_sequence", "megatron"):
        cfg = make_cfg(num_experts=6, top_k=2, aux_loss_type="sequence", aux_loss_coef=0.5, sequence_aux_norm=norm)
        logits = torch.randn(24, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        logits.requires_grad_(True)
        s = torch.softmax(logits, -1)
        idx = s.detach().topk(2, dim=-1).indices
        value, _, term = gb.group_balancing_losses(cfg, s, idx, logits, (3, 8), None, real)
        want = 0.5 * moe_kit.balancing.switch_aux_loss(s, idx, 6, "sequence", (3, 8), real, norm)
        torch.testing.assert_close(value, want.detach(), rtol=1e-12, atol=0)
        grad, = torch.autograd.grad(term, logits, retain_graph=True)
        want_grad, = torch.autograd.grad(want, logits)
        torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-15)


def test_global_batch_aux_counts_every_micro_batch_of_the_step():
    """aux_loss_type="global_batch" (Megatron's global_aux_loss): f from the slots of all micro-batches
    so far in this optimizer step, P from the current micro-batch; update_expert_bias starts a new step."""
    cfg = make_cfg(num_experts=6, top_k=2, aux_loss_type="global_batch", aux_loss_coef=1.0)
    gate = make_gate(cfg, 5).train()
    micro = [torch.randn(7, cfg.hidden_size, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    seen = torch.zeros(6)
    for step_start in (True, False):
        for m, x in enumerate(micro):
            gate.weight.grad = None
            weights, _ = gate(x)
            s = torch.softmax(x @ gate.weight.detach().T, -1)
            plain = s.argsort(dim=-1, descending=True)[:, :2]
            seen += torch.bincount(plain.reshape(-1), minlength=6).float()
            f = seen / ((m + 1) * 7 * 2)
            expected = 6 * (f * (s / s.sum(-1, keepdim=True)).mean(0)).sum()
            torch.testing.assert_close(gate.aux_loss, expected, rtol=1e-6, atol=1e-7)
            # the attached gradient is that of E * sum f_i P_i with f constant
            weights.sum().mul(0).backward()
            w = gate.weight.detach().clone().requires_grad_(True)
            p = torch.softmax(x @ w.T, -1)
            (6 * (f * p.mean(0)).sum()).backward()
            torch.testing.assert_close(gate.weight.grad, w.grad, rtol=1e-5, atol=1e-7)
        moe_kit.update_expert_bias(gate)  # a new optimizer step: counts start again
        assert gate.global_batch_counts is None
        seen.zero_()
        assert step_start in (True, False)


def test_global_batch_aux_counts_are_not_added_by_eval_or_checkpoint_recompute():
    cfg = make_cfg(num_experts=6, top_k=2, aux_loss_type="global_batch", aux_loss_coef=1.0)
    gate = make_gate(cfg, 6).train()
    x = torch.randn(9, cfg.hidden_size, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(lambda t: gate(t)[0], x, use_reentrant=False)
    after_forward = gate.global_batch_counts.clone()
    out.sum().backward()
    assert torch.equal(gate.global_batch_counts, after_forward)  # the recompute read, did not add
    gate.eval()
    gate(x)
    assert torch.equal(gate.global_batch_counts, after_forward)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_global_batch_aux_under_checkpoint_matches_the_plain_run(use_reentrant):
    """Micro-batches checkpointed, one backward of their summed losses (pipeline schedules): each
    recompute takes the f of its own forward, not the counts of every micro-batch so far, so the
    router gradient equals the run without checkpointing. Micro-batches 0 and 2 are the same
    tokens (equal counts, and equal fingerprints), 1 the same tokens in another order; then a
    second step after update_expert_bias."""
    cfg = make_cfg(num_experts=6, top_k=2, aux_loss_type="global_batch", aux_loss_coef=1.0)
    gen = torch.Generator().manual_seed(8)
    first = torch.randn(9, cfg.hidden_size, generator=gen)
    micro = [first, first[torch.randperm(9, generator=gen)], first, torch.randn(9, cfg.hidden_size, generator=gen)]
    cots = [torch.randn(9, 2, generator=gen) for _ in micro]
    grads = []
    for checkpointed in (False, True):
        gate = make_gate(cfg, 7).train()
        step_grads = []
        for step in range(2):
            gate.weight.grad = None
            total = 0.0
            for m, (x, cot) in enumerate(zip(micro, cots, strict=True)):
                x = (x * (1 + step)).requires_grad_(True)  # reentrant needs an input that requires grad
                if checkpointed:
                    w = torch.utils.checkpoint.checkpoint(lambda t, g=gate: g(t)[0], x, use_reentrant=use_reentrant)
                else:
                    w = gate(x)[0]
                total = total + (m + 1) * (w * cot).sum()
            total.backward()
            step_grads.append(gate.weight.grad.clone())
            moe_kit.update_expert_bias(gate)
        grads.append(step_grads)
    for plain, checkpointed in zip(*grads, strict=True):
        assert ((checkpointed - plain).norm() / plain.norm()).item() <= 1e-6


def test_global_batch_aux_under_checkpoint_of_a_compiled_gate():
    """checkpoint(torch.compile(gate, fullgraph=True)) over two micro-batches, one backward: the
    custom op finds each recompute's f at run time, so the gradient equals the eager plain run."""
    torch._dynamo.reset()
    cfg = make_cfg(num_experts=6, top_k=2, aux_loss_type="global_batch", aux_loss_coef=1.0)
    gen = torch.Generator().manual_seed(9)
    micro = [torch.randn(9, cfg.hidden_size, generator=gen) for _ in range(2)]
    eager, gate = make_gate(cfg, 7).train(), make_gate(cfg, 7).train()
    compiled = torch.compile(gate, fullgraph=True, backend="aot_eager")
    sum(2.0 ** m * eager(x)[0].sum() for m, x in enumerate(micro)).backward()
    outs = [torch.utils.checkpoint.checkpoint(lambda t: compiled(t)[0], x.requires_grad_(True), use_reentrant=False)
            for x in micro]
    sum(2.0 ** m * w.sum() for m, w in enumerate(outs)).backward()
    assert torch.equal(gate.global_batch_counts, eager.global_batch_counts)
    assert ((gate.weight.grad - eager.weight.grad).norm() / eager.weight.grad.norm()).item() <= 1e-6


@pytest.mark.parametrize("eps", [0.01, 0.3])
def test_router_jitter_multiplies_the_router_input_in_training_only(eps):
    """Switch / Megatron jitter: router input x * U(1 - eps, 1 + eps), fresh noise per forward, no
    noise in eval."""
    cfg = make_cfg(num_experts=6, top_k=2, jitter_eps=eps)
    gate = make_gate(cfg, 7).train()
    x = torch.randn(40, cfg.hidden_size)
    torch.manual_seed(123)
    w_train, _ = gate(x)
    torch.manual_seed(123)
    noise = torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
    ref = torch.softmax((x * noise) @ gate.weight.detach().T, -1).topk(2, dim=-1).values  # softmax: no renorm
    torch.testing.assert_close(w_train, ref)
    assert not torch.allclose(w_train, gate.eval()(x)[0])
    clean = torch.softmax(x @ gate.weight.detach().T, -1).topk(2, dim=-1).values
    torch.testing.assert_close(gate(x)[0], clean)
