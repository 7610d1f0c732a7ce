"""Balancing losses (Switch aux loss, z-loss) and how they reach the gradient by themselves.

Legend: N tokens, E experts, k experts per token, B sequences of S tokens (N = B*S).
All math in the router dtype (fp32 or fp64).
"""

from __future__ import annotations

import torch

# Floor of the per-token score sums divided by (as Megatron's 1e-20). A token whose scores all
# underflow to 0 (sigmoid at very negative logits) then gives p = 0, and the gradient g / floor
# stays finite for any sane upstream g, GradScaler's 2**16 included; finfo.tiny (1e-38) made it
# inf, and inf * sigmoid'(logit) = inf * 0 = NaN.
SUM_FLOOR = 1e-20


def normalized_scores(scores: torch.Tensor) -> torch.Tensor:
    """[N, E] scores -> per-token probabilities p = s / sum(s) (the sum floored at SUM_FLOOR: a
    token whose scores all underflow to 0 gives p = 0 and a finite gradient, not NaN)."""
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(SUM_FLOOR)


def slot_weights(indices: torch.Tensor, token_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """[N*k] weight of each slot of indices [N, k] in dtype: 1 for a real token's slot, 0 for padding."""
    ones = torch.ones(indices.numel(), dtype=dtype, device=indices.device)
    return ones if token_mask is None else ones * token_mask.to(dtype).repeat_interleave(indices.shape[-1])


def switch_aux_loss(
    scores: torch.Tensor,
    indices: torch.Tensor,
    num_experts: int,
    kind: str = "global",
    batch_shape=None,
    token_mask: torch.Tensor | None = None,
    sequence_norm: str = "per_sequence",
) -> torch.Tensor:
    """Switch load-balancing loss E * sum_i f_i * P_i (1.0 when perfectly balanced).

    scores [N, E]: router scores (normalized per token here, so sigmoid scores work too);
    indices [N, k]: the experts counted for f (the plain top-k of the unbiased scores).
    f_i = share of the real tokens' slots routed to expert i, P_i = mean normalized score of expert
    i over real tokens. kind "sequence" computes it per sequence of batch_shape (B, S) and averages
    over the sequences that hold a real token (DeepSeek-V3's complementary sequence-wise loss).
    token_mask bool [N] (None: all real) leaves padding out, as if it were not in the batch.

    sequence_norm (cfg.sequence_aux_norm, kind "sequence" only): "per_sequence" divides sequence b's
    f and P by its own real length L_b (the definition above); "megatron" divides both by the mean
    real length T = (1/B) sum_b L_b and averages over all B sequences (Megatron-Core's seq_aux_loss
    with a padding mask): (1/B) sum_b (L_b / T)^2 * loss_b. Equal when every L_b is S (no padding).
    """
    shape = tuple(batch_shape) if kind == "sequence" else (1, scores.shape[0])
    losses, counted = sequence_aux_losses(scores, indices, num_experts, shape, token_mask)
    if kind == "sequence" and sequence_norm == "megatron":
        lengths = real_lengths(shape, token_mask, losses.dtype, losses.device)  # L_b [B]
        # (1/B) sum_b (L_b / T)^2 loss_b with T = sum(L) / B, i.e. B * sum_b L_b^2 loss_b / sum(L)^2
        return shape[0] * (lengths.square() * losses).sum() / lengths.sum().square().clamp_min(1)
    return losses.sum() / counted.sum().clamp_min(1)


def real_lengths(batch_shape, token_mask, dtype: torch.dtype, device) -> torch.Tensor:
    """[B] real tokens per sequence of batch_shape (B, S) in dtype (token_mask bool [B*S] or None: S each)."""
    batch, seq = batch_shape
    if token_mask is None:
        return torch.full((batch,), float(seq), dtype=dtype, device=device)
    return token_mask.to(dtype).view(batch, seq).sum(dim=1)


def sequence_aux_losses(scores, indices, num_experts: int, batch_shape, token_mask=None):
    """Per-sequence Switch losses: scores [N, E], indices [N, k], batch_shape (B, S) with N = B*S.

    Returns (losses [B], counted [B]): E * sum_i f_{b,i} P_{b,i} over the real tokens of sequence
    b (0 for a sequence with none), and 1.0 / 0.0 for whether sequence b holds a real token.
    """
    batch, seq = batch_shape
    probs = normalized_scores(scores).view(batch, seq, num_experts)
    real = torch.ones(batch, seq, dtype=probs.dtype, device=probs.device)
    if token_mask is not None:
        real = token_mask.to(probs.dtype).view(batch, seq)
    top_k = indices.shape[-1]
    slots = torch.zeros(batch, num_experts, dtype=probs.dtype, device=probs.device)
    slots.scatter_add_(1, indices.reshape(batch, seq * top_k), real.repeat_interleave(top_k, dim=1))
    tokens = real.sum(dim=1)  # [B]
    share = slots / (tokens * top_k).clamp_min(1).unsqueeze(1)  # f [B, E]
    mean_prob = (probs * real.unsqueeze(-1)).sum(dim=1) / tokens.clamp_min(1).unsqueeze(1)  # P [B, E]
    return num_experts * (share * mean_prob).sum(dim=-1), (tokens > 0).to(probs.dtype)


def global_batch_aux_loss(
    scores: torch.Tensor, share: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """E * sum_i f_i * P_i with f = share [E] given (counted over the step's micro-batches and
    ranks, no gradient) and P_i the mean normalized score of expert i over this micro-batch's real
    tokens (scores [N, E], token_mask bool [N]). Megatron's global_aux_loss, with f taken over the
    slots actually seen (Megatron averages counts per micro-batch; equal for equal micro-batches).
    """
    probs = normalized_scores(scores)
    if token_mask is None:
        mean_prob = probs.mean(dim=0)
    else:
        real = token_mask.to(probs.dtype)
        mean_prob = (probs * real.unsqueeze(1)).sum(dim=0) / real.sum().clamp_min(1)
    return scores.shape[1] * (share.to(probs.dtype) * mean_prob).sum()


def z_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss mean(logsumexp(logits)^2) over the real tokens; logits [N, E], token_mask bool [N]."""
    lse2 = torch.logsumexp(logits, dim=-1).square()
    if token_mask is None:
        return lse2.mean()
    real = token_mask.to(lse2.dtype)
    return (lse2 * real).sum() / real.sum().clamp_min(1)


class _AttachLoss(torch.autograd.Function):
    """Identity on `out` whose backward also sends d(loss) = scale into `loss`
    (Megatron's MoEAuxLossAutoScaler): the loss trains the router without the user adding it."""

    @staticmethod
    def forward(ctx, out, loss, scale):
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        (loss,) = ctx.saved_tensors
        scale = ctx.scale() if callable(ctx.scale) else ctx.scale  # a callable is read now, at backward
        if isinstance(scale, torch.Tensor):  # e.g. a GradScaler's scale: no host sync
            return grad_out, scale.to(device=loss.device, dtype=loss.dtype).expand_as(loss).clone(), None
        return grad_out, torch.full_like(loss, scale), None


def attach_loss(out: torch.Tensor, loss: torch.Tensor, scale=1.0) -> torch.Tensor:
    """`out` unchanged; when the backward reaches it, `loss` is back-propagated too, times scale
    (a float, a 0-dim tensor such as a GradScaler's scale, or a callable returning one, called when
    the backward runs: the scale set between forward and backward is the one that counts)."""
    return _AttachLoss.apply(out, loss, scale)


def is_recomputing() -> bool:
    """True while autograd runs a backward pass, e.g. when activation checkpointing recomputes a
    forward: counters that must see each forward once (expert-bias counts) skip those."""
    return torch._C._current_graph_task_id() != -1
