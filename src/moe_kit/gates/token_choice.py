"""TopKGate: top-k token choice (softmax / sigmoid / sqrtsoftplus, expert bias, groups, scaling).

Legend: N tokens, D model width, E experts, k experts per token, G expert groups.

Expert-bias counting policy (aux-loss-free balancing, cfg.expert_bias): a forward adds its chosen
experts to `expert_counts` when the gate is in training mode, except
  - under torch.inference_mode (never a training step),
  - while autograd runs a backward (activation checkpointing recomputing the forward: the
    original forward was counted already, reentrant or not),
  - for padding (token_mask False) and on the meta device.
Forwards under torch.no_grad in training mode do count: reentrant checkpointing runs the real
forward that way. Counts are taken before any capacity drop (what the router asked for).
`expert_counts` is a plain fp32 tensor, not a buffer: DDP's broadcast_buffers must not copy rank
0's counts over the others, and model.to(bf16) must not round them.
"""

from __future__ import annotations

import torch

from moe_kit.balancing import is_recomputing, slot_weights
from moe_kit.config import MoEConfig
from moe_kit.gates.router import Router

_FP32_STATE = ("expert_bias",)  # buffers kept fp32 whatever dtype the model is cast to


class TopKGate(Router):
    """Top-k token-choice router.

    forward(x [..., D], token_mask bool [...] = None) -> (weights fp32 [N, k], indices int64 [N, k]),
    N = x[..., 0].numel(). With cfg.expert_bias, `expert_bias` [E] (fp32 buffer) steers selection
    only, and training forwards add the chosen experts to `expert_counts` [E] (fp32) for
    moe_kit.update_expert_bias. Padded tokens (token_mask False) get routed like any token but are
    left out of counts, losses and statistics; the layer gives them no expert.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        if cfg.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
            self.expert_counts = torch.zeros(cfg.num_experts, dtype=torch.float32, device=self.weight.device)
        else:
            self.expert_bias = None
            self.expert_counts = None

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.expert_bias is not None:
            with torch.no_grad():
                self.expert_bias.zero_()
            self.expert_counts = torch.zeros_like(self.expert_bias)

    # ------------------------------------------------------------------------- dtype / device / loading

    def _apply(self, fn, recurse=True):
        """Casts (model.to(bf16), .half()) leave the expert bias and counts fp32 and unrounded;
        every other function (device moves, to_empty, share_memory) applies to the bias as usual,
        and the counts follow the router weight's device."""
        kept = {name: self._buffers.pop(name) for name in _FP32_STATE if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, buffer in kept.items():
            moved = fn(buffer)
            if moved.dtype != torch.float32:  # a cast: keep the exact fp32 values, take only the device
                moved = _to_device(buffer, moved.device)
            self._buffers[name] = moved
        if self.expert_counts is not None:
            self.expert_counts = _to_device(self.expert_counts, self.weight.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """State dicts written before the rename hold the noaux_tc bias as `gate.bias`."""
        old, new = prefix + "bias", prefix + "expert_bias"
        if self.bias is None and self.expert_bias is not None and old in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------------- forward

    def forward(
        self, x: torch.Tensor, *, input_ids: torch.Tensor | None = None, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., D] -> (weights [N, k] in the router dtype, indices int64 [N, k]); input_ids unused."""
        scores, logits, batch_shape, mask = self._score(x, token_mask)  # [N, E] each
        chosen, indices = self._select(scores)
        self._count(indices, mask)
        aux_indices = None if chosen is None else indices  # the plain top-k: what the aux loss counts
        return self._finish_weights(scores, indices, logits, batch_shape, mask, aux_indices, chosen), indices

    def _select(self, scores: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """scores [N, E] -> (chosen [N, k] or None, indices int64 [N, k]): the top-k experts of the
        selection scores (plus expert_bias, within the best groups); chosen holds their scores when
        the selection is the plain top-k of the scores (topk's values: no gather needed), else None."""
        if self.expert_bias is None and self.cfg.n_groups == 1:  # selection = the scores themselves
            return scores.topk(self.top_k, dim=-1)
        choice = scores.detach()
        if self.expert_bias is not None:
            choice = choice + self.expert_bias.to(device=choice.device, dtype=choice.dtype)
        if self.cfg.n_groups > 1:
            choice = self._limit_groups(choice)
        return None, choice.topk(self.top_k, dim=-1).indices  # [N, k]

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Mask to -inf every expert outside the token's best topk_groups groups."""
        num_tokens, groups = choice.shape[0], self.cfg.n_groups
        grouped = choice.view(num_tokens, groups, self.num_experts // groups)  # [N, G, E/G]
        if self.expert_bias is None:
            group_scores = grouped.amax(dim=-1)
        else:  # DeepSeek-V3: sum of each group's two best biased scores
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        best = group_scores.topk(self.cfg.topk_groups, dim=-1).indices  # [N, topk_groups]
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, best, False)
        return grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).view(num_tokens, self.num_experts)

    def _count(self, indices: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Add the chosen experts of real tokens to expert_counts (see the counting policy above)."""
        if self.expert_counts is None or not self.training or indices.is_meta:
            return
        with torch.no_grad():
            counts = self.current_counts()
            weight = slot_weights(indices, mask, counts.dtype)
            add_expert_counts(counts, indices.reshape(-1).to(counts.device), weight.to(counts.device))

    def current_counts(self) -> torch.Tensor:
        """expert_counts [E] fp32, on the expert bias's device (recreated as zeros if it was left on
        meta, e.g. after load_state_dict(assign=True) of a meta-built model: counts are not saved)."""
        device = self.expert_bias.device
        if self.expert_counts.device != device:
            self.expert_counts = _to_device(self.expert_counts, device)
        return self.expert_counts


@torch.library.custom_op("moe_kit::add_expert_counts", mutates_args=("counts",))
def add_expert_counts(counts: torch.Tensor, experts: torch.Tensor, weight: torch.Tensor) -> None:
    """counts [E] += per-expert sum of weight [S] over experts int64 [S] — unless this runs inside a
    backward (an activation-checkpoint recompute) or under inference_mode. A custom op, so that the
    check happens when the op runs, also inside a torch.compile'd graph that a checkpoint replays."""
    if torch.is_inference_mode_enabled() or is_recomputing():
        return
    counts.scatter_add_(0, experts, weight)


@add_expert_counts.register_fake
def _(counts, experts, weight) -> None:
    return None


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t as fp32 on `device`; a meta tensor becomes zeros there (its values never existed)."""
    if t.is_meta and device.type != "meta":
        return torch.zeros(t.shape, dtype=torch.float32, device=device)
    return t.to(device=device, dtype=torch.float32)
