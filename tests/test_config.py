"""MoEConfig validation, defaults and presets (cross-checked against transformers' config classes)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_kit import MoEConfig
from moe_kit.config import PRESETS

BASE = dict(hidden_size=16, intermediate_size=8, num_experts=8, top_k=2)
PRESET_NAMES = [
    "switch-base-128", "mixtral-8x7b", "mixtral-8x22b", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "qwen3-235b-a22b",
    "deepseek-v2", "deepseek-v3", "deepseek-v4", "deepseek-v4-flash", "deepseek-v4-pro", "olmoe-1b-7b",
    "llama4-scout", "gpt-oss-20b",
]
BOOL_FIELDS = ["shared_expert_gate", "norm_topk_prob", "router_bias", "expert_bias", "hash_routing", "pad_to_capacity",
               "expert_proj_bias", "deterministic"]
INT_FIELDS = ["hidden_size", "intermediate_size", "num_experts", "top_k", "num_shared_experts", "n_groups",
              "topk_groups", "n_hash_layers", "vocab_size", "shared_intermediate_size"]
FLOAT_FIELDS = ["route_scale", "jitter_eps", "bias_update_rate", "bias_max", "aux_loss_coef", "z_loss_coef",
                "capacity_factor", "swiglu_limit"]


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
    # the next wave's fields default to today's behaviour
    assert cfg.loss_mode == "attach" and cfg.routing == "token_choice" and cfg.activation == "silu"
    assert cfg.drop_policy == "probs" and cfg.pad_to_capacity is False
    assert cfg.jitter_eps == 0.0 and cfg.router_bias is False
    assert cfg.expert_proj_bias is False  # gpt-oss's expert biases: off unless asked
    assert cfg.aux_losses == () and cfg.is_frozen is False


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
        pytest.param(dict(sequence_aux_norm="mean"), "sequence_aux_norm", id="unknown-sequence_aux_norm"),
        pytest.param(dict(sequence_aux_norm=None), "sequence_aux_norm", id="sequence_aux_norm-None"),
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
        pytest.param(dict(loss_mode="return"), id="loss_mode-return"),
        pytest.param(dict(aux_loss_type="global_batch", aux_loss_coef=1e-2), id="global_batch"),
        pytest.param(dict(drop_policy="position", capacity_factor=1.0), id="drop-position"),
        pytest.param(dict(pad_to_capacity=True, capacity_factor=1.25), id="pad-to-capacity"),
        pytest.param(dict(jitter_eps=0.01), id="jitter"),
        pytest.param(dict(jitter_eps=0.999), id="jitter-near-1"),
        pytest.param(dict(router_bias=True), id="router_bias"),
        pytest.param(dict(routing="expert_choice", capacity_factor=2.0), id="expert_choice"),
        pytest.param(dict(routing="sinkhorn"), id="sinkhorn"),
        pytest.param(dict(routing="sinkhorn", top_k=1), id="sinkhorn-k=1"),
        pytest.param(dict(activation="gelu"), id="gelu"),
        pytest.param(dict(activation="gelu_tanh"), id="gelu_tanh"),
        pytest.param(dict(activation="relu"), id="relu"),
        pytest.param(dict(activation="swiglu_oai", swiglu_limit=7.0, expert_proj_bias=True), id="gpt-oss-experts"),
        pytest.param(dict(expert_proj_bias=True, expert_bias=True), id="expert-proj-bias-and-noaux-bias"),
        pytest.param(dict(deterministic=False), id="atomic-combine"),
        pytest.param(dict(deterministic=True), id="fixed-order-combine"),
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


# ----------------------------------------------------------------------------- replace() re-derives defaults


@pytest.mark.parametrize(
    "base, overrides, field, expected",
    [
        pytest.param(dict(), dict(score_func="sigmoid"), "norm_topk_prob", True, id="norm-derived-softmax->sigmoid"),
        pytest.param(dict(score_func="sigmoid"), dict(score_func="softmax"), "norm_topk_prob", False,
                     id="norm-derived-sigmoid->softmax"),
        pytest.param(dict(norm_topk_prob=False), dict(score_func="sigmoid"), "norm_topk_prob", False,
                     id="norm-explicit-kept"),
        pytest.param(dict(), dict(score_func="sigmoid", norm_topk_prob=False), "norm_topk_prob", False,
                     id="norm-overridden"),
        pytest.param(dict(), dict(num_shared_experts=1), "shared_intermediate_size", 8, id="shared-0->1"),
        pytest.param(dict(num_shared_experts=2), dict(intermediate_size=32), "shared_intermediate_size", 64,
                     id="shared-follows-width"),
        pytest.param(dict(num_shared_experts=2), dict(num_shared_experts=0), "shared_intermediate_size", 0,
                     id="shared-2->0"),
        pytest.param(dict(num_shared_experts=1, shared_intermediate_size=5), dict(intermediate_size=32),
                     "shared_intermediate_size", 5, id="shared-explicit-kept"),
        pytest.param(dict(num_shared_experts=1), dict(shared_intermediate_size=7), "shared_intermediate_size", 7,
                     id="shared-overridden"),
    ],
)
def test_replace_rederives_defaults(base, overrides, field, expected):
    cfg = make(**base)
    new = cfg.replace(**overrides)
    assert getattr(new, field) == expected
    assert new == make(**{**base, **overrides})  # same as building from scratch with the same arguments


def test_replace_keeps_a_derived_field_the_user_assigned():
    cfg = make()
    cfg.norm_topk_prob = True  # assigned after construction: no longer the derived value
    assert cfg.replace(score_func="sigmoid").norm_topk_prob is True
    assert cfg.replace().norm_topk_prob is True


def test_replace_without_changes_is_equal_and_independent():
    cfg = MoEConfig.preset("deepseek-v3")
    same = cfg.replace()
    assert same == cfg and same is not cfg


def test_replace_unknown_field_names_it():
    with pytest.raises(ValueError, match="hidden_dim"):
        make().replace(hidden_dim=3)


def test_preset_replace_follows_expert_width():
    small = MoEConfig.preset("deepseek-v3").replace(intermediate_size=32)
    assert small.shared_intermediate_size == 32


# ----------------------------------------------------------------------------- type and range validation


@pytest.mark.parametrize("field", ["route_scale", "capacity_factor", "aux_loss_coef", "z_loss_coef",
                                   "bias_update_rate", "bias_max", "jitter_eps", "swiglu_limit"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), np.float32("inf")],
                         ids=["nan", "inf", "-inf", "np-inf"])
def test_non_finite_floats_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        make(**{field: value})


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [None, "0.5", b"1", [0.5], torch.tensor(0.5), True],
                         ids=["None", "str", "bytes", "list", "tensor", "bool"])
def test_float_fields_reject_non_numbers_naming_field(field, value):
    if value is None and field in ("capacity_factor", "swiglu_limit"):
        pytest.skip("None is a valid value there")
    if isinstance(value, list) and field == "aux_loss_coef":
        pytest.skip("the list form, tested below")
    with pytest.raises(ValueError, match=field):
        make(**{field: value})


@pytest.mark.parametrize(
    "field, value",
    [
        pytest.param("route_scale", np.float32(2.5), id="route_scale-np.float32"),
        pytest.param("route_scale", 3, id="route_scale-int"),
        pytest.param("aux_loss_coef", np.float64(1e-3), id="aux_loss_coef-np.float64"),
        pytest.param("capacity_factor", np.int64(2), id="capacity_factor-np.int64"),
        pytest.param("jitter_eps", np.float16(0.25), id="jitter_eps-np.float16"),
        pytest.param("swiglu_limit", 7, id="swiglu_limit-int"),
    ],
)
def test_float_fields_accept_real_numbers_as_plain_float(field, value):
    stored = getattr(make(**{field: value}), field)
    assert type(stored) is float and stored == float(value)


@pytest.mark.parametrize("field", BOOL_FIELDS)
@pytest.mark.parametrize("value", ["yes", "False", "", 1, 0, None, 1.0, np.int64(1)],
                         ids=["yes", "False-str", "empty-str", "int-1", "int-0", "None", "float", "np.int64"])
def test_bool_fields_accept_only_bools(field, value):
    if value is None and field in ("norm_topk_prob", "deterministic"):
        pytest.skip("None means: derive from score_func / the device")
    with pytest.raises(ValueError, match=field):
        make(**{field: value})


@pytest.mark.parametrize("field", BOOL_FIELDS)
def test_bool_fields_accept_numpy_bool(field):
    extra = dict(num_shared_experts=1, vocab_size=10, capacity_factor=1.0)  # what each True needs
    cfg = make(**extra, **{field: np.bool_(True)})
    assert getattr(cfg, field) is True
    assert getattr(make(**{field: np.False_}), field) is False


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]),
    field=st.sampled_from(INT_FIELDS),
    value=st.integers(1, 100),
)
def test_int_fields_accept_numpy_integers_as_plain_int(dtype, field, value):
    overrides = {field: dtype(value)}
    if field in ("num_experts", "n_groups", "topk_groups"):  # keep the config valid: E = k = groups
        overrides = dict(num_experts=dtype(value), top_k=1, n_groups=dtype(value), topk_groups=dtype(value))
    if field == "top_k":
        overrides["num_experts"] = value
    if field == "n_hash_layers":
        overrides["vocab_size"] = 50
    if field == "shared_intermediate_size":
        overrides["num_shared_experts"] = 1
    cfg = make(**overrides)
    for name in overrides:
        assert type(getattr(cfg, name)) is int and getattr(cfg, name) == int(overrides[name])
    json.dumps(cfg.to_dict())  # numpy scalars would not serialize


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", [True, np.True_, 8.0, np.float64(8.0), "8", torch.tensor(8.0)],
                         ids=["bool", "np.bool", "float", "np.float64", "str", "float-tensor"])
def test_int_fields_reject_bools_floats_strings(field, value):
    with pytest.raises(ValueError, match=field):
        make(**{field: value})


@pytest.mark.parametrize("field", ["hidden_size", "intermediate_size", "num_experts", "top_k"])
def test_required_int_none_names_field(field):
    with pytest.raises(ValueError, match=field):
        make(**{field: None})


@pytest.mark.parametrize(
    "overrides, field",
    [
        pytest.param(dict(jitter_eps=-0.1), "jitter_eps", id="jitter<0"),
        pytest.param(dict(jitter_eps=1.0), "jitter_eps", id="jitter=1"),
        pytest.param(dict(loss_mode="sum"), "loss_mode", id="unknown-loss_mode"),
        pytest.param(dict(drop_policy="random"), "drop_policy", id="unknown-drop_policy"),
        pytest.param(dict(routing="hash"), "routing", id="unknown-routing"),
        pytest.param(dict(activation="swiglu"), "activation", id="unknown-activation"),
        pytest.param(dict(activation=None), "activation", id="activation-None"),
        pytest.param(dict(aux_loss_type="batch"), "aux_loss_type", id="unknown-aux_loss_type"),
        pytest.param(dict(sequence_aux_norm="mean"), "sequence_aux_norm", id="unknown-sequence_aux_norm"),
        pytest.param(dict(sequence_aux_norm=None), "sequence_aux_norm", id="sequence_aux_norm-None"),
        pytest.param(dict(pad_to_capacity=True), "pad_to_capacity", id="pad-without-capacity"),
        pytest.param(dict(routing="expert_choice"), "capacity_factor", id="expert_choice-without-capacity"),
        pytest.param(dict(routing="expert_choice", capacity_factor=1.0, hash_routing=True, vocab_size=10),
                     "hash_routing", id="expert_choice+hash_routing"),
        pytest.param(dict(routing="expert_choice", capacity_factor=1.0, n_hash_layers=2, vocab_size=10),
                     "n_hash_layers", id="expert_choice+n_hash_layers"),
        pytest.param(dict(routing="expert_choice", capacity_factor=1.0, expert_bias=True), "expert_bias",
                     id="expert_choice+expert_bias"),
        pytest.param(dict(router_dtype="bfloat16"), "router_dtype", id="router_dtype-bf16-str"),
        pytest.param(dict(router_dtype="Tensor"), "router_dtype", id="router_dtype-not-a-dtype"),
        pytest.param(dict(router_dtype=None), "router_dtype", id="router_dtype-None"),
    ],
)
def test_new_fields_invalid(overrides, field):
    with pytest.raises(ValueError, match=field):
        make(**overrides)


def test_router_dtype_name_accepted():
    assert make(router_dtype="float64").router_dtype is torch.float64
    assert make(router_dtype="torch.float32").router_dtype is torch.float32


# ----------------------------------------------------------------------------- aux loss list form


@pytest.mark.parametrize(
    "types, coefs, expected",
    [
        pytest.param(["global", "sequence"], [1e-2, 1e-4], (("global", 1e-2), ("sequence", 1e-4)), id="two"),
        pytest.param(("sequence", "global_batch"), (0.0, 1e-3), (("global_batch", 1e-3),), id="zero-coef-left-out"),
        pytest.param(["global_batch"], [1e-3], (("global_batch", 1e-3),), id="one-in-a-list"),
        pytest.param(["global", "sequence", "global_batch"], [0, 0, 0], (), id="all-zero"),
        pytest.param(["global", "sequence"], [np.float32(0.5), 1], (("global", 0.5), ("sequence", 1.0)),
                     id="numpy-and-int-coefs"),
    ],
)
def test_aux_loss_list_form(types, coefs, expected):
    cfg = make(aux_loss_type=types, aux_loss_coef=coefs)
    assert cfg.aux_loss_type == tuple(types) and isinstance(cfg.aux_loss_type, tuple)
    assert isinstance(cfg.aux_loss_coef, tuple) and all(type(c) is float for c in cfg.aux_loss_coef)
    assert cfg.aux_losses == expected


@pytest.mark.parametrize(
    "kind, coef, expected",
    [
        pytest.param("global", 0.0, (), id="off"),
        pytest.param("global", 1e-2, (("global", 1e-2),), id="global"),
        pytest.param("sequence", 1e-4, (("sequence", 1e-4),), id="sequence"),
        pytest.param("global_batch", 1e-3, (("global_batch", 1e-3),), id="global_batch"),
    ],
)
def test_aux_losses_single_form(kind, coef, expected):
    cfg = make(aux_loss_type=kind, aux_loss_coef=coef)
    assert type(cfg.aux_loss_coef) is float and cfg.aux_loss_type == kind
    assert cfg.aux_losses == expected


@pytest.mark.parametrize(
    "types, coefs, field",
    [
        pytest.param(["global", "sequence"], [1e-2], "aux_loss_coef", id="length-mismatch"),
        pytest.param(["global", "sequence"], 1e-2, "aux_loss_coef", id="scalar-coef-with-list"),
        pytest.param("global", [1e-2], "aux_loss_coef", id="list-coef-with-single-type"),
        pytest.param(["global", "global"], [1e-2, 1e-3], "aux_loss_type", id="repeated-type"),
        pytest.param([], [], "aux_loss_type", id="empty"),
        pytest.param(["global", "batch"], [1e-2, 1e-3], "aux_loss_type", id="unknown-type-in-list"),
        pytest.param(["global", "sequence"], [1e-2, -1e-3], "aux_loss_coef", id="negative-coef-in-list"),
        pytest.param(["global", "sequence"], [1e-2, float("inf")], "aux_loss_coef", id="inf-coef-in-list"),
        pytest.param(["global", "sequence"], [1e-2, None], "aux_loss_coef", id="None-coef-in-list"),
    ],
)
def test_aux_loss_list_form_invalid(types, coefs, field):
    with pytest.raises(ValueError, match=field):
        make(aux_loss_type=types, aux_loss_coef=coefs)


# ----------------------------------------------------------------------------- JSON round trip


@st.composite
def configs(draw):
    num_experts = draw(st.sampled_from([1, 2, 4, 6, 8, 12]))
    n_groups = draw(st.sampled_from([g for g in (1, 2, 3, 4) if num_experts % g == 0]))
    topk_groups = draw(st.integers(1, n_groups))
    reachable = num_experts if n_groups == 1 else topk_groups * (num_experts // n_groups)
    kw = dict(
        hidden_size=draw(st.integers(1, 64)), intermediate_size=draw(st.integers(1, 64)),
        num_experts=num_experts, top_k=draw(st.integers(1, reachable)), n_groups=n_groups, topk_groups=topk_groups,
        score_func=draw(st.sampled_from(["softmax", "sigmoid", "sqrtsoftplus"])),
        route_scale=draw(st.floats(1e-3, 100)), jitter_eps=draw(st.floats(0, 0.5)),
        router_bias=draw(st.booleans()), loss_mode=draw(st.sampled_from(["attach", "return"])),
        z_loss_coef=draw(st.floats(0, 1)),
        activation=draw(st.sampled_from(["silu", "gelu", "gelu_tanh", "relu", "swiglu_oai"])),
        expert_proj_bias=draw(st.booleans()),
        router_dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        backend=draw(st.sampled_from(["auto", "torch", "loop", "triton"])),
        swiglu_limit=draw(st.none() | st.floats(0.5, 20)),
        drop_policy=draw(st.sampled_from(["probs", "position"])),
        sequence_aux_norm=draw(st.sampled_from(["per_sequence", "megatron"])),
    )
    if draw(st.booleans()):
        kw["norm_topk_prob"] = draw(st.booleans())
    shared = draw(st.integers(0, 2))
    kw["num_shared_experts"] = shared
    if shared and draw(st.booleans()):
        kw["shared_intermediate_size"] = draw(st.integers(1, 64))
    if shared:
        kw["shared_expert_gate"] = draw(st.booleans())
    types = draw(st.lists(st.sampled_from(["global", "sequence", "global_batch"]), min_size=1, max_size=3,
                          unique=True))
    coefs = draw(st.lists(st.floats(0, 1), min_size=len(types), max_size=len(types)))
    if draw(st.booleans()):
        kw["aux_loss_type"], kw["aux_loss_coef"] = types, coefs
    else:
        kw["aux_loss_type"], kw["aux_loss_coef"] = types[0], coefs[0]
    routing = draw(st.sampled_from(["token_choice", "expert_choice", "sinkhorn"]))
    kw["routing"] = routing
    if routing == "expert_choice" or draw(st.booleans()):
        kw["capacity_factor"] = draw(st.floats(0.01, 8))
        kw["pad_to_capacity"] = routing != "expert_choice" and draw(st.booleans())
    if routing != "token_choice":  # expert choice and Sinkhorn pick experts their own way
        kw["n_groups"] = kw["topk_groups"] = 1
    if routing == "token_choice":
        kw["expert_bias"] = draw(st.booleans())
        kw["bias_update_rate"] = draw(st.floats(0, 1))
        kw["bias_max"] = draw(st.floats(0, 10))
        hashing = draw(st.sampled_from(["none", "all", "first"]))
        if hashing != "none":
            kw["vocab_size"] = draw(st.integers(1, 1000))
            kw["hash_routing"] = hashing == "all"
            kw["n_hash_layers"] = draw(st.integers(1, 4)) if hashing == "first" else 0
    return MoEConfig(**kw)


@settings(max_examples=60, deadline=None)
@given(cfg=configs())
def test_json_round_trip(cfg):
    d = cfg.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(MoEConfig)}
    text = json.dumps(d, allow_nan=False)  # JSON-safe as is: no default=, no nan/inf
    back = MoEConfig.from_dict(json.loads(text))
    assert back == cfg
    assert back.to_dict() == d
    assert d["router_dtype"] in ("float32", "float64")
    # the rebuilt config derives its defaults the way the original does
    for overrides in (dict(score_func="sigmoid"), dict(num_shared_experts=1), dict(intermediate_size=3)):
        try:
            expected = cfg.replace(**overrides)
        except ValueError:
            continue
        assert back.replace(**overrides) == expected


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_json_round_trip(name):
    cfg = MoEConfig.preset(name)
    assert MoEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_sequence_aux_norm_round_trips():
    cfg = make(aux_loss_type="sequence", aux_loss_coef=0.1, sequence_aux_norm="megatron")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["sequence_aux_norm"] == "megatron" and MoEConfig.from_dict(d) == cfg
    assert make().sequence_aux_norm == "per_sequence"


def test_to_dict_values():
    d = make(aux_loss_type=["global", "sequence"], aux_loss_coef=[0.1, 0.2], router_dtype=torch.float64).to_dict()
    assert d["router_dtype"] == "float64"
    assert d["aux_loss_type"] == ["global", "sequence"] and d["aux_loss_coef"] == [0.1, 0.2]
    assert d["norm_topk_prob"] is None and d["shared_intermediate_size"] is None  # left to derivation
    d = make(norm_topk_prob=False, num_shared_experts=1, shared_intermediate_size=8).to_dict()
    assert d["norm_topk_prob"] is False and d["shared_intermediate_size"] == 8  # given: written as given


def test_from_dict_unknown_keys_named():
    d = make().to_dict()
    d.update(hidden_dim=4, moe_topk=2)
    with pytest.raises(ValueError, match="hidden_dim.*moe_topk"):
        MoEConfig.from_dict(d)


def test_from_dict_missing_and_bad_input():
    d = make().to_dict()
    del d["top_k"]
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig.from_dict(d)
    with pytest.raises(ValueError, match="mapping"):
        MoEConfig.from_dict([("hidden_size", 16)])
    with pytest.raises(ValueError, match="route_scale"):
        MoEConfig.from_dict({**make().to_dict(), "route_scale": None})


def test_from_dict_accepts_a_minimal_dict():
    assert MoEConfig.from_dict(BASE) == make()


# ----------------------------------------------------------------------------- frozen copies


def test_frozen_copy_rejects_assignment():
    cfg = make(num_shared_experts=1)
    frozen = cfg.frozen_copy()
    assert frozen.is_frozen and not cfg.is_frozen
    for field, value in (("top_k", 3), ("score_func", "sigmoid"), ("new_attribute", 1)):
        with pytest.raises(dataclasses.FrozenInstanceError, match="replace"):
            setattr(frozen, field, value)
    with pytest.raises(AttributeError):  # FrozenInstanceError is an AttributeError
        frozen.top_k = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        del frozen.top_k
    assert frozen.top_k == 2
    cfg.top_k = 3  # the original stays an ordinary, mutable config ...
    assert frozen.top_k == 2  # ... and the copy does not follow it


def test_frozen_copy_equality_and_dict_ignore_the_flag():
    cfg = MoEConfig.preset("deepseek-v3")
    frozen = cfg.frozen_copy()
    assert frozen == cfg and frozen.to_dict() == cfg.to_dict()
    assert MoEConfig.from_dict(frozen.to_dict()) == cfg and not MoEConfig.from_dict(frozen.to_dict()).is_frozen
    assert frozen.frozen_copy() == frozen


def test_replace_on_frozen_copy_is_ordinary():
    frozen = make().frozen_copy()
    new = frozen.replace(top_k=3, num_shared_experts=1)
    assert not new.is_frozen and new.top_k == 3 and new.shared_intermediate_size == 8
    new.top_k = 4
    assert new.top_k == 4
    assert dataclasses.replace(frozen, top_k=3).is_frozen is False


def test_frozen_copy_revalidates():
    cfg = make()
    cfg.top_k = 99  # mutating a plain config is allowed; building a layer from it is not
    with pytest.raises(ValueError, match="top_k"):
        cfg.frozen_copy()


@pytest.mark.parametrize("clone", [copy.copy, copy.deepcopy, lambda c: pickle.loads(pickle.dumps(c))],
                         ids=["copy", "deepcopy", "pickle"])
def test_frozen_copy_survives_copy_and_pickle(clone):
    frozen = make(num_shared_experts=2).frozen_copy()
    other = clone(frozen)
    assert other == frozen and other.is_frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        other.top_k = 1
    assert other.replace(intermediate_size=4).shared_intermediate_size == 8  # derivation survives too


# ----------------------------------------------------------------------------- new presets


def test_all_presets_build():
    assert sorted(PRESETS) == sorted(PRESET_NAMES)
    for name in PRESET_NAMES:
        cfg = MoEConfig.preset(name)
        assert cfg.vocab_size is not None and cfg.num_experts >= cfg.top_k


def test_deepseek_v4_alias():
    assert MoEConfig.preset("deepseek-v4") == MoEConfig.preset("deepseek-v4-flash")
    assert MoEConfig.preset("deepseek-v4", hidden_size=64) == MoEConfig.preset("deepseek-v4-flash", hidden_size=64)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_unknown_override_still_raises(name):
    with pytest.raises(ValueError, match="n_experts"):
        MoEConfig.preset(name, n_experts=4)


@pytest.mark.parametrize(
    "name, expected",
    [
        pytest.param("switch-base-128", dict(
            hidden_size=768, intermediate_size=3072, num_experts=128, top_k=1, score_func="softmax",
            norm_topk_prob=False, jitter_eps=0.01, capacity_factor=1.25, drop_policy="position",
            aux_loss_coef=1e-3, z_loss_coef=1e-3, activation="relu", vocab_size=32128, num_shared_experts=0,
        ), id="switch-base-128"),
        pytest.param("mixtral-8x22b", dict(
            hidden_size=6144, intermediate_size=16384, num_experts=8, top_k=2, score_func="softmax",
            norm_topk_prob=True, num_shared_experts=0,
        ), id="mixtral-8x22b"),
        pytest.param("qwen1.5-moe-a2.7b", dict(
            hidden_size=2048, intermediate_size=1408, num_experts=60, top_k=4, shared_intermediate_size=5632,
            shared_expert_gate=True, score_func="softmax", norm_topk_prob=False, vocab_size=151936,
        ), id="qwen1.5-moe-a2.7b"),
        pytest.param("qwen3-235b-a22b", dict(
            hidden_size=4096, intermediate_size=1536, num_experts=128, top_k=8, score_func="softmax",
            norm_topk_prob=True, num_shared_experts=0, vocab_size=151936,
        ), id="qwen3-235b-a22b"),
        pytest.param("deepseek-v2", dict(
            hidden_size=5120, intermediate_size=1536, num_experts=160, top_k=6, num_shared_experts=2,
            shared_intermediate_size=3072, score_func="softmax", norm_topk_prob=False, route_scale=16.0,
            n_groups=8, topk_groups=3, expert_bias=False, aux_loss_type="sequence", aux_loss_coef=3e-3,
            vocab_size=102400,
        ), id="deepseek-v2"),
        pytest.param("deepseek-v4-pro", dict(
            hidden_size=7168, num_experts=384, top_k=6, score_func="sqrtsoftplus", norm_topk_prob=True,
            route_scale=2.5, num_shared_experts=1, n_hash_layers=3, hash_routing=False, expert_bias=True,
            swiglu_limit=10.0, vocab_size=129280, n_groups=1,
        ), id="deepseek-v4-pro"),
        pytest.param("olmoe-1b-7b", dict(
            hidden_size=2048, intermediate_size=1024, num_experts=64, top_k=8, score_func="softmax",
            norm_topk_prob=False, aux_loss_coef=0.01, num_shared_experts=0, vocab_size=50304,
        ), id="olmoe-1b-7b"),
        pytest.param("llama4-scout", dict(
            hidden_size=5120, intermediate_size=8192, num_experts=16, top_k=1, score_func="sigmoid",
            norm_topk_prob=False, num_shared_experts=1, shared_intermediate_size=8192, vocab_size=202048,
        ), id="llama4-scout"),
        pytest.param("gpt-oss-20b", dict(
            hidden_size=2880, intermediate_size=2880, num_experts=32, top_k=4, score_func="softmax",
            norm_topk_prob=True, router_bias=True, swiglu_limit=7.0, num_shared_experts=0, vocab_size=201088,
            activation="swiglu_oai", expert_proj_bias=True, expert_bias=False,
        ), id="gpt-oss-20b"),
    ],
)
def test_new_presets(name, expected):
    cfg = MoEConfig.preset(name)
    assert {key: getattr(cfg, key) for key in expected} == expected


def test_deepseek_v4_pro_shares_the_flash_block():
    pro, flash = MoEConfig.preset("deepseek-v4-pro"), MoEConfig.preset("deepseek-v4-flash")
    different = {f.name for f in dataclasses.fields(MoEConfig) if getattr(pro, f.name) != getattr(flash, f.name)}
    assert different == {"hidden_size", "intermediate_size", "shared_intermediate_size", "num_experts",
                         "route_scale"}
    assert [pro.uses_hash_gate(i) for i in range(5)] == [True, True, True, False, False]


@pytest.mark.parametrize(
    "name, experts_billions",
    [
        pytest.param("mixtral-8x22b", (56, 135), id="mixtral-8x22b"),  # (layers, routed-expert params, 1e9)
        pytest.param("qwen3-235b-a22b", (94, 227), id="qwen3-235b"),
        pytest.param("deepseek-v2", (59, 223), id="deepseek-v2"),
        pytest.param("olmoe-1b-7b", (16, 6.4), id="olmoe"),
        pytest.param("gpt-oss-20b", (24, 19.1), id="gpt-oss-20b"),
    ],
)
def test_preset_sizes_add_up_to_the_released_totals(name, experts_billions):
    """Routed-expert parameters (3 matrices of D x I per expert per MoE layer) against the model card's total."""
    layers, billions = experts_billions
    c = MoEConfig.preset(name)
    total = layers * c.num_experts * 3 * c.hidden_size * c.intermediate_size / 1e9
    assert math.isclose(total, billions, rel_tol=0.03), total


def test_new_presets_match_transformers_configs():
    transformers = pytest.importorskip("transformers")

    qwen2 = transformers.Qwen2MoeConfig()  # the class defaults are Qwen1.5-MoE-A2.7B
    c = MoEConfig.preset("qwen1.5-moe-a2.7b")
    assert c.hidden_size == qwen2.hidden_size
    assert c.intermediate_size == qwen2.moe_intermediate_size
    assert c.shared_intermediate_size == qwen2.shared_expert_intermediate_size
    assert c.num_experts == qwen2.num_experts and c.top_k == qwen2.num_experts_per_tok
    assert c.norm_topk_prob == qwen2.norm_topk_prob and c.vocab_size == qwen2.vocab_size
    assert c.aux_loss_coef == qwen2.router_aux_loss_coef

    switch = transformers.SwitchTransformersConfig()
    c = MoEConfig.preset("switch-base-128")
    assert c.hidden_size == switch.d_model and c.vocab_size == switch.vocab_size
    assert c.jitter_eps == switch.router_jitter_noise and c.router_bias == switch.router_bias
    assert (c.aux_loss_coef, c.z_loss_coef) == (switch.router_aux_loss_coef, switch.router_z_loss_coef)
    assert c.activation == switch.dense_act_fn

    llama4 = transformers.Llama4TextConfig()  # the class defaults are Llama-4-Scout
    c = MoEConfig.preset("llama4-scout")
    assert c.hidden_size == llama4.hidden_size and c.intermediate_size == llama4.intermediate_size
    assert c.num_experts == llama4.num_local_experts and c.top_k == llama4.num_experts_per_tok
    assert c.vocab_size == llama4.vocab_size and c.aux_loss_coef == llama4.router_aux_loss_coef

    olmoe = transformers.OlmoeConfig()  # (its intermediate_size default is not the released 1024)
    c = MoEConfig.preset("olmoe-1b-7b")
    assert c.hidden_size == olmoe.hidden_size and c.num_experts == olmoe.num_experts
    assert c.top_k == olmoe.num_experts_per_tok and c.norm_topk_prob == olmoe.norm_topk_prob
    assert c.vocab_size == olmoe.vocab_size and c.aux_loss_coef == olmoe.router_aux_loss_coef

    oss = transformers.GptOssConfig()  # the class defaults are gpt-oss-120b: 128 experts, otherwise the 20b block
    c = MoEConfig.preset("gpt-oss-20b")
    assert c.hidden_size == oss.hidden_size and c.intermediate_size == oss.intermediate_size
    assert c.top_k == oss.num_experts_per_tok and c.swiglu_limit == oss.swiglu_limit
    assert c.vocab_size == oss.vocab_size
    from moe_kit.activations import OAI_ALPHA

    assert c.activation == "swiglu_oai" and oss.swiglu_alpha == OAI_ALPHA and c.expert_proj_bias

    qwen3 = transformers.Qwen3MoeConfig()
    c = MoEConfig.preset("qwen3-235b-a22b")
    experts = getattr(qwen3, "num_experts", None) or qwen3.num_local_experts
    assert (c.num_experts, c.top_k, c.vocab_size) == (experts, qwen3.num_experts_per_tok, qwen3.vocab_size)


@pytest.mark.parametrize(
    "fields,match",
    [
        pytest.param(dict(routing="sinkhorn", expert_bias=True), "sinkhorn", id="sinkhorn-bias"),
        pytest.param(dict(routing="sinkhorn", n_groups=2, topk_groups=1), "sinkhorn", id="sinkhorn-groups"),
        pytest.param(dict(routing="sinkhorn", hash_routing=True, vocab_size=10), "sinkhorn", id="sinkhorn-hash"),
        pytest.param(dict(routing="expert_choice", capacity_factor=1.0, n_groups=2, topk_groups=1), "expert_choice",
                     id="expert-choice-groups"),
        pytest.param(dict(routing="expert_choice", capacity_factor=1.0, pad_to_capacity=True), "pad_to_capacity",
                     id="expert-choice-pad-to-capacity"),
    ],
)
def test_routing_scheme_conflicts_name_the_scheme(fields, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(hidden_size=8, intermediate_size=4, num_experts=4, top_k=2, **fields)
