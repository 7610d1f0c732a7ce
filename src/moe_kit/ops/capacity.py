"""Expert capacity: keep at most ceil(capacity_factor * N * k / E) slots per expert.

Legend: N tokens, k slots per token, E experts. Within an expert, slots with the highest routing
weight are kept (ties: earlier token first); the others are marked dropped with id E.
"""

from __future__ import annotations

import math

import torch


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def over_capacity(weights: torch.Tensor, expert: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """bool [S]: slots beyond their expert's `capacity` when each expert keeps its heaviest slots
    (ties: earlier slot first). weights [S], expert int64 [S] in 0..num_experts-1."""
    by_weight = torch.argsort(weights, descending=True, stable=True)
    order = by_weight[torch.argsort(expert[by_weight], stable=True)]  # by expert, then weight
    counts = torch.bincount(expert, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - starts[expert[order]]
    return rank >= capacity


def drop_overflow(weights: torch.Tensor, indices: torch.Tensor, num_experts: int, capacity_factor: float):
    """weights [N, k], indices int [N, k] -> (indices with overflow slots set to E, dropped count [])."""
    num_tokens, top_k = indices.shape
    capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
    dropped = over_capacity(weights.detach().reshape(-1), indices.reshape(-1), num_experts, capacity)
    dropped = dropped.view(num_tokens, top_k)
    kept = torch.where(dropped, torch.full_like(indices, num_experts), indices)
    return kept, dropped.sum()
