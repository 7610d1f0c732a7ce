"""Balancing losses of an expert-parallel layer, with statistics over the whole group.

Legend: W ranks, N_r tokens on rank r, N = sum_r N_r, E experts, k experts per token,
B_r sequences on rank r, B = sum_r B_r. p = scores normalized per token (as moe_kit.balancing).

One process holding the concatenated batch computes
    aux = E * sum_i f_i * P_i,   f_i = slots to expert i / (N k),   P_i = (1/N) sum_n p_{n,i}
    z   = (1/N) sum_n logsumexp(logits_n)^2
    seq = (1/B) sum_b E * sum_i f_{b,i} P_{b,i}      (aux_loss_type "sequence": f, P per sequence)
(sequence_aux_norm "megatron": seq = (B / N^2) sum_b L_b^2 E sum_i f_{b,i} P_{b,i}, L_b real tokens of b)
    gb  = E * sum_i g_i * P_i                         (aux_loss_type "global_batch")
with g [E] the share of routed slots per expert over every micro-batch of the optimizer step and
every rank of the default group (Router._global_batch_share, already all-reduced), and P the mean
normalized score over the EP group's tokens of this micro-batch: gb_r = E * sum_i g_i * (1/N)
sum_{n on r} p_{n,i}. So under EP, "global_batch" is one process's global_batch loss on the EP
group's micro-batch given the world's counts (on a (1, W) mesh: one process on the global batch).
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

from moe_kit.balancing import normalized_scores, real_lengths, sequence_aux_losses, slot_weights
from moe_kit.config import MoEConfig


def group_balancing_losses(cfg: MoEConfig, scores, indices, logits, batch_shape, group, token_mask=None,
                           global_share=None):
    """scores/logits [N_r, E] (router dtype), indices [N_r, k] (the plain top-k of the scores),
    batch_shape (B_r, S) or (N_r,), token_mask bool [N_r] or None (False = padding, left out).

    Returns (aux value, z value, this rank's loss term), each times its coefficient: the values are
    detached group-wide tensors (None when off), the term is None when both losses are off.
    cfg.aux_losses may hold "global", "sequence" and "global_batch" (summed, each times its
    coefficient); "global_batch" needs global_share, float [E]: the step's slot share per expert.
    """
    kinds = dict(cfg.aux_losses)  # {aux_loss_type: coef}
    if "global_batch" in kinds and global_share is None:
        raise ValueError("aux_loss_type 'global_batch' needs global_share (Router._global_batch_share)")
    want_z = cfg.z_loss_coef > 0
    if not (kinds or want_z):
        return None, None, None
    num_experts = cfg.num_experts
    real = torch.ones_like(scores[:, 0]) if token_mask is None else token_mask.to(scores.dtype)  # [N_r]
    pieces, terms = {}, {}  # pieces: detached local sums to all-reduce; terms: local numerators (grad)
    pieces["tokens"] = real.sum().detach().reshape(1)
    megatron_norm = cfg.sequence_aux_norm == "megatron"
    if "sequence" in kinds:
        losses, counted = sequence_aux_losses(scores, indices, num_experts, batch_shape, token_mask)
        if megatron_norm:  # B * sum_b L_b^2 loss_b / N^2 over the group (moe_kit.balancing.switch_aux_loss)
            lengths = real_lengths(batch_shape, token_mask, losses.dtype, losses.device)
            losses = lengths.square() * losses
            counted = torch.ones_like(counted)  # Megatron averages over every sequence
        terms["sequence"] = losses.sum()
        pieces["sequence"] = terms["sequence"].detach().reshape(1)
        pieces["sequences"] = counted.sum().reshape(1)
    if "global" in kinds or "global_batch" in kinds:
        probs = normalized_scores(scores) * real.unsqueeze(1)  # [N_r, E]
        terms["probs"] = probs.sum(dim=0)  # [E]
        pieces["probs"] = terms["probs"].detach()
    if "global" in kinds:
        weight = slot_weights(indices, token_mask, scores.dtype)
        pieces["slots"] = torch.zeros_like(pieces["probs"]).scatter_add_(0, indices.reshape(-1), weight)
    if want_z:
        terms["z"] = (torch.logsumexp(logits, dim=-1).square() * real).sum()
        pieces["z"] = terms["z"].detach().reshape(1)
    total = _all_reduce_pieces(pieces, group)  # {name: group-wide sum}

    tokens = total["tokens"].clamp_min(1)
    aux_value = z_value = term = None
    values, parts = [], []
    if "sequence" in kinds:
        sequences = total["sequences"].clamp_min(1)
        if megatron_norm:  # divide by B / N^2 instead of B
            sequences = sequences.reciprocal() * tokens.square()
        values.append(kinds["sequence"] * total["sequence"] / sequences)
        parts.append(kinds["sequence"] * terms["sequence"] / sequences)
    if "global" in kinds:
        share = total["slots"] / (tokens * cfg.top_k)  # f [E]
        values.append(kinds["global"] * num_experts * (share * total["probs"]).sum() / tokens)
        parts.append(kinds["global"] * num_experts * (share * terms["probs"]).sum() / tokens)
    if "global_batch" in kinds:
        share = global_share.to(scores.dtype)
        values.append(kinds["global_batch"] * num_experts * (share * total["probs"]).sum() / tokens)
        parts.append(kinds["global_batch"] * num_experts * (share * terms["probs"]).sum() / tokens)
    if values:
        aux_value, term = sum(values[1:], values[0]), sum(parts[1:], parts[0])
    if want_z:
        z_value = cfg.z_loss_coef * total["z"] / tokens
        z_term = cfg.z_loss_coef * terms["z"] / tokens
        term = z_term if term is None else term + z_term
    return tuple(None if t is None else t.reshape(()) for t in (aux_value, z_value, term))


@torch.no_grad()
def _all_reduce_pieces(pieces: dict, group) -> dict:
    """Sum every piece over the group in one fp64 all-reduce; results in the pieces' dtype, detached."""
    flat = torch.cat([p.reshape(-1).double() for p in pieces.values()])
    dist.all_reduce(flat, group=group)
    sums = flat.split([p.numel() for p in pieces.values()])
    return {name: s.to(p.dtype) for (name, p), s in zip(pieces.items(), sums, strict=True)}
