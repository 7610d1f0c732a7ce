"""SwiGLU, the expert activation: silu(gate) * up, with DeepSeek-V4's optional clamp."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_parts(gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """silu(gate) * up; with `limit`, gate is clamped to <= limit and up to [-limit, limit] first."""
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


def swiglu(h: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """[..., 2I] (gate half, then up half, the HF gate_up_proj layout) -> [..., I]."""
    gate, up = h.chunk(2, dim=-1)
    return swiglu_parts(gate, up, limit)
