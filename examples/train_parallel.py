"""The quickstart model trained on dp x ep ranks: FSDP2 x expert parallelism on a DeviceMesh.

    torchrun --nproc-per-node 4 examples/train_parallel.py --dp 2 --ep 2
    torchrun --nproc-per-node 2 examples/train_parallel.py --dp 1 --ep 2 --steps 20

CPU (gloo) without GPUs; with GPUs NCCL, one GPU per process. Every rank builds the same
single-process model (same seed), then moe_kit.distributed.parallelize(model, mesh) keeps this
rank's experts (expert-parallel over mesh["ep"]) and FSDP2-shards the rest. Each rank trains on its
own batches (every W-th batch of one synthetic stream), clips with moe_kit.distributed.clip_grad_norm_
(torch's cannot mix the expert and dense meshes), prints the loss and the routing per layer, and
writes a DCP checkpoint (torch.distributed.checkpoint) that any other layout, or one process, loads.
See docs/scaling_out.md.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from quickstart import VOCAB, build_model, synthetic_batches
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh

import moe_kit
from moe_kit import MoELayer
from moe_kit.distributed import clip_grad_norm_, parallelize


def d_rank(dispatcher) -> int:
    """This rank's index in the dispatcher's expert-parallel group."""
    return dist.get_rank(dispatcher.group)


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size (experts sharded over it)")
    parser.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: world / dp)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--ckpt", default="checkpoints/train_parallel", help="DCP checkpoint directory")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not dist.is_initialized():  # torchrun sets the rendezvous environment
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    ep = args.ep or world // args.dp
    if args.dp * ep != world:
        raise ValueError(f"--dp {args.dp} x --ep {ep} must equal the world size {world}")
    mesh = init_device_mesh(device.type, (args.dp, ep), mesh_dim_names=("dp", "ep"))

    model = parallelize(build_model().to(device), mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = synthetic_batches(VOCAB, batch=args.batch, seq=args.seq, generator=torch.Generator().manual_seed(0))
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{world} ranks: dp {args.dp} x ep {ep} on {device.type}; {args.batch} x {args.seq} tokens per rank")

    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        for _ in range(rank + 1):  # this rank's batch: batch `rank` of each group of `world`
            inputs, targets = next(stream)
        for _ in range(world - rank - 1):
            next(stream)
        loss = F.cross_entropy(model(inputs.to(device)).flatten(0, 1), targets.to(device).flatten())
        optimizer.zero_grad()
        loss.backward()  # the balancing losses add their own gradients
        norm = clip_grad_norm_(model, args.max_norm)  # the single-process norm, experts counted once
        optimizer.step()
        moe_kit.update_expert_bias(model)  # counts summed over every rank
        if step == 1 or step % 10 == 0 or step == args.steps:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            say(f"step {step:4d}  loss {float(mean_loss) / world:.3f}  grad norm {float(norm):.3f}"
                f"  ({time.perf_counter() - start:.1f}s)")

    say("\nrouting after the last step (load over each ep group, losses of rank 0's group)")
    say(f"{'layer':<16} {'load max/mean':>13} {'dropped':>8} {'aux loss':>9} {'bias range':>17}")
    for name, stats in moe_kit.routing_stats(model).items():
        bias = "-" if stats.bias is None else f"[{stats.bias.min():+.3f}, {stats.bias.max():+.3f}]"
        aux = "-" if stats.aux_loss is None else f"{stats.aux_loss:.4f}"
        say(f"{name:<16} {stats.max_over_mean_load:>13.2f} {stats.dropped_fraction:>8.1%} {aux:>9} {bias:>17}")

    say("\nall-to-all payload of the last forward, per token per layer (mean over ranks; "
        "formula: 2 * k * D * b, of which (W - 1) / W leaves the rank under uniform routing)")
    tokens = inputs.numel()
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            d = module.dispatcher
            leaving = sum(n for r, n in enumerate(d.send_splits) if r != d_rank(d)) + \
                sum(n for r, n in enumerate(d.recv_splits) if r != d_rank(d))
            sent = torch.tensor([d.sent_bytes / tokens, leaving * d.sent_bytes / max(d.sent_rows, 1) / tokens])
            dist.all_reduce(sent)
            total, out = (sent / world).tolist()
            say(f"{name:<16} {total:>9.0f} B sent, {out:>9.0f} B leaving the rank "
                f"(formula {2 * module.cfg.top_k * module.cfg.hidden_size * 4} B, fp32)")

    dcp.save(get_model_state_dict(model), checkpoint_id=args.ckpt)
    say(f"\nDCP checkpoint in {args.ckpt} (load it under any dp x ep layout, or in one process)")
    return float(loss.detach())


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
