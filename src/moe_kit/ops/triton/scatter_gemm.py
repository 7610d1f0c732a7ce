"""Grouped GEMM with a slot-order epilogue: GEMM 2 of the forward and dX of the backward.

Legend: N tokens, k slots per token, S = N*k rows sorted by expert, E experts, D model width,
I expert hidden width, K the reduced width, M the output width.

Reference, for each row r of expert e (slot s = slot_of_row[r]):
    out[s] = scale[s] * (a[r] @ W_e)             # a [S, K], W_e [K, M], out [S, M] in slot order
    GEMM 2: a = act [S, I], W_e = down[e].T,     scale = routing weights  -> y [S, D]
    dX:     a = dH  [S, 2I], W_e = gate_up[e],   no scale                 -> dx rows [S, D]
Writing in slot order makes the per-token combine a plain sum over k of out.view(N, k, D):
deterministic, no atomics. Slots no block owns (dropped ones) are zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_kit.ops.triton.compat import wrap_triton
from moe_kit.ops.triton.configs import dot_precision, row_tiled_configs, rows_bucket
from moe_kit.ops.triton.schedule import GROUP_M, rows_of_block, tile_of_program


def _reference(a, w_km, expert_of_row, slot_of_row, scale=None):
    """a [S, K], w_km [E, K, M], expert/slot_of_row int64 [S], scale [S] (slot order) -> [S, M]."""
    rows = torch.einsum("sk,skm->sm", a, w_km[expert_of_row])
    if scale is not None:
        rows = rows * scale[slot_of_row].unsqueeze(1).to(rows.dtype)
    out = torch.zeros_like(rows)
    out[slot_of_row] = rows
    return out


@triton.autotune(configs=row_tiled_configs("scatter_gemm"), key=["K", "M", "BLOCK_M", "ROWS_BUCKET"])
@triton.jit
def _scatter_gemm_kernel(
    a_ptr, w_ptr, slot_ptr, scale_ptr, table_ptr, out_ptr,
    K, M, num_blocks, ROWS_BUCKET,
    stride_as, stride_ak, stride_we, stride_wk, stride_wm, stride_os,
    HAS_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(M, BLOCK_N)
    block, pid_n = tile_of_program(pid, num_blocks, num_n, GROUP_M)
    expert = tl.load(table_ptr + block)
    if expert < 0:
        return
    rows, row_ok = rows_of_block(table_ptr, block, num_blocks, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < M
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + rows[:, None] * stride_as + ks[None, :] * stride_ak  # [BM, BK]
    w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we
              + ks.to(tl.int64)[:, None] * stride_wk + cols.to(tl.int64)[None, :] * stride_wm)  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    slot = tl.load(slot_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # [BM]
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + slot[:, None] * stride_os + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def scatter_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    transpose_w: bool,
    slot_of_row: torch.Tensor,
    table: torch.Tensor,
    block_m: int,
    scale: torch.Tensor | None = None,
    zero_fill: bool = False,
) -> torch.Tensor:
    """a [S, K] rows sorted by expert, w [E, M, K] (transpose_w) or [E, K, M], slot_of_row int64 [S],
    table int32 [3, B], scale [S] in slot order or None -> out [S, M] in a.dtype, in slot order.

    zero_fill: start from zeros, so slots no block owns (dropped slots) read as zero.
    """
    num_rows, width_k = a.shape
    if transpose_w:
        width_m, stride_wk, stride_wm = w.shape[1], w.stride(2), w.stride(1)
    else:
        width_m, stride_wk, stride_wm = w.shape[2], w.stride(1), w.stride(2)
    out = (a.new_zeros if zero_fill else a.new_empty)(num_rows, width_m)
    if num_rows == 0:
        return out
    num_blocks = table.shape[1]

    def grid(meta):
        return (num_blocks * triton.cdiv(width_m, meta["BLOCK_N"]),)

    wrap_triton(_scatter_gemm_kernel)[grid](
        a, w, slot_of_row, a if scale is None else scale, table, out,
        width_k, width_m, num_blocks, rows_bucket(num_rows),
        a.stride(0), a.stride(1), w.stride(0), stride_wk, stride_wm, out.stride(0),
        HAS_SCALE=scale is not None, DOT_PRECISION=dot_precision(a.dtype), BLOCK_M=block_m, GROUP_M=GROUP_M,
    )
    return out
