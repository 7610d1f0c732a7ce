"""Grouped GEMM with a combining epilogue: GEMM 2 of the forward and dX of the backward.

Legend: N tokens, k slots per token, S = N*k rows sorted by expert, E experts, D model width,
I expert hidden width, K the reduced width, M the output width.

Reference, for each row r of expert e (slot s = slot_of_row[r], token t = token_of_row[r]):
    rows[r] = scale[s] * (a[r] @ W_e)            # a [S, K], W_e [K, M]
    GEMM 2: a = act [S, I], W_e = down[e].T,     scale = routing weights  -> out [N, D]
    dX:     a = dH  [S, 2I], W_e = gate_up[e],   no scale                 -> d_x [N, D]
    out[t] = sum of rows[r] over the rows of token t (at most k; dropped slots have no row)
Two epilogues make that per-token sum:
- scatter_gemm (deterministic): each row is stored at its slot of an [S, M] buffer, and torch
  sums buffer.view(N, k, M) over k: a fixed order, bitwise reproducible, but S*M elements of
  x.dtype are written, read back and held until the sum is done;
- combine_gemm (fused, not deterministic): the epilogue adds its rows into an fp32 [N, M]
  accumulator with tl.atomic_add (a token's k rows belong to different row blocks, mostly, and
  arrive in any order, so the fp32 rounding of the sum varies run to run); no [S, M] buffer. The
  caller casts the accumulator to the output dtype (for fp32 it is the output). Memory of the
  combine: N*M*4 bytes (+ N*M*es for the cast when es < 4) instead of S*M*es + N*M*es, i.e.
  N*M*(k*es - 4) bytes less for 16-bit inputs and N*M*k*4 for fp32 (es = bytes per element).
A deterministic fused variant was weighed and not built: k passes, pass j launching only the
rows of slot rank j (a token occurs once per pass, so the epilogue could read-modify-write out
without atomics, passes in a fixed order). Each expert's rows would then split into k row
segments, each padded to BLOCK_M: about k times as many partly filled row blocks (qwen3-30b-a3b
at 16k tokens: ~128 rows per expert and pass at BLOCK_M = 128, so about a third of the MMA work
would be padding, against ~6% with one segment of ~1024 rows per expert); every weight tile read
at least once per pass, k times in all, instead of about once per GROUP_M row blocks (up to k x
the down / gate_up traffic); and k dependent launches, each with its own tail. That costs more
than the [S, M] buffer it saves, so the deterministic combine stays scatter_gemm + sum.
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


def _combine_reference(a, w_km, expert_of_row, slot_of_row, token_of_row, num_tokens, scale=None):
    """The same rows summed per token -> [N, M] (a row whose expert is E, a dropped slot, is skipped)."""
    kept = expert_of_row < w_km.shape[0]
    rows = torch.einsum("sk,skm->sm", a[kept], w_km[expert_of_row[kept]])
    if scale is not None:
        rows = rows * scale[slot_of_row[kept]].unsqueeze(1).to(rows.dtype)
    return rows.new_zeros(num_tokens, rows.shape[1]).index_add_(0, token_of_row[kept], rows)


@triton.jit
def _expert_rows_gemm(
    a_ptr, w_ptr, expert, rows, row_ok, cols, col_ok, K,
    stride_as, stride_ak, stride_we, stride_wk, stride_wm,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The main loop both epilogues share: fp32 [BM, BN] = a[rows, :] @ W_expert[:, cols]."""
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
    return acc


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
    acc = _expert_rows_gemm(a_ptr, w_ptr, expert, rows, row_ok, cols, col_ok, K,
                            stride_as, stride_ak, stride_we, stride_wk, stride_wm,
                            DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)

    slot = tl.load(slot_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # [BM]
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + slot[:, None] * stride_os + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(
    configs=row_tiled_configs("combine_gemm"), key=["K", "M", "BLOCK_M", "ROWS_BUCKET"],
    reset_to_zero=["out_ptr"],  # every config adds into the accumulator: start each timed run (and the real one) at 0
)
@triton.jit
def _combine_gemm_kernel(
    a_ptr, w_ptr, token_ptr, slot_ptr, scale_ptr, table_ptr, out_ptr,
    K, M, num_blocks, ROWS_BUCKET,
    stride_as, stride_ak, stride_we, stride_wk, stride_wm, stride_on,
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
    acc = _expert_rows_gemm(a_ptr, w_ptr, expert, rows, row_ok, cols, cols < M, K,
                            stride_as, stride_ak, stride_we, stride_wk, stride_wm,
                            DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)

    if HAS_SCALE:
        slot = tl.load(slot_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # [BM]
        acc = acc * tl.load(scale_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    # The adds go out in two column halves: one [BM, BN] add spilled registers at BLOCK_M =
    # BLOCK_N = 128 on sm_90 (436 B), two [BM, BN / 2] adds do not.
    token = tl.load(token_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # [BM]
    row_ptrs = out_ptr + token[:, None] * stride_on  # [BM, 1]
    left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    half = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
    tl.atomic_add(row_ptrs + half[None, :], left, mask=row_ok[:, None] & (half < M)[None, :], sem="relaxed")
    half += BLOCK_N // 2
    tl.atomic_add(row_ptrs + half[None, :], right, mask=row_ok[:, None] & (half < M)[None, :], sem="relaxed")


def _w_layout(w: torch.Tensor, transpose_w: bool) -> tuple[int, int, int]:
    """-> (M, stride over K, stride over M) of w [E, M, K] (transpose_w) or [E, K, M]."""
    if transpose_w:
        return w.shape[1], w.stride(2), w.stride(1)
    return w.shape[2], w.stride(1), w.stride(2)


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
    width_m, stride_wk, stride_wm = _w_layout(w, transpose_w)
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


def combine_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    transpose_w: bool,
    token_of_row: torch.Tensor,
    slot_of_row: torch.Tensor,
    num_tokens: int,
    table: torch.Tensor,
    block_m: int,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """a [S, K] rows sorted by expert, w [E, M, K] (transpose_w) or [E, K, M], token/slot_of_row
    int64 [S], table int32 [3, B], scale [S] in slot order or None -> fp32 [N, M], each token the
    sum of its rows (atomic adds: not bitwise reproducible). The caller casts it to its dtype,
    after dropping `a` (so a and the cast output are never live together).

    Rows no block owns (dropped slots) add nothing; a token without rows is zero.
    """
    num_rows, width_k = a.shape
    width_m, stride_wk, stride_wm = _w_layout(w, transpose_w)
    acc = a.new_zeros(num_tokens, width_m, dtype=torch.float32)  # [N, M]
    if num_rows > 0:
        num_blocks = table.shape[1]

        def grid(meta):
            return (num_blocks * triton.cdiv(width_m, meta["BLOCK_N"]),)

        wrap_triton(_combine_gemm_kernel)[grid](
            a, w, token_of_row, slot_of_row, a if scale is None else scale, table, acc,
            width_k, width_m, num_blocks, rows_bucket(num_rows),
            a.stride(0), a.stride(1), w.stride(0), stride_wk, stride_wm, acc.stride(0),
            HAS_SCALE=scale is not None, DOT_PRECISION=dot_precision(a.dtype), BLOCK_M=block_m, GROUP_M=GROUP_M,
        )
    return acc
