"""HashGate (DeepSeek-V4's first layers): experts = tid2eid[token id], weights from the router scores.

Legend: N tokens, D model width, V vocabulary size, E experts, k experts per token.
"""

from __future__ import annotations

import numpy as np
import torch

from moe_kit.config import MoEConfig, register_scheme_check
from moe_kit.gates.router import Router


class HashGate(Router):
    """Hash router: the experts of a token are fixed by its id, `tid2eid` int64 [V, k].

    forward(x [..., D], *, input_ids int [...] matching x's leading shape, token_mask bool [...] = None)
    -> (weights fp32 [N, k], indices int64 [N, k]). Ids of padded tokens (token_mask False) are not
    checked and route like id 0.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        check_hash_config(self.cfg)
        self.register_buffer("tid2eid", torch.empty(cfg.vocab_size, cfg.top_k, dtype=torch.long))
        self.expert_bias = None
        self.expert_counts = None
        self._reset_table()

    def _reset_table(self) -> None:
        if self.tid2eid.is_meta:
            return
        table = hash_table(self.cfg.vocab_size, self.cfg.num_experts, self.cfg.top_k)
        with torch.no_grad():
            self.tid2eid.copy_(table)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self._reset_table()

    def scheme_name(self) -> str:
        return "hash"

    def forward(
        self, x: torch.Tensor, *, input_ids: torch.Tensor | None = None, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores, logits, batch_shape, mask = self._score(x, token_mask)  # [N, E] each
        ids = self._check_ids(input_ids, scores.shape[0], mask)
        indices = self.tid2eid[ids]  # [N, k]
        # the aux loss counts the table's experts: they are this layer's routing, unbiased and ungrouped
        return self._finish_weights(scores, indices, logits, batch_shape, mask, aux_indices=indices), indices

    def _check_ids(self, input_ids, num_tokens: int, mask: torch.Tensor | None) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("hash routing needs input_ids (the token ids of x)")
        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
        if input_ids.numel() != num_tokens:
            raise ValueError(f"input_ids has {input_ids.numel()} ids but x has {num_tokens} tokens")
        ids = input_ids.reshape(-1).to(self.tid2eid.device).long()
        if mask is not None:
            ids = torch.where(mask.to(ids.device), ids, torch.zeros_like(ids))
        if ids.numel() and not (ids.is_meta or torch.compiler.is_compiling()):
            low, high = int(ids.min()), int(ids.max())  # one host sync; compiled code bounds-checks the gather
            if low < 0 or high >= self.cfg.vocab_size:
                raise ValueError(
                    f"input_ids must lie in [0, vocab_size={self.cfg.vocab_size}), got min {low} max {high}"
                )
        return ids


def check_hash_config(cfg: MoEConfig) -> None:
    """What hash routing needs (ValueError naming the field)."""
    if cfg.vocab_size is None:
        raise ValueError("hash routing (hash_routing or n_hash_layers > 0) needs vocab_size")


register_scheme_check("hash", check_hash_config)


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
