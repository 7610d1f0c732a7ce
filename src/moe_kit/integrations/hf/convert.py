"""convert / convert_back: swap transformers sparse-MoE blocks for MoELayers and back.

Legend: D model width, E experts, I expert hidden width, k experts per token.

`convert(model)` replaces each block that specs.SPECS knows (router + experts + shared expert)
by a MoELayer computing the same function: same routing semantics (specs.py), and the very same
weight tensors (the MoELayer holds the block's nn.Parameter objects, nothing is copied, so an
optimizer built before the conversion still sees them). From then on moe_kit's balancing
(aux / z losses, expert-bias updates), routing stats and backends apply. `convert_back(model)`
builds the transformers blocks again around the same tensors, so the state_dict loads into the
original class and `save_pretrained` writes a normal checkpoint.

Experts stored in another layout than moe_kit's (gpt-oss: gate_up_proj [E, D, 2I] with gate/up
columns interleaved, down_proj [E, I, D], gate_up_proj_bias interleaved; layout.ExpertsLayout) are
put in moe_kit's layout once, at convert, in place: the same nn.Parameter objects get relaid data
(and gradients), so the MoELayer runs with no per-call copy. convert_back relays them back. The
converted layer's state_dict (save_pretrained) gives transformers' key names *and* layout, and
load_state_dict takes them, so checkpoints stay plain transformers checkpoints. An optimizer built
before convert keeps the same parameters, but any state it already holds for them (Adam moments)
is in the old layout: build it after convert for these families.
"""

from __future__ import annotations

import inspect
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as hf_init

from moe_kit.activations import UP_OFFSET
from moe_kit.config import MoEConfig
from moe_kit.integrations.hf.capture import RECORDER, check_recordable, recorder_for, rehook
from moe_kit.integrations.hf.converted import ConvertedMoELayer
from moe_kit.integrations.hf.layout import ExpertsLayout, experts_dims, experts_layout, is_hf_experts
from moe_kit.integrations.hf.specs import (
    BlockSpec,
    check_block,
    probe_routing,
    router_logits_dtype,
    router_top_k,
    spec_of,
    state_keys,
)
from moe_kit.integrations.upcycle import activation_of
from moe_kit.layer import MoELayer

# MoEConfig fields convert(**overrides) may set: they change training, not the converted function
# (capacity_factor excepted: dropping tokens changes outputs by design).
OVERRIDABLE = (
    "expert_bias", "bias_update_rate", "bias_max", "aux_loss_coef", "aux_loss_type", "sequence_aux_norm",
    "z_loss_coef", "loss_mode", "jitter_eps", "capacity_factor", "drop_policy", "pad_to_capacity", "router_dtype",
    "backend",
)


@dataclass
class HFOrigin:
    """What convert_back needs to rebuild the transformers block of a converted MoELayer."""

    cls: type  # the transformers block class
    config: Any  # the config it was built with
    layer_idx: int | None


def convert(model: nn.Module, *, both_aux_losses: bool = False, **overrides) -> list[str]:
    """Replace, in place, every transformers sparse-MoE block of `model` by an equivalent
    MoELayer (a ConvertedMoELayer); return the converted module names.

    overrides: MoEConfig fields in OVERRIDABLE, applied to every converted layer, e.g.
    `convert(model, expert_bias=True, aux_loss_coef=1e-3)`. Fields fixed by the checkpoint's
    routing (e.g. expert_bias for DeepSeek) cannot be overridden. Nothing changes when any block
    fails a check (ValueError naming the module, its family and the problem).

    Balancing losses, two ways (pick one):
    - transformers' (`output_router_logits=True` in the config or the forward): the converted
      layers return their router logits in transformers' format, so the model's own `aux_loss`,
      and `loss` with labels (`+ router_aux_loss_coef * aux_loss`), equal the transformers
      model's. One loss pooled over all L layers (padding left out by `attention_mask`), k times
      moe_kit's value per layer.
    - moe_kit's (`aux_loss_coef=...` here): one Switch loss per layer, attached to the backward,
      with moe_kit's options (aux_loss_type, z-loss, expert bias). The per-layer router gradient
      of transformers' loss with coefficient c is that of aux_loss_coef = c * k / L.
    With `model.config.output_router_logits` set, asking for aux_loss_coef > 0 raises ValueError
    (both would train the router); `both_aux_losses=True` allows it. A forward that asks for
    router logits from layers converted with aux_loss_coef > 0 warns, unless both_aux_losses.

    Mixtral / MiniMax `router_jitter_noise` is reproduced (ConvertedMoELayer.block_jitter_noise:
    the router's and experts' input, in training); `jitter_eps` here is moe_kit's router-input-only
    jitter (Switch / Megatron).

    Works on models built under torch.device("meta") (nothing reads the weights' values): the
    converted layers hold the meta parameters, and `model.load_state_dict(hf_state_dict,
    assign=True)` (or to_empty + load_state_dict) fills them. The converted model's state_dict()
    and save_pretrained use the transformers key names (HFKeyNames), so a plain
    `from_pretrained` of the transformers class loads it exactly, but for tensors the family has
    no place for (an expert bias asked for on Qwen / Mixtral / OLMoE): save_pretrained also writes
    those to STATE_FILE (moe_kit_state.safetensors) under the model's names and warns when they are
    not zero; `from_pretrained`, `convert(model, expert_bias=True)` and
    `model.load_state_dict(load_file(path / STATE_FILE), strict=False)` restore them exactly.

    The converted model's own methods, while it holds converted layers: `init_weights()`
    (transformers' fresh init, e.g. after meta build + convert + to_empty) initializes each
    converted layer as the model's `_init_weights` does the block it replaced (expert biases and
    counts at zero); `set_experts_implementation` raises ValueError (the experts are MoELayers:
    convert_back first).
    """
    return _convert(model, overrides, both_aux_losses=both_aux_losses)


def _convert(model: nn.Module, overrides: dict, verified_only: bool = True, both_aux_losses: bool = False) -> list[str]:
    bad = sorted(set(overrides) - set(OVERRIDABLE))
    if bad:
        raise ValueError(f"convert cannot override {bad}: they fix the converted function; choose from {OVERRIDABLE}")
    found = _find_blocks(model, verified_only)
    if found and not both_aux_losses and _output_router_logits(model) and _has_aux_loss(overrides):
        raise ValueError(
            f"model.config.output_router_logits is set, so transformers adds its balancing loss to `loss`, and "
            f"aux_loss_coef={overrides['aux_loss_coef']} would add moe_kit's per-layer loss too: set "
            "model.config.output_router_logits = False to use moe_kit's, drop aux_loss_coef to keep transformers' "
            "(its router_aux_loss_coef c acts per layer as aux_loss_coef = c * top_k / num_layers), or pass "
            "both_aux_losses=True"
        )
    layers = {}
    for name, (block, spec) in found.items():
        try:
            check_recordable(model, name, block, spec.router)
            layers[name] = _to_moe_layer(block, spec, _layer_idx(model, name), overrides, both_aux_losses)
        except ValueError as error:
            raise ValueError(f"{name} ({type(block).__name__}, {family(block)}): {error}") from None
    for name, layer in layers.items():
        layer._hf_key_names.relayout(layer, to_hf=False)  # no-op but for transposed / interleaved experts
        _replace(model, name, layer)
        rehook(model, name)  # transformers' capture hooks, when the model installed them already
    if layers:
        _override_model_methods(model)
    return list(layers)


def _output_router_logits(model: nn.Module) -> bool:
    return any(getattr(getattr(m, "config", None), "output_router_logits", False) is True for m in model.modules())


def _has_aux_loss(overrides: dict) -> bool:
    coef = overrides.get("aux_loss_coef", 0.0)
    return any(c > 0 for c in (coef if isinstance(coef, (tuple, list)) else (coef,)))


def convert_back(model: nn.Module) -> list[str]:
    """Replace, in place, every MoELayer made by `convert` by its transformers block, holding the
    same tensors; return the restored module names. A non-zero expert bias that the family has
    no place for (convert(..., expert_bias=True) on Qwen / Mixtral / OLMoE) is dropped with a warning."""
    restored = {}
    for name, layer in model.named_modules():
        origin = getattr(layer, "_hf_origin", None)
        if isinstance(layer, MoELayer) and origin is not None:
            restored[name] = _to_hf_block(layer, origin, name)
    for name, block in restored.items():
        _replace(model, name, block)
        rehook(model, name)  # transformers' capture hooks, when the model installed them already
    _override_model_methods(model)  # gives back the class methods where no converted layer is left
    return list(restored)


# ----------------------------------------------------------------------------- one block each way


def _to_moe_layer(block: nn.Module, spec: BlockSpec, layer_idx: int | None, overrides: dict,
                  both_aux_losses: bool = False) -> MoELayer:
    """The MoELayer of `block`, holding its parameter objects; experts in another layout still
    hold transformers' layout here (HFKeyNames.relayout, once every block has converted)."""
    layout = experts_layout(block.experts)
    activation, limit = layout.activation, layout.limit
    num_experts, inter, hidden = experts_dims(block.experts)
    check_block(block, spec)
    routing = spec.routing(block) if spec.routing is not None else None
    if routing is None:
        routing = probe_routing(block, spec)
        if spec.block_scale is not None:  # the block scales the routed sum: the same as scaling each weight
            routing["route_scale"] *= float(getattr(block, spec.block_scale))
        if not routing["expert_bias"]:
            del routing["expert_bias"]  # free for convert(..., expert_bias=True)
    fixed = sorted(k for k in overrides if k in routing and overrides[k] != routing[k])
    if fixed:
        raise ValueError(f"{fixed} fixed by this model's routing ({ {k: routing[k] for k in fixed} })")
    shared = _shared_width(block, spec, activation, limit)
    cfg = MoEConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_experts=num_experts,
        top_k=router_top_k(getattr(block, spec.router), block),
        router_bias="gate.bias" in state_keys(spec, block).values(),
        num_shared_experts=1 if shared else 0,
        shared_intermediate_size=shared,
        shared_expert_gate=spec.shared_gate is not None,
        swiglu_limit=limit,
        expert_proj_bias=layout.bias,
        **({} if activation == "silu" else {"activation": activation}),
        **{**routing, **overrides},
    )
    jitter = float(getattr(block, spec.jitter) or 0.0) if spec.jitter else 0.0
    with torch.device("meta"):
        layer = ConvertedMoELayer(cfg, layer_id=layer_idx or 0, block_jitter_noise=jitter,
                                  logits_dtype=router_logits_dtype(block, spec), both_aux_losses=both_aux_losses,
                                  returns_scores=spec.returns_scores)
    keys = state_keys(spec, block)  # {block key: MoELayer key}
    relaid = {f"experts.{name}" for name in layout.converters(to_hf=False)}  # same keys, other layout
    block_state = block.state_dict(keep_vars=True)
    kept = {hf: block_state[hf] for hf, moe in keys.items() if moe is None}  # e.g. LFM2's unused bias
    _move_state(block, layer, keys, zeros=("gate.expert_bias",), relaid=relaid)  # a bias the family lacks: 0
    integer = {hf: t.dtype for hf, t in block_state.items() if not (t.is_floating_point() or t.is_complex())}
    layer_state = layer.state_dict(keep_vars=True)
    shapes = {hf: tuple(block_state[hf].shape) for hf, moe in keys.items()
              if moe is not None and moe not in relaid and block_state[hf].shape != layer_state[moe].shape}
    to_hf = {moe: hf for hf, moe in keys.items() if moe is not None}
    HFKeyNames(to_hf, integer, kept, list(block_state), shapes, layout).attach(layer)
    layer.gate.add_module(RECORDER, recorder_for(getattr(block, spec.router)))  # no state: see capture.py
    layer.train(block.training)
    layer._hf_origin = HFOrigin(type(block), block.experts.config, layer_idx)
    return layer


def _to_hf_block(layer: MoELayer, origin: HFOrigin, name: str) -> nn.Module:
    layer._hf_key_names.relayout(layer, to_hf=True)  # experts back in transformers' layout, if it differs
    block = _meta_block(origin)
    # The layer's state_dict already carries the block's key names (HFKeyNames), all but an expert
    # bias the family has no place for.
    keys = {key: key for key in block.state_dict(keep_vars=True)}
    bias = getattr(layer.gate, "expert_bias", None)
    if "gate.expert_bias" in layer.state_dict(keep_vars=True) and "gate.expert_bias" not in keys:
        if not bias.is_meta and bool(bias.any()):
            warnings.warn(
                f"{name}: {origin.cls.__name__} has no expert bias; the trained moe_kit gate.expert_bias is dropped, "
                "so the transformers model routes as if it were zero (save it separately to keep it)",
                stacklevel=3,
            )
        keys["gate.expert_bias"] = None
    _move_state(layer, block, keys)
    block.train(layer.training)
    return block


def _meta_block(origin: HFOrigin) -> nn.Module:
    """A transformers block of origin's class and config, built on the meta device."""
    takes_layer_idx = "layer_idx" in inspect.signature(origin.cls.__init__).parameters
    with torch.device("meta"):
        return origin.cls(origin.config, layer_idx=origin.layer_idx) if takes_layer_idx else origin.cls(origin.config)


def _shared_width(block: nn.Module, spec: BlockSpec, activation: str, limit: float | None) -> int | None:
    """Hidden width of the shared expert (None without one), after checking it is a gated MLP with
    the routed experts' activation and clamp."""
    if spec.shared is None:
        return None
    shared = getattr(block, spec.shared)
    act = getattr(shared, "act_fn", None)
    if activation in UP_OFFSET:  # an MLP's act_fn says act(gate) * up at most, never (up + 1) * ...
        raise ValueError(f"moe_kit cannot check that its shared expert {type(shared).__name__} computes "
                         f"{activation} as the routed experts do")
    if act is not None and activation_of(act) != activation:
        raise ValueError(f"shared expert activation {act!r} differs from the routed experts' {activation}")
    shared_limit = getattr(shared, "limit", None)
    if (None if shared_limit is None else float(shared_limit)) != limit:
        raise ValueError(f"shared expert clamp {shared_limit} differs from the routed experts' {limit}")
    return int(shared.gate_proj.weight.shape[0])


def _move_state(src: nn.Module, dst: nn.Module, keys: dict[str, str | None], zeros=(), relaid=()) -> None:
    """Put src's parameter / buffer objects into dst's slots named by keys (src key -> dst key;
    None: dropped). Parameters move as they are (no copy, meta ones included); buffers are cast to
    dst's dtype (fp32 expert bias, int64 tid2eid). dst buffers named in `zeros`, and those it keeps
    outside its state_dict, start at zero (on src's device) when src has nothing for them. dst
    parameters named in `relaid` take a tensor of another layout (HFKeyNames.relayout fits it)."""
    src_state, dst_state = src.state_dict(keep_vars=True), dst.state_dict(keep_vars=True)
    unknown = sorted(set(src_state) - set(keys))
    if unknown:
        raise ValueError(f"no place in {type(dst).__name__} for {unknown} (e.g. biases moe_kit does not have)")
    missing = sorted(set(dst_state) - set(keys.values()) - set(zeros))
    if missing:
        raise ValueError(f"{type(src).__name__} has nothing for {type(dst).__name__}'s {missing}")
    filled = set()
    for key, tensor in src_state.items():
        target = keys[key]
        if target is None:
            continue
        slot = dst_state[target]
        owner_name, _, leaf = target.rpartition(".")
        owner = dst.get_submodule(owner_name)
        if leaf in owner._parameters:
            if tensor.shape != slot.shape and target not in relaid:
                raise ValueError(f"{key} {tuple(tensor.shape)} does not fit {target} {tuple(slot.shape)}")
            if not isinstance(tensor, nn.Parameter):
                tensor = nn.Parameter(tensor.detach(), requires_grad=slot.requires_grad)
            owner._parameters[leaf] = tensor
        else:  # buffers: cast to dst's dtype; a [1, E] bias becomes [E] (same values)
            shapes = tuple(tensor.shape), tuple(slot.shape)
            if shapes[0] != shapes[1] and shapes[0] != (1, *shapes[1]):
                raise ValueError(f"{key} {tuple(tensor.shape)} does not fit {target} {tuple(slot.shape)}")
            owner._buffers[leaf] = tensor.detach().to(slot.dtype).reshape(slot.shape)
        filled.add(target)
    device = next(iter(src_state.values())).device
    for module in dst.modules():
        for leaf, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta:
                module._buffers[leaf] = torch.zeros(buffer.shape, dtype=buffer.dtype, device=device)
    leftover = [n for n in dict(dst.named_parameters()) if n not in filled]
    if leftover:
        raise ValueError(f"{type(dst).__name__} parameters {leftover} were not filled")


class HFKeyNames:
    """State-dict hooks that give a converted MoELayer its transformers block's key names.

    `state_dict()` (so `save_pretrained`) writes the block's keys (`shared_expert.*`,
    `gate.e_score_correction_bias`, ...), so a plain transformers load of the checkpoint is exact
    and `_keep_in_fp32_modules` patterns keep matching; `load_state_dict` accepts those keys (and
    moe_kit's own). to_hf: {MoELayer key: block key}; MoELayer keys without a block key (an
    expert bias the family has no place for) keep their moe_kit names. dtypes: {block key: dtype}
    of integer buffers, written back in the block's dtype (tid2eid).

    layout: the block's ExpertsLayout when its experts are stored otherwise than moe_kit's
    (gpt-oss); `relayout` moves the layer's expert parameters between the two layouts in place,
    and while they hold moe_kit's, state_dict writes transformers' layout and load_state_dict
    reads it (a state dict's expert tensors are always in transformers' layout).
    """

    def __init__(self, to_hf: dict[str, str], dtypes: dict[str, torch.dtype], kept: dict | None = None,
                 order: list[str] | None = None, shapes: dict[str, tuple] | None = None,
                 layout: ExpertsLayout | None = None):
        self.to_hf = dict(to_hf)
        self.shapes = dict(shapes or {})  # {block key: its shape} where the MoELayer's differs ([1, E] bias)
        self.order = list(order or [])  # the block's own key order
        self.from_hf = {hf: moe for moe, hf in self.to_hf.items()}
        self.dtypes = dict(dtypes)
        self.kept = dict(kept or {})  # block tensors MoELayer does not use, written back as they are
        self.layout = layout
        self.in_hf_layout = True  # the layer's expert tensors are still transformers' (until relayout)

    def attach(self, layer: nn.Module) -> None:
        layer._register_state_dict_hook(self.save_hook)
        layer._register_load_state_dict_pre_hook(self.load_hook, with_module=True)
        layer._hf_key_names = self  # convert / convert_back call relayout through it

    def _converters(self, to_hf: bool) -> dict:
        """{MoELayer key: layout function} of the expert tensors whose layout differs."""
        if self.layout is None:
            return {}
        return {f"experts.{name}": fn for name, fn in self.layout.converters(to_hf).items()}

    @torch.no_grad()
    def relayout(self, layer: nn.Module, to_hf: bool) -> None:
        """Put the layer's expert parameters (data and gradient, the same Parameter objects) in
        transformers' layout (to_hf) or moe_kit's; nothing when they are in it already."""
        if self.in_hf_layout == to_hf:
            return
        for key, fn in self._converters(to_hf).items():
            param = layer.get_parameter(key)
            param.data = fn(param.data).contiguous()
            if param.grad is not None:
                param.grad = fn(param.grad).contiguous()
        self.in_hf_layout = to_hf

    def save_hook(self, module, state_dict, prefix, local_metadata) -> None:
        # This layer's entries are the last ones of state_dict: pop them all and put them back
        # renamed, in the same order, so the other keys keep their places.
        ours = [key for key in state_dict if key.startswith(prefix)]
        renamed = dict(self.kept)
        relayouts = self._converters(to_hf=True)
        for key in ours:
            value = state_dict.pop(key)
            hf_key = self.to_hf.get(key[len(prefix):], key[len(prefix):])
            dtype = self.dtypes.get(hf_key)
            value = value if dtype is None else value.to(dtype)
            fn = None if self.in_hf_layout else relayouts.get(key[len(prefix):])
            value = value if fn is None else fn(value).contiguous()  # transformers' layout, always
            renamed[hf_key] = value if hf_key not in self.shapes else value.reshape(self.shapes[hf_key])
        for hf_key in [k for k in self.order if k in renamed] + [k for k in renamed if k not in self.order]:
            state_dict[prefix + hf_key] = renamed[hf_key]

    def load_hook(self, module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        for hf_key, moe_key in self.from_hf.items():
            if hf_key != moe_key and prefix + hf_key in state_dict:
                value = state_dict.pop(prefix + hf_key)
                state_dict[prefix + moe_key] = value.reshape(-1) if hf_key in self.shapes else value
        for hf_key in self.kept:
            if prefix + hf_key in state_dict:
                self.kept[hf_key] = state_dict.pop(prefix + hf_key)
        if not self.in_hf_layout:  # expert tensors come in transformers' layout: moe_kit's for the parameters
            for key, fn in self._converters(to_hf=False).items():
                if prefix + key in state_dict:
                    state_dict[prefix + key] = fn(state_dict[prefix + key]).contiguous()


# ----------------------------------------------------------------------------- the model's own methods


class _ModelMethod:
    """An instance attribute standing in for one method of a transformers PreTrainedModel while
    the model holds converted layers (convert sets it, convert_back removes it). The class's
    method still does the work; the stand-in adds what converted layers need. A plain object
    holding the model, so deepcopy and pickle of the model keep it."""

    name = ""

    def __init__(self, model: nn.Module):
        self.model = model

    def original(self):
        return getattr(type(self.model), self.name).__get__(self.model)

    def converted(self) -> list[str]:
        return [name for name, module in self.model.named_modules() if _is_converted(module)]


class _InitWeights(_ModelMethod):
    """model._init_weights(module): the class's, and for a converted layer, the class's on the
    transformers block the layer replaced (_init_converted). PreTrainedModel.init_weights() walks
    every module through it (transformers' fresh-init path: meta build, to_empty, init_weights)."""

    name = "_init_weights"

    def __call__(self, module: nn.Module) -> None:
        if _is_converted(module):
            _init_converted(module, self.original())
        else:
            self.original()(module)


class _SavePretrained(_ModelMethod):
    """model.save_pretrained(save_directory, ...): the class's, and the converted layers' tensors
    that the transformers blocks have no key for (an expert bias the family lacks) in STATE_FILE
    beside the checkpoint, under the model's own names; a warning names them when they are not
    zero, since a plain from_pretrained ignores them."""

    name = "save_pretrained"

    def __call__(self, save_directory, *args, **kwargs):
        state = {
            f"{name}.{key}": tensor for name in self.converted()
            for key, tensor in _moe_kit_only_state(self.model.get_submodule(name)).items() if not tensor.is_meta
        }
        trained = [key for key, tensor in state.items() if bool(tensor.any())]
        if trained:
            warnings.warn(
                f"save_pretrained: {type(self.model).__name__} has no place for {trained}, so a plain from_pretrained "
                f"ignores them and routes as if they were zero; they are saved in {STATE_FILE} too. To restore them "
                "exactly: from_pretrained, hf.convert(model, expert_bias=True), then "
                f"model.load_state_dict(safetensors.torch.load_file(path / {STATE_FILE!r}), strict=False)",
                stacklevel=2,
            )
        result = self.original()(save_directory, *args, **kwargs)
        if state and (args[0] if args else kwargs.get("is_main_process", True)):  # save_pretrained's 2nd argument
            save_file({k: t.detach().cpu().contiguous() for k, t in state.items()},
                      os.path.join(save_directory, STATE_FILE))
        return result


class _SetExpertsImplementation(_ModelMethod):
    """model.set_experts_implementation(...): refused while converted layers replace the experts
    (the config would say an implementation that nothing runs)."""

    name = "set_experts_implementation"

    def __call__(self, *args, **kwargs):
        converted = self.converted()
        if converted:
            raise ValueError(
                f"set_experts_implementation({', '.join(map(repr, args))}): {converted} are moe_kit MoELayers made "
                "by hf.convert, which run moe_kit's experts whatever the config's experts_implementation says; "
                "hf.convert_back(model) first to choose transformers' experts implementation (\"moe_kit\" included, "
                "after hf.register())"
            )
        return self.original()(*args, **kwargs)


METHODS = (_InitWeights, _SavePretrained, _SetExpertsImplementation)
STATE_FILE = "moe_kit_state.safetensors"  # what save_pretrained writes beside the checkpoint (_SavePretrained)


def _override_model_methods(model: nn.Module) -> None:
    """Put the METHODS stand-ins on every PreTrainedModel of `model` holding converted layers,
    and take them off the others."""
    for module in model.modules():
        if not isinstance(module, PreTrainedModel):
            continue
        holds = any(_is_converted(m) for m in module.modules())
        for method in METHODS:
            if holds and not isinstance(module.__dict__.get(method.name), method):
                module.__dict__[method.name] = method(module)
            elif not holds and isinstance(module.__dict__.get(method.name), method):
                del module.__dict__[method.name]


def _is_converted(module: nn.Module) -> bool:
    return isinstance(module, MoELayer) and getattr(module, "_hf_origin", None) is not None


def _moe_kit_only_state(layer: MoELayer) -> dict[str, torch.Tensor]:
    """{key: tensor} of the layer's state that its transformers block has no key for (an expert
    bias the family lacks): saved under moe_kit's names."""
    to_hf = layer._hf_key_names.to_hf
    return {key: tensor for key, tensor in _own_state(layer).items() if key not in to_hf}


def _own_state(layer: MoELayer) -> dict[str, torch.Tensor]:
    """The layer's state_dict tensors under moe_kit's names (state_dict() gives transformers')."""
    state = dict(layer.named_parameters())
    for key, buffer in layer.named_buffers():
        owner, _, leaf = key.rpartition(".")
        if leaf not in layer.get_submodule(owner)._non_persistent_buffers_set:
            state[key] = buffer
    return state


@torch.no_grad()
def _init_converted(layer: MoELayer, init_weights) -> None:
    """Initialize a converted layer as `init_weights` (the model class's _init_weights) initializes
    the transformers block it replaced: a meta block of that class takes the layer's tensors under
    transformers' names and layout (the same tensor objects; a relaid or retyped copy for gpt-oss's
    experts and integer tables, written back after), and init_weights visits its modules children
    first, as transformers' init walk does. Tensors with no block key (an expert bias the family
    lacks) start at zero, as do the expert counts. transformers' `initialization` functions leave
    tensors marked `_is_hf_initialized` (loaded ones) as they are. The layer's shared-expert
    linears, already visited by the walk as nn.Linear, are drawn again here, alike."""
    block = _meta_block(layer._hf_origin)
    state = layer.state_dict(keep_vars=True)  # transformers' names and layout (HFKeyNames.save_hook)
    device = layer.gate.weight.device
    for key in block.state_dict(keep_vars=True):
        owner_name, _, leaf = key.rpartition(".")
        owner = block.get_submodule(owner_name)
        tensor = state[key]
        if leaf in owner._parameters:
            owner._parameters[leaf] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, False)
        else:
            owner._buffers[leaf] = tensor
    for module in block.modules():  # buffers outside the state_dict
        for leaf, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta:
                module._buffers[leaf] = torch.zeros(buffer.shape, dtype=buffer.dtype, device=device)
    for module in reversed(list(block.modules())):  # every child before its parent
        init_weights(module)
    from_hf = layer._hf_key_names.from_hf
    own = _own_state(layer)
    copies = {
        key: tensor for key, tensor in block.state_dict().items()
        if key in from_hf and tensor.data_ptr() != own[from_hf[key]].data_ptr()
    }
    layer.load_state_dict(copies, strict=False)  # HFKeyNames.load_hook: moe_kit's layout and dtypes
    for tensor in _moe_kit_only_state(layer).values():
        hf_init.zeros_(tensor)
    if getattr(layer.gate, "expert_counts", None) is not None:
        layer.gate.expert_counts.zero_()


# ----------------------------------------------------------------------------- finding blocks


def _find_blocks(model: nn.Module, verified_only: bool = True) -> dict[str, tuple[nn.Module, BlockSpec]]:
    """{name: (block, spec)} of the known blocks; ValueError for experts inside an unknown block."""
    found: dict[str, tuple[nn.Module, BlockSpec]] = {}
    for name, module in model.named_modules():
        if any(name.startswith(block + ".") for block in found):
            continue
        try:
            spec = spec_of(module, verified_only)
        except ValueError as error:
            raise ValueError(
                f"{name}: moe_kit has no conversion for {type(module).__name__} ({family(module)}): {error}. "
                "register() may still run its experts alone if their layout is supported"
            ) from None
        if spec is not None:
            if not name:
                raise ValueError(f"convert replaces blocks inside a model; got a bare {type(module).__name__}")
            found[name] = (module, spec)
        elif is_hf_experts(module) and not any(name.startswith(block + ".") for block in found):
            parent = model.get_submodule(name.rpartition(".")[0])
            raise ValueError(
                f"{name}: moe_kit has no conversion for {type(parent).__name__} ({family(parent)}): its experts "
                "are not the .experts of a router + experts block (register() may still run them alone if "
                "their layout is supported)"
            )
    return found


def _layer_idx(model: nn.Module, name: str) -> int | None:
    """The decoder-layer index of a block: its parent's `layer_idx`, else the last number in its name."""
    parent = model.get_submodule(name.rpartition(".")[0])
    idx = getattr(parent, "layer_idx", None)
    if isinstance(idx, int):
        return idx
    numbers = re.findall(r"\.(\d+)(?:\.|$)", "." + name)
    return int(numbers[-1]) if numbers else None


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    model.get_submodule(parent_name)._modules[child] = module


def family(module: nn.Module) -> str:
    """The transformers model family of a module: "qwen2_moe" for transformers.models.qwen2_moe...."""
    parts = type(module).__module__.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["transformers", "models"] else type(module).__module__
