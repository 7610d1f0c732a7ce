"""Model-wide training calls: the expert-bias step, the balancing-loss scale and the returned loss.

    loss = main_loss(model(x))                              # loss_mode "attach" (default)
    loss.backward(); optimizer.step(); moe_kit.update_expert_bias(model)

    loss = main_loss(model(x)) + moe_kit.balancing_loss(model)   # loss_mode "return"
"""

from __future__ import annotations

import torch
from torch import nn

from moe_kit.gates.router import Router
from moe_kit.gates.token_choice import TopKGate


@torch.no_grad()
def update_expert_bias(model: nn.Module, process_group=None) -> None:
    """Aux-loss-free balancing step (noaux_tc); call after optimizer.step().

    Sums every gate's `expert_counts` over `process_group` (the default group when
    torch.distributed is initialized and no group is given; no communication otherwise), then
    per gate: expert_bias += rate * sign(mean_load - load), clamped to +-bias_max, and resets the
    counts. Every rank of the group must call it (it is a collective); with pipeline parallelism
    pass the data-parallel group, since other stages hold other gates. It also starts a new step
    for aux_loss_type "global_batch": call it after every optimizer step when either is on.
    """
    for module in model.modules():
        if isinstance(module, Router):
            module.reset_global_batch()
    gates = [m for m in model.modules() if isinstance(m, TopKGate) and m.expert_bias is not None]
    if not gates:
        return
    counts = torch.cat([gate.current_counts() for gate in gates])  # one all-reduce for all layers
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts, group=process_group)
    for gate, load in zip(gates, counts.split([g.num_experts for g in gates]), strict=True):
        step = gate.cfg.bias_update_rate * torch.sign(load.mean() - load)
        gate.expert_bias.add_(step).clamp_(-gate.cfg.bias_max, gate.cfg.bias_max)
        gate.expert_counts.zero_()


def set_aux_loss_scale(model: nn.Module, scale: float | torch.Tensor) -> None:
    """Scale the gradient that attached balancing losses add (loss_mode "attach").

    Use 1/M under M-step gradient accumulation when the main loss is divided by M (Megatron's
    MoEAuxLossAutoScaler.set_loss_scale), and multiply by the loss scale of mixed-precision
    training: with torch.amp.GradScaler call `set_aux_loss_scale(model, scaler.get_scale() / M)`
    before each backward, since scaler.unscale_ divides every gradient by that scale. Eager mode
    reads the scale when the backward runs; a torch.compile'd model takes it at the forward, so
    calling it before the forward (the scaler's scale only changes in scaler.update()) suits both.
    """
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or not scale.is_floating_point():
            raise ValueError(f"scale must be a float or a one-element float tensor, got {tuple(scale.shape)}")
        scale = scale.detach().reshape(())
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float or a tensor, got {type(scale).__name__}")
    else:
        scale = float(scale)
    for module in model.modules():
        if isinstance(module, Router):
            module.loss_scale = scale


def balancing_loss(model: nn.Module) -> torch.Tensor:
    """The differentiable sum, coefficients applied, of the balancing losses (aux + z) of every
    gate's last forward — for loss_mode "return": add it to the main loss before backward.

    Returns a 0-dim tensor (0.0 when no gate has a loss, and for gates whose last forward ran in
    eval mode: balancing losses exist only in training mode, as in Megatron and transformers; their
    values still reach `aux_loss` / `z_loss` and the layer stats). Raises ValueError when a gate is in
    loss_mode "attach" (its loss already reaches the backward; adding it again would count it
    twice) or when a training forward ran without autograd (torch.no_grad, or reentrant
    activation checkpointing, whose forward runs under no_grad: use use_reentrant=False).
    """
    terms = []
    for name, module in model.named_modules():
        if not isinstance(module, Router):
            continue
        wants_loss = bool(module.cfg.aux_losses) or module.cfg.z_loss_coef > 0  # aux_losses: both forms
        if not wants_loss:
            continue
        if module.cfg.loss_mode != "return":
            raise ValueError(
                f"balancing_loss: gate {name!r} has loss_mode={module.cfg.loss_mode!r}; its losses already "
                "reach the backward. Build the model with MoEConfig(loss_mode='return') to add them yourself"
            )
        if module.balancing_term is None:
            if module.last_forward_training and (module.aux_loss is not None or module.z_loss is not None):
                raise ValueError(
                    f"balancing_loss: gate {name!r} ran its last forward without autograd (torch.no_grad or "
                    "reentrant activation checkpointing); use checkpoint(..., use_reentrant=False)"
                )
            continue
        terms.append(module.balancing_term)
    if not terms:
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    total = terms[0]
    for term in terms[1:]:
        total = total + term.to(total.device)
    return total
