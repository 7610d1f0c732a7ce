"""Routing replay: record which experts every MoE layer chose, and route a later forward the same way.

    with moe_kit.record_routing(model) as rec:      # rec: {layer name: [indices of each call]}
        rollout = model(x)
    torch.save(rec, "routing.pt")                   # plain dict of lists of int64 tensors
    with moe_kit.replay_routing(model, torch.load("routing.pt")):
        loss = loss_fn(model(x))                    # same experts; weights from the current router
        loss.backward()                             # the router still gets its gradient

Uses: recompute a forward with identical routing (activation recomputation, debugging a
divergence), RL fine-tuning where the training pass must route as the rollout did (the rollout
may run on another backend or process: the record is plain tensors).

Record: for each MoELayer (by its name in model.named_modules(); "" when `model` is the layer)
the list of the gate's indices int64 [N, k] of each forward, in call order, detached copies on the
layer's device. They are the gate's choice before the layer marks padding and capacity overflow
(the layer applies those again when replaying). Expert choice records [N, K] with the marker E.
Replay: the i-th forward of a layer inside the context uses the i-th recorded indices; the
weights are the current scores gathered at those experts (normalized / scaled as the gate does;
balancing losses and stats as usual), so they carry the router's gradient. Replayed forwards add
nothing to the expert-bias counts (the router did not choose those experts).
Errors (ValueError naming the layer): a layer missing from the record or a record entry with no
layer, more forwards than recorded, indices of the wrong shape or out of range.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from moe_kit.layer import MoELayer


def _moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no MoELayer: nothing to record or replay")
    return layers


@contextlib.contextmanager
def _hooks(layers: list[tuple[str, MoELayer]], make_hook):
    previous = [layer.routing_hook for _, layer in layers]
    try:
        for name, layer in layers:
            layer.routing_hook = make_hook(name, layer)
        yield
    finally:
        for (_, layer), hook in zip(layers, previous, strict=True):
            layer.routing_hook = hook


@contextlib.contextmanager
def record_routing(model: nn.Module):
    """Context manager yielding {layer name: [indices int64 [N, k] of each forward]}, filled live."""
    layers = _moe_layers(model)
    record: dict[str, list[torch.Tensor]] = {}

    def make_hook(name: str, layer: MoELayer):
        inner = layer.routing_hook or layer.route  # nests with an outer replay_routing

        def hook(x, input_ids, token_mask):
            weights, indices = inner(x, input_ids, token_mask)
            record.setdefault(name, []).append(indices.detach().clone())
            return weights, indices

        return hook

    with _hooks(layers, make_hook):
        yield record


@contextlib.contextmanager
def replay_routing(model: nn.Module, record: dict):
    """Context manager: every MoELayer of `model` routes by `record` (from record_routing, or
    loaded from disk; a single tensor per layer stands for a one-forward list)."""
    if not isinstance(record, dict):
        raise TypeError(f"record must be the dict record_routing yields, got {type(record).__name__}")
    layers = _moe_layers(model)
    names = {name for name, _ in layers}
    missing = [name for name in names if name not in record]
    if missing:
        raise ValueError(f"replay_routing: the record has no routing for layer(s) {sorted(missing)}")
    unknown = [name for name in record if name not in names]
    if unknown:
        raise ValueError(f"replay_routing: the record names layer(s) {sorted(unknown)} that the model does not have")
    calls = {name: [record[name]] if isinstance(record[name], torch.Tensor) else list(record[name]) for name in names}
    cursor = dict.fromkeys(names, 0)

    def make_hook(name: str, layer: MoELayer):
        def hook(x, input_ids, token_mask):
            i = cursor[name]
            if i >= len(calls[name]):
                raise ValueError(
                    f"replay_routing: layer {name!r} runs forward {i + 1} but the record holds {len(calls[name])}"
                )
            cursor[name] = i + 1
            indices = _check_indices(name, layer, x, calls[name][i])
            return replay_weights(layer.gate, x, indices, token_mask), indices

        return hook

    with _hooks(layers, make_hook):
        yield


def _check_indices(name: str, layer: MoELayer, x: torch.Tensor, indices) -> torch.Tensor:
    """Recorded indices -> int64 on x's device, checked against this forward (ValueError naming the
    layer): dtype, the shape and expert range the gate's routing scheme allows
    (gate.routing_problem), and no expert twice in one token's row."""
    if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.dtype == torch.bool:
        raise ValueError(f"replay_routing: layer {name!r}: recorded indices must be an integer tensor")
    num_tokens = x[..., 0].numel() if x.dim() else 0
    indices = indices.to(device=x.device, dtype=torch.long)
    problem = layer.gate.routing_problem(indices, num_tokens)
    if problem is not None:
        raise ValueError(f"replay_routing: layer {name!r} recorded {problem}")
    num_experts = layer.cfg.num_experts
    if indices.dim() == 2 and indices.shape[1] > 1 and indices.numel() and not torch.compiler.is_compiling():
        ids = indices.sort(dim=1).values  # a repeated expert would run twice for one token
        repeated = (ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] < num_experts)  # E ("no expert") may repeat
        if bool(repeated.any()):
            raise ValueError(f"replay_routing: layer {name!r} recorded a row that names the same expert twice")
    return indices


def replay_weights(gate: nn.Module, x: torch.Tensor, indices: torch.Tensor, token_mask=None) -> torch.Tensor:
    """Routing weights [N, k] for given indices [N, k]: the gate's current scores at those experts,
    normalized and scaled as its forward does, with the balancing losses computed and attached."""
    return gate.replay_weights(x, indices, token_mask)
