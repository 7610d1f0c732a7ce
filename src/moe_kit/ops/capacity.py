"""Expert capacity: keep at most C = ceil(capacity_factor * N * k / E) slots per expert.

Legend: N tokens, k slots per token, S = N*k slots, E experts, W ranks of an expert-parallel group,
B sequences of T positions. Dropped slots are marked with id E.

This file is the one implementation of capacity, drop order and padding: the local dispatcher
(moe_kit.ops.dispatcher) and the all-to-all dispatcher (moe_kit.ep.dispatch) both call
`CapacityRule`, so the same config drops the same slots with and without expert parallelism.

Which slots an expert keeps (`drop_policy`), as a priority per slot (higher stays; ties: the earlier
slot of the batch, the ranks' batches concatenated in rank order):
  "probs"     the routing weight — Megatron's moe_token_drop_policy="probs", moe_kit's default
  "position"  the position in the batch — Megatron's moe_token_drop_policy="position" and
              transformers' Switch router. For [B, T, D] input the order is sequence-major
              (t, then rank, then b), as Megatron's [T, B] tokens: the last positions of every
              sequence drop first; flat [N, D] input keeps (rank, n) order.
C is computed exactly (moe_kit.capacity_rule: capacity_factor is the decimal it was written as) from
the real (unmasked) slots of the whole group. Megatron's float formula math.ceil((N*k / E) * cf) can
exceed it by one: cf=1.1, 400 slots, 8 experts gives 56 there and 55 here (capacity_rule lists more
cases). `pad_to_capacity` runs every expert on exactly C rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_kit.capacity_rule import capacity_of, decimal_ratio
from moe_kit.config import DROP_POLICIES

__all__ = ["CapacityRule", "capacity_of", "decimal_ratio", "expert_capacity", "over_capacity", "slot_priority"]

_ROW_BITS = 32  # position priority: (t * W + rank) << 32 | b, exact in int64 for b < 2**32, t * W < 2**31


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """ceil(capacity_factor * num_tokens * top_k / num_experts) in exact integer arithmetic."""
    return capacity_of(num_tokens * top_k, num_experts, decimal_ratio(capacity_factor))


def slot_priority(
    weights: torch.Tensor, batch_shape: tuple[int, ...], policy: str, rank: int = 0, world: int = 1
) -> torch.Tensor:
    """Priority [N*k] of each slot (higher stays): the routing weights (float, "probs"), or minus the
    slot's place in the group's batch (int64, "position"; see the module doc for the order).

    weights [N, k]; batch_shape: the leading shape of the layer's input ([B, T] or [N]); rank / world:
    this rank's place in its expert-parallel group (0 / 1 on one process)."""
    if policy not in DROP_POLICIES:
        raise ValueError(f"unknown drop_policy {policy!r}; choose from {list(DROP_POLICIES)}")
    if policy == "probs":
        return weights.detach().reshape(-1)
    top_k = weights.shape[1]
    device = weights.device
    if len(batch_shape) == 2:
        batch, seq = batch_shape
        b = torch.arange(batch, device=device).unsqueeze(1)  # [B, 1]
        t = torch.arange(seq, device=device).unsqueeze(0)  # [1, T]
        place = ((t * world + rank) << _ROW_BITS) + b  # [B, T]
    else:
        place = torch.arange(weights.shape[0], device=device) + (rank << _ROW_BITS)  # [N]
    return -place.reshape(-1).repeat_interleave(top_k)  # earliest first


def over_capacity(
    priority: torch.Tensor, expert: torch.Tensor, num_experts: int, capacity, policy: str = "probs"
) -> torch.Tensor:
    """bool [S]: slots beyond their expert's `capacity` (an int or a 0-dim tensor).

    priority [S] ranks the slots of one expert (highest first, ties: the earlier slot) under policy
    "probs"; under "position" the earlier slot always wins (priority unused). expert int64 [S] in
    0..num_experts (id num_experts: a slot already without expert, never counted against anyone's
    capacity).
    """
    if policy not in DROP_POLICIES:
        raise ValueError(f"unknown drop_policy {policy!r}; choose from {list(DROP_POLICIES)}")
    if policy == "probs":
        by_priority = torch.argsort(priority, descending=True, stable=True)
        order = by_priority[torch.argsort(expert[by_priority], stable=True)]  # by expert, then priority
    else:
        order = torch.argsort(expert, stable=True)  # by expert, then slot position
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=expert.device)
    counts.scatter_add_(0, expert, torch.ones_like(expert))  # static size: no host sync
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - starts[expert[order]]
    return (rank >= capacity) & (expert < num_experts)  # a slot without expert is never over


@dataclass(frozen=True)
class CapacityRule:
    """capacity_factor, drop_policy and pad_to_capacity of a layer, applied by every dispatcher.

    ratio: capacity_factor as an exact ratio of ints (decimal_ratio), computed once, eagerly, so
    compiled forwards need no float repr.
    """

    ratio: tuple[int, int]
    policy: str = "probs"
    pad: bool = False

    @classmethod
    def of(cls, capacity_factor: float | None, policy: str = "probs", pad: bool = False) -> CapacityRule | None:
        """The rule of a config's fields; None when dropless (capacity_factor None)."""
        if capacity_factor is None:
            if pad:
                raise ValueError("pad_to_capacity=True needs a capacity_factor (None is dropless: nothing to pad to)")
            return None
        return cls(decimal_ratio(capacity_factor), policy, pad)

    def capacity(self, num_slots, num_experts: int):
        """C for `num_slots` real slots (an int or an int64 0-dim tensor: no host sync) over E experts."""
        return capacity_of(num_slots, num_experts, self.ratio)

    def priority(self, weights: torch.Tensor, batch_shape: tuple[int, ...], rank: int = 0, world: int = 1):
        """slot_priority under this rule's policy."""
        return slot_priority(weights, batch_shape, self.policy, rank, world)

    def drop(self, priority: torch.Tensor, expert: torch.Tensor, num_experts: int, capacity) -> torch.Tensor:
        """expert int64 [S] with the slots over `capacity` set to num_experts (dropped).

        priority [S] from `priority` (position: the earlier place wins, whatever the slot order)."""
        over = over_capacity(priority, expert, num_experts, capacity, "probs")
        return expert.masked_fill(over, num_experts)

    def pad_rows(self, capacity) -> int | None:
        """Rows every expert's GEMMs run on: C under pad_to_capacity (a host read when C is a tensor), else None."""
        return int(capacity) if self.pad else None
