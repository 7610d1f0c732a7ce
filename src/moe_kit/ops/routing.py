"""Routing plan: which rows of the expert batch belong to which expert.

Legend: N tokens, k slots per token, S = N*k slots, E experts.
A slot s = n*k + j is token n's j-th choice. The plan sorts slots by expert (stable, so slots of
one expert keep token order) without any host synchronization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RoutingPlan:
    slot_of_row: torch.Tensor  # int64 [S]: row r of the sorted batch holds slot slot_of_row[r]
    token_of_row: torch.Tensor  # int64 [S]: token feeding row r (= slot_of_row // k)
    row_of_slot: torch.Tensor  # int64 [S]: inverse permutation of slot_of_row
    expert_of_row: torch.Tensor  # int64 [S]: expert of row r, non-decreasing; E marks a dropped slot
    counts: torch.Tensor  # int64 [E]: rows per expert (dropped slots not counted)
    offsets: torch.Tensor  # int64 [E + 1]: prefix sum of counts; expert e owns rows offsets[e]:offsets[e+1]
    num_experts: int
    top_k: int
    has_dropped: bool  # True when some slots may carry the drop marker E (rows past offsets[-1])
    pad_to: int | None = None  # every expert's GEMMs run on exactly pad_to rows (>= its count), or None


def routing_plan(
    indices: torch.Tensor, num_experts: int, has_dropped: bool = False, pad_to: int | None = None
) -> RoutingPlan:
    """Sort the S = N*k slots of `indices` (int [N, k], values in 0..E, E = dropped) by expert.

    pad_to: Megatron's moe_pad_expert_input_to_capacity: the expert GEMMs run on an [E, pad_to, .]
    batch (zero rows past each expert's count), static shapes whatever the routing."""
    top_k = indices.shape[1]
    flat = indices.reshape(-1).long()  # [S]
    expert_of_row, slot_of_row = torch.sort(flat, stable=True)
    row_of_slot = torch.empty_like(slot_of_row)
    row_of_slot[slot_of_row] = torch.arange(flat.numel(), device=flat.device)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount without a host sync
    counts = counts[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return RoutingPlan(
        slot_of_row=slot_of_row,
        token_of_row=torch.div(slot_of_row, top_k, rounding_mode="floor"),
        row_of_slot=row_of_slot,
        expert_of_row=expert_of_row,
        counts=counts,
        offsets=offsets,
        num_experts=num_experts,
        top_k=top_k,
        has_dropped=has_dropped,
        pad_to=pad_to,
    )
