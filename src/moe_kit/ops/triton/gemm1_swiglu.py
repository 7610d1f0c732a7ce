"""Grouped GEMM 1: gathered token rows times their expert's gate_up, SwiGLU in the epilogue.

Legend: N tokens, S = N*k rows sorted by expert, E experts, D model width, I expert hidden width.

Reference, for each row r of expert e (token t = token_of_row[r]):
    h[r] = x[t] @ gate_up[e].T                          # [2I]: gate half, then up half
    act[r] = silu(min(g, L)) * clamp(u, -L, L)          # g = h[r, :I], u = h[r, I:]; no clamp when L is None
The kernel reads x rows through token_of_row (no [S, D] copy of x), keeps the gate and up
halves in two fp32 accumulators, and writes act [S, I] plus, when the backward will need it, the
pre-activation h [S, 2I] (the SwiGLU backward reads h instead of recomputing GEMM 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moe_kit.ops.triton.compat import wrap_triton
from moe_kit.ops.triton.configs import dot_precision, row_tiled_configs, rows_bucket
from moe_kit.ops.triton.schedule import GROUP_M, rows_of_block, tile_of_program


def _reference(x, gate_up, token_of_row, expert_of_row, limit=None):
    """x [N, D], gate_up [E, 2I, D], token/expert_of_row int64 [S] -> (h [S, 2I], act [S, I])."""
    h = torch.einsum("sd,smd->sm", x[token_of_row], gate_up[expert_of_row])
    gate, up = h.chunk(2, dim=-1)
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return h, F.silu(gate) * up


@triton.autotune(configs=row_tiled_configs("gemm1_swiglu"), key=["D", "INTER", "BLOCK_M", "ROWS_BUCKET"])
@triton.jit
def _gemm1_swiglu_kernel(
    x_ptr, w_ptr, token_ptr, table_ptr, h_ptr, act_ptr,
    D, INTER, num_blocks, ROWS_BUCKET, limit,
    stride_xn, stride_xd, stride_we, stride_wm, stride_wd, stride_hs, stride_as,
    HAS_LIMIT: tl.constexpr, STORE_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(INTER, BLOCK_N)
    block, pid_n = tile_of_program(pid, num_blocks, num_n, GROUP_M)
    expert = tl.load(table_ptr + block)
    if expert < 0:
        return
    rows, row_ok = rows_of_block(table_ptr, block, num_blocks, BLOCK_M)
    token = tl.load(token_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # [BM]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of act, rows of gate_up[e]
    col_ok = cols < INTER
    ks = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + token[:, None] * stride_xn + ks[None, :] * stride_xd  # [BM, BK]
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    gate_ptrs = w_base + cols.to(tl.int64)[None, :] * stride_wm + ks[:, None] * stride_wd  # [BK, BN]
    up_ptrs = w_base + (cols + INTER).to(tl.int64)[None, :] * stride_wm + ks[:, None] * stride_wd
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = ks < D - k0
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        acc_gate = tl.dot(a, tl.load(gate_ptrs, mask=w_mask, other=0.0), acc_gate, input_precision=DOT_PRECISION)
        acc_up = tl.dot(a, tl.load(up_ptrs, mask=w_mask, other=0.0), acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        gate_ptrs += BLOCK_K * stride_wd
        up_ptrs += BLOCK_K * stride_wd

    out_mask = row_ok[:, None] & col_ok[None, :]
    if STORE_H:
        h_ptrs = h_ptr + rows[:, None] * stride_hs + cols[None, :]
        tl.store(h_ptrs, acc_gate.to(h_ptr.dtype.element_ty), mask=out_mask)
        tl.store(h_ptrs + INTER, acc_up.to(h_ptr.dtype.element_ty), mask=out_mask)
    gate, up = acc_gate, acc_up
    if HAS_LIMIT:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
    act = gate * tl.sigmoid(gate) * up
    tl.store(act_ptr + rows[:, None] * stride_as + cols[None, :], act.to(act_ptr.dtype.element_ty), mask=out_mask)


def gemm1_swiglu(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    token_of_row: torch.Tensor,
    table: torch.Tensor,
    block_m: int,
    limit: float | None,
    store_h: bool,
    zero_fill: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D], gate_up [E, 2I, D], token_of_row int64 [S], table int32 [3, B]
    -> (h [S, 2I] in x.dtype, or [0, 2I] when not store_h; act [S, I] in x.dtype).

    Rows no block owns (dropped slots) are zero with zero_fill, else left unwritten.
    """
    num_rows = token_of_row.numel()
    _, two_i, hidden = gate_up.shape
    inter = two_i // 2
    alloc = x.new_zeros if zero_fill else x.new_empty
    act = alloc(num_rows, inter)
    h = alloc(num_rows if store_h else 0, two_i)
    if num_rows == 0:
        return h, act
    h_arg = h if store_h else act  # never written when not store_h; a real pointer all the same
    num_blocks = table.shape[1]

    def grid(meta):
        return (num_blocks * triton.cdiv(inter, meta["BLOCK_N"]),)

    wrap_triton(_gemm1_swiglu_kernel)[grid](
        x, gate_up, token_of_row, table, h_arg, act,
        hidden, inter, num_blocks, rows_bucket(num_rows), 0.0 if limit is None else float(limit),
        x.stride(0), x.stride(1), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2), h_arg.stride(0),
        act.stride(0),
        HAS_LIMIT=limit is not None, STORE_H=store_h, DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=block_m, GROUP_M=GROUP_M,
    )
    return h, act
