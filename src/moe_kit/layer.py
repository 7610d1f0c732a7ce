"""MoELayer: gate + dispatch + routed experts + shared experts, a drop-in for a transformer FFN.

Legend: N tokens (all leading dims of x flattened), D model width, E experts, k experts per token.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_kit.config import MoEConfig
from moe_kit.ep import ep_moe_ffn, local_experts
from moe_kit.experts import GroupedExperts, SharedExpert
from moe_kit.gates import HashGate, TopKGate
from moe_kit.ops import check_backend, dispatch
from moe_kit.ops.capacity import drop_overflow
from moe_kit.stats import RoutingStats


class MoELayer(nn.Module):
    """forward(x [..., D], input_ids int [...] = None) -> [..., D] in x's dtype.

    The gate is a HashGate when cfg.hash_routing or layer_id < cfg.n_hash_layers (it then needs
    input_ids), a TopKGate otherwise. After each forward, `stats` is a RoutingStats.
    With `ep_group` (a torch.distributed group of W ranks), this rank holds experts
    r*E/W .. (r+1)*E/W - 1 and tokens travel to their experts by all-to-all (moe_kit.ep); the gate and
    shared experts are replicated, and stats/balancing losses are the group's.
    """

    def __init__(self, cfg: MoEConfig, layer_id: int = 0, ep_group=None):
        super().__init__()
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
        check_backend(cfg.backend)  # fail at build time on a backend we lack; the device is checked at forward
        self.cfg = cfg
        self.layer_id = layer_id
        self.gate = HashGate(cfg) if cfg.uses_hash_gate(layer_id) else TopKGate(cfg)
        self.ep_group = ep_group  # expert-parallel process group; None: every expert lives here
        if ep_group is None:
            self.experts = GroupedExperts(cfg.num_experts, cfg.hidden_size, cfg.intermediate_size)
        else:
            self.experts = local_experts(cfg, ep_group)  # this rank's E / W experts
            self.gate.process_group = ep_group  # aux / z losses over the group's tokens
        self.shared_experts = None
        if cfg.num_shared_experts > 0:
            self.shared_experts = SharedExpert(
                cfg.hidden_size, cfg.shared_intermediate_size, cfg.shared_expert_gate, cfg.swiglu_limit
            )
        self._last: dict | None = None  # detached tensors of the last forward, read by `stats`

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"MoELayer input must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        if x.dim() == 0 or x.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"MoELayer input must be [..., {self.cfg.hidden_size}], got shape {tuple(x.shape)}")
        if isinstance(self.gate, HashGate):
            weights, indices = self.gate(x, input_ids)
        else:
            weights, indices = self.gate(x)
        x_flat = x.reshape(-1, self.cfg.hidden_size)  # [N, D]
        if self.ep_group is not None:
            return self._forward_expert_parallel(x, x_flat, weights, indices)
        dropped = None
        if self.cfg.capacity_factor is not None:
            indices, dropped = drop_overflow(weights, indices, self.cfg.num_experts, self.cfg.capacity_factor)
        out = dispatch(
            x_flat,
            weights,
            indices,
            self.experts.gate_up_proj.to(x.dtype),
            self.experts.down_proj.to(x.dtype),
            self.cfg.backend,
            self.cfg.swiglu_limit,
            has_dropped=dropped is not None,
        )
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_flat)
        self._remember(indices, dropped)
        return out.view(x.shape)

    def _forward_expert_parallel(self, x, x_flat, weights, indices) -> torch.Tensor:
        """Routed experts across ep_group (capacity, if any, per expert over the group), shared experts here."""
        result = ep_moe_ffn(
            x_flat,
            weights,
            indices,
            self.experts.gate_up_proj.to(x.dtype),
            self.experts.down_proj.to(x.dtype),
            self.ep_group,
            self.cfg.backend,
            self.cfg.swiglu_limit,
            self.cfg.capacity_factor,
        )
        out = result.out
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_flat)
        self._remember(indices, result.dropped)
        self._last.update(load=result.load.detach(), slots=result.num_slots)  # the group's, not this rank's
        return out.view(x.shape)

    @torch.no_grad()
    def _remember(self, indices: torch.Tensor, dropped: torch.Tensor | None) -> None:
        """Keep the routing outcome as tensors; `stats` turns them into numbers only when read."""
        load = torch.zeros(self.cfg.num_experts + 1, dtype=torch.long, device=indices.device)
        load.scatter_add_(0, indices.reshape(-1), torch.ones_like(indices.reshape(-1)))
        self._last = dict(
            load=load[: self.cfg.num_experts],
            slots=indices.numel(),
            dropped=dropped,
            aux_loss=self.gate.aux_loss,
            z_loss=self.gate.z_loss,
            bias=None if self.gate.bias is None else self.gate.bias.clone(),
        )

    @property
    def stats(self) -> RoutingStats | None:
        """Routing statistics of the last forward (None before the first one)."""
        last = self._last
        if last is None:
            return None
        dropped = 0.0 if last["dropped"] is None or last["slots"] == 0 else float(last["dropped"]) / last["slots"]
        return RoutingStats(
            load=last["load"].cpu(),
            aux_loss=None if last["aux_loss"] is None else float(last["aux_loss"]),
            z_loss=None if last["z_loss"] is None else float(last["z_loss"]),
            dropped_fraction=dropped,
            bias=None if last["bias"] is None else last["bias"].cpu(),
        )

    def extra_repr(self) -> str:
        gate = "hash" if isinstance(self.gate, HashGate) else self.cfg.score_func
        return f"layer_id={self.layer_id}, experts={self.cfg.num_experts}, top_k={self.cfg.top_k}, gate={gate}"
