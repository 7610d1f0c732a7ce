"""Expert capacity: keep at most C = ceil(capacity_factor * N * k / E) slots per expert.

Legend: N tokens, k slots per token, S = N*k slots, E experts. Dropped slots are marked with id E.

Which slots an expert keeps (`drop_policy`):
  "probs"     the highest routing weights (ties: earlier slot first) — Megatron's
              moe_token_drop_policy="probs", moe_kit's default
  "position"  the earliest slots in batch order (token n's slots before token n+1's) — Megatron's
              moe_token_drop_policy="position" and transformers' Switch router. For [B, S, D]
              input the layer orders by position in the sequence first (s, then b), as Megatron's
              sequence-major tokens do: the last positions of every sequence drop first.
C is computed exactly (moe_kit.capacity_rule): capacity_factor is taken as the decimal it was
written as (1.1 is 11/10). Megatron's float formula math.ceil((N*k / E) * cf) can exceed it by one:
cf=1.1, 400 slots, 8 experts gives 56 there and 55 here (capacity_rule lists more cases).
"""

from __future__ import annotations

import torch

from moe_kit.capacity_rule import capacity_of, decimal_ratio

__all__ = ["DROP_POLICIES", "capacity_of", "decimal_ratio", "drop_overflow", "expert_capacity", "over_capacity"]

DROP_POLICIES = ("probs", "position")


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """ceil(capacity_factor * num_tokens * top_k / num_experts) in exact integer arithmetic."""
    return capacity_of(num_tokens * top_k, num_experts, decimal_ratio(capacity_factor))


def over_capacity(
    weights: torch.Tensor, expert: torch.Tensor, num_experts: int, capacity, policy: str = "probs"
) -> torch.Tensor:
    """bool [S]: slots beyond their expert's `capacity` (an int or a 0-dim tensor).

    weights [S] rank the slots of one expert under policy "probs" (heaviest first, ties: earlier
    slot first); under "position" the earlier slot always wins. expert int64 [S] in 0..num_experts
    (id num_experts: a slot already without expert, never counted against anyone's capacity).
    """
    if policy not in DROP_POLICIES:
        raise ValueError(f"unknown drop_policy {policy!r}; choose from {list(DROP_POLICIES)}")
    if policy == "probs":
        by_weight = torch.argsort(weights, descending=True, stable=True)
        order = by_weight[torch.argsort(expert[by_weight], stable=True)]  # by expert, then weight
    else:
        order = torch.argsort(expert, stable=True)  # by expert, then slot position
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=expert.device)
    counts.scatter_add_(0, expert, torch.ones_like(expert))  # static size: no host sync
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - starts[expert[order]]
    return (rank >= capacity) & (expert < num_experts)  # a slot without expert is never over


def drop_overflow(
    weights: torch.Tensor, indices: torch.Tensor, num_experts: int, capacity_factor: float, policy: str = "probs"
):
    """weights [N, k], indices int [N, k] -> (indices with overflow slots set to E, dropped count [])."""
    num_tokens, top_k = indices.shape
    capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
    dropped = over_capacity(weights.detach().reshape(-1), indices.reshape(-1), num_experts, capacity, policy)
    dropped = dropped.view(num_tokens, top_k)
    kept = torch.where(dropped, torch.full_like(indices, num_experts), indices)
    return kept, dropped.sum()
