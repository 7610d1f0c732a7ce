"""The transformers sparse-MoE blocks `convert` knows, and how their routers route.

Legend: N probe tokens, D model width, E experts, k experts per token.

A block is expressible as a MoELayer when it is `router -> experts (+ shared expert, optionally
behind a sigmoid gate)` and nothing else: `block_layout` reads that structure from the block's
children (router `gate` / `router`, `experts`, `shared_expert(s)` / `shared_mlp`,
`shared_expert_gate`, an expert-bias buffer the block hands to its router, a routed scaling
factor the block applies itself) and names what does not fit. How the router routes is not
written down per family: `probe_routing` runs a CPU copy of the router, with random weights, on
random tokens and keeps the MoEConfig routing (score function, renormalization, scale, groups,
expert bias) that reproduces its weights and experts exactly, refusing when none does. That
needs no weights of the model itself, so meta-device models are converted the same way.

VERIFIED lists the block classes whose forward has been read against this structure (and whose
tiny models match eager in benchmarks/hf_coverage.py); convert refuses the others, naming them.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from moe_kit.config import SCORE_FUNCS, MoEConfig
from moe_kit.gates import TopKGate
from moe_kit.integrations.hf.layout import experts_dims, is_hf_experts

ROUTERS = ("gate", "router")
SHARED = ("shared_expert", "shared_experts", "shared_mlp")
SHARED_GATES = ("shared_expert_gate",)
BLOCK_BIASES = ("e_score_correction_bias", "expert_bias")
SCALE_WORDS = ("scaling_factor", "route_scale", "routed_scale")


@dataclass(frozen=True)
class BlockSpec:
    block: str  # class name of the transformers sparse-MoE block
    router: str = "gate"  # attribute holding the router
    shared: str | None = None  # attribute holding the shared-expert gated MLP
    shared_gate: str | None = None  # attribute holding the Qwen2-MoE sigmoid gate nn.Linear(D, 1)
    block_bias: str | None = None  # expert-bias buffer kept on the block and passed to the router
    block_scale: str | None = None  # attribute of a factor the block multiplies the routed output by
    routing: Callable[[nn.Module], dict] | None = None  # explicit routing (hash layers); None: probed
    unused: tuple[str, ...] = field(default=())  # block tensors its forward ignores (kept, not used)
    jitter: str | None = None  # attribute of the block's input jitter (INPUT_JITTER), None: it has none
    returns_scores: bool = False  # forward returns (output, routing weights [N, k]) (SCORES_OUTPUT), not output


# ----------------------------------------------------------------------------- structure


def block_layout(block: nn.Module) -> BlockSpec:
    """The BlockSpec read from a block's children; ValueError naming what MoELayer cannot hold."""
    name = type(block).__name__
    experts = getattr(block, "experts", None)
    if not is_hf_experts(experts):
        raise ValueError(f"{name} keeps no transformers experts module under .experts")
    routers = [r for r in ROUTERS if isinstance(getattr(block, r, None), nn.Module)]
    if len(routers) != 1:
        raise ValueError(f"{name} has no single router child named {' or '.join(ROUTERS)}")
    shared = [s for s in SHARED if isinstance(getattr(block, s, None), nn.Module)]
    gates = [g for g in SHARED_GATES if isinstance(getattr(block, g, None), nn.Linear)]
    known = {"experts", routers[0], *shared, *gates}
    others = sorted(n for n, child in block.named_children() if n not in known and _has_state(child))
    if others:
        raise ValueError(f"{name} runs {others} around its router and experts; MoELayer has no place for them")
    if len(shared) > 1:
        raise ValueError(f"{name} has several shared-expert modules {shared}")
    direct = [n for n, _ in block.named_parameters(recurse=False)] + [n for n, _ in block.named_buffers(recurse=False)]
    biases = [n for n in direct if n in BLOCK_BIASES]
    if sorted(direct) != sorted(biases) or len(biases) > 1:
        raise ValueError(f"{name} holds tensors {sorted(direct)} of its own that MoELayer has no place for")
    unused = ()
    if biases and getattr(block, "use_expert_bias", True) is False:
        biases, unused = [], tuple(biases)  # LFM2-MoE without expert bias: the buffer exists, unused
    scales = [n for n, v in vars(block).items() if any(w in n for w in SCALE_WORDS) and isinstance(v, (int, float))]
    params = inspect.signature(type(block).forward).parameters
    if len([p for p in params.values() if p.default is inspect.Parameter.empty]) > 2:
        raise ValueError(f"{name}.forward takes more inputs than the hidden states ({list(params)[1:]})")
    return BlockSpec(
        block=name,
        router=routers[0],
        shared=shared[0] if shared else None,
        shared_gate=gates[0] if gates else None,
        block_bias=biases[0] if biases else None,
        block_scale=scales[0] if len(scales) == 1 else None,
        unused=unused,
        jitter="jitter_noise" if name in INPUT_JITTER and hasattr(block, "jitter_noise") else None,
        returns_scores=name in SCORES_OUTPUT,
    )


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def state_keys(spec: BlockSpec, block: nn.Module) -> dict[str, str | None]:
    """{transformers block state key: MoELayer state key (None: kept aside, unused)} for one block."""
    keys = {"experts.gate_up_proj": "experts.gate_up_proj", "experts.down_proj": "experts.down_proj"}
    if getattr(block.experts, "has_bias", False):  # gpt-oss (layouts: layout.ExpertsLayout)
        keys.update({f"experts.{n}": f"experts.{n}" for n in ("gate_up_proj_bias", "down_proj_bias")})
    router = getattr(block, spec.router)
    num_experts, _, hidden = experts_dims(block.experts)
    for key, tensor in router.state_dict(keep_vars=True).items():
        leaf = key.rpartition(".")[2]
        if tuple(tensor.shape) == (num_experts, hidden):
            target = "gate.weight"
        elif leaf in BLOCK_BIASES and tuple(tensor.shape) in ((num_experts,), (1, num_experts)):
            target = "gate.expert_bias"  # ERNIE 4.5 keeps it as [1, E]
        elif leaf == "tid2eid":
            target = "gate.tid2eid"
        elif leaf == "bias" and tuple(tensor.shape) == (num_experts,):
            target = "gate.bias"  # the router linear's own bias (MoEConfig.router_bias)
        else:
            raise ValueError(f"no place in MoELayer for the router's {key} {tuple(tensor.shape)}")
        keys[f"{spec.router}.{key}"] = target
    if spec.block_bias:
        keys[spec.block_bias] = "gate.expert_bias"
    for name in spec.unused:
        keys[name] = None
    if spec.shared:
        for part in ("gate_proj", "up_proj", "down_proj"):
            keys[f"{spec.shared}.{part}.weight"] = f"shared_experts.{part}.weight"
    if spec.shared_gate:
        keys[f"{spec.shared_gate}.weight"] = "shared_experts.gate.weight"
    return keys


# ----------------------------------------------------------------------------- routing


def probe_routing(block: nn.Module, spec: BlockSpec) -> dict:
    """MoEConfig routing fields under which a TopKGate reproduces the block's router exactly.

    The router is copied to the CPU in fp32 with random weights (and a random expert bias / router
    bias); candidates come from its attributes (top_k, groups, scaling factors) and the score
    functions moe_kit has. Train and eval mode must both match (a router with noise in training
    matches neither)."""
    router = getattr(block, spec.router)
    num_experts, _, hidden = experts_dims(block.experts)
    top_k = router_top_k(router, block)
    keys = state_keys(spec, block)
    has_bias = "gate.expert_bias" in keys.values()
    router_bias = "gate.bias" in keys.values()
    probe = _cpu_copy(router)
    generator = torch.Generator(device="cpu").manual_seed(0)
    state = {}
    with torch.no_grad():
        for key, tensor in probe.state_dict(keep_vars=True).items():
            if tensor.is_floating_point():
                scale = 0.1 if tensor.dim() == 1 else 1.0  # biases small, router weights O(1)
                tensor.copy_(torch.randn(tensor.shape, generator=generator, device="cpu") * scale)
                target = keys[f"{spec.router}.{key}"].removeprefix("gate.")
                value = tensor.detach().clone()
                state[target] = value.reshape(-1) if target == "expert_bias" else value
    bias = None
    if spec.block_bias:
        bias = torch.randn(num_experts, generator=generator, device="cpu") * 0.1
        state["expert_bias"] = bias
    # Tokens at three logit scales (std ~0.3, 1, 4 with the unit-variance router): flat score
    # distributions tell group-limit and normalization rules apart, peaked ones tell top-k apart.
    x = torch.randn(3, 64, hidden, generator=generator, device="cpu") / hidden**0.5  # CPU whatever the default
    x = (x * torch.tensor([0.3, 1.0, 4.0], device="cpu").view(3, 1, 1)).reshape(-1, hidden)
    outputs = {mode: _route(probe.train(mode), x, bias, top_k) for mode in (False, True)}
    for routing in _candidates(router, has_bias, num_experts):
        cfg = MoEConfig(hidden_size=hidden, intermediate_size=1, num_experts=num_experts, top_k=top_k,
                        router_bias=router_bias, **routing)
        with torch.device("cpu"):
            gate = TopKGate(cfg)
        gate.load_state_dict(state, strict=False)
        if all(_same_routing(gate.train(mode), x, *outputs[mode]) for mode in outputs):
            return routing
    raise ValueError(
        f"its router {type(router).__name__} routes in a way MoEConfig cannot express (tried score functions "
        f"{SCORE_FUNCS}, with and without renormalization, scaling and group limits)"
    )


def router_logits_dtype(block: nn.Module, spec: BlockSpec) -> torch.dtype | None:
    """The dtype of the logits the block's router returns for bf16 states when it is not theirs
    (DeepSeek-V2/V3 routers compute in fp32), None when it follows the states' dtype (Mixtral,
    Qwen, OLMoE: the model dtype). Probed on a bf16 CPU copy of the router; None when the router
    cannot run alone (a hash router needs token ids)."""
    router = getattr(block, spec.router)
    num_experts, _, hidden = experts_dims(block.experts)
    probe = _cpu_copy(router).to(torch.bfloat16)
    x = torch.zeros(2, hidden, dtype=torch.bfloat16, device="cpu")
    args = (torch.zeros(num_experts, device="cpu"),) if spec.block_bias else ()
    with torch.no_grad():
        try:
            out = probe(x, *args)
        except Exception:  # noqa: BLE001 - some routers take [B, S, D] only; others cannot run alone
            try:
                out = probe(x.unsqueeze(0), *args)
            except Exception:  # noqa: BLE001
                return None
    logits = out[0] if isinstance(out, tuple) else None
    if not isinstance(logits, torch.Tensor) or logits.dtype == torch.bfloat16:
        return None
    return logits.dtype


def router_top_k(router: nn.Module, block: nn.Module) -> int:
    for owner in (router, block):
        for attr in ("top_k", "topk", "num_experts_per_tok", "moe_topk"):
            value = getattr(owner, attr, None)
            if isinstance(value, int):
                return value
    raise ValueError(f"cannot find top_k on {type(router).__name__}")


def _cpu_copy(router: nn.Module) -> nn.Module:
    """A float32 CPU copy of the router (its tensors' values are overwritten by the probe)."""
    meta = any(t.is_meta for t in list(router.parameters()) + list(router.buffers()))
    if meta:
        probe = copy.deepcopy(router).to_empty(device="cpu")
    else:
        probe = copy.deepcopy(router).cpu()
    return probe.float()


def _route(router: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, top_k: int):
    """(weights [N, k], indices [N, k]) of a router call, sorted by expert id per token."""
    args = () if bias is None else (bias,)
    with torch.no_grad():
        try:
            out = router(x, *args)
        except Exception:  # noqa: BLE001 - some routers take [B, S, D] only
            out = router(x.unsqueeze(0), *args)
    weights, indices = (out[1], out[2]) if isinstance(out, tuple) and len(out) == 3 else (None, None)
    ok = (
        isinstance(weights, torch.Tensor) and weights.is_floating_point() and weights.shape == (len(x), top_k)
        and isinstance(indices, torch.Tensor) and not indices.is_floating_point() and indices.shape == weights.shape
    )
    if not ok:
        raise ValueError(
            f"its router {type(router).__name__} does not return (logits, weights [N, k], indices [N, k])"
        )
    return _sorted(weights.float(), indices.long())


def _sorted(weights: torch.Tensor, indices: torch.Tensor):
    order = indices.argsort(dim=-1)
    return weights.gather(1, order), indices.gather(1, order)


def _same_routing(gate: TopKGate, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> bool:
    with torch.no_grad():
        got_weights, got_indices = _sorted(*gate(x))
    return torch.equal(got_indices, indices) and torch.allclose(got_weights, weights, rtol=1e-5, atol=1e-6)


def _candidates(router: nn.Module, has_bias: bool, num_experts: int):
    """Routing dicts to try, most specific first."""
    scales = [1.0]
    for owner in (router,):  # a factor on the block itself is spec.block_scale, applied on top
        for attr, value in vars(owner).items():
            if any(w in attr for w in SCALE_WORDS) and isinstance(value, (int, float)) and value not in scales:
                scales.insert(0, float(value))
    groups = [(1, 1)]
    n_group = next((getattr(router, a) for a in ("num_group", "n_group", "n_groups") if hasattr(router, a)), None)
    topk_group = getattr(router, "topk_group", None)
    if isinstance(n_group, int) and isinstance(topk_group, int) and n_group > 1 and num_experts % n_group == 0:
        groups.insert(0, (n_group, topk_group))
    for score_func in SCORE_FUNCS:
        for norm in (True, False):
            for scale in scales:
                for n_groups, topk_groups in groups:
                    yield dict(score_func=score_func, norm_topk_prob=norm, route_scale=scale, expert_bias=has_bias,
                               n_groups=n_groups, topk_groups=topk_groups)


# ----------------------------------------------------------------------------- explicit rows


def _deepseek_v4(block: nn.Module) -> dict | None:
    """DeepSeek-V4 hash layers pick experts by tid2eid[input_ids] (probed routing for the others)."""
    if not block.is_hash:
        return None
    gate = block.gate
    score_func = block.experts.config.scoring_func
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"DeepSeek-V4 scoring_func {score_func!r} is not one of moe_kit's {SCORE_FUNCS}")
    return dict(score_func=score_func, norm_topk_prob=True, route_scale=float(gate.routed_scaling_factor),
                hash_routing=True, vocab_size=int(gate.tid2eid.shape[0]))


# Blocks whose forward starts, in training, with Mixtral's input jitter (config.router_jitter_noise):
#     hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
# so the router and the experts both see the jittered states; the converted layer draws the same noise
# (ConvertedMoELayer.block_jitter_noise). Read in transformers 5.24's modeling files.
INPUT_JITTER = ("MixtralSparseMoeBlock", "MiniMaxSparseMoeBlock", "MiniMaxM2SparseMoeBlock")
# Blocks whose forward returns `(hidden_states, router_scores)` (the decoder layer unpacks and drops the
# scores); the converted layer returns the same pair (ConvertedMoELayer.returns_scores). Read in 5.24.
SCORES_OUTPUT = ("GptOssMLP", "OpenAIPrivacyFilterMLP")


def check_block(block: nn.Module, spec: BlockSpec | None = None) -> None:
    """Block settings that change the function in ways MoELayer does not have."""
    for attr in ("jitter_noise", "input_jitter_noise"):
        value = getattr(block, attr, 0) or 0
        if value > 0 and (spec is None or attr != spec.jitter):
            raise ValueError(
                f"{attr}={value} (router_jitter_noise): moe_kit reproduces the input jitter of {INPUT_JITTER} "
                f"only, not {type(block).__name__}'s; set it to 0 before converting"
            )
    strategy = getattr(block, "shared_expert_combination_strategy", "sum")
    if strategy != "sum":
        raise ValueError(f"shared_expert_combination_strategy={strategy!r}: MoELayer adds the shared expert")


# Block classes whose forward is `router -> experts (+ shared expert)` as block_layout reads it, and
# whose conversion benchmarks/hf_coverage.py measured equal to eager (transformers 5.24). Others that
# look the same but could not be measured (their config does not build from the shrunk sizes:
# Qwen3-Omni, GLM-5-Next) are refused until they are.
VERIFIED = (
    # Qwen-shaped: softmax top-k router, optional shared expert behind a sigmoid gate
    "Qwen3MoeSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3NextSparseMoeBlock", "Qwen3_5MoeSparseMoeBlock",
    "Qwen3VLMoeTextSparseMoeBlock", "Qwen4ExpTextSparseMoeBlock", "OlmoeSparseMoeBlock", "FlexOlmoSparseMoeBlock",
    "MellumSparseMoeBlock", "FlintSparseMoeBlock", "LaraMiniSparseMoeBlock",
    # Mixtral-shaped: softmax of the top-k logits, jitter on the block
    "MixtralSparseMoeBlock", "MiniMaxSparseMoeBlock", "JambaSparseMoeBlock",
    "GraniteMoeMoE", "GraniteMoeSWAMoE", "GraniteMoeHybridMoE", "GraniteMoeSharedMoE",
    "HunYuanMoEV1Moe", "Cohere2MoeSparseMoeBlock",
    "AriaTextMoELayer",  # transposed experts (layout.ExpertsLayout), shared experts beside them
    # DeepSeek-shaped: sigmoid / softmax scores, expert bias, groups, routed scaling, shared experts
    "DeepseekV2Moe", "DeepseekV3MoE", "DeepseekV32MoE", "DeepseekV4SparseMoeBlock", "DeepseekOcr2TextMoe",
    "Dots1MoE", "Dots3NoteTextMoE", "Glm4MoeMoE", "Glm4MoeLiteMoE", "Glm4vMoeTextMoE",
    "GlmMoeDsaMoE", "ExaoneMoeSparseMoEBlock", "KimiLinearMoE",
    "AXK2MoE", "SolarOpenMoE", "UnlimitedOcrTextMoe", "BeamMoE",
    "LagunaSparseMoeBlock", "MiMoV2FlashMoE", "Ernie4_5_MoeSparseMoeBlock",
    # expert bias on the block, handed to the router
    "HYV3MoE", "MiniMaxM2SparseMoeBlock", "Lfm2MoeSparseMoeBlock", "AfmoeSparseMoeBlock",
    # gpt-oss: router linear with bias, softmax of the top-k logits; experts transposed, gate/up interleaved,
    # biased, (up + 1) * gate * sigmoid(1.702 * gate) clamped (layout.ExpertsLayout, activation swiglu_oai)
    "GptOssMLP",
)
EXPLICIT = {"DeepseekV4SparseMoeBlock": _deepseek_v4}


def is_moe_block(module: nn.Module) -> bool:
    """True for a transformers module holding a transformers experts module as `.experts`."""
    return type(module).__module__.startswith("transformers.") and is_hf_experts(getattr(module, "experts", None))


def spec_of(module: nn.Module, verified_only: bool = True) -> BlockSpec | None:
    """The BlockSpec of a transformers sparse-MoE block (read by block_layout), None for any other
    module; ValueError for a MoE block it cannot express or one not in VERIFIED."""
    if not is_moe_block(module):
        return None
    spec = block_layout(module)
    if verified_only and spec.block not in VERIFIED:
        raise ValueError(f"{spec.block} is not among the blocks convert has checked (specs.VERIFIED)")
    explicit = EXPLICIT.get(spec.block)
    return spec if explicit is None else replace(spec, routing=explicit)


SPECS = VERIFIED  # kept for `from moe_kit.integrations.hf import SPECS`: the block classes convert knows
