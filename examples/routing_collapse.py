"""Routing collapse and its cures: one tiny MoE language model trained five ways on CPU.

    python examples/routing_collapse.py [--steps 300] [--out routing_collapse]

The same model (same initial weights, same batches) is trained with
  none      softmax top-k routing and no balancing at all,
  aux_loss  the same plus the Switch load-balancing loss (aux_loss_coef),
  noaux_tc  the same plus DeepSeek's aux-loss-free expert bias (update_expert_bias after each step),
  sinkhorn  top-k of the Sinkhorn-balanced scores in training (Megatron's "sinkhorn"; eval: plain top-k),
  expert_choice  each expert takes its top C = ceil(k * N / E) tokens of the batch (Zhou et al. 2022):
            balanced by construction, same expert FLOPs as top-k; not causal (routing sees the whole batch).
A moe_kit.stats.RoutingMonitor records every layer's expert load at every step. Writes
  OUT/collapse.json        per mode: final max/mean load (held-out batch), loss, routing history
  OUT/collapse.png         per mode a heatmap of layers x experts load over steps, and max/mean load
  OUT/load_<mode>.png      one mode's heatmap and per-layer curves (RoutingMonitor.plot)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import moe_kit
from moe_kit import MoEConfig, MoELayer
from moe_kit.stats import RoutingMonitor, plot_routing

MODES = ("none", "aux_loss", "noaux_tc", "sinkhorn", "expert_choice")


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
    def __init__(self, vocab: int, dim: int, heads: int, cfg: MoEConfig, num_layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, MoELayer(cfg, i)) for i in range(num_layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):  # ids [B, S] -> logits [B, S, vocab]
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def markov_chain(vocab: int, seed: int) -> torch.Tensor:
    """[vocab, 4] successors of each token, drawn Zipf-distributed (a few tokens are frequent, as in text)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.multinomial(_zipf(vocab).expand(vocab, vocab), 4, replacement=False, generator=gen)


def markov_batches(successors: torch.Tensor, batch: int, seq: int, seed: int):
    """Endless (inputs, targets) [batch, seq] from the chain: the next token is one of the 4 successors
    of the current one, uniformly, so the best possible loss is log 4."""
    vocab = successors.shape[0]
    gen = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.empty(batch, seq + 1, dtype=torch.long)
        ids[:, 0] = torch.multinomial(_zipf(vocab), batch, replacement=True, generator=gen)
        for t in range(seq):
            pick = torch.randint(0, 4, (batch,), generator=gen)
            ids[:, t + 1] = successors[ids[:, t], pick]
        yield ids[:, :-1], ids[:, 1:]


def _zipf(vocab: int) -> torch.Tensor:
    return 1.0 / torch.arange(1, vocab + 1, dtype=torch.float)


def base_config(args) -> MoEConfig:
    """A plain softmax router, or (--preset) a released model's routing scaled down to this model:
    its scores, normalization, route scale and shared experts; groups shrunk to at most 4 (keeping
    half); its own balancing switched off, so each mode adds exactly one."""
    sizes = dict(hidden_size=args.dim, intermediate_size=args.inter, num_experts=args.experts, top_k=args.top_k)
    if args.preset is None:
        return MoEConfig(**sizes, score_func="softmax")
    full = MoEConfig.preset(args.preset)
    groups = min(full.n_groups, 4)
    return MoEConfig.preset(
        args.preset, **sizes, n_groups=groups, topk_groups=max(1, groups // 2), n_hash_layers=0,
        hash_routing=False, expert_bias=False, aux_loss_coef=0.0, aux_loss_type="global", z_loss_coef=0.0,
        capacity_factor=None, pad_to_capacity=False, jitter_eps=0.0, swiglu_limit=None, activation="silu",
    )


def mode_config(mode: str, args) -> MoEConfig:
    base = base_config(args)
    if mode == "aux_loss":
        return base.replace(aux_loss_coef=args.aux_coef)
    if mode == "noaux_tc":
        return base.replace(expert_bias=True, bias_update_rate=args.bias_rate)
    if mode == "sinkhorn":
        return base.replace(routing="sinkhorn")
    if mode == "expert_choice":  # capacity factor k: E * C = k * N expert slots, as top-k uses
        return base.replace(routing="expert_choice", capacity_factor=float(args.top_k))
    return base


def train(mode: str, args) -> dict:
    torch.manual_seed(args.seed)  # same initial weights in every mode
    model = TinyMoELM(args.vocab, args.dim, args.heads, mode_config(mode, args), args.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    chain = markov_chain(args.vocab, seed=args.seed)  # one chain; training and held-out batches differ
    batches = markov_batches(chain, args.batch, args.seq, seed=args.seed)
    held_out = next(markov_batches(chain, 4 * args.batch, args.seq, seed=args.seed + 1))
    monitor = RoutingMonitor(model)
    losses = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        inputs, targets = next(batches)
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()  # the aux loss (mode aux_loss) adds its own gradient
        optimizer.step()
        moe_kit.update_expert_bias(model)  # no-op unless mode noaux_tc
        losses.append(loss.item())
        monitor.record(step)
        if step == 1 or step % max(1, args.steps // 5) == 0 or step == args.steps:
            worst = max(r["max_over_mean"] or 0 for r in monitor.history[-args.layers:])
            print(f"  {mode:<13} step {step:4d}  loss {loss.item():.3f}  worst max/mean load {worst:.2f}"
                  f"  ({time.perf_counter() - start:.1f}s)", flush=True)
    monitor.close()

    model.eval()  # final routing and loss on a held-out batch, the same for every mode
    with torch.no_grad():
        inputs, targets = held_out
        eval_loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).item()
    final = {name: s.max_over_mean_load for name, s in moe_kit.routing_stats(model).items()}
    unrouted = [float(m.unrouted_fraction) for m in model.modules()
                if getattr(m, "unrouted_fraction", None) is not None]
    tail = losses[-max(1, len(losses) // 10):]
    return dict(
        max_over_mean_load=max(final.values()),  # worst layer, held-out batch
        max_over_mean_load_per_layer=final,
        mean_max_over_mean_load=sum(final.values()) / len(final),
        loss=sum(tail) / len(tail),  # mean training loss over the last 10% of steps
        eval_loss=eval_loss,
        unrouted_fraction=max(unrouted) if unrouted else None,  # expert choice: share of tokens no expert took
        train_max_over_mean_load=max(r["max_over_mean"] or 0 for r in monitor.history[-args.layers:]),  # last step
        loss_curve=losses,
        seconds=time.perf_counter() - start,
        history=monitor.history,
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="routing_collapse")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--inter", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--aux-coef", type=float, default=1e-2)
    parser.add_argument("--bias-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default=None,
                        help="route as this MoEConfig preset does, scaled down (e.g. deepseek-v3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (this small a model is fastest on 1)")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {list(MODES)}")
    os.makedirs(args.out, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = {}
        for mode in modes:
            print(f"training with balancing = {mode}", flush=True)
            results[mode] = train(mode, args)
    finally:
        torch.set_num_threads(threads)

    summary = {
        mode: {k: v for k, v in r.items() if k not in ("history", "loss_curve")} for mode, r in results.items()
    }
    with open(os.path.join(args.out, "collapse.json"), "w") as f:
        json.dump(dict(settings=vars(args), loss_floor=math.log(4), summary=summary,
                       modes={mode: r for mode, r in results.items()}), f)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: skipping the PNGs (pip install moe-kit[plot])")
    else:
        plot_routing({m: r["history"] for m, r in results.items()}, os.path.join(args.out, "collapse.png"), dpi=90,
                     title=f"{args.layers} MoE layers, {args.experts} experts, top-{args.top_k}, "
                           f"{args.preset or 'softmax'} router: no balancing vs aux loss vs aux-loss-free bias "
                           f"vs Sinkhorn vs expert choice")
        for mode, r in results.items():
            monitor = RoutingMonitor()
            monitor.history = r["history"]
            monitor.plot(os.path.join(args.out, f"load_{mode}.png"), title=f"balancing: {mode}")

    print(f"\n{'mode':<13} {'max/mean load (worst layer)':>28} {'mean over layers':>17} {'train loss':>11} "
          f"{'eval loss':>10} {'unrouted':>9} {'last train step':>16}")
    for mode, s in summary.items():
        unrouted = "-" if s["unrouted_fraction"] is None else f"{s['unrouted_fraction']:.3f}"
        print(f"{mode:<13} {s['max_over_mean_load']:>28.2f} {s['mean_max_over_mean_load']:>17.2f} "
              f"{s['loss']:>11.3f} {s['eval_loss']:>10.3f} {unrouted:>9} {s['train_max_over_mean_load']:>16.2f}")
    print(f"(loss floor of the data: log 4 = {math.log(4):.3f}; 'last train step': worst layer's max/mean load in the "
          "last training step, where sinkhorn routes by the balanced scores; the other columns are eval mode, "
          f"where it routes by plain top-k; wrote {args.out}/collapse.json and PNGs)")
    return summary


if __name__ == "__main__":
    main()
