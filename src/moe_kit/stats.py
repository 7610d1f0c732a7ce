"""Routing statistics: what each MoE layer did in its last forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RoutingStats:
    load: torch.Tensor  # int64 [E]: routed slots each expert processed (dropped slots excluded)
    aux_loss: float | None  # coef * Switch aux loss, as it enters the gradient; None when off
    z_loss: float | None  # coef * router z-loss; None when off
    dropped_fraction: float  # share of the N*k slots dropped by the capacity limit
    bias: torch.Tensor | None  # fp32 [E]: expert bias (aux-loss-free balancing), None when off

    @property
    def max_over_mean_load(self) -> float:
        """Max / mean of `load` (1.0 is perfect balance)."""
        mean = self.load.float().mean()
        return float(self.load.max() / mean) if mean > 0 else float("nan")


def routing_stats(model: nn.Module) -> dict[str, RoutingStats]:
    """{module name: RoutingStats} for every MoE layer of `model` that has run a forward."""
    found = {}
    for name, module in model.named_modules():
        stats = getattr(module, "stats", None)
        if isinstance(stats, RoutingStats):
            found[name] = stats
    return found
