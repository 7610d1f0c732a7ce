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
from moe_kit.ep import check_same_config, ep_moe_ffn, expert_slice, local_experts
from moe_kit.experts import GroupedExperts, SharedExpert
from moe_kit.gates import ExpertChoiceGate, HashGate, SinkhornGate, TopKGate
from moe_kit.gates.router import autocast_enabled, cast, flat_token_mask
from moe_kit.ops import check_backend, dispatch
from moe_kit.ops.capacity import capacity_of, decimal_ratio, over_capacity
from moe_kit.ops.torch_ops import inference_ffn, use_grouped_mm
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
        check_backend(cfg.backend)  # fail at build time on a backend we lack; the device is checked at forward
        cfg = cfg.frozen_copy()
        self.cfg = cfg
        self.layer_id = layer_id
        self.ep_group = ep_group  # expert-parallel process group; None: every expert lives here
        if ep_group is not None:
            expert_slice(cfg.num_experts, ep_group)  # clear errors first: no process group, E % W != 0
            check_same_config(dict(cfg.to_dict(), layer_id=layer_id), ep_group)
        self.gate = make_gate(cfg, layer_id)
        if ep_group is None:
            self.experts = GroupedExperts(cfg.num_experts, cfg.hidden_size, cfg.intermediate_size,
                                          bias=cfg.expert_proj_bias)
        else:
            self.experts = local_experts(cfg, ep_group)  # this rank's E / W experts
            self.gate.process_group = ep_group  # aux / z losses over the group's tokens
        self.shared_experts = None
        if cfg.num_shared_experts > 0:
            self.shared_experts = SharedExpert(
                cfg.hidden_size, cfg.shared_intermediate_size, cfg.shared_expert_gate, cfg.swiglu_limit, cfg.activation
            )
        self._last: dict | None = None  # detached tensors of the last forward, read by `stats`
        # capacity_factor as an exact ratio of ints, computed here so compiled forwards need no float repr
        self._capacity_ratio = None if cfg.capacity_factor is None else decimal_ratio(cfg.capacity_factor)
        self.routing_hook = None  # moe_kit.record_routing / replay_routing: stands in for self.route
        self._inference_ready = (  # the build-time half of _cpu_inference
            ep_group is None and cfg.capacity_factor is None and not self.gate.marks_unrouted
            and cfg.backend in ("auto", "torch") and not cfg.expert_proj_bias and cfg.deterministic is not True
        )

    def reset_parameters(self) -> None:
        """Initialize every parameter and buffer (router, expert bias and counts, hash table,
        experts, shared experts): what a layer built on the meta device needs after to_empty()."""
        self.gate.reset_parameters()
        if self.ep_group is None:
            self.experts.reset_parameters()
        else:  # as local_experts: one seed drawn alike on every rank, then seed + rank, so ranks differ
            seed = int(torch.randint(0, 2**62, (), device="cpu")) + torch.distributed.get_rank(self.ep_group)
            with torch.random.fork_rng(devices=[]), torch.device("cpu"):
                torch.default_generator.manual_seed(seed)
                fresh = GroupedExperts(self.experts.num_experts, self.cfg.hidden_size, self.cfg.intermediate_size,
                                       bias=self.cfg.expert_proj_bias)
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
        mask = flat_token_mask(token_mask, x.shape[:-1], x.device)  # bool [N] or None
        gate_mask = None if mask is None else mask.view(x.shape[:-1])
        route = self.route if self.routing_hook is None else self.routing_hook
        weights, indices = route(x, input_ids, gate_mask)
        autocast = autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype  # the experts follow autocast
        x_flat = cast(x.reshape(-1, self.cfg.hidden_size), dtype)  # [N, D]
        marked = indices if mask is None else indices.masked_fill(~mask.unsqueeze(1), self.cfg.num_experts)
        with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            if x.is_meta:  # shapes only: no routing plan can be built from meta indices
                routed = torch.zeros_like(x_flat)
            elif self.ep_group is not None:
                routed = self._routed_expert_parallel(x_flat, weights, marked, mask)
            elif mask is None and not autocast and self._cpu_inference(x_flat):
                routed = self._routed_inference(x_flat, weights, indices)
            else:
                routed = self._routed_local(x_flat, weights, marked, mask, tuple(x.shape[:-1]))
            out = routed
            if self.shared_experts is not None:
                out = out + self.shared_experts(x_flat)
        return out.view(*x.shape[:-1], self.cfg.hidden_size)

    def _cpu_inference(self, x: torch.Tensor) -> bool:
        """Whether this forward's routed experts take the eager CPU inference path
        (torch_ops.inference_ffn): no grad, CPU, not compiling, tokens present, a dtype and widths
        grouped_mm runs (forward adds: no token_mask, no autocast), and (fixed at build) local
        experts, no capacity, a gate that never marks "no expert", no expert biases, the torch
        backend. What it skips (routing plan, backward bookkeeping, the general dispatch) is a third
        of the experts' time at decode sizes."""
        cfg = self.cfg
        return (
            self._inference_ready and not torch.is_grad_enabled() and x.device.type == "cpu" and x.numel() > 0
            and not torch.compiler.is_compiling()  # compiled: the sorted FFN's custom op (host reads here)
            and use_grouped_mm(x.dtype, x.device, 2 * cfg.intermediate_size, cfg.hidden_size, cfg.intermediate_size)
        )

    def _routed_inference(self, x_flat, weights, indices):
        """_routed_local on the CPU inference path (see _cpu_inference): nothing to drop or mark."""
        dtype = x_flat.dtype
        routed = inference_ffn(x_flat, weights, indices, cast(self.experts.gate_up_proj, dtype),
                               cast(self.experts.down_proj, dtype), self.cfg.activation, self.cfg.swiglu_limit)
        self._remember(indices, None, None)
        return routed

    def route(self, x: torch.Tensor, input_ids=None, token_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate's (weights [N, k], indices [N, k]) for x; `routing_hook` (moe_kit.replay) may stand in."""
        if isinstance(self.gate, HashGate):
            return self.gate(x, input_ids, token_mask=token_mask)
        return self.gate(x, token_mask=token_mask)

    def _routed_local(self, x_flat, weights, marked, mask, batch_shape):
        """Routed experts on this process; marked [N, k] holds id E for padding, capacity overflow
        is marked here too."""
        num_experts = self.cfg.num_experts
        dropped = pad_to = None
        gate_marks = self.gate.marks_unrouted  # expert choice: E in indices, capacity applied by the gate
        if self.cfg.capacity_factor is not None and not gate_marks:
            num_real = x_flat.shape[0] if mask is None else mask.sum()  # real tokens only (a tensor: no sync)
            capacity = capacity_of(num_real * self.cfg.top_k, num_experts, self._capacity_ratio)
            ranking, policy = self._drop_ranking(weights, batch_shape)
            # padding already holds id E: it takes no expert's place and is never over capacity
            over = over_capacity(ranking, marked.reshape(-1), num_experts, capacity, policy).view_as(marked)
            dropped = over.sum()
            marked = marked.masked_fill(over, num_experts)
            if self.cfg.pad_to_capacity:  # Megatron's moe_pad_expert_input_to_capacity: [E, C, .] GEMMs
                pad_to = int(capacity)  # a host sync only when capacity counts a token_mask
        dtype = x_flat.dtype
        routed = dispatch(
            x_flat,
            weights,
            marked,
            cast(self.experts.gate_up_proj, dtype),
            cast(self.experts.down_proj, dtype),
            self.cfg.backend,
            self.cfg.swiglu_limit,
            has_dropped=mask is not None or dropped is not None or gate_marks,  # some ids may be E
            activation=self.cfg.activation,
            pad_to=pad_to,
            deterministic=self.cfg.deterministic,
            **self.experts.biases(dtype),  # None unless cfg.expert_proj_bias
        )
        self._remember(marked, dropped, mask)
        return routed

    def _drop_ranking(self, weights: torch.Tensor, batch_shape) -> tuple[torch.Tensor, str]:
        """(priority [N*k], over_capacity policy): the routing weights under drop_policy "probs";
        under "position" with [B, S] tokens, earlier sequence positions first (s, then b, as
        Megatron's sequence-major layout), else plain token order."""
        if self.cfg.drop_policy == "position" and len(batch_shape) == 2:
            batch, seq = batch_shape
            b = torch.arange(batch, device=weights.device).unsqueeze(1)
            s = torch.arange(seq, device=weights.device).unsqueeze(0)
            order = (s * batch + b).reshape(-1).repeat_interleave(self.cfg.top_k)  # [N*k]
            return -order.to(torch.float64), "probs"  # highest priority = earliest (s, b)
        return weights.detach().reshape(-1), self.cfg.drop_policy

    def _routed_expert_parallel(self, x_flat, weights, marked, mask):
        """Routed experts across ep_group (capacity, if any, per expert over the group); marked [N, k]
        holds id E for padding."""
        dtype = x_flat.dtype
        # DTensor experts (moe_kit.distributed.parallelize) run on this rank's local shard
        local = {name: t.to_local() if hasattr(t, "to_local") else t
                 for name, t in dict(gate_up_proj=self.experts.gate_up_proj, down_proj=self.experts.down_proj,
                                     **self.experts.biases()).items()}
        result = ep_moe_ffn(
            x_flat,
            weights,
            marked,
            cast(local.pop("gate_up_proj"), dtype),
            cast(local.pop("down_proj"), dtype),
            self.ep_group,
            self.cfg.backend,
            self.cfg.swiglu_limit,
            None if self.gate.marks_unrouted else self.cfg.capacity_factor,
            self.cfg.drop_policy,
            self.cfg.activation,
            # this rank's experts' biases, None unless cfg.expert_proj_bias
            **{name: None if t is None else cast(t, dtype) for name, t in local.items()},
        )
        self._remember(marked, result.dropped, mask, load=result.load.detach(), slots=result.num_slots)
        return result.out

    def _remember(self, indices, dropped, mask, load=None, slots=None) -> None:
        """Keep references to the routing outcome (no work at decode sizes); `stats` counts only when read.

        indices [N, k] (E = no expert), dropped int [] or None, mask bool [N] or None; load [E] and
        slots given by expert parallelism (the group's, not this rank's)."""
        gate = self.gate
        expert_bias = getattr(gate, "expert_bias", None)
        # a plain attribute: object.__setattr__ skips nn.Module's parameter / module / buffer checks,
        # microseconds that count at decode sizes
        object.__setattr__(self, "_last", dict(
            indices=indices,  # integer: never part of a graph
            mask=mask,
            load=load,
            slots=slots,
            dropped=dropped,
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
        gate = "hash" if isinstance(self.gate, HashGate) else self.cfg.score_func
        return f"layer_id={self.layer_id}, experts={self.cfg.num_experts}, top_k={self.cfg.top_k}, gate={gate}"


def make_gate(cfg: MoEConfig, layer_id: int = 0) -> nn.Module:
    """HashGate on hash layers, else the gate of cfg.routing (token_choice / expert_choice / sinkhorn)."""
    if cfg.uses_hash_gate(layer_id):
        return HashGate(cfg)
    if cfg.routing == "expert_choice":
        return ExpertChoiceGate(cfg)
    if cfg.routing == "sinkhorn":
        return SinkhornGate(cfg)
    return TopKGate(cfg)
