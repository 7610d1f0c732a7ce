"""ExpertChoiceGate: every expert picks its top-C tokens (Zhou et al., 2022, "Mixture-of-Experts
with Expert Choice Routing").

Legend: N tokens (N_real of them real: token_mask True), D model width, E experts,
C = min(ceil(c * N_real / E), N_real) tokens per expert (c = cfg.capacity_factor),
K slots per token in the returned routing (K = E while compiling, else the most experts any token got).

    S = scores(x W^T)                     [N, E] in the router dtype (softmax by default, as in the paper)
    expert e takes the C real tokens with the highest S[:, e] (ties: the earlier token)
    out[t] = sum over the experts e that took t of S[t, e] * FFN_e(x_t)

A token may get zero, one or several experts; every expert gets exactly C tokens, so the load is
balanced by construction (no balancing loss is needed). `cfg.top_k` is not used by the selection:
the average number of experts per token is the capacity factor c (only the Switch aux loss, when
aux_loss_coef > 0, still counts the plain top-k of S). With norm_topk_prob a token's weights are
normalized over the experts that took it; route_scale multiplies them as usual.

The routing is returned in the layout every dispatch backend already runs (ops.moe_ffn's torch /
loop / triton backends, moe_kit.ep): indices [N, K] holding each token's experts in ascending
order, padded with the marker E ("no expert": never computed, contributes 0), weights [N, K] with
zeros in the marked slots. Building it costs one host sync in eager mode (K = the largest number of
experts a token got, read once); under torch.compile K = E (no sync: the column of expert e holds e
or E), which only makes the routing sort longer; the expert GEMMs run the same E * C rows either way.

Not causal: an expert ranks every token of the batch against the others, so a token's routing
depends on tokens after it. Do not use expert choice in autoregressive decoding (a batch of one
new token per sequence routes differently than the same tokens inside the full sequence).
Under expert parallelism each rank's experts choose among that rank's tokens (C from its N_real).
"""

from __future__ import annotations

import torch

from moe_kit.balancing import SUM_FLOOR
from moe_kit.capacity_rule import capacity_of, decimal_ratio
from moe_kit.config import MoEConfig, register_scheme_check
from moe_kit.gates.router import Router, ids_outside


class ExpertChoiceGate(Router):
    """Expert-choice router (cfg.routing == "expert_choice"; needs cfg.capacity_factor).

    forward(x [..., D], token_mask bool [...] = None) -> (weights [N, K] in the router dtype,
    indices int64 [N, K] with E marking an empty slot). Padded tokens (token_mask False) are never
    chosen and do not count in C. After a forward, `unrouted_fraction` (0-dim fp32 tensor, detached)
    is the share of real tokens that no expert took, and `capacity` (0-dim int64 tensor) is C.
    """

    marks_unrouted = True  # indices may hold E; the selection is the capacity (the layer adds none)

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        check_expert_choice_config(self.cfg)  # a config edited after validation (frozen copies cannot be)
        self.expert_bias = None  # no aux-loss-free balancing here: the load is C per expert by construction
        self.expert_counts = None
        self.unrouted_fraction: torch.Tensor | None = None
        self.capacity: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, *, input_ids: torch.Tensor | None = None, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., D] -> (weights [N, K], indices int64 [N, K] with E marking an empty slot); input_ids unused."""
        scores, logits, batch_shape, mask = self._score(x, token_mask)  # [N, E] each
        picked = self._choose(scores.detach(), mask)  # bool [N, E]
        indices = compact_choice(picked)
        return self._weights(scores, indices, logits, batch_shape, mask), indices

    def capacity_rule(self) -> None:
        """None: the experts' choice already is the capacity (each expert takes C tokens); the
        dispatcher adds none."""
        return None

    def routing_problem(self, indices: torch.Tensor, num_tokens: int) -> str | None:
        """Expert choice routes [N, K] (any K >= 1) with E marking a slot no expert took."""
        if indices.dim() != 2 or indices.shape[0] != num_tokens or indices.shape[1] < 1:
            return f"indices of shape {tuple(indices.shape)}, this forward needs [{num_tokens}, K]"
        return ids_outside(indices, self.num_experts)

    def replay_weights(self, x: torch.Tensor, indices: torch.Tensor, token_mask: torch.Tensor | None = None):
        """Weights [N, K] for given indices [N, K] (E = no expert) from the current scores (routing replay)."""
        scores, logits, batch_shape, mask = self._score(x, token_mask)  # [N, E] each
        return self._weights(scores, indices, logits, batch_shape, mask)

    # ------------------------------------------------------------------------- forward pieces

    @torch.no_grad()
    def _choose(self, scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """bool [N, E]: picked[t, e] when expert e takes token t. No host sync.

        Every expert sorts the tokens by score (stable: ties to the earlier token, padding last),
        and keeps the first C; C is a tensor, so the sort keeps the static bound
        C_max = min(ceil(c * N / E), N) and the positions >= C are switched off.
        """
        num_tokens, num_experts = scores.shape
        ratio = decimal_ratio(self.cfg.capacity_factor)
        c_max = min(capacity_of(num_tokens, num_experts, ratio), num_tokens)
        if mask is None:
            capacity = torch.tensor(c_max, device=scores.device)
        else:
            scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))  # padding sorts last
            num_real = mask.sum()
            capacity = torch.minimum(capacity_of(num_real, num_experts, ratio), num_real)
        order = torch.sort(scores.t(), dim=1, descending=True, stable=True).indices[:, :c_max]  # [E, C_max]
        keep = torch.arange(c_max, device=scores.device) < capacity  # [C_max]
        picked = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=scores.device)
        picked.scatter_(0, order.t(), keep.unsqueeze(1).expand(c_max, num_experts))
        self.capacity = capacity
        return picked

    def _weights(self, scores, indices, logits, batch_shape, mask) -> torch.Tensor:
        """Router._finish_weights for indices with the marker E: the marked slots weigh 0."""
        if self.track_entropy:
            self._track_scores(scores if mask is None else scores[mask])
        num_experts = self.num_experts
        routed = indices < num_experts
        with torch.no_grad():  # share of real tokens that no expert took
            unrouted = ~routed.any(dim=1) if mask is None else ~routed.any(dim=1) & mask
            num_real = unrouted.new_tensor(indices.shape[0], dtype=torch.long) if mask is None else mask.sum()
            self.unrouted_fraction = unrouted.sum() / num_real.clamp_min(1).float()
        weights = scores.gather(1, indices.clamp(max=num_experts - 1)) * routed  # [N, K]
        if self.cfg.norm_topk_prob:  # over the experts that took the token (a token no expert took keeps 0)
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(SUM_FLOOR)
        return self._with_losses(weights * self.cfg.route_scale, scores, logits, batch_shape, mask)


def check_expert_choice_config(cfg: MoEConfig) -> None:
    """The fields expert choice needs or cannot take (ValueError naming them)."""
    if cfg.capacity_factor is None:
        raise ValueError("routing='expert_choice' needs capacity_factor: each expert takes C = ceil(c * N / E) tokens")
    if cfg.routes_by_hash:
        raise ValueError("routing='expert_choice' is incompatible with hash routing (hash_routing / n_hash_layers)")
    if cfg.expert_bias:
        raise ValueError("routing='expert_choice' is incompatible with expert_bias (noaux_tc steers token choice)")
    if cfg.n_groups > 1:
        raise ValueError("routing='expert_choice' is incompatible with n_groups > 1 (experts pick tokens)")
    if cfg.pad_to_capacity:
        raise ValueError("routing='expert_choice' does not take pad_to_capacity: each expert already takes C tokens")


register_scheme_check("expert_choice", check_expert_choice_config)


def compact_choice(picked: torch.Tensor) -> torch.Tensor:
    """bool [N, E] -> indices int64 [N, K]: each token's experts ascending, then the marker E.

    Eager: K = max(1, most experts of one token), one host sync. Compiling: K = E, no sync.
    """
    num_tokens, num_experts = picked.shape
    ids = torch.arange(num_experts, device=picked.device).expand(num_tokens, num_experts)
    slots = torch.where(picked, ids, num_experts)  # [N, E]: column e holds e or E
    if torch.compiler.is_compiling() or picked.is_meta:
        return slots
    width = max(1, int(picked.sum(dim=1).max())) if num_tokens else 1  # the one host sync
    return torch.sort(slots, dim=1).values[:, :width].contiguous()
