"""The "moe_kit" experts implementation for transformers' `ExpertsInterface`.

transformers routes tokens itself (its own router) and then calls, for every experts module made
by `@use_experts_implementation`, `fn(experts, hidden_states [N, D], top_k_index [N, k],
top_k_weights [N, k]) -> [N, D]`, the function registered under
`config._experts_implementation`. `moe_kit_experts_forward` is that function: it runs the
experts' own `gate_up_proj` [E, 2I, D] / `down_proj` [E, D, I] through `moe_kit.ops.moe_ffn`,
with the module's gated activation (silu, gelu, gelu_tanh, relu, gpt-oss's swiglu_oai), its
clamp (DeepSeek-V4, gpt-oss) and its biases (gpt-oss) when it has them. The layout is checked once
per module (`layout.experts_layout`); unsupported experts raise ValueError at `register(model)`
or at their first forward.

Experts stored in another layout (gpt-oss: transposed, gate/up columns interleaved) are put in
moe_kit's layout on every call: one differentiable copy of gate_up_proj (and a transposed view of
down_proj), never cached, so training, in-place updates and reloaded weights are always seen as
they are, at the price of that copy per forward (the weights' size, every layer). To pay it once,
`hf.convert` the model: the converted layers keep the weights in moe_kit's layout (and still save
transformers' layout).

Under torch.compile the check is `torch.compiler.assume_constant_result`: it runs eagerly while
dynamo traces and its answer is a constant of the graph, so `fullgraph=True` holds (a refusal
surfaces at trace time, the ValueError's message inside dynamo's error).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_kit.integrations.hf.layout import ExpertsLayout, experts_layout, is_hf_experts
from moe_kit.ops import moe_ffn

NAME = "moe_kit"
_settings = {"backend": "auto"}


def _checked(experts: nn.Module) -> ExpertsLayout:
    """The ExpertsLayout of `experts`, found on its first call and kept on it."""
    layout = getattr(experts, "_moe_kit_layout", None)
    if layout is None:
        return ExpertsLayout(*_check(experts))
    return layout


@torch.compiler.assume_constant_result
def _check(experts: nn.Module) -> tuple:
    """layout.experts_layout as a tuple of constants, run eagerly even while torch.compile traces
    (its result is a constant of the module, so the compiled graph has no break; a refusal is raised
    at trace time)."""
    layout = experts_layout(experts)
    experts._moe_kit_layout = layout
    experts._moe_kit_limit = layout.limit
    experts._moe_kit_activation = layout.activation
    return layout.activation, layout.limit, layout.transposed, layout.interleaved, layout.bias


def moe_kit_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """hidden_states [N, D], top_k_index int [N, k], top_k_weights [N, k] -> [N, D] in hidden_states' dtype."""
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError(
            f"the moe_kit experts implementation does not run transformers' expert parallelism "
            f"({type(self).__name__} has _is_expert_parallel=True); load the model without an EP plan"
        )
    layout = _checked(self)
    dtype = hidden_states.dtype
    gate_up, down = layout.gate_up_to_moe(self.gate_up_proj), layout.down_to_moe(self.down_proj)  # per call
    biases = {}
    if layout.bias:
        biases = dict(gate_up_proj_bias=layout.gate_up_bias_to_moe(self.gate_up_proj_bias).to(dtype),
                      down_proj_bias=self.down_proj_bias.to(dtype))
    return moe_ffn(
        hidden_states,
        top_k_weights,
        top_k_index,
        gate_up.to(dtype),
        down.to(dtype),
        _settings["backend"],
        swiglu_limit=layout.limit,
        activation=layout.activation,
        **biases,
    )


def register(model: nn.Module | None = None, backend: str = "auto") -> None:
    """Register "moe_kit" with transformers' ExpertsInterface (idempotent).

    Afterwards `model.set_experts_implementation("moe_kit")` or
    `from_pretrained(..., experts_implementation="moe_kit")` runs every experts module on
    moe_kit.ops.moe_ffn with `backend`. With `model`, also check every experts module of it now
    (ValueError naming the first unsupported one) and switch the model to "moe_kit".
    """
    from transformers.integrations.moe import ExpertsInterface

    from moe_kit.ops import check_backend

    check_backend(backend)  # unknown or unbuilt backends fail here, not at the first forward
    _settings["backend"] = backend
    ExpertsInterface.register(NAME, moe_kit_experts_forward)
    if model is None:
        return
    for name, module in model.named_modules():
        if is_hf_experts(module):
            try:
                _checked(module)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
    model.set_experts_implementation(NAME)
