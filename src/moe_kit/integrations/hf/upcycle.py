"""hf.upcycle: a dense transformers causal LM -> the matching transformers MoE family.

Legend: D model width, F dense MLP width, E experts, I expert width, k experts per token.

Llama / Mistral -> Mixtral, Qwen2 -> Qwen2-MoE, Qwen3 -> Qwen3-MoE. The result is a plain
transformers model of the MoE class (its config says so), so `save_pretrained` /
`from_pretrained` round-trip it exactly and it runs on moe_kit in both modes (`register`,
`convert`). Every non-MLP tensor is copied under the same name; each decoder layer's MLP becomes
E experts built by `moe_kit.upcycle` (copies of the dense SwiGLU when I == F, a fine-grained split
when I divides F) and a small random router. The MoE families renormalize the top-k weights
(Mixtral always; Qwen with norm_topk_prob=True, set here), so with copies the model computes the
dense model's function at init; `check=True` verifies that on a probe batch. Qwen2-MoE always has
a gated shared expert: it gets a fresh init with a zero down projection (it adds nothing at init).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_kit.config import MoEConfig
from moe_kit.integrations.upcycle import upcycle as upcycle_mlp

# dense model_type -> (MoE config class, MoE causal-LM class, {MoE config field: how to fill it})
TARGETS = {
    "llama": ("MixtralConfig", "MixtralForCausalLM"),
    "mistral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}
_NOT_COPIED = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map",
               "mlp_bias", "attention_bias", "pretraining_tp")


def _moe_fields(model_type: str, dense, num_experts: int, top_k: int, width: int, shared_width: int | None) -> dict:
    if model_type in ("llama", "mistral"):
        for field, plain in (("attention_bias", False), ("mlp_bias", False), ("pretraining_tp", 1)):
            if getattr(dense, field, plain) != plain:
                raise ValueError(
                    f"hf.upcycle: {model_type} with {field}={getattr(dense, field)} has no Mixtral equivalent"
                )
        return dict(intermediate_size=width, num_local_experts=num_experts, num_experts_per_tok=top_k,
                    router_jitter_noise=0.0)
    common = dict(moe_intermediate_size=width, num_experts_per_tok=top_k, norm_topk_prob=True,
                  decoder_sparse_step=1, mlp_only_layers=[])
    if model_type == "qwen2":
        shared = dense.intermediate_size if shared_width is None else shared_width
        return dict(common, num_experts=num_experts, shared_expert_intermediate_size=shared, qkv_bias=True)
    return dict(common, num_experts=num_experts, num_local_experts=num_experts)


@torch.no_grad()
def upcycle(
    model: nn.Module,
    num_experts: int,
    top_k: int,
    *,
    intermediate_size: int | None = None,
    shared_expert_intermediate_size: int | None = None,
    router_std: float = 0.01,
    seed: int = 0,
    check: bool = True,
) -> nn.Module:
    """The transformers MoE causal LM upcycled from the dense causal LM `model` (see module doc).

    Args:
        model: a LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM.
        num_experts, top_k: E and k of every MoE layer.
        intermediate_size: expert width I; None = the dense width F (copies, same function at init),
            or a divisor of F (fine-grained split, see moe_kit.upcycle).
        shared_expert_intermediate_size: Qwen2-MoE's shared expert width (default F).
        router_std: std of the router init (near-uniform routing at first); seed: its generator seed.
        check: with copies, compare the logits of both models on a probe batch (ValueError if they differ).
    Returns:
        a new model of the MoE class, on model's device and dtype, in model's train/eval mode.
    """
    import transformers

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in TARGETS or not type(model).__name__.endswith("ForCausalLM"):
        raise ValueError(
            f"hf.upcycle turns {sorted(TARGETS)} causal LMs into MoE models; got {type(model).__name__} "
            f"(model_type={model_type!r})"
        )
    config_name, model_name = TARGETS[model_type]
    dense_width = int(config.intermediate_size)
    width = dense_width if intermediate_size is None else int(intermediate_size)
    fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_COPIED}
    fields.update(_moe_fields(model_type, config, num_experts, top_k, width, shared_expert_intermediate_size))
    moe_config = getattr(transformers, config_name)(**fields)
    with torch.device("meta"):
        moe_model = getattr(transformers, model_name)(moe_config)

    reference = next(model.parameters())
    generator = torch.Generator(device="cpu").manual_seed(seed)
    cfg = MoEConfig(hidden_size=int(config.hidden_size), intermediate_size=width, num_experts=num_experts,
                    top_k=top_k, norm_topk_prob=True, backend="torch")
    state = {}
    for name, tensor in model.state_dict().items():
        if ".mlp." not in name:
            state[name] = tensor
    for index, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{index}.mlp."
        moe = upcycle_mlp(layer.mlp, cfg, layer_id=index, router_std=router_std)
        router = torch.randn(moe.gate.weight.shape, generator=generator, device="cpu") * router_std
        state[prefix + "gate.weight"] = router.to(device=reference.device, dtype=reference.dtype)
        state[prefix + "experts.gate_up_proj"] = moe.experts.gate_up_proj.detach()
        state[prefix + "experts.down_proj"] = moe.experts.down_proj.detach()
        if model_type == "qwen2":
            shared = moe_model.model.layers[index].mlp.shared_expert
            std = float(getattr(config, "initializer_range", 0.02))
            for part in ("gate_proj", "up_proj"):
                shape = getattr(shared, part).weight.shape
                weight = torch.randn(shape, generator=generator, device="cpu") * std
                state[prefix + f"shared_expert.{part}.weight"] = weight.to(reference.device, reference.dtype)
            state[prefix + "shared_expert.down_proj.weight"] = torch.zeros(
                shared.down_proj.weight.shape, device=reference.device, dtype=reference.dtype)
            state[prefix + "shared_expert_gate.weight"] = torch.zeros(
                1, config.hidden_size, device=reference.device, dtype=reference.dtype)
    if getattr(moe_config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    missing, unexpected = moe_model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(moe_config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"hf.upcycle: {model_name} did not take the weights (missing {missing}, unexpected {unexpected})"
        )
    if tied:
        moe_model.tie_weights()
    _fill_non_persistent(moe_model, model)
    moe_model.train(model.training)
    if check and width == dense_width:
        _check_same_function(model, moe_model)
    return moe_model


def _fill_non_persistent(moe_model: nn.Module, dense: nn.Module) -> None:
    """Buffers outside the state_dict (rotary inv_freq) are left on meta by assign=True: take the
    dense model's (same config fields), else fail."""
    dense_buffers = dict(dense.named_buffers())
    for name, buffer in list(moe_model.named_buffers()):
        if not buffer.is_meta:
            continue
        if name not in dense_buffers or dense_buffers[name].shape != buffer.shape:
            raise ValueError(f"hf.upcycle: no value for the MoE model's buffer {name}")
        owner_name, _, leaf = name.rpartition(".")
        owner = moe_model.get_submodule(owner_name)
        owner._buffers[leaf] = dense_buffers[name].clone()
        for attr in ("original_inv_freq",):  # rotary modules keep a plain-attribute copy too
            if leaf == "inv_freq" and hasattr(owner, attr):
                setattr(owner, attr, dense_buffers[name].clone())


def _check_same_function(dense: nn.Module, moe_model: nn.Module) -> None:
    vocab = int(dense.config.vocab_size)
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator(device="cpu").manual_seed(1))
    ids = ids.to(next(dense.parameters()).device)
    modes = dense.training, moe_model.training
    dense.eval()
    moe_model.eval()
    try:
        want, got = dense(ids).logits.float(), moe_model(ids).logits.float()
    finally:
        dense.train(modes[0])
        moe_model.train(modes[1])
    err = float((got - want).norm() / want.norm().clamp_min(1e-12))
    tol = 1e-4 if want.dtype == torch.float32 and next(dense.parameters()).dtype == torch.float32 else 3e-2
    if not err <= tol:
        raise ValueError(f"hf.upcycle: the {type(moe_model).__name__} differs from the dense model at init "
                         f"(relative logits error {err:.2e}); please report this")
