"""swap_ffn: replace modules of a model in place (e.g. every dense FFN by a MoELayer)."""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable

from torch import nn

from moe_kit.layer import MoELayer

# Default pick: a child whose own name is `mlp`, `ffn`, `feed_forward` or ends in `_mlp` / `_ffn`.
_FFN_NAME = re.compile(r"(.*_)?(mlp|ffn|feed_forward|feedforward)", re.IGNORECASE)


def is_ffn_name(name: str, module: nn.Module) -> bool:
    """The default filter_fn: the last component of `name` looks like an FFN, and the module is
    not a MoE layer already (so swapping twice is a no-op)."""
    leaf = name.rsplit(".", 1)[-1]
    return bool(name) and _FFN_NAME.fullmatch(leaf) is not None and not isinstance(module, MoELayer)


def layer_index(name: str, position: int) -> int:
    """The decoder-layer index of a module name: its last integer component ("model.layers.3.mlp" -> 3),
    else `position` (its rank among the picked modules)."""
    numbers = [part for part in name.split(".") if part.isdigit()]
    return int(numbers[-1]) if numbers else position


def _takes_layer_id(make_layer: Callable) -> bool:
    try:
        params = inspect.signature(make_layer).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: the 2-argument form
        return False
    return any(p.name == "layer_id" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def swap_ffn(
    model: nn.Module,
    make_layer: Callable[..., nn.Module],
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
) -> list[str]:
    """Replace, in place, every submodule of `model` that `filter_fn(name, module)` picks by
    `make_layer(name, module)` — or `make_layer(name, module, layer_id=i)` when make_layer takes
    a `layer_id` argument (or **kwargs), i being the module's decoder-layer index (`layer_index`:
    the last number in its name, e.g. `lambda name, mlp, layer_id: moe_kit.upcycle(mlp, cfg, layer_id)`
    so hash routing applies to the first cfg.n_hash_layers layers only); returns the replaced
    names in model order. Warns when nothing matched.

    filter_fn defaults to `is_ffn_name` (modules named like `mlp` / `ffn`). Modules inside a picked
    module are not visited (the picked module is replaced whole). The root itself is never
    replaced. make_layer must return an nn.Module (TypeError otherwise); the new module keeps the
    old one's name, so `model.layers[3].mlp` is the replacement afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(make_layer):
        raise TypeError(f"make_layer must be callable as make_layer(name, module), got {type(make_layer).__name__}")
    pick = is_ffn_name if filter_fn is None else filter_fn
    picked: list[str] = []
    for name, module in model.named_modules():
        if not name or (picked and name.startswith(picked[-1] + ".")):
            continue  # the root, or inside a picked module (named_modules is depth-first)
        if pick(name, module):
            picked.append(name)
    if not picked:
        warnings.warn(
            f"swap_ffn replaced nothing in {type(model).__name__}: no submodule "
            + ("is named like an FFN (mlp / ffn / feed_forward; e.g. nn.TransformerEncoderLayer keeps its FFN in "
               "linear1 / linear2)" if filter_fn is None else "passed filter_fn"),
            stacklevel=2,
        )
    with_index = _takes_layer_id(make_layer)
    for position, name in enumerate(picked):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if with_index:
            new = make_layer(name, parent._modules[child], layer_id=layer_index(name, position))
        else:
            new = make_layer(name, parent._modules[child])
        if not isinstance(new, nn.Module):
            raise TypeError(f"make_layer({name!r}, ...) must return an nn.Module, got {type(new).__name__}")
        parent._modules[child] = new  # works for attributes and for ModuleList / Sequential / ModuleDict
    return picked
