"""MoEConfig validation, defaults and presets (cross-checked against transformers' config classes)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moe_kit import MoEConfig

BASE = dict(hidden_size=16, intermediate_size=8, num_experts=8, top_k=2)
PRESET_NAMES = ["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3", "deepseek-v4"]


def make(**overrides):
    return MoEConfig(**{**BASE, **overrides})


# ----------------------------------------------------------------------------- defaults


def test_defaults():
    cfg = make()
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.top_k) == (16, 8, 8, 2)
    assert cfg.num_shared_experts == 0 and cfg.shared_intermediate_size == 0 and cfg.shared_expert_gate is False
    assert cfg.score_func == "softmax" and cfg.norm_topk_prob is False and cfg.route_scale == 1.0
    assert cfg.n_groups == 1 and cfg.topk_groups == 1
    assert cfg.expert_bias is False and cfg.bias_update_rate == 1e-3 and cfg.bias_max == 1.0
    assert cfg.aux_loss_coef == 0.0 and cfg.aux_loss_type == "global" and cfg.z_loss_coef == 0.0
    assert cfg.hash_routing is False and cfg.n_hash_layers == 0 and cfg.vocab_size is None
    assert cfg.capacity_factor is None
    assert cfg.router_dtype == torch.float32 and cfg.swiglu_limit is None and cfg.backend == "auto"


@pytest.mark.parametrize(
    "score_func, expected", [("softmax", False), ("sigmoid", True), ("sqrtsoftplus", True)]
)
def test_norm_topk_prob_default_follows_score_func(score_func, expected):
    assert make(score_func=score_func).norm_topk_prob is expected
    assert make(score_func=score_func, norm_topk_prob=not expected).norm_topk_prob is (not expected)


def test_shared_intermediate_size_default():
    assert make(num_shared_experts=2).shared_intermediate_size == 16
    assert make(num_shared_experts=2, shared_intermediate_size=5).shared_intermediate_size == 5


def test_replace_revalidates():
    cfg = make()
    assert cfg.replace(top_k=3).top_k == 3 and cfg.top_k == 2
    with pytest.raises(ValueError, match="top_k"):
        cfg.replace(top_k=9)


def test_uses_hash_gate():
    cfg = make(n_hash_layers=3, vocab_size=100)
    assert [cfg.uses_hash_gate(i) for i in range(5)] == [True, True, True, False, False]
    cfg = make(hash_routing=True, vocab_size=100)
    assert all(cfg.uses_hash_gate(i) for i in range(5))
    assert not any(make().uses_hash_gate(i) for i in range(3))


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "overrides, field",
    [
        pytest.param(dict(top_k=0), "top_k", id="top_k=0"),
        pytest.param(dict(top_k=-1), "top_k", id="top_k<0"),
        pytest.param(dict(top_k=9), "top_k", id="top_k>E"),
        pytest.param(dict(num_experts=0, top_k=1), "num_experts", id="num_experts=0"),
        pytest.param(dict(hidden_size=0), "hidden_size", id="hidden_size=0"),
        pytest.param(dict(intermediate_size=-4), "intermediate_size", id="intermediate_size<0"),
        pytest.param(dict(hidden_size=16.0), "hidden_size", id="hidden_size-float"),
        pytest.param(dict(top_k=True), "top_k", id="top_k-bool"),
        pytest.param(dict(num_shared_experts=-1), "num_shared_experts", id="num_shared_experts<0"),
        pytest.param(dict(score_func="relu"), "score_func", id="unknown-score_func"),
        pytest.param(dict(backend="cuda"), "backend", id="unknown-backend"),
        pytest.param(dict(aux_loss_type="batch"), "aux_loss_type", id="unknown-aux_loss_type"),
        pytest.param(dict(n_groups=3), "n_groups", id="E-not-divisible-by-n_groups"),
        pytest.param(dict(n_groups=0), "n_groups", id="n_groups=0"),
        pytest.param(dict(n_groups=4, topk_groups=5), "topk_groups", id="topk_groups>n_groups"),
        pytest.param(dict(n_groups=4, topk_groups=0), "topk_groups", id="topk_groups=0"),
        pytest.param(dict(n_groups=4, topk_groups=1, top_k=3), "top_k", id="top_k-unreachable-in-groups"),
        pytest.param(dict(hash_routing=True), "vocab_size", id="hash_routing-without-vocab"),
        pytest.param(dict(n_hash_layers=2), "vocab_size", id="n_hash_layers-without-vocab"),
        pytest.param(dict(n_hash_layers=-1), "n_hash_layers", id="n_hash_layers<0"),
        pytest.param(dict(vocab_size=0), "vocab_size", id="vocab_size=0"),
        pytest.param(dict(capacity_factor=0.0), "capacity_factor", id="capacity_factor=0"),
        pytest.param(dict(capacity_factor=-1.0), "capacity_factor", id="capacity_factor<0"),
        pytest.param(dict(capacity_factor=float("nan")), "capacity_factor", id="capacity_factor-nan"),
        pytest.param(dict(aux_loss_coef=-0.1), "aux_loss_coef", id="aux_loss_coef<0"),
        pytest.param(dict(z_loss_coef=-1e-3), "z_loss_coef", id="z_loss_coef<0"),
        pytest.param(dict(bias_update_rate=-1e-3), "bias_update_rate", id="bias_update_rate<0"),
        pytest.param(dict(bias_max=-1.0), "bias_max", id="bias_max<0"),
        pytest.param(dict(aux_loss_coef=float("nan")), "aux_loss_coef", id="aux_loss_coef-nan"),
        pytest.param(dict(route_scale=0.0), "route_scale", id="route_scale=0"),
        pytest.param(dict(route_scale=-2.5), "route_scale", id="route_scale<0"),
        pytest.param(dict(swiglu_limit=0.0), "swiglu_limit", id="swiglu_limit=0"),
        pytest.param(dict(swiglu_limit=-10.0), "swiglu_limit", id="swiglu_limit<0"),
        pytest.param(dict(router_dtype=torch.bfloat16), "router_dtype", id="router_dtype-bf16"),
        pytest.param(dict(shared_expert_gate=True), "shared_expert_gate", id="shared_gate-without-shared"),
        pytest.param(dict(num_shared_experts=1, shared_intermediate_size=0), "shared_intermediate_size",
                     id="shared_intermediate_size=0"),
    ],
)
def test_invalid_config_raises_naming_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        make(**overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(top_k=1), id="k=1"),
        pytest.param(dict(top_k=8), id="k=E"),
        pytest.param(dict(n_groups=4, topk_groups=4, top_k=8), id="all-groups-k=E"),
        pytest.param(dict(n_groups=4, topk_groups=2, top_k=4), id="k-exactly-reachable"),
        pytest.param(dict(n_groups=8, topk_groups=8), id="groups=E"),
        pytest.param(dict(capacity_factor=0.01), id="tiny-capacity"),
        pytest.param(dict(aux_loss_coef=0.0, z_loss_coef=0.0, bias_update_rate=0.0, bias_max=0.0), id="zero-coefs"),
        pytest.param(dict(hash_routing=True, vocab_size=1), id="hash-vocab-1"),
        pytest.param(dict(router_dtype=torch.float64), id="router-fp64"),
        pytest.param(dict(backend="loop"), id="backend-loop"),
        pytest.param(dict(backend="triton"), id="backend-triton-config-ok"),
    ],
)
def test_valid_configs(overrides):
    cfg = make(**overrides)
    for key, value in overrides.items():
        assert getattr(cfg, key) == value


def test_unknown_preset():
    with pytest.raises(ValueError, match="no-such-model"):
        MoEConfig.preset("no-such-model")


def test_preset_unknown_override_field():
    with pytest.raises(ValueError, match="hidden_dim"):
        MoEConfig.preset("mixtral-8x7b", hidden_dim=64)


def test_preset_invalid_override_is_validated():
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig.preset("mixtral-8x7b", top_k=9)
    with pytest.raises(ValueError, match="n_groups"):
        MoEConfig.preset("deepseek-v3", num_experts=12)


# ----------------------------------------------------------------------------- presets


def test_preset_mixtral():
    c = MoEConfig.preset("mixtral-8x7b")
    assert (c.hidden_size, c.intermediate_size, c.num_experts, c.top_k) == (4096, 14336, 8, 2)
    assert c.score_func == "softmax" and c.norm_topk_prob is True
    assert c.num_shared_experts == 0 and c.route_scale == 1.0 and c.n_groups == 1
    assert c.expert_bias is False and c.n_hash_layers == 0 and c.swiglu_limit is None


def test_preset_qwen3():
    c = MoEConfig.preset("qwen3-30b-a3b")
    assert (c.hidden_size, c.intermediate_size, c.num_experts, c.top_k) == (2048, 768, 128, 8)
    assert c.score_func == "softmax" and c.norm_topk_prob is True
    assert c.num_shared_experts == 0 and c.route_scale == 1.0 and c.n_groups == 1
    assert c.expert_bias is False and c.n_hash_layers == 0


def test_preset_deepseek_v3():
    c = MoEConfig.preset("deepseek-v3")
    assert (c.hidden_size, c.intermediate_size, c.num_experts, c.top_k) == (7168, 2048, 256, 8)
    assert c.num_shared_experts == 1 and c.shared_intermediate_size == 2048
    assert c.score_func == "sigmoid" and c.norm_topk_prob is True
    assert (c.n_groups, c.topk_groups) == (8, 4)
    assert c.route_scale == 2.5 and c.expert_bias is True
    assert c.n_hash_layers == 0 and c.hash_routing is False and c.swiglu_limit is None


def test_preset_deepseek_v4():
    c = MoEConfig.preset("deepseek-v4")
    assert (c.hidden_size, c.intermediate_size, c.num_experts, c.top_k) == (4096, 2048, 256, 6)
    assert c.num_shared_experts == 1 and c.shared_intermediate_size == 2048
    assert c.score_func == "sqrtsoftplus" and c.norm_topk_prob is True
    assert c.route_scale == 1.5 and c.expert_bias is True
    assert c.n_hash_layers == 3 and c.hash_routing is False
    assert c.swiglu_limit == 10.0 and c.vocab_size == 129280
    assert (c.n_groups, c.topk_groups) == (1, 1)
    assert [c.uses_hash_gate(i) for i in range(5)] == [True, True, True, False, False]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_overrides(name):
    base = MoEConfig.preset(name)
    small = MoEConfig.preset(name, hidden_size=64, intermediate_size=32)
    assert small.hidden_size == 64 and small.intermediate_size == 32
    # the shared expert follows the new expert width unless given
    assert small.shared_intermediate_size == 32 * small.num_shared_experts
    for f in dataclasses.fields(MoEConfig):
        if f.name not in ("hidden_size", "intermediate_size", "shared_intermediate_size"):
            assert getattr(small, f.name) == getattr(base, f.name), f.name
    explicit = MoEConfig.preset(name, intermediate_size=32, shared_intermediate_size=48, num_shared_experts=1)
    assert explicit.shared_intermediate_size == 48
    # presets are not shared mutable state
    assert MoEConfig.preset(name).hidden_size == base.hidden_size


# ----------------------------------------------------------------------------- transformers cross-check


def test_presets_match_transformers_configs():
    transformers = pytest.importorskip("transformers")

    mixtral = transformers.MixtralConfig()
    c = MoEConfig.preset("mixtral-8x7b")
    assert c.hidden_size == mixtral.hidden_size
    assert c.intermediate_size == mixtral.intermediate_size
    assert c.num_experts == mixtral.num_local_experts
    assert c.top_k == mixtral.num_experts_per_tok
    assert c.vocab_size == mixtral.vocab_size

    qwen = transformers.Qwen3MoeConfig()
    c = MoEConfig.preset("qwen3-30b-a3b")
    assert c.hidden_size == qwen.hidden_size
    assert c.intermediate_size == qwen.moe_intermediate_size
    experts = getattr(qwen, "num_experts", None) or qwen.num_local_experts
    assert c.num_experts == experts
    assert c.top_k == qwen.num_experts_per_tok
    assert c.vocab_size == qwen.vocab_size
    # (norm_topk_prob: the class default is False; the released Qwen3-30B-A3B config sets true.)

    v3 = transformers.DeepseekV3Config()
    c = MoEConfig.preset("deepseek-v3")
    assert c.hidden_size == v3.hidden_size
    assert c.intermediate_size == v3.moe_intermediate_size
    assert c.num_experts == v3.n_routed_experts
    assert c.top_k == v3.num_experts_per_tok
    assert c.num_shared_experts == v3.n_shared_experts
    assert c.shared_intermediate_size == v3.moe_intermediate_size * v3.n_shared_experts
    assert (c.n_groups, c.topk_groups) == (v3.n_group, v3.topk_group)
    assert c.route_scale == v3.routed_scaling_factor
    assert c.norm_topk_prob == v3.norm_topk_prob
    assert c.vocab_size == v3.vocab_size
    if hasattr(v3, "scoring_func"):
        assert c.score_func == v3.scoring_func

    if not hasattr(transformers, "DeepseekV4Config"):
        return
    v4 = transformers.DeepseekV4Config()
    c = MoEConfig.preset("deepseek-v4")
    assert c.hidden_size == v4.hidden_size
    assert c.intermediate_size == v4.moe_intermediate_size
    assert c.num_experts == v4.n_routed_experts
    assert c.top_k == v4.num_experts_per_tok
    assert c.num_shared_experts == v4.n_shared_experts
    assert c.route_scale == v4.routed_scaling_factor
    assert c.norm_topk_prob == v4.norm_topk_prob
    assert c.swiglu_limit == v4.swiglu_limit
    assert c.vocab_size == v4.vocab_size
    if hasattr(v4, "scoring_func"):
        assert c.score_func == v4.scoring_func
    if hasattr(v4, "mlp_layer_types"):
        hash_layers = [i for i, t in enumerate(v4.mlp_layer_types) if t == "hash_moe"]
        assert hash_layers == list(range(c.n_hash_layers))
