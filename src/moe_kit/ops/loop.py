"""The "loop" backend: the plain reference every fast path is tested against.

One Python iteration per expert, written for clarity, not speed (never use it in a hot path).
Legend: N tokens, k slots per token, E experts, D model width, I expert hidden width.
"""

from __future__ import annotations

import torch

from moe_kit.activations import gated_activation


def moe_ffn_loop(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    swiglu_limit: float | None = None,
    activation: str = "silu",
    *,
    gate_up_proj_bias: torch.Tensor | None = None,
    down_proj_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [N, D], weights [N, k], indices int [N, k] -> [N, D] in x.dtype; ids >= E (dropped slots) are skipped.

    Expert e on its rows x_e: h = x_e @ gate_up_proj[e]^T (+ gate_up_proj_bias[e] [2I]),
    y = act(h) @ down_proj[e]^T (+ down_proj_bias[e] [D]), out += weight * y (the down bias is
    weighted like the rest of the expert's output, as gpt-oss). Under torch.autocast the GEMMs run
    in the autocast dtype; each expert's contribution is cast back to x.dtype before it is summed.
    """
    out = torch.zeros_like(x)
    ran = False
    for expert in range(gate_up_proj.shape[0]):
        token, slot = torch.where(indices == expert)
        if token.numel() == 0:
            continue
        ran = True
        h = x[token] @ gate_up_proj[expert].t()  # [n_e, 2I]
        if gate_up_proj_bias is not None:
            h = h + gate_up_proj_bias[expert]
        y = gated_activation(h, swiglu_limit, activation) @ down_proj[expert].t()  # [n_e, D]
        if down_proj_bias is not None:
            y = y + down_proj_bias[expert]
        out = out.index_add(0, token, (y * weights[token, slot].unsqueeze(1).to(y.dtype)).to(out.dtype))
    if not ran:  # no expert ran: the zero output still depends (with zero gradient) on every input
        tensors = [t for t in (gate_up_proj, down_proj, gate_up_proj_bias, down_proj_bias) if t is not None]
        out = out + 0.0 * (x.sum() + weights.sum().to(x.dtype) + sum(t.sum() for t in tensors))
    return out
