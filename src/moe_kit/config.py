"""MoEConfig: every knob of an MoE layer in one validated dataclass, plus released-model presets.

No torch.nn here: the config is data. Bad values raise ValueError naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

SCORE_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
BACKENDS = ("auto", "triton", "torch", "loop")
AUX_LOSS_TYPES = ("global", "sequence")


@dataclass
class MoEConfig:
    # shapes
    hidden_size: int  # D, model width
    intermediate_size: int  # I, hidden width of one routed expert
    num_experts: int  # E, routed experts
    top_k: int  # k, experts per token
    # shared experts (always-on SwiGLU beside the routed ones)
    num_shared_experts: int = 0
    shared_intermediate_size: int | None = None  # None: intermediate_size * num_shared_experts
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x @ w) scales the shared output
    # routing scores and weights
    score_func: str = "softmax"  # "softmax" | "sigmoid" | "sqrtsoftplus"
    norm_topk_prob: bool | None = None  # None: True unless score_func == "softmax"
    route_scale: float = 1.0  # multiplies the final routing weights (DeepSeek routed_scaling_factor)
    n_groups: int = 1  # group-limited routing (DeepSeek-V3): experts split in n_groups groups
    topk_groups: int = 1  # ... and a token may only pick experts of its best topk_groups groups
    # aux-loss-free balancing ("noaux_tc")
    expert_bias: bool = False
    bias_update_rate: float = 1e-3
    bias_max: float = 1.0
    # balancing losses
    aux_loss_coef: float = 0.0  # Switch load-balancing loss
    aux_loss_type: str = "global"  # "global" | "sequence" (per sequence, averaged)
    z_loss_coef: float = 0.0  # router z-loss
    # hash routing (DeepSeek-V4 first layers): experts picked by token id
    hash_routing: bool = False  # every layer routes by token id
    n_hash_layers: int = 0  # layers with layer_id < n_hash_layers route by token id
    vocab_size: int | None = None  # required for hash routing
    # capacity
    capacity_factor: float | None = None  # None: dropless
    # numerics and execution
    router_dtype: torch.dtype = torch.float32
    swiglu_limit: float | None = None  # DeepSeek-V4 / gpt-oss clamp: gate <= limit, |up| <= limit
    backend: str = "auto"  # "auto" | "triton" | "torch" | "loop"

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k"):
            _require_int(name, getattr(self, name), minimum=1)
        _require_int("num_shared_experts", self.num_shared_experts, minimum=0)
        _require_int("n_groups", self.n_groups, minimum=1)
        _require_int("topk_groups", self.topk_groups, minimum=1)
        _require_int("n_hash_layers", self.n_hash_layers, minimum=0)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..num_experts={self.num_experts}")
        _require_choice("score_func", self.score_func, SCORE_FUNCS)
        _require_choice("backend", self.backend, BACKENDS)
        _require_choice("aux_loss_type", self.aux_loss_type, AUX_LOSS_TYPES)
        if self.shared_intermediate_size is None:
            self.shared_intermediate_size = self.intermediate_size * self.num_shared_experts
        elif self.num_shared_experts > 0:
            _require_int("shared_intermediate_size", self.shared_intermediate_size, minimum=1)
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ValueError("shared_expert_gate=True needs num_shared_experts >= 1")
        if self.norm_topk_prob is None:
            self.norm_topk_prob = self.score_func != "softmax"
        if self.route_scale <= 0:
            raise ValueError(f"route_scale must be > 0, got {self.route_scale}")
        if self.num_experts % self.n_groups:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by n_groups={self.n_groups}")
        if self.topk_groups > self.n_groups:
            raise ValueError(f"topk_groups={self.topk_groups} must be <= n_groups={self.n_groups}")
        if self.n_groups > 1:
            reachable = self.topk_groups * (self.num_experts // self.n_groups)
            if self.top_k > reachable:
                raise ValueError(
                    f"top_k={self.top_k} is unreachable: topk_groups={self.topk_groups} groups of "
                    f"{self.num_experts // self.n_groups} experts hold only {reachable}"
                )
        for name in ("bias_update_rate", "bias_max", "aux_loss_coef", "z_loss_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if (self.hash_routing or self.n_hash_layers > 0) and self.vocab_size is None:
            raise ValueError("hash routing (hash_routing or n_hash_layers > 0) needs vocab_size")
        if self.vocab_size is not None:
            _require_int("vocab_size", self.vocab_size, minimum=1)
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {self.capacity_factor}")
        if self.router_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"router_dtype must be torch.float32 or torch.float64, got {self.router_dtype}")
        if self.swiglu_limit is not None and not self.swiglu_limit > 0:
            raise ValueError(f"swiglu_limit must be > 0 or None, got {self.swiglu_limit}")

    @property
    def routes_by_hash(self) -> bool:
        return self.hash_routing or self.n_hash_layers > 0

    def uses_hash_gate(self, layer_id: int) -> bool:
        """True when layer `layer_id` routes by token id (HashGate) instead of by score."""
        return self.hash_routing or layer_id < self.n_hash_layers

    def replace(self, **overrides) -> MoEConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **overrides)

    @classmethod
    def preset(cls, name: str, **overrides) -> MoEConfig:
        """The MoE settings of a released model; `overrides` change any field (e.g. smaller sizes)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - fields
        if unknown:
            raise ValueError(f"unknown MoEConfig field(s) in overrides: {sorted(unknown)}")
        settings = dict(PRESETS[name])
        if "intermediate_size" in overrides and "shared_intermediate_size" not in overrides:
            settings.pop("shared_intermediate_size", None)  # follow the new expert width
        return cls(**{**settings, **overrides})


def _require_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _require_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose from {list(choices)}")


# Released MoE settings, from each model's published config.json (cross-checked against the
# transformers config classes). Only the MoE block's settings; attention etc. are not ours.
PRESETS: dict[str, dict] = {
    # mistralai/Mixtral-8x7B-v0.1: softmax over 8 experts, top-2, renormalized (softmax of top-2 logits).
    "mixtral-8x7b": dict(
        hidden_size=4096, intermediate_size=14336, num_experts=8, top_k=2,
        score_func="softmax", norm_topk_prob=True, aux_loss_coef=0.02, vocab_size=32000,
    ),
    # Qwen/Qwen3-30B-A3B: 128 experts, top-8, softmax, norm_topk_prob true, no shared expert.
    "qwen3-30b-a3b": dict(
        hidden_size=2048, intermediate_size=768, num_experts=128, top_k=8,
        score_func="softmax", norm_topk_prob=True, aux_loss_coef=0.001, vocab_size=151936,
    ),
    # deepseek-ai/DeepSeek-V3: sigmoid, noaux_tc bias, 8 groups keep 4, scale 2.5, 1 shared expert,
    # complementary sequence-wise aux loss alpha = 1e-4 (paper), bias speed 1e-3.
    "deepseek-v3": dict(
        hidden_size=7168, intermediate_size=2048, num_experts=256, top_k=8,
        num_shared_experts=1, shared_intermediate_size=2048,
        score_func="sigmoid", norm_topk_prob=True, route_scale=2.5, n_groups=8, topk_groups=4,
        expert_bias=True, bias_update_rate=1e-3, aux_loss_coef=1e-4, aux_loss_type="sequence",
        vocab_size=129280,
    ),
    # deepseek-ai/DeepSeek-V4-Flash: sqrtsoftplus, noaux_tc bias, top-6 of 256, scale 1.5, 1 shared
    # expert, first 3 MoE layers hash-routed, SwiGLU clamped at 10.
    "deepseek-v4": dict(
        hidden_size=4096, intermediate_size=2048, num_experts=256, top_k=6,
        num_shared_experts=1, shared_intermediate_size=2048,
        score_func="sqrtsoftplus", norm_topk_prob=True, route_scale=1.5,
        expert_bias=True, bias_update_rate=1e-3, n_hash_layers=3, vocab_size=129280, swiglu_limit=10.0,
    ),
}
