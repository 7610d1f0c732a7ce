"""Functional MoE dispatch: `moe_ffn(x, weights, indices, gate_up_proj, down_proj, backend)`, optional expert biases.

Legend: N tokens, k slots per token, E experts, D model width, I expert hidden width.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from moe_kit.activations import ACTIVATIONS, check_activation, gated_activation
from moe_kit.config import BACKENDS
from moe_kit.ops.loop import moe_ffn_loop
from moe_kit.ops.routing import RoutingPlan, routing_plan
from moe_kit.ops.torch_ops import inference_ffn, lean_inference_applies, moe_ffn_torch

__all__ = [
    "moe_ffn", "resolve_backend", "check_backend", "routing_plan", "RoutingPlan", "gated_activation", "ACTIVATIONS",
]

_TRITON_FOUND = importlib.util.find_spec("triton") is not None
# "auto" picks the Triton kernels on CUDA only once benchmarks/gpu_suite.py has passed on a real
# GPU (correct in every row and faster than the torch backend at both benchmark shapes). Until
# then "auto" means "torch" everywhere; backend="triton" still selects the kernels by name.
TRITON_GPU_SUITE_PASSED = False


def triton_importable() -> bool:
    """True when the triton package is installed (found at import of moe_kit.ops; imported on first use)."""
    return _TRITON_FOUND


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_backend(backend: str, activation: str = "silu", bias: bool = False) -> None:
    """Fail early, before any tensor exists: unknown name, or "triton" on a machine that cannot run
    it or for experts its kernels lack (another activation than silu, expert biases)."""
    _check_known(backend)
    if backend == "triton":
        _check_triton_features(activation, bias)
        _check_triton_installed()
        if not (torch.cuda.is_available() or _triton_interpreting()):
            raise ValueError("backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 to run on CPU)")


def _check_known(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {list(BACKENDS)}")


def _check_triton_installed() -> None:
    if not triton_importable():
        raise ValueError("backend 'triton' needs the triton package (pip install 'moe-kit[triton]')")


def _check_triton_features(activation: str, bias: bool) -> None:
    """backend="triton" asked for by name runs the Triton kernels or raises: they have SwiGLU (silu)
    only and no expert biases ("auto" picks the torch backend for those)."""
    if activation != "silu":
        raise ValueError(f"backend 'triton' has no kernels for activation {activation!r} (silu only); "
                         "use backend='torch' or 'auto'")
    if bias:
        raise ValueError("backend 'triton' has no kernels for expert biases (expert_proj_bias); "
                         "use backend='torch' or 'auto'")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to the best backend for `device` ("torch"; "triton" on CUDA only once the GPU
    suite has passed, see TRITON_GPU_SUITE_PASSED); reject unknown names and "triton" where it
    cannot run (no triton, or a non-CUDA device outside the Triton interpreter)."""
    _check_known(backend)
    if backend == "triton":
        _check_triton_installed()
        if device.type != "cuda" and not _triton_interpreting():
            raise ValueError(
                f"backend 'triton' runs on CUDA tensors, got device {device}; use 'torch' or 'auto' "
                "(or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)"
            )
        return "triton"
    if backend == "auto":
        use_triton = TRITON_GPU_SUITE_PASSED and device.type == "cuda" and triton_importable()
        return "triton" if use_triton else "torch"
    return backend


def moe_ffn(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    backend: str = "auto",
    *,
    swiglu_limit: float | None = None,
    activation: str = "silu",
    recompute: str = "act",
    gate_up_proj_bias: torch.Tensor | None = None,
    down_proj_bias: torch.Tensor | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Routed gated experts: sum_j weights[:, j] * FFN_{indices[:, j]}(x), FFN = down(act(gate) * up).

    Args:
        x: [N, D] float activations.
        weights: [N, k] float routing weights (any float dtype; cast to x.dtype for the combine).
        indices: [N, k] integer expert ids in 0..E-1.
        gate_up_proj: [E, 2I, D], first I rows the gate projection, next I rows the up projection.
        down_proj: [E, D, I].
        backend: "auto" | "triton" | "torch" | "loop" (auto: "torch" until the Triton kernels have
            passed benchmarks/gpu_suite.py on a real GPU; see TRITON_GPU_SUITE_PASSED).
        swiglu_limit: optional clamp (gate <= limit, |up| <= limit) before act(gate) * up.
        activation: "silu" (SwiGLU, default) | "gelu" | "gelu_tanh" | "relu" | "swiglu_oai"
            (gpt-oss: (up + 1) * gate * sigmoid(1.702 * gate)). The Triton kernels have silu only:
            backend "triton" with another activation raises ValueError ("auto" runs torch).
        recompute: what the torch backend rebuilds in the backward instead of saving: "act" (default:
            saves h [N*k, 2I], regathers x rows and recomputes the activation) or "gemm1" (saves no
            [N*k, .] tensor, runs the first GEMM again: less memory, ~20% more fwd+bwd time on CPU).
            The Triton backend always saves h.
        gate_up_proj_bias: optional [E, 2I] (gate half, then up half) added to the first GEMM's output.
        down_proj_bias: optional [E, D] added to the second's, before the routing weight (gpt-oss:
            FFN = down(act(gate_up(x) + b1)) + b2, weighted as a whole). The Triton kernels have
            no bias: backend "triton" with either bias raises ValueError.
        deterministic: how each token's k expert outputs (and, in the backward, its k input-gradient
            rows) are summed. None (default): a fixed order on CUDA (bitwise run-to-run), index_add
            on CPU (deterministic there too). True: a fixed order everywhere. False: atomic adds
            (Triton: fused into the GEMM epilogue, no [N*k, D] buffer; last-bit run-to-run
            differences on a GPU). torch.use_deterministic_algorithms(True) overrides False.
    Returns:
        [N, D] in x.dtype, differentiable in x, weights, gate_up_proj and down_proj (and the biases).

    An expert id outside 0..E-1 raises IndexError in eager mode; under torch.compile the check
    is a device-side assert (RuntimeError), so the compiled graph has no host synchronization.
    """
    check_moe_ffn_inputs(x, weights, indices, gate_up_proj, down_proj, gate_up_proj_bias, down_proj_bias)
    check_activation(activation)
    num_experts = gate_up_proj.shape[0]
    if torch.compiler.is_compiling():
        torch._assert_async(((indices >= 0) & (indices < num_experts)).all(),
                            f"an expert id in indices is out of range for {num_experts} experts")
    elif indices.numel():
        low, high = torch.stack(torch.aminmax(indices)).tolist()  # one reduction, one host read
        if low < 0 or high >= num_experts:
            bad = indices[(indices < 0) | (indices >= num_experts)][0].item()
            raise IndexError(f"expert id {bad} in indices is out of range for {num_experts} experts")
    return dispatch(x, weights, indices, gate_up_proj, down_proj, backend, swiglu_limit, activation=activation,
                    recompute=recompute, gate_up_proj_bias=gate_up_proj_bias, down_proj_bias=down_proj_bias,
                    deterministic=deterministic)


def dispatch(x, weights, indices, gate_up_proj, down_proj, backend, swiglu_limit=None, has_dropped=False,
             activation="silu", recompute="act", pad_to=None, gate_up_proj_bias=None, down_proj_bias=None,
             deterministic=None):
    """moe_ffn without input checks; ids == E mark dropped slots when `has_dropped`; pad_to: every
    expert's GEMMs on exactly pad_to rows (torch backend; other backends compute the same values);
    deterministic as moe_ffn's. Picks the backend path, the eager CPU inference path included."""
    has_bias = gate_up_proj_bias is not None or down_proj_bias is not None
    if backend in ("auto", "torch") and not torch.is_grad_enabled() and lean_inference_applies(
            x, gate_up_proj, down_proj, has_dropped, pad_to, has_bias, deterministic):
        # the eager CPU inference path: it skips the routing plan, backward bookkeeping and the
        # general path's checks, a third of the experts' time at decode sizes
        return inference_ffn(x, weights, indices, gate_up_proj, down_proj, activation, swiglu_limit)
    backend = resolve_backend(backend, x.device)
    biases = dict(gate_up_proj_bias=gate_up_proj_bias, down_proj_bias=down_proj_bias)
    if backend == "loop":
        return moe_ffn_loop(x, weights, indices, gate_up_proj, down_proj, swiglu_limit, activation, **biases)
    if backend == "triton":
        _check_triton_features(activation, has_bias)
        from moe_kit.ops.triton import SUPPORTED_DTYPES, moe_ffn_triton  # imports triton on first use

        if x.dtype in SUPPORTED_DTYPES:
            return moe_ffn_triton(x, weights, indices, gate_up_proj, down_proj, swiglu_limit, has_dropped,
                                  deterministic)
        # other dtypes (float64) have no Triton kernels: the torch backend computes them
    if deterministic is False and torch.are_deterministic_algorithms_enabled():
        deterministic = True
    return moe_ffn_torch(x, weights, indices, gate_up_proj, down_proj, swiglu_limit, has_dropped, deterministic,
                         activation=activation, recompute=recompute, pad_to=pad_to, **biases)


def check_moe_ffn_inputs(x, weights, indices, gate_up_proj, down_proj, gate_up_proj_bias=None,
                         down_proj_bias=None) -> None:
    """Raise TypeError/ValueError naming the first inconsistent argument."""
    biases = {name: t for name, t in (("gate_up_proj_bias", gate_up_proj_bias), ("down_proj_bias", down_proj_bias))
              if t is not None}
    named = (("x", x), ("weights", weights), ("gate_up_proj", gate_up_proj), ("down_proj", down_proj), *biases.items())
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {getattr(indices, 'dtype', type(indices))}")
    if x.dim() != 2:
        raise ValueError(f"x must be [N, D], got shape {tuple(x.shape)}")
    if weights.dim() != 2 or indices.shape != weights.shape or weights.shape[0] != x.shape[0]:
        raise ValueError(
            f"weights {tuple(weights.shape)} and indices {tuple(indices.shape)} must both be [N, k] "
            f"with N = {x.shape[0]} (rows of x)"
        )
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError("gate_up_proj must be [E, 2I, D] and down_proj [E, D, I]")
    num_experts, two_i, hidden = gate_up_proj.shape
    if hidden != x.shape[1] or two_i % 2 or down_proj.shape != (num_experts, hidden, two_i // 2):
        raise ValueError(
            f"expert weights do not fit x [N, {x.shape[1]}]: gate_up_proj {tuple(gate_up_proj.shape)} "
            f"must be [E, 2I, D] and down_proj {tuple(down_proj.shape)} must be [E, D, I]"
        )
    if gate_up_proj.dtype != x.dtype or down_proj.dtype != x.dtype:
        raise TypeError(
            f"x ({x.dtype}), gate_up_proj ({gate_up_proj.dtype}) and down_proj ({down_proj.dtype}) "
            "must share one dtype"
        )
    for name, shape in (("gate_up_proj_bias", (num_experts, two_i)), ("down_proj_bias", (num_experts, hidden))):
        bias = biases.get(name)
        if bias is None:
            continue
        if tuple(bias.shape) != shape:
            raise ValueError(f"{name} {tuple(bias.shape)} must be {list(shape)} for gate_up_proj "
                             f"{tuple(gate_up_proj.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{name} ({bias.dtype}) must have x's dtype ({x.dtype}), as the expert weights")
    devices = {t.device for t in (x, weights, indices, gate_up_proj, down_proj, *biases.values())}
    if len(devices) > 1:
        raise ValueError(f"all moe_ffn inputs must be on one device, got {sorted(map(str, devices))}")
