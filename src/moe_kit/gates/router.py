"""Router: what every gate shares — the router linear, fp32 logits, weight normalization, losses.

Legend: N tokens, D model width, E experts, k experts per token, B sequences of S tokens.
Router math runs in cfg.router_dtype (fp32 by default) whatever the model dtype, and outside
torch.autocast (autocast would run the router linear in bf16 and change which experts win).
"""

from __future__ import annotations

import itertools
import math
import weakref

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
from moe_kit.ops.capacity import CapacityRule
from moe_kit.stats import score_entropy, topk_score_sum


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
    total is kept in `balancing_term` for moe_kit.balancing_loss(model). The losses train only in
    training mode (Megatron, transformers): an eval-mode forward, grad enabled or not, attaches
    nothing and leaves `balancing_term` None, but still sets `aux_loss` / `z_loss` for the stats.
    """

    marks_unrouted = False  # True for gates whose indices may hold E ("no expert"), e.g. expert choice

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
        self.cfg = cfg.frozen_copy()  # later edits of the caller's config cannot change this gate
        self._aux_pairs = self.cfg.aux_losses  # ((aux_loss_type, coef), ...) with coef > 0
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
        self.last_forward_training = True  # whether the last forward ran in training mode (balancing_loss)
        # aux_loss_type "global_batch": float64 [E + 1] routed slots per expert (+ total) this step, or None
        self.global_batch_counts: torch.Tensor | None = None
        self._new_share_log()
        self.process_group = None  # set by MoELayer(ep_group=...): losses use the group's statistics
        self.track_entropy = False  # set by moe_kit.stats.RoutingMonitor
        self.entropy: torch.Tensor | None = None  # detached mean router entropy of the last forward, if tracked
        self.topk_score_sum: torch.Tensor | None = None  # detached mean top-k score sum, if tracked (stats)
        self._reset_router()

    def _reset_router(self) -> None:
        if self.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        if self.bias is not None:
            nn.init.zeros_(self.bias)  # our choice: an unbiased router at init (Megatron, gpt-oss draw it like W)

    def _new_share_log(self) -> None:
        """Give this router its own log of kept f (aux_loss_type "global_batch", global_batch_share),
        named by a plain int so that a compiled forward passes it as a constant; freed with the router."""
        self._share_log_id = next(_SHARE_LOG_IDS)
        weakref.finalize(self, _SHARE_LOGS.pop, self._share_log_id, None)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._new_share_log()  # a deepcopy or unpickled router keeps its own log

    def reset_parameters(self) -> None:
        """(Re)initialize everything this gate owns, e.g. after `to_empty()` of a meta-built model."""
        self._reset_router()

    def capacity_rule(self) -> CapacityRule | None:
        """The capacity the dispatcher applies to this gate's routing: cfg's capacity_factor,
        drop_policy and pad_to_capacity (None when dropless). Schemes whose selection already is
        the capacity (expert choice) return None."""
        cfg = self.cfg
        return CapacityRule.of(cfg.capacity_factor, cfg.drop_policy, cfg.pad_to_capacity)

    def routing_problem(self, indices: torch.Tensor, num_tokens: int) -> str | None:
        """Why int64 `indices` cannot be this gate's routing of `num_tokens` tokens (routing replay),
        or None: a token-choice routing is [N, top_k] with expert ids in 0..E-1."""
        if indices.dim() != 2 or tuple(indices.shape) != (num_tokens, self.top_k):
            return f"indices of shape {tuple(indices.shape)}, this forward needs [{num_tokens}, {self.top_k}]"
        return ids_outside(indices, self.num_experts - 1)

    def replay_weights(self, x: torch.Tensor, indices: torch.Tensor, token_mask=None) -> torch.Tensor:
        """Weights [N, k] for given indices [N, k] (routing replay): the current scores at those
        experts, normalized and scaled as forward does, balancing losses computed and attached."""
        scores, logits, batch_shape, mask = self._score(x, token_mask)
        return self._finish_weights(scores, indices, logits, batch_shape, mask)

    def scheme_name(self) -> str:
        """A short name of the routing, for reprs: the score function (hash routing: "hash")."""
        return self.cfg.score_func

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
            self._track_scores(scores if mask is None else scores[mask])
        weights = self._routing_weights(scores, indices, chosen)
        return self._with_losses(weights, scores, logits, batch_shape, mask, aux_indices)

    def _track_scores(self, scores: torch.Tensor) -> None:
        """Keep the detached router entropy and top-k score sum of real tokens' scores [N, E] (RoutingMonitor)."""
        self.entropy = score_entropy(scores)
        self.topk_score_sum = topk_score_sum(scores, self.top_k)

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
        (returned unchanged in value); in "return" keep their sum in `balancing_term`. In eval mode
        only their values are set (aux_loss / z_loss): nothing is attached or kept."""
        total = self._balancing_losses(scores, logits, batch_shape, mask, aux_indices)
        if self.balancing_term is not None:  # (nn.Module.__setattr__ costs microseconds: skip it when unchanged)
            self.balancing_term = None
        if self.last_forward_training != self.training:
            self.last_forward_training = self.training
        if total is None or not self.training or not torch.is_grad_enabled():
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
                share = self._global_batch_share(aux_indices, mask, scores)
            self.aux_loss, self.z_loss, total = group_balancing_losses(
                cfg, scores, aux_indices, logits, batch_shape, self.process_group, mask, share
            )
            return total
        if scores.shape[0] == 0:  # no tokens: nothing to balance
            return None
        total = None
        for kind, coef in pairs:
            if kind == "global_batch":
                share = self._global_batch_share(aux_indices, mask, scores)
                aux = coef * global_batch_aux_loss(scores, share, mask)
            else:
                aux = coef * switch_aux_loss(
                    scores, aux_indices, self.num_experts, kind, batch_shape, mask, cfg.sequence_aux_norm
                )
            total = aux if total is None else total + aux
        if total is not None:
            self.aux_loss = total.detach()
        if cfg.z_loss_coef > 0:
            z = cfg.z_loss_coef * z_loss(logits, mask)
            self.z_loss = z.detach()
            total = z if total is None else total + z
        return total

    @torch.no_grad()
    def _global_batch_share(self, aux_indices: torch.Tensor, mask: torch.Tensor | None,
                            scores: torch.Tensor) -> torch.Tensor:
        """f [E] of aux_loss_type "global_batch" (Megatron's global_aux_loss): the share of routed
        slots per expert over every micro-batch of this optimizer step and every rank.

        aux_indices [N, k] (the counted experts), mask bool [N] or None, scores [N, E] (this
        forward's router scores, for its fingerprint). A training forward all-reduces its counts
        over the default process group (when torch.distributed is initialized), adds them to
        `global_batch_counts` and keeps the f it used; update_expert_bias (after optimizer.step())
        starts the next step. Eval forwards read the counts without adding. An activation-checkpoint
        recompute neither adds nor reads the running counts (they hold the micro-batches after its
        forward too): it takes the f its forward kept (see global_batch_share). All of it runs
        inside a custom op, so a compiled forward that a checkpoint replays behaves the same. No
        host sync.
        """
        real = slot_weights(aux_indices, mask, torch.float64)
        counts = torch.zeros(self.num_experts + 1, dtype=torch.float64, device=aux_indices.device)
        counts[: self.num_experts].scatter_add_(0, aux_indices.reshape(-1), real)
        counts[self.num_experts] = real.sum()  # routed slots, for the denominator
        state = self.global_batch_counts
        if self.training:
            if state is None or state.device != counts.device:
                state = self.global_batch_counts = torch.zeros_like(counts)
            return global_batch_share(state, counts, forward_fingerprint(counts, scores), self._share_log_id)
        if state is None:  # eval before any training forward: this batch's own counts
            return counts[:-1] / counts[-1].clamp_min(1)
        return _share_of(state.to(counts.device), counts)

    def reset_global_batch(self) -> None:
        """Start a new optimizer step for aux_loss_type "global_batch" (called by update_expert_bias):
        drops the counts and the f each forward of the step kept for its recompute."""
        self.global_batch_counts = None
        _SHARE_LOGS.pop(self._share_log_id, None)

    def _check_sequence_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        if self._sequence_aux and x.dim() != 3:
            raise ValueError(
                f"aux_loss_type='sequence' needs input shaped [B, S, D], got shape {tuple(x.shape)}"
            )
        return tuple(x.shape[:-1])


# aux_loss_type "global_batch": per Router (its _share_log_id), what the training forwards of this step
# kept for their recomputes (global_batch_share): rows [M] of "keys" [cap, E + 3], "shares" [cap, E] and
# "claims" [cap] (float64, on the counts' device), capacity doubled as needed; "size" M.
_SHARE_LOGS: dict[int, dict] = {}
_SHARE_LOG_IDS = itertools.count()


def forward_fingerprint(counts: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """float64 [E + 3]: what identifies a forward to its checkpoint recompute, which re-runs it on the
    same inputs and weights and so recomputes it bit for bit: the routed counts [E + 1] (counts),
    then sum_n m_n and sum_n n * m_n with m_n = sum_e (e + 1) * scores[n, e] (scores [N, E]): two
    micro-batches with equal counts, or with the same tokens in another order, still differ."""
    scores = scores.detach().to(torch.float64)
    experts = torch.arange(1, scores.shape[1] + 1, dtype=torch.float64, device=scores.device)
    mean_expert = scores @ experts  # [N]
    position = torch.arange(1, scores.shape[0] + 1, dtype=torch.float64, device=scores.device)
    return torch.cat([counts.to(scores.device), mean_expert.sum().reshape(1), (position @ mean_expert).reshape(1)])


def _share_of(state: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """f [E] from the step's counts state [E + 1] (this batch's counts [E + 1] while the step has none)."""
    counted = torch.where(state[-1] > 0, state, counts)
    return counted[:-1] / counted[-1].clamp_min(1)


def ids_outside(indices: torch.Tensor, high: int) -> str | None:
    """A message when some id of `indices` lies outside 0..high (not checked while compiling)."""
    if indices.numel() and not torch.compiler.is_compiling() and bool(((indices < 0) | (indices > high)).any()):
        return f"expert ids outside 0..{high}"
    return None


@torch.library.custom_op("moe_kit::global_batch_share", mutates_args=("state",))
def global_batch_share(state: torch.Tensor, counts: torch.Tensor, key: torch.Tensor, log_id: int) -> torch.Tensor:
    """f [E] for a training forward of aux_loss_type "global_batch"; state [E + 1] float64, the step's
    counts; counts [E + 1] this forward's; key [E + 3] = forward_fingerprint(counts, scores); log_id:
    the Router's.

    A forward (not inside a backward, not under inference_mode) adds counts, all-reduced over the
    default process group when torch.distributed is initialized, to state, and keeps (key, f) in the
    Router's log. A checkpoint recompute runs inside the backward (is_recomputing()), after later
    micro-batches may have added theirs: it adds nothing and returns the f kept under its own key.
    Its forward ran on the same inputs and weights, so the key matches bit for bit. Forwards with
    equal keys (the same router scores in the same order) each keep their f: a recompute claims the
    least-claimed match, the latest among those, so the recomputes of one backward, which runs the
    micro-batches last first, take different entries. Without an exact match (a recompute that did
    not reproduce its forward) it takes a kept f of equal counts, else the current counts' f. All on
    the device: no host sync. A custom op, so that these checks run when the op runs, also inside a
    torch.compile'd graph that a checkpoint replays (as add_expert_counts). The log holds E + 3 and
    E float64 numbers per forward until reset_global_batch (update_expert_bias) clears it."""
    if torch.is_inference_mode_enabled():
        return _share_of(state, counts)
    log = _SHARE_LOGS.get(log_id)
    if is_recomputing():
        current = _share_of(state, counts)
        return current if log is None else _kept_share(log, key, current)
    total = counts.clone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    state += total
    share = _share_of(state, counts)
    if log is None or log["size"] == log["keys"].shape[0]:  # start or double the log
        cap = 8 if log is None else 2 * log["size"]
        grown = {"keys": key.new_zeros(cap, key.shape[0]), "shares": share.new_zeros(cap, share.shape[0]),
                 "claims": key.new_zeros(cap), "size": 0 if log is None else log["size"]}
        if log is not None:
            for name in ("keys", "shares", "claims"):
                grown[name][: log["size"]] = log[name]
        log = _SHARE_LOGS[log_id] = grown
    row = log["size"]
    log["keys"][row] = key
    log["shares"][row] = share
    log["size"] = row + 1
    return share


def _kept_share(log: dict, key: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """The f [E] a recompute with `key` takes from `log` (global_batch_share), else `current`."""
    size = log["size"]
    keys, claims = log["keys"][:size], log["claims"][:size]
    exact = (keys == key).all(dim=1)
    same_counts = (keys[:, : current.shape[0] + 1] == key[: current.shape[0] + 1]).all(dim=1)
    rank = torch.where(exact, 2.0, torch.where(same_counts, 1.0, 0.0)).to(torch.float64)
    priority = rank * (claims.max() + 2) - claims  # the best match first, then the least claimed
    last = size - 1 - priority.flip(0).argmax()  # the latest among equals
    found = rank[last] > 0
    claims[last] += found.to(claims.dtype)  # in place: log["claims"] rows [0, size)
    return torch.where(found, log["shares"][last].to(current.dtype), current)


@global_batch_share.register_fake
def _(state, counts, key, log_id):
    return counts.new_empty(counts.shape[0] - 1)
