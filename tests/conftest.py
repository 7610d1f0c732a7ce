"""Helpers shared by the test files (pytest puts tests/ on sys.path: `from conftest import rel_err`)."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """Normwise relative error ||a - b|| / max(||b||, floor) in float64 (absolute when that is 0).

    A floor makes a mathematically zero result (e.g. the router gradient when k = 1 and the weights
    are renormalized to 1) compare by absolute error instead of relative rounding noise.
    """
    assert a.shape == b.shape, (a.shape, b.shape)
    a, b = a.detach().double(), b.detach().double()
    diff = (a - b).norm().item()
    ref = max(b.norm().item(), floor)
    return diff / ref if ref > 0 else diff


class BmmShapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the batch shape [B, M, K] of every bmm's first operand (the padded expert GEMMs)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.bmm.default:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))
