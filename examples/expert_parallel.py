"""Expert parallelism (combined with data parallelism) under torchrun: a tiny MoE language model
trained for a few steps on synthetic text, each rank feeding its own batches.

    torchrun --nproc_per_node 2 examples/expert_parallel.py              # EP = 2, DP = 1
    torchrun --nproc_per_node 4 examples/expert_parallel.py --ep-size 2  # EP = 2, DP = 2

The same file runs on CPU (gloo) and on GPUs (nccl, one GPU per process), picked by
torch.cuda.is_available().

How the two kinds of parallelism combine on W = DP x EP ranks (rank = dp_rank * EP + ep_rank):
- An EP group (EP consecutive ranks) holds one full set of experts between them: ep_rank e holds
  experts e*E/EP .. (e+1)*E/EP - 1. `MoELayer(cfg, ep_group=groups.ep_group)` sends each token to
  the rank owning its expert and back (all-to-all); the gate is replicated on every rank.
- Dense parameters (embedding, gate, shared expert, head) are replicated on all W ranks: their
  gradients are all-reduced over all W ranks. Expert parameters already hold the gradient of every
  token of their EP group; they are all-reduced only over the DP ranks holding the same experts
  (the expert-DP group). `moe_kit.distributed.all_reduce_gradients` does both, averaged over W.
- Averaging divides the balancing losses' gradient (which sums over the EP group) by EP too much,
  so `set_aux_loss_scale(model, EP)` restores their single-process weight.
- The gate's expert bias must stay equal on all W replicas: `update_expert_bias(model)` all-reduces
  the expert counts over the default group (all ranks) after every optimizer step.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import moe_kit
from moe_kit import MoEConfig, MoELayer
from moe_kit.distributed import all_reduce_gradients, broadcast_parameters, init_expert_parallel


class TinyMoELM(nn.Module):
    """Embedding -> residual MoE FFN (expert parallel) -> head; ids [B, S] -> logits [B, S, vocab]."""

    def __init__(self, vocab: int, cfg: MoEConfig, ep_group):
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg.hidden_size)
        self.norm = nn.RMSNorm(cfg.hidden_size)
        self.mlp = MoELayer(cfg, ep_group=ep_group)
        self.head = nn.Linear(cfg.hidden_size, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        x = x + self.mlp(self.norm(x))
        return self.head(x)


def batches(vocab: int, batch: int, seq: int, rank: int, device):
    """Endless batches from one fixed Markov chain (4 likely successors per token); each rank draws
    its own sequences."""
    chain = torch.randint(0, vocab, (vocab, 4), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1 + rank)
    while True:
        ids = torch.empty(batch, seq + 1, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
        for t in range(seq):
            ids[:, t + 1] = chain[ids[:, t], torch.randint(0, 4, (batch,), generator=gen)]
        yield ids[:, :-1].to(device), ids[:, 1:].to(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep-size", type=int, default=None, help="ranks per expert-parallel group (default: all)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = init_expert_parallel(args.ep_size)

    vocab = 256
    cfg = MoEConfig(
        hidden_size=64, intermediate_size=128, num_experts=8, top_k=2, num_shared_experts=1,
        score_func="sigmoid", expert_bias=True, aux_loss_coef=1e-3,  # DeepSeek-V3 style, small
    )
    torch.manual_seed(0)  # same dense weights everywhere; each EP rank draws its own experts
    model = TinyMoELM(vocab, cfg, groups.ep_group).to(device)
    broadcast_parameters(model, groups)  # replicas start equal whatever the seeds (as DDP does)
    moe_kit.set_aux_loss_scale(model, groups.ep_size)  # gradients are averaged over W below
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = batches(vocab, batch=8, seq=32, rank=rank, device=device)

    for step in range(args.steps):
        ids, targets = next(data)
        loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
        loss.backward()
        all_reduce_gradients(model, groups)  # dense over all ranks, experts over their DP group
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        moe_kit.update_expert_bias(model)  # counts from every rank: the gate is replicated on all
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss (rank 0) {loss.item():.3f}", flush=True)

    stats = model.mlp.stats  # load and aux loss are the EP group's; tokens are this rank's
    first = groups.ep_rank * cfg.num_experts // groups.ep_size
    for r in range(world):
        if r == rank:
            print(
                f"rank {rank} (dp {groups.dp_rank}, ep {groups.ep_rank}): experts {first}.."
                f"{first + model.mlp.experts.num_experts - 1} on {device.type}, {ids.numel()} tokens, "
                f"loss {loss.item():.3f}, group load {stats.load.tolist()}, "
                f"max/mean {stats.max_over_mean_load:.2f}, aux {stats.aux_loss:.2e}, "
                f"bias [{stats.bias.min():+.3f}, {stats.bias.max():+.3f}]",
                flush=True,
            )
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
