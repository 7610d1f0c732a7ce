"""AllToAllDispatcher: the routed experts of an MoE layer spread over the ranks of a process group.

Legend: W ranks, E global experts, El = E / W local experts (rank r holds experts r*El .. (r+1)*El - 1),
N local tokens, k slots per token, S = N*k local slots, R rows received for our experts, D width.

    1. sort our S slots by expert (routing_plan): rows for rank 0's experts first, then rank 1's, ...
    2. exchange per-expert counts: the [W, E] count matrix gives every split size (one host sync)
    3. all_to_all the token rows x [S, D] -> [R, D], grouped by (source rank, local expert)
    4. capacity (optional): the layer's CapacityRule (moe_kit.ops.capacity, the same code as on
       one process) with C computed from the real slots of the whole group; each slot's drop
       priority (its routing weight, or its place in the group's batch) travels along (no grad) so
       the expert's owner decides; the slots it drops come back as zeros. The group drops exactly
       the slots one process drops on the ranks' batches concatenated in rank order.
    5. run the local experts module on the R rows with weight 1 (its backend; expert biases, if
       any, are this rank's slices [El, .] and ride along with each row's expert output;
       pad_to_capacity runs each local expert on exactly C rows)
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
from moe_kit.experts import GroupedExperts, expert_settings
from moe_kit.ops.dispatcher import Dispatched, Dispatcher
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
        return GroupedExperts(count, cfg.hidden_size, cfg.intermediate_size, **expert_settings(cfg))
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.default_generator.manual_seed(seed)
        experts = GroupedExperts(count, cfg.hidden_size, cfg.intermediate_size, **expert_settings(cfg))
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


def combine(y_rows: torch.Tensor, weights: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Step 6: y_rows [S, D] in plan order -> out [N, D] = sum_j weights[n, j] * y[slot n*k + j]
    (a fixed-order sum, so deterministic on every device)."""
    num_tokens, top_k = weights.shape
    y_slots = y_rows.index_select(0, plan.row_of_slot).view(num_tokens, top_k, y_rows.shape[1])  # [N, k, D]
    return (weights.to(y_rows.dtype).unsqueeze(2) * y_slots).sum(1)


# ----------------------------------------------------------------------------- the whole trip


class AllToAllDispatcher(Dispatcher):
    """The experts spread over `group` (rank r holds experts r*El .. (r+1)*El - 1): the module doc's
    steps, with the marks and CapacityRule of moe_kit.ops.dispatcher.Dispatcher (one implementation
    with the local dispatcher). Every rank of the group must call it with the same config, also with
    no tokens. After a call, `sent_rows` / `sent_bytes` count the token payload this rank sent:
    the D-vectors of its slots to the experts' ranks plus the results it sent back (rows kept on
    this rank included), in the activation dtype, plus one drop priority per slot sent under
    capacity (the count exchange, [W, E] int64, is not counted)."""

    def __init__(self, num_experts, top_k, capacity, gate_marks=False, *, group):
        super().__init__(num_experts, top_k, capacity, gate_marks)
        self.group = group
        self.sent_rows = 0
        self.sent_bytes = 0
        self.send_splits: list[int] = []  # rows this rank sent to each rank in the last call (dispatch)
        self.recv_splits: list[int] = []

    def __call__(self, x, weights, indices, experts, mask=None, batch_shape=None) -> Dispatched:
        """x [N, D], weights [N, k], indices int64 [N, k] (global ids), experts: this rank's
        GroupedExperts [El, ...], mask bool [N] or None, batch_shape: the layer input's leading shape."""
        group, num_experts = self.group, self.num_experts
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        num_local = num_experts // world
        marked = self.mark_padding(indices, mask)  # padding (id E) sorts last and never travels
        if x.is_meta:  # shapes only (every rank of a meta-built model): nothing to exchange
            return Dispatched(torch.zeros_like(x), marked, None)
        ex = plan_exchange(marked, num_experts, group)
        kept = sum(ex.send_splits)
        x_rows = x.index_select(0, ex.plan.token_of_row[:kept])  # [S_kept, D], sorted by expert
        recv_x = all_to_all(x_rows, ex.send_splits, ex.recv_splits, group)  # [R, D]
        expert = ex.local_expert
        load = ex.counts.sum(0)
        dropped = pad_to = None
        rule = self.capacity
        if rule is not None:
            capacity = rule.capacity(ex.num_slots, num_experts)
            with torch.no_grad():  # the priorities only decide which slots stay
                priority = rule.priority(weights, batch_shape or (x.shape[0],), rank, world)
                priority = all_to_all(priority.index_select(0, ex.plan.slot_of_row[:kept]), ex.send_splits,
                                      ex.recv_splits, group)  # [R]
            expert = rule.drop(priority, expert, num_local, capacity)
            load = load.clamp(max=capacity)
            dropped = ex.num_slots - load.sum()
            pad_to = rule.pad_rows(capacity)
        ones = recv_x.new_ones(recv_x.shape[0], 1, dtype=torch.float32)  # weights are applied on the way back
        y = experts(recv_x, ones, expert.unsqueeze(1), has_dropped=rule is not None, pad_to=pad_to)  # [R, D]
        y_rows = all_to_all(y, ex.recv_splits, ex.send_splits, group)  # [S_kept, D], back in plan order
        if kept < ex.plan.slot_of_row.numel():  # marked slots contribute zeros
            y_rows = torch.cat([y_rows, y_rows.new_zeros(ex.plan.slot_of_row.numel() - kept, y_rows.shape[1])])
        out = combine(y_rows, weights, ex.plan)
        self.send_splits, self.recv_splits = ex.send_splits, ex.recv_splits
        self.sent_rows = kept + sum(ex.recv_splits)  # tokens out, results back
        self.sent_bytes = self.sent_rows * x.shape[1] * x.element_size()
        if rule is not None:  # one drop priority per slot sent
            self.sent_bytes += kept * priority.element_size()
        return Dispatched(out, marked, dropped, load=load.detach(), num_slots=ex.num_slots)
