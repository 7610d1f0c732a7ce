"""MoELayer: gate + dispatch + routed experts + shared experts, a drop-in for a transformer FFN.

Legend: N tokens (all leading dims of x flattened), D model width, E experts, k experts per token.

Compute dtype: x's dtype, or autocast's inside torch.autocast (the experts then run in bf16/fp16
like any nn.Linear would, and the output has that dtype); the router always runs in
cfg.router_dtype outside autocast.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from moe_kit.config import MoEConfig
from moe_kit.ep import AllToAllDispatcher, check_same_config, expert_slice, local_experts
from moe_kit.experts import GroupedExperts, SharedExpert, expert_settings
from moe_kit.gates import ExpertChoiceGate, HashGate, SinkhornGate, TopKGate
from moe_kit.gates.router import autocast_enabled, cast, flat_token_mask
from moe_kit.ops.dispatcher import Dispatched, LocalDispatcher
from moe_kit.stats import RoutingStats


class MoELayer(nn.Module):
    """forward(x [..., D], input_ids int [...] = None, token_mask bool [...] = None) -> [..., D].

    The gate is a HashGate when cfg.hash_routing or layer_id < cfg.n_hash_layers (it then needs
    input_ids), else the gate of cfg.routing: TopKGate, ExpertChoiceGate or SinkhornGate.
    `token_mask` (True / 1 = real token, x's leading shape) leaves
    padding out of the expert-bias counts, balancing losses and stats, and gives padded tokens no
    routed expert (their routed output is 0; shared experts still run on them): the real tokens'
    outputs equal a forward of the real tokens alone. After each forward, `stats` is a RoutingStats.
    With `ep_group` (a torch.distributed group of W ranks), this rank holds experts
    r*E/W .. (r+1)*E/W - 1 and tokens travel to their experts by all-to-all (moe_kit.ep); the gate and
    shared experts are replicated, and stats/balancing losses are the group's. Every rank of the
    group must build the layer from the same config (checked once here).
    The layer keeps a frozen copy of cfg: editing the caller's config later changes nothing here.
    """

    def __init__(self, cfg: MoEConfig, layer_id: int = 0, ep_group=None):
        super().__init__()
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
        cfg = cfg.frozen_copy()
        self.cfg = cfg
        self.layer_id = layer_id
        self._ep_group = ep_group  # expert-parallel process group; None: every expert lives here
        if ep_group is not None:
            expert_slice(cfg.num_experts, ep_group)  # clear errors first: no process group, E % W != 0
            check_same_config(dict(cfg.to_dict(), layer_id=layer_id), ep_group)
        self.gate = make_gate(cfg, layer_id)
        if ep_group is None:
            self.experts = GroupedExperts(cfg.num_experts, cfg.hidden_size, cfg.intermediate_size,
                                          **expert_settings(cfg))
        else:
            self.experts = local_experts(cfg, ep_group)  # this rank's E / W experts
            self.gate.process_group = ep_group  # aux / z losses over the group's tokens
        self.shared_experts = None
        if cfg.num_shared_experts > 0:
            self.shared_experts = SharedExpert(
                cfg.hidden_size, cfg.shared_intermediate_size, cfg.shared_expert_gate, cfg.swiglu_limit, cfg.activation
            )
        self._last: dict | None = None  # detached tensors of the last forward, read by `stats`
        self.routing_hook = None  # moe_kit.record_routing / replay_routing: stands in for self.route
        self.dispatcher = self._make_dispatcher()

    @property
    def ep_group(self):
        """The expert-parallel process group (None: every expert on this process). Setting it (as
        moe_kit.distributed.parallelize does) rebuilds the dispatcher; the experts are the caller's."""
        return self._ep_group

    @ep_group.setter
    def ep_group(self, group) -> None:
        self._ep_group = group
        self.dispatcher = self._make_dispatcher()

    def _make_dispatcher(self) -> LocalDispatcher | AllToAllDispatcher:
        """LocalDispatcher, or AllToAllDispatcher over ep_group, with the capacity rule of the gate's
        routing scheme (None where its selection already is the capacity, as expert choice)."""
        cfg, gate = self.cfg, self.gate
        args = (cfg.num_experts, cfg.top_k, gate.capacity_rule(), gate.marks_unrouted)
        if self._ep_group is None:
            return LocalDispatcher(*args)
        return AllToAllDispatcher(*args, group=self._ep_group)

    def reset_parameters(self) -> None:
        """Initialize every parameter and buffer (router, expert bias and counts, hash table,
        experts, shared experts): what a layer built on the meta device needs after to_empty()."""
        self.gate.reset_parameters()
        if self.ep_group is None:
            self.experts.reset_parameters()
        elif any(hasattr(p, "to_local") for p in self.experts.parameters()):
            raise ValueError(
                "reset_parameters on a layer whose experts are DTensors (moe_kit.distributed.parallelize): "
                "initialize the model before parallelize (on the meta device: to_empty, reset_parameters, then "
                "parallelize), or load a checkpoint"
            )
        else:  # as local_experts: one seed drawn alike on every rank, then seed + rank, so ranks differ
            seed = int(torch.randint(0, 2**62, (), device="cpu")) + torch.distributed.get_rank(self.ep_group)
            with torch.random.fork_rng(devices=[]), torch.device("cpu"):
                torch.default_generator.manual_seed(seed)
                fresh = GroupedExperts(self.experts.num_experts, self.cfg.hidden_size, self.cfg.intermediate_size,
                                       **expert_settings(self.cfg))
            with torch.no_grad():
                for name, param in fresh.named_parameters():  # weights, and biases with expert_proj_bias
                    getattr(self.experts, name).copy_(param)
        if self.shared_experts is not None:
            for module in self.shared_experts.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()

    def forward(
        self, x: torch.Tensor, input_ids: torch.Tensor | None = None, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"MoELayer input must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        if x.dim() == 0 or x.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"MoELayer input must be [..., {self.cfg.hidden_size}], got shape {tuple(x.shape)}")
        batch_shape = tuple(x.shape[:-1])
        mask = flat_token_mask(token_mask, batch_shape, x.device)  # bool [N] or None
        route = self.route if self.routing_hook is None else self.routing_hook
        weights, indices = route(x, input_ids, None if mask is None else mask.view(batch_shape))  # [N, k] each
        autocast = autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype  # the experts follow autocast
        x_flat = cast(x.reshape(-1, self.cfg.hidden_size), dtype)  # [N, D]
        with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            routed = self.dispatcher(x_flat, weights, indices, self.experts, mask, batch_shape)
            out = routed.out
            if self.shared_experts is not None:
                out = out + self.shared_experts(x_flat)
        self._remember(routed, mask)
        return out.view(*batch_shape, self.cfg.hidden_size)

    def route(self, x: torch.Tensor, input_ids=None, token_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate's (weights [N, k], indices [N, k]) for x; `routing_hook` (moe_kit.replay) may stand in."""
        return self.gate(x, input_ids=input_ids, token_mask=token_mask)

    def _remember(self, routed: Dispatched, mask) -> None:
        """Keep references to the routing outcome (no work at decode sizes); `stats` counts only when read.

        routed: the dispatcher's result (indices [N, k] with E = no expert, dropped int [] or None;
        load [E] and num_slots given by expert parallelism: the group's, not this rank's);
        mask bool [N] or None."""
        gate = self.gate
        expert_bias = getattr(gate, "expert_bias", None)
        # a plain attribute: object.__setattr__ skips nn.Module's parameter / module / buffer checks,
        # microseconds that count at decode sizes
        object.__setattr__(self, "_last", dict(
            indices=routed.indices,  # integer: never part of a graph
            mask=mask,
            load=routed.load,
            slots=routed.num_slots,
            dropped=routed.dropped,
            aux_loss=gate.aux_loss,
            z_loss=gate.z_loss,
            bias=None if expert_bias is None else expert_bias.detach().clone(),
            unrouted=getattr(gate, "unrouted_fraction", None),
        ))

    @property
    def stats(self) -> RoutingStats | None:
        """Routing statistics of the last forward (None before the first one)."""
        last = self._last
        if last is None:
            return None
        num_experts = self.cfg.num_experts
        load = last["load"]
        if load is None:
            load = torch.bincount(last["indices"].reshape(-1).cpu(), minlength=num_experts + 1)[:num_experts]
        slots = last["slots"]
        if slots is None:
            mask = last["mask"]
            slots = last["indices"].numel() if mask is None else int(mask.sum()) * self.cfg.top_k
        slots = int(slots)
        dropped = 0.0 if last["dropped"] is None or slots == 0 else float(last["dropped"]) / slots
        return RoutingStats(
            load=load.cpu(),
            aux_loss=None if last["aux_loss"] is None else float(last["aux_loss"]),
            z_loss=None if last["z_loss"] is None else float(last["z_loss"]),
            dropped_fraction=dropped,
            bias=None if last["bias"] is None else last["bias"].cpu(),
            unrouted_fraction=None if last["unrouted"] is None else float(last["unrouted"]),
        )

    def extra_repr(self) -> str:
        return (f"layer_id={self.layer_id}, experts={self.cfg.num_experts}, top_k={self.cfg.top_k}, "
                f"gate={self.gate.scheme_name()}")


def make_gate(cfg: MoEConfig, layer_id: int = 0) -> nn.Module:
    """HashGate on hash layers, else the gate of cfg.routing (token_choice / expert_choice / sinkhorn)."""
    if cfg.uses_hash_gate(layer_id):
        return HashGate(cfg)
    if cfg.routing == "expert_choice":
        return ExpertChoiceGate(cfg)
    if cfg.routing == "sinkhorn":
        return SinkhornGate(cfg)
    return TopKGate(cfg)
