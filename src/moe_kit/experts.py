"""SwiGLU experts: one `Expert`, the always-on `SharedExpert`, and `GroupedExperts` (3D weights).

Legend: D model width, I expert hidden width, E experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe_kit.activations import check_activation, gated_activation_halves


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """layer(x) computed in x's dtype, as the routed experts are (a bf16 input to an fp32 layer)."""
    return F.linear(x, layer.weight.to(x.dtype))


class Expert(nn.Module):
    """Gated MLP down(act(gate(x)) * up(x)) with bias-free nn.Linear layers (act = silu: SwiGLU;
    "gelu", "gelu_tanh", "relu", "swiglu_oai" as MoEConfig.activation).

    x [..., D] -> [..., D] in x's dtype (weights are cast when the dtypes differ).
    """

    def __init__(
        self, hidden_size: int, intermediate_size: int, swiglu_limit: float | None = None, activation: str = "silu"
    ):
        super().__init__()
        check_activation(activation)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.swiglu_limit = swiglu_limit
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = _linear(x, self.gate_proj), _linear(x, self.up_proj)
        return _linear(gated_activation_halves(gate, up, self.swiglu_limit, self.activation), self.down_proj)


class SharedExpert(Expert):
    """An Expert every token goes through; with `gated`, its output is scaled per token by
    sigmoid(x @ gate.weight^T) as in Qwen2-MoE (`gate`: nn.Linear(D, 1, bias=False))."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        gated: bool = False,
        swiglu_limit: float | None = None,
        activation: str = "silu",
    ):
        super().__init__(hidden_size, intermediate_size, swiglu_limit, activation)
        self.gate = nn.Linear(hidden_size, 1, bias=False) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.gate is not None:
            out = torch.sigmoid(_linear(x, self.gate)) * out
        return out


class GroupedExperts(nn.Module):
    """The weights of E routed gated experts in the HuggingFace transformers layout.

    gate_up_proj [E, 2I, D]: rows 0..I-1 project to the gate, rows I..2I-1 to the up branch.
    down_proj [E, D, I]. With `bias` (MoEConfig.expert_proj_bias, gpt-oss): gate_up_proj_bias
    [E, 2I] (gate half, then up half, as the rows) and down_proj_bias [E, D], HF gpt-oss's names;
    without, both are None. Run them with moe_kit.ops.moe_ffn(x, weights, indices,
    experts.gate_up_proj, experts.down_proj, gate_up_proj_bias=..., down_proj_bias=...) or inside
    a MoELayer.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size))
            self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size))
        else:  # as nn.Linear(bias=False): registered, None
            self.register_parameter("gate_up_proj_bias", None)
            self.register_parameter("down_proj_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init per expert for the weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in));
        biases start at zero (as transformers' gpt-oss init; no-ops on the meta device)."""
        nn.init.uniform_(self.gate_up_proj, -1 / math.sqrt(self.hidden_size), 1 / math.sqrt(self.hidden_size))
        bound = 1 / math.sqrt(self.intermediate_size)
        nn.init.uniform_(self.down_proj, -bound, bound)
        for bias in (self.gate_up_proj_bias, self.down_proj_bias):
            if bias is not None:
                nn.init.zeros_(bias)

    def biases(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor | None]:
        """{"gate_up_proj_bias": ..., "down_proj_bias": ...} (None without biases), in `dtype` when
        given: the bias keyword arguments of moe_kit.ops.moe_ffn (and ops.dispatch, ep_moe_ffn)."""
        found = dict(gate_up_proj_bias=self.gate_up_proj_bias, down_proj_bias=self.down_proj_bias)
        if dtype is None or all(t is None for t in found.values()):
            return found  # no casts (MoELayer asks every forward)
        return {name: t if t is None or t.dtype == dtype else t.to(dtype) for name, t in found.items()}

    def extra_repr(self) -> str:
        bias = ", bias=True" if self.gate_up_proj_bias is not None else ""
        return (f"num_experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}"
                f"{bias}")
