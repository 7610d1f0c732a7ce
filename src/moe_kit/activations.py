"""The gated activation of every expert: act(gate) * (up + offset), with an optional clamp.

`activation` names:
- "silu" (default: SwiGLU), "gelu" (erf), "gelu_tanh", "relu": act(gate) * up.
- "swiglu_oai": gpt-oss's form, (up + 1) * gate * sigmoid(1.702 * gate). Megatron-Core writes it
  as quick_gelu with glu_linear_offset=1 (and activation_func_clamp_value = the limit); vLLM calls
  it "swigluoai". Here act = quick_gelu(g) = g * sigmoid(OAI_ALPHA * g) and the up offset is 1.
With `limit`, gate is clamped to <= limit and up to [-limit, limit] before the activation (the
clamp passes the gradient only inside its bounds, limits included, as torch.clamp does); for
"swiglu_oai" the offset is added after the clamp, as in gpt-oss (DeepSeek-V4 and gpt-oss clamp).
Legend: R rows, I expert hidden width; h [R, 2I] is the gate half then the up half (HF layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_kit.config import ACTIVATIONS

OAI_ALPHA = 1.702  # gpt-oss's swiglu_alpha: the sigmoid's slope in quick_gelu
UP_OFFSET = {"swiglu_oai": 1.0}  # added to the (clamped) up half; 0 for the others


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {list(ACTIVATIONS)}")


def act_fn(x: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """The plain activation of the gate half (a new tensor)."""
    if activation == "silu":
        return F.silu(x)
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "relu":
        return F.relu(x)
    if activation == "swiglu_oai":
        return x * torch.sigmoid(x * OAI_ALPHA)  # quick_gelu, in gpt-oss's operation order
    check_activation(activation)
    raise AssertionError(activation)


def _operands(gate: torch.Tensor, up: torch.Tensor, limit: float | None, activation: str):
    """(gate, up) as the activation uses them: clamped with `limit`, the up offset added (new
    tensors whenever they differ from the inputs: h is never written)."""
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    offset = UP_OFFSET.get(activation)
    if offset is not None:
        up = up + offset
    return gate, up


def gated_activation_halves(gate: torch.Tensor, up: torch.Tensor, limit: float | None = None,
                 activation: str = "silu") -> torch.Tensor:
    """act(gate) * (up + offset) (silu: SwiGLU), clamped first with `limit`; differentiable by torch autograd."""
    gate, up = _operands(gate, up, limit, activation)
    return act_fn(gate, activation) * up


def gated_activation(h: torch.Tensor, limit: float | None = None, activation: str = "silu") -> torch.Tensor:
    """[..., 2I] (gate half, then up half, the HF gate_up_proj layout) -> [..., I]."""
    gate, up = h.chunk(2, dim=-1)
    return gated_activation_halves(gate, up, limit, activation)


def gated_act(h: torch.Tensor, activation: str = "silu", limit: float | None = None) -> torch.Tensor:
    """gated_activation(h) for fused backends: one new [R, I] tensor, no autograd graph needed."""
    gate, up = _operands(*h.chunk(2, dim=-1), limit, activation)
    return act_fn(gate, activation).mul_(up)


def gated_act_parts(h: torch.Tensor, activation: str = "silu", limit: float | None = None):
    """(act(gate) * (up + offset), act(gate)), two new [R, I] tensors: a backward that needs both
    the output and act(gate) (for d up) computes the activation once."""
    gate, up = _operands(*h.chunk(2, dim=-1), limit, activation)
    activated = act_fn(gate, activation)
    return activated * up, activated


def gated_act_backward(grad_act: torch.Tensor, h: torch.Tensor, activation: str = "silu",
                       limit: float | None = None, activated: torch.Tensor | None = None) -> torch.Tensor:
    """d(act(gate) * (up + offset))/d[gate, up] with the optional clamp; grad_act [R, I], h [R, 2I]
    -> [R, 2I]. `activated`: act(clamped gate) [R, I] if the caller has it (saves recomputing it)."""
    raw_gate, raw_up = h.chunk(2, dim=-1)
    gate, up = _operands(raw_gate, raw_up, limit, activation)
    grad_h = torch.empty_like(h)
    grad_gate, grad_up = grad_h.chunk(2, dim=-1)
    torch.mul(grad_act, up, out=grad_gate)
    if activation == "silu":
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
    elif activation == "relu":
        grad_gate.masked_fill_(gate <= 0, 0)
    elif activation == "swiglu_oai":  # d/dg g*s(ag) = s + a*g*s*(1 - s), s = sigmoid(a*g)
        s = torch.sigmoid(gate * OAI_ALPHA)
        grad_gate.mul_(s.mul(gate).mul_(OAI_ALPHA).mul_(1 - s).add_(s))
    else:
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        grad_gate.copy_(torch.ops.aten.gelu_backward(grad_gate, gate, approximate=approximate))
    if activated is not None:
        torch.mul(activated, grad_act, out=grad_up)
    else:
        if activation == "silu":
            torch.ops.aten.silu.out(gate, out=grad_up)
        else:
            grad_up.copy_(act_fn(gate, activation))
        grad_up.mul_(grad_act)
    if limit is not None:
        grad_gate.masked_fill_(raw_gate > limit, 0)
        grad_up.masked_fill_(raw_up.abs() > limit, 0)
    return grad_h
