"""Interleaved timing: every provider runs once per round, so drift hits them all alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, dict]:
    """{name: fn} -> {name: {"median_ms", "min_ms", "max_ms", "samples_ms"}} over `repeats` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: dict(median_ms=statistics.median(s), min_ms=min(s), max_ms=max(s), samples_ms=s)
        for name, s in samples.items()
    }


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
