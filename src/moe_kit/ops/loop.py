"""The "loop" backend: the plain reference every fast path is tested against.

One Python iteration per expert, written for clarity, not speed (never use it in a hot path).
Legend: N tokens, k slots per token, E experts, D model width, I expert hidden width.
"""

from __future__ import annotations

import torch

from moe_kit.activations import swiglu


def moe_ffn_loop(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    swiglu_limit: float | None = None,
    activation: str = "silu",
) -> torch.Tensor:
    """x [N, D], weights [N, k], indices int [N, k] -> [N, D] in x.dtype; ids >= E (dropped slots) are skipped.

    Under torch.autocast the GEMMs run in the autocast dtype; each expert's contribution is cast
    back to x.dtype before it is summed.
    """
    out = torch.zeros_like(x)
    ran = False
    for expert in range(gate_up_proj.shape[0]):
        token, slot = torch.where(indices == expert)
        if token.numel() == 0:
            continue
        ran = True
        hidden = swiglu(x[token] @ gate_up_proj[expert].t(), swiglu_limit, activation)  # [n_e, I]
        y = hidden @ down_proj[expert].t()  # [n_e, D]
        out = out.index_add(0, token, (y * weights[token, slot].unsqueeze(1).to(y.dtype)).to(out.dtype))
    if not ran:  # no expert ran: the zero output still depends (with zero gradient) on every input
        out = out + 0.0 * (x.sum() + weights.sum().to(x.dtype) + gate_up_proj.sum() + down_proj.sum())
    return out
