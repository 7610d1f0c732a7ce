"""Balancing losses of an expert-parallel layer, with statistics over the whole group.

Legend: W ranks, N_r tokens on rank r, N = sum_r N_r, E experts, k experts per token,
B_r sequences on rank r, B = sum_r B_r. p = scores normalized per token (as moe_kit.balancing).

One process holding the concatenated batch computes
    aux = E * sum_i f_i * P_i,   f_i = slots to expert i / (N k),   P_i = (1/N) sum_n p_{n,i}
    z   = (1/N) sum_n logsumexp(logits_n)^2
    seq = (1/B) sum_b E * sum_i f_{b,i} P_{b,i}      (aux_loss_type "sequence": f, P per sequence)
Here each rank all-reduces the detached pieces it cannot see (counts, N, B, and the partial sums
for the logged values) once, then attaches its share:
    aux_r = E * sum_i f_i * (1/N) sum_{n on r} p_{n,i}     z_r = (1/N) sum_{n on r} lse_n^2
    seq_r = (1/B) sum_{b on r} E * sum_i f_{b,i} P_{b,i}
f_i carries no gradient on one process either, so sum_r aux_r = aux, term and gradient alike:
the rank-local gate gradients sum to the single-process gradient. The values returned for
logging are the group's (aux, z, seq), equal on every rank. A rank with no tokens still joins.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_kit.config import MoEConfig


def group_balancing_losses(cfg: MoEConfig, scores, indices, logits, batch_shape, group):
    """scores/logits [N_r, E] (router dtype), indices [N_r, k], batch_shape (B_r, S) or (N_r,).

    Returns (aux value, z value, this rank's loss term), each times its coefficient: the values are
    detached group-wide tensors (None when off), the term is None when both losses are off.
    """
    want_aux, want_z = cfg.aux_loss_coef > 0, cfg.z_loss_coef > 0
    if not (want_aux or want_z):
        return None, None, None
    num_experts, num_tokens = cfg.num_experts, scores.shape[0]
    pieces, terms = {}, {}  # pieces: detached local sums to all-reduce; terms: local numerators (grad)
    pieces["tokens"] = scores.new_full((1,), num_tokens)
    if want_aux and cfg.aux_loss_type == "sequence":
        terms["aux"] = _sequence_losses(scores, indices, num_experts, batch_shape).sum()
        pieces["aux"] = terms["aux"].detach().reshape(1)
        pieces["sequences"] = scores.new_full((1,), batch_shape[0])
    elif want_aux:
        probs = scores / scores.sum(dim=-1, keepdim=True)  # [N_r, E]
        terms["probs"] = probs.sum(dim=0)  # [E]
        pieces["probs"] = terms["probs"].detach()
        pieces["slots"] = torch.zeros_like(pieces["probs"]).scatter_add_(
            0, indices.reshape(-1), torch.ones_like(indices.reshape(-1), dtype=scores.dtype)
        )
    if want_z:
        terms["z"] = torch.logsumexp(logits, dim=-1).square().sum()
        pieces["z"] = terms["z"].detach().reshape(1)
    total = _all_reduce_pieces(pieces, group)  # {name: group-wide sum}

    tokens = total["tokens"].clamp_min(1)
    aux_value = z_value = term = None
    if want_aux and cfg.aux_loss_type == "sequence":
        sequences = total["sequences"].clamp_min(1)
        aux_value = cfg.aux_loss_coef * total["aux"] / sequences
        term = cfg.aux_loss_coef * terms["aux"] / sequences
    elif want_aux:
        share = total["slots"] / (tokens * cfg.top_k)  # f [E]
        aux_value = cfg.aux_loss_coef * num_experts * (share * total["probs"]).sum() / tokens
        term = cfg.aux_loss_coef * num_experts * (share * terms["probs"]).sum() / tokens
    if want_z:
        z_value = cfg.z_loss_coef * total["z"] / tokens
        z_term = cfg.z_loss_coef * terms["z"] / tokens
        term = z_term if term is None else term + z_term
    return tuple(None if t is None else t.reshape(()) for t in (aux_value, z_value, term))


def _sequence_losses(scores, indices, num_experts: int, batch_shape) -> torch.Tensor:
    """[B_r] per-sequence Switch losses E * sum_i f_{b,i} P_{b,i} (moe_kit.balancing, unaveraged)."""
    batch, seq = batch_shape
    if seq == 0:  # sequences without tokens balance nothing
        return scores.new_zeros(batch)
    probs = (scores / scores.sum(dim=-1, keepdim=True)).view(batch, seq, num_experts)
    ids = indices.reshape(batch, seq * indices.shape[-1])
    slots = torch.zeros(batch, num_experts, dtype=probs.dtype, device=probs.device)
    slots.scatter_add_(1, ids, torch.ones_like(ids, dtype=probs.dtype))
    share = slots / max(ids.shape[1], 1)  # f [B_r, E]
    return num_experts * (share * probs.mean(dim=1)).sum(dim=-1)


@torch.no_grad()
def _all_reduce_pieces(pieces: dict, group) -> dict:
    """Sum every piece over the group in one fp64 all-reduce; results in the pieces' dtype, detached."""
    flat = torch.cat([p.reshape(-1).double() for p in pieces.values()])
    dist.all_reduce(flat, group=group)
    sums = flat.split([p.numel() for p in pieces.values()])
    return {name: s.to(p.dtype) for (name, p), s in zip(pieces.items(), sums, strict=True)}
