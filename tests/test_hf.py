"""moe_kit.integrations.hf against transformers' own eager implementation.

Tiny models of each family are built from their config classes (no downloads), in train mode,
fp32. The routers and experts are re-initialized larger than transformers' std=0.02 so routing is
decisive and the experts dominate the residual stream (checked by test_moe_path_matters): an
error in routing or experts cannot hide in the logits.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import moe_kit  # noqa: E402
from moe_kit import HashGate, MoELayer, TopKGate  # noqa: E402
from moe_kit.integrations import hf  # noqa: E402

TOL = 1e-3  # normwise relative error, fp32
VOCAB, SEQ = 96, 10
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-6) -> float:
    """Normwise relative error ||a - b|| / max(||b||, floor)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    a, b = a.detach().double(), b.detach().double()
    return (a - b).norm().item() / max(b.norm().item(), floor)


# ----------------------------------------------------------------------------- tiny models


def _qwen3(**kw):
    cfg = transformers.Qwen3MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=16, num_experts=8,
                                      num_experts_per_tok=2, norm_topk_prob=True, head_dim=8, **kw)
    return transformers.Qwen3MoeForCausalLM(cfg)


def _qwen2(**kw):
    cfg = transformers.Qwen2MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=3, **kw)
    return transformers.Qwen2MoeForCausalLM(cfg)


def _mixtral(**kw):
    cfg = transformers.MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, **kw)
    return transformers.MixtralForCausalLM(cfg)


def _olmoe(**kw):
    cfg = transformers.OlmoeConfig(**COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2, **kw)
    return transformers.OlmoeForCausalLM(cfg)


def _deepseek_v3(**kw):
    cfg = transformers.DeepseekV3Config(
        **{**COMMON, "num_key_value_heads": 4, "num_hidden_layers": 3}, intermediate_size=64, moe_intermediate_size=16,
        n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1,
        n_shared_experts=1, routed_scaling_factor=2.5, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=8, **kw,
    )
    return transformers.DeepseekV3ForCausalLM(cfg)


def _deepseek_v4(**kw):
    cfg = transformers.DeepseekV4Config(
        **{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 1}, head_dim=16, q_lora_rank=16,
        moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        mlp_layer_types=["hash_moe", "moe", "moe"],
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
        sliding_window=8, o_groups=2, o_lora_rank=8, index_n_heads=2, index_head_dim=8, index_topk=4, hc_mult=2,
        swiglu_limit=0.8, **kw,
    )
    return transformers.DeepseekV4ForCausalLM(cfg)


FAMILIES = {
    "qwen3_moe": (_qwen3, ["model.layers.0.mlp", "model.layers.1.mlp"]),
    "qwen2_moe": (_qwen2, ["model.layers.0.mlp", "model.layers.1.mlp"]),
    "mixtral": (_mixtral, ["model.layers.0.mlp", "model.layers.1.mlp"]),
    "olmoe": (_olmoe, ["model.layers.0.mlp", "model.layers.1.mlp"]),
    "deepseek_v3": (_deepseek_v3, ["model.layers.1.mlp", "model.layers.2.mlp"]),  # layer 0 dense
    "deepseek_v4": (_deepseek_v4, ["model.layers.0.mlp", "model.layers.1.mlp", "model.layers.2.mlp"]),  # 0 hashed
}


@torch.no_grad()
def _strengthen(model: nn.Module) -> nn.Module:
    """Decisive routers, experts that dominate the residual, a non-zero DeepSeek bias and a
    balanced V4 hash table (transformers initializes tid2eid to zeros)."""
    for name, module in model.named_modules():
        if hasattr(module, "gate_up_proj"):
            module.gate_up_proj.normal_(0.0, 0.25)
            module.down_proj.normal_(0.0, 0.25)
        if name.endswith("mlp.gate"):
            module.weight.normal_(0.0, 0.4)
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.normal_(0.0, 0.05)
        if hasattr(module, "tid2eid"):
            vocab = module.tid2eid.shape[0]
            module.tid2eid.copy_(moe_kit.hash_table(vocab, module.num_experts, module.top_k, seed=1))
    return model


@functools.cache
def _state(family: str) -> dict:
    torch.manual_seed(0)
    return _strengthen(FAMILIES[family][0]()).state_dict()


def build(family: str, **kw) -> nn.Module:
    """A fresh tiny model of `family` in train mode, same weights every call."""
    model = FAMILIES[family][0](**kw)
    model.load_state_dict(_state(family))
    return model.train()


def ids_for(seed=1, batch=2):
    return torch.randint(3, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def logits_and_grads(model: nn.Module, ids: torch.Tensor, converted: bool = False):
    """Logits of `ids` and {name: grad} of every parameter after the LM loss' backward. With
    `converted`, the grads are read after convert_back (the parameters are the same objects), so
    they carry the transformers names."""
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    if converted:
        hf.convert_back(model)
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_function(got, ref, tol=TOL):
    (logits, grads), (ref_logits, ref_grads) = got, ref
    assert rel_err(logits, ref_logits) <= tol
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        if grad is None:  # a parameter the loss does not reach (e.g. V4's last-layer compressor bits)
            assert grads[name] is None or grads[name].abs().max() == 0, name
            continue
        assert grads[name] is not None, name
        assert rel_err(grads[name], grad, floor=1e-8) <= tol, (name, rel_err(grads[name], grad))


@pytest.fixture(scope="module", autouse=True)
def registered_one_thread():
    """Register the bridge. One intra-op thread: these models are tiny, and on a busy 2-core box
    OpenMP's barriers make every op of a 2-thread run wait for a descheduled thread (100x slower)."""
    hf.register()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def eager():
    """{family: (logits, grads)} of transformers' eager experts, computed once."""
    return {family: logits_and_grads(build(family), ids_for()) for family in FAMILIES}


# ----------------------------------------------------------------------------- the experts bridge


def test_moe_path_matters(eager):
    """The test models' logits depend strongly on the routed experts."""
    for family in FAMILIES:
        model = build(family)
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "gate_up_proj"):
                    module.down_proj.zero_()
            no_experts = model(ids_for()).logits
        assert rel_err(no_experts, eager[family][0]) > 0.2, family


@pytest.mark.parametrize("family", FAMILIES)
def test_bridge_matches_eager(family, eager):
    model = build(family)
    model.set_experts_implementation("moe_kit")
    assert model.config._experts_implementation == "moe_kit"
    assert_same_function(logits_and_grads(model, ids_for()), eager[family])
    ran = [hasattr(m, "_moe_kit_limit") for m in model.modules() if hasattr(m, "gate_up_proj")]
    assert ran and all(ran)  # every experts module went through moe_kit_experts_forward


def test_bridge_register_model_checks_and_switches(eager):
    model = build("deepseek_v4")
    hf.register(model)
    assert model.config._experts_implementation == "moe_kit"
    assert model.model.layers[1].mlp.experts._moe_kit_limit == pytest.approx(0.8)  # V4 clamp found
    assert_same_function(logits_and_grads(model, ids_for()), eager["deepseek_v4"])


def test_bridge_from_pretrained(tmp_path, eager):
    build("qwen3_moe").save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="moe_kit").train()
    assert model.config._experts_implementation == "moe_kit"
    assert_same_function(logits_and_grads(model, ids_for()), eager["qwen3_moe"])


# ----------------------------------------------------------------------------- convert / convert_back


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_matches_eager_and_round_trips(family, eager):
    model = build(family)
    keys = set(model.state_dict())
    experts = [m.gate_up_proj for m in model.modules() if hasattr(m, "gate_up_proj")]
    names = hf.convert(model)
    assert names == FAMILIES[family][1]
    assert all(isinstance(model.get_submodule(n), MoELayer) for n in names)
    layers = [model.get_submodule(n) for n in names]
    assert [layer.experts.gate_up_proj for layer in layers] == experts  # the same tensors, not copies
    assert all(layer.training for layer in layers)
    stats_after = {}
    model.register_forward_hook(lambda *_: stats_after.update(moe_kit.routing_stats(model)))
    assert_same_function(logits_and_grads(model, ids_for(), converted=True), eager[family])  # converts back
    assert list(stats_after) == names and all(int(s.load.sum()) == 2 * SEQ * layer.cfg.top_k
                                              for s, layer in zip(stats_after.values(), layers, strict=True))
    assert not any(isinstance(m, MoELayer) for m in model.modules())
    assert set(model.state_dict()) == keys
    assert_same_function(logits_and_grads(model, ids_for()), eager[family])
    fresh = FAMILIES[family][0]()
    fresh.load_state_dict(model.state_dict())  # strict: the keys load into the original class
    assert rel_err(fresh.train()(ids_for()).logits, eager[family][0]) <= TOL


def test_convert_routing_semantics():
    qwen2 = build("qwen2_moe")
    hf.convert(qwen2)
    layer = qwen2.model.layers[0].mlp
    assert layer.cfg.score_func == "softmax" and layer.cfg.norm_topk_prob is False and layer.cfg.top_k == 3
    assert layer.shared_experts.gate is not None and layer.cfg.shared_intermediate_size == 24

    v3 = build("deepseek_v3")
    bias = v3.model.layers[1].mlp.gate.e_score_correction_bias.clone()
    hf.convert(v3)
    cfg = v3.model.layers[1].mlp.cfg
    assert (cfg.score_func, cfg.n_groups, cfg.topk_groups, cfg.route_scale, cfg.expert_bias) == (
        "sigmoid", 4, 2, 2.5, True)
    assert torch.equal(v3.model.layers[1].mlp.gate.expert_bias, bias)

    v4 = build("deepseek_v4")
    table = v4.model.layers[0].mlp.gate.tid2eid.clone()
    hf.convert(v4)
    hashed, scored = v4.model.layers[0].mlp, v4.model.layers[1].mlp
    assert isinstance(hashed.gate, HashGate) and torch.equal(hashed.gate.tid2eid, table)
    assert isinstance(scored.gate, TopKGate) and scored.gate.expert_bias is not None
    assert scored.cfg.score_func == "sqrtsoftplus" and scored.cfg.swiglu_limit == pytest.approx(0.8)
    with pytest.raises(ValueError, match="input_ids"):
        v4(inputs_embeds=torch.randn(1, 4, 32))  # hash layers need token ids, as in transformers


def test_convert_expert_bias_update_reaches_the_checkpoint():
    """Fine-tune a converted DeepSeek-V3 with noaux_tc updates; convert_back keeps the new bias."""
    model = build("deepseek_v3")
    hf.convert(model, aux_loss_coef=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    before = model.model.layers[1].mlp.gate.expert_bias.clone()
    for seed in range(3):
        model(ids_for(seed), labels=ids_for(seed)).loss.backward()
        opt.step()
        opt.zero_grad()
        moe_kit.update_expert_bias(model)
    after = model.model.layers[1].mlp.gate.expert_bias.clone()
    assert not torch.equal(after, before)
    assert moe_kit.routing_stats(model)["model.layers.1.mlp"].aux_loss > 0
    hf.convert_back(model)
    assert torch.equal(model.model.layers[1].mlp.gate.e_score_correction_bias, after)


def test_convert_back_warns_when_the_family_has_no_bias():
    model = build("qwen3_moe")
    hf.convert(model, expert_bias=True)
    model.model.layers[0].mlp.gate.expert_bias.fill_(0.1)
    with pytest.warns(UserWarning, match="no expert bias"):
        hf.convert_back(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.convert(model, expert_bias=True)
        hf.convert_back(model)  # zero bias: nothing lost, no warning


def test_convert_overrides_are_checked():
    with pytest.raises(ValueError, match="cannot override"):
        hf.convert(build("qwen3_moe"), num_experts=4)
    model = build("deepseek_v3")
    with pytest.raises(ValueError, match="fixed by this model's routing"):
        hf.convert(model, expert_bias=False)
    assert not any(isinstance(m, MoELayer) for m in model.modules())  # nothing changed


def test_convert_disables_router_logit_outputs():
    model = build("mixtral", output_router_logits=True)
    with pytest.warns(UserWarning, match="output_router_logits"):
        hf.convert(model)
    assert model.config.output_router_logits is False
    model(ids_for())


# ----------------------------------------------------------------------------- unsupported layouts


def _gpt_oss():
    cfg = transformers.GptOssConfig(**{**COMMON, "num_hidden_layers": 1}, intermediate_size=16, head_dim=8,
                                    num_local_experts=4, num_experts_per_tok=2)
    return transformers.GptOssForCausalLM(cfg)


def test_unsupported_experts_fail_at_register_use_and_convert():
    model = _gpt_oss()
    with pytest.raises(ValueError, match="GptOssExperts: it has expert biases"):
        hf.register(model)
    model.set_experts_implementation("moe_kit")
    with pytest.raises(ValueError, match="GptOssExperts: it has expert biases"):
        model(ids_for())
    with pytest.raises(ValueError, match="no conversion for GptOssMLP"):
        hf.convert(model)


@pytest.mark.parametrize(
    "flags, match",
    [
        pytest.param(dict(has_bias=True), "expert biases", id="bias"),
        pytest.param(dict(is_transposed=True), "transposed", id="transposed"),
        pytest.param(dict(is_concatenated=False), "interleaved", id="interleaved"),
        pytest.param(dict(has_gate=False), "non-gated", id="no-gate"),
        pytest.param(dict(has_post_expert_norm=True), "norm after each expert", id="post-norm"),
    ],
)
def test_layout_flags_are_refused(flags, match):
    experts = build("qwen3_moe").model.layers[0].mlp.experts
    for flag, value in flags.items():
        setattr(experts, flag, value)
    with pytest.raises(ValueError, match=match):
        hf.experts_swiglu_limit(experts)


def test_activation_and_gate_mismatches_are_refused():
    with pytest.raises(ValueError, match="activation is GELU"):
        hf.register(build("qwen3_moe", hidden_act="gelu"))
    with pytest.raises(ValueError, match="activation is GELU"):
        hf.convert(build("qwen3_moe", hidden_act="gelu"))
    experts = build("deepseek_v4").model.layers[1].mlp.experts
    assert hf.experts_swiglu_limit(experts) == pytest.approx(0.8)
    experts._apply_gate = lambda h: torch.sigmoid(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1]
    with pytest.raises(ValueError, match="_apply_gate is not silu"):
        hf.experts_swiglu_limit(experts)
    experts = build("qwen3_moe").model.layers[0].mlp.experts
    experts.down_proj = nn.Parameter(experts.down_proj.detach().transpose(1, 2).contiguous())  # unflagged
    with pytest.raises(ValueError, match="transposed weights"):
        hf.experts_swiglu_limit(experts)


def test_convert_refuses_what_moelayer_lacks():
    with pytest.raises(ValueError, match="router_jitter_noise"):
        hf.convert(build("mixtral", router_jitter_noise=0.1))
    model = FAMILIES["deepseek_v4"][0](mlp_bias=True)
    with pytest.raises(ValueError, match=r"shared_experts\.gate_proj\.bias"):
        hf.convert(model)
    with pytest.raises(ValueError, match="bare"):
        hf.convert(build("olmoe").model.layers[0].mlp)


def test_bridge_rejects_expert_parallel_and_bad_backend():
    model = build("olmoe")
    model.set_experts_implementation("moe_kit")
    model.model.layers[0].mlp.experts._is_expert_parallel = True
    with pytest.raises(NotImplementedError, match="expert parallelism"):
        model(ids_for())
    with pytest.raises(ValueError, match="unknown backend"):
        hf.register(backend="cuda-magic")
    hf.register()  # back to the default backend for the other tests
