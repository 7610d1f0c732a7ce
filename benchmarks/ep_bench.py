"""Expert parallelism on CPU ranks: time of the token exchange vs the expert compute, per MoE layer.

    python benchmarks/ep_bench.py [--worlds 2,4] [--tokens 256,1024] [--hidden 512] [--inter 256] \\
        [--experts 16] [--top-k 2] [--repeats 9] [--out benchmarks/results/ep]

For each world size W the script spawns W gloo processes on 127.0.0.1 (each with cores // W
threads, at least 1). Every rank routes its own `--tokens` random tokens with the replicated gate
(so routing is about uniform) and runs the steps of moe_kit.ep.ep_moe_ffn one at a time, forward:

    counts    routing plan + all-reduce of the [W, E] count matrix + split sizes (one host sync)
    dispatch  gather the token rows, all_to_all them to the experts' ranks
    experts   this rank's E / W experts on the rows it received (torch backend)
    return    all_to_all of the expert outputs back to the tokens' ranks
    combine   weighted sum per token on the source rank
exchange = counts + dispatch + return. For context it also times the whole EP layer (forward, and
forward + backward: the backward repeats both all-to-alls) and one process holding all E experts
running the same layer on this rank's batch alone ("1 process": the work EP spreads over W ranks).

Each timed step starts right after a barrier; a sample is the slowest rank's time (all-reduce MAX);
median (and min-max) over `--repeats` rounds after `--warmup`. Bytes per token: rows this rank sends to
*other* ranks x D x itemsize, both directions (dispatch + return), per local token, forward
(backward moves the same again); the formula for uniform routing is 2 k D itemsize (W - 1) / W.
Writes OUT/results.json (data) and OUT/results.md (table).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import summarize  # noqa: E402

import moe_kit  # noqa: E402
from moe_kit import MoEConfig, MoELayer  # noqa: E402
from moe_kit.ep.all_to_all import all_to_all  # noqa: E402
from moe_kit.ep.dispatch import combine, plan_exchange  # noqa: E402
from moe_kit.ops import dispatch  # noqa: E402

STEPS = ("counts", "dispatch", "experts", "return", "combine")


def make_cfg(args) -> MoEConfig:
    return MoEConfig(hidden_size=args.hidden, intermediate_size=args.inter, num_experts=args.experts,
                     top_k=args.top_k, backend="torch")


def _timed(fn, group=None) -> float:
    """Run fn after a barrier; the slowest rank's wall time in ms."""
    dist.barrier(group=group)
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([(time.perf_counter() - start) * 1e3], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
    return float(elapsed)


def _measure(layer: MoELayer, full: MoELayer, tokens: int, args, group) -> dict:
    """One (world, tokens) row; every rank calls it, rank 0's return value is the row."""
    cfg, rank, world = layer.cfg, dist.get_rank(group), dist.get_world_size(group)
    x = torch.randn(tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        weights, indices = layer.gate(x)
    gate_up, down = layer.experts.gate_up_proj.detach(), layer.experts.down_proj.detach()
    state = {}

    def counts():
        state["ex"] = plan_exchange(indices, cfg.num_experts, group)

    def dispatch_rows():
        ex = state["ex"]
        rows = x.index_select(0, ex.plan.token_of_row)
        state["recv"] = all_to_all(rows, ex.send_splits, ex.recv_splits, group)

    def experts():
        recv, ex = state["recv"], state["ex"]
        ones = recv.new_ones(recv.shape[0], 1)
        state["y"] = dispatch(recv, ones, ex.local_expert.unsqueeze(1), gate_up, down, "torch")

    def return_rows():
        ex = state["ex"]
        state["back"] = all_to_all(state["y"], ex.recv_splits, ex.send_splits, group)

    def combine_rows():
        state["out"] = combine(state["back"], weights, state["ex"].plan)

    def fwdbwd(module):
        module(x.detach().requires_grad_(True)).sum().backward()
        module.zero_grad(set_to_none=True)

    no_grad = {"counts": counts, "dispatch": dispatch_rows, "experts": experts, "return": return_rows,
               "combine": combine_rows, "ep_layer_fwd": lambda: layer(x), "one_process_fwd": lambda: full(x)}
    with_grad = {"ep_layer_fwdbwd": lambda: fwdbwd(layer), "one_process_fwdbwd": lambda: fwdbwd(full)}
    samples = {name: [] for name in [*no_grad, *with_grad]}
    for round_ in range(args.warmup + args.repeats):
        with torch.no_grad():
            times = {name: _timed(fn, group) for name, fn in no_grad.items()}
        times.update({name: _timed(fn, group) for name, fn in with_grad.items()})
        if round_ >= args.warmup:
            for name, ms in times.items():
                samples[name].append(ms)

    with torch.no_grad():  # the step-by-step path must be the layer's
        assert torch.allclose(state["out"], layer(x), atol=1e-5, rtol=1e-4), "the steps disagree with the layer"
    ex = state["ex"]
    remote_rows = sum(n for d, n in enumerate(ex.send_splits) if d != rank)
    row_bytes = cfg.hidden_size * x.element_size()
    sent = torch.tensor([remote_rows * row_bytes * 2 / max(tokens, 1)], dtype=torch.float64)
    dist.all_reduce(sent, group=group)
    return dict(ranks=world, threads_per_rank=torch.get_num_threads(), tokens_per_rank=tokens,
                bytes_per_token=float(sent) / world,
                bytes_per_token_formula=2 * cfg.top_k * row_bytes * (world - 1) / world,
                timings={name: summarize(s) for name, s in samples.items()})


def _worker(rank: int, world: int, port: int, args, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    group = dist.group.WORLD
    torch.manual_seed(0)
    layer = MoELayer(make_cfg(args), ep_group=group)
    full = MoELayer(make_cfg(args))  # one process holding every expert: the compute EP spreads out
    rows = [_measure(layer, full, int(tokens), args, group) for tokens in args.tokens.split(",")]
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "row.json")
        mp.spawn(_worker, args=(world, _free_port(), args, path), nprocs=world)
        with open(path) as f:
            return json.load(f)  # one row per token count


def environment(argv) -> dict:
    try:
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        load = None
    return dict(cpu_count=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                platform=platform.platform(), moe_kit=moe_kit.__version__, backend="gloo", dtype="float32",
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                load_average_1m=load, command="python benchmarks/ep_bench.py " + " ".join(argv))


def markdown_table(data: dict) -> str:
    cfg, env = data["config"], data["environment"]
    lines = [
        f"D={cfg['hidden']}, I={cfg['inter']}, E={cfg['experts']}, k={cfg['top_k']}, fp32, gloo on "
        f"{env['cpu_count']} CPU cores, torch {env['torch']}, {env['date'][:10]}. Forward, per layer; median of "
        f"{cfg['repeats']} rounds, each step timed after a barrier as the slowest rank.",
        "",
        "| ranks | threads/rank | tokens/rank | counts ms | dispatch a2a ms | experts ms | return a2a ms | "
        "combine ms | exchange ms | exchange / experts | EP layer fwd ms | EP layer fwd+bwd ms | "
        "1 process fwd ms | 1 process fwd+bwd ms | bytes/token (formula) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in data["rows"]:
        ms = {name: t["median_ms"] for name, t in row["timings"].items()}
        exchange = ms["counts"] + ms["dispatch"] + ms["return"]
        lines.append(
            f"| {row['ranks']} | {row['threads_per_rank']} | {row['tokens_per_rank']} | {ms['counts']:.2f} | "
            f"{ms['dispatch']:.2f} | {ms['experts']:.2f} | {ms['return']:.2f} | {ms['combine']:.2f} | "
            f"{exchange:.2f} | {exchange / ms['experts']:.2f} | {ms['ep_layer_fwd']:.2f} | "
            f"{ms['ep_layer_fwdbwd']:.2f} | {ms['one_process_fwd']:.2f} | {ms['one_process_fwdbwd']:.2f} | "
            f"{row['bytes_per_token']:.0f} ({row['bytes_per_token_formula']:.0f}) |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="2,4", help="comma-separated numbers of ranks")
    parser.add_argument("--tokens", default="256,1024", help="comma-separated tokens per rank")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=256)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/ep")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    data = dict(environment=environment(argv), config=vars(args), rows=[])
    for world in (int(w) for w in args.worlds.split(",")):
        data["rows"] += run_world(world, args)
        print(f"{world} ranks done", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(data, f, indent=1)
    table = markdown_table(data)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(table)
    return data


if __name__ == "__main__":
    main()
