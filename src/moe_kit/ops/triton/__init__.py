"""The "triton" backend: routed SwiGLU experts in four Triton kernels, no per-expert Python loop.

Legend: N tokens, k slots per token, S = N*k rows sorted by expert, E experts, D model width,
I expert hidden width.

Files, each reference -> kernel -> launcher:
    configs.py          autotune lists, MOE_KIT_TRITON_CONFIG pin, BLOCK_M choice
    schedule.py         tile schedule: (expert, row range) of each row block, built on the device
    gemm1_swiglu.py     gather x rows + GEMM 1 + SwiGLU            -> h [S, 2I], act [S, I]
    scatter_gemm.py     GEMM 2 (* routing weight) / dX, summed per token -> [N, D]: via a
                        slot-order [S, D] buffer (deterministic) or atomic adds in the epilogue
    swiglu_backward.py  grad_out rows @ down + SwiGLU backward     -> dH [S, 2I], d_weights [S]
    weight_grad.py      per-expert sum of outer products           -> d_gate_up, d_down (act from h)
    autograd.py         the two custom ops (moe_kit::routed_swiglu_fwd / _bwd) + register_autograd
    compat.py           triton_op / custom_op and wrap_triton across torch versions
Forward: 2 kernel launches (GEMM 1, GEMM 2); backward: 4 (SwiGLU backward, 2 weight gradients,
dX). The routing plan and the schedule are torch ops; nothing synchronizes with the host.
The per-token combine of GEMM 2 and of dX is deterministic (bitwise run to run) when asked or
when torch.use_deterministic_algorithms is on, else fused (no [S, D] buffer; see scatter_gemm.py).
Importing this package imports triton and defines the kernels; set TRITON_INTERPRET=1 before the
import to run them on CPU tensors in Triton's interpreter (tests).
"""

from __future__ import annotations

import torch

from moe_kit.ops.routing import routing_plan
from moe_kit.ops.triton import autograd as _autograd  # noqa: F401  (registers the custom ops)
from moe_kit.ops.triton.configs import block_m as _block_m
from moe_kit.ops.triton.schedule import tile_schedule

__all__ = ["moe_ffn_triton", "deterministic_combine", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def moe_ffn_triton(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    swiglu_limit: float | None = None,
    has_dropped: bool = False,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """x [N, D], weights [N, k], indices int [N, k] (E = dropped slot when has_dropped),
    gate_up_proj [E, 2I, D], down_proj [E, D, I] -> [N, D] in x.dtype; no host synchronization.

    Differentiable in x, weights, gate_up_proj and down_proj (once: no double backward).
    deterministic: how the forward output and d_x sum each token's k expert rows (see
    deterministic_combine): True = a slot-order [S, D] buffer summed over k, bitwise reproducible;
    False = atomic adds into an fp32 [N, D] accumulator in the GEMM epilogue, no [S, D] buffer,
    run-to-run differences in the last bits on a GPU. None (default): as moe_ffn_torch, True on
    CUDA, False on CPU (the interpreter, whose atomics are sequential). With k = 1 and a 16-bit x
    the slot-order combine runs whatever `deterministic` says: it allocates less. The other
    gradients (routing weights, gate_up_proj, down_proj) are deterministic either way.
    moe_ffn(deterministic=...) and MoEConfig.deterministic reach it through moe_kit.ops.dispatch.
    """
    num_experts = gate_up_proj.shape[0]
    plan = routing_plan(indices, num_experts, has_dropped)
    num_rows = plan.slot_of_row.numel()
    block_m = _block_m(num_rows, num_experts)
    table = tile_schedule(plan.counts, plan.offsets, num_rows, block_m)
    save_h = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, weights, gate_up_proj, down_proj)
    )
    # k = 1 in 16 bits: the slot-order buffer [N, D] is smaller than the fused combine's fp32
    # accumulator (and a token with one row has nothing to sum in any order): always slot order.
    slot_order = deterministic_combine(deterministic, x.device) or (indices.shape[1] == 1 and x.element_size() < 4)
    out, _ = torch.ops.moe_kit.routed_swiglu_fwd(
        x, weights, gate_up_proj, down_proj, plan.token_of_row, plan.slot_of_row, plan.offsets, table,
        None if swiglu_limit is None else float(swiglu_limit), block_m, has_dropped, slot_order, save_h,
    )
    return out


def deterministic_combine(deterministic: bool | None, device: torch.device) -> bool:
    """Whether the combine runs in slot order: always under torch.use_deterministic_algorithms(True)
    (warn_only included), else `deterministic`, whose None means "on CUDA" (moe_ffn_torch's default)."""
    if torch.are_deterministic_algorithms_enabled():
        return True
    if deterministic is None:
        return device.type != "cpu"
    return bool(deterministic)
