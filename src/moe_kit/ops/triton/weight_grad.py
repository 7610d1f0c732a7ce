"""Expert weight gradients: per expert, a sum over its rows of outer products.

Legend: N tokens, k slots per token, S = N*k rows sorted by expert, E experts, D model width,
I expert hidden width, M x P the shape of one expert's weight gradient.

Reference, for each expert e owning rows offsets[e]:offsets[e+1]:
    out[e] = sum over its rows r of (scale[r] * a[ia(r)])^T b[ib(r)]        # [M, P]
    d down[e]    [D, I]:  a = grad_out [N, D] gathered by token, scale = routing weight,
                          b = act [S, I] = silu(min(g, L)) * clamp(u, -L, L), recomputed in the
                          kernel from h [S, 2I] (g = h[:, :I], u = h[:, I:]; B_GATED): no act buffer
    d gate_up[e] [2I, D]: a = dH [S, 2I],                         b = x [N, D] gathered by token
One program owns one (expert, M tile, P tile) and loops over the expert's rows in BLOCK_K
chunks, so the reduction order is fixed (deterministic, no atomics) and an empty expert's
gradient is zeros. Gathered operands are read through token_of_row; no [S, D] copy is made.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_kit.activations import gated_activation
from moe_kit.ops.triton.compat import wrap_triton
from moe_kit.ops.triton.configs import dot_precision, rows_bucket, weight_grad_configs


def _reference(a, b, offsets, a_index=None, b_index=None, scale=None, b_gated=False, limit=None):
    """a [*, M], b [*, P] (b_gated: h [*, 2P], b = gated_activation(h)), offsets int64 [E + 1], a/b_index int64 [S]
    or None, scale [S] -> [E, M, P]."""
    a_rows = a if a_index is None else a[a_index]
    if scale is not None:
        a_rows = a_rows * scale.unsqueeze(1).to(a.dtype)
    b_rows = b if b_index is None else b[b_index]
    if b_gated:
        b_rows = gated_activation(b_rows, limit)
    bounds = offsets.tolist()
    return torch.stack([a_rows[lo:hi].t() @ b_rows[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)])


@triton.autotune(configs=weight_grad_configs(), key=["M", "P", "ROWS_BUCKET"])
@triton.jit
def _weight_grad_kernel(
    a_ptr, b_ptr, a_index_ptr, b_index_ptr, scale_index_ptr, scale_ptr, offsets_ptr, out_ptr,
    M, P, ROWS_BUCKET, limit,
    stride_ar, stride_am, stride_br, stride_bp, stride_oe, stride_om, stride_op,
    A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr, B_GATED: tl.constexpr,
    HAS_LIMIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_p = tl.cdiv(P, BLOCK_N)
    expert = pid // (num_m * num_p)
    tile = pid % (num_m * num_p)
    pid_m, pid_p = tile // num_p, tile % num_p
    row_start = tl.load(offsets_ptr + expert)
    row_end = tl.load(offsets_ptr + expert + 1)

    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ps = pid_p * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = ms < M
    p_ok = ps < P
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_K):
        rows = (r0 + ks).to(tl.int64)
        r_ok = rows < row_end
        a_rows = rows
        if A_GATHER:
            a_rows = tl.load(a_index_ptr + rows, mask=r_ok, other=0).to(tl.int64)
        b_rows = rows
        if B_GATHER:
            b_rows = tl.load(b_index_ptr + rows, mask=r_ok, other=0).to(tl.int64)
        a = tl.load(a_ptr + a_rows[None, :] * stride_ar + ms.to(tl.int64)[:, None] * stride_am,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)  # [BM, BK], a^T
        if HAS_SCALE:
            slot = tl.load(scale_index_ptr + rows, mask=r_ok, other=0).to(tl.int64)
            s = tl.load(scale_ptr + slot, mask=r_ok, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * s[None, :]).to(a_ptr.dtype.element_ty)
        b_ptrs = b_ptr + b_rows[:, None] * stride_br + ps.to(tl.int64)[None, :] * stride_bp
        b_mask = r_ok[:, None] & p_ok[None, :]
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)  # [BK, BN]
        if B_GATED:  # b is the gate half of h; the activation is recomputed from both halves
            gate = b.to(tl.float32)
            up = tl.load(b_ptrs + P * stride_bp, mask=b_mask, other=0.0).to(tl.float32)
            if HAS_LIMIT:
                gate = tl.minimum(gate, limit)
                up = tl.minimum(tl.maximum(up, -limit), limit)
            b = (gate * tl.sigmoid(gate) * up).to(b_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    out_ptrs = (out_ptr + expert.to(tl.int64) * stride_oe
                + ms.to(tl.int64)[:, None] * stride_om + ps.to(tl.int64)[None, :] * stride_op)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & p_ok[None, :])


def expert_weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    out_dtype: torch.dtype,
    a_index: torch.Tensor | None = None,
    b_index: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    scale_index: torch.Tensor | None = None,
    b_gated: bool = False,
    limit: float | None = None,
) -> torch.Tensor:
    """a [*, M], b [*, P] (same dtype), offsets int64 [E + 1]; a_index / b_index int64 [S] gather rows
    (None: row r itself); scale [*] read at scale_index[r] multiplies a's row -> [E, M, P] in out_dtype.
    b_gated: b is h [*, 2P] and the kernel uses gated_activation(h, limit) [*, P] in its place.
    """
    num_experts = offsets.numel() - 1
    width_m, width_p = a.shape[1], b.shape[1] // 2 if b_gated else b.shape[1]
    if a.numel() == 0 or b.numel() == 0:
        return a.new_zeros(num_experts, width_m, width_p, dtype=out_dtype)
    out = a.new_empty(num_experts, width_m, width_p, dtype=out_dtype)  # every entry written

    def grid(meta):
        return (num_experts * triton.cdiv(width_m, meta["BLOCK_M"]) * triton.cdiv(width_p, meta["BLOCK_N"]),)

    wrap_triton(_weight_grad_kernel)[grid](
        a, b, offsets if a_index is None else a_index, offsets if b_index is None else b_index,
        offsets if scale_index is None else scale_index, a if scale is None else scale, offsets, out,
        width_m, width_p, rows_bucket(a.shape[0] if a_index is None else a_index.shape[0]),
        0.0 if limit is None else float(limit),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
        A_GATHER=a_index is not None, B_GATHER=b_index is not None, HAS_SCALE=scale is not None,
        B_GATED=b_gated, HAS_LIMIT=limit is not None, DOT_PRECISION=dot_precision(a.dtype),
    )
    return out
