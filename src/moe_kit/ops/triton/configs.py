"""Tile configurations: the autotune lists, the switch that pins one config, the row-block size.

Legend: S = N*k rows of the expert-sorted batch, E experts, D model width, I expert hidden width.

Two kinds of kernel:
- row-tiled kernels (GEMM 1; GEMM 2 and dX, slot-order "scatter_gemm" or atomic "combine_gemm";
  the SwiGLU backward) walk the tile schedule (schedule.py), which is built for one BLOCK_M per
  forward; autotune picks BLOCK_N, BLOCK_K, num_warps and num_stages only, keyed on the widths
  (D, I), BLOCK_M and the bucketed row count ROWS_BUCKET = rows_bucket(S), so a config tuned at
  one size is not reused far from it;
- the weight-gradient kernel owns one (expert, output tile) per program and autotunes all three
  tiles, keyed on its output shape and ROWS_BUCKET.

Pin one config for every kernel with the environment variable (set it before moe_kit.ops.triton
is imported: the autotune lists are built when the kernels are defined):
    MOE_KIT_TRITON_CONFIG="BLOCK_M=64,BLOCK_N=64,BLOCK_K=32,num_warps=4,num_stages=3"
Under the Triton interpreter (TRITON_INTERPRET=1) a single 16x16x16 config is used unless pinned.
"""

from __future__ import annotations

import os

import torch
import triton

ENV_VAR = "MOE_KIT_TRITON_CONFIG"
_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1)
_MIN_DOT_TILE = 16  # tl.dot needs every tile dim >= 16

# (BLOCK_N, BLOCK_K, num_warps, num_stages) per row-tiled kernel, for Hopper/Ampere-class GPUs.
# Every entry compiles for sm_90 in bf16 at BLOCK_M = 128 (the larger schedule block) with
# wgmma and zero register spills (Triton's bundled ptxas; tests/test_triton.py
# test_kernels_compile_for_sm90 checks it ahead of time, no GPU needed). Gathered rows keep a
# [BM, BK] pointer tile live, so GEMM 1 (two accumulators) and the SwiGLU backward (many live
# epilogue tiles) need BLOCK_N = 32 or 8 warps; wider configs spilled 0.3-7 KB and were dropped.
# combine_gemm (the atomic epilogue) takes scatter_gemm's list: with its adds issued in two column
# halves BLOCK_N = 128 does not spill (a single [128, 128] add spilled 436 B).
_ROW_TILED = {
    "gemm1_swiglu": ((32, 64, 8, 4), (32, 64, 8, 3), (32, 32, 8, 3), (32, 32, 4, 4)),
    "scatter_gemm": ((128, 32, 8, 4), (64, 32, 8, 3), (64, 32, 8, 4), (64, 64, 8, 3), (32, 32, 4, 4)),
    "combine_gemm": ((128, 32, 8, 4), (64, 32, 8, 3), (64, 32, 8, 4), (64, 64, 8, 3), (32, 32, 4, 4)),
    "swiglu_backward": ((32, 64, 8, 4), (32, 32, 8, 3), (32, 64, 8, 3), (32, 32, 8, 4)),
}
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the per-expert weight-gradient reduction,
# zero spills for both of its uses (d_down with the in-kernel SwiGLU, d_gate_up with gathered x).
_WEIGHT_GRAD = (
    (128, 128, 64, 8, 3), (64, 64, 64, 4, 4), (128, 128, 32, 8, 4), (64, 64, 32, 4, 4), (128, 64, 32, 8, 3),
    (64, 128, 32, 8, 3),
)


def interpreting() -> bool:
    """True when Triton runs kernels in its Python interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def parse_config(spec: str) -> dict[str, int]:
    """"BLOCK_M=64,BLOCK_N=64,..." -> {"BLOCK_M": 64, ...}; every key of _KEYS must be given."""
    out = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in _KEYS or not value.strip().isdigit():
            raise ValueError(f"{ENV_VAR}: bad item {item!r}; expected NAME=INT with NAME in {list(_KEYS)}")
        out[name] = int(value)
    missing = [name for name in _KEYS if name not in out]
    if missing:
        raise ValueError(f"{ENV_VAR}={spec!r} misses {missing}")
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        if out[name] < _MIN_DOT_TILE or out[name] & (out[name] - 1):
            raise ValueError(f"{ENV_VAR}: {name}={out[name]} must be a power of two >= {_MIN_DOT_TILE}")
    return out


def pinned_config() -> dict[str, int] | None:
    """The one config every kernel uses, or None to autotune."""
    spec = os.environ.get(ENV_VAR)
    if spec:
        return parse_config(spec)
    return dict(_INTERPRETER_CONFIG) if interpreting() else None


def row_tiled_configs(kernel: str) -> list[triton.Config]:
    """Autotune list of a kernel that walks the tile schedule (BLOCK_M comes from the schedule)."""
    pin = pinned_config()
    if pin is not None:
        return [triton.Config(dict(BLOCK_N=pin["BLOCK_N"], BLOCK_K=pin["BLOCK_K"]),
                              num_warps=pin["num_warps"], num_stages=pin["num_stages"])]
    return [triton.Config(dict(BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s) for n, k, w, s in _ROW_TILED[kernel]]


def weight_grad_configs() -> list[triton.Config]:
    """Autotune list of the per-expert weight-gradient kernel (BLOCK_K runs over rows)."""
    pin = pinned_config()
    if pin is not None:
        return [triton.Config({name: pin[name] for name in _KEYS[:3]},
                              num_warps=pin["num_warps"], num_stages=pin["num_stages"])]
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), num_warps=w, num_stages=s)
            for m, n, k, w, s in _WEIGHT_GRAD]


def min_block_n(kernel: str) -> int:
    """Smallest BLOCK_N `kernel` may pick: sizes its per-column-tile partial buffers."""
    return min(cfg.kwargs["BLOCK_N"] for cfg in row_tiled_configs(kernel))


def block_m(num_rows: int, num_experts: int) -> int:
    """Rows per tile of the schedule: 128 once experts average >= 128 rows, else 64 (pin wins)."""
    pin = pinned_config()
    if pin is not None:
        return pin["BLOCK_M"]
    return 128 if num_rows >= 128 * num_experts else 64


ROW_BUCKETS = (1024, 8192, 65536, 524288)  # S up to each of these shares autotune results; above: one more


def rows_bucket(num_rows) -> int:
    """Autotune key for S rows: the first ROW_BUCKETS entry >= S, else 2**31. Plain comparisons,
    so a symbolic S (torch.compile, dynamic shapes) guards on the bucket only, not on S."""
    for bucket in ROW_BUCKETS:
        if num_rows <= bucket:
            return bucket
    return 2**31


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 follows torch's TF32 switch (off by default), 16-bit ignores it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
