"""Token dispatchers: from a routing (weights, indices) to the experts' rows and back.

Legend: N tokens, k slots per token, E experts, D model width, B sequences of T positions.

A dispatcher owns what happens between the router and the experts, for every routing scheme (it
never learns which scheme produced the routing):
    1. mark the slots that get no expert with id E: padding (token_mask False), and capacity
       overflow under the layer's CapacityRule (moe_kit.ops.capacity, the one implementation of
       capacity, drop order and pad_to_capacity)
    2. move the rows to the experts (here: nowhere; moe_kit.ep.dispatcher: all-to-all)
    3. call the experts module, experts(x_rows [R, D], weights [R, k], indices [R, k]) -> [R, D]
       (GroupedExperts.forward: module hooks fire; ops picks the backend path)
    4. combine the rows back into [N, D], weighted by the routing weights.
`LocalDispatcher` keeps every expert on this process; `moe_kit.ep.AllToAllDispatcher` spreads them
over a process group, with the same marks, capacity and drop order (the same dropped tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_kit.ops.capacity import CapacityRule


@dataclass
class Dispatched:
    """What a dispatcher returns: the routed output and what the routing statistics need."""

    out: torch.Tensor  # [N, D] routed experts' output, weighted and summed per token
    indices: torch.Tensor  # int64 [N, k] as dispatched: E marks padding, dropped and unrouted slots
    dropped: torch.Tensor | None  # int64 []: slots dropped by capacity over the group; None when dropless
    load: torch.Tensor | None = None  # int64 [E] slots per expert over the group; None: count `indices`
    num_slots: int | None = None  # real slots over the group; None: count `indices` and the mask


class Dispatcher:
    """What every dispatcher shares: the padding marks and the capacity rule.

    num_experts: E (global); capacity: the layer's CapacityRule, or None (dropless, or a routing
    scheme whose selection already is the capacity, as expert choice); gate_marks: the router's
    indices may already hold E (a slot no expert took)."""

    def __init__(self, num_experts: int, top_k: int, capacity: CapacityRule | None, gate_marks: bool = False):
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity = capacity
        self.gate_marks = gate_marks

    def mark_padding(self, indices: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """indices [N, k] with every slot of a padded token (mask False) set to E."""
        if mask is None:
            return indices
        return indices.masked_fill(~mask.unsqueeze(1), self.num_experts)

    def may_hold_marks(self, mask: torch.Tensor | None) -> bool:
        """Whether some dispatched ids may be E (the backends then skip those slots)."""
        return mask is not None or self.capacity is not None or self.gate_marks

    def real_slots(self, indices: torch.Tensor, mask: torch.Tensor | None):
        """Slots of real tokens: N*k (int), or mask.sum()*k (a 0-dim tensor: no host sync)."""
        return indices.numel() if mask is None else mask.sum() * indices.shape[1]


class LocalDispatcher(Dispatcher):
    """Every expert on this process: mark, drop over capacity, run the experts, combine (the
    experts' backends combine in their epilogue)."""

    def __call__(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        indices: torch.Tensor,
        experts,
        mask: torch.Tensor | None = None,
        batch_shape: tuple[int, ...] | None = None,
    ) -> Dispatched:
        """x [N, D], weights [N, k], indices int64 [N, k], experts: the GroupedExperts module,
        mask bool [N] or None, batch_shape: the leading shape of the layer's input (drop order)."""
        marked = self.mark_padding(indices, mask)
        if x.is_meta:  # shapes only: no routing plan can be built from meta indices
            return Dispatched(torch.zeros_like(x), marked, None)
        dropped = pad_to = None
        rule = self.capacity
        if rule is not None:
            capacity = rule.capacity(self.real_slots(indices, mask), self.num_experts)
            priority = rule.priority(weights, batch_shape or (x.shape[0],))
            flat = marked.reshape(-1)
            kept = rule.drop(priority, flat, self.num_experts, capacity)
            dropped = (kept != flat).sum()
            marked = kept.view_as(marked)
            pad_to = rule.pad_rows(capacity)  # a host read only when capacity counts a token_mask
        out = experts(x, weights, marked, has_dropped=self.may_hold_marks(mask), pad_to=pad_to)
        return Dispatched(out, marked, dropped)
