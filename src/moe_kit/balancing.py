"""Balancing losses (Switch aux loss, z-loss) and how they reach the gradient by themselves.

Legend: N tokens, E experts, k experts per token, B sequences of S tokens (N = B*S).
All math in the router dtype (fp32 or fp64).
"""

from __future__ import annotations

import torch


def switch_aux_loss(
    scores: torch.Tensor, indices: torch.Tensor, num_experts: int, kind: str = "global", batch_shape=None
) -> torch.Tensor:
    """Switch load-balancing loss E * sum_i f_i * P_i (1.0 when perfectly balanced).

    scores [N, E]: router scores (normalized per token here, so sigmoid scores work too);
    indices [N, k]: chosen experts. f_i = share of the N*k slots routed to expert i, P_i = mean
    normalized score of expert i. kind "sequence" computes it per sequence of batch_shape (B, S)
    and averages over the B sequences (DeepSeek-V3's complementary sequence-wise loss).
    """
    probs = scores / scores.sum(dim=-1, keepdim=True)  # [N, E]
    if kind == "sequence":
        batch, seq = batch_shape
        probs = probs.view(batch, seq, num_experts)
        indices = indices.view(batch, seq * indices.shape[-1])
    else:
        probs = probs.unsqueeze(0)  # one "sequence" holding every token
        indices = indices.reshape(1, -1)
    slots = torch.zeros(probs.shape[0], num_experts, dtype=probs.dtype, device=probs.device)
    slots.scatter_add_(1, indices, torch.ones_like(indices, dtype=probs.dtype))
    share = slots / max(indices.shape[1], 1)  # f [B, E]
    mean_prob = probs.mean(dim=1)  # P [B, E]
    return num_experts * (share * mean_prob).sum(dim=-1).mean()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss mean(logsumexp(logits)^2) over tokens; logits [N, E]."""
    return torch.logsumexp(logits, dim=-1).square().mean()


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
        return grad_out, torch.full_like(loss, ctx.scale), None


def attach_loss(out: torch.Tensor, loss: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """`out` unchanged; when the backward reaches it, `loss` is back-propagated too, times scale."""
    return _AttachLoss.apply(out, loss, scale)


def is_recomputing() -> bool:
    """True while autograd runs a backward pass, e.g. when activation checkpointing recomputes a
    forward: counters that must see each forward once (expert-bias counts) skip those."""
    return torch._C._current_graph_task_id() != -1
