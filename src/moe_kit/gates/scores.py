"""Router scores: logits [N, E] -> scores [N, E] (softmax, sigmoid or sqrt(softplus))."""

from __future__ import annotations

import torch


def routing_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """[N, E] logits -> [N, E] scores: softmax, sigmoid or sqrt(softplus) (finite gradient at -1e4)."""
    if score_func == "softmax":
        return logits.softmax(dim=-1)
    if score_func == "sigmoid":
        return logits.sigmoid()
    if score_func == "sqrtsoftplus":
        # softplus underflows to 0 for very negative logits; sqrt'(0) = inf would poison the gradient
        tiny = torch.finfo(logits.dtype).tiny
        return torch.nn.functional.softplus(logits).clamp(min=tiny).sqrt()
    raise ValueError(f"unknown score_func {score_func!r}")
