"""Expert capacity: keep at most ceil(capacity_factor * N * k / E) slots per expert.

Legend: N tokens, k slots per token, E experts. Within an expert, slots with the highest routing
weight are kept (ties: earlier token first); the others are marked dropped with id E.
"""

from __future__ import annotations

import math

import torch


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def drop_overflow(weights: torch.Tensor, indices: torch.Tensor, num_experts: int, capacity_factor: float):
    """weights [N, k], indices int [N, k] -> (indices with overflow slots set to E, dropped count [])."""
    num_tokens, top_k = indices.shape
    capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
    flat_expert = indices.reshape(-1)
    by_weight = torch.argsort(weights.detach().reshape(-1), descending=True, stable=True)
    order = by_weight[torch.argsort(flat_expert[by_weight], stable=True)]  # by expert, then weight
    counts = torch.bincount(flat_expert, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - starts[flat_expert[order]]
    keep = (rank < capacity).view(num_tokens, top_k)
    kept = torch.where(keep, indices, torch.full_like(indices, num_experts))
    return kept, (~keep).sum()
