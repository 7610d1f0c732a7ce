"""Differentiable all_to_all_single with uneven splits, and the per-expert count exchange before it.

Legend: W ranks in the group, E experts (global), R rows. Splits are Python lists of W ints:
send_splits[d] rows of x go to rank d, recv_splits[s] rows arrive from rank s (in rank order).

The backward of an all-to-all is the all-to-all of the gradient with the splits swapped. Every
rank must run the same collectives in the same order, in the backward too: a rank whose input
needs no gradient (say its x was created under requires_grad=False) must still take part in the
backward exchange, or its peers wait forever. So `all_to_all` hangs its output on an anchor that
always requires grad: with grad mode on, every rank records the node and runs its backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# a leaf that always requires grad: makes every all_to_all output part of the graph (see module doc)
_ANCHOR = torch.empty(0, requires_grad=True)


def _exchange(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group, anchor):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return _exchange(x, send_splits, recv_splits, group)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        send_splits, recv_splits = ctx.splits
        grad_x = _exchange(grad_out, recv_splits, send_splits, ctx.group)  # the reverse trip
        return grad_x, None, None, None, None


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None) -> torch.Tensor:
    """x [sum(send_splits), ...] -> [sum(recv_splits), ...]: rows x[offset_d : offset_d + send_splits[d]]
    go to rank d; the result holds rank 0's rows for us, then rank 1's, ... Differentiable in x
    (backward: the same exchange in reverse); under grad mode every rank joins the backward."""
    if torch.is_grad_enabled():
        return _AllToAll.apply(x, send_splits, recv_splits, group, _ANCHOR)
    return _exchange(x, send_splits, recv_splits, group)


@torch.no_grad()
def exchange_counts(counts: torch.Tensor, group=None) -> torch.Tensor:
    """Per-rank counts [E] -> the group's count matrix int64 [W, E]: row s = rank s's counts.

    One all-reduce of a [W, E] matrix holding only our row (all_gather_into_tensor would do, but
    its name and shape rules changed across torch versions; this runs on every backend)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    matrix = counts.new_zeros(world, counts.numel(), dtype=torch.int64)
    matrix[rank] = counts
    dist.all_reduce(matrix, group=group)
    return matrix
