"""SwiGLU experts: one `Expert`, the always-on `SharedExpert`, and `GroupedExperts` (3D weights).

Legend: D model width, I expert hidden width, E experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe_kit.activations import check_activation, gated_activation_halves
from moe_kit.ops import check_backend, dispatch


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


def expert_settings(cfg) -> dict:
    """GroupedExperts' keyword arguments from a MoEConfig (bias, activation, clamp, backend, determinism)."""
    return dict(bias=cfg.expert_proj_bias, activation=cfg.activation, swiglu_limit=cfg.swiglu_limit,
                backend=cfg.backend, deterministic=cfg.deterministic)


def _local(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """t's local tensor (a DTensor's shard on this rank; differentiable), in `dtype` when given."""
    if hasattr(t, "to_local"):  # a DTensor parameter (moe_kit.distributed.parallelize)
        t = t.to_local()
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


class GroupedExperts(nn.Module):
    """The weights of E routed gated experts in the HuggingFace transformers layout.

    gate_up_proj [E, 2I, D]: rows 0..I-1 project to the gate, rows I..2I-1 to the up branch.
    down_proj [E, D, I]. With `bias` (MoEConfig.expert_proj_bias, gpt-oss): gate_up_proj_bias
    [E, 2I] (gate half, then up half, as the rows) and down_proj_bias [E, D], HF gpt-oss's names;
    without, both are None.

    forward(x [R, D], weights [R, k], indices int64 [R, k]) -> [R, D] = sum_j weights[:, j] *
    FFN_{indices[:, j]}(x) in x's dtype (the weights are cast to it): the experts' half of a MoE
    layer, called by the layer's dispatcher (so module hooks see every expert call). Its settings
    are the layer config's: `activation`, `swiglu_limit`, `backend`, `deterministic`; moe_kit.ops
    picks the backend path. Under expert parallelism the parameters may be DTensors sharded on the
    expert dim (moe_kit.distributed.parallelize): forward computes with this rank's slice.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        bias: bool = False,
        *,
        activation: str = "silu",
        swiglu_limit: float | None = None,
        backend: str = "auto",
        deterministic: bool | None = None,
    ):
        super().__init__()
        check_activation(activation)
        check_backend(backend, activation, bias)  # fail at build time; the device is checked at forward
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = activation
        self.swiglu_limit = swiglu_limit
        self.backend = backend
        self.deterministic = deterministic
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

    def forward(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        indices: torch.Tensor,
        *,
        has_dropped: bool = False,
        pad_to: int | None = None,
    ) -> torch.Tensor:
        """x [R, D], weights [R, k], indices int64 [R, k] in 0..E-1 (E too when has_dropped: a slot
        without expert, contributing zero) -> [R, D] in x's dtype. pad_to: every expert's GEMMs on
        exactly pad_to rows (MoEConfig.pad_to_capacity). No input checks: moe_kit.ops.moe_ffn checks."""
        dtype = x.dtype
        return dispatch(
            x, weights, indices, _local(self.gate_up_proj, dtype), _local(self.down_proj, dtype), self.backend,
            self.swiglu_limit, has_dropped=has_dropped, activation=self.activation, pad_to=pad_to,
            deterministic=self.deterministic, **self.biases(dtype),
        )

    def biases(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor | None]:
        """{"gate_up_proj_bias": ..., "down_proj_bias": ...} (None without biases), this rank's local
        tensors, in `dtype` when given: the bias keyword arguments of moe_kit.ops.moe_ffn."""
        if self.gate_up_proj_bias is None and self.down_proj_bias is None:
            return dict(gate_up_proj_bias=None, down_proj_bias=None)  # no casts (asked every forward)
        return {name: None if t is None else _local(t, dtype)
                for name, t in (("gate_up_proj_bias", self.gate_up_proj_bias), ("down_proj_bias", self.down_proj_bias))}

    def extra_repr(self) -> str:
        bias = ", bias=True" if self.gate_up_proj_bias is not None else ""
        return (f"num_experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}"
                f"{bias}")
