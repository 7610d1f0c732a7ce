"""moe_kit.integrations.hf against transformers' own eager implementation.

Tiny models of each family are built from their config classes (no downloads), in train mode,
fp32. The routers and experts are re-initialized larger than transformers' std=0.02 so routing is
decisive and the experts dominate the residual stream (checked by test_moe_path_matters): an
error in routing or experts cannot hide in the logits.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import pickle
import warnings
from functools import partial
from pathlib import Path

import conftest
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import moe_kit  # noqa: E402
from moe_kit import HashGate, MoELayer, TopKGate  # noqa: E402
from moe_kit.integrations import hf  # noqa: E402
from moe_kit.integrations.hf.convert import _convert  # noqa: E402

TOL = 1e-3  # normwise relative error, fp32
VOCAB, SEQ = 96, 10
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


rel_err = partial(conftest.rel_err, floor=1e-6)  # floor: see conftest.rel_err


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


def _gpt_oss(**kw):
    """gpt-oss: router with bias, experts transposed with gate/up interleaved, biased, swiglu_oai;
    clamped at 1.0 (the released 7 would rarely bite at these sizes); 2I = 48 != D = 32, so no
    transposition can hide in a square shape."""
    settings = dict(intermediate_size=24, head_dim=8, num_local_experts=8, num_experts_per_tok=2, swiglu_limit=1.0,
                    rope_parameters=dict(rope_type="default", rope_theta=150000.0))
    return transformers.GptOssForCausalLM(transformers.GptOssConfig(**{**COMMON, **settings, **kw}))


FAMILIES = {
    "qwen3_moe": (_qwen3, ["model.layers.0.mlp", "model.layers.1.mlp"]),
    "qwen2_moe": (_qwen2, ["model.layers.0.mlp", "model.layers.1.mlp"]),
    "mixtral": (_mixtral, ["model.layers.0.mlp", "model.layers.1.mlp"]),
    "olmoe": (_olmoe, ["model.layers.0.mlp", "model.layers.1.mlp"]),
    "deepseek_v3": (_deepseek_v3, ["model.layers.1.mlp", "model.layers.2.mlp"]),  # layer 0 dense
    "deepseek_v4": (_deepseek_v4, ["model.layers.0.mlp", "model.layers.1.mlp", "model.layers.2.mlp"]),  # 0 hashed
    "gpt_oss": (_gpt_oss, ["model.layers.0.mlp", "model.layers.1.mlp"]),
}


@torch.no_grad()
def _strengthen(model: nn.Module) -> nn.Module:
    """Decisive routers, experts that dominate the residual, a non-zero DeepSeek bias, non-zero
    gpt-oss router and expert biases and a balanced V4 hash table (transformers initializes tid2eid
    to zeros)."""
    for name, module in model.named_modules():
        if hasattr(module, "gate_up_proj"):
            module.gate_up_proj.normal_(0.0, 0.25)
            module.down_proj.normal_(0.0, 0.25)
            for bias in ("gate_up_proj_bias", "down_proj_bias"):
                if hasattr(module, bias):
                    getattr(module, bias).normal_(0.0, 0.25)
        if name.endswith(("mlp.gate", "mlp.router")):
            module.weight.normal_(0.0, 0.4)
            if getattr(module, "bias", None) is not None:
                module.bias.normal_(0.0, 0.1)
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
                    if hasattr(module, "down_proj_bias"):
                        module.down_proj_bias.zero_()
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


# ----------------------------------------------------------------------------- transformers' balancing loss


HF_LOSS_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v4", "gpt_oss"]  # load_balancing_loss_func


def padding_mask(ids: torch.Tensor) -> torch.Tensor:
    """Left padding on the first sequence, right padding on the last."""
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[-1, -2:] = 0
    return mask


def hf_loss_run(model: nn.Module, ids: torch.Tensor, mask, converted: bool = False, **kw):
    """(output, (logits, {name: grad})) of a forward with labels and router logits, after the backward
    of its `loss` (LM loss + router_aux_loss_coef * aux_loss); grads by transformers names."""
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=ids, **kw)
    out.loss.backward()
    if converted:
        hf.convert_back(model)
    return out, (out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})


@pytest.mark.parametrize("family", HF_LOSS_FAMILIES)
@pytest.mark.parametrize("padded", [pytest.param(False, id="argument-no-mask"), pytest.param(True, id="config-padded")])
def test_converted_model_gives_transformers_balancing_loss(family, padded):
    """output_router_logits (as a forward argument, or in the config with attention_mask padding):
    the converted model returns transformers' router logits, so its own aux_loss, loss, logits and
    every gradient equal the eager transformers model's (router_aux_loss_coef large enough that the
    aux gradient matters). DeepSeek-V4 records its scored layers only, not the hash layer, as transformers."""
    ids = ids_for()
    mask = padding_mask(ids) if padded else None
    config_kw = dict(router_aux_loss_coef=0.5, output_router_logits=True) if padded else dict(router_aux_loss_coef=0.5)
    call_kw = {} if padded else dict(output_router_logits=True)
    ref, want = hf_loss_run(build(family, **config_kw), ids, mask, **call_kw)
    model = build(family, **config_kw)
    names = hf.convert(model)
    assert model.config.output_router_logits is padded  # left as the user set it
    out, got = hf_loss_run(model, ids, mask, converted=True, **call_kw)
    recorded = len(names) - (family == "deepseek_v4")
    assert len(out.router_logits) == len(ref.router_logits) == recorded
    for layer, (logits, ref_logits) in enumerate(zip(out.router_logits, ref.router_logits, strict=True)):
        assert logits.shape == ref_logits.shape and logits.shape[0] == ids.numel() and logits.dtype == ref_logits.dtype
        exact = layer == 0 and family != "deepseek_v4"  # the first MoE layer: the same input, so bit for bit
        assert rel_err(logits, ref_logits) <= (0 if exact else TOL)
    assert rel_err(out.aux_loss, ref.aux_loss) <= 1e-5 and ref.aux_loss > 1.0
    assert rel_err(out.loss, ref.loss) <= 1e-5
    assert_same_function(got, want)
    _, without_aux = hf_loss_run(build(family, router_aux_loss_coef=0.0), ids, mask, output_router_logits=True)
    router = next(n for n in want[1] if n.endswith(("mlp.gate.weight", "mlp.router.weight")))
    assert rel_err(without_aux[1][router], want[1][router]) > 0.05  # the aux gradient is in the comparison


def test_transformers_loss_is_top_k_times_moe_kit_per_layer():
    """For one layer (no padding), transformers' load_balancing_loss_func is top_k x moe_kit's Switch
    aux loss (coef 1): the base of the coefficient mapping aux_loss_coef = c * top_k / L."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = build("qwen2_moe")  # top_k = 3
    hf.convert(model, aux_loss_coef=1.0, both_aux_losses=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both asked for: no warning
        out = model(ids_for(), output_router_logits=True)
    stats = moe_kit.routing_stats(model)
    for logits, (name, layer_stats) in zip(out.router_logits, stats.items(), strict=True):
        hf_value = load_balancing_loss_func((logits,), 8, 3)
        assert hf_value.item() == pytest.approx(3 * layer_stats.aux_loss, rel=1e-5), name


def test_both_balancing_losses_only_when_asked():
    model = build("mixtral", output_router_logits=True)
    with pytest.raises(ValueError, match="output_router_logits is set.*both_aux_losses=True"):
        hf.convert(model, aux_loss_coef=1e-2)
    assert not any(isinstance(m, MoELayer) for m in model.modules())  # nothing changed
    hf.convert(model, aux_loss_coef=1e-2, both_aux_losses=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model(ids_for(), labels=ids_for()).aux_loss is not None
    model = build("mixtral")
    hf.convert(model, aux_loss_coef=1e-2)  # moe_kit's loss only: fine
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model(ids_for(), labels=ids_for()).aux_loss is None
    with pytest.warns(UserWarning, match="both"):
        model(ids_for(), labels=ids_for(), output_router_logits=True)  # asked at the forward: warned


def test_router_logits_survive_hooks_before_convert_convert_back_deepcopy_and_pickle():
    """transformers installs its capture hooks once, at the first capturing forward: a model that
    ran one before convert (or convert_back) still records every layer after it."""
    ids = ids_for()
    want = build("mixtral")(ids, output_router_logits=True).aux_loss
    model = build("mixtral")
    keys = list(model.state_dict())
    model(ids, output_router_logits=True)  # hooks installed on the transformers routers
    for step in ("convert", "convert_back", "convert again"):
        (hf.convert_back if step == "convert_back" else hf.convert)(model)
        out = model(ids, output_router_logits=True)
        assert len(out.router_logits) == 2 and rel_err(out.aux_loss, want) <= 1e-5, step
    recorders = [m for n, m in model.named_modules() if n.endswith("gate.logits_recorder")]
    assert len(recorders) == 2 and all(len(r._forward_hooks) == 1 for r in recorders)  # one hook each
    assert isinstance(recorders[0], transformers.models.mixtral.modeling_mixtral.MixtralTopKRouter)
    assert list(model.state_dict()) == keys  # the recorder has no state
    twin = copy.deepcopy(model)
    assert rel_err(twin(ids, output_router_logits=True).aux_loss, want) <= 1e-5
    fresh = build("qwen3_moe")
    hf.convert(fresh)  # no hooks yet: plain picklable modules
    again = pickle.loads(pickle.dumps(fresh))
    assert len(again(ids, output_router_logits=True).router_logits) == 2


@pytest.mark.parametrize("family, dtype", [("mixtral", torch.bfloat16), ("deepseek_v3", torch.float32)])
def test_router_logits_have_the_transformers_router_dtype(family, dtype):
    """In a bf16 model, Mixtral's router returns bf16 logits and DeepSeek-V3's fp32 (its router casts
    to fp32); the converted layers return them in the same dtype (moe_kit routes in fp32 either way)."""
    ids = ids_for()
    ref = build(family).to(torch.bfloat16)
    want = ref(ids, output_router_logits=True).router_logits
    hf.convert(ref)
    got = ref(ids, output_router_logits=True).router_logits
    assert len(got) == len(want) == 2 and {t.dtype for t in got} == {t.dtype for t in want} == {dtype}


# ----------------------------------------------------------------------------- Mixtral's router_jitter_noise


def test_mixtral_router_jitter_matches_eager_training():
    """router_jitter_noise multiplies the block input (router and experts) by U(1 - eps, 1 + eps)
    in training: same seed, same draws, so logits, loss (with transformers' aux loss) and grads equal
    eager; in eval there is no noise."""
    ids = ids_for()
    kw = dict(router_jitter_noise=0.3, output_router_logits=True, router_aux_loss_coef=0.5)
    ref_model, model = build("mixtral", **kw), build("mixtral", **kw)
    torch.manual_seed(7)
    ref, want = hf_loss_run(ref_model, ids, None)
    hf.convert(model)
    assert model.model.layers[0].mlp.block_jitter_noise == pytest.approx(0.3)
    assert model.model.layers[0].mlp.cfg.jitter_eps == 0  # moe_kit's router-only jitter stays off
    torch.manual_seed(7)
    out, got = hf_loss_run(model, ids, None, converted=True)
    assert rel_err(out.aux_loss, ref.aux_loss) <= 1e-5
    assert_same_function(got, want)
    assert rel_err(want[0], logits_and_grads(build("mixtral"), ids)[0]) > 1e-3  # the noise is there
    hf.convert(model)
    model.eval()
    with torch.no_grad():
        assert rel_err(model(ids).logits, build("mixtral").eval()(ids).logits) <= TOL  # eval: none


@pytest.mark.parametrize("family, block", [("minimax", "MiniMaxSparseMoeBlock"),
                                           ("minimax_m2", "MiniMaxM2SparseMoeBlock")])
def test_other_input_jitter_blocks_match_eager_training(family, block):
    module = pytest.importorskip(f"transformers.models.{family}.modeling_{family}")
    holder = nn.Module()
    holder.mlp, _ = _coverage().tiny_block(getattr(module, block), family)
    holder.mlp.jitter_noise = 0.3
    holder.train()
    x = torch.randn(2, 5, holder.mlp.experts.gate_up_proj.shape[-1], requires_grad=True)
    torch.manual_seed(3)
    want = holder.mlp(x.clone())  # transformers jitters its input in place
    (want_grad,) = torch.autograd.grad(want.square().sum(), x)
    hf.convert(holder)
    torch.manual_seed(3)
    got = holder.mlp(x)
    (got_grad,) = torch.autograd.grad(got.square().sum(), x)
    assert rel_err(got, want) <= TOL and rel_err(got_grad, want_grad) <= TOL


# ----------------------------------------------------------------------------- gpt-oss: layouts, biases, swiglu_oai


def test_gpt_oss_layout_is_read_and_relaid_in_place():
    """hf.experts_layout reads gpt-oss's experts (transposed, interleaved, biased, swiglu_oai clamped);
    convert relays the same Parameter objects in place: moe_kit's [E, 2I, D] with the gate rows
    first (transformers' even columns), convert_back restores transformers' tensors bit for bit."""
    model = build("gpt_oss")
    experts = model.model.layers[0].mlp.experts
    layout = hf.experts_layout(experts)
    assert (layout.activation, layout.limit, layout.transposed, layout.interleaved, layout.bias) == (
        "swiglu_oai", 1.0, True, True, True)
    params = {n: p for n, p in experts.named_parameters()}
    before = {n: p.detach().clone() for n, p in params.items()}
    hf.convert(model)
    layer = model.model.layers[0].mlp
    assert layer.cfg.activation == "swiglu_oai" and layer.cfg.expert_proj_bias and layer.cfg.router_bias
    assert (layer.cfg.score_func, layer.cfg.norm_topk_prob, layer.cfg.swiglu_limit) == ("softmax", True, 1.0)
    for name, param in params.items():
        assert getattr(layer.experts, name) is param  # the same objects
    inter = 24
    assert layer.experts.gate_up_proj.shape == (8, 2 * inter, 32) and layer.experts.down_proj.shape == (8, 32, inter)
    assert torch.equal(layer.experts.gate_up_proj[:, :inter], before["gate_up_proj"][:, :, 0::2].transpose(1, 2))
    assert torch.equal(layer.experts.gate_up_proj[:, inter:], before["gate_up_proj"][:, :, 1::2].transpose(1, 2))
    assert torch.equal(layer.experts.gate_up_proj_bias[:, inter:], before["gate_up_proj_bias"][:, 1::2])
    assert torch.equal(layer.experts.down_proj, before["down_proj"].transpose(1, 2))
    x = torch.randn(2, 5, 32)
    out, scores = layer(x)  # gpt-oss's block returns (output, router scores): the decoder unpacks the pair
    hf.convert_back(model)
    block = model.model.layers[0].mlp
    want_out, want_scores = block(x)
    assert rel_err(out, want_out) <= 1e-5 and rel_err(scores, want_scores) <= 1e-6
    for name, param in params.items():
        assert getattr(block.experts, name) is param and torch.equal(param, before[name]), name


def test_gpt_oss_experts_mode_sees_every_weight_update():
    """The experts implementation relays gpt-oss's weights on every call, never from a cache: after
    an optimizer step (and an in-place edit) it still equals transformers' eager experts."""
    ids = ids_for()
    models = {"eager": build("gpt_oss"), "moe_kit": build("gpt_oss")}
    hf.register(models["moe_kit"])
    for model in models.values():
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.model.layers[1].mlp.experts.gate_up_proj_bias.mul_(-1.0)
    assert_same_function(logits_and_grads(models["moe_kit"], ids_for(2)), logits_and_grads(models["eager"], ids_for(2)))


def test_gpt_oss_alpha_moe_kit_lacks_is_refused():
    """A gpt-oss config with another swiglu_alpha is no moe_kit activation: refused in both modes."""
    model = _gpt_oss(swiglu_alpha=1.5)
    with pytest.raises(ValueError, match="GptOssExperts: its _apply_gate is not .* interleaved"):
        hf.register(model)
    model.set_experts_implementation("moe_kit")
    with pytest.raises(ValueError, match="GptOssExperts: its _apply_gate"):
        model(ids_for())
    with pytest.raises(ValueError, match=r"mlp \(GptOssMLP, gpt_oss\): moe_kit cannot run GptOssExperts"):
        hf.convert(model)
    assert not any(isinstance(m, MoELayer) for m in model.modules())  # nothing changed


def test_gpt_oss_converted_compiles_fullgraph():
    """torch.compile(fullgraph=True, aot_eager) of a converted one-layer gpt-oss (biases through
    moe_kit's custom ops, the (output, scores) pair), forward and backward equal to eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _strengthen(_gpt_oss(num_hidden_layers=1)).train()
    reference = copy.deepcopy(model)
    want = logits_and_grads(reference, ids_for())
    hf.convert(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.zero_grad(set_to_none=True)
    out = compiled(ids_for(), labels=ids_for())
    out.loss.backward()
    hf.convert_back(model)
    assert_same_function((out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}), want)


@pytest.mark.parametrize(
    "flags, match",
    [
        pytest.param(dict(has_bias=True), "has_bias=True but its gate_up_proj_bias is None", id="bias-missing"),
        pytest.param(dict(is_transposed=True), "transposed", id="transposed-unlike-its-weights"),
        pytest.param(dict(is_concatenated=False), "interleaved", id="interleaved-unlike-its-gate"),
        pytest.param(dict(has_gate=False), "non-gated", id="no-gate"),
        pytest.param(dict(has_post_expert_norm=True), "norm after each expert", id="post-norm"),
    ],
)
def test_layout_flags_are_refused(flags, match):
    """Non-gated experts and post-expert norms are refused; layout flags moe_kit adapts (biases,
    transposed, interleaved) are refused when the module's tensors or gate do not fit them."""
    experts = build("qwen3_moe").model.layers[0].mlp.experts
    for flag, value in flags.items():
        setattr(experts, flag, value)
    with pytest.raises(ValueError, match=match):
        hf.experts_swiglu_limit(experts)


def test_gelu_experts_run_in_the_bridge_and_in_convert():
    eager_gelu = logits_and_grads(build("qwen3_moe", hidden_act="gelu"), ids_for())
    model = build("qwen3_moe", hidden_act="gelu")
    hf.register(model)
    assert model.model.layers[0].mlp.experts._moe_kit_activation == "gelu"
    assert_same_function(logits_and_grads(model, ids_for()), eager_gelu)
    model = build("qwen3_moe", hidden_act="gelu")
    hf.convert(model)
    assert model.model.layers[0].mlp.cfg.activation == "gelu"
    assert_same_function(logits_and_grads(model, ids_for(), converted=True), eager_gelu)


def test_activation_and_gate_mismatches_are_refused():
    model = build("qwen3_moe")
    model.model.layers[0].mlp.experts.act_fn = nn.Tanh()
    with pytest.raises(ValueError, match="activation is Tanh"):
        hf.register(model)
    with pytest.raises(ValueError, match="activation is Tanh"):
        hf.convert(model)
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
    model = build("qwen3_moe")
    model.model.layers[1].mlp.jitter_noise = 0.1  # jitter on a block not known to apply it as Mixtral does
    with pytest.raises(ValueError, match=r"layers\.1\.mlp.*router_jitter_noise"):
        hf.convert(model)
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


# ----------------------------------------------------------------------------- checkpoints of converted models


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_saves_under_transformers_names(family, eager, tmp_path):
    """state_dict / save_pretrained of a converted model: the transformers keys, so a plain
    from_pretrained of the transformers class is exact (no convert_back)."""
    model = build(family)
    keys = list(model.state_dict())
    hf.convert(model)
    state = model.state_dict()
    assert list(state) == keys  # same names, same order
    model.load_state_dict(state)  # and the converted model loads them back (strict)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).train()
    assert type(reloaded) is type(FAMILIES[family][0]())
    assert_same_function(logits_and_grads(reloaded, ids_for()), eager[family])


def test_converted_deepseek_checkpoint_keeps_fp32_router_and_trained_bias(tmp_path):
    """transformers' _keep_in_fp32_modules_strict (e_score_correction_bias, gate.weight) still
    matches the saved names, and a bias trained by moe_kit is the one transformers loads."""
    model = build("deepseek_v3")
    hf.convert(model)
    model.model.layers[1].mlp.gate.expert_bias.add_(0.25)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    gate = reloaded.model.layers[1].mlp.gate
    assert gate.e_score_correction_bias.dtype == torch.float32 and gate.weight.dtype == torch.float32
    assert reloaded.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert torch.equal(gate.e_score_correction_bias, model.model.layers[1].mlp.gate.expert_bias)


def test_converted_model_without_a_place_for_the_bias_keeps_it_under_its_own_name():
    model = build("qwen3_moe")
    hf.convert(model, expert_bias=True)
    state = model.state_dict()
    assert "model.layers.0.mlp.gate.expert_bias" in state  # no transformers name for it: kept, not dropped
    again = build("qwen3_moe")
    hf.convert(again, expert_bias=True)
    again.load_state_dict(state)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_saving_an_expert_bias_the_family_lacks_warns_and_reloads_exactly_the_moe_kit_way(family, tmp_path):
    """convert(expert_bias=True) on a family with no place for the bias, trained: save_pretrained
    warns naming the keys a plain from_pretrained ignores (its logits differ); from_pretrained +
    convert(expert_bias=True) + load_state_dict of those checkpoint entries is exact."""
    from safetensors.torch import load_file

    model = build(family)
    hf.convert(model, expert_bias=True, bias_update_rate=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "zero")  # a zero bias: a plain load is exact, nothing to say
    assert (tmp_path / "zero" / "moe_kit_state.safetensors").exists()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for seed in range(2):  # training moves the bias
        model(ids_for(seed), labels=ids_for(seed)).loss.backward()
        opt.step()
        opt.zero_grad()
        moe_kit.update_expert_bias(model)
    assert model.model.layers[1].mlp.gate.expert_bias.abs().max() > 0
    ids = ids_for(5)
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    with pytest.warns(UserWarning, match=r"'model\.layers\.1\.mlp\.gate\.expert_bias'.*plain from_pretrained"):
        model.save_pretrained(tmp_path / "trained")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "trained").eval()
    with torch.no_grad():
        assert rel_err(plain(ids).logits, trained) > 1e-3  # the documented loss: the bias is not loaded
    saved = load_file(tmp_path / "trained" / "moe_kit_state.safetensors")
    assert sorted(saved) == ["model.layers.0.mlp.gate.expert_bias", "model.layers.1.mlp.gate.expert_bias"]
    hf.convert(plain, expert_bias=True)
    assert not plain.load_state_dict(saved, strict=False).unexpected_keys
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, trained)


def test_experts_implementation_of_a_converted_model_is_refused():
    """After convert the experts are MoELayers: choosing transformers' experts implementation
    would change the config and nothing else, so it raises until convert_back."""
    model = build("qwen3_moe")
    hf.convert(model)
    before = model.config._experts_implementation
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp.*convert_back"):
        model.set_experts_implementation("batched_mm")
    with pytest.raises(ValueError, match="convert_back"):
        model.model.set_experts_implementation("batched_mm")  # the inner PreTrainedModel too
    assert model.config._experts_implementation == before
    hf.convert_back(model)
    model.set_experts_implementation("batched_mm")
    assert model.config._experts_implementation == "batched_mm"
    assert "set_experts_implementation" not in vars(model)  # the class's method again


# ----------------------------------------------------------------------------- meta-device models


def _fill_non_persistent(model: nn.Module, reference: nn.Module) -> None:
    """What from_pretrained does for buffers outside the state_dict (rotary inv_freq, ...)."""
    buffers = dict(reference.named_buffers())
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = buffers[name].clone()
    for name, module in model.named_modules():  # rotary modules keep a plain copy of inv_freq
        if hasattr(module, "original_inv_freq") and module.original_inv_freq.is_meta:
            module.original_inv_freq = reference.get_submodule(name).original_inv_freq.clone()


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "deepseek_v4", "gpt_oss"])
def test_meta_build_register_convert_then_load(family, eager):
    with torch.device("meta"):
        model = FAMILIES[family][0]()
    hf.register(model)  # the layout probes run on the CPU, not on the default (meta) device
    assert hf.convert(model) == FAMILIES[family][1]
    assert all(p.is_meta for p in model.parameters())
    model.load_state_dict(_state(family), assign=True)  # transformers names, into the converted model
    _fill_non_persistent(model, build(family))
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    model.train()
    assert_same_function(logits_and_grads(model, ids_for(), converted=True), eager[family])


def test_meta_convert_under_a_meta_default_device():
    with torch.device("meta"):
        model = FAMILIES["mixtral"][0]()
        hf.convert(model)  # still inside the context: no probe may land on meta
    assert isinstance(model.model.layers[0].mlp, MoELayer)


def _shrunk(family: str):
    """A tiny causal LM of `family` from benchmarks/hf_coverage.py's shrunk config (its first try)."""
    coverage = _coverage()
    config_cls = transformers.models.auto.configuration_auto.CONFIG_MAPPING[family]
    defaults = config_cls().to_dict()
    shrink = {**coverage.SHRINK, **coverage.RETRIES[0]}
    config = config_cls(**{k: v for k, v in shrink.items() if k in defaults and v is not coverage.DROP})
    names = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return getattr(transformers, names[family])(config)


FRESH = {**{family: (make, {}) for family, (make, _) in FAMILIES.items()},
         "qwen3_moe+bias": (_qwen3, {"expert_bias": True}),  # an expert bias the family has no slot for
         "glm4_moe": (functools.partial(_shrunk, "glm4_moe"), {}),
         "ernie4_5_moe": (functools.partial(_shrunk, "ernie4_5_moe"), {})}  # its bias is [1, E]


@pytest.mark.parametrize("family", FRESH)
def test_fresh_init_of_a_converted_meta_model_is_the_models_own(family):
    """transformers' fresh-init path (meta build, convert, to_empty, init_weights): every tensor of
    the converted layers is drawn by the model's own _init_weights as for the block it replaced
    (router and experts ~ N(0, initializer_range), expert biases zero), nothing is left as the
    garbage to_empty gave, and the layers compute what the transformers blocks do on those tensors."""
    make, overrides = FRESH[family]
    with torch.device("meta"):
        model = make()
    names = hf.convert(model, **overrides)
    model.to_empty(device="cpu")
    with torch.no_grad():  # the garbage uninitialized memory may hold
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.fill_(float("nan") if tensor.is_floating_point() else 12345)
        for module in model.modules():
            if getattr(module, "expert_counts", None) is not None:
                module.expert_counts.fill_(float("nan"))
    model.init_weights()
    std = model.config.initializer_range
    biases = 0
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, MoELayer), name
        for key, tensor in list(layer.named_parameters()) + list(layer.named_buffers()):
            assert torch.isfinite(tensor.float()).all(), (name, key)
        assert abs(layer.gate.weight.std().item() - std) < 0.3 * std, name  # transformers' init, not moe_kit's
        assert abs(layer.experts.gate_up_proj.std().item() - std) < 0.3 * std, name
        if getattr(layer.gate, "expert_bias", None) is not None:
            biases += 1
            assert torch.equal(layer.gate.expert_bias, torch.zeros_like(layer.gate.expert_bias)), name
            assert torch.equal(layer.gate.expert_counts, torch.zeros_like(layer.gate.expert_counts)), name
    if family in ("deepseek_v3", "deepseek_v4", "qwen3_moe+bias", "glm4_moe", "ernie4_5_moe"):
        assert biases >= len(names) - (family == "deepseek_v4"), biases  # V4's hash layer has none
    model.eval()
    ids = ids_for()
    with torch.no_grad():
        got = model(ids).logits
        hf.convert_back(model)
        want = model(ids).logits
    assert torch.isfinite(got).all() and rel_err(got, want) <= TOL


# ----------------------------------------------------------------------------- hf.upcycle


def _dense(kind: str):
    common = dict(COMMON, intermediate_size=48)
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=None))
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=8))


@pytest.mark.parametrize("kind, target", [
    pytest.param("llama", "MixtralForCausalLM", id="llama-mixtral"),
    pytest.param("mistral", "MixtralForCausalLM", id="mistral-mixtral"),
    pytest.param("qwen2", "Qwen2MoeForCausalLM", id="qwen2-qwen2moe"),
    pytest.param("qwen3", "Qwen3MoeForCausalLM", id="qwen3-qwen3moe"),
])
def test_hf_upcycle_saves_a_checkpoint_of_the_moe_family(kind, target, tmp_path):
    torch.manual_seed(0)
    dense = _dense(kind).train()
    moe = hf.upcycle(dense, num_experts=4, top_k=2)
    assert type(moe).__name__ == target and moe.training
    ids = ids_for()
    with torch.no_grad():
        want = dense(ids).logits
        got = moe(ids).logits
    assert rel_err(got, want) < 1e-5  # copies + renormalized routing: the dense function at init
    moe.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no missing / unexpected keys, no re-initialization
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == target
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, got)
        hf.register(reloaded)  # runs on moe_kit's experts
        assert rel_err(reloaded(ids).logits, got) < 1e-6
        hf.convert(reloaded)  # and as MoELayers
        assert rel_err(reloaded(ids).logits, got) < 1e-6


def test_hf_upcycle_refuses_other_models():
    with pytest.raises(ValueError, match="causal LMs"):
        hf.upcycle(build("mixtral"), num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="attention_bias"):
        hf.upcycle(transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, intermediate_size=48,
                                                                          attention_bias=True)), 4, 2)


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("mode", ["experts_implementation", "convert"])
def test_compile_fullgraph_matches_eager(mode):
    """torch.compile(model, fullgraph=True) (aot_eager: dynamo + AOT autograd, no C++ build), forward
    and backward, two token counts, no graph break (fullgraph raises on one). The second converted
    run collects router logits for transformers' aux loss; as for transformers' own model, an eager
    capturing forward installs the capture hooks first (their installation does not compile)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(**{**COMMON, "num_hidden_layers": 1}, intermediate_size=64,
                                      moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
                                      num_experts_per_tok=2)
    model = _strengthen(transformers.Qwen2MoeForCausalLM(cfg)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if mode == "convert":
        hf.convert(model)
    else:
        hf.register(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for seq in (SEQ, SEQ + 3):
        ids = torch.randint(3, VOCAB, (2, seq), generator=torch.Generator().manual_seed(seq))
        kw = dict(output_router_logits=True) if mode == "convert" and seq > SEQ else {}
        reference = transformers.Qwen2MoeForCausalLM(cfg)
        reference.load_state_dict(state)
        ref_out, want = hf_loss_run(reference.train(), ids, None, **kw)
        if kw:
            model(ids[:, :2], **kw)  # eager: installs transformers' capture hooks
        model.zero_grad(set_to_none=True)
        out = compiled(ids, labels=ids, **kw)
        out.loss.backward()
        if mode == "convert":
            hf.convert_back(model)
        assert_same_function((out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}), want)
        assert (out.aux_loss is None) == (ref_out.aux_loss is None) == (not kw)
        assert not kw or rel_err(out.aux_loss, ref_out.aux_loss) <= 1e-5
        if mode == "convert":
            hf.convert(model)


# ----------------------------------------------------------------------------- every family transformers has


def _coverage():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "hf_coverage.py"
    spec = importlib.util.spec_from_file_location("hf_coverage", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_verified_block_of_the_installed_transformers_matches_eager():
    """Every MoE block class of the installed transformers that specs.VERIFIED lists and that builds
    from its family's shrunk config (benchmarks/hf_coverage.py, block level: output and gradients
    of the block alone) converts to a MoELayer computing the same function."""
    coverage = _coverage()
    checked, failures = [], []
    for family in coverage.moe_families():
        row = coverage.measure_blocks(family, "")
        if not all(block in hf.VERIFIED for block in row.get("blocks", [])) or "convert" not in row:
            continue
        checked.append(family)
        if not (isinstance(row["convert"], float) and row["convert"] <= TOL):
            failures.append((family, row["convert"]))
    assert len(checked) >= 25, checked
    assert not failures, failures


def test_unverified_or_inexpressible_blocks_are_refused_with_the_family():
    cfg = transformers.Cohere2MoeConfig(**COMMON, intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                        num_shared_experts=1, shared_expert_combination_strategy="average")
    with pytest.raises(ValueError, match=r"cohere2_moe\).*shared_expert_combination_strategy='average'"):
        hf.convert(transformers.Cohere2MoeForCausalLM(cfg))


def test_router_probe_refuses_a_routing_moe_kit_lacks():
    """Mistral-4's router scores groups by their top-2 sum without an expert bias (moe_kit: max);
    the router probe finds no MoEConfig routing that matches, so convert says so."""
    mistral4 = pytest.importorskip("transformers.models.mistral4.modeling_mistral4")
    block, _ = _coverage().tiny_block(mistral4.Mistral4MoE, "mistral4")
    holder = nn.Module()
    holder.mlp = block
    with pytest.raises(ValueError, match=r"mistral4\).*Mistral4MoE is not among the blocks"):
        hf.convert(holder)
    with pytest.raises(ValueError, match="Mistral4TopkRouter routes in a way MoEConfig cannot express"):
        _convert(holder, {}, verified_only=False)  # the VERIFIED check bypassed: the probe itself refuses
