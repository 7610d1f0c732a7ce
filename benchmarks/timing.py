"""Interleaved timing: every provider runs once per round, in a random order, so drift and
neighbours hit them all alike; optionally steady-state samples and a cache flush."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

import torch


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2, on_round: Callable[[], None] | None = None,
    flush_bytes: int = 0, min_sample_ms: float = 0.0, seed: int = 0,
) -> dict[str, dict]:
    """{name: fn} -> {name: {"median_ms", "min_ms", "max_ms", "q1_ms", "q3_ms", "samples_ms", "calls"}}
    over `repeats` rounds. `on_round()` runs after each round (warm-up included), outside the timing.

    Every round runs the providers in a fresh (seeded) random order: with a fixed order one
    provider always follows the same neighbour, e.g. a slow one that flushes the caches, while
    another always follows one reading the same weights. min_sample_ms > 0 measures the steady
    state: each sample is one untimed call, then the mean of as many back-to-back calls as fill
    about min_sample_ms (`calls`, from the last warm-up call; at least one), so what the previous
    provider left behind (caches, CPU clocks after heavy vector work) is not timed. flush_bytes > 0
    (CPU): before every sample, write a scratch buffer that size (untimed), so the sample starts
    with the weights in memory rather than in cache (with min_sample_ms, only its untimed call does).
    """
    scratch = torch.empty(flush_bytes // 4, dtype=torch.float32) if flush_bytes > 0 else None
    order = random.Random(seed)
    last_ms = {}
    for _ in range(max(warmup, 1 if min_sample_ms > 0 else 0)):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            last_ms[name] = (time.perf_counter() - start) * 1e3
        if on_round is not None:
            on_round()
    calls = {name: max(1, round(min_sample_ms / max(last_ms.get(name, 1.0), 1e-3))) if min_sample_ms > 0 else 1
             for name in fns}
    names = list(fns)
    samples = {name: [] for name in fns}
    for r in range(repeats):
        for name in order.sample(names, len(names)):
            fn, count = fns[name], calls[name]
            if scratch is not None:
                scratch.fill_(float(r))
            if min_sample_ms > 0:
                fn()  # steady state: the previous provider's leftovers are not timed
            _sync()
            start = time.perf_counter()
            for _ in range(count):
                fn()
            _sync()
            samples[name].append((time.perf_counter() - start) * 1e3 / count)
        if on_round is not None:
            on_round()
    return {name: dict(summarize(s), calls=calls[name]) for name, s in samples.items()}


def add_sampling_args(parser) -> None:
    """--flush-mib and --min-sample-ms, the sampling options of time_interleaved, on an argparse parser."""
    parser.add_argument("--flush-mib", type=int, default=0,
                        help="CPU: write a scratch buffer this big before every sample, so every provider reads its "
                             "weights from memory as each layer of a deep model does (0: off)")
    parser.add_argument("--min-sample-ms", type=float, default=5.0,
                        help="a sample is the mean of as many back-to-back calls as fill this long (0: one call)")


def summarize(samples_ms: list[float]) -> dict:
    """Median, min, max and quartiles of a list of times in ms (quartiles = median for < 2 samples)."""
    s = list(samples_ms)
    q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else (s[0], s[0], s[0])
    return dict(median_ms=statistics.median(s), min_ms=min(s), max_ms=max(s), q1_ms=q1, q3_ms=q3, samples_ms=s)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
