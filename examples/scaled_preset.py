"""Scaling a released preset down for a CPU experiment, and why bias_update_rate must grow with it.

    python examples/scaled_preset.py [--preset deepseek-v3] [--steps 200] [--rates 1e-3 1e-2]

A full-size preset balances with expert-bias steps of 1e-3 over hundreds of thousands of steps; a
few-hundred-step CPU run needs a faster rate. This trains the same tiny MoE language model (2 MoE
layers, the preset's routing with fewer experts and groups) once per rate, same weights and
batches, and prints the worst layer's max/mean expert load on a held-out batch.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import moe_kit
from moe_kit import MoEConfig, MoELayer

VOCAB, DIM, SEQ, BATCH = 128, 64, 32, 16


def scaled(preset: str, rate: float) -> MoEConfig:
    """The preset's routing rules at CPU size: 16 experts (4 groups keep 2 where it has groups), top-4."""
    full = MoEConfig.preset(preset)
    groups = dict(n_groups=4, topk_groups=2) if full.n_groups > 1 else {}
    return MoEConfig.preset(
        preset, hidden_size=DIM, intermediate_size=32, num_experts=16, top_k=4, vocab_size=VOCAB,
        bias_update_rate=rate, n_hash_layers=0, **groups,
    )


class TinyLM(nn.Module):
    def __init__(self, cfg: MoEConfig, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.norms = nn.ModuleList(nn.RMSNorm(DIM) for _ in range(layers))
        self.moes = nn.ModuleList(MoELayer(cfg, layer_id=i) for i in range(layers))
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for norm, moe in zip(self.norms, self.moes, strict=True):
            x = x + moe(norm(x))
        return self.head(x)


def batches(steps: int, seed: int = 0):
    """Skewed synthetic text: Zipf-distributed tokens, the next token a fixed function of the previous."""
    g = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, VOCAB + 1).float()
    for _ in range(steps):
        first = torch.multinomial(probs, BATCH * SEQ, replacement=True, generator=g).view(BATCH, SEQ)
        yield first, (first * 7 + 3) % VOCAB


def skew_routers(model: nn.Module, strength: float) -> None:
    """Start from a lopsided router, as a badly initialized or drifted one: every expert's row gets
    a share of one common direction, so most tokens prefer the same few experts."""
    common = torch.randn(DIM)
    with torch.no_grad():
        for moe in model.moes:
            ranks = torch.linspace(-1.0, 1.0, moe.cfg.num_experts).unsqueeze(1)
            moe.gate.weight.add_(strength * ranks * common / DIM**0.5)


def train(preset: str, rate: float, steps: int, skew: float) -> float:
    torch.manual_seed(0)
    model = TinyLM(scaled(preset, rate))
    skew_routers(model, skew)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for ids, target in batches(steps):
        loss = F.cross_entropy(model(ids).view(-1, VOCAB), target.view(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        moe_kit.update_expert_bias(model)
    model.eval()
    with torch.no_grad():
        model(next(batches(1, seed=99))[0])
    return max(s.max_over_mean_load for s in moe_kit.routing_stats(model).values())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="deepseek-v3")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 1e-3, 1e-2])
    parser.add_argument("--skew", type=float, default=2.0, help="strength of the lopsided router init")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for rate in args.rates:
        print(f"{args.preset} scaled, bias_update_rate={rate:g}: worst-layer max/mean load after "
              f"{args.steps} steps = {train(args.preset, rate, args.steps, args.skew):.2f}", flush=True)


if __name__ == "__main__":
    main()
