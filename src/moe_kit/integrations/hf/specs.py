"""The transformers sparse-MoE blocks `convert` knows: one row per model family.

A row says where the block keeps its parts and how its router routes, in MoEConfig terms. The
router, experts and shared-expert weights move by name (`state_keys`), so a new family whose
block looks like these is one more row, not new code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from moe_kit.config import SCORE_FUNCS


@dataclass(frozen=True)
class BlockSpec:
    block: str  # class name of the transformers sparse-MoE block
    routing: Callable[[nn.Module], dict]  # block -> MoEConfig routing fields (softmax/groups/bias/...)
    shared: str | None = None  # attribute holding the shared-expert SwiGLU MLP
    shared_gate: str | None = None  # attribute holding the Qwen2-MoE sigmoid gate nn.Linear(D, 1)
    takes_layer_idx: bool = False  # the block is built as cls(config, layer_idx), else cls(config)


def state_keys(spec: BlockSpec, block: nn.Module) -> dict[str, str]:
    """{transformers block state key: MoELayer state key} for one block of this family."""
    keys = {
        "gate.weight": "gate.weight",
        "experts.gate_up_proj": "experts.gate_up_proj",
        "experts.down_proj": "experts.down_proj",
    }
    if hasattr(block.gate, "e_score_correction_bias"):  # DeepSeek noaux_tc bias: selection only
        keys["gate.e_score_correction_bias"] = "gate.bias"
    if hasattr(block.gate, "tid2eid"):  # DeepSeek-V4 hash layer: token id -> experts table
        keys["gate.tid2eid"] = "gate.tid2eid"
    if spec.shared:
        for part in ("gate_proj", "up_proj", "down_proj"):
            keys[f"{spec.shared}.{part}.weight"] = f"shared_experts.{part}.weight"
    if spec.shared_gate:
        keys[f"{spec.shared_gate}.weight"] = "shared_experts.gate.weight"
    return keys


# ----------------------------------------------------------------------------- routing of each family


def _softmax_topk(block: nn.Module) -> dict:
    """Qwen2-MoE, Qwen3-MoE, OLMoE: softmax over all experts, top-k, renormalized iff norm_topk_prob."""
    return dict(score_func="softmax", norm_topk_prob=bool(block.gate.norm_topk_prob))


def _mixtral(block: nn.Module) -> dict:
    """Mixtral: softmax over all experts, top-k, always renormalized (= softmax of the top-k logits)."""
    if getattr(block, "jitter_noise", 0) > 0:
        raise ValueError(
            f"router_jitter_noise={block.jitter_noise}: MoELayer has no router jitter; set it to 0 before converting"
        )
    return dict(score_func="softmax", norm_topk_prob=True)


def _deepseek_v3(block: nn.Module) -> dict:
    """DeepSeek-V3: sigmoid, e_score_correction_bias steers selection, group-limited (top-2 sum per
    group), renormalized iff norm_topk_prob, times routed_scaling_factor."""
    gate = block.gate
    return dict(
        score_func="sigmoid",
        expert_bias=True,
        n_groups=int(gate.num_group),
        topk_groups=int(gate.topk_group),
        norm_topk_prob=bool(gate.norm_topk_prob),
        route_scale=float(gate.routed_scaling_factor),
    )


def _deepseek_v4(block: nn.Module) -> dict:
    """DeepSeek-V4: config.scoring_func (sqrtsoftplus), always renormalized, times
    routed_scaling_factor; hash layers pick experts by tid2eid[input_ids], the others by score + bias."""
    gate = block.gate
    score_func = block.experts.config.scoring_func
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"DeepSeek-V4 scoring_func {score_func!r} is not one of moe_kit's {SCORE_FUNCS}")
    routing = dict(score_func=score_func, norm_topk_prob=True, route_scale=float(gate.routed_scaling_factor))
    if block.is_hash:
        return dict(routing, hash_routing=True, vocab_size=int(gate.tid2eid.shape[0]))
    return dict(routing, expert_bias=True)


SPECS: dict[str, BlockSpec] = {
    spec.block: spec
    for spec in (
        BlockSpec("Qwen3MoeSparseMoeBlock", _softmax_topk),
        BlockSpec("Qwen2MoeSparseMoeBlock", _softmax_topk, shared="shared_expert", shared_gate="shared_expert_gate"),
        BlockSpec("OlmoeSparseMoeBlock", _softmax_topk),
        BlockSpec("MixtralSparseMoeBlock", _mixtral),
        BlockSpec("DeepseekV3MoE", _deepseek_v3, shared="shared_experts"),
        BlockSpec("DeepseekV4SparseMoeBlock", _deepseek_v4, shared="shared_experts", takes_layer_idx=True),
    )
}


def spec_of(module: nn.Module) -> BlockSpec | None:
    """The row for a transformers block, None for any other module."""
    cls = type(module)
    return SPECS.get(cls.__name__) if cls.__module__.startswith("transformers.") else None
