"""MoELayer on CPU against what HF users run: transformers' grouped_mm (its default experts
implementation), batched_mm and eager loop, and an equal-FLOP dense MLP, from decode to training sizes.

    python benchmarks/cpu_layer.py [--hidden 256] [--inter 128] [--experts 32] [--top-k 4]
        [--fwd-tokens 1,4,16,64,256] [--fwdbwd-tokens 512,2048] [--repeats 15] [--threads 1]
        [--out DIR] [--quiet]

Providers share one MoELayer's router and weights (softmax top-k, renormalized, as Qwen3-MoE):
  moe_kit            the MoELayer, torch backend (gate + experts)
  hf_block+moe_kit_experts  transformers' Qwen3MoeSparseMoeBlock with experts_implementation="moe_kit"
                     (moe_kit.integrations.hf): HF's router and module calls, moe_kit's experts;
                     against hf_grouped_mm it compares the experts implementations alone
  hf_grouped_mm      transformers' Qwen3MoeSparseMoeBlock with its default experts implementation,
                     grouped_mm (baselines.HFBlock: the module an HF Qwen3-MoE model runs per layer)
  hf_batched_mm      ... with batched_mm (skipped where its per-slot weight copies exceed
                     --batched-mm-limit-gib)
  hf_eager           ... with HF's eager per-expert loop
  dense              one SwiGLU MLP of width k*I: the same active expert FLOPs
`fwd` is forward only in eval mode under torch.no_grad (inference, decode sizes); `fwdbwd` is forward +
backward into the input and every weight. Before timing each token count, every MoE provider's
output (and input gradient for fwdbwd) is checked against moe_kit's loop reference. Timing is
interleaved round by round (benchmarks/timing.py); medians with min-max. Progress goes to stderr;
with --out, DIR/results.json (every sample, environment, config) and DIR/results.md are written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_bench  # noqa: E402
from baselines import HFBlock, batched_mm_bytes  # noqa: E402

from moe_kit import MoEConfig, MoELayer  # noqa: E402

HEADLINE = "hf_grouped_mm"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--inter", type=int, default=128)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--fwd-tokens", default="1,4,16,64,256")
    parser.add_argument("--fwdbwd-tokens", default="512,2048")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    moe_bench.add_sampling_args(parser)
    parser.add_argument("--hf", default="grouped_mm,batched_mm,eager", help="HF providers to include")
    parser.add_argument("--batched-mm-limit-gib", type=float, default=1.0)
    parser.add_argument("--no-experts-row", action="store_true", help="leave out hf_block+moe_kit_experts")
    parser.add_argument("--out", default=None, help="write results.json and results.md here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    args.cells = [("fwd", int(t)) for t in args.fwd_tokens.split(",") if t.strip()]
    args.cells += [("fwdbwd", int(t)) for t in args.fwdbwd_tokens.split(",") if t.strip()]
    if not args.cells or min(t for _, t in args.cells) < 1:
        parser.error("token counts must be positive integers")
    return args


def markdown(data: dict) -> str:
    env, cfg = data["environment"], data["config"]
    lines = [
        f"MoELayer on CPU: D={cfg['hidden_size']} I={cfg['intermediate_size']} E={cfg['num_experts']} "
        f"k={cfg['top_k']}, fp32, {env['device_name']} ({env['threads']} threads), torch {env['torch']}, "
        f"transformers {env.get('transformers') or '-'}, {env['date'][:10]}. Median of {cfg['repeats']} "
        f"interleaved repeats (min-max); 1-min load average {env['load_average_1m']} at start, "
        f"{env.get('load_average_1m_end')} at end, on {env['cpu_count']} cores.",
        "",
        "| pass | tokens | provider | median ms | min-max ms | moe_kit speed-up vs this | time / dense |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    cells = {}
    for r in data["rows"]:
        cells.setdefault((r["pass"], r["tokens"]), {})[r["provider"]] = r
    for (pass_, tokens), cell in cells.items():
        ours, dense = cell.get("moe_kit"), cell.get("dense")
        for name, r in cell.items():
            vs = f"{r['ms'] / ours['ms']:.2f}x" if ours and name != "moe_kit" else "-"
            vs_dense = f"{r['ms'] / dense['ms']:.2f}x" if dense else "-"
            lines.append(f"| {pass_} | {tokens} | {name} | {r['ms']:.3f} | {r['ms_min']:.3f}-{r['ms_max']:.3f} | "
                         f"{vs} | {vs_dense} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MoEConfig(args.hidden, args.inter, args.experts, args.top_k, norm_topk_prob=True, backend="torch")
    layer = MoELayer(cfg)
    hf = tuple(name.strip() for name in args.hf.split(",") if name.strip())
    everyone = moe_bench.make_providers(layer, ["torch"], hf)
    everyone = {("moe_kit" if name == "moe_kit_torch" else name): module for name, module in everyone.items()}
    if not args.no_experts_row:  # HF's block on moe_kit's experts: the experts alone, router aside
        from moe_kit.integrations import hf as moe_kit_hf

        moe_kit_hf.register()
        everyone = {"moe_kit": everyone.pop("moe_kit"), "hf_block+moe_kit_experts": HFBlock(layer, "moe_kit"),
                    **everyone}
    env = moe_bench.environment(torch.device("cpu"), torch.float32, list(argv or sys.argv[1:]))
    env["command"] = env["command"].replace("moe_bench.py", "cpu_layer.py")
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    rounds = args.warmup + args.repeats
    progress = moe_bench.Progress(sum(moe_bench.cell_cost(t, p) * rounds for p, t in args.cells),
                                  enabled=not args.quiet)
    rows, skipped = [], []
    for pass_, tokens in args.cells:
        providers = dict(everyone)
        if "hf_batched_mm" in providers and batched_mm_bytes(cfg, tokens) > args.batched_mm_limit_gib * 2**30:
            providers.pop("hf_batched_mm")
            skipped.append(dict(provider="hf_batched_mm", pass_=pass_, tokens=tokens))
        gen = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, cfg.hidden_size, generator=gen)
        grad_out = torch.randn(tokens, cfg.hidden_size, generator=gen)
        errors = moe_bench.check_providers(providers, layer, x, None, grad_out, check_grad=pass_ == "fwdbwd")
        progress.label = f"{pass_} T={tokens}"
        fns = {name: moe_bench.timed_call(module, x, None, grad_out, pass_) for name, module in providers.items()}
        cost = moe_bench.cell_cost(tokens, pass_)
        results = moe_bench.time_interleaved(fns, repeats=args.repeats, warmup=args.warmup,
                                             flush_bytes=args.flush_mib * 2**20, min_sample_ms=args.min_sample_ms,
                                             on_round=lambda cost=cost: progress.update(cost))
        for name, r in results.items():
            rows.append(dict(provider=name, pass_=pass_, tokens=tokens, ms=r["median_ms"], ms_min=r["min_ms"],
                             ms_max=r["max_ms"], ms_q1=r["q1_ms"], ms_q3=r["q3_ms"], max_rel_err=errors.get(name),
                             samples_ms=r["samples_ms"]))
        ours = results["moe_kit"]["median_ms"]
        progress.log(f"{pass_} T={tokens}: moe_kit {ours:.3f} ms; " + ", ".join(
            f"{name} {r['median_ms'] / ours:.2f}x" for name, r in results.items() if name != "moe_kit")
            + f" (their time / ours; ~{progress.eta()} left)")
        for module in providers.values():
            moe_bench._clear_grads(module)
    progress.close()
    env["load_average_1m_end"] = moe_bench._load_average()
    for r in rows:
        r["pass"] = r.pop("pass_")
    config = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_experts=cfg.num_experts,
                  top_k=cfg.top_k, repeats=args.repeats, warmup=args.warmup, cells=args.cells)
    data = dict(environment=env, config=config, rows=rows, skipped=skipped)
    text = markdown(data)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(data, f, indent=1, default=str)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(text)
        if not args.quiet:
            print(f"wrote {os.path.join(args.out, 'results.json')} and results.md", file=sys.stderr)
    if not args.quiet:
        print(text)
    return data


if __name__ == "__main__":
    main()
