"""The "moe_kit" experts implementation for transformers' `ExpertsInterface`.

transformers routes tokens itself (its own router) and then calls, for every experts module made
by `@use_experts_implementation`, `fn(experts, hidden_states [N, D], top_k_index [N, k],
top_k_weights [N, k]) -> [N, D]`, the function registered under
`config._experts_implementation`. `moe_kit_experts_forward` is that function: it runs the
experts' own `gate_up_proj` [E, 2I, D] / `down_proj` [E, D, I] through `moe_kit.ops.moe_ffn`,
with the module's gated activation (silu, gelu, gelu_tanh, relu) and the DeepSeek-V4 clamp when
it has one. The layout is checked once per module (`layout.experts_activation`); unsupported
experts raise ValueError at `register(model)` or at their first forward.

Under torch.compile the check is `torch.compiler.assume_constant_result`: it runs eagerly while
dynamo traces and its answer is a constant of the graph, so `fullgraph=True` holds (a refusal
surfaces at trace time, the ValueError's message inside dynamo's error).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_kit.integrations.hf.layout import experts_activation, is_hf_experts
from moe_kit.ops import moe_ffn

NAME = "moe_kit"
_settings = {"backend": "auto"}


def _checked(experts: nn.Module) -> tuple[str, float | None]:
    """(activation, swiglu_limit) of `experts`, found on its first call and kept on it."""
    activation = getattr(experts, "_moe_kit_activation", None)
    if activation is None:
        return _check(experts)
    return activation, experts._moe_kit_limit


@torch.compiler.assume_constant_result
def _check(experts: nn.Module) -> tuple[str, float | None]:
    """layout.experts_activation, run eagerly even while torch.compile traces (its result is a
    constant of the module, so the compiled graph has no break; a refusal is raised at trace time)."""
    activation, limit = experts_activation(experts)
    experts._moe_kit_limit = limit
    experts._moe_kit_activation = activation
    return activation, limit


def moe_kit_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """hidden_states [N, D], top_k_index int [N, k], top_k_weights [N, k] -> [N, D] in hidden_states' dtype."""
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError(
            f"the moe_kit experts implementation does not run transformers' expert parallelism "
            f"({type(self).__name__} has _is_expert_parallel=True); load the model without an EP plan"
        )
    activation, limit = _checked(self)
    dtype = hidden_states.dtype
    return moe_ffn(
        hidden_states,
        top_k_weights,
        top_k_index,
        self.gate_up_proj.to(dtype),
        self.down_proj.to(dtype),
        _settings["backend"],
        swiglu_limit=limit,
        activation=activation,
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
