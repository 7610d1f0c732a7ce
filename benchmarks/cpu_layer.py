"""MoELayer forward+backward on CPU against an HF-eager per-expert loop and an equal-FLOP dense MLP.

    python benchmarks/cpu_layer.py [--tokens 2048] [--hidden 512] [--inter 256] [--experts 64] [--top-k 8]

Prints one table of medians measured in this run (interleaved repeats) and the two ratios the
project targets: >= 4x faster than the HF-eager loop, <= 1.5x the dense MLP's time.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import DenseSwiGLU, HFEagerMoEBlock  # noqa: E402
from timing import time_interleaved  # noqa: E402

from moe_kit import MoEConfig, MoELayer  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=256)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cfg = MoEConfig(args.hidden, args.inter, args.experts, args.top_k, norm_topk_prob=True, backend="torch")
    layer = MoELayer(cfg)
    hf_block = HFEagerMoEBlock(layer)
    dense = DenseSwiGLU(args.hidden, args.top_k * args.inter)
    x = torch.randn(args.tokens, args.hidden, requires_grad=True)
    grad = torch.randn(args.tokens, args.hidden)

    ours, theirs = layer(x), hf_block(x)
    err = ((ours - theirs).norm() / theirs.norm()).item()
    if err > 1e-5:
        raise SystemExit(f"moe_kit and the HF-eager block disagree (normwise error {err:.2e})")

    def fwd_bwd(module):
        def run():
            x.grad = None
            module.zero_grad(set_to_none=True)
            module(x).backward(grad)
        return run

    results = time_interleaved(
        {"moe_kit (torch)": fwd_bwd(layer), "hf_eager loop": fwd_bwd(hf_block), "dense SwiGLU k*I": fwd_bwd(dense)},
        repeats=args.repeats,
    )
    flops = 3 * 6 * args.tokens * args.top_k * args.hidden * args.inter  # fwd + bwd, active experts only
    print(
        f"MoELayer fwd+bwd on CPU ({torch.get_num_threads()} threads, torch {torch.__version__}): "
        f"T={args.tokens} D={args.hidden} I={args.inter} E={args.experts} k={args.top_k}"
    )
    print("| provider | median ms | min-max ms | GFLOP/s |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        gflops = flops / r["median_ms"] / 1e6
        print(f"| {name} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | {gflops:.0f} |")
    ours_ms = results["moe_kit (torch)"]["median_ms"]
    speedup = results["hf_eager loop"]["median_ms"] / ours_ms
    vs_dense = ours_ms / results["dense SwiGLU k*I"]["median_ms"]
    print(f"speed-up over hf_eager loop: {speedup:.2f}x (target >= 4x)")
    print(f"time relative to dense SwiGLU: {vs_dense:.2f}x (target <= 1.5x)")
    return dict(results=results, speedup_vs_hf=speedup, time_vs_dense=vs_dense)


if __name__ == "__main__":
    main()
