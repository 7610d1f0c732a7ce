"""The routed SwiGLU FFN as two torch.library custom ops, forward and backward, tied by autograd.

Legend: N tokens, k slots per token, S = N*k rows sorted by expert, E experts, D model width,
I expert hidden width, B row blocks of the tile schedule, es bytes per element of x.dtype.

Reference: moe_kit.ops.loop.moe_ffn_loop. Forward (kernels in this package):
    h, act = gemm1_swiglu(x[token_of_row], gate_up)                  # [S, 2I], [S, I]
    deterministic:  y   = scatter_gemm(act, down^T, scale=weights)   # [S, D] in slot order
                    out = y.view(N, k, D).sum(1)                     # fixed-order combine
    otherwise:      out = combine_gemm(act, down^T, scale=weights)   # fp32 [N, D] atomic adds, cast
Backward:
    dH, d_weights = swiglu_backward(grad_out[token_of_row] @ down, h)  # d_weights = <that, act>: no y
    d_down        = expert_weight_grad((weights * grad_out[token])^T swiglu(h))   # act recomputed in-kernel
    d_gate_up     = expert_weight_grad(dH^T x[token])
    d_x           = scatter_gemm(dH, gate_up).view(N, k, D).sum(1)     # deterministic
                    combine_gemm(dH, gate_up)                          # otherwise
Saved for the backward: x (the caller's), the weights and h [S, 2I] only: act is a forward
temporary (the weight-gradient kernel recomputes it from h), x[token] is never materialized
(the kernels read x through token_of_row), and y is never needed (the routing-weight gradient
is d_act . act, computed from grad_out, down and h).
Written, besides h and act: on the deterministic path the slot-order buffers y [S, D] (forward)
and d_x rows [S, D] (backward), S*D*es bytes each, held until their sum over k; on the fused
path only an fp32 [N, D] accumulator each (the output itself when x is fp32), so each pass
allocates N*D*(k*es - 4) bytes less for 16-bit x (k*N*D*4 less for fp32). `deterministic` is a
bool argument of both ops; moe_ffn_triton decides it (see there).
Both ops are `torch.library.triton_op`s where torch has them, so torch.compile traces through to
the kernels (plain opaque custom_ops under the Triton interpreter, see compat.py);
`moe_kit::routed_swiglu_fwd` carries the autograd formula (register_autograd).
"""

from __future__ import annotations

import torch

from moe_kit.ops.triton.compat import define_op
from moe_kit.ops.triton.gemm1_swiglu import gemm1_swiglu
from moe_kit.ops.triton.scatter_gemm import combine_gemm, scatter_gemm
from moe_kit.ops.triton.swiglu_backward import swiglu_backward
from moe_kit.ops.triton.weight_grad import expert_weight_grad

Tensor = torch.Tensor


def _fwd_fake(x, weights, gate_up, down, token_of_row, slot_of_row, offsets, table, swiglu_limit, block_m,
              has_dropped, deterministic, save_h):
    num_rows, inter = token_of_row.shape[0], down.shape[2]
    return x.new_empty(x.shape), x.new_empty(num_rows if save_h else 0, 2 * inter)


@define_op("moe_kit::routed_swiglu_fwd", fake=_fwd_fake)
def routed_swiglu_fwd(
    x: Tensor,
    weights: Tensor,
    gate_up: Tensor,
    down: Tensor,
    token_of_row: Tensor,
    slot_of_row: Tensor,
    offsets: Tensor,
    table: Tensor,
    swiglu_limit: float | None,
    block_m: int,
    has_dropped: bool,
    deterministic: bool,
    save_h: bool,
) -> tuple[Tensor, Tensor]:
    """x [N, D], weights [N, k], gate_up [E, 2I, D], down [E, D, I], token/slot_of_row int64 [S],
    offsets int64 [E + 1], table int32 [3, B] (built for block_m)
    -> (out [N, D], h [S, 2I] or [0, 2I] unless save_h), both in x.dtype; rows of dropped slots
    (has_dropped) are zero in h. deterministic: combine in slot order through a [S, D] buffer
    (bitwise reproducible); else the fused atomic combine (no [S, D] buffer; out varies in its
    last bits run to run on a GPU).
    """
    num_tokens, top_k = weights.shape
    h, act = gemm1_swiglu(x, gate_up, token_of_row, table, block_m, swiglu_limit, save_h, zero_fill=has_dropped)
    weights_flat = weights.contiguous().view(-1)  # [S], slot order
    if deterministic:
        y = scatter_gemm(act, down, True, slot_of_row, table, block_m, scale=weights_flat,
                         zero_fill=has_dropped)  # [S, D]
        del act  # not live during the sum
        return y.view(num_tokens, top_k, x.shape[1]).sum(1), h
    acc = combine_gemm(act, down, True, token_of_row, slot_of_row, num_tokens, table, block_m,
                       scale=weights_flat)  # fp32 [N, D]
    del act  # not live during the cast
    return acc.to(x.dtype), h


def _bwd_fake(grad_out, x, weights, gate_up, down, h, token_of_row, slot_of_row, offsets, table, swiglu_limit,
              block_m, has_dropped, deterministic, need_x, need_weights, need_gate_up, need_down):
    def grad_like(t, needed):
        return t.new_empty(t.shape if needed else (0,))

    return (grad_like(x, need_x), grad_like(weights, need_weights), grad_like(gate_up, need_gate_up),
            grad_like(down, need_down))


@define_op("moe_kit::routed_swiglu_bwd", fake=_bwd_fake)
def routed_swiglu_bwd(
    grad_out: Tensor,
    x: Tensor,
    weights: Tensor,
    gate_up: Tensor,
    down: Tensor,
    h: Tensor,
    token_of_row: Tensor,
    slot_of_row: Tensor,
    offsets: Tensor,
    table: Tensor,
    swiglu_limit: float | None,
    block_m: int,
    has_dropped: bool,
    deterministic: bool,
    need_x: bool,
    need_weights: bool,
    need_gate_up: bool,
    need_down: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """grad_out [N, D] and the forward's inputs and saved h -> (d_x [N, D], d_weights [N, k],
    d_gate_up [E, 2I, D], d_down [E, D, I]), each in its input's dtype; an unneeded one is empty [0].
    deterministic: d_x through the slot-order [S, D] buffer, else the fused atomic combine.
    """
    num_tokens, top_k = weights.shape
    grad_out = grad_out.to(x.dtype)
    weights_flat = weights.contiguous().view(-1)  # [S], slot order
    empty = x.new_empty(0)
    d_x, d_weights, d_gate_up, d_down = empty, weights.new_empty(0), gate_up.new_empty(0), down.new_empty(0)
    if need_down:
        d_down = expert_weight_grad(grad_out, h, offsets, down.dtype, a_index=token_of_row,
                                    scale=weights_flat, scale_index=slot_of_row, b_gated=True, limit=swiglu_limit)
    if need_x or need_weights or need_gate_up:
        d_h, d_w = swiglu_backward(grad_out, down, h, token_of_row, slot_of_row, weights_flat, table, block_m,
                                   swiglu_limit)
        if need_weights:
            d_weights = d_w.view(num_tokens, top_k).to(weights.dtype)
        if need_gate_up:
            d_gate_up = expert_weight_grad(d_h, x, offsets, gate_up.dtype, b_index=token_of_row)
        if need_x and deterministic:
            d_x_slots = scatter_gemm(d_h, gate_up, False, slot_of_row, table, block_m, zero_fill=has_dropped)
            del d_h  # not live during the sum
            d_x = d_x_slots.view(num_tokens, top_k, x.shape[1]).sum(1)
        elif need_x:
            d_x_acc = combine_gemm(d_h, gate_up, False, token_of_row, slot_of_row, num_tokens, table, block_m)
            del d_h  # not live during the cast
            d_x = d_x_acc.to(x.dtype)
    return d_x, d_weights, d_gate_up, d_down


def _setup_context(ctx, inputs, output):
    (x, weights, gate_up, down, token_of_row, slot_of_row, offsets, table, limit, block_m, has_dropped,
     deterministic, _) = inputs
    _, h = output
    ctx.save_for_backward(x, weights, gate_up, down, h, token_of_row, slot_of_row, offsets, table)
    ctx.limit, ctx.block_m, ctx.has_dropped, ctx.deterministic = limit, block_m, has_dropped, deterministic
    ctx.mark_non_differentiable(h)


def _backward(ctx, grad_out, _grad_h):
    x, weights, gate_up, down, h, token_of_row, slot_of_row, offsets, table = ctx.saved_tensors
    need = ctx.needs_input_grad[:4]
    grads = torch.ops.moe_kit.routed_swiglu_bwd(
        grad_out, x, weights, gate_up, down, h, token_of_row, slot_of_row, offsets, table,
        ctx.limit, ctx.block_m, ctx.has_dropped, ctx.deterministic, *need,
    )
    return (*(g if n else None for g, n in zip(grads, need, strict=True)), *(None,) * 9)


routed_swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)
