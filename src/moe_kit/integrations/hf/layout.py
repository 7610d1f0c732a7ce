"""Which transformers experts modules moe_kit can run, and how their tensors map to moe_kit's.

Legend: E experts, D model width, I expert hidden width.

moe_kit's experts are `down @ act(gate, up) (+ biases)` with gate_up_proj [E, 2I, D] (gate rows
first, then up rows), down_proj [E, D, I], optional gate_up_proj_bias [E, 2I] (same order) and
down_proj_bias [E, D], and a gated activation from moe_kit.activations (silu, gelu, gelu_tanh,
relu: act(gate) * up; swiglu_oai: gpt-oss's (up + 1) * gate * sigmoid(1.702 * gate)), optionally
clamped (gate <= limit, |up| <= limit: DeepSeek-V4, gpt-oss). transformers describes its experts
classes with the flags of `@use_experts_implementation` (has_bias, is_transposed, is_concatenated,
has_gate, has_post_expert_norm) and a `_apply_gate(gate_up_out)` method. `experts_layout` reads
them into an ExpertsLayout:

- is_transposed: gate_up_proj [E, D, 2I], down_proj [E, I, D] (x @ W instead of x @ W^T);
- is_concatenated=False: gate/up columns interleaved (gate0, up0, gate1, up1, ...: gpt-oss),
  in gate_up_proj and its bias alike;
- has_bias: gate_up_proj_bias [E, 2I] and down_proj_bias [E, D] (the down bias is part of the
  expert's output, so it is weighted by the routing weight, as transformers does).

ExpertsLayout's `*_to_moe` / `*_to_hf` turn tensors of one layout into the other (differentiable;
one copy for a transposed or interleaved gate_up_proj, views otherwise). Non-gated experts
(has_gate=False) and norms after each expert are refused with a ValueError naming the difference,
as is any `_apply_gate` that a CPU probe does not find equal to a moe_kit activation: nothing
runs with wrong numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_kit.activations import ACTIVATIONS, UP_OFFSET, gated_activation
from moe_kit.integrations.upcycle import activation_of

# flag -> (value moe_kit needs, what a different value means); the other flags are layouts it adapts
_FLAGS = {
    "has_gate": (True, "non-gated experts (up_proj + activation, no SwiGLU)"),
    "has_post_expert_norm": (False, "a norm after each expert"),
}


@dataclass(frozen=True)
class ExpertsLayout:
    """How a transformers experts module stores and computes what moe_kit's experts compute."""

    activation: str  # moe_kit.activations name
    limit: float | None  # the clamp (MoEConfig.swiglu_limit), None: none
    transposed: bool = False  # gate_up_proj [E, D, 2I] and down_proj [E, I, D]
    interleaved: bool = False  # gate/up columns interleaved (gate0, up0, ...) instead of [gate | up]
    bias: bool = False  # gate_up_proj_bias [E, 2I] and down_proj_bias [E, D]

    @property
    def native(self) -> bool:
        """True when the tensors already have moe_kit's layout (only the biases may be extra)."""
        return not (self.transposed or self.interleaved)

    # ------------------------------------------------------------------------- transformers -> moe_kit

    def gate_up_to_moe(self, w: torch.Tensor) -> torch.Tensor:
        """[E, 2I, D] in moe_kit's order from transformers' gate_up_proj."""
        if self.transposed:
            w = w.transpose(1, 2)  # [E, 2I, D] view
        return _deinterleave(w) if self.interleaved else w

    def gate_up_bias_to_moe(self, b: torch.Tensor) -> torch.Tensor:
        """[E, 2I] (gate half, then up half) from transformers' gate_up_proj_bias."""
        return _deinterleave(b) if self.interleaved else b

    def down_to_moe(self, w: torch.Tensor) -> torch.Tensor:
        """[E, D, I] from transformers' down_proj."""
        return w.transpose(1, 2) if self.transposed else w

    # ------------------------------------------------------------------------- moe_kit -> transformers

    def gate_up_to_hf(self, w: torch.Tensor) -> torch.Tensor:
        if self.interleaved:
            w = _interleave(w)
        return w.transpose(1, 2) if self.transposed else w

    def gate_up_bias_to_hf(self, b: torch.Tensor) -> torch.Tensor:
        return _interleave(b) if self.interleaved else b

    def down_to_hf(self, w: torch.Tensor) -> torch.Tensor:
        return w.transpose(1, 2) if self.transposed else w

    def converters(self, to_hf: bool) -> dict:
        """{experts tensor name: function} that change the layout of each tensor that differs."""
        names = {}
        if not self.native:
            names["gate_up_proj"] = self.gate_up_to_hf if to_hf else self.gate_up_to_moe
        if self.transposed:
            names["down_proj"] = self.down_to_hf if to_hf else self.down_to_moe
        if self.bias and self.interleaved:
            names["gate_up_proj_bias"] = self.gate_up_bias_to_hf if to_hf else self.gate_up_bias_to_moe
        return names


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """dim 1 (2I): (gate0, up0, gate1, up1, ...) -> (gate0, gate1, ..., up0, up1, ...)."""
    return t.unflatten(1, (t.shape[1] // 2, 2)).transpose(1, 2).flatten(1, 2)


def _interleave(t: torch.Tensor) -> torch.Tensor:
    """The inverse of _deinterleave."""
    return t.unflatten(1, (2, t.shape[1] // 2)).transpose(1, 2).flatten(1, 2)


def is_hf_experts(module: nn.Module) -> bool:
    """True for a transformers experts module made by `@use_experts_implementation`."""
    return all(hasattr(module, attr) for attr in ("is_transposed", "has_bias", "config", "_apply_gate"))


def experts_dims(experts: nn.Module) -> tuple[int, int, int]:
    """(E, I, D) of a transformers experts module, whatever its layout (is_transposed read)."""
    num_experts, a, b = experts.gate_up_proj.shape
    two_i, hidden = (b, a) if getattr(experts, "is_transposed", False) else (a, b)
    return num_experts, two_i // 2, hidden


def experts_swiglu_limit(experts: nn.Module) -> float | None:
    """The swiglu_limit under which moe_kit computes exactly what `experts` computes (None: no
    clamp); ValueError when its layout is one moe_kit does not have. See experts_layout."""
    return experts_layout(experts).limit


def experts_activation(experts: nn.Module) -> tuple[str, float | None]:
    """(activation, swiglu_limit): moe_kit's gated activation (a name in
    moe_kit.activations.ACTIVATIONS) and clamp under which moe_kit computes exactly what `experts`
    computes; ValueError when its layout or activation is one moe_kit does not have."""
    layout = experts_layout(experts)
    return layout.activation, layout.limit


def experts_layout(experts: nn.Module) -> ExpertsLayout:
    """The ExpertsLayout under which moe_kit computes exactly what `experts` computes; ValueError
    naming the difference when there is none."""
    name = type(experts).__name__
    for flag, (needed, meaning) in _FLAGS.items():
        if getattr(experts, flag, needed) != needed:
            raise ValueError(f"moe_kit cannot run {name}: it has {meaning} ({flag}={not needed})")
    transposed = bool(getattr(experts, "is_transposed", False))
    interleaved = not getattr(experts, "is_concatenated", True)
    bias = bool(getattr(experts, "has_bias", False))
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        raise ValueError(f"moe_kit cannot run {name}: it has no 3D gate_up_proj / down_proj tensors")
    want = "[E, D, 2I] and [E, I, D] (is_transposed=True)" if transposed else "[E, 2I, D] and [E, D, I]"
    if gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError(f"moe_kit cannot run {name}: gate_up_proj / down_proj are not {want}")
    num_experts, inter, hidden = experts_dims(experts)
    down_shape = (num_experts, inter, hidden) if transposed else (num_experts, hidden, inter)
    if gate_up.shape[1 + transposed] % 2 or tuple(down.shape) != down_shape:
        raise ValueError(
            f"moe_kit cannot run {name}: gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} "
            f"are not {want} (transposed weights{' not flagged' if not transposed else ''}?)"
        )
    if bias:
        for attr, shape in (("gate_up_proj_bias", (num_experts, 2 * inter)), ("down_proj_bias", (num_experts, hidden))):
            tensor = getattr(experts, attr, None)
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
                got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tensor
                raise ValueError(f"moe_kit cannot run {name}: has_bias=True but its {attr} is {got}, not {list(shape)}")
    activation, limit = _gated_act(experts, inter, interleaved)
    return ExpertsLayout(activation, limit, transposed, interleaved, bias)


def _gated_act(experts: nn.Module, width: int, interleaved: bool) -> tuple[str, float | None]:
    """Compare experts._apply_gate with moe_kit's gated activation on a CPU probe (unclamped, and
    clamped at experts.limit when it has one); return the (activation, limit) that matches.
    Nothing here touches the experts' weights, so meta-device modules are checked the same way."""
    name = type(experts).__name__
    act = getattr(experts, "act_fn", None)
    candidates = ACTIVATIONS
    if act is not None:
        found = activation_of(act)
        if found is None or found in UP_OFFSET:  # an elementwise quick_gelu is not gpt-oss's gated form
            plain = [a for a in ACTIVATIONS if a not in UP_OFFSET]
            raise ValueError(f"moe_kit cannot run {name}: its activation is {act!r}; moe_kit has {plain}")
        candidates = (found,)
    limit = getattr(experts, "limit", None)
    limit = None if limit is None else float(limit)
    apply_gate = getattr(experts, "_apply_gate", None)
    if apply_gate is None:  # the default of use_experts_implementation: act_fn(gate) * up
        return candidates[0], None
    scale = 3.0 * (limit or 4.0)  # probe values well past the clamp
    generator = torch.Generator(device="cpu").manual_seed(0)  # CPU probe, whatever the default device (meta)
    probe = torch.randn(8, 2 * width, generator=generator, dtype=torch.float64, device="cpu") * scale
    hf_probe = _interleave(probe) if interleaved else probe  # the same numbers in the module's column order
    with torch.no_grad():
        try:
            out = apply_gate(hf_probe.to(torch.float32)).double()
        except Exception as error:  # noqa: BLE001 - report whatever the custom gate raised
            raise ValueError(f"moe_kit cannot run {name}: its _apply_gate failed on a probe ({error})") from error
    for activation in candidates:
        for candidate in dict.fromkeys((limit, None)):
            expected = gated_activation(probe, candidate, activation)
            if out.shape == expected.shape and torch.allclose(out, expected, rtol=1e-5, atol=1e-5 * scale):
                return activation, candidate
    columns = "interleaved (gate0, up0, gate1, ...) columns" if interleaved else "[gate | up] halves"
    raise ValueError(
        f"moe_kit cannot run {name}: its _apply_gate is not {'/'.join(candidates)} of gate and up on {columns} "
        f"(with or without the clamp at limit={limit})"
    )
