"""Backward through GEMM 2 and SwiGLU: gathered grad_out rows times down[e], SwiGLU' in the epilogue.

Legend: N tokens, k slots per token, S = N*k rows sorted by expert, E experts, D model width,
I expert hidden width, T = cdiv(I, min BLOCK_N) partial columns.

Reference, for each row r of expert e (token t = token_of_row[r], slot s = slot_of_row[r],
w = weights.flat[s], g = h[r, :I], u = h[r, I:], L the optional limit):
    d_act = grad_out[t] @ down[e]                        # [I], before the routing weight
    d_weight[s] = dot(d_act, act[r])                     # act = silu(min(g, L)) * clamp(u, -L, L)
    dH[r, :I] = w * d_act * clamp(u) * silu'(min(g, L)) * (g <= L)
    dH[r, I:] = w * d_act * silu(min(g, L)) * (-L <= u <= L)
The clamp masks are torch.clamp's gradient: it passes where min <= x <= max. act is recomputed
from h in the epilogue. d_weight is reduced over I tiles deterministically: each program writes
its tile's partial sum to its own column of a [S, T] fp32 buffer, which torch sums afterwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moe_kit.ops.triton.compat import wrap_triton
from moe_kit.ops.triton.configs import dot_precision, min_block_n, row_tiled_configs, rows_bucket
from moe_kit.ops.triton.schedule import GROUP_M, rows_of_block, tile_of_program


def _reference(grad_out, down, h, token_of_row, expert_of_row, slot_of_row, weights_flat, limit=None):
    """-> (dH [S, 2I], d_weight [S] in slot order), all rows kept, through torch autograd."""
    h = h.detach().requires_grad_()
    gate, up = h.chunk(2, dim=-1)
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    act = F.silu(gate) * up
    d_act = torch.einsum("sd,sdi->si", grad_out[token_of_row], down[expert_of_row])
    (d_h,) = torch.autograd.grad(act, h, d_act * weights_flat[slot_of_row].unsqueeze(1))
    d_weight = torch.zeros_like(weights_flat)
    d_weight[slot_of_row] = (d_act * act).sum(1).detach()
    return d_h, d_weight


@triton.autotune(
    configs=row_tiled_configs("swiglu_backward"), key=["D", "INTER", "BLOCK_M", "ROWS_BUCKET"],
    restore_value=["dw_ptr"],  # autotuning runs write other columns of the partials: undo them
)
@triton.jit
def _swiglu_backward_kernel(
    g_ptr, w_ptr, h_ptr, token_ptr, slot_ptr, scale_ptr, table_ptr, dh_ptr, dw_ptr,
    D, INTER, num_blocks, ROWS_BUCKET, limit,
    stride_gn, stride_gd, stride_we, stride_wd, stride_wi, stride_hs, stride_dhs, stride_dws,
    HAS_LIMIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(INTER, BLOCK_N)
    block, pid_n = tile_of_program(pid, num_blocks, num_n, GROUP_M)
    expert = tl.load(table_ptr + block)
    if expert < 0:
        return
    rows, row_ok = rows_of_block(table_ptr, block, num_blocks, BLOCK_M)
    token = tl.load(token_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < INTER
    ks = tl.arange(0, BLOCK_K)

    g_ptrs = g_ptr + token[:, None] * stride_gn + ks[None, :] * stride_gd  # [BM, BK]
    w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we
              + ks.to(tl.int64)[:, None] * stride_wd + cols.to(tl.int64)[None, :] * stride_wi)  # [BK, BN]
    d_act = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = ks < D - k0
        a = tl.load(g_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        d_act = tl.dot(a, w, d_act, input_precision=DOT_PRECISION)
        g_ptrs += BLOCK_K * stride_gd
        w_ptrs += BLOCK_K * stride_wd

    # Epilogue, ordered so few [BM, BN] tiles are live at once (register pressure): the clamp
    # masks are taken from the raw h, then only the clamped values, sigmoid and silu are kept.
    mask = row_ok[:, None] & col_ok[None, :]
    h_ptrs = h_ptr + rows[:, None] * stride_hs + cols[None, :]
    gate = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_LIMIT:
        gate_passes = gate <= limit
        gate = tl.minimum(gate, limit)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    up = tl.load(h_ptrs + INTER, mask=mask, other=0.0).to(tl.float32)
    if HAS_LIMIT:
        up_passes = (up >= -limit) & (up <= limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
    slot = tl.load(slot_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    tl.store(dw_ptr + slot * stride_dws + pid_n, tl.sum(d_act * silu * up, axis=1), mask=row_ok)

    d_act = d_act * tl.load(scale_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    dh_ptrs = dh_ptr + rows[:, None] * stride_dhs + cols[None, :]
    d_up = d_act * silu
    if HAS_LIMIT:
        d_up = tl.where(up_passes, d_up, 0.0)
    tl.store(dh_ptrs + INTER, d_up.to(dh_ptr.dtype.element_ty), mask=mask)
    d_gate = d_act * up * (sig + silu * (1.0 - sig))  # silu'(g) = sig + silu * (1 - sig)
    if HAS_LIMIT:
        d_gate = tl.where(gate_passes, d_gate, 0.0)
    tl.store(dh_ptrs, d_gate.to(dh_ptr.dtype.element_ty), mask=mask)


def swiglu_backward(
    grad_out: torch.Tensor,
    down: torch.Tensor,
    h: torch.Tensor,
    token_of_row: torch.Tensor,
    slot_of_row: torch.Tensor,
    weights_flat: torch.Tensor,
    table: torch.Tensor,
    block_m: int,
    limit: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_out [N, D], down [E, D, I], h [S, 2I], token/slot_of_row int64 [S], weights_flat [S]
    (slot order), table int32 [3, B] -> (dH [S, 2I] in h.dtype, d_weight fp32 [S] in slot order).

    Rows no block owns get dH garbage (never read) and d_weight 0.
    """
    num_rows, two_i = h.shape
    inter = two_i // 2
    d_h = torch.empty_like(h)
    num_partials = triton.cdiv(inter, min_block_n("swiglu_backward"))  # T: enough for any BLOCK_N it may pick
    partial = h.new_zeros(num_rows, num_partials, dtype=torch.float32)  # [S, T]
    if num_rows == 0:
        return d_h, partial.sum(1)
    num_blocks = table.shape[1]

    def grid(meta):
        return (num_blocks * triton.cdiv(inter, meta["BLOCK_N"]),)

    wrap_triton(_swiglu_backward_kernel)[grid](
        grad_out, down, h, token_of_row, slot_of_row, weights_flat, table, d_h, partial,
        down.shape[1], inter, num_blocks, rows_bucket(num_rows), 0.0 if limit is None else float(limit),
        grad_out.stride(0), grad_out.stride(1), down.stride(0), down.stride(1), down.stride(2),
        h.stride(0), d_h.stride(0), partial.stride(0),
        HAS_LIMIT=limit is not None, DOT_PRECISION=dot_precision(grad_out.dtype), BLOCK_M=block_m, GROUP_M=GROUP_M,
    )
    return d_h, partial.sum(1)
