"""Which transformers experts modules moe_kit can run, and with what SwiGLU clamp.

moe_kit's experts are `down @ (act(gate) * up)` (act: silu, gelu, gelu_tanh or relu) with
gate_up_proj [E, 2I, D] (gate rows first, then up rows) and down_proj [E, D, I], no biases,
optionally clamped (gate <= limit, |up| <= limit: DeepSeek-V4). transformers describes its
experts classes with the flags of `@use_experts_implementation` (has_bias, is_transposed, is_concatenated, has_gate,
has_post_expert_norm) and a `_apply_gate(gate_up_out)` method; anything else is refused here
with a ValueError naming the difference, never run with wrong numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_kit.activations import ACTIVATIONS, swiglu
from moe_kit.integrations.upcycle import activation_of

# flag -> (value moe_kit needs, what a different value means)
_FLAGS = {
    "has_bias": (False, "expert biases (moe_kit experts are bias-free)"),
    "is_transposed": (False, "transposed weights (gate_up_proj [E, D, 2I], down_proj [E, I, D])"),
    "is_concatenated": (True, "interleaved gate/up rows (gate0, up0, gate1, ...)"),
    "has_gate": (True, "non-gated experts (up_proj + activation, no SwiGLU)"),
    "has_post_expert_norm": (False, "a norm after each expert"),
}


def is_hf_experts(module: nn.Module) -> bool:
    """True for a transformers experts module made by `@use_experts_implementation`."""
    return all(hasattr(module, attr) for attr in ("is_transposed", "has_bias", "config", "_apply_gate"))


def experts_swiglu_limit(experts: nn.Module) -> float | None:
    """The swiglu_limit under which moe_kit computes exactly what `experts` computes (None: no
    clamp); ValueError when its layout is one moe_kit does not have. See experts_activation."""
    return experts_activation(experts)[1]


def experts_activation(experts: nn.Module) -> tuple[str, float | None]:
    """(activation, swiglu_limit): moe_kit's gated activation (a name in
    moe_kit.activations.ACTIVATIONS) and clamp under which moe_kit computes exactly what `experts`
    computes; ValueError when its layout or activation is one moe_kit does not have."""
    name = type(experts).__name__
    for flag, (needed, meaning) in _FLAGS.items():
        if getattr(experts, flag, needed) != needed:
            raise ValueError(f"moe_kit cannot run {name}: it has {meaning} ({flag}={not needed})")
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        raise ValueError(f"moe_kit cannot run {name}: it has no 3D gate_up_proj / down_proj tensors")
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[1] % 2:
        raise ValueError(f"moe_kit cannot run {name}: gate_up_proj {tuple(gate_up.shape)} is not [E, 2I, D]")
    experts_, two_i, hidden = gate_up.shape
    if down.shape != (experts_, hidden, two_i // 2):
        raise ValueError(
            f"moe_kit cannot run {name}: gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} "
            "are not [E, 2I, D] and [E, D, I] (transposed weights?)"
        )
    return _gated_act(experts, two_i // 2)


def _gated_act(experts: nn.Module, width: int) -> tuple[str, float | None]:
    """Compare experts._apply_gate with moe_kit's gated activation on a CPU probe (unclamped, and
    clamped at experts.limit when it has one); return the (activation, limit) that matches.
    Nothing here touches the experts' weights, so meta-device modules are checked the same way."""
    name = type(experts).__name__
    act = getattr(experts, "act_fn", None)
    candidates = ACTIVATIONS
    if act is not None:
        found = activation_of(act)
        if found is None:
            raise ValueError(
                f"moe_kit cannot run {name}: its activation is {act!r}; moe_kit has {list(ACTIVATIONS)}"
            )
        candidates = (found,)
    limit = getattr(experts, "limit", None)
    limit = None if limit is None else float(limit)
    apply_gate = getattr(experts, "_apply_gate", None)
    if apply_gate is None:  # the default of use_experts_implementation: act_fn(gate) * up
        return candidates[0], None
    scale = 3.0 * (limit or 4.0)  # probe values well past the clamp
    generator = torch.Generator(device="cpu").manual_seed(0)  # CPU probe, whatever the default device (meta)
    probe = torch.randn(8, 2 * width, generator=generator, dtype=torch.float64, device="cpu") * scale
    with torch.no_grad():
        try:
            out = apply_gate(probe.to(torch.float32)).double()
        except Exception as error:  # noqa: BLE001 - report whatever the custom gate raised
            raise ValueError(f"moe_kit cannot run {name}: its _apply_gate failed on a probe ({error})") from error
    for activation in candidates:
        for candidate in dict.fromkeys((limit, None)):
            expected = swiglu(probe, candidate, activation)
            if out.shape == expected.shape and torch.allclose(out, expected, rtol=1e-5, atol=1e-5 * scale):
                return activation, candidate
    raise ValueError(
        f"moe_kit cannot run {name}: its _apply_gate is not {'/'.join(candidates)}(gate) * up on [gate | up] "
        f"halves (with or without the clamp at limit={limit})"
    )
