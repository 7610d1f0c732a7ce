"""Peak memory of one forward + backward: MoELayer against a dense SwiGLU MLP of equal active FLOPs.

    python benchmarks/memory.py [--tokens 4096] [--hidden 512] [--inter 256] [--experts 64] [--top-k 8]
        [--variants dense,moe_kit,...] [--rev GIT_REV] [--fixed-mmap-threshold] [--json PATH]

Each variant runs in a fresh Python process (so no allocator cache carries over): it builds the
module and its input, runs one small warm-up forward + backward (loads kernels, probes), frees
everything but the module and input, resets the kernel's peak-RSS mark (/proc/self/clear_refs),
runs one forward + backward at the measured size and reports
  peak_rss_rise_mib   VmHWM after the step - VmRSS before it (activations, temporaries and the
                      weight gradients the step creates; the weights and the input are not counted)
  saved_mib           bytes of the tensors autograd keeps between forward and backward
                      (torch.autograd.graph.saved_tensors_hooks; distinct storages, parameters and
                      the layer input excluded: what activation memory is made of)
Variants (all fp32, CPU, same T, D, I, E, k; aux/z losses off):
  dense             one SwiGLU MLP of width k*I (nn.Linear gate_up, down): the equal-FLOPs baseline
  moe_kit           MoELayer, torch backend (saves h, recomputes the activation and x[token])
  moe_kit_gemm1     the same experts with recompute="gemm1" (saves nothing but x; GEMM 1 again in backward)
  moe_kit_rev       the torch backend as of git revision --rev (`git show REV:src/moe_kit/ops/torch_ops.py`,
                    e.g. the commit before a change), same gate and weights
  hf_grouped_mm     transformers' grouped_mm experts forward on the same weights (plain autograd)
Prints a table and the ratio moe_kit / dense (target <= 1.3x).

The RSS rise depends on the allocator as much as on the tensors: glibc raises its mmap threshold
after freeing a large block (up to 32 MiB), so later blocks of <= 32 MiB come from the heap and
their pages may stay resident after free (fragmentation). --fixed-mmap-threshold runs every child
with MALLOC_MMAP_THRESHOLD_=1048576 (a fixed threshold: blocks > 1 MiB are mapped and returned
on free), which measures what the tensors themselves need; report both.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("dense", "moe_kit", "moe_kit_gemm1", "moe_kit_rev", "hf_grouped_mm")
TARGET = 1.3


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def rev_torch_ops(rev: str = "HEAD"):
    """The torch backend module of git revision `rev`, imported under another name (None if unavailable)."""
    import importlib.util
    import tempfile

    root = os.path.dirname(HERE)
    out = subprocess.run(["git", "show", f"{rev}:src/moe_kit/ops/torch_ops.py"], cwd=root, capture_output=True,
                         text=True)
    if out.returncode != 0:
        return None
    path = os.path.join(tempfile.gettempdir(), f"moe_kit_rev_torch_ops_{os.getpid()}.py")
    with open(path, "w") as f:
        f.write(out.stdout)
    spec = importlib.util.spec_from_file_location("moe_kit_rev_torch_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(path)
    return module


def build(variant: str, args):
    """-> (module-like callable step(x) -> out, its parameters)."""
    import torch

    sys.path.insert(0, HERE)
    from baselines import DenseSwiGLU, HFExperts

    from moe_kit import MoEConfig, MoELayer
    from moe_kit.ops import torch_ops

    torch.manual_seed(0)
    if variant == "dense":
        module = DenseSwiGLU(args.hidden, args.top_k * args.inter)
        return module, list(module.parameters())
    cfg = MoEConfig(args.hidden, args.inter, args.experts, args.top_k, norm_topk_prob=True, backend="torch")
    layer = MoELayer(cfg)
    if variant == "moe_kit":
        return layer, list(layer.parameters())
    if variant == "hf_grouped_mm":
        block = HFExperts(layer, "grouped_mm")
        return block, list(layer.parameters())
    experts = layer.experts
    if variant == "moe_kit_gemm1":
        def run(x):
            weights, indices = layer.gate(x)
            return torch_ops.moe_ffn_torch(x, weights, indices, experts.gate_up_proj, experts.down_proj,
                                           recompute="gemm1")
        return run, list(layer.parameters())
    if variant == "moe_kit_rev":
        old = rev_torch_ops(args.rev)
        if old is None:
            return None, []

        def run_rev(x):
            weights, indices = layer.gate(x)
            return old.moe_ffn_torch(x, weights, indices, experts.gate_up_proj, experts.down_proj)
        return run_rev, list(layer.parameters())
    raise ValueError(f"unknown variant {variant!r}; choose from {list(VARIANTS)}")


def measure(variant: str, args) -> dict:
    """In this process: one warm-up step, then the measured step. -> {variant, peak_rss_rise_mib, saved_mib}."""
    import torch

    torch.set_num_threads(args.threads)
    module, params = build(variant, args)
    if module is None:
        return dict(variant=variant, skipped=f"git revision {args.rev} not readable")
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}

    def step(tokens: int, hooks: bool):
        x = torch.randn(tokens, args.hidden, requires_grad=True)
        grad = torch.randn(tokens, args.hidden)
        seen, skip = {}, param_ptrs | {x.untyped_storage().data_ptr()}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in skip:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        for p in params:
            p.grad = None
        gc.collect()
        ok = _reset_peak()
        before = _status_kib("VmRSS")
        if hooks:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = module(x)
        else:
            out = module(x)
        out.backward(grad)
        peak = _status_kib("VmHWM")
        del out
        return dict(peak_rss_rise_mib=(peak - before) / 1024 if ok else None, saved_mib=sum(seen.values()) / 2**20)

    step(64, hooks=False)  # warm-up: kernels, probes, thread pools
    result = step(args.tokens, hooks=True)
    return dict(variant=variant, **result)


def run_all(args) -> list[dict]:
    rows = []
    for variant in args.variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, *args.passthrough]
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576") if args.fixed_mmap_threshold else None
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise SystemExit(f"variant {variant} failed:\n{out.stderr}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        if not args.quiet:
            print(f"measured {variant}", file=sys.stderr)
    return rows


def table(rows: list[dict], args) -> str:
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    allocator = "glibc with MALLOC_MMAP_THRESHOLD_=1048576" if args.fixed_mmap_threshold else "default glibc malloc"
    lines = [
        f"fwd+bwd peak memory, fp32 CPU, T={args.tokens} D={args.hidden} I={args.inter} E={args.experts} "
        f"k={args.top_k} (dense: width k*I = {args.top_k * args.inter}); one fresh process per variant; "
        f"{allocator}; moe_kit_rev = torch backend of git {args.rev}",
        "",
        "| variant | peak RSS rise MiB | saved activations MiB | RSS rise / dense |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        if "skipped" in r:
            continue
        ratio = f"{r['peak_rss_rise_mib'] / dense['peak_rss_rise_mib']:.2f}x" if dense else "-"
        lines.append(f"| {r['variant']} | {r['peak_rss_rise_mib']:.0f} | {r['saved_mib']:.0f} | {ratio} |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=256)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="dense,moe_kit,moe_kit_gemm1,moe_kit_rev,hf_grouped_mm")
    parser.add_argument("--rev", default="HEAD", help="git revision for the moe_kit_rev variant")
    parser.add_argument("--fixed-mmap-threshold", action="store_true",
                        help="run the children with MALLOC_MMAP_THRESHOLD_=1048576 (see the module doc)")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}; choose from {list(VARIANTS)}")
    args.passthrough = ["--tokens", str(args.tokens), "--hidden", str(args.hidden), "--inter", str(args.inter),
                        "--experts", str(args.experts), "--top-k", str(args.top_k), "--threads", str(args.threads),
                        "--rev", args.rev]
    return args


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return {}
    rows = run_all(args)
    text = table(rows, args)
    by = {r["variant"]: r for r in rows}
    ratio = None
    if "dense" in by and "moe_kit" in by:
        ratio = by["moe_kit"]["peak_rss_rise_mib"] / by["dense"]["peak_rss_rise_mib"]
        text += f"\nmoe_kit / dense peak RSS rise: {ratio:.2f}x (target <= {TARGET}x)\n"
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, ratio=ratio, args=vars(args) | {"passthrough": None}), f, indent=1)
    return dict(rows=rows, ratio=ratio)


if __name__ == "__main__":
    main()
