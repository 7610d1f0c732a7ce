"""Baselines the benchmarks compare moe_kit against, on the same weights as a MoELayer.

Legend: N tokens, D model width, E experts, k experts per token, I expert hidden width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_kit import MoEConfig, MoELayer


class HFEagerMoEBlock(nn.Module):
    """HuggingFace's eager Qwen3-MoE sparse block (transformers 5.x), sharing a MoELayer's weights.

    Router: linear -> softmax -> top-k -> optional renormalization. Experts: one Python iteration
    per hit expert, indexing the 3D weights (gate_up_proj[e], down_proj[e]) and index_add_.
    """

    def __init__(self, layer: MoELayer):
        super().__init__()
        self.layer = layer  # holds the weights; only its parameters are used
        self.top_k = layer.cfg.top_k
        self.num_experts = layer.cfg.num_experts
        self.norm_topk_prob = layer.cfg.norm_topk_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, shape[-1])
        router_logits = F.linear(hidden_states, self.layer.gate.weight)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        if self.norm_topk_prob:
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        return self._experts(hidden_states, selected_experts, routing_weights).reshape(shape)

    def _experts(self, hidden_states, top_k_index, top_k_weights):
        gate_up_proj, down_proj = self.layer.experts.gate_up_proj, self.layer.experts.down_proj
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx]
            gate, up = F.linear(current_state, gate_up_proj[expert_idx]).chunk(2, dim=-1)
            current_hidden_states = self._act(gate, up)
            current_hidden_states = F.linear(current_hidden_states, down_proj[expert_idx])
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
        return final_hidden_states

    def _act(self, gate, up):
        return F.silu(gate) * up


def hf_router_matches(cfg: MoEConfig, layer_id: int = 0) -> bool:
    """True when HF's eager router (softmax -> top-k -> optional renorm) is the config's routing."""
    return (
        cfg.score_func == "softmax" and not cfg.expert_bias and cfg.n_groups == 1 and cfg.route_scale == 1.0
        and not cfg.uses_hash_gate(layer_id) and cfg.capacity_factor is None
    )


class HFEagerLoop(HFEagerMoEBlock):
    """HFEagerMoEBlock for any moe_kit config, on a MoELayer's weights.

    Routing: HF's own eager router when `hf_router_matches` (Mixtral, Qwen3-MoE); otherwise the
    MoELayer's gate output (weights, indices) -- sigmoid / sqrtsoftplus scores, groups, expert bias,
    hash routing and route scaling are not in HF's eager block, so those presets get moe_kit's
    routing and only the experts run HF-style. Experts: HF's per-expert Python loop, with the
    gpt-oss style clamp (gate <= limit, |up| <= limit) when the config has swiglu_limit. Shared
    experts: the layer's own module, added as HF's Qwen2-MoE / DeepSeek blocks do.
    """

    def __init__(self, layer: MoELayer):
        super().__init__(layer)
        cfg = layer.cfg
        if cfg.capacity_factor is not None:
            raise ValueError("HFEagerLoop is dropless; build the layer with capacity_factor=None")
        self.uses_hf_router = hf_router_matches(cfg, layer.layer_id)
        self.swiglu_limit = cfg.swiglu_limit

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.uses_hf_router:
            out = super().forward(hidden_states)
        else:
            shape = hidden_states.shape
            flat = hidden_states.reshape(-1, shape[-1])
            gate = self.layer.gate
            weights, indices = gate(flat, input_ids=input_ids)
            out = self._experts(flat, indices, weights.to(flat.dtype)).reshape(shape)
        if self.layer.shared_experts is not None:
            out = out + self.layer.shared_experts(hidden_states)
        return out

    def _act(self, gate, up):
        if self.swiglu_limit is not None:
            gate = gate.clamp(max=self.swiglu_limit)
            up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        return F.silu(gate) * up


class _HFExpertsView:
    """The attributes transformers' experts forwards read from `self`, over a MoELayer's weights."""

    def __init__(self, layer: MoELayer, act):
        self._layer = layer
        self.num_experts = layer.cfg.num_experts
        self.has_gate, self.has_bias, self.is_transposed = True, False, False
        self.has_post_expert_norm, self._is_expert_parallel = False, False
        self._act = act

    @property
    def gate_up_proj(self):
        return self._layer.experts.gate_up_proj

    @property
    def down_proj(self):
        return self._layer.experts.down_proj

    def _apply_gate(self, gate_up_out):
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self._act(gate, up)


HF_IMPLEMENTATIONS = ("grouped_mm", "batched_mm")


class HFExperts(HFEagerLoop):
    """HFEagerLoop with the per-expert loop replaced by one of transformers' own experts
    implementations from transformers.integrations.moe: `impl` = "grouped_mm" (the transformers
    5.x default) or "batched_mm" (gathers every slot's expert weights: S * 3*I*D floats), or by
    "moe_kit" (moe_kit.ops.moe_ffn, torch backend: an HF model run with experts_implementation="moe_kit").
    Same routing and shared experts as HFEagerLoop, on a MoELayer's weights."""

    def __init__(self, layer: MoELayer, impl: str = "grouped_mm"):
        super().__init__(layer)
        from transformers.integrations import moe as hf_moe

        if impl not in (*HF_IMPLEMENTATIONS, "moe_kit"):
            raise ValueError(f"unknown HF experts implementation {impl!r}; choose from {list(HF_IMPLEMENTATIONS)}")
        self.impl = impl
        if impl == "moe_kit":  # what experts_implementation="moe_kit" (moe_kit.integrations.hf) runs
            self._hf_forward = self._moe_kit_forward
        else:
            self._hf_forward = getattr(hf_moe, f"{impl}_experts_forward")
        self._view = _HFExpertsView(layer, self._act)

    def _experts(self, hidden_states, top_k_index, top_k_weights):
        return self._hf_forward(self._view, hidden_states, top_k_index, top_k_weights)

    def _moe_kit_forward(self, view, hidden_states, top_k_index, top_k_weights):
        from moe_kit.ops import moe_ffn

        return moe_ffn(hidden_states, top_k_weights, top_k_index, view.gate_up_proj, view.down_proj, "torch",
                       swiglu_limit=self.swiglu_limit)


def hf_block_matches(cfg: MoEConfig, layer_id: int = 0) -> bool:
    """True when transformers' own Qwen3-MoE sparse block computes the config's layer: HF's router
    (hf_router_matches), SwiGLU experts without clamp or biases, no shared experts, no router bias."""
    return (
        hf_router_matches(cfg, layer_id) and cfg.num_shared_experts == 0 and cfg.swiglu_limit is None
        and cfg.activation == "silu" and not cfg.router_bias and not cfg.expert_proj_bias
    )


class HFBlock(nn.Module):
    """transformers' own Qwen3MoeSparseMoeBlock -- its router module, and its experts module
    dispatching through @use_experts_implementation to `impl` ("grouped_mm", the transformers 5.x
    default, "batched_mm", "eager", or "moe_kit" once moe_kit.integrations.hf.register() ran) --
    holding a MoELayer's own Parameter objects: exactly the module an HF Qwen3-MoE model runs per
    layer (Mixtral's block computes the same; see hf_block_matches), with its module calls and
    dispatch. forward(x [..., D], input_ids=None) -> [..., D]."""

    def __init__(self, layer: MoELayer, impl: str = "grouped_mm"):
        super().__init__()
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        cfg = layer.cfg
        if not hf_block_matches(cfg, layer.layer_id):
            raise ValueError("HFBlock needs a Qwen3-MoE-shaped config (see hf_block_matches)")
        hf_cfg = Qwen3MoeConfig(hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.intermediate_size,
                                num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
                                norm_topk_prob=bool(cfg.norm_topk_prob), hidden_act="silu")
        hf_cfg._experts_implementation = impl
        with torch.device("meta"):  # no memory: its parameters are the layer's, set right below
            block = Qwen3MoeSparseMoeBlock(hf_cfg)
        block.gate.weight = layer.gate.weight
        block.experts.gate_up_proj = layer.experts.gate_up_proj
        block.experts.down_proj = layer.experts.down_proj
        self.block = block

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        shape = hidden_states.shape
        return self.block(hidden_states.reshape(1, -1, shape[-1])).reshape(shape)


def batched_mm_bytes(cfg: MoEConfig, tokens: int, element_size: int = 4) -> int:
    """Bytes of the per-slot weight copies HF's batched_mm makes (gate_up and down of N*k slots)."""
    return tokens * cfg.top_k * 3 * cfg.intermediate_size * cfg.hidden_size * element_size


class DenseSwiGLU(nn.Module):
    """One SwiGLU MLP with hidden width k*I: the same active FLOPs per token as the MoE layer."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
