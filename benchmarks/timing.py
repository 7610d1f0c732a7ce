"""Interleaved timing: every provider runs once per round, so drift hits them all alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2, on_round: Callable[[], None] | None = None
) -> dict[str, dict]:
    """{name: fn} -> {name: {"median_ms", "min_ms", "max_ms", "q1_ms", "q3_ms", "samples_ms"}}
    over `repeats` rounds. `on_round()` runs after each round (warm-up included), outside the timing."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
        if on_round is not None:
            on_round()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            samples[name].append((time.perf_counter() - start) * 1e3)
        if on_round is not None:
            on_round()
    return {name: summarize(s) for name, s in samples.items()}


def summarize(samples_ms: list[float]) -> dict:
    """Median, min, max and quartiles of a list of times in ms (quartiles = median for < 2 samples)."""
    s = list(samples_ms)
    q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else (s[0], s[0], s[0])
    return dict(median_ms=statistics.median(s), min_ms=min(s), max_ms=max(s), q1_ms=q1, q3_ms=q3, samples_ms=s)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
