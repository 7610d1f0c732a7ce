"""MoEConfig: every knob of an MoE layer in one validated dataclass, plus released-model presets.

No torch.nn here: the config is data. Bad values raise ValueError naming the field. Values are
normalized on construction: numpy integers become int, numpy floats become float, numpy bools
become bool, list-form aux losses become tuples.

Derived defaults: `norm_topk_prob=None` and `shared_intermediate_size=None` are filled from other
fields. The config remembers which fields it derived, so `replace()` derives them again from the
new values, and `to_dict()` writes them as None so that `from_dict()` rebuilds the same config.

Layers keep `cfg.frozen_copy()`: mutating the config a layer was built from cannot change (or
break) the layer, and assigning to a field of the frozen copy raises FrozenInstanceError.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

SCORE_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
BACKENDS = ("auto", "triton", "torch", "loop")
AUX_LOSS_TYPES = ("global", "sequence", "global_batch")
LOSS_MODES = ("attach", "return")
SEQUENCE_AUX_NORMS = ("per_sequence", "megatron")
DROP_POLICIES = ("probs", "position")
ROUTINGS = ("token_choice", "expert_choice", "sinkhorn")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_oai")  # computed in moe_kit.activations
ROUTER_DTYPES = (torch.float32, torch.float64)

# Checks that concern one routing scheme live with that scheme (moe_kit.gates.<scheme>), which
# registers them here when it is imported (`import moe_kit` imports every gate): scheme -> checks.
_SCHEME_CHECKS: dict[str, list] = {}


def register_scheme_check(scheme: str, check) -> None:
    """Run `check(cfg)` (raising ValueError naming the field) on every config with routing == scheme
    ("hash": every config that routes some layer by token id)."""
    checks = _SCHEME_CHECKS.setdefault(scheme, [])
    if check not in checks:
        checks.append(check)


_INT_FIELDS = (
    "hidden_size", "intermediate_size", "num_experts", "top_k", "num_shared_experts",
    "n_groups", "topk_groups", "n_hash_layers",
)
_BOOL_FIELDS = (
    "shared_expert_gate", "router_bias", "expert_bias", "hash_routing", "pad_to_capacity", "expert_proj_bias",
)
_NONNEGATIVE_FLOAT_FIELDS = ("bias_update_rate", "bias_max", "z_loss_coef")


@dataclass
class MoEConfig:
    # shapes
    hidden_size: int  # D, model width
    intermediate_size: int  # I, hidden width of one routed expert
    num_experts: int  # E, routed experts
    top_k: int  # k, experts per token (token choice)
    # shared experts (always-on gated MLP beside the routed ones)
    num_shared_experts: int = 0
    shared_intermediate_size: int | None = None  # None: intermediate_size * num_shared_experts
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x @ w) scales the shared output
    # routing scheme
    routing: str = "token_choice"  # "token_choice" | "expert_choice" (needs capacity_factor) | "sinkhorn"
    # routing scores and weights
    score_func: str = "softmax"  # "softmax" | "sigmoid" | "sqrtsoftplus"
    norm_topk_prob: bool | None = None  # None: True unless score_func == "softmax". At k = 1 True makes every
    # weight route_scale (DeepSeek / HF renormalize at k = 1; Megatron does not: set False to follow it)
    route_scale: float = 1.0  # multiplies the final routing weights (DeepSeek routed_scaling_factor)
    n_groups: int = 1  # group-limited routing (DeepSeek-V3): experts split in n_groups groups
    topk_groups: int = 1  # ... and a token may only pick experts of its best topk_groups groups
    router_bias: bool = False  # trainable bias in the router linear, gate.bias (gpt-oss, Megatron add_bias_linear)
    jitter_eps: float = 0.0  # training only: router input *= U(1 - eps, 1 + eps) (Switch); 0 = off
    # aux-loss-free balancing ("noaux_tc"): gate.expert_bias steers selection only
    expert_bias: bool = False
    bias_update_rate: float = 1e-3
    bias_max: float = 1.0
    # balancing losses
    aux_loss_coef: float | tuple[float, ...] = 0.0  # Switch load-balancing loss (a tuple in the list form)
    aux_loss_type: str | tuple[str, ...] = "global"  # "global" (per micro-batch) | "sequence" (per sequence,
    # averaged) | "global_batch" (counts over the step's micro-batches and DP ranks, Megatron global_aux_loss);
    # Megatron's list form: a tuple of distinct types, aux_loss_coef then a tuple of their coefficients
    sequence_aux_norm: str = "per_sequence"  # aux_loss_type "sequence" with a token_mask: "per_sequence" divides
    # each sequence's f and P by its own real length (DeepSeek-V3's definition) | "megatron" by the mean real
    # length of the batch's sequences (Megatron-Core's seq_aux_loss); equal without padding
    z_loss_coef: float = 0.0  # router z-loss
    loss_mode: str = "attach"  # "attach" (losses reach the backward by themselves) | "return" (balancing_loss())
    # hash routing (DeepSeek-V4 first layers): experts picked by token id
    hash_routing: bool = False  # every layer routes by token id
    n_hash_layers: int = 0  # layers with layer_id < n_hash_layers route by token id
    vocab_size: int | None = None  # required for hash routing
    # capacity
    capacity_factor: float | None = None  # None: dropless; else ceil(cf * N * k / E) rows per expert
    # (expert_choice: each expert takes C = ceil(cf * N / E) tokens)
    drop_policy: str = "probs"  # over capacity, keep the highest weights ("probs") | earliest tokens ("position")
    pad_to_capacity: bool = False  # every expert gets exactly `capacity` rows (static shapes; needs capacity_factor)
    # expert block
    activation: str = "silu"  # gated activation of every expert: "silu" (SwiGLU) | "gelu" | "gelu_tanh" | "relu"
    # | "swiglu_oai" (gpt-oss: (up + 1) * gate * sigmoid(1.702 * gate))
    expert_proj_bias: bool = False  # routed experts' projection biases, experts.gate_up_proj_bias [E, 2I] and
    # experts.down_proj_bias [E, D] (gpt-oss); shared experts stay bias-free. Not the noaux_tc `expert_bias`
    # numerics and execution
    router_dtype: torch.dtype = torch.float32
    swiglu_limit: float | None = None  # DeepSeek-V4 / gpt-oss clamp: gate <= limit, |up| <= limit
    backend: str = "auto"  # "auto" | "triton" | "torch" | "loop"
    deterministic: bool | None = None  # how each token's k expert outputs are summed (moe_ffn's argument): None =
    # a fixed order on CUDA, index_add on CPU (both reproducible); True = a fixed order; False = atomic adds
    # (Triton: fused into GEMM 2, no [N*k, D] buffer; last-bit run-to-run differences on GPUs)

    def __post_init__(self):
        # types first (normalized to plain Python values), then ranges, then relations between fields
        for name in _INT_FIELDS:
            setattr(self, name, _as_int(name, getattr(self, name)))
        for name in _BOOL_FIELDS:
            setattr(self, name, _as_bool(name, getattr(self, name)))
        for name in _NONNEGATIVE_FLOAT_FIELDS:
            setattr(self, name, _as_float(name, getattr(self, name), minimum=0.0))
        self.route_scale = _as_float("route_scale", self.route_scale, minimum=0.0, exclusive=True)
        self.jitter_eps = _as_float("jitter_eps", self.jitter_eps, minimum=0.0)
        if not self.jitter_eps < 1:
            raise ValueError(f"jitter_eps must be in [0, 1), got {self.jitter_eps}")
        if self.capacity_factor is not None:
            self.capacity_factor = _as_float("capacity_factor", self.capacity_factor, minimum=0.0, exclusive=True)
        if self.swiglu_limit is not None:
            self.swiglu_limit = _as_float("swiglu_limit", self.swiglu_limit, minimum=0.0, exclusive=True)
        if self.vocab_size is not None:
            self.vocab_size = _as_int("vocab_size", self.vocab_size, minimum=1)
        self.router_dtype = _as_router_dtype(self.router_dtype)
        self._check_aux_losses()
        for name, choices in (
            ("score_func", SCORE_FUNCS), ("backend", BACKENDS), ("loss_mode", LOSS_MODES),
            ("sequence_aux_norm", SEQUENCE_AUX_NORMS),
            ("drop_policy", DROP_POLICIES), ("routing", ROUTINGS), ("activation", ACTIVATIONS),
        ):
            _require_choice(name, getattr(self, name), choices)

        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k", "n_groups", "topk_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_shared_experts", "n_hash_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..num_experts={self.num_experts}")

        derived = {}  # fields filled from others; replace() and to_dict() treat them as "left None"
        if self.shared_intermediate_size is None:
            self.shared_intermediate_size = self.intermediate_size * self.num_shared_experts
            derived["shared_intermediate_size"] = self.shared_intermediate_size
        else:
            minimum = 1 if self.num_shared_experts > 0 else 0
            self.shared_intermediate_size = _as_int("shared_intermediate_size", self.shared_intermediate_size, minimum)
        if self.norm_topk_prob is None:
            self.norm_topk_prob = self.score_func != "softmax"
            derived["norm_topk_prob"] = self.norm_topk_prob
        else:
            self.norm_topk_prob = _as_bool("norm_topk_prob", self.norm_topk_prob)
        self._derived = derived
        if self.deterministic is not None:
            self.deterministic = _as_bool("deterministic", self.deterministic)

        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ValueError("shared_expert_gate=True needs num_shared_experts >= 1")
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
        if self.pad_to_capacity and self.capacity_factor is None:
            raise ValueError("pad_to_capacity=True needs a capacity_factor (None is dropless: no capacity to pad to)")
        for scheme in (self.routing, "hash") if self.routes_by_hash else (self.routing,):
            for check in _SCHEME_CHECKS.get(scheme, ()):  # each routing scheme checks its own fields
                check(self)

    def _check_aux_losses(self):
        kind, coef = self.aux_loss_type, self.aux_loss_coef
        if isinstance(kind, (list, tuple)):
            kind = tuple(kind)
            if not kind:
                raise ValueError("aux_loss_type list must name at least one type")
            for item in kind:
                _require_choice("aux_loss_type", item, AUX_LOSS_TYPES)
            if len(set(kind)) != len(kind):
                raise ValueError(f"aux_loss_type list has repeated types: {list(kind)}")
            if not isinstance(coef, (list, tuple)) or len(coef) != len(kind):
                raise ValueError(
                    f"aux_loss_coef must be a list of {len(kind)} coefficients, one per aux_loss_type "
                    f"{list(kind)}, got {coef!r}"
                )
            coef = tuple(_as_float("aux_loss_coef", c, minimum=0.0) for c in coef)
        else:
            _require_choice("aux_loss_type", kind, AUX_LOSS_TYPES)
            if isinstance(coef, (list, tuple)):
                raise ValueError(
                    f"aux_loss_coef is a list ({coef!r}) but aux_loss_type is the single type {kind!r}; "
                    "give aux_loss_type as a list of the same length"
                )
            coef = _as_float("aux_loss_coef", coef, minimum=0.0)
        self.aux_loss_type, self.aux_loss_coef = kind, coef

    # ------------------------------------------------------------------------- queries

    @property
    def routes_by_hash(self) -> bool:
        return self.hash_routing or self.n_hash_layers > 0

    def uses_hash_gate(self, layer_id: int) -> bool:
        """True when layer `layer_id` routes by token id (HashGate) instead of by score."""
        return self.hash_routing or layer_id < self.n_hash_layers

    @property
    def aux_losses(self) -> tuple[tuple[str, float], ...]:
        """The Switch aux losses to compute, as (aux_loss_type, coef) pairs with coef > 0.

        The single form gives one pair (none when aux_loss_coef == 0); the list form one per type.
        """
        if isinstance(self.aux_loss_type, tuple):
            pairs = zip(self.aux_loss_type, self.aux_loss_coef, strict=True)
        else:
            pairs = ((self.aux_loss_type, self.aux_loss_coef),)
        return tuple((kind, coef) for kind, coef in pairs if coef > 0)

    @property
    def is_frozen(self) -> bool:
        """True for a `frozen_copy()`: its fields cannot be assigned."""
        return self.__dict__.get("_frozen", False)

    # ------------------------------------------------------------------------- copies

    def replace(self, **overrides) -> MoEConfig:
        """A copy with some fields changed (validated again, never frozen).

        Defaults derived from other fields (`norm_topk_prob`, `shared_intermediate_size` left None)
        are derived again from the new values unless given in `overrides`.
        """
        _reject_unknown(overrides, "replace()")
        return type(self)(**{**self._spec(), **overrides})

    def frozen_copy(self) -> MoEConfig:
        """A validated copy whose fields cannot be assigned (dataclasses.FrozenInstanceError).

        Layers keep one, so changing the config they were built from cannot change them.
        Equality and `to_dict()` ignore the frozen flag; `replace()` returns an ordinary config.
        """
        copy = self.replace()
        object.__setattr__(copy, "_frozen", True)
        return copy

    def __setattr__(self, name, value):
        if self.__dict__.get("_frozen", False):
            raise dataclasses.FrozenInstanceError(
                f"cannot assign to {name!r}: this MoEConfig is frozen (a built layer holds it); "
                f"use cfg.replace({name}=...) to get a changed config and build a new layer from it"
            )
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        if self.__dict__.get("_frozen", False):
            raise dataclasses.FrozenInstanceError(f"cannot delete {name!r}: this MoEConfig is frozen")
        object.__delattr__(self, name)

    def _spec(self) -> dict[str, Any]:
        """The field values that rebuild this config, derived defaults (still unchanged) as None."""
        spec = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in self.__dict__.get("_derived", {}).items():
            if type(spec[name]) is type(value) and spec[name] == value:
                spec[name] = None
        return spec

    # ------------------------------------------------------------------------- serialization

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of every field: `from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg`.

        router_dtype is written as a string ("float32"), tuples as lists, and defaults the config
        derived itself (norm_topk_prob, shared_intermediate_size) as None, so the rebuilt config
        derives them the same way in a later `replace()`.
        """
        spec = self._spec()
        spec["router_dtype"] = str(self.router_dtype).removeprefix("torch.")
        return {name: list(value) if isinstance(value, tuple) else value for name, value in spec.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MoEConfig:
        """Rebuild a config from `to_dict()` output (or any mapping of field names); unknown keys raise."""
        if not isinstance(d, Mapping):
            raise ValueError(f"MoEConfig.from_dict needs a mapping of field names, got {type(d).__name__}")
        _reject_unknown(d, "from_dict()")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in d]
        if missing:
            raise ValueError(f"MoEConfig.from_dict: missing required field(s) {missing}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> MoEConfig:
        """The MoE settings of a released model; `overrides` change any field (e.g. smaller sizes)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        _reject_unknown(overrides, "preset overrides")
        settings = dict(PRESETS[name])
        if "intermediate_size" in overrides and "shared_intermediate_size" not in overrides:
            settings.pop("shared_intermediate_size", None)  # follow the new expert width
        return cls(**{**settings, **overrides})


def _reject_unknown(names, where):
    unknown = set(names) - {f.name for f in dataclasses.fields(MoEConfig)}
    if unknown:
        raise ValueError(f"unknown MoEConfig field(s) in {where}: {sorted(map(str, unknown))}")


def _as_int(name, value, minimum=None) -> int:
    """A plain int from an int or numpy integer; bools, floats and the rest raise."""
    if isinstance(value, (bool, np.bool_, float, np.floating)):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _as_float(name, value, minimum=None, exclusive=False) -> float:
    """A finite plain float from a real number (int, float, numpy); bools, None, strings, nan, inf raise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise ValueError(f"{name} must be {'>' if exclusive else '>='} {minimum:g}, got {value}")
    return value


def _as_bool(name, value) -> bool:
    """A plain bool from a bool or numpy bool; truthy strings and ints raise."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _as_router_dtype(value) -> torch.dtype:
    """torch.float32 / torch.float64, or their names ("float32", "torch.float64") as to_dict writes them."""
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), value)
    if not isinstance(value, torch.dtype) or value not in ROUTER_DTYPES:
        raise ValueError(f"router_dtype must be torch.float32 or torch.float64, got {value!r}")
    return value


def _require_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose from {list(choices)}")


# Released MoE settings, from each model's published config.json (cross-checked against the
# transformers config classes). Only the MoE block's settings; attention etc. are not ours.
# aux_loss_coef is the released router_aux_loss_coef / aux_loss_alpha as written; transformers'
# load_balancing_loss_func is top_k times moe_kit's per-layer value and pools all L layers into one
# loss, so the router gradients of an HF run with coefficient c need aux_loss_coef = c * top_k / L here.
PRESETS: dict[str, dict] = {
    # google/switch-base-128: softmax top-1 (weight = the top-1 probability), capacity by position,
    # jitter 0.01, aux and z losses 1e-3; train capacity factor 1.25 (paper; the HF config gives a fixed
    # expert_capacity=64). Not exact: Switch's expert is a non-gated ReLU MLP (wi, wo), moe_kit's is gated.
    "switch-base-128": dict(
        hidden_size=768, intermediate_size=3072, num_experts=128, top_k=1,
        score_func="softmax", norm_topk_prob=False, jitter_eps=0.01, capacity_factor=1.25,
        drop_policy="position", aux_loss_coef=1e-3, z_loss_coef=1e-3, activation="relu", vocab_size=32128,
    ),
    # mistralai/Mixtral-8x7B-v0.1: softmax over 8 experts, top-2, renormalized (softmax of top-2 logits).
    "mixtral-8x7b": dict(
        hidden_size=4096, intermediate_size=14336, num_experts=8, top_k=2,
        score_func="softmax", norm_topk_prob=True, aux_loss_coef=0.02, vocab_size=32000,
    ),
    # mistralai/Mixtral-8x22B-v0.1: the 8x7B block, wider.
    "mixtral-8x22b": dict(
        hidden_size=6144, intermediate_size=16384, num_experts=8, top_k=2,
        score_func="softmax", norm_topk_prob=True, aux_loss_coef=1e-3, vocab_size=32000,
    ),
    # Qwen/Qwen1.5-MoE-A2.7B: 60 experts, top-4, softmax not renormalized; "4 shared experts" held as one
    # gated MLP of 4 * 1408 = 5632 (shared_expert_intermediate_size) scaled by sigmoid(x @ w).
    "qwen1.5-moe-a2.7b": dict(
        hidden_size=2048, intermediate_size=1408, num_experts=60, top_k=4,
        num_shared_experts=4, shared_expert_gate=True,
        score_func="softmax", norm_topk_prob=False, aux_loss_coef=1e-3, vocab_size=151936,
    ),
    # Qwen/Qwen3-30B-A3B: 128 experts, top-8, softmax, norm_topk_prob true, no shared expert.
    "qwen3-30b-a3b": dict(
        hidden_size=2048, intermediate_size=768, num_experts=128, top_k=8,
        score_func="softmax", norm_topk_prob=True, aux_loss_coef=0.001, vocab_size=151936,
    ),
    # Qwen/Qwen3-235B-A22B: the 30B-A3B block, wider.
    "qwen3-235b-a22b": dict(
        hidden_size=4096, intermediate_size=1536, num_experts=128, top_k=8,
        score_func="softmax", norm_topk_prob=True, aux_loss_coef=1e-3, vocab_size=151936,
    ),
    # deepseek-ai/DeepSeek-V2: softmax, "group_limited_greedy" (group score = max, no bias: moe_kit's
    # rule without expert_bias), 8 groups keep 3, top-6 of 160 not renormalized, scale 16, 2 shared
    # experts, sequence aux alpha 0.003. Not exact: its aux loss counts the group-limited choice, and the
    # paper's device- and communication-balance losses have no field here.
    "deepseek-v2": dict(
        hidden_size=5120, intermediate_size=1536, num_experts=160, top_k=6, num_shared_experts=2,
        score_func="softmax", norm_topk_prob=False, route_scale=16.0, n_groups=8, topk_groups=3,
        aux_loss_coef=3e-3, aux_loss_type="sequence", vocab_size=102400,
    ),
    # deepseek-ai/DeepSeek-V3: sigmoid, noaux_tc bias, 8 groups keep 4, scale 2.5, 1 shared expert,
    # complementary sequence-wise aux loss alpha = 1e-4 (paper), bias speed 1e-3.
    "deepseek-v3": dict(
        hidden_size=7168, intermediate_size=2048, num_experts=256, top_k=8, num_shared_experts=1,
        score_func="sigmoid", norm_topk_prob=True, route_scale=2.5, n_groups=8, topk_groups=4,
        expert_bias=True, bias_update_rate=1e-3, aux_loss_coef=1e-4, aux_loss_type="sequence",
        vocab_size=129280,
    ),
    # deepseek-ai/DeepSeek-V4-Flash: sqrtsoftplus, noaux_tc bias, top-6 of 256, scale 1.5, 1 shared
    # expert, first 3 MoE layers hash-routed, SwiGLU clamped at 10.
    "deepseek-v4-flash": dict(
        hidden_size=4096, intermediate_size=2048, num_experts=256, top_k=6, num_shared_experts=1,
        score_func="sqrtsoftplus", norm_topk_prob=True, route_scale=1.5,
        expert_bias=True, bias_update_rate=1e-3, n_hash_layers=3, vocab_size=129280, swiglu_limit=10.0,
    ),
    # deepseek-ai/DeepSeek-V4-Pro: the V4-Flash block with 384 experts of width 3072, hidden 7168, scale 2.5.
    "deepseek-v4-pro": dict(
        hidden_size=7168, intermediate_size=3072, num_experts=384, top_k=6, num_shared_experts=1,
        score_func="sqrtsoftplus", norm_topk_prob=True, route_scale=2.5,
        expert_bias=True, bias_update_rate=1e-3, n_hash_layers=3, vocab_size=129280, swiglu_limit=10.0,
    ),
    # allenai/OLMoE-1B-7B-0924: 64 experts, top-8, softmax not renormalized, aux 0.01, z-loss 1e-3 (paper).
    "olmoe-1b-7b": dict(
        hidden_size=2048, intermediate_size=1024, num_experts=64, top_k=8,
        score_func="softmax", norm_topk_prob=False, aux_loss_coef=0.01, z_loss_coef=1e-3, vocab_size=50304,
    ),
    # meta-llama/Llama-4-Scout-17B-16E: top-1 of 16, weight sigmoid(top logit), one shared expert.
    # Not exact: Llama 4 multiplies the expert's input by the weight (expert(w * x)), not its output.
    "llama4-scout": dict(
        hidden_size=5120, intermediate_size=8192, num_experts=16, top_k=1, num_shared_experts=1,
        score_func="sigmoid", norm_topk_prob=False, aux_loss_coef=1e-3, vocab_size=202048,
    ),
    # openai/gpt-oss-20b: router linear with bias, softmax over the top-4 logits (= renormalized); experts
    # (up + 1) * gate * sigmoid(1.702 * gate) clamped at 7, with biases on both projections. (transformers
    # stores gate/up interleaved and transposed; hf.convert changes the layout, the function is the same.)
    "gpt-oss-20b": dict(
        hidden_size=2880, intermediate_size=2880, num_experts=32, top_k=4, router_bias=True,
        score_func="softmax", norm_topk_prob=True, swiglu_limit=7.0, activation="swiglu_oai", expert_proj_bias=True,
        aux_loss_coef=0.9, vocab_size=201088,
    ),
}
PRESETS["deepseek-v4"] = PRESETS["deepseek-v4-flash"]  # the name before V4-Pro was released
