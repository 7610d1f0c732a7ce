"""moe_kit quickstart: a tiny transformer whose FFNs are MoELayers, trained on synthetic text.

    python examples/quickstart.py [--steps 60]

Layer 0: sigmoid router + aux-loss-free expert bias + one shared expert (DeepSeek-V3 style).
Layer 1: softmax router + Switch aux loss + capacity factor (Switch / Mixtral style).
Prints the loss while training and a routing table per layer at the end.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import moe_kit
from moe_kit import MoEConfig, MoELayer


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MoE FFN."""

    def __init__(self, dim: int, heads: int, moe: MoELayer):
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.ffn_norm = nn.RMSNorm(dim)
        self.mlp = moe
        self.heads = heads

    def forward(self, x):  # x [B, S, D]
        batch, seq, dim = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(batch, seq, 3, self.heads, -1).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, seq, dim))
        return x + self.mlp(self.ffn_norm(x))


class TinyMoELM(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, layers: list[MoELayer]):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, moe) for moe in layers)
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):  # ids [B, S] -> logits [B, S, vocab]
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def synthetic_batches(vocab: int, batch: int, seq: int, generator: torch.Generator):
    """Endless batches from a fixed random Markov chain: each token has 4 likely successors."""
    successors = torch.randint(0, vocab, (vocab, 4), generator=generator)
    while True:
        ids = torch.empty(batch, seq + 1, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=generator)
        for t in range(seq):
            pick = torch.randint(0, 4, (batch,), generator=generator)
            ids[:, t + 1] = successors[ids[:, t], pick]
        yield ids[:, :-1], ids[:, 1:]


VOCAB = 256


def build_model() -> TinyMoELM:
    """The quickstart model (seed 0): a DeepSeek-style layer and a Switch-style layer."""
    torch.manual_seed(0)
    dim, heads = 128, 4
    deepseek_style = MoEConfig(
        hidden_size=dim, intermediate_size=64, num_experts=16, top_k=2,
        num_shared_experts=1, score_func="sigmoid", expert_bias=True, bias_update_rate=1e-2,
    )
    switch_style = MoEConfig(
        hidden_size=dim, intermediate_size=64, num_experts=16, top_k=2,
        score_func="softmax", aux_loss_coef=1e-2, z_loss_coef=1e-3, capacity_factor=1.25,
    )
    return TinyMoELM(VOCAB, dim, heads, [MoELayer(deepseek_style, 0), MoELayer(switch_style, 1)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = synthetic_batches(VOCAB, batch=16, seq=64, generator=torch.Generator().manual_seed(0))

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        inputs, targets = next(batches)
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()  # the balancing losses add their own gradients; nothing to add here
        optimizer.step()
        moe_kit.update_expert_bias(model)  # aux-loss-free balancing: after every optimizer step
        if step == 1 or step % 10 == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - start:.1f}s)")

    print("\nrouting after the last step")
    print(f"{'layer':<16} {'load max/mean':>13} {'dropped':>8} {'aux loss':>9} {'bias range':>17}")
    for name, stats in moe_kit.routing_stats(model).items():
        bias = "-" if stats.bias is None else f"[{stats.bias.min():+.3f}, {stats.bias.max():+.3f}]"
        aux = "-" if stats.aux_loss is None else f"{stats.aux_loss:.4f}"
        print(
            f"{name:<16} {stats.max_over_mean_load:>13.2f} {stats.dropped_fraction:>8.1%} {aux:>9} {bias:>17}"
        )


if __name__ == "__main__":
    main()
