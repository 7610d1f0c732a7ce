"""Expert capacity (moe_kit.ops.capacity): exact C, both drop policies, and the layer that uses them.

References are plain Python, one expert at a time.
"""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import pytest
import torch
from conftest import BmmShapes
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_kit import MoEConfig, MoELayer
from moe_kit.capacity_rule import capacity_of, decimal_ratio
from moe_kit.ops.capacity import expert_capacity, over_capacity

HYP = settings(max_examples=40, deadline=None)


def ref_over_capacity(weights, expert, num_experts, capacity, policy):
    """Per expert, keep `capacity` slots: heaviest first (ties: earlier) or earliest first."""
    w, e = weights.tolist(), expert.tolist()
    over = [False] * len(e)
    for ex in range(num_experts):
        slots = [s for s in range(len(e)) if e[s] == ex]
        if policy == "probs":
            slots.sort(key=lambda s: (-w[s], s))
        for s in slots[capacity:]:
            over[s] = True
    return torch.tensor(over, dtype=torch.bool)


@pytest.mark.parametrize(
    "cf,tokens,k,experts,expected",
    [
        pytest.param(1.1, 100, 1, 10, 11, id="1.1x100/10=11"),
        pytest.param(1.1, 200, 2, 8, 55, id="1.1x400/8=55"),
        pytest.param(1.2, 50, 1, 6, 10, id="1.2x50/6=10"),
        pytest.param(0.7, 30, 1, 21, 1, id="0.7x30/21=1"),
        pytest.param(1.0, 7, 2, 4, 4, id="ceil-3.5"),
        pytest.param(2.0, 0, 2, 4, 0, id="no-tokens"),
    ],
)
def test_expert_capacity_is_exact(cf, tokens, k, experts, expected):
    assert expert_capacity(tokens, k, experts, cf) == expected


def megatron_capacity(num_slots: int, num_experts: int, capacity_factor: float) -> int:
    """Megatron-Core's get_capacity(num_tokens=N*k, ...) as apply_router_token_dropping calls it:
    math.ceil((num_tokens / num_experts) * capacity_factor) in Python floats."""
    return math.ceil((num_slots / num_experts) * capacity_factor)


@pytest.mark.parametrize(
    "cf,slots,experts,exact",
    [
        pytest.param(1.1, 400, 8, 55, id="1.1x400/8"),  # 50.0 * 1.1 = 55.00000000000001
        pytest.param(1.1, 100, 2, 55, id="1.1x100/2"),
        pytest.param(0.9, 100, 6, 15, id="0.9x100/6"),  # 16.666666666666668 * 0.9 = 15.000000000000002
        pytest.param(1.3, 70, 13, 7, id="1.3x70/13"),
    ],
)
def test_exact_capacity_where_megatrons_float_formula_rounds_up(cf, slots, experts, exact):
    """The cases docs/routing_references.md cites: Megatron's float formula gives one more slot
    than the exact value; moe_kit gives the exact one (1.1 * 100 / 10, by contrast, is 11 in both)."""
    assert Fraction(str(cf)) * slots / experts == exact  # the exact value is an integer here
    assert megatron_capacity(slots, experts, cf) == exact + 1
    assert capacity_of(slots, experts, decimal_ratio(cf)) == exact
    assert megatron_capacity(100, 10, 1.1) == capacity_of(100, 10, decimal_ratio(1.1)) == 11


@given(
    cf=st.decimals(min_value=Decimal("0.05"), max_value=Decimal("8"), places=2),
    tokens=st.integers(0, 5000),
    k=st.integers(1, 8),
    experts=st.integers(1, 300),
)
@HYP
def test_expert_capacity_matches_rational_arithmetic(cf, tokens, k, experts):
    assert expert_capacity(tokens, k, experts, float(cf)) == math.ceil(Fraction(cf) * tokens * k / experts)


@given(
    seed=st.integers(0, 10_000),
    slots=st.integers(0, 60),
    experts=st.integers(1, 7),
    capacity=st.integers(0, 12),
    policy=st.sampled_from(["probs", "position"]),
    ties=st.booleans(),
)
@HYP
def test_over_capacity_matches_reference(seed, slots, experts, capacity, policy, ties):
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(slots, generator=g)
    if ties:
        weights = (weights * 3).floor()  # many equal weights: ties go to the earlier slot
    expert = torch.randint(0, experts + 1, (slots,), generator=g)  # id `experts` = already without expert
    got = over_capacity(weights, expert, experts, capacity, policy)
    ref = ref_over_capacity(weights, expert, experts, capacity, policy)
    assert torch.equal(got, ref)


def test_over_capacity_rejects_unknown_policy():
    with pytest.raises(ValueError, match="drop_policy"):
        over_capacity(torch.rand(4), torch.zeros(4, dtype=torch.long), 2, 1, "random")


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_layer_drops_by_policy_and_counts_bias_before_dropping(policy):
    """The layer keeps per expert the slots the policy names (the routed output equals the loop
    reference on those slots only); expert-bias counts are what the router chose, before dropping."""
    cfg = MoEConfig(hidden_size=8, intermediate_size=4, num_experts=4, top_k=2, capacity_factor=0.5,
                    drop_policy=policy, expert_bias=True, score_func="sigmoid", backend="torch")
    torch.manual_seed(0)
    layer = MoELayer(cfg).train()
    x = torch.randn(20, 8)
    out = layer(x)
    weights, indices = layer.gate.eval()(x)
    capacity = expert_capacity(20, 2, 4, 0.5)
    over = ref_over_capacity(weights.reshape(-1), indices.reshape(-1), 4, capacity, policy).view(20, 2)
    kept = indices.masked_fill(over, 4)
    ref = torch.zeros_like(x)
    for n in range(20):
        for j in range(2):
            e = int(kept[n, j])
            if e == 4:
                continue
            h = x[n] @ layer.experts.gate_up_proj[e].T
            act = torch.nn.functional.silu(h[:4]) * h[4:]
            ref[n] += weights[n, j] * (act @ layer.experts.down_proj[e].T)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert layer.stats.dropped_fraction == pytest.approx(int(over.sum()) / 40)
    assert torch.equal(layer.stats.load, torch.bincount(kept.reshape(-1), minlength=5)[:4])
    chosen = torch.bincount(indices.reshape(-1), minlength=4).float()
    assert torch.equal(layer.gate.expert_counts, chosen)  # before dropping


def test_position_policy_drops_the_last_positions_of_every_sequence():
    """[B, S, D] input: Megatron's tokens are sequence-major, so "position" keeps the earliest
    positions of all sequences (order s, then b), not the first sequences of the batch."""
    cfg = MoEConfig(hidden_size=8, intermediate_size=4, num_experts=2, top_k=1, capacity_factor=0.5,
                    drop_policy="position", backend="torch")
    torch.manual_seed(1)
    layer = MoELayer(cfg)
    with torch.no_grad():  # every token prefers expert 0
        layer.gate.weight.zero_()
        layer.gate.weight[0, 0] = 1.0
    x = torch.randn(2, 4, 8).abs()  # x[..., 0] > 0: expert 0 wins for all 8 tokens
    out = layer(x)
    # capacity ceil(0.5 * 8 / 2) = 2 on expert 0: positions s=0 of both sequences stay
    kept = out.abs().sum(-1) > 0
    assert torch.equal(kept, torch.tensor([[True, False, False, False], [True, False, False, False]]))


@pytest.mark.parametrize("masked", [False, True], ids=["all-real", "token-mask"])
def test_pad_to_capacity_runs_static_expert_batches_with_the_same_result(masked):
    """pad_to_capacity (Megatron's moe_pad_expert_input_to_capacity): every expert GEMM, forward and
    backward, runs on exactly C rows per expert; outputs and every gradient equal the unpadded layer."""
    base = dict(hidden_size=8, intermediate_size=4, num_experts=4, top_k=2, capacity_factor=1.5, backend="torch")
    torch.manual_seed(2)
    plain = MoELayer(MoEConfig(**base))
    padded = MoELayer(MoEConfig(**base, pad_to_capacity=True))
    padded.load_state_dict(plain.state_dict())
    x = torch.randn(2, 9, 8)
    mask = (torch.arange(18).view(2, 9) % 4 != 3) if masked else None
    num_real = 18 if mask is None else int(mask.sum())
    capacity = expert_capacity(num_real, 2, 4, 1.5)
    results = []
    for layer in (plain, padded):
        xx = x.clone().requires_grad_(True)
        with BmmShapes() as seen:
            out = layer(xx, token_mask=mask)
            out.square().sum().backward()
        results.append((out, [xx.grad] + [p.grad for p in layer.parameters()], seen.shapes))
    (out0, grads0, _), (out1, grads1, shapes) = results
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-6)
    for g0, g1 in zip(grads0, grads1, strict=True):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)
    assert shapes, "the padded layer ran no batched GEMM"
    assert all(s[0] == 4 and capacity in s[1:] for s in shapes), (capacity, shapes)
