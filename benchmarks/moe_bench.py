"""MoE layer benchmark: a sweep of provider x pass x token count, data first, then table and plot.

    python benchmarks/moe_bench.py --preset qwen3-30b-a3b --scale 0.125 --tokens 512,2048 \\
        --device cpu --out benchmarks/results/cpu/qwen3-30b-a3b [--backends torch,loop] \\
        [--pass fwd|fwdbwd|both] [--dtype float32|bfloat16|float16] [--repeats 7] [--threads N]
    python benchmarks/moe_bench.py --render DIR [DIR ...]     # table and plot again from DIR/results.json

Providers, all on the same weights (one MoELayer built from the preset; --scale shrinks its
hidden and intermediate sizes so big presets fit a CPU):
  moe_kit_<backend>  the whole MoELayer (gate, dispatch, experts, shared experts) on that backend
  hf_grouped_mm      transformers' own Qwen3MoeSparseMoeBlock (router module + experts module) with
                     the `grouped_mm` experts implementation (the 5.x default) on the layer's
                     parameters, where that block computes the layer (Mixtral / Qwen3-MoE-shaped
                     routing, baselines.HFBlock); otherwise HF's softmax-free routing is missing, so
                     the layer's gate output feeds transformers' grouped_mm function (baselines.HFExperts)
  hf_batched_mm      the same with transformers' `batched_mm` (per-slot weight copies; skipped at
                     token counts where those copies exceed --batched-mm-limit-gib)
  hf_eager           the same with HF's eager per-expert loop (baselines.HFEagerLoop when the block
                     does not apply)
  dense              one SwiGLU MLP of width k*I + shared width: the same active expert FLOPs
On CUDA the device's dense GEMM rate (one square matmul, --gemm-size) is recorded too.

The balancing losses are switched off (aux_loss_coef = z_loss_coef = 0) so every provider
computes the same function. Before timing, each token count checks every MoE provider's output
(and, for fwdbwd, its input gradient) against the fp32 reference: the layer's gate, then
moe_ffn(..., backend="loop"), plus the shared experts; a normwise relative error above 1e-4
(fp32) or 2e-2 (bf16 / fp16) raises OutputMismatch.

Timing: providers interleaved round by round (benchmarks/timing.py), `--warmup` rounds then
`--repeats`; median and min / max / quartiles kept. fwd runs in eval mode under torch.no_grad (inference);
fwdbwd is forward + backward into the input and every weight. FLOPs count the expert GEMMs
only (6*N*k*D*I forward, plus 6*N*D*I_shared; backward twice the forward); the router is not
counted. Writes DIR/results.json ({"environment", "config", "rows"}), DIR/results.md, DIR/results.png.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import (  # noqa: E402
    HF_IMPLEMENTATIONS,
    DenseSwiGLU,
    HFBlock,
    HFEagerLoop,
    HFExperts,
    batched_mm_bytes,
    hf_block_matches,
    hf_router_matches,
)
from timing import add_sampling_args, time_interleaved  # noqa: E402

import moe_kit  # noqa: E402
from moe_kit import HashGate, MoEConfig, MoELayer  # noqa: E402
from moe_kit.config import PRESETS  # noqa: E402
from moe_kit.ops import moe_ffn, resolve_backend  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=32, num_experts=8, top_k=2, vocab_size=1000)
PRESET_NAMES = sorted(PRESETS) + ["tiny"]
MOE_BACKENDS = ("torch", "triton", "loop")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
PASSES = {"fwd": ["fwd"], "fwdbwd": ["fwdbwd"], "both": ["fwd", "fwdbwd"]}


class OutputMismatch(AssertionError):
    """A provider's output or input gradient differs from the loop reference beyond tolerance."""


# ----------------------------------------------------------------------------- config and providers


def build_config(preset: str, scale: float = 1.0) -> MoEConfig:
    """The preset's MoE settings, hidden / intermediate sizes times `scale` (multiples of 8), losses off."""
    if preset not in PRESET_NAMES:
        raise ValueError(f"unknown preset {preset!r}; choose from {PRESET_NAMES}")
    if not scale > 0:
        raise ValueError(f"--scale must be > 0, got {scale}")
    settings = dict(TINY if preset == "tiny" else PRESETS[preset])
    for name in ("hidden_size", "intermediate_size", "shared_intermediate_size"):
        if settings.get(name) is not None:
            settings[name] = max(8, round(settings[name] * scale / 8) * 8)
    return MoEConfig(**{**settings, "aux_loss_coef": 0.0, "z_loss_coef": 0.0})


def available_backends(device: torch.device) -> list[str]:
    """moe_kit backends this build can run on `device` (resolve_backend accepts them)."""
    found = []
    for backend in MOE_BACKENDS:
        try:
            resolve_backend(backend, device)
        except ValueError:
            continue
        found.append(backend)
    return found


class DenseProvider(DenseSwiGLU):
    """DenseSwiGLU with the providers' call signature."""

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


def make_providers(layer: MoELayer, backends: list[str], hf: tuple[str, ...] = ("eager", *HF_IMPLEMENTATIONS)
                   ) -> dict[str, nn.Module]:
    """{row name: module(x, input_ids)}; every MoE provider shares `layer`'s gate and weights.
    `hf`: which HF providers ("eager", "grouped_mm", "batched_mm"); those needing transformers are
    left out when it is not installed."""
    cfg = layer.cfg
    providers = {}
    for backend in backends:
        wrapper = layer if backend == cfg.backend else _sharing(layer, backend)
        providers[f"moe_kit_{backend}"] = wrapper
    # transformers' own block where it computes this layer (Qwen3-MoE / Mixtral-shaped routing),
    # else HF's experts functions behind moe_kit's routing (see baselines)
    real = importlib.util.find_spec("transformers") is not None and hf_block_matches(cfg, layer.layer_id)
    if "eager" in hf:
        providers["hf_eager"] = HFBlock(layer, "eager") if real else HFEagerLoop(layer)
    for impl in HF_IMPLEMENTATIONS:
        if impl in hf and importlib.util.find_spec("transformers") is not None:
            providers[f"hf_{impl}"] = HFBlock(layer, impl) if real else HFExperts(layer, impl)
    width = cfg.top_k * cfg.intermediate_size + (cfg.shared_intermediate_size if cfg.num_shared_experts else 0)
    weight = layer.experts.gate_up_proj
    with torch.device(weight.device), _default_dtype(weight.dtype):
        dense = DenseProvider(cfg.hidden_size, width)
    providers["dense"] = dense
    return providers


def _sharing(layer: MoELayer, backend: str) -> MoELayer:
    """A MoELayer on `backend` whose gate, experts and shared experts are `layer`'s own modules."""
    with torch.device("meta"):  # no memory: its own modules are replaced right below
        other = MoELayer(layer.cfg.replace(backend=backend), layer.layer_id)
    other.gate, other.experts, other.shared_experts = layer.gate, layer.experts, layer.shared_experts
    return other


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Build modules directly in `dtype` (no fp32 copy of a big layer first)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def reference(layer: MoELayer, x: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
    """fp32 reference: the layer's gate, then moe_ffn(..., backend="loop"), plus the shared experts."""
    ref = copy.deepcopy(layer).float()
    x32 = x.float()
    weights, indices = ref.gate(x32, input_ids=input_ids)
    out = moe_ffn(x32, weights, indices, ref.experts.gate_up_proj, ref.experts.down_proj, backend="loop",
                  swiglu_limit=ref.cfg.swiglu_limit)
    if ref.shared_experts is not None:
        out = out + ref.shared_experts(x32)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normwise relative error ||a - b|| / ||b|| in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return (a - b).norm().item() / max(b.norm().item(), 1e-30)


def check_providers(providers, layer, x, input_ids, grad_out, check_grad: bool) -> dict[str, float]:
    """{provider: worst normwise error} of output (and input gradient) against `reference`; raises
    OutputMismatch naming the provider when above TOLERANCE[x.dtype]."""
    tol = TOLERANCE[x.dtype]
    x_ref = x.detach().clone().requires_grad_(check_grad)
    ref = reference(layer, x_ref, input_ids)
    if check_grad:
        ref.backward(grad_out.float())
    errors = {}
    for name, module in providers.items():
        if name == "dense":
            continue
        x_in = x.detach().clone().requires_grad_(check_grad)
        with torch.set_grad_enabled(check_grad):
            out = module(x_in, input_ids)
        err = rel_err(out, ref)
        what = "output"
        if check_grad:
            out.backward(grad_out)
            grad_err = rel_err(x_in.grad, x_ref.grad)
            if grad_err > err:
                err, what = grad_err, "input gradient"
            _clear_grads(module)
        if not err <= tol:  # nan fails too
            raise OutputMismatch(
                f"{name}: {what} differs from the loop reference by normwise error {err:.3e} > {tol:.0e} "
                f"({x.dtype}, {x.shape[0]} tokens)"
            )
        errors[name] = err
    return errors


def _clear_grads(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def expert_flops(cfg: MoEConfig, tokens: int, pass_: str) -> float:
    """GEMM FLOPs of the active experts (router excluded); fwdbwd = 3x fwd."""
    shared = cfg.shared_intermediate_size if cfg.num_shared_experts else 0
    fwd = 6.0 * tokens * cfg.hidden_size * (cfg.top_k * cfg.intermediate_size + shared)
    return fwd if pass_ == "fwd" else 3 * fwd


def timed_call(module: nn.Module, x: torch.Tensor, input_ids, grad_out, pass_: str):
    """A no-argument function running one `pass_` of `module`, which it puts in the mode users run
    that pass in: eval for fwd (inference: model.eval() and torch.no_grad), train for fwdbwd."""
    module.train(pass_ == "fwdbwd")
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                module(x, input_ids)
        return run
    x_grad = x.detach().clone().requires_grad_(True)
    params = list(module.parameters())

    def run_fwdbwd():
        x_grad.grad = None
        for p in params:
            p.grad = None
        module(x_grad, input_ids).backward(grad_out)
    return run_fwdbwd


def dense_gemm_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> dict:
    """Median TFLOP/s of one [size, size] @ [size, size] matmul: the device's dense GEMM rate."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    r = time_interleaved({"mm": lambda: a @ b}, repeats=repeats, warmup=2)["mm"]
    return dict(size=size, ms=r["median_ms"], tflops=2 * size**3 / r["median_ms"] / 1e9)


# ----------------------------------------------------------------------------- environment and progress


def environment(device: torch.device, dtype: torch.dtype, argv) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    return dict(
        device=device.type,
        device_name=name,
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        triton=triton,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        platform=platform.platform(),
        moe_kit=moe_kit.__version__,
        git_commit=_git_commit(),
        dtype=str(dtype).removeprefix("torch."),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        load_average_1m=_load_average(),  # > cores: the machine was shared while timing
        command="python benchmarks/moe_bench.py " + " ".join(argv),
    )


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def cell_cost(tokens: int, pass_: str) -> int:
    """Relative time of one timing round of a (tokens, pass) cell, for the time-left estimate:
    proportional to the tokens (3x for fwdbwd) plus a fixed per-call cost."""
    return (3 if pass_ == "fwdbwd" else 1) * tokens + 64


class Progress:
    """A one-line bar on stderr when it is a terminal; otherwise one log line per finished cell.
    Units are arbitrary work (cell_cost per round), so the time left weighs big cells more."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.label = total, 0, ""
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.start = time.monotonic()

    def eta(self) -> str:
        """Estimated time left from the mean time per finished unit so far ("?" before the first)."""
        if not self.done:
            return "?"
        left = (time.monotonic() - self.start) / self.done * max(self.total - self.done, 0)
        return f"{left // 60:.0f}m{left % 60:02.0f}s" if left >= 60 else f"{left:.0f}s"

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.tty:
            filled = round(30 * self.done / max(self.total, 1))
            percent = 100 * self.done / max(self.total, 1)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {percent:.0f}% {self.label}"
                             f" (~{self.eta()} left)\033[K")
            sys.stderr.flush()

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r\033[K")
        sys.stderr.write(message + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


# ----------------------------------------------------------------------------- output: json, markdown, png


def markdown_table(data: dict) -> str:
    """The README-ready table of results.json's data."""
    env, cfg, rows = data["environment"], data["config"], data["rows"]
    small = max(r["tflops"] for r in rows) < 1
    unit, factor = ("GFLOP/s", 1e3) if small else ("TFLOP/s", 1.0)
    shared = f", {cfg['num_shared_experts']} shared (I={cfg['shared_intermediate_size']})" \
        if cfg["num_shared_experts"] else ""
    lines = [
        f"**{cfg['preset']}** at scale {cfg['scale']:g}: D={cfg['hidden_size']}, I={cfg['intermediate_size']}, "
        f"E={cfg['num_experts']}, k={cfg['top_k']}{shared}, {cfg['score_func']} routing "
        f"({cfg['hf_eager_routing']}), {env['dtype']} on {env['device']} ({env['device_name']}, "
        f"{_threads(env)}), torch {env['torch']}, triton {env['triton'] or '-'}, {env['date'][:10]}. "
        f"Median of {cfg['repeats']} interleaved repeats (min-max).{_load_note(env)}",
        "",
        f"| pass | tokens | provider | median ms | min-max ms | {unit} | speed-up vs hf_grouped_mm "
        "(HF default) | speed-up vs hf_eager | time / dense |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_cell = {}
    for r in rows:
        by_cell.setdefault((r["pass"], r["tokens"]), {})[r["backend"]] = r
    for (pass_, tokens), cell in by_cell.items():
        hf, hf_default, dense = cell.get("hf_eager"), cell.get("hf_grouped_mm"), cell.get("dense")
        for name, r in cell.items():
            vs_default = f"{hf_default['ms'] / r['ms']:.2f}x" if hf_default else "-"
            speedup = f"{hf['ms'] / r['ms']:.2f}x" if hf else "-"
            vs_dense = f"{r['ms'] / dense['ms']:.2f}x" if dense else "-"
            lines.append(
                f"| {pass_} | {tokens} | {name} | {r['ms']:.2f} | {r['ms_min']:.2f}-{r['ms_max']:.2f} | "
                f"{r['tflops'] * factor:.{1 if small else 2}f} | {vs_default} | {speedup} | {vs_dense} |"
            )
    if data.get("dense_gemm"):
        g = data["dense_gemm"]
        lines += ["", f"Device dense GEMM rate ({g['size']}^3 matmul, {env['dtype']}): {g['tflops']:.1f} TFLOP/s."]
    return "\n".join(lines) + "\n"


def _threads(env: dict) -> str:
    return f"{env['threads']} thread{'' if env['threads'] == 1 else 's'}"


def _load_note(env: dict) -> str:
    start, end = env.get("load_average_1m"), env.get("load_average_1m_end")
    if start is None or end is None or env["device"] != "cpu":
        return ""
    return f" 1-min load average {start:g} at start, {end:g} at end, on {env['cpu_count']} cores."


def plot_results(data: dict, path) -> None:
    """Throughput per provider vs tokens, one panel per pass, bars from the fastest to slowest repeat."""
    from matplotlib.figure import Figure

    env, cfg, rows = data["environment"], data["config"], data["rows"]
    passes = list(dict.fromkeys(r["pass"] for r in rows))
    small = max(r["tflops"] for r in rows) < 1
    unit, factor = ("GFLOP/s", 1e3) if small else ("TFLOP/s", 1.0)
    fig = Figure(figsize=(5.2 * len(passes), 4.2), layout="constrained")
    axes = fig.subplots(1, len(passes), squeeze=False)[0]
    for ax, pass_ in zip(axes, passes, strict=True):
        for name in dict.fromkeys(r["backend"] for r in rows):
            pts = sorted((r for r in rows if r["pass"] == pass_ and r["backend"] == name), key=lambda r: r["tokens"])
            if not pts:
                continue
            toks = [r["tokens"] for r in pts]
            mid = [r["tflops"] * factor for r in pts]
            low = [m - r["flops"] / r["ms_max"] / 1e9 * factor for m, r in zip(mid, pts, strict=True)]
            high = [r["flops"] / r["ms_min"] / 1e9 * factor - m for m, r in zip(mid, pts, strict=True)]
            style = "--" if name == "dense" else "-"
            ax.errorbar(toks, mid, yerr=[low, high], marker="o", linestyle=style, capsize=3, label=name)
        if data.get("dense_gemm"):
            ax.axhline(data["dense_gemm"]["tflops"] * factor, color="gray", linestyle=":", label="device dense GEMM")
        ax.set_xscale("log", base=2)
        ticks = sorted({r["tokens"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("tokens")
        ax.set_ylabel(f"expert GEMM {unit} (median)")
        ax.set_title(f"{pass_} (bars: fastest to slowest repeat)", fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{cfg['preset']} x{cfg['scale']:g} (D={cfg['hidden_size']}, I={cfg['intermediate_size']}, "
        f"E={cfg['num_experts']}, k={cfg['top_k']}), {env['dtype']}, {env['device_name']} ({_threads(env)})",
        fontsize=10,
    )
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=PRESET_NAMES)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies hidden and intermediate sizes")
    parser.add_argument("--tokens", default="512,2048", help="comma-separated token counts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--backends", default=None,
                        help="comma-separated moe_kit backends (default: every one built for the device)")
    parser.add_argument("--pass", dest="pass_", default="both", choices=list(PASSES))
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layer-id", type=int, default=None,
                        help="layer id of the MoELayer (default: the first score-routed layer of the preset)")
    parser.add_argument("--no-hf", action="store_true", help="skip every HF provider")
    parser.add_argument("--hf", default="eager,grouped_mm,batched_mm",
                        help="comma-separated HF providers: eager, grouped_mm, batched_mm")
    parser.add_argument("--batched-mm-limit-gib", type=float, default=2.0,
                        help="skip hf_batched_mm at token counts whose per-slot weight copies exceed this")
    parser.add_argument("--gemm-size", type=int, default=None,
                        help="size of the square matmul giving the device GEMM rate (default 8192 on cuda, off on cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_sampling_args(parser)
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def render(out_dir, report: bool = False) -> dict:
    """(Re)write DIR/results.md and DIR/results.png from DIR/results.json; `report`: say so on stdout."""
    with open(os.path.join(out_dir, "results.json")) as f:
        data = json.load(f)
    written = [os.path.join(out_dir, "results.md"), os.path.join(out_dir, "results.png")]
    with open(written[0], "w") as f:
        f.write(markdown_table(data))
    plot_results(data, written[1])
    if report:
        print(f"rendered {len(data['rows'])} rows of {os.path.join(out_dir, 'results.json')}: wrote "
              + ", ".join(written))
    return data


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--render"]:  # python benchmarks/moe_bench.py --render DIR [DIR ...]
        if len(argv) < 2:
            raise SystemExit("--render needs at least one directory holding results.json")
        return {out_dir: render(out_dir, report=True) for out_dir in argv[1:]}
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    tokens_list = [int(t) for t in args.tokens.split(",") if t.strip()]
    if not tokens_list or min(tokens_list) < 1:
        raise SystemExit(f"--tokens needs positive integers, got {args.tokens!r}")
    built = available_backends(device)
    backends = built if args.backends is None else [b.strip() for b in args.backends.split(",") if b.strip()]
    for backend in backends:
        if backend not in built:
            raise SystemExit(f"moe_kit backend {backend!r} is not available on {device.type}; built: {built}")
    passes = PASSES[args.pass_]
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    cfg = build_config(args.preset, args.scale).replace(backend=backends[0])
    layer_id = cfg.n_hash_layers if args.layer_id is None else args.layer_id
    torch.manual_seed(args.seed)
    with torch.device(device), _default_dtype(dtype):
        layer = MoELayer(cfg, layer_id)
    hf = () if args.no_hf else tuple(name.strip() for name in args.hf.split(",") if name.strip())
    unknown = set(hf) - {"eager", *HF_IMPLEMENTATIONS}
    if unknown:
        raise SystemExit(f"--hf: unknown {sorted(unknown)}; choose from eager, {', '.join(HF_IMPLEMENTATIONS)}")
    providers = make_providers(layer, backends, hf)
    hashed = isinstance(layer.gate, HashGate)
    config = dict(
        preset=args.preset, scale=args.scale, layer_id=layer_id, hash_routed=hashed,
        hf_eager_routing=("transformers' Qwen3-MoE block" if hf_block_matches(cfg, layer_id) else
                          "HF router" if hf_router_matches(cfg, layer_id) else "HF providers take moe_kit's routing"),
        repeats=args.repeats, warmup=args.warmup, tokens=tokens_list, passes=passes,
        providers=list(providers), tolerance=TOLERANCE[dtype],
        **{k: v for k, v in vars(cfg).items() if k not in ("router_dtype", "backend")},
    )
    env = environment(device, dtype, argv)
    rounds = args.warmup + args.repeats
    progress = Progress(sum(cell_cost(t, p) * rounds for t in tokens_list for p in passes), enabled=not args.quiet)
    rows, skipped = [], []
    all_providers = providers
    for tokens in tokens_list:
        providers = dict(all_providers)
        copies = batched_mm_bytes(cfg, tokens, dtype.itemsize)
        if "hf_batched_mm" in providers and copies > args.batched_mm_limit_gib * 2**30:
            providers.pop("hf_batched_mm")
            reason = f"weight copies {copies / 2**30:.1f} GiB"
            skipped.append(dict(provider="hf_batched_mm", tokens=tokens, reason=reason))
            progress.log(f"hf_batched_mm skipped at N={tokens}: weight copies {copies / 2**30:.1f} GiB > limit")
        gen = torch.Generator().manual_seed(args.seed + tokens)
        x = torch.randn(tokens, cfg.hidden_size, generator=gen).to(device=device, dtype=dtype)
        grad_out = torch.randn(tokens, cfg.hidden_size, generator=gen).to(device=device, dtype=dtype)
        input_ids = torch.randint(0, cfg.vocab_size, (tokens,), generator=gen).to(device) if hashed else None
        errors = check_providers(providers, layer, x, input_ids, grad_out, check_grad="fwdbwd" in passes)
        for pass_ in passes:
            progress.label = f"{pass_} N={tokens}"
            fns = {name: timed_call(module, x, input_ids, grad_out, pass_) for name, module in providers.items()}
            cost = cell_cost(tokens, pass_)
            results = time_interleaved(fns, repeats=args.repeats, warmup=args.warmup,
                                       on_round=lambda cost=cost: progress.update(cost),
                                       flush_bytes=args.flush_mib * 2**20 if device.type == "cpu" else 0,
                                       min_sample_ms=args.min_sample_ms)
            flops = expert_flops(cfg, tokens, pass_)
            for name, r in results.items():
                rows.append({
                    "backend": name, "pass": pass_, "tokens": tokens, "ms": r["median_ms"], "ms_min": r["min_ms"],
                    "ms_max": r["max_ms"], "ms_q1": r["q1_ms"], "ms_q3": r["q3_ms"],
                    "tflops": flops / r["median_ms"] / 1e9, "flops": flops, "max_rel_err": errors.get(name),
                    "samples_ms": r["samples_ms"],
                })
            progress.log(f"{args.preset} {pass_} N={tokens}: " + ", ".join(
                f"{name} {r['median_ms']:.2f} ms" for name, r in results.items()) + f" (~{progress.eta()} left)")
        for _, module in providers.items():
            _clear_grads(module)
    progress.close()
    env["load_average_1m_end"] = _load_average()

    gemm_size = args.gemm_size if args.gemm_size is not None else (8192 if device.type == "cuda" else 0)
    data = dict(environment=env, config=config, rows=rows, skipped=skipped)
    if gemm_size > 0:
        data["dense_gemm"] = dense_gemm_rate(device, dtype, gemm_size)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(data, f, indent=1, default=str)
    render(args.out)
    if not args.quiet:
        print(markdown_table(data))
    return data


if __name__ == "__main__":
    main()
