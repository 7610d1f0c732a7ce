"""FSDP2 x EP on a 2-D DeviceMesh ("dp", "ep"), torchtitan's layout, and the grad-norm clip for it.

    mesh = init_device_mesh("cuda", (dp, ep), mesh_dim_names=("dp", "ep"))
    parallelize(model, mesh)           # in place; every rank built the same model (same seed)
    loss = loss_fn(model(my_tokens))   # each rank its own tokens, loss = mean over them
    loss.backward(); clip_grad_norm_(model, 1.0); opt.step(); moe_kit.update_expert_bias(model)

Layout on W = dp * ep ranks (mesh rank = dp_rank * ep + ep_rank):
- every MoELayer is expert-parallel over mesh["ep"]: ep rank e keeps experts e*E/ep .. (e+1)*E/ep - 1,
  as DTensors Shard(0) over mesh["ep"] (the parameter names, hence the state_dict keys, are the
  single-process ones); tokens reach their experts by all-to-all inside the ep group;
- FSDP2 shards the expert parameters over mesh["dp"] (the ranks holding the same experts) and every
  other parameter (gate, shared experts, attention, embeddings) over the whole mesh.

Gradients: each rank's loss is the mean over its own N/W tokens, so the single-process gradient of
the global mean loss is (1/W) * sum over ranks of the rank gradients. Dense parameters are summed
over all W ranks by FSDP and divided by W (its default). Expert parameters already receive, through
the all-to-all's backward, the gradient of every token of their ep group; FSDP sums them over dp
only and must divide by W, not by dp (the default): that is set_gradient_divide_factor(W), as
torchtitan does. Dividing by dp would scale the expert gradients by ep (the classic bug).

Balancing losses: under EP the gate's aux / z losses are those of the ep group's tokens (see
moe_kit.group_balancing); the rank terms of a group sum to the group's loss, so their gradient
summed over W ranks and divided by W is 1/ep of the mean over ep groups. parallelize therefore
sets every gate's loss_scale (moe_kit.set_aux_loss_scale) to ep: with gradient accumulation over
M micro-batches call set_aux_loss_scale(model, ep / M) afterwards.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from moe_kit.ep import check_same_config, expert_slice
from moe_kit.layer import MoELayer

MESH_DIMS = ("dp", "ep")


def check_mesh(mesh) -> None:
    """ValueError unless `mesh` is a 2-D DeviceMesh named ("dp", "ep") that spans every rank."""
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != 2 or tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
        raise ValueError(
            f"mesh must be 2-D with dims named {MESH_DIMS}, got shape {tuple(mesh.shape)} "
            f"named {mesh.mesh_dim_names}"
        )
    if mesh.size() != dist.get_world_size():
        raise ValueError(f"mesh spans {mesh.size()} ranks, the world has {dist.get_world_size()}")


def parallelize(model: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True) -> nn.Module:
    """Make `model` expert-parallel over mesh["ep"] and FSDP2-sharded, in place (returns it).

    Every rank must hold the same single-process model (same seed or the same loaded weights):
    each keeps its slice of the experts from it. Raises ValueError for a bad mesh, a MoELayer
    already given an ep_group, or num_experts not divisible by the ep size.
    """
    check_mesh(mesh)
    ep_mesh, dp_mesh = mesh["ep"], mesh["dp"]
    ep_size, world = ep_mesh.size(), mesh.size()
    group = ep_mesh.get_group()
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        if layer.ep_group is not None:
            raise ValueError("parallelize: a MoELayer already has an ep_group; build the model without one")
        _make_expert_parallel(layer, ep_mesh, group)
        layer.gate.loss_scale = float(ep_size)  # see the module doc: balancing-loss gradients
    whole = mesh._flatten("dp_ep") if ep_size > 1 and dp_mesh.size() > 1 else (
        ep_mesh if dp_mesh.size() == 1 else dp_mesh)  # a 1-D mesh of all W ranks
    unsharded = set()  # dp = 1: expert parameters FSDP leaves alone (nothing to reduce over dp)
    for layer in layers:
        # the experts are their own unit (GroupedExperts.forward runs them), sharded over dp, their
        # gradient divided by W (not dp); the gate and shared experts go with the rest of the model
        if dp_mesh.size() > 1:
            fully_shard(layer.experts, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
            layer.experts.set_gradient_divide_factor(float(world))
        else:
            # FSDP2 on a 1-rank mesh divides float64 / float16 gradients twice (torch 2.13: the
            # pre-divide factor and then the divide factor): keep the experts out of FSDP and divide
            # their gradient by W here
            for param in layer.experts.parameters():
                unsharded.add(param)
                param.register_hook(functools.partial(torch.div, other=float(world)))
    fully_shard(model, mesh=whole, reshard_after_forward=reshard_after_forward, ignored_params=unsharded or None)
    if dist.get_backend(group) == "gloo":  # gloo has neither AVG nor PREMUL_SUM: sum, then divide
        for module in model.modules():
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)
    return model


@torch.no_grad()
def _make_expert_parallel(layer: MoELayer, ep_mesh: DeviceMesh, group) -> None:
    """Keep this rank's experts of `layer` as DTensors Shard(0) over ep_mesh; set the ep group."""
    check_same_config(dict(layer.cfg.to_dict(), layer_id=layer.layer_id), group)
    first, count = expert_slice(layer.cfg.num_experts, group)
    for name, param in list(layer.experts.named_parameters(recurse=False)):
        local = param.detach()[first : first + count].clone()
        shard = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
        setattr(layer.experts, name, nn.Parameter(shard, requires_grad=param.requires_grad))
    layer.experts.num_experts = count  # this rank's experts, as local_experts builds them
    layer.ep_group = group
    layer.gate.process_group = group


@torch.no_grad()
def clip_grad_norm_(model_or_params, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip the gradients of a parallelize()d model (or its parameters) to a total norm of max_norm.

    The total norm is the single-process one: every expert counted once, whatever the layout. Each
    rank sums the norm_type-th powers of its local gradient shards (a shard replicated over a mesh
    dim is divided by that dim's size, a plain tensor by the world size), one all-reduce over the
    default group adds them. Returns the total norm (fp32 scalar, before clipping), as
    torch.nn.utils.clip_grad_norm_.
    """
    params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    grads = [p.grad for p in params if p.grad is not None]
    norm_type = float(norm_type)
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for grad in grads:
        local, copies = grad, world
        if isinstance(grad, DTensor):
            local = grad.to_local()
            copies = math.prod(grad.device_mesh.size(i) for i, p in enumerate(grad.placements) if p.is_replicate())
        local = local.detach().float()
        if math.isinf(norm_type):
            total = torch.maximum(total, local.abs().max() if local.numel() else total)
        else:
            total = total + local.abs().pow(norm_type).sum() / copies
    if world > 1:
        dist.all_reduce(total, op=dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM)
    if not math.isinf(norm_type):
        total = total.pow(1.0 / norm_type)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        (grad.to_local() if isinstance(grad, DTensor) else grad).mul_(coef)
    return total
