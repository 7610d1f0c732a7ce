"""transformers' output capture (`outputs.router_logits`) for converted layers.

Legend: N tokens, E experts.

transformers 5 collects router logits with forward hooks (transformers.utils.output_capturing).
The first time a forward asks for any captured output (`output_router_logits`,
`output_hidden_states`, ...), the model installs a hook on every module that is an instance of
the class its `_can_record_outputs` names (e.g. `OutputRecorder(MixtralTopKRouter, index=0)`,
sometimes narrowed by a `layer_name` such as "mlp.gate"). The hook appends `output[index]` to the
active collection, and the causal LM feeds that tuple to `load_balancing_loss_func`.

A converted block no longer holds that router, so its gate holds a `RouterLogits` recorder in
its place: a parameter-free module whose class subclasses the family's router class (built
without the router's `__init__`, so it has no weight and adds no state-dict key) and whose forward
returns the logits [N, E] it is given. The transformers hooks match it as they matched the router,
at a path just below the router's (`<block>.gate.logits_recorder`), so `layer_name` filters match
too. The layer calls it only while a capture of router logits is active (ConvertedMoELayer).

Hooks are installed once per model. When they already exist at `convert` / `convert_back` time
(the model ran a capturing forward before), `rehook` installs them on the new modules, as the
model would have.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import output_capturing
from transformers.utils.output_capturing import OutputRecorder

RECORDER = "logits_recorder"  # the recorder's attribute on a converted layer's gate
KEY = "router_logits"  # the capture key transformers' MoE models record router logits under


class RouterLogits(nn.Module):
    """Stands for a transformers router in output capture: forward(logits [N, E]) -> logits.

    Instances are made by `recorder_for(router_class)`; their class also subclasses
    `router_class`, so that transformers' capture hooks match them."""

    router_class: type = nn.Module  # the transformers router class this recorder stands for

    def __init__(self):  # nn.Module's only: the router's own __init__ (and its weight) is skipped
        nn.Module.__init__(self)
        self._is_hf_initialized = True  # transformers' init_weights must not look for a weight here

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def extra_repr(self) -> str:
        return f"router logits as {self.router_class.__name__} returns them"

    def __reduce_ex__(self, protocol):  # pickle / deepcopy: rebuild the class from the router class
        return _rebuild, (self.router_class,), self.__dict__


@functools.cache
def recorder_class(router_class: type) -> type:
    """The RouterLogits subclass that transformers' hooks take for a `router_class` (one per class)."""
    name = f"{router_class.__name__}Logits"
    return type(name, (RouterLogits, router_class), {"__module__": __name__, "__qualname__": name,
                                                     "router_class": router_class})


def recorder_for(router: nn.Module) -> RouterLogits:
    return recorder_class(type(router))()


def _rebuild(router_class: type) -> RouterLogits:
    cls = recorder_class(router_class)
    return cls.__new__(cls)  # __dict__ follows (__setstate__)


def capture_active() -> bool:
    """False when no forward is collecting router logits now (then the layer skips the router
    linear the recorder needs). Inside torch.compile, where transformers' collector cannot be
    read from a module, True: the hook itself decides, as it does for transformers' routers."""
    collector = getattr(output_capturing, "_active_collector", None)
    if collector is None or torch.compiler.is_compiling():
        return True
    collected = collector.get()
    return collected is not None and KEY in collected


# ----------------------------------------------------------------------------- which hooks a block gets


def owner_of(model: nn.Module, name: str) -> tuple[PreTrainedModel | None, str]:
    """The innermost transformers PreTrainedModel of `model` holding module `name`, and the name
    transformers' hook installer gives the module from there ("." + the path below the owner)."""
    owner, below = None, name
    parts = name.split(".")
    for i in range(len(parts)):
        module = model.get_submodule(".".join(parts[:i]))
        if isinstance(module, PreTrainedModel):
            owner, below = module, ".".join(parts[i:])
    return owner, "." + below


def capture_tasks(owner: PreTrainedModel | None) -> list[tuple[str, OutputRecorder]]:
    """(key, OutputRecorder) pairs of the owner's `_can_record_outputs`, normalized as
    transformers' install_all_output_capturing_hooks normalizes them."""
    tasks = []
    flags = getattr(owner, "_can_record_outputs", None) or {}
    for key, specs in flags.items():
        for spec in specs if isinstance(specs, list) else [specs]:
            if not isinstance(spec, OutputRecorder):
                named = isinstance(spec, str)
                spec = OutputRecorder(target_class=None if named else spec, index=0 if "hidden_states" in key else 1,
                                      class_name=spec if named else None)
            tasks.append((key, spec))
    return tasks


def matches(spec: OutputRecorder, module: nn.Module, name: str) -> bool:
    """Whether transformers' installer hooks `module` (named `name` as in owner_of) for `spec`."""
    hit = (spec.target_class is not None and isinstance(module, spec.target_class)) or (
        spec.class_name is not None and name.endswith(spec.class_name))
    if hit and spec.layer_name is not None:
        hit = "." + spec.layer_name.strip(".") + "." in name + "."
    return hit


def check_recordable(model: nn.Module, name: str, block: nn.Module, router_attr: str) -> None:
    """ValueError when the model records an output from inside `block` (model's module `name`)
    that a converted layer cannot give: anything but the router's logits (output 0), or a router
    matched by a name the recorder's path does not have."""
    owner, hook_name = owner_of(model, name)
    router = getattr(block, router_attr)  # the recorder is an instance of its class: the same class matches
    for key, spec in capture_tasks(owner):
        for sub_name, module in block.named_modules():
            path = hook_name + ("." + sub_name if sub_name else "")
            if not matches(spec, module, path):
                continue
            what = f"transformers records {key!r} from its {type(module).__name__}"
            if module is not router:
                raise ValueError(f"{what}; the converted layer has no such module")
            if spec.index != 0:
                raise ValueError(f"{what} (output {spec.index}); a converted layer gives its router logits (output 0)")
            if not matches(spec, router, f"{hook_name}.gate.{RECORDER}"):
                raise ValueError(f"{what} by its path {path!r}; the converted layer's recorder is not at that path")


def rehook(model: nn.Module, name: str) -> None:
    """Install transformers' capture hooks inside module `name` of `model` (a block just put in
    place) when its owner model has installed them already: the model installs them only once."""
    owner, hook_name = owner_of(model, name)
    if owner is None or not getattr(owner, "_output_capturing_hooks_installed", False):
        return
    output_capturing.recursively_install_hooks(model.get_submodule(name), hook_name, capture_tasks(owner))
