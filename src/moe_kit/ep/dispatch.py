"""ep_moe_ffn: the routed experts of an MoE layer spread over the ranks of a process group.

Legend: W ranks, E global experts, El = E / W local experts (rank r holds experts r*El .. (r+1)*El - 1),
N local tokens, k slots per token, S = N*k local slots, R rows received for our experts, D width.

    1. sort our S slots by expert (routing_plan): rows for rank 0's experts first, then rank 1's, ...
    2. exchange per-expert counts: the [W, E] count matrix gives every split size (one host sync)
    3. all_to_all the token rows x [S, D] -> [R, D], grouped by (source rank, local expert)
    4. capacity (optional): per expert keep the C = ceil(cf * N_total * k / E) heaviest slots of the
       whole group, ties to the earlier slot of the batch concatenated in rank order; that is
       moe_kit.ops.capacity's rule on one process. The routing weights travel along (no grad) so
       the expert's owner decides; the slots it drops come back as zeros.
    5. run the local experts on the R rows with weight 1 (the configured backend; expert biases, if
       any, are this rank's slices [El, .] and ride along with each row's expert output)
    6. all_to_all the results back [R, D] -> [S, D]; combine on the source rank:
       out[n] = sum_j weights[n, j] * y[slot n*k + j]
Routing weights never leave their rank, so d(weights), hence the gate gradient, stay local and
exact; the experts get the gradient of every token of the group through step 3's backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_kit.config import MoEConfig
from moe_kit.ep.all_to_all import all_to_all, exchange_counts
from moe_kit.experts import GroupedExperts
from moe_kit.ops import dispatch
from moe_kit.ops.capacity import expert_capacity, over_capacity
from moe_kit.ops.routing import RoutingPlan, routing_plan


def expert_slice(num_experts: int, group) -> tuple[int, int]:
    """(first global expert id, number of local experts) of this rank in `group`."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("expert parallelism (ep_group) needs torch.distributed.init_process_group() first")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of ep_group")
    if num_experts % world:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by the expert-parallel world size {world}"
        )
    count = num_experts // world
    return rank * count, count


def local_experts(cfg: MoEConfig, group) -> GroupedExperts:
    """This rank's slice of the experts: GroupedExperts(E / W, D, I) (with biases under
    cfg.expert_proj_bias: rows r*El .. (r+1)*El - 1 of the single-process [E, .] biases).

    Every rank draws one seed from the global RNG (the same draw everywhere, so modules built
    later stay identical across ranks) and initializes its experts from seed + rank, so ranks hold
    different experts, as Megatron's per-EP-rank seed does. To reproduce a single-process model,
    load its weights with moe_kit.distributed.shard_state_dict.
    """
    first, count = expert_slice(cfg.num_experts, group)
    seed = int(torch.randint(0, 2**62, (), device="cpu")) + dist.get_rank(group)
    device = torch.empty(0).device  # where new parameters land (torch.set_default_device)
    if device.type == "meta":
        return GroupedExperts(count, cfg.hidden_size, cfg.intermediate_size, bias=cfg.expert_proj_bias)
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.default_generator.manual_seed(seed)
        experts = GroupedExperts(count, cfg.hidden_size, cfg.intermediate_size, bias=cfg.expert_proj_bias)
    return experts.to(device)


# ----------------------------------------------------------------------------- steps


@dataclass
class ExchangePlan:
    plan: RoutingPlan  # our S slots sorted by (global) expert
    counts: torch.Tensor  # int64 [W, E]: counts[s, e] = slots rank s routes to expert e
    send_splits: list[int]  # [W] rows we send to each rank
    recv_splits: list[int]  # [W] rows we receive from each rank
    local_expert: torch.Tensor  # int64 [R]: local expert of each received row
    num_slots: int  # N_total * k over the group


def plan_exchange(indices: torch.Tensor, num_experts: int, group) -> ExchangePlan:
    """Steps 1-2: sort our slots by expert, exchange counts, derive the splits (one host sync)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    num_local = num_experts // world
    plan = routing_plan(indices, num_experts)
    counts = exchange_counts(plan.counts, group)  # [W, E]
    rows = counts.view(world, world, num_local).sum(-1).tolist()  # rows[s][d]: from rank s to rank d
    recv_splits = [rows[s][rank] for s in range(world)]
    mine = counts[:, rank * num_local : (rank + 1) * num_local].reshape(-1)  # [W * El], (source, expert)
    local_expert = torch.repeat_interleave(
        torch.arange(num_local, device=counts.device).repeat(world), mine, output_size=sum(recv_splits)
    )
    return ExchangePlan(plan, counts, rows[rank], recv_splits, local_expert, sum(map(sum, rows)))


def global_capacity(num_slots: int, num_experts: int, capacity_factor: float) -> int:
    """ceil(cf * N_total * k / E), with num_slots = N_total * k: moe_kit.ops.capacity on the whole group."""
    return expert_capacity(num_slots, 1, num_experts, capacity_factor)


def combine(y_rows: torch.Tensor, weights: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Step 6: y_rows [S, D] in plan order -> out [N, D] = sum_j weights[n, j] * y[slot n*k + j]
    (a fixed-order sum, so deterministic on every device)."""
    num_tokens, top_k = weights.shape
    y_slots = y_rows.index_select(0, plan.row_of_slot).view(num_tokens, top_k, y_rows.shape[1])  # [N, k, D]
    return torch.bmm(weights.to(y_rows.dtype).unsqueeze(1), y_slots).squeeze(1)


# ----------------------------------------------------------------------------- the whole trip


@dataclass
class EPResult:
    out: torch.Tensor  # [N, D] local tokens' routed-expert output
    load: torch.Tensor  # int64 [E]: slots each expert processed over the group (after drops)
    dropped: torch.Tensor | None  # int64 []: slots dropped over the group; None when dropless
    num_slots: int  # N_total * k over the group
    send_splits: list[int]  # rows this rank sent to each rank (bytes: rows * D * itemsize, each way)
    recv_splits: list[int]


def ep_moe_ffn(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    group,
    backend: str = "auto",
    swiglu_limit: float | None = None,
    capacity_factor: float | None = None,
    drop_policy: str = "probs",
    activation: str = "silu",
    *,
    gate_up_proj_bias: torch.Tensor | None = None,
    down_proj_bias: torch.Tensor | None = None,
) -> EPResult:
    """Routed SwiGLU experts held across `group` (see the module doc for the steps).

    Args:
        x: [N, D] local tokens (N may be 0); weights [N, k] routing weights; indices int [N, k]
            global expert ids in 0..E-1, E = El * W; id E marks a slot that gets no expert
            (padding): it never travels, counts for no load or capacity, and contributes zero.
        gate_up_proj: [El, 2I, D] and down_proj [El, D, I]: this rank's experts, in x's dtype.
        gate_up_proj_bias [El, 2I], down_proj_bias [El, D]: their optional biases (expert_proj_bias);
            the down bias is part of the expert output, so the source rank's combine weights it.
        group: the expert-parallel process group; every rank of it must call with the same config.
        capacity_factor: None (dropless) or the factor of the group-wide capacity rule.
        activation: the gated activation of the experts (moe_kit.activations).
        drop_policy: "probs" (heaviest slots stay) or "position" (earliest slots of the batch
            concatenated in rank order stay), as moe_kit.ops.capacity on one process.
    Returns:
        EPResult with out [N, D], differentiable in x, weights and the expert tensors.
    """
    num_local = gate_up_proj.shape[0]
    num_experts = num_local * dist.get_world_size(group)
    ex = plan_exchange(indices, num_experts, group)
    kept = sum(ex.send_splits)  # slots marked E (padding) sort last and never travel
    x_rows = x.index_select(0, ex.plan.token_of_row[:kept])  # [S_kept, D], sorted by expert
    recv_x = all_to_all(x_rows, ex.send_splits, ex.recv_splits, group)  # [R, D]
    expert = ex.local_expert
    load = ex.counts.sum(0)
    dropped = None
    if capacity_factor is not None:
        capacity = global_capacity(ex.num_slots, num_experts, capacity_factor)
        with torch.no_grad():  # the weights only decide which slots stay
            w_rows = weights.reshape(-1).index_select(0, ex.plan.slot_of_row[:kept])
            recv_w = all_to_all(w_rows, ex.send_splits, ex.recv_splits, group)  # [R]
        expert = expert.masked_fill(over_capacity(recv_w, expert, num_local, capacity, drop_policy), num_local)
        load = load.clamp(max=capacity)
        dropped = ex.num_slots - load.sum()
    ones = recv_x.new_ones(recv_x.shape[0], 1, dtype=torch.float32)  # weights are applied on the way back
    y = dispatch(
        recv_x, ones, expert.unsqueeze(1), gate_up_proj, down_proj, backend, swiglu_limit,
        has_dropped=capacity_factor is not None, activation=activation,
        gate_up_proj_bias=gate_up_proj_bias, down_proj_bias=down_proj_bias,
    )  # [R, D], zeros (no bias either) for dropped rows
    y_rows = all_to_all(y, ex.recv_splits, ex.send_splits, group)  # [S_kept, D], back in plan order
    if kept < ex.plan.slot_of_row.numel():  # marked slots contribute zeros
        y_rows = torch.cat([y_rows, y_rows.new_zeros(ex.plan.slot_of_row.numel() - kept, y_rows.shape[1])])
    out = combine(y_rows, weights, ex.plan)
    return EPResult(out, load, dropped, ex.num_slots, ex.send_splits, ex.recv_splits)
