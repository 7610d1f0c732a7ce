"""upcycle: a MoELayer initialized from a dense SwiGLU MLP (sparse upcycling, Komatsuzaki et al. 2022).

Legend: D model width, F dense hidden width, E experts, I expert hidden width, g = F / I pieces.

Two layouts, picked by cfg.intermediate_size:
- I == F (copies): every routed expert is a copy of the dense MLP. The routing weights of a
  token sum to 1 when cfg.norm_topk_prob is on (and route_scale == 1), so the layer computes
  exactly the dense MLP at init, whatever the router says.
- I == F / g, g > 1 (fine-grained split): the F hidden units are cut into g contiguous pieces of
  I units; expert e holds piece e % g (E must be a multiple of g), with its down projection scaled
  by g. The dense MLP is the sum of its g pieces, so the layer equals it exactly when a token's
  k = g experts hold each piece once with weight 1/g, and in expectation over a uniform router
  otherwise (each chosen piece carries g * 1/k of the weight, k of the g pieces are picked).
The router starts small (N(0, router_std)), i.e. close to uniform. A shared expert, if cfg asks
for one, gets a fresh init with a zero down projection, so it adds nothing at init.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_kit.activations import ACTIVATIONS, UP_OFFSET, act_fn
from moe_kit.config import MoEConfig
from moe_kit.layer import MoELayer


def dense_swiglu_weights(dense_mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate [F, D], up [F, D], down [D, F]) of a bias-free SwiGLU MLP with gate_proj / up_proj /
    down_proj linear layers (Llama / Qwen / Mistral MLPs, moe_kit.Expert); ValueError otherwise."""
    weights = []
    for part in ("gate_proj", "up_proj", "down_proj"):
        linear = getattr(dense_mlp, part, None)
        weight = getattr(linear, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(
                f"upcycle needs a SwiGLU MLP with gate_proj / up_proj / down_proj linear layers; "
                f"{type(dense_mlp).__name__}.{part} is {type(linear).__name__}"
            )
        if getattr(linear, "bias", None) is not None:
            raise ValueError(f"upcycle: {type(dense_mlp).__name__}.{part} has a bias; moe_kit experts are bias-free")
        weights.append(weight)
    gate, up, down = weights
    if up.shape != gate.shape or down.shape != gate.shape[::-1]:
        raise ValueError(
            f"inconsistent SwiGLU shapes: gate_proj {tuple(gate.shape)}, up_proj {tuple(up.shape)}, "
            f"down_proj {tuple(down.shape)} (expected [F, D], [F, D], [D, F])"
        )
    act = getattr(dense_mlp, "act_fn", None)
    if act is not None and not is_silu(act):
        raise ValueError(f"upcycle: {type(dense_mlp).__name__}.act_fn is {act!r}, moe_kit experts use silu")
    return gate, up, down


def activation_of(fn) -> str | None:
    """The name in moe_kit.activations.ACTIVATIONS of the elementwise function `fn` ("silu",
    "gelu", "gelu_tanh", "relu"), found on a CPU probe spanning [-8, 8]; None for anything else.
    Only the plain gated forms act(gate) * up are candidates: "swiglu_oai" also adds 1 to up, which
    an activation function alone cannot show (quick_gelu in a plain gate * up block is not it).
    The probe lives on the CPU whatever the default device (a model built under
    torch.device("meta") keeps stateless activations that run on any device)."""
    probe = torch.linspace(-8.0, 8.0, 33, device="cpu", dtype=torch.float32)
    try:
        out = fn(probe)
    except Exception:  # noqa: BLE001 - any failure means "not a plain elementwise activation"
        return None
    if not isinstance(out, torch.Tensor) or out.shape != probe.shape or out.device != probe.device:
        return None
    out = out.float()
    for name in ACTIVATIONS:
        if name not in UP_OFFSET and torch.allclose(out, act_fn(probe, name), atol=1e-6):
            return name
    return None


def is_silu(fn) -> bool:
    """True when fn(t) == silu(t) on a CPU probe spanning [-8, 8]."""
    return activation_of(fn) == "silu"


@torch.no_grad()
def upcycle(dense_mlp: nn.Module, cfg: MoEConfig, layer_id: int = 0, *, router_std: float = 0.01) -> MoELayer:
    """A MoELayer whose routed experts are built from `dense_mlp`'s SwiGLU weights (see module doc).

    Args:
        dense_mlp: module with bias-free `gate_proj` [F, D], `up_proj` [F, D], `down_proj` [D, F].
        cfg: the MoE settings; cfg.hidden_size must be D and cfg.intermediate_size F (copies) or
            F / g (fine-grained split into g pieces, num_experts a multiple of g).
        layer_id: passed to MoELayer (decides hash routing when cfg.n_hash_layers > 0).
        router_std: std of the router weight init (small: near-uniform routing at first).
    Returns:
        MoELayer on dense_mlp's device and dtype. With cfg.norm_topk_prob, route_scale == 1, no
        swiglu_limit and no capacity drops, copies reproduce dense_mlp(x) exactly.
    """
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
    gate, up, down = dense_swiglu_weights(dense_mlp)
    dense_width, hidden = gate.shape
    if cfg.hidden_size != hidden:
        raise ValueError(f"cfg.hidden_size={cfg.hidden_size} but the dense MLP is {hidden} wide")
    width = cfg.intermediate_size
    if dense_width % width:
        raise ValueError(
            f"cfg.intermediate_size={width} must equal the dense hidden width {dense_width} (copies) "
            f"or divide it (fine-grained split)"
        )
    pieces = dense_width // width
    if cfg.num_experts % pieces:
        raise ValueError(
            f"fine-grained split into {pieces} pieces of {width} units needs num_experts a multiple of "
            f"{pieces}, got {cfg.num_experts}"
        )
    if not router_std >= 0:
        raise ValueError(f"router_std must be >= 0, got {router_std}")
    layer = MoELayer(cfg, layer_id).to(device=gate.device, dtype=gate.dtype)
    piece_of_expert = torch.arange(cfg.num_experts, device=gate.device) % pieces  # [E]
    gate_pieces = gate.view(pieces, width, hidden)[piece_of_expert]  # [E, I, D]
    up_pieces = up.view(pieces, width, hidden)[piece_of_expert]  # [E, I, D]
    down_pieces = down.view(hidden, pieces, width).permute(1, 0, 2)[piece_of_expert]  # [E, D, I]
    layer.experts.gate_up_proj.copy_(torch.cat([gate_pieces, up_pieces], dim=1))
    layer.experts.down_proj.copy_(down_pieces * pieces)
    layer.gate.weight.normal_(0.0, router_std)
    if layer.shared_experts is not None:
        layer.shared_experts.down_proj.weight.zero_()
    return layer
