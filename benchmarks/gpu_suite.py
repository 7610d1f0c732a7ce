"""GPU suite for the "triton" backend: correctness first, then speed, all in one run.

    python benchmarks/gpu_suite.py --out benchmarks/results/gpu [--repeats 20] [--warmup 3]
        [--shapes qwen3-30b-a3b,mixtral-8x7b] [--skip-bench] [--skip-int64] [--skip-compile]

Needs one CUDA GPU (written for an H100 with torch >= 2.11 and triton >= 3.6). Sections:
  correctness  moe_ffn on the triton backend in fp32 / bf16 / fp16 against the fp32 loop
               reference on the same (rounded) inputs: output and the four gradients (x, routing
               weights, gate_up_proj, down_proj), normwise ||a - b|| / ||b|| and, for the row-shaped
               ones (out, d x), the worst row's error. Both per-token combines run: "triton" (the
               CUDA default, deterministic: slot-order [S, D] buffer summed over k) and "triton
               fused" (moe_ffn_triton(deterministic=False): atomic adds into an fp32 [N, D]
               accumulator in the GEMM epilogue, no [S, D] buffer). A row passes when, for both,
               every normwise error is within the dtype's tolerance, the worst row within
               ROW_FACTOR x that, and no error above RATIO x the torch backend's error on the same
               inputs (plus a small floor): the kernels may not be much less accurate than torch's
               own GEMMs
  int64        one bf16 run with S*D and S*2I above 2**31 elements (S = N*k rows): the last
               tokens route to experts nobody else uses, so their outputs, input / routing-weight
               gradients AND those experts' gate_up / down gradients are checked against the
               loop reference on the last tokens alone (all four gradients)
  determinism  the same layer forward + backward twice (the default, deterministic combine):
               bitwise equal outputs and gradients
  host sync    the expert path forward + backward under torch.cuda.set_sync_debug_mode("error"),
               both combines
  compile      torch.compile of the expert path (fullgraph, both combines) and of a MoELayer on
               the triton backend, against eager; graph breaks of the layer counted by
               torch._dynamo.explain
  benchmark    MoELayer forward (torch.no_grad) and forward + backward at the published layer
               shapes, bf16: moe_kit triton, moe_kit torch (grouped_mm), HF's eager per-expert
               loop (baselines.HFEagerMoEBlock), and the device's dense bf16 GEMM rate measured
               in the same run. Active FLOPs: forward 6*T*k*D*I, forward + backward 3x that.
               "moe_kit triton fused" is the same layer with the fused combine (fused_combine()).
               Autotuning runs on the benchmarked shape itself (first untimed call; the autotune
               key buckets the row count); the peak memory is measured on a second untimed call,
               after tuning, so autotuning's scratch copies are not counted.
  combine mem  per benchmark shape, the expert path alone (moe_ffn_triton, bf16): peak memory of
               forward (no grad) and forward + backward with each combine, against the predicted
               saving of the fused one, N*D*(k*es - 4) bytes per pass (es = 2 bytes: the [S, D]
               buffer of x.dtype replaced by an fp32 [N, D] accumulator)
When every check passes and triton is faster than torch at both shapes, flip
moe_kit.ops.TRITON_GPU_SUITE_PASSED (backend="auto" then picks triton on CUDA) and commit the tables.
Writes OUT/gpu_suite.json (all data) and OUT/gpu_suite.md (tables); exits 1 when a check fails.
Legend: T (= N) tokens, k experts per token, S = T*k rows, E experts, D model width, I expert width.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import HFEagerMoEBlock  # noqa: E402
from timing import time_interleaved  # noqa: E402

from moe_kit import MoEConfig, MoELayer  # noqa: E402
from moe_kit.ops import dispatch  # noqa: E402
from moe_kit.ops.loop import moe_ffn_loop  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
ROW_FACTOR = 4.0  # worst row error may be this many times the normwise tolerance
RATIO = 2.0  # triton's error may be at most this many times torch's on the same inputs ...
RATIO_FLOOR = {torch.float32: 1e-6, torch.bfloat16: 2e-3, torch.float16: 5e-4}  # ... or below this floor
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
GRADS = ("x", "weights", "gate_up", "down")
TRITON_VARIANTS = ("triton", "triton_fused")  # the deterministic (default on CUDA) and the fused combine
# (name, T, D, I, E, k, routing, swiglu_limit, drop every n-th slot)
CORRECTNESS_CASES = [
    ("odd-sizes", 999, 1000, 360, 13, 3, "random", None, 0),
    ("qwen3-dims", 2048, 2048, 768, 128, 8, "random", None, 0),
    ("mixtral-dims", 512, 4096, 14336, 8, 2, "random", None, 0),
    ("skewed+empty", 1024, 512, 256, 17, 2, "skewed", None, 0),
    ("swiglu-limit", 1024, 512, 256, 16, 4, "random", 1.0, 0),
    ("dropped-slots", 1024, 512, 256, 16, 4, "random", None, 5),
]


# ----------------------------------------------------------------------------- helpers


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normwise relative error ||a - b|| / ||b|| in fp64 (absolute when b is zero)."""
    a, b = a.detach().double(), b.detach().double()
    ref = b.norm().item()
    return (a - b).norm().item() / ref if ref > 0 else (a - b).norm().item()


def row_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Worst row's ||a_r - b_r|| / ||b_r|| over rows whose reference norm is >= 1e-3 x the median
    row norm (near-zero rows, e.g. tokens whose every slot was dropped, are judged normwise only)."""
    a, b = a.detach().double().flatten(1), b.detach().double().flatten(1)
    norms = b.norm(dim=1)
    if norms.numel() == 0:
        return 0.0
    keep = norms >= 1e-3 * norms.median().clamp(min=1e-30)
    if not bool(keep.any()):
        return 0.0
    return ((a - b).norm(dim=1)[keep] / norms[keep]).max().item()


def judge(dtype, triton_err: dict, torch_err: dict, triton_rows: dict) -> tuple[bool, list[str]]:
    """(ok, reasons) for one correctness row: tolerance, row tolerance, ratio to torch's error."""
    tol, reasons = TOLERANCE[dtype], []
    for what, err in triton_err.items():
        if not err <= tol:  # nan fails too
            reasons.append(f"{what} {err:.1e} > tol {tol:.0e}")
        if not err <= max(RATIO * torch_err[what], RATIO_FLOOR[dtype]):
            reasons.append(f"{what} {err:.1e} > {RATIO:g} x torch {torch_err[what]:.1e}")
    for what, err in triton_rows.items():
        if not err <= ROW_FACTOR * tol:
            reasons.append(f"worst row of {what} {err:.1e} > {ROW_FACTOR:g} x tol")
    return not reasons, reasons


def environment(argv) -> dict:
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    return dict(
        device_name=torch.cuda.get_device_name(),
        capability=".".join(map(str, torch.cuda.get_device_capability())),
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="python benchmarks/gpu_suite.py " + " ".join(argv),
        pinned_config=os.environ.get("MOE_KIT_TRITON_CONFIG"),
    )


def routing(gen, tokens, experts, top_k, mode, device):
    """int64 [T, k] distinct expert ids per token; "skewed": half the experts get nothing."""
    pool = experts if mode == "random" else max(top_k, experts // 2)
    scores = torch.rand(tokens, pool, generator=gen, device=device)
    if mode == "skewed":
        scores[:, 0] += 1.0  # one hot expert that nearly every token picks
    return scores.topk(top_k, dim=1).indices


def make_inputs(tokens, hidden, inter, experts, top_k, mode, drop_every, device, seed=0):
    """fp32 masters: x [T, D], weights [T, k], gate_up [E, 2I, D], down [E, D, I]; ids int64 [T, k].

    Expert weights are scaled by 1/sqrt(width) so h ~ N(0, 1); drop_every > 0 marks dropped slots (id E).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen, device=device)
    weights = torch.rand(tokens, top_k, generator=gen, device=device)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen, device=device) / hidden**0.5
    down = torch.randn(experts, hidden, inter, generator=gen, device=device) / inter**0.5
    indices = routing(gen, tokens, experts, top_k, mode, device)
    if drop_every:
        indices.view(-1)[::drop_every] = experts
    return (x, weights, gate_up, down), indices


def moe_ffn_fused(x, weights, indices, gate_up, down, limit=None, has_dropped=False):
    """The triton backend with the fused (atomic, not deterministic) combine."""
    from moe_kit.ops.triton import moe_ffn_triton  # imports triton

    return moe_ffn_triton(x, weights, indices, gate_up, down, limit, has_dropped, deterministic=False)


@contextlib.contextmanager
def fused_combine():
    """Inside: backend="triton" (dispatch, MoELayer) runs the fused combine. dispatch imports
    moe_ffn_triton from the package at each call, so swapping the package attribute reaches it."""
    import moe_kit.ops.triton as package

    saved = package.moe_ffn_triton
    package.moe_ffn_triton = functools.partial(saved, deterministic=False)
    try:
        yield
    finally:
        package.moe_ffn_triton = saved


class FusedCombine(torch.nn.Module):
    """`layer` (a MoELayer on the triton backend) run with the fused combine; shares its parameters."""

    def __init__(self, layer: MoELayer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        with fused_combine():
            return self.layer(x)


def run_ffn(backend, tensors, indices, limit, has_dropped, grad_out):
    """Output and the four gradients of moe_ffn on `backend` ("loop" = the reference,
    "triton_fused" = the triton backend with the fused combine)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    x, weights, gate_up, down = leaves
    if backend == "loop":
        out = moe_ffn_loop(x, weights, indices, gate_up, down, limit)
    elif backend == "triton_fused":
        out = moe_ffn_fused(x, weights, indices, gate_up, down, limit, has_dropped)
    else:
        out = dispatch(x, weights, indices, gate_up, down, backend, limit, has_dropped=has_dropped)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True)
    return [out] + [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves, strict=True)]


# ----------------------------------------------------------------------------- correctness


def check_correctness(device) -> list[dict]:
    rows = []
    for name, tokens, hidden, inter, experts, top_k, mode, limit, drop_every in CORRECTNESS_CASES:
        masters, indices = make_inputs(tokens, hidden, inter, experts, top_k, mode, drop_every, device)
        grad_out = torch.randn(tokens, hidden, device=device, generator=torch.Generator(device).manual_seed(1))
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            inputs = [masters[0].to(dtype), masters[1], masters[2].to(dtype), masters[3].to(dtype)]
            grad = grad_out.to(dtype)
            ref = run_ffn("loop", [t.float() for t in inputs], indices, limit, drop_every > 0, grad.float())
            errors, row_errors = {}, {}
            for backend in (*TRITON_VARIANTS, "torch"):
                got = run_ffn(backend, inputs, indices, limit, drop_every > 0, grad)
                errors[backend] = {what: rel_err(g, r) for what, g, r in zip(("out",) + GRADS, got, ref, strict=True)}
                row_errors[backend] = {"out": row_err(got[0], ref[0]), "x": row_err(got[1], ref[1])}
                del got
            row = dict(case=name, dtype=DTYPE_NAMES[dtype], T=tokens, D=hidden, I=inter, E=experts, k=top_k,
                       torch=errors["torch"], torch_rows=row_errors["torch"], tolerance=TOLERANCE[dtype], reasons=[])
            for variant in TRITON_VARIANTS:
                ok, reasons = judge(dtype, errors[variant], errors["torch"], row_errors[variant])
                row[variant], row[variant + "_rows"] = errors[variant], row_errors[variant]
                row[variant + "_worst"] = max(errors[variant].values())
                row["reasons"] += [f"{variant}: {r}" for r in reasons]
            row["worst"] = row["triton_worst"]
            row["ok"] = not row["reasons"]
            rows.append(row)
            worst_row = max(row_errors["triton"].values())
            print(f"  {name:14s} {DTYPE_NAMES[dtype]}  triton worst {row['worst']:.2e} (row {worst_row:.2e})"
                  f"  fused worst {row['triton_fused_worst']:.2e}  torch worst {max(errors['torch'].values()):.2e}  "
                  f"{'ok' if row['ok'] else 'FAIL: ' + '; '.join(row['reasons'])}", flush=True)
        del masters, indices
        torch.cuda.empty_cache()
    return rows


def check_int64(device, tokens=135_168, hidden=2048, inter=1024, experts=64, top_k=8, tail=512) -> dict:
    """S*D and S*2I > 2**31 by default: addresses of late rows and slots need int64 (bf16).

    The last `tail` tokens route to the top_k highest experts, which no other token uses: their
    rows sit at the end of the expert-sorted batch (past 2**31 elements) and those experts'
    weight gradients come from the tail alone, so all four gradients can be checked against the
    loop reference run on the tail tokens only."""
    rows = tokens * top_k
    masters, indices = make_inputs(tokens, hidden, inter, experts - top_k, top_k, "random", 0, device)
    gen = torch.Generator(device=device).manual_seed(3)
    reserved = experts - top_k + torch.arange(top_k, device=device)  # experts only the tail uses
    extra_gate_up = torch.randn(top_k, 2 * inter, hidden, generator=gen, device=device) / hidden**0.5
    extra_down = torch.randn(top_k, hidden, inter, generator=gen, device=device) / inter**0.5
    masters = (masters[0], masters[1], torch.cat([masters[2], extra_gate_up]), torch.cat([masters[3], extra_down]))
    indices[-tail:] = reserved
    inputs = [masters[0].bfloat16(), masters[1], masters[2].bfloat16(), masters[3].bfloat16()]
    del masters
    grad = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    leaves = [t.requires_grad_() for t in inputs]
    out = dispatch(leaves[0], leaves[1], indices, leaves[2], leaves[3], "triton")
    grad_x, grad_w, grad_gu, grad_dn = torch.autograd.grad(out, leaves, grad)
    sub = [leaves[0][-tail:].detach().float(), leaves[1][-tail:].detach(), leaves[2].detach().float(),
           leaves[3].detach().float()]
    ref = run_ffn("loop", sub, indices[-tail:], None, False, grad[-tail:].float())
    errors = dict(out=rel_err(out[-tail:], ref[0]), x=rel_err(grad_x[-tail:], ref[1]),
                  weights=rel_err(grad_w[-tail:], ref[2]), gate_up=rel_err(grad_gu[reserved], ref[3][reserved]),
                  down=rel_err(grad_dn[reserved], ref[4][reserved]))
    worst = max(errors.values())
    result = dict(T=tokens, D=hidden, I=inter, E=experts, k=top_k, S_times_D=rows * hidden,
                  S_times_2I=rows * 2 * inter, above_2_31=rows * hidden > 2**31 and rows * 2 * inter > 2**31,
                  tail_tokens=tail, errors=errors, worst=worst, ok=worst <= TOLERANCE[torch.bfloat16])
    print(f"  S*D = {rows * hidden:,} (> 2**31: {rows * hidden > 2**31}), last {tail} tokens worst error "
          f"{worst:.2e}  {'ok' if result['ok'] else 'FAIL'}", flush=True)
    return result


def small_layer(device, backend="triton", **overrides) -> MoELayer:
    cfg = MoEConfig.preset("qwen3-30b-a3b", num_experts=16, aux_loss_coef=0.0, backend=backend, **overrides)
    with torch.device(device):
        return MoELayer(cfg).to(torch.bfloat16)


def layer_grads(layer, x, grad):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    out.backward(grad)
    return [out, x.grad] + [p.grad for p in layer.parameters() if p.grad is not None]


def check_determinism(device) -> dict:
    torch.manual_seed(0)
    layer = small_layer(device)
    x = torch.randn(4096, layer.cfg.hidden_size, device=device, dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    first, second = layer_grads(layer, x, grad), layer_grads(layer, x, grad)
    same = all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    print(f"  two runs bitwise equal: {same}", flush=True)
    return dict(ok=same, tensors=len(first))


def check_no_host_sync(device) -> dict:
    """Forward + backward of the expert path (dropless and with dropped slots, each combine) under
    torch.cuda.set_sync_debug_mode("error"), after a warm-up call that autotunes."""
    result = {}
    for has_dropped, fused in ((False, False), (True, False), (False, True), (True, True)):
        masters, indices = make_inputs(4096, 1024, 512, 16, 4, "random", 7 if has_dropped else 0, device)
        leaves = [masters[0].bfloat16(), masters[1], masters[2].bfloat16(), masters[3].bfloat16()]
        leaves = [t.requires_grad_() for t in leaves]
        name = ("dropped" if has_dropped else "dropless") + ("-fused" if fused else "")

        def step(leaves=leaves, indices=indices, has_dropped=has_dropped, fused=fused):
            if fused:
                out = moe_ffn_fused(leaves[0], leaves[1], indices, leaves[2], leaves[3], None, has_dropped)
            else:
                out = dispatch(leaves[0], leaves[1], indices, leaves[2], leaves[3], "triton", None,
                               has_dropped=has_dropped)
            torch.autograd.grad(out, leaves, torch.ones_like(out))

        step()  # autotunes (which synchronizes) on first use
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            result[name] = "no sync"
        except RuntimeError as exc:
            result[name] = f"synchronized: {exc}"[:300]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    result["ok"] = all(v == "no sync" for v in result.values())
    print(f"  {result}", flush=True)
    return result


def check_compile(device) -> dict:
    """Inductor on the expert path (fullgraph) and on a whole layer, against eager."""
    result = {}
    torch.manual_seed(0)
    layer = small_layer(device)
    x = torch.randn(2048, layer.cfg.hidden_size, device=device, dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    try:
        masters, indices = make_inputs(2048, 1024, 512, 16, 4, "random", 0, device)
        inputs = [masters[0].bfloat16(), masters[1], masters[2].bfloat16(), masters[3].bfloat16()]

        def expert_path(x, weights, indices, gate_up, down):
            return dispatch(x, weights, indices, gate_up, down, "triton")

        compiled = torch.compile(expert_path, fullgraph=True)
        eager_out = expert_path(*inputs[:2], indices, *inputs[2:])
        result["expert_path_err"] = rel_err(compiled(*inputs[:2], indices, *inputs[2:]), eager_out)
        # the fused combine under Inductor: its autotuned atomic kernel must start from a zeroed
        # accumulator (reset_to_zero), forward and d x alike
        grad_fused = torch.randn_like(inputs[0])
        compiled_fused = torch.compile(moe_ffn_fused, fullgraph=True)
        fused = {}
        for name, fn in (("eager", moe_ffn_fused), ("compiled", compiled_fused)):
            leaves = [t.detach().clone().requires_grad_() for t in inputs]
            out = fn(leaves[0], leaves[1], indices, leaves[2], leaves[3])
            fused[name] = [out, *torch.autograd.grad(out, leaves, grad_fused)]
        result["expert_path_fused_err"] = max(rel_err(a, b) for a, b in zip(fused["compiled"], fused["eager"],
                                                                              strict=True))
        torch._dynamo.reset()
        explain = torch._dynamo.explain(layer)(x)
        result["layer_graph_breaks"] = explain.graph_break_count
        result["layer_break_reasons"] = [str(r.reason) for r in explain.break_reasons]
        torch._dynamo.reset()
        compiled_layer = torch.compile(layer)
        eager = layer_grads(layer, x, grad)
        got = layer_grads(compiled_layer, x, grad)
        result["layer_worst_err"] = max(rel_err(a, b) for a, b in zip(got, eager, strict=True))
        worst = max(result["expert_path_err"], result["expert_path_fused_err"], result["layer_worst_err"])
        result["ok"] = worst <= TOLERANCE[torch.bfloat16]
    except Exception:  # record and go on: the benchmark still runs
        result["error"] = traceback.format_exc(limit=8)
        result["ok"] = False
    print(f"  {json.dumps({k: v for k, v in result.items() if k != 'layer_break_reasons'})[:400]}", flush=True)
    return result


# ----------------------------------------------------------------------------- benchmark


def dense_gemm_tflops(device, size=8192, repeats=20) -> dict:
    """The device's dense bf16 GEMM rate: [size, size] @ [size, size], median of `repeats`."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    r = time_interleaved({"mm": lambda: a @ b}, repeats=repeats, warmup=3)["mm"]
    return dict(size=size, median_ms=r["median_ms"], tflops=2 * size**3 / r["median_ms"] / 1e9)


def sharing_layer(layer: MoELayer, backend: str) -> MoELayer:
    """A MoELayer on `backend` that uses `layer`'s own gate and experts (no second copy)."""
    with torch.device("meta"):
        other = MoELayer(dataclasses.replace(layer.cfg, backend=backend), layer.layer_id)
    other.gate, other.experts, other.shared_experts = layer.gate, layer.experts, layer.shared_experts
    return other


def bench_shape(preset: str, tokens: int, device, repeats: int, warmup: int, dense_tflops: float) -> list[dict]:
    cfg = MoEConfig.preset(preset, aux_loss_coef=0.0, z_loss_coef=0.0, backend="triton")
    torch.manual_seed(0)
    with torch.device(device):
        layer = MoELayer(cfg).to(torch.bfloat16)
    providers = {"moe_kit triton": layer, "moe_kit triton fused": FusedCombine(layer),
                 "moe_kit torch": sharing_layer(layer, "torch"), "hf eager loop": HFEagerMoEBlock(layer)}
    x = torch.randn(tokens, cfg.hidden_size, device=device, dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    x_grad = x.clone().requires_grad_()
    fwd_flops = 6 * tokens * cfg.top_k * cfg.hidden_size * cfg.intermediate_size

    def forward(module):
        def run():
            with torch.no_grad():
                module(x)
        return run

    def forward_backward(module):
        def run():
            x_grad.grad = None
            module.zero_grad(set_to_none=True)
            module(x_grad).backward(grad)
        return run

    rows = []
    for pass_name, make, flops in (("fwd", forward, fwd_flops), ("fwd+bwd", forward_backward, 3 * fwd_flops)):
        fns = {name: make(module) for name, module in providers.items()}
        peak = {}
        for name, fn in fns.items():  # untimed: autotune on this very shape, then the peak memory after tuning
            fn()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peak[name] = torch.cuda.max_memory_allocated() / 2**30
        times = time_interleaved(fns, repeats=repeats, warmup=warmup)
        for name, t in times.items():
            tflops = flops / t["median_ms"] / 1e9
            rows.append(dict(shape=preset, T=tokens, D=cfg.hidden_size, I=cfg.intermediate_size, E=cfg.num_experts,
                             k=cfg.top_k, pass_=pass_name, provider=name, median_ms=t["median_ms"],
                             min_ms=t["min_ms"], max_ms=t["max_ms"], tflops=tflops,
                             fraction_of_dense=tflops / dense_tflops, peak_gib=peak[name]))
        base = {r["provider"]: r["median_ms"] for r in rows if r["shape"] == preset and r["pass_"] == pass_name}
        for r in rows:
            if r["shape"] == preset and r["pass_"] == pass_name:
                r["speedup_vs_torch"] = base["moe_kit torch"] / r["median_ms"]
                r["speedup_vs_hf"] = base["hf eager loop"] / r["median_ms"]
                print(f"  {preset:14s} {pass_name:7s} {r['provider']:20s} {r['median_ms']:9.3f} ms "
                      f"{r['tflops']:7.1f} TFLOP/s ({100 * r['fraction_of_dense']:.0f}% of dense)  "
                      f"x{r['speedup_vs_torch']:.2f} vs torch  x{r['speedup_vs_hf']:.2f} vs hf", flush=True)
    del providers, layer
    torch.cuda.empty_cache()
    return rows


def combine_saving_bytes(tokens: int, hidden: int, top_k: int, element_size: int) -> int:
    """Bytes the fused combine does not allocate, per pass (forward, or d x in the backward): the
    slot-order buffer [S, D] of x.dtype, minus the fp32 [N, D] accumulator that replaces it (for
    fp32 the accumulator is the output, which the deterministic path allocates as well)."""
    if element_size == 4:
        return tokens * top_k * hidden * 4
    return tokens * hidden * (top_k * element_size - 4)


def combine_memory(preset: str, tokens: int, device) -> list[dict]:
    """Peak memory of the expert path alone (moe_ffn_triton, bf16) with each combine: forward
    under no_grad and forward + backward, each measured after an untimed call that autotunes."""
    from moe_kit.ops.triton import moe_ffn_triton

    cfg = MoEConfig.preset(preset)
    masters, indices = make_inputs(tokens, cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.top_k,
                                   "random", 0, device)
    inputs = [masters[0].bfloat16(), masters[1], masters[2].bfloat16(), masters[3].bfloat16()]
    del masters
    grad = torch.randn_like(inputs[0])
    rows = []
    for pass_name in ("fwd", "fwd+bwd"):
        peak = {}
        for combine, deterministic in (("slot-order", True), ("fused", False)):
            def run(deterministic=deterministic, pass_name=pass_name):
                if pass_name == "fwd":
                    with torch.no_grad():
                        return moe_ffn_triton(*inputs[:2], indices, *inputs[2:], deterministic=deterministic)
                leaves = [t.detach().requires_grad_() for t in inputs]
                out = moe_ffn_triton(leaves[0], leaves[1], indices, leaves[2], leaves[3],
                                     deterministic=deterministic)
                return torch.autograd.grad(out, leaves, grad)

            run()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            result = run()
            torch.cuda.synchronize()
            peak[combine] = torch.cuda.max_memory_allocated() - base
            del result
        predicted = combine_saving_bytes(tokens, cfg.hidden_size, cfg.top_k, 2)
        rows.append(dict(shape=preset, T=tokens, D=cfg.hidden_size, I=cfg.intermediate_size, E=cfg.num_experts,
                         k=cfg.top_k, pass_=pass_name, slot_order_peak_mib=peak["slot-order"] / 2**20,
                         fused_peak_mib=peak["fused"] / 2**20, saved_mib=(peak["slot-order"] - peak["fused"]) / 2**20,
                         predicted_per_pass_mib=predicted / 2**20))
        r = rows[-1]
        print(f"  {preset:14s} {pass_name:7s} peak above inputs: slot-order {r['slot_order_peak_mib']:.0f} MiB, "
              f"fused {r['fused_peak_mib']:.0f} MiB (saved {r['saved_mib']:.0f} MiB; N*D*(k*es - 4) = "
              f"{r['predicted_per_pass_mib']:.0f} MiB per pass)", flush=True)
    return rows


def autotuned_configs() -> dict:
    """The config each autotuned kernel picked, per autotune key."""
    import moe_kit.ops.triton.gemm1_swiglu as g1
    import moe_kit.ops.triton.scatter_gemm as sg
    import moe_kit.ops.triton.swiglu_backward as sb
    import moe_kit.ops.triton.weight_grad as wg

    kernels = dict(gemm1_swiglu=g1._gemm1_swiglu_kernel, scatter_gemm=sg._scatter_gemm_kernel,
                   combine_gemm=sg._combine_gemm_kernel, swiglu_backward=sb._swiglu_backward_kernel,
                   weight_grad=wg._weight_grad_kernel)
    return {name: {str(key): str(cfg) for key, cfg in getattr(k, "cache", {}).items()} for name, k in kernels.items()}


# ----------------------------------------------------------------------------- report


def markdown(data: dict) -> str:
    env = data["environment"]
    lines = [f"# moe_kit triton backend on {env['device_name']} (sm_{env['capability'].replace('.', '')})",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, python {env['python']}, "
             f"{env['date']}; `{env['command']}`; all checks passed: {data.get('ok')}", ""]
    if data.get("correctness"):
        lines += ["## Correctness (normwise error vs the fp32 loop reference)", "",
                  f"A row passes when each error is within the tolerance, the worst row of out / d x within "
                  f"{ROW_FACTOR:g} x the tolerance, and each error within {RATIO:g} x the torch backend's "
                  "(or a floor).",
                  "",
                  "Errors of the default (deterministic) combine; the fused combine's worst error and worst "
                  "row follow.",
                  "",
                  "| case | dtype | out | d x | d weights | d gate_up | d down | worst row (out, d x) | "
                  "fused worst (row) | torch worst | tolerance | ok |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in data["correctness"]:
            e, rows_ = r["triton"], r["triton_rows"]
            fused_row = max(r["triton_fused_rows"].values())
            verdict = "yes" if r["ok"] else "NO: " + "; ".join(r["reasons"])
            lines.append(f"| {r['case']} | {r['dtype']} | " + " | ".join(f"{e[w]:.1e}" for w in ("out",) + GRADS)
                         + f" | {rows_['out']:.1e}, {rows_['x']:.1e} | {r['triton_fused_worst']:.1e} "
                         f"({fused_row:.1e}) | {max(r['torch'].values()):.1e} | {r['tolerance']:.0e} | {verdict} |")
        lines.append("")
    for key in ("int64", "determinism", "host_sync", "compile"):
        if key in data:
            shown = {k: v for k, v in data[key].items() if k not in ("error", "layer_break_reasons")}
            lines += [f"**{key}**: `{json.dumps(shown)}`", ""]
    if data.get("benchmark"):
        dense = data["dense_gemm"]
        lines += ["## Speed (bf16, medians)", "",
                  f"Dense bf16 GEMM ({dense['size']}^3) in this run: {dense['tflops']:.0f} TFLOP/s.", "",
                  "| shape | pass | provider | ms | TFLOP/s | % of dense | vs torch | vs hf eager | peak GiB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in data["benchmark"]:
            lines.append(f"| {r['shape']} T={r['T']} | {r['pass_']} | {r['provider']} | {r['median_ms']:.3f} | "
                         f"{r['tflops']:.1f} | {100 * r['fraction_of_dense']:.0f}% | x{r['speedup_vs_torch']:.2f} | "
                         f"x{r['speedup_vs_hf']:.2f} | {r['peak_gib']:.1f} |")
        lines.append("")
    if data.get("combine_memory"):
        lines += ["## Combine memory (expert path, bf16; peak above the inputs)", "",
                  "| shape | pass | slot-order MiB | fused MiB | saved MiB | N*D*(k*es - 4) per pass MiB |",
                  "|---|---|---|---|---|---|"]
        for r in data["combine_memory"]:
            lines.append(f"| {r['shape']} T={r['T']} | {r['pass_']} | {r['slot_order_peak_mib']:.0f} | "
                         f"{r['fused_peak_mib']:.0f} | {r['saved_mib']:.0f} | {r['predicted_per_pass_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/gpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--shapes", default="qwen3-30b-a3b,mixtral-8x7b")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--skip-int64", action="store_true")
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_suite.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references (and fp32 triton) in full precision
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    data = dict(environment=environment(sys.argv[1:] if argv is None else argv))
    print(f"{data['environment']['device_name']}: torch {torch.__version__}, triton {data['environment']['triton']}")

    print("correctness", flush=True)
    data["correctness"] = check_correctness(device)
    ok = all(r["ok"] for r in data["correctness"])
    if not args.skip_int64:
        print("int64 indexing", flush=True)
        data["int64"] = check_int64(device)
        ok &= data["int64"]["ok"]
        torch.cuda.empty_cache()
    print("determinism", flush=True)
    data["determinism"] = check_determinism(device)
    ok &= data["determinism"]["ok"]
    print("host synchronization", flush=True)
    data["host_sync"] = check_no_host_sync(device)
    ok &= data["host_sync"]["ok"]
    if not args.skip_compile:
        print("torch.compile", flush=True)
        data["compile"] = check_compile(device)
        ok &= data["compile"]["ok"]
    if not args.skip_bench:
        print("benchmark", flush=True)
        data["dense_gemm"] = dense_gemm_tflops(device, repeats=args.repeats)
        print(f"  dense bf16 GEMM: {data['dense_gemm']['tflops']:.0f} TFLOP/s", flush=True)
        tokens = {"qwen3-30b-a3b": 16384, "mixtral-8x7b": 8192}
        data["benchmark"], data["combine_memory"] = [], []
        for preset in filter(None, args.shapes.split(",")):
            data["benchmark"] += bench_shape(preset, tokens.get(preset, 8192), device, args.repeats, args.warmup,
                                             data["dense_gemm"]["tflops"])
            data["combine_memory"] += combine_memory(preset, tokens.get(preset, 8192), device)
            torch.cuda.empty_cache()
    data["autotuned_configs"] = autotuned_configs()
    data["ok"] = bool(ok)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_suite.json"), "w") as f:
        json.dump(data, f, indent=1, default=str)
    with open(os.path.join(args.out, "gpu_suite.md"), "w") as f:
        f.write(markdown(data))
    print(f"{'all checks passed' if ok else 'SOME CHECKS FAILED'}; wrote {args.out}/gpu_suite.json and .md")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
