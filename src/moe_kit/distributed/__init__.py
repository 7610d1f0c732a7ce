"""Expert parallelism, the user's side: DP x EP process groups, gradient all-reduce, checkpoints.

FSDP2 x EP on a DeviceMesh ("dp", "ep"): `parallelize(model, mesh)` and `clip_grad_norm_`
(moe_kit.distributed.fsdp); what follows here is the hand-rolled DDP x EP path.

The layer does the exchange (`MoELayer(cfg, ep_group=group)`, built on `moe_kit.ep`); this top-floor
module (it imports layer, nothing imports it) holds what a training script needs around it.

How data parallel (DP) and expert parallel (EP) combine on W = DP * EP ranks, laid out as
rank = dp_rank * EP + ep_rank:

    EP group d         ranks d*EP .. d*EP + EP - 1: between them one full set of experts (ep_rank e
                       holds experts e*E/EP .. (e+1)*E/EP - 1); tokens travel by all-to-all inside it
    expert-DP group e  ranks e, EP + e, 2*EP + e, ...: the ranks holding the same experts

    W = 4, EP = 2:  EP groups {0, 1} {2, 3};  expert-DP groups {0, 2} {1, 3}

- Dense parameters (the gate, shared experts, attention, embeddings) are replicated on all W
  ranks: their gradients are summed over all W ranks.
- Expert parameters already receive, through the all-to-all, the gradient of every token of
  their EP group; they are summed over the expert-DP group only.
- Both are then divided by W when averaging (the DDP convention, each rank's loss a mean over its
  tokens). The balancing losses are built so that their gradients summed over an EP group equal
  one process's on the group's batch; under averaging call `set_aux_loss_scale(model, EP)` to
  keep their single-process weight.
- `update_expert_bias(model)` over all W ranks (the default group): the gate is replicated
  everywhere, so every replica must take the same bias step, from the counts of every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moe_kit.distributed.fsdp import check_mesh, clip_grad_norm_, parallelize  # noqa: F401 (re-exported)
from moe_kit.ep import expert_slice
from moe_kit.layer import MoELayer


@dataclass
class ParallelGroups:
    ep_group: dist.ProcessGroup  # the ranks sharing one set of experts (pass to MoELayer)
    expert_dp_group: dist.ProcessGroup  # the ranks holding the same experts as this one
    ep_size: int
    dp_size: int
    ep_rank: int
    dp_rank: int


def init_expert_parallel(ep_size: int | None = None) -> ParallelGroups:
    """Build every EP and expert-DP group (a collective: all ranks call it) and return this rank's.

    ep_size=None puts all ranks in one EP group (DP = 1). World size must be a multiple of ep_size.
    """
    if not dist.is_initialized():
        raise ValueError("init_expert_parallel needs torch.distributed.init_process_group() first")
    world, rank = dist.get_world_size(), dist.get_rank()
    ep_size = world if ep_size is None else ep_size
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"world size {world} is not a multiple of ep_size={ep_size}")
    dp_size = world // ep_size
    ep_groups = [dist.new_group(list(range(d * ep_size, (d + 1) * ep_size))) for d in range(dp_size)]
    expert_dp_groups = [dist.new_group(list(range(e, world, ep_size))) for e in range(ep_size)]
    dp_rank, ep_rank = divmod(rank, ep_size)
    return ParallelGroups(ep_groups[dp_rank], expert_dp_groups[ep_rank], ep_size, dp_size, ep_rank, dp_rank)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every expert-parallel MoELayer's experts (sharded, not replicated)."""
    return [p for m in model.modules() if _is_ep(m) for p in m.experts.parameters()]


@torch.no_grad()
def all_reduce_gradients(model: nn.Module, groups: ParallelGroups, average: bool = True) -> None:
    """Sum dense gradients over all ranks and expert gradients over `groups.expert_dp_group`
    (one flat all-reduce per group and dtype), then divide by the world size when `average`.
    Call after backward, before optimizer.step(). A missing gradient counts as zero."""
    experts = {id(p) for p in expert_parameters(model)}
    buckets: dict[tuple, list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            buckets.setdefault((id(p) in experts, p.dtype), []).append(p)
    scale = 1.0 / dist.get_world_size() if average else 1.0
    for (is_expert, _), chunk in sorted(buckets.items(), key=lambda item: (item[0][0], str(item[0][1]))):
        for p in chunk:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in chunk])
        dist.all_reduce(flat, group=groups.expert_dp_group if is_expert else None)
        flat.mul_(scale)
        for p, g in zip(chunk, flat.split([p.numel() for p in chunk]), strict=True):
            p.grad.copy_(g.view_as(p))


@torch.no_grad()
def broadcast_parameters(model: nn.Module, groups: ParallelGroups) -> None:
    """Make replicas equal before training: dense parameters (and buffers) from global rank 0,
    expert parameters from the first rank of each expert-DP group (what DDP does at wrap time)."""
    experts = {id(p) for p in expert_parameters(model)}
    for p in model.parameters():
        if id(p) in experts:
            dist.broadcast(p, src=groups.ep_rank, group=groups.expert_dp_group)
        else:
            dist.broadcast(p, src=0)
    for b in model.buffers():
        dist.broadcast(b, src=0)


def shard_state_dict(full_state_dict: dict, model: nn.Module) -> dict:
    """A single-process state_dict -> the one `model` (with expert-parallel MoELayers) loads on
    this rank: each such layer's per-expert tensors [E, ...] (`experts.gate_up_proj`, `down_proj`
    and, with expert_proj_bias, their biases) sliced to this rank's experts. Other entries are
    passed through (the same tensors)."""
    sharded = dict(full_state_dict)
    for prefix, layer in _ep_layers(model):
        first, count = expert_slice(layer.cfg.num_experts, layer.ep_group)
        for name in _expert_tensors(layer):
            key = f"{prefix}experts.{name}"
            full = full_state_dict[key]
            if full.shape[0] != layer.cfg.num_experts:
                raise ValueError(f"{key} has {full.shape[0]} experts, the layer has {layer.cfg.num_experts}")
            sharded[key] = full[first : first + count]
    return sharded


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict:
    """`model.state_dict()` with every expert-parallel layer's experts gathered to all E experts
    (a collective over each layer's ep_group: every rank calls it; each gets the full dict)."""
    state = model.state_dict()
    for prefix, layer in _ep_layers(model):
        world = dist.get_world_size(layer.ep_group)
        for name in _expert_tensors(layer):
            local = getattr(layer.experts, name).detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(parts, local, group=layer.ep_group)
            state[f"{prefix}experts.{name}"] = torch.cat(parts)
    return state


def _expert_tensors(layer: MoELayer) -> list[str]:
    """Names of the layer's per-expert parameters ([E, ...]): weights, and biases when present."""
    return [name for name, _ in layer.experts.named_parameters()]


def _is_ep(module: nn.Module) -> bool:
    return isinstance(module, MoELayer) and module.ep_group is not None


def _ep_layers(model: nn.Module):
    """(state_dict prefix, layer) of every expert-parallel MoELayer in `model`."""
    for name, module in model.named_modules():
        if _is_ep(module):
            yield (f"{name}." if name else ""), module
