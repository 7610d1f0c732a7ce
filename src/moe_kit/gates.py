"""Routers: TopKGate (score-based top-k) and HashGate (token id -> fixed experts).

Legend: N tokens, D model width, E experts, k experts per token, B sequences of S tokens.
Router math runs in cfg.router_dtype (fp32 by default) whatever the model dtype.
Balancing losses and the expert-bias update live in moe_kit.balancing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from moe_kit.balancing import attach_loss, is_recomputing, switch_aux_loss, z_loss
from moe_kit.config import MoEConfig
from moe_kit.group_balancing import group_balancing_losses
from moe_kit.stats import score_entropy


def routing_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """[N, E] logits -> [N, E] scores: softmax, sigmoid or sqrt(softplus) (finite gradient at -1e4)."""
    if score_func == "softmax":
        return logits.softmax(dim=-1)
    if score_func == "sigmoid":
        return logits.sigmoid()
    if score_func == "sqrtsoftplus":
        # softplus underflows to 0 for very negative logits; sqrt'(0) = inf would poison the gradient
        tiny = torch.finfo(logits.dtype).tiny
        return torch.nn.functional.softplus(logits).clamp(min=tiny).sqrt()
    raise ValueError(f"unknown score_func {score_func!r}")


class _Router(nn.Module):
    """Shared by both gates: the router weight, scores, weight normalization and balancing losses."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        self.loss_scale = 1.0  # multiplies the balancing-loss gradients (see set_aux_loss_scale)
        self.aux_loss: torch.Tensor | None = None  # coef * Switch aux loss of the last forward
        self.z_loss: torch.Tensor | None = None  # coef * z-loss of the last forward
        self.process_group = None  # set by MoELayer(ep_group=...): losses use the group's statistics
        self.track_entropy = False  # set by moe_kit.stats.RoutingMonitor
        self.entropy: torch.Tensor | None = None  # detached mean router entropy of the last forward, if tracked

    def _flat_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"router input must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        if x.dim() == 0 or x.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"router input must be [..., {self.cfg.hidden_size}], got shape {tuple(x.shape)}")
        return x.reshape(-1, self.cfg.hidden_size)

    def _logits(self, x_flat: torch.Tensor) -> torch.Tensor:
        dtype = self.cfg.router_dtype
        return torch.nn.functional.linear(x_flat.to(dtype), self.weight.to(dtype))  # [N, E]

    def _finish_weights(self, scores, indices, logits, batch_shape) -> torch.Tensor:
        """Gather the unbiased scores of the chosen experts, normalize, scale, attach the losses."""
        if self.track_entropy:
            self.entropy = score_entropy(scores)
        weights = scores.gather(1, indices)  # [N, k]
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        weights = weights * self.cfg.route_scale
        self.aux_loss = self.z_loss = None
        total = None
        if self.process_group is not None:  # expert parallel: every rank joins, even with no tokens
            self.aux_loss, self.z_loss, total = group_balancing_losses(
                self.cfg, scores, indices, logits, batch_shape, self.process_group
            )
            if total is not None and torch.is_grad_enabled():
                weights = attach_loss(weights, total, self.loss_scale)
            return weights
        if scores.shape[0] == 0:  # no tokens: nothing to balance
            return weights
        if self.cfg.aux_loss_coef > 0:
            aux = self.cfg.aux_loss_coef * switch_aux_loss(
                scores, indices, self.num_experts, self.cfg.aux_loss_type, batch_shape
            )
            self.aux_loss, total = aux.detach(), aux
        if self.cfg.z_loss_coef > 0:
            z = self.cfg.z_loss_coef * z_loss(logits)
            self.z_loss = z.detach()
            total = z if total is None else total + z
        if total is not None and torch.is_grad_enabled():
            weights = attach_loss(weights, total, self.loss_scale)
        return weights

    def _check_sequence_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        if self.cfg.aux_loss_coef > 0 and self.cfg.aux_loss_type == "sequence" and x.dim() != 3:
            raise ValueError(
                f"aux_loss_type='sequence' needs input shaped [B, S, D], got shape {tuple(x.shape)}"
            )
        return tuple(x.shape[:-1])


class TopKGate(_Router):
    """Top-k token-choice router (softmax / sigmoid / sqrtsoftplus, bias, groups, scaling).

    forward(x [..., D]) -> (weights fp32 [N, k], indices int64 [N, k]), N = x[..., 0].numel().
    With cfg.expert_bias, `bias` [E] (fp32 buffer) steers selection only, and every training
    forward adds the chosen experts to `expert_counts` [E] for moe_kit.update_expert_bias.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        if cfg.expert_bias:
            self.register_buffer("bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
            self.register_buffer("expert_counts", torch.zeros(cfg.num_experts, dtype=torch.float32), persistent=False)
        else:
            self.bias = None
            self.expert_counts = None

    def _apply(self, fn, recurse=True):
        """model.to(bf16) must not round the bias and counts: they stay fp32, only change device."""
        super()._apply(fn, recurse)
        for name in ("bias", "expert_counts"):
            if self._buffers.get(name) is not None:
                self._buffers[name] = self._buffers[name].float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_shape = self._check_sequence_shape(x)
        logits = self._logits(self._flat_input(x))  # [N, E]
        scores = routing_scores(logits, self.cfg.score_func)
        choice = scores.detach()
        if self.bias is not None:
            choice = choice + self.bias.to(choice.dtype)
        if self.cfg.n_groups > 1:
            choice = self._limit_groups(choice)
        indices = choice.topk(self.top_k, dim=-1).indices  # [N, k]
        if self.expert_counts is not None and self.training and not is_recomputing():
            with torch.no_grad():
                self.expert_counts += torch.bincount(indices.reshape(-1), minlength=self.num_experts).float()
        return self._finish_weights(scores, indices, logits, batch_shape), indices

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Mask to -inf every expert outside the token's best topk_groups groups."""
        num_tokens, groups = choice.shape[0], self.cfg.n_groups
        grouped = choice.view(num_tokens, groups, self.num_experts // groups)  # [N, G, E/G]
        if self.bias is None:
            group_scores = grouped.amax(dim=-1)
        else:  # DeepSeek-V3: sum of each group's two best biased scores
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        best = group_scores.topk(self.cfg.topk_groups, dim=-1).indices  # [N, topk_groups]
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, best, False)
        return grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).view(num_tokens, self.num_experts)


class HashGate(_Router):
    """Hash router (DeepSeek-V4 first layers): experts = tid2eid[input_ids], weights from scores.

    forward(x [..., D], input_ids int [...] matching x's leading shape)
    -> (weights fp32 [N, k], indices int64 [N, k]).
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        if cfg.vocab_size is None:
            raise ValueError("HashGate needs cfg.vocab_size")
        table = hash_table(cfg.vocab_size, cfg.num_experts, cfg.top_k)
        self.register_buffer("tid2eid", table)
        self.bias = None
        self.expert_counts = None

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch_shape = self._check_sequence_shape(x)
        x_flat = self._flat_input(x)
        ids = self._check_ids(input_ids, x_flat.shape[0])
        logits = self._logits(x_flat)
        scores = routing_scores(logits, self.cfg.score_func)
        indices = self.tid2eid[ids]  # [N, k]
        return self._finish_weights(scores, indices, logits, batch_shape), indices

    def _check_ids(self, input_ids, num_tokens: int) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("hash routing needs input_ids (the token ids of x)")
        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
        if input_ids.numel() != num_tokens:
            raise ValueError(f"input_ids has {input_ids.numel()} ids but x has {num_tokens} tokens")
        ids = input_ids.reshape(-1).to(self.tid2eid.device).long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise ValueError(
                f"input_ids must lie in [0, vocab_size={self.cfg.vocab_size}), "
                f"got min {int(ids.min())} max {int(ids.max())}"
            )
        return ids


def hash_table(vocab_size: int, num_experts: int, top_k: int, seed: int = 0) -> torch.Tensor:
    """Balanced token-id -> experts table, int64 [vocab_size, top_k], distinct experts per row.

    The V*k slots are filled from a chain of random permutations of the experts, so every
    expert appears once per permutation (loads differ by at most one permutation's worth). Where
    a token's row straddles two permutations, the next permutation puts experts the row already
    holds at its end, keeping the row distinct.
    """
    if top_k > num_experts or top_k < 1:
        raise ValueError(f"top_k={top_k} must be in 1..num_experts={num_experts}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    rng = np.random.default_rng(seed)
    total = vocab_size * top_k
    chunks, filled, open_row = [], 0, np.empty(0, dtype=np.int64)
    while filled < total:
        perm = rng.permutation(num_experts)
        if open_row.size:
            taken = np.isin(perm, open_row)
            perm = np.concatenate([perm[~taken], perm[taken]])
        chunks.append(perm)
        filled += num_experts
        open_row = perm[perm.size - filled % top_k:]  # the row still being filled
    slots = np.concatenate(chunks)[:total]
    return torch.from_numpy(slots.reshape(vocab_size, top_k).astype(np.int64))


@torch.no_grad()
def update_expert_bias(model: nn.Module, process_group=None) -> None:
    """Aux-loss-free balancing step (noaux_tc); call after optimizer.step().

    Sums every gate's `expert_counts` over `process_group` (the default group when
    torch.distributed is initialized and no group is given; no communication otherwise), then
    per gate: bias += rate * sign(mean_load - load), clamped to +-bias_max, and resets the counts.
    """
    gates = [m for m in model.modules() if isinstance(m, TopKGate) and m.bias is not None]
    if not gates:
        return
    counts = torch.cat([gate.expert_counts for gate in gates])  # one all-reduce for all layers
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts, group=process_group)
    for gate, load in zip(gates, counts.split([g.num_experts for g in gates]), strict=True):
        step = gate.cfg.bias_update_rate * torch.sign(load.mean() - load)
        gate.bias.add_(step).clamp_(-gate.cfg.bias_max, gate.cfg.bias_max)
        gate.expert_counts.zero_()


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Scale the gradient the balancing losses add, e.g. 1/M under M-step gradient accumulation
    when the main loss is divided by M (Megatron's MoEAuxLossAutoScaler.set_loss_scale)."""
    for module in model.modules():
        if isinstance(module, _Router):
            module.loss_scale = float(scale)
