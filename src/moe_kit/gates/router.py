"""Router: what every gate shares — the router linear, fp32 logits, weight normalization, losses.

Legend: N tokens, D model width, E experts, k experts per token, B sequences of S tokens.
Router math runs in cfg.router_dtype (fp32 by default) whatever the model dtype, and outside
torch.autocast (autocast would run the router linear in bf16 and change which experts win).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_kit.balancing import (
    SUM_FLOOR,
    attach_loss,
    global_batch_aux_loss,
    is_recomputing,
    slot_weights,
    switch_aux_loss,
    z_loss,
)
from moe_kit.config import MoEConfig
from moe_kit.gates.scores import routing_scores
from moe_kit.group_balancing import group_balancing_losses
from moe_kit.stats import score_entropy


def autocast_enabled(device_type: str) -> bool:
    """True when torch.autocast is on for `device_type` (False on devices without autocast, e.g. meta)."""
    available = getattr(torch.amp, "is_autocast_available", None)
    if available is not None and not available(device_type):
        return False
    if available is None and device_type not in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return False
    return torch.is_autocast_enabled(device_type)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, without a call when it already is (a few microseconds each at decode sizes)."""
    return t if t.dtype == dtype else t.to(dtype)


def flat_token_mask(token_mask, batch_shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    """Validate `token_mask` (bool or 0/1 numbers, shape = x's leading shape) -> bool [N] or None."""
    if token_mask is None:
        return None
    if not isinstance(token_mask, torch.Tensor):
        raise TypeError(f"token_mask must be a torch.Tensor (bool or 0/1), got {type(token_mask).__name__}")
    if tuple(token_mask.shape) != tuple(batch_shape):
        raise ValueError(
            f"token_mask shape {tuple(token_mask.shape)} must equal x's leading shape {tuple(batch_shape)}"
        )
    mask = token_mask.reshape(-1).to(device)
    if mask.dtype != torch.bool:
        if mask.is_complex():
            raise TypeError(f"token_mask must be bool or real 0/1 numbers, got {mask.dtype}")
        eager = not (torch.compiler.is_compiling() or mask.is_meta)
        if eager and mask.numel() and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("token_mask must hold only 0 and 1 (or be bool): True / 1 marks a real token")
        mask = mask != 0
    return mask


class Router(nn.Module):
    """Shared by every gate: `weight` [E, D], optional `bias` [E] (cfg.router_bias), the scores'
    weight normalization and the balancing losses.

    Losses (cfg.aux_loss_coef / z_loss_coef > 0) are computed in the router dtype; their detached
    values, coefficient applied, are `aux_loss` / `z_loss`. With cfg.loss_mode "attach" they reach
    the backward through the routing weights (times `loss_scale`); with "return" the differentiable
    total is kept in `balancing_term` for moe_kit.balancing_loss(model).
    """

    marks_unrouted = False  # True for gates whose indices may hold E ("no expert"), e.g. expert choice

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
        self.cfg = cfg.frozen_copy()  # later edits of the caller's config cannot change this gate
        self._aux_pairs = self.cfg.aux_losses  # ((aux_loss_type, coef), ...) with coef > 0
        self._has_losses = bool(self._aux_pairs) or self.cfg.z_loss_coef > 0
        self._sequence_aux = any(kind == "sequence" for kind, _ in self._aux_pairs)  # needs [B, S, D] input
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        if cfg.router_bias:  # the router linear's own bias (gpt-oss, Megatron add_bias_linear): trained
            self.bias = nn.Parameter(torch.empty(cfg.num_experts))
        else:
            self.register_parameter("bias", None)
        self.loss_scale: float | torch.Tensor = 1.0  # multiplies attached loss gradients (set_aux_loss_scale)
        self.aux_loss: torch.Tensor | None = None  # coef * Switch aux loss of the last forward (detached)
        self.z_loss: torch.Tensor | None = None  # coef * z-loss of the last forward (detached)
        self.balancing_term: torch.Tensor | None = None  # loss_mode "return": differentiable total
        # aux_loss_type "global_batch": float64 [E + 1] routed slots per expert (+ total) this step, or None
        self.global_batch_counts: torch.Tensor | None = None
        self.process_group = None  # set by MoELayer(ep_group=...): losses use the group's statistics
        self.track_entropy = False  # set by moe_kit.stats.RoutingMonitor
        self.entropy: torch.Tensor | None = None  # detached mean router entropy of the last forward, if tracked
        self._reset_router()

    def _reset_router(self) -> None:
        if self.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        if self.bias is not None:
            nn.init.zeros_(self.bias)  # our choice: an unbiased router at init (Megatron, gpt-oss draw it like W)

    def reset_parameters(self) -> None:
        """(Re)initialize everything this gate owns, e.g. after `to_empty()` of a meta-built model."""
        self._reset_router()

    # ------------------------------------------------------------------------- forward pieces

    def _flat_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"router input must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        if x.dim() == 0 or x.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"router input must be [..., {self.cfg.hidden_size}], got shape {tuple(x.shape)}")
        return x.reshape(-1, self.cfg.hidden_size)

    def _logits(self, x_flat: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [N, E] logits in the router dtype, with jitter noise in training (cfg.jitter_eps)."""
        x_router = cast(x_flat, self.cfg.router_dtype)
        if self.training and self.cfg.jitter_eps > 0:  # Switch / Megatron: x * U(1 - eps, 1 + eps)
            eps = self.cfg.jitter_eps
            x_router = x_router * torch.empty_like(x_router).uniform_(1.0 - eps, 1.0 + eps)
        return self.router_linear(x_router)

    def router_linear(self, x_flat: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [N, E]: x W^T (+ bias) in the router dtype, outside autocast, no jitter."""
        device_type = x_flat.device.type
        if autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return self.router_linear(x_flat)
        dtype = self.cfg.router_dtype
        bias = None if self.bias is None else cast(self.bias, dtype)
        return torch.nn.functional.linear(cast(x_flat, dtype), cast(self.weight, dtype), bias)

    def _score(self, x: torch.Tensor, token_mask=None):
        """x [..., D] -> (scores [N, E], logits [N, E] in the router dtype, batch_shape, mask bool [N] or None)."""
        batch_shape = self._check_sequence_shape(x)
        x_flat = self._flat_input(x)
        mask = flat_token_mask(token_mask, batch_shape, x.device)
        logits = self._logits(x_flat)
        return routing_scores(logits, self.cfg.score_func), logits, batch_shape, mask

    def _finish_weights(self, scores, indices, logits, batch_shape, mask=None, aux_indices=None,
                        chosen=None) -> torch.Tensor:
        """Gather the unbiased scores of the chosen experts, normalize, scale, compute the losses.

        scores/logits [N, E], indices [N, k], mask bool [N] or None (False = padding, ignored by
        the losses and the entropy), aux_indices [N, k]: the experts the aux loss counts (default:
        the plain top-k of the unbiased scores); chosen [N, k]: when indices are the plain top-k of the
        scores, topk's values (saves the gather). Returns the routing weights [N, k] in the router dtype.
        """
        if self.track_entropy:
            self.entropy = score_entropy(scores if mask is None else scores[mask])
        weights = self._routing_weights(scores, indices, chosen)
        return self._with_losses(weights, scores, logits, batch_shape, mask, aux_indices)

    def _routing_weights(self, scores: torch.Tensor, indices: torch.Tensor, chosen=None) -> torch.Tensor:
        """The routing weights [N, k]: the chosen experts' unbiased scores, normalized (norm_topk_prob)
        and scaled (route_scale); chosen as in _finish_weights."""
        weights = scores.gather(1, indices) if chosen is None else chosen  # [N, k]
        if self.cfg.norm_topk_prob:
            total = weights.sum(dim=-1, keepdim=True)
            if chosen is None or self.cfg.score_func != "softmax":  # the plain top-k of a softmax holds
                total = total.clamp_min(SUM_FLOOR)  # its max, >= 1/E; others may underflow: finite grad
            weights = weights / total
        if self.cfg.route_scale != 1.0:
            weights = weights * self.cfg.route_scale
        return weights

    def _with_losses(self, weights, scores, logits, batch_shape, mask=None, aux_indices=None) -> torch.Tensor:
        """Compute the balancing losses and, in loss_mode "attach", attach them to `weights` [N, k]
        (returned unchanged in value); in "return" keep their sum in `balancing_term`."""
        total = self._balancing_losses(scores, logits, batch_shape, mask, aux_indices)
        if self.balancing_term is not None:  # (nn.Module.__setattr__ costs microseconds: skip it when unchanged)
            self.balancing_term = None
        if total is None or not torch.is_grad_enabled():
            return weights
        if self.cfg.loss_mode == "return":
            self.balancing_term = total
            return weights
        return attach_loss(weights, total, self._loss_scale_now)  # read at backward: set_aux_loss_scale may follow

    def _loss_scale_now(self) -> float | torch.Tensor:
        """loss_scale when the backward runs (the GradScaler recipe sets it after the forward)."""
        return self.loss_scale

    def _balancing_losses(self, scores, logits, batch_shape, mask, aux_indices=None) -> torch.Tensor | None:
        """Set `aux_loss` / `z_loss` (detached values) and return their differentiable sum (or None).

        A score router's aux loss counts the plain top-k of the unbiased scores over all experts
        (Megatron's compute_routing_scores_for_aux_loss, DeepSeek-V3's sequence-wise loss), not the
        biased or group-limited selection; a hash router passes its table's experts instead.
        Several aux types (cfg.aux_losses) add up, each times its own coefficient.
        """
        cfg = self.cfg
        pairs = self._aux_pairs  # ((aux_loss_type, coef), ...) with coef > 0
        if not pairs and cfg.z_loss_coef <= 0:
            return None  # aux_loss / z_loss stay None: no coefficient ever sets them
        self.aux_loss = self.z_loss = None
        if aux_indices is None:
            aux_indices = scores.detach().topk(self.top_k, dim=-1).indices  # [N, k]
        if self.process_group is not None:  # expert parallel: every rank joins, even with no tokens
            share = None
            if any(kind == "global_batch" for kind, _ in pairs):
                share = self._global_batch_share(aux_indices, mask)
            self.aux_loss, self.z_loss, total = group_balancing_losses(
                cfg, scores, aux_indices, logits, batch_shape, self.process_group, mask, share
            )
            return total
        if scores.shape[0] == 0:  # no tokens: nothing to balance
            return None
        total = None
        for kind, coef in pairs:
            if kind == "global_batch":
                share = self._global_batch_share(aux_indices, mask)
                aux = coef * global_batch_aux_loss(scores, share, mask)
            else:
                aux = coef * switch_aux_loss(scores, aux_indices, self.num_experts, kind, batch_shape, mask)
            total = aux if total is None else total + aux
        if total is not None:
            self.aux_loss = total.detach()
        if cfg.z_loss_coef > 0:
            z = cfg.z_loss_coef * z_loss(logits, mask)
            self.z_loss = z.detach()
            total = z if total is None else total + z
        return total

    @torch.no_grad()
    def _global_batch_share(self, aux_indices: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """f [E] of aux_loss_type "global_batch" (Megatron's global_aux_loss): the share of routed
        slots per expert over every micro-batch of this optimizer step and every rank.

        A training forward all-reduces its counts over the default process group (when
        torch.distributed is initialized) and adds them to `global_batch_counts`; update_expert_bias
        (after optimizer.step()) starts the next step. Eval forwards and activation-checkpoint
        recomputes read the counts without adding (a recompute must see the f of its forward); the
        check runs inside the custom op add_global_batch_counts, so a compiled forward that a
        checkpoint replays does not add twice either. No host sync.
        """
        real = slot_weights(aux_indices, mask, torch.float64)
        counts = torch.zeros(self.num_experts + 1, dtype=torch.float64, device=aux_indices.device)
        counts[: self.num_experts].scatter_add_(0, aux_indices.reshape(-1), real)
        counts[self.num_experts] = real.sum()  # routed slots, for the denominator
        state = self.global_batch_counts
        if self.training:
            if state is None or state.device != counts.device:
                state = self.global_batch_counts = torch.zeros_like(counts)
            add_global_batch_counts(state, counts)  # not inside a recompute or under inference_mode
        if state is None:  # eval before any training forward: this batch's own counts
            return counts[:-1] / counts[-1].clamp_min(1)
        state = state.to(counts.device)
        counted = torch.where(state[-1] > 0, state, counts)  # nothing counted this step yet: this batch's
        return counted[:-1] / counted[-1].clamp_min(1)

    def reset_global_batch(self) -> None:
        """Start a new optimizer step for aux_loss_type "global_batch" (called by update_expert_bias)."""
        self.global_batch_counts = None

    def _check_sequence_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        if self._sequence_aux and x.dim() != 3:
            raise ValueError(
                f"aux_loss_type='sequence' needs input shaped [B, S, D], got shape {tuple(x.shape)}"
            )
        return tuple(x.shape[:-1])


@torch.library.custom_op("moe_kit::add_global_batch_counts", mutates_args=("state",))
def add_global_batch_counts(state: torch.Tensor, counts: torch.Tensor) -> None:
    """state [E + 1] += counts [E + 1] summed over the default process group (when torch.distributed
    is initialized) -- unless this runs inside a backward (an activation-checkpoint recompute) or
    under inference_mode. A custom op, so that the check happens when the op runs, also inside a
    torch.compile'd graph that a checkpoint replays (as add_expert_counts)."""
    if torch.is_inference_mode_enabled() or is_recomputing():
        return
    counts = counts.clone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    state += counts


@add_global_batch_counts.register_fake
def _(state, counts) -> None:
    return None
