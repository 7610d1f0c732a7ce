"""ConvertedMoELayer: the MoELayer `hf.convert` puts in place of a transformers sparse-MoE block.

Legend: N tokens (B sequences of S), D model width, E experts.

A MoELayer, plus the two things a transformers block does around its router and experts:

- Input jitter (Mixtral's `router_jitter_noise`, also MiniMax / MiniMax-M2): in training the block
  multiplies its input states by U(1 - eps, 1 + eps) before routing, so the router *and the
  experts* see the noise. `block_jitter_noise` reproduces it draw for draw
  (`torch.empty_like(x).uniform_(1 - eps, 1 + eps)` on the [B, S, D] input, first thing in the
  forward), so with the same seed a training forward equals the transformers block's.
  moe_kit's own `MoEConfig.jitter_eps` is another thing: Switch / Megatron jitter of the router
  input only, inside the gate; the experts never see it.
- Router logits for transformers' output capture (capture.py): when a forward collects
  `router_logits` (`output_router_logits=True`), the layer hands its router logits [N, E], as the
  transformers router returns them, to the recorder `gate.logits_recorder`, so the causal LM's
  `load_balancing_loss_func` gives the same `aux_loss` (and `loss`) as the transformers model.

And what the block returns: gpt-oss's block returns `(output, router_scores [N, k])` and its decoder
layer unpacks the pair; with `returns_scores` the layer returns `(output, routing weights)` as well
(the weights of this forward's routing, in the output's dtype; None under moe_kit.replay_routing,
whose replayed routing bypasses the router).
"""

from __future__ import annotations

import warnings

import torch

from moe_kit.config import MoEConfig
from moe_kit.integrations.hf.capture import RECORDER, capture_active
from moe_kit.layer import MoELayer


class ConvertedMoELayer(MoELayer):
    """forward(x [B, S, D], input_ids=None, token_mask=None) -> [B, S, D], as MoELayer, with the
    block's input jitter in training and router logits for transformers' capture.

    block_jitter_noise: eps of the block's input jitter (0: none). logits_dtype: the dtype the
    transformers router returns its logits in when it is not the input's (None: the input's).
    both_aux_losses: True when the user asked for transformers' balancing loss (from the captured
    logits) and moe_kit's attached aux loss at once; otherwise a forward collecting router logits
    with cfg.aux_loss_coef > 0 warns that both train the router. returns_scores: forward returns
    (output, routing weights [N, k]) as gpt-oss's block does (see the module doc).
    """

    def __init__(self, cfg: MoEConfig, layer_id: int = 0, block_jitter_noise: float = 0.0,
                 logits_dtype: torch.dtype | None = None, both_aux_losses: bool = False,
                 returns_scores: bool = False):
        super().__init__(cfg, layer_id)
        self.block_jitter_noise = float(block_jitter_noise)
        self.logits_dtype = logits_dtype
        self.both_aux_losses = both_aux_losses
        self.returns_scores = returns_scores
        self._scores = None  # the routing weights of the running forward (returns_scores)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None):
        eps = self.block_jitter_noise
        if self.training and eps > 0 and isinstance(x, torch.Tensor):  # not in place: the caller's x stays
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        if self.returns_scores:
            self._scores = None
        out = super().forward(x, input_ids, token_mask)
        recorder = getattr(self.gate, RECORDER, None)
        if recorder is not None and recorder._forward_hooks and capture_active():
            self._check_one_aux_loss()
            recorder(self.router_logits(x))
        if self.returns_scores:
            scores, self._scores = self._scores, None
            return out, None if scores is None else scores.to(out.dtype)
        return out

    def route(self, x: torch.Tensor, input_ids=None, token_mask=None):
        """MoELayer.route, keeping the weights [N, k] for the (output, scores) pair of returns_scores."""
        weights, indices = super().route(x, input_ids, token_mask)
        if self.returns_scores:
            self._scores = weights
        return weights, indices

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [N, E]: the router linear of x (the gate's logits without moe_kit's
        router-input jitter), in the dtype the transformers router returns."""
        logits = self.gate.router_linear(x.reshape(-1, self.cfg.hidden_size))
        return logits.to(self.logits_dtype or x.dtype)

    def _check_one_aux_loss(self) -> None:
        if self.cfg.aux_losses and not self.both_aux_losses and not torch.compiler.is_compiling():
            warnings.warn(
                "router logits are collected (output_router_logits=True) from a layer converted with moe_kit's "
                f"aux_loss_coef={self.cfg.aux_loss_coef}: with labels, transformers adds its balancing loss to `loss` "
                "and moe_kit's attached loss trains the router too. Use one (hf.convert docstring), or "
                "convert(..., both_aux_losses=True) to train with both",
                stacklevel=3,
            )

    def extra_repr(self) -> str:
        jitter = f", block_jitter_noise={self.block_jitter_noise}" if self.block_jitter_noise else ""
        return super().extra_repr() + jitter
