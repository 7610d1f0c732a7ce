"""Load-balancing study: one small decoder-only MoE LM trained on real English text, once per balancing
scheme and seed, measured with the papers' own metrics.

    python benchmarks/balance_study.py [--steps 100] [--arms none,aux_1e-2,...] [--seeds 0,1,2]
                                       [--models e32k4s1,e8k2] [--dim 128] [--corpus prose|mixed]
                                       [--score-func softmax|sigmoid] [--out benchmarks/results/cpu/balance-study]

The default (27 runs: 9 arms x 3 seeds, 100 steps each, one torch thread) takes about 6 minutes on a
2-core CPU (6.0 measured with another study on the other core); `--steps 400` takes 4x as long;
`--dim 256 --models e32k4s1,e8k2 --steps 300` is the bigger study the defaults scale down. Results and
their reading: docs/balance_study.md.

Data: the English prose of the Python documentation that ships with the standard library
(`pydoc_data.topics`), byte-level (vocabulary 256); the last `--val-share` of the bytes is the
validation split. `--corpus mixed` adds a second domain, Python source code: the standard library's
own modules (CODE_MODULES, about as many bytes as the prose), split the same way; every micro-batch
then holds one domain (prose, code, prose, code, ...: a step's global batch mixes them, each
micro-batch does not), the setting of Qiu et al. 2025, where the micro-batch balancing loss pushes
each domain's tokens evenly over all experts and the global-batch loss does not.
Model (examples/routing_collapse.py's TinyMoELM): 4 pre-norm blocks of causal attention + MoE FFN,
D = 128 (--dim), softmax router (--score-func sigmoid: Wang et al.'s gate). Models: `e32k4s1`
fine-grained E = 32, k = 4, I = D/2, with one shared expert (the default); `e8k2` top-2 of 8,
I = 2D. Every optimizer step is `--accum` micro-batches of `--micro-batch` sequences (gradient
accumulation), the same data and initial weights in every arm of a seed.

Arms (one balancing scheme each, everything else equal):
  none             no balancing
  aux_1e-2/1e-3    Switch aux loss, coefficient 1e-2 / 1e-3, per micro-batch (aux_loss_type "global")
  global_batch     the same loss with f counted over the step's micro-batches (aux_loss_type
                   "global_batch", Qiu et al. 2025), coefficient --gb-coef (1e-3)
  global_batch_1e-2  the same, coefficient 1e-2 (beside aux_1e-2; not in the default --arms)
  lossfree_u1e-3   aux-loss-free expert bias (Wang et al. 2024), u = 1e-3, update_expert_bias per step
  lossfree_scaled  the same with u = 1e-3 * 1000 / steps (the bias can travel as far in this run as
                   u = 1e-3 does in 1000 steps)
  aux_z            aux loss 1e-3 + router z-loss 1e-3 (ST-MoE)
  expert_choice    each expert takes its top ceil(k N / E) tokens (balanced by construction; not causal)
  sinkhorn         top-k of the Sinkhorn-balanced scores in training, plain top-k in eval

Metrics (moe_kit.stats): MaxVio = (max_i load_i - mean load) / mean load. MaxVio_batch: of each
training step's load (summed over its micro-batches), mean over layers, averaged over the steps;
MaxVio_global: of the load summed over the whole validation pass, per layer, mean over layers (the
table also gives the worst layer). Validation perplexity = exp(mean byte cross-entropy). Dropped /
unrouted share: dropped slots (capacity) or, for expert choice, tokens no expert took. Top-k score
sum (Qiu et al. section 5): mean over validation tokens of the sum of the k largest router scores,
mean over layers (k/E is uniform). With --corpus mixed, domain spread: per layer, the total-variation
distance between the experts' shares of the prose and of the code tokens (moe_kit.stats.
domain_selection; 0: both domains use the experts alike), mean over layers; and peak: the largest
share of one domain's tokens that one expert takes (Qiu et al. Figure 1b), mean over layers.
Writes OUT/results.json (environment, settings, per run: metrics and curves), OUT/results.md,
OUT/results.png (MaxVio_batch and training loss over steps, mean over seeds, one column per model).
`--render OUT` rebuilds the markdown and PNG from OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
import moe_bench  # noqa: E402  (environment, Progress)
from routing_collapse import TinyMoELM  # noqa: E402  (the same tiny LM as the routing example)

import moe_kit  # noqa: E402
from moe_kit import MoEConfig  # noqa: E402
from moe_kit.stats import LoadCounter, RoutingMonitor, domain_selection  # noqa: E402

ARMS = ("none", "aux_1e-2", "aux_1e-3", "global_batch", "lossfree_u1e-3", "lossfree_scaled", "aux_z",
        "expert_choice", "sinkhorn")
EXTRA_ARMS = ("global_batch_1e-2",)  # runnable by --arms, not in the default
# the code domain of --corpus mixed: standard-library modules, in this order (about 448 KB in Python 3.11)
CODE_MODULES = ("argparse.py", "dataclasses.py", "enum.py", "functools.py", "inspect.py", "pathlib.py")
# name: (experts, top_k, expert intermediate size / D, shared experts): e32k4s1 activates 4 * D/2 + D/2
# (DeepSeekMoE-style fine-grained experts plus one shared), e8k2 activates 2 * 2D (Mixtral-style)
MODELS = {"e32k4s1": (32, 4, 0.5, 1), "e8k2": (8, 2, 2.0, 0)}


# ----------------------------------------------------------------------------- data


def load_text() -> bytes:
    """The English documentation text of the standard library (pydoc_data.topics), as UTF-8 bytes."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def load_code() -> bytes:
    """The source of the standard-library modules CODE_MODULES, concatenated, as UTF-8 bytes."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    parts = []
    for name in CODE_MODULES:
        with open(os.path.join(root, name), encoding="utf-8") as f:
            parts.append(f.read())
    return "\n\n".join(parts).encode("utf-8")


def load_corpus(corpus: str) -> dict[str, bytes]:
    """{domain: bytes}: "prose" (pydoc_data.topics) and, for corpus "mixed", "code" (load_code)."""
    if corpus == "prose":
        return {"prose": load_text()}
    if corpus == "mixed":
        return {"prose": load_text(), "code": load_code()}
    raise ValueError(f"unknown corpus {corpus!r}; choose prose or mixed")


def split_bytes(data: bytes, val_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) int64 byte tensors: the last val_share of the text is validation."""
    if not 0 < val_share < 1:
        raise ValueError(f"--val-share must be in (0, 1), got {val_share}")
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    cut = int(len(ids) * (1 - val_share))
    return ids[:cut], ids[cut:]


def train_batches(ids: torch.Tensor, batch: int, seq: int, seed: int):
    """Endless (inputs, targets) [batch, seq] windows at random offsets of ids (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        window = ids[starts.unsqueeze(1) + torch.arange(seq + 1)]
        yield window[:, :-1], window[:, 1:]


def val_batches(ids: torch.Tensor, batch: int, seq: int, max_tokens: int) -> list:
    """Consecutive non-overlapping (inputs, targets) [batch, seq] windows covering up to max_tokens."""
    windows = min((len(ids) - 1) // seq, max(1, max_tokens // seq))
    rows = torch.stack([ids[i * seq: i * seq + seq + 1] for i in range(windows)])
    return [(rows[i:i + batch, :-1], rows[i:i + batch, 1:]) for i in range(0, windows, batch)]


# ----------------------------------------------------------------------------- arms


def arm_config(arm: str, model: str, args) -> MoEConfig:
    experts, top_k, ratio, shared = MODELS[model]
    base = MoEConfig(hidden_size=args.dim, intermediate_size=max(1, round(ratio * args.dim)), num_experts=experts,
                     top_k=top_k, num_shared_experts=shared, score_func=args.score_func,
                     norm_topk_prob=False)  # weights = the chosen experts' scores (Wang et al. Eq. 1 and 3)
    if arm == "none":
        return base
    if arm.startswith("aux_1e"):
        return base.replace(aux_loss_coef=float(arm[4:]), aux_loss_type="global")
    if arm == "global_batch":
        return base.replace(aux_loss_coef=args.gb_coef, aux_loss_type="global_batch")
    if arm == "global_batch_1e-2":
        return base.replace(aux_loss_coef=1e-2, aux_loss_type="global_batch")
    if arm == "lossfree_u1e-3":
        return base.replace(expert_bias=True, bias_update_rate=1e-3)
    if arm == "lossfree_scaled":
        return base.replace(expert_bias=True, bias_update_rate=scaled_rate(args.steps))
    if arm == "aux_z":
        return base.replace(aux_loss_coef=1e-3, aux_loss_type="global", z_loss_coef=1e-3)
    if arm == "expert_choice":  # capacity factor k: E * C = k * N expert slots, as top-k uses
        return base.replace(routing="expert_choice", capacity_factor=float(top_k))
    if arm == "sinkhorn":
        return base.replace(routing="sinkhorn")
    raise ValueError(f"unknown arm {arm!r}; choose from {list(ARMS + EXTRA_ARMS)}")


def scaled_rate(steps: int) -> float:
    """u = 1e-3 * 1000 / steps: the bias moves as far over `steps` as u = 1e-3 over 1000 steps."""
    return 1e-3 * 1000 / steps


# ----------------------------------------------------------------------------- one run


def run(arm: str, model_name: str, seed: int, args, train_ids: dict, val_data: dict) -> dict:
    """Train one arm on one seed; train_ids / val_data: {domain: bytes tensor / batches}, micro-batch i
    of a step drawn from domain i % (number of domains)."""
    torch.manual_seed(seed)  # same initial weights in every arm of a seed
    cfg = arm_config(arm, model_name, args)
    model = TinyMoELM(256, args.dim, args.heads, cfg, args.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    moe_kit.set_aux_loss_scale(model, 1.0 / args.accum)  # the main loss is divided by accum too
    streams = [train_batches(ids, args.micro_batch, args.seq, 1000 * d + seed)
               for d, ids in enumerate(train_ids.values())]
    monitor = RoutingMonitor(model)  # entropy=True: the gates keep their top-k score sum
    losses, val_curve = [], []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:  # linear warm-up, then cosine to 10%
            group["lr"] = args.lr * lr_factor(step, args.steps)
        optimizer.zero_grad()
        total = 0.0
        with monitor.count() as counter:  # the step's load: all its micro-batches
            for micro in range(args.accum):
                inputs, targets = next(streams[micro % len(streams)])
                loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()) / args.accum
                loss.backward()  # aux / z losses add their own gradient (scaled 1/accum)
                total += loss.item()
        optimizer.step()
        moe_kit.update_expert_bias(model)  # expert bias (lossfree arms); new step for global_batch
        monitor.record(step, counter)
        losses.append(total)
        if step % args.eval_every == 0 or step == args.steps:
            val_curve.append(dict(step=step, **evaluate(model, monitor, step, val_data)))
    seconds = time.perf_counter() - start
    final = val_curve[-1]
    layers = monitor.layers()
    batch_vio = [statistics.mean(r["max_violation"] for r in monitor.history if r["step"] == s)
                 for s in range(1, args.steps + 1)]
    dropped = [r["dropped_fraction"] or 0.0 for r in monitor.history]
    return dict(
        arm=arm, model=model_name, seed=seed,
        val_loss=final["loss"], val_ppl=math.exp(final["loss"]),
        maxvio_global=final["maxvio_global"], maxvio_global_worst=final["maxvio_global_worst"],
        maxvio_global_per_layer=final["maxvio_global_per_layer"],
        maxvio_batch_mean=statistics.mean(batch_vio),
        maxvio_batch_last10=statistics.mean(batch_vio[-max(1, len(batch_vio) // 10):]),
        dropped_share=statistics.mean(dropped) if dropped else 0.0,
        unrouted_share=final["unrouted_share"],
        topk_score_sum=final["topk_score_sum"], topk_score_sum_uniform=cfg.top_k / cfg.num_experts,
        domain_spread=final["domain_spread"], domain_peak=final["domain_peak"],
        domain_ppl=final["domain_ppl"],
        train_loss_last10=statistics.mean(losses[-max(1, len(losses) // 10):]),
        seconds=seconds, bias_update_rate=cfg.bias_update_rate if cfg.expert_bias else None,
        layers=layers, loss_curve=losses, maxvio_batch_curve=batch_vio, val_curve=val_curve,
    )


def lr_factor(step: int, steps: int) -> float:
    warm = max(1, steps // 10)
    if step <= warm:
        return step / warm
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


@torch.no_grad()
def evaluate(model, monitor: RoutingMonitor, step: int, val_data: dict) -> dict:
    """Validation loss (mean byte cross-entropy, overall and per domain), MaxVio_global (loads summed
    over the pass), top-k score sum and, with two domains, their expert specialization."""
    model.eval()
    nll, count, unrouted, domain_loss, domain_loads = 0.0, 0, [], {}, {}
    with monitor.evaluate(step):
        for domain, batches in val_data.items():
            domain_nll, domain_count = 0.0, 0
            with LoadCounter(model) as counter:
                for inputs, targets in batches:
                    logits = model(inputs)
                    domain_nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
                    domain_count += targets.numel()
                    unrouted += [s.unrouted_fraction for s in moe_kit.routing_stats(model).values()
                                 if s.unrouted_fraction is not None]
            nll, count = nll + domain_nll, count + domain_count
            domain_loss[domain] = domain_nll / domain_count
            domain_loads[domain] = counter.loads
    model.train()
    per_layer = monitor.max_violation_global(step)
    score_sums = [row["topk_score_sum"] for row in monitor.evaluations
                  if row["step"] == step and row["topk_score_sum"] is not None]
    spread = peak = None
    if len(val_data) > 1:  # expert choice: tokens taken as slots / k, so its peak is approximate
        top_k = moe_layers(model)[0].cfg.top_k
        selections = [domain_selection({d: loads[layer] for d, loads in domain_loads.items()}, top_k)
                      for layer in per_layer]
        spread = statistics.mean(sel["spread"] for sel in selections)
        peak = statistics.mean(max(sel["peak"].values()) for sel in selections)
    return dict(loss=nll / count, maxvio_global=statistics.mean(per_layer.values()),
                maxvio_global_worst=max(per_layer.values()), maxvio_global_per_layer=per_layer,
                unrouted_share=statistics.mean(unrouted) if unrouted else None,
                topk_score_sum=statistics.mean(score_sums) if score_sums else None,
                domain_spread=spread, domain_peak=peak,
                domain_ppl={d: math.exp(loss) for d, loss in domain_loss.items()})


def moe_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, moe_kit.MoELayer)]


# ----------------------------------------------------------------------------- summary and output


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (model, arm): mean and spread (min-max over seeds) of each metric."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in runs):
        for arm in dict.fromkeys(r["arm"] for r in runs):
            group = [r for r in runs if r["model"] == model and r["arm"] == arm]
            if not group:
                continue
            row = dict(model=model, arm=arm, seeds=len(group))
            for key in ("val_ppl", "maxvio_global", "maxvio_global_worst", "maxvio_batch_mean",
                        "maxvio_batch_last10", "dropped_share", "seconds"):
                values = [r[key] for r in group]
                row[key] = statistics.mean(values)
                row[key + "_min"], row[key + "_max"] = min(values), max(values)
            for key in ("unrouted_share", "topk_score_sum", "domain_spread", "domain_peak"):
                values = [r[key] for r in group if r.get(key) is not None]
                row[key] = statistics.mean(values) if values else None
            row["topk_score_sum_uniform"] = group[0].get("topk_score_sum_uniform")
            domains = group[0].get("domain_ppl") or {}
            row["domain_ppl"] = {d: statistics.mean(r["domain_ppl"][d] for r in group) for d in domains}
            # paired by seed (same data, same initial weights): perplexity minus the no-balancing run's
            none = {r["seed"]: r["val_ppl"] for r in runs if r["model"] == model and r["arm"] == "none"}
            deltas = [r["val_ppl"] - none[r["seed"]] for r in group if r["seed"] in none]
            row["val_ppl_vs_none"] = statistics.mean(deltas) if deltas else None
            row["val_ppl_vs_none_min"] = min(deltas) if deltas else None
            row["val_ppl_vs_none_max"] = max(deltas) if deltas else None
            row["maxvio_batch_jump"] = statistics.mean(mean_jump(r["maxvio_batch_curve"]) for r in group)
            rows.append(row)
    return rows


def mean_jump(curve: list[float]) -> float:
    """Mean |curve[t+1] - curve[t]| over the second half of a run (0.0 under two points): how much
    MaxVio_batch swings from one step to the next, i.e. oscillation, once the start is over."""
    tail = curve[len(curve) // 2:]
    return statistics.mean(abs(b - a) for a, b in zip(tail[:-1], tail[1:], strict=True)) if len(tail) > 1 else 0.0


def markdown(data: dict) -> str:
    env, s, corpus = data["environment"], data["settings"], data["data"]
    mixed = any(r.get("domain_spread") is not None for r in data["summary"])
    lines = [
        f"Balance study: {s['layers']}-layer byte-level MoE LM (D={s['dim']}, {s['score_func']} router) on "
        f"{corpus_text(corpus)}, "
        f"{s['steps']} steps of {s['accum']} x {s['micro_batch']} x {s['seq']} tokens, seeds {s['seeds']}. "
        f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}, {env['date']}; "
        f"1-min load average {env['load_average_1m']} at start, {env.get('load_average_1m_end')} at end "
        f"on {env['cpu_count']} cores; total wall time {data['wall_seconds'] / 60:.1f} min.",
        "",
        "Mean over seeds (min-max). Δ ppl: validation perplexity minus the `none` run's of the same seed "
        "(same data and initial weights), mean (min-max). MaxVio_global: validation pass, mean over layers "
        "(worst layer). MaxVio_batch: training steps, mean over layers and steps (last 10% of steps); "
        "jump: mean |change| of MaxVio_batch from one step to the next over the second half (oscillation). "
        "top-k sum: validation tokens' mean sum of their k largest router scores, mean over layers "
        "(uniform scores give k/E)." + (" Domain spread: total-variation distance between the experts' shares "
                                        "of prose and of code tokens, mean over layers (peak: the largest share of "
                                        "one domain's tokens one expert takes); ppl per domain." if mixed else ""),
        "",
        "| model | arm | val ppl | Δ ppl vs none | MaxVio_global | MaxVio_batch | jump | dropped / unrouted "
        "| top-k sum |" + (" domain spread (peak) | ppl prose / code |" if mixed else "") + " s / run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if mixed else "") + "---:|",
    ]
    for r in data["summary"]:
        delta = "-" if r.get("val_ppl_vs_none") is None else (
            f"{r['val_ppl_vs_none']:+.3f} ({r['val_ppl_vs_none_min']:+.3f} to {r['val_ppl_vs_none_max']:+.3f})")
        share = "0" if not r["dropped_share"] else f"{r['dropped_share']:.3f} dropped"
        if r["unrouted_share"] is not None:
            share = f"{r['unrouted_share']:.3f} unrouted"
        score_sum = "-" if r.get("topk_score_sum") is None else (
            f"{r['topk_score_sum']:.3f} (uniform {r['topk_score_sum_uniform']:.3f})")
        domain = ""
        if mixed:
            spread = "-" if r.get("domain_spread") is None else f"{r['domain_spread']:.3f} ({r['domain_peak']:.3f})"
            ppl = r.get("domain_ppl") or {}
            domain = f" {spread} | {ppl.get('prose', float('nan')):.3f} / {ppl.get('code', float('nan')):.3f} |"
        lines.append(
            f"| {r['model']} | {r['arm']} | {r['val_ppl']:.3f} ({r['val_ppl_min']:.3f}-{r['val_ppl_max']:.3f}) "
            f"| {delta} | {r['maxvio_global']:.3f} ({r['maxvio_global_worst']:.3f}) "
            f"| {r['maxvio_batch_mean']:.3f} ({r['maxvio_batch_last10']:.3f}) | {r['maxvio_batch_jump']:.3f} "
            f"| {share} | {score_sum} |{domain} {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def corpus_text(corpus: dict) -> str:
    """One line on the data: sources and train / validation bytes per domain."""
    train, val = corpus["train_bytes"], corpus["val_bytes"]
    if not isinstance(train, dict):  # results written before --corpus existed
        return f"pydoc_data.topics ({train} train / {val} validation bytes)"
    sources = corpus["source"]
    return "; ".join(f"{domain}: {sources[domain]} ({train[domain]} train / {val[domain]} validation bytes)"
                     for domain in train) + (", one domain per micro-batch" if len(train) > 1 else "")


def plot(data: dict, path) -> None:
    """MaxVio_batch (top) and training loss (bottom) over steps, mean over seeds, one column per model."""
    import numpy as np
    from matplotlib.figure import Figure

    runs = data["runs"]
    models = list(dict.fromkeys(r["model"] for r in runs))
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    fig = Figure(figsize=(6.5 * len(models), 8.0), layout="constrained")
    axes = fig.subplots(2, len(models), squeeze=False)
    colors = {arm: f"C{i}" for i, arm in enumerate(arms)}
    for col, model in enumerate(models):
        for arm in arms:
            group = [r for r in runs if r["model"] == model and r["arm"] == arm]
            if not group:
                continue
            steps = np.arange(1, len(group[0]["loss_curve"]) + 1)
            vio = np.mean([_smooth(r["maxvio_batch_curve"]) for r in group], axis=0)
            axes[0, col].plot(steps, vio, color=colors[arm], label=arm, linewidth=1.3)
            base = {r["seed"]: np.asarray(r["loss_curve"]) for r in runs if r["model"] == model and r["arm"] == "none"}
            paired = [r for r in group if r["seed"] in base]
            loss = (np.mean([_smooth(np.asarray(r["loss_curve"]) - base[r["seed"]]) for r in paired], axis=0)
                    if paired else np.mean([_smooth(r["loss_curve"]) for r in group], axis=0))
            axes[1, col].plot(steps, loss, color=colors[arm], label=arm, linewidth=1.3)
            glob = np.mean([r["maxvio_global"] for r in group])
            axes[0, col].plot([steps[-1]], [glob], marker="D", color=colors[arm], linestyle="none")
        axes[0, col].set_title(f"{model}: MaxVio_batch (line) and MaxVio_global (diamond)", fontsize=10)
        axes[0, col].set_yscale("symlog", linthresh=0.1)
        paired = any(r["arm"] == "none" for r in runs if r["model"] == model)
        axes[1, col].set_title(f"{model}: training loss (nats / byte)" + (" minus the `none` run of the same seed"
                                                                         if paired else ""), fontsize=10)
        for ax in axes[:, col]:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("MaxVio (mean over layers, seeds)")
    axes[1, 0].set_ylabel("loss difference (mean over seeds)")
    axes[0, -1].legend(fontsize=8, ncol=2)
    fig.suptitle("moe_kit balance study (curves smoothed over 10 steps)")
    fig.savefig(path, dpi=100)


def _smooth(values, width: int = 10):
    import numpy as np

    values = np.asarray(values, dtype=float)
    if len(values) < width:
        return values
    kernel = np.ones(width) / width
    head = np.cumsum(values[: width - 1]) / np.arange(1, width)
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def render(out_dir) -> None:
    """(Re)write OUT/results.md and .png from OUT/results.json (its summary recomputed from the runs)."""
    with open(os.path.join(out_dir, "results.json")) as f:
        data = json.load(f)
    summary = summarize(data["runs"])
    if summary != data["summary"]:
        data["summary"] = summary
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(data, f)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(data))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: skipping results.png (pip install moe-kit[plot])", file=sys.stderr)
        return
    plot(data, os.path.join(out_dir, "results.png"))


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--models", default="e32k4s1", help="comma-separated: e32k4s1, e8k2")
    parser.add_argument("--out", default="benchmarks/results/cpu/balance-study")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--gb-coef", type=float, default=1e-3, help="aux coefficient of the global_batch arm")
    parser.add_argument("--score-func", default="softmax", help="softmax (default) or sigmoid (Wang et al.'s gate)")
    parser.add_argument("--corpus", default="prose", choices=("prose", "mixed"),
                        help="prose: pydoc_data.topics; mixed: + standard-library code, one domain per micro-batch")
    parser.add_argument("--val-share", type=float, default=0.1)
    parser.add_argument("--val-tokens", type=int, default=4096, help="validation tokens per domain per evaluation pass")
    parser.add_argument("--eval-every", type=int, default=0, help="0: steps // 4")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads: this small a model is fastest on 1 (2 threads spin against each "
                             "other on a busy machine: 8x slower in a measurement with load average 6 on 2 cores)")
    parser.add_argument("--render", default=None, help="rebuild DIR/results.md and .png from DIR/results.json")
    args = parser.parse_args(argv)
    args.arm_list = [a for a in args.arms.split(",") if a]
    args.seed_list = [int(s) for s in args.seeds.split(",") if s]
    args.model_list = [m for m in args.models.split(",") if m]
    for arm in args.arm_list:
        if arm not in ARMS + EXTRA_ARMS:
            parser.error(f"unknown arm {arm!r}; choose from {list(ARMS + EXTRA_ARMS)}")
    for model in args.model_list:
        if model not in MODELS:
            parser.error(f"unknown model {model!r}; choose from {list(MODELS)}")
    if args.steps < 1 or args.accum < 1 or not args.seed_list:
        parser.error("--steps and --accum must be >= 1 and --seeds non-empty")
    args.eval_every = args.eval_every or max(1, args.steps // 4)
    return args


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.render:
        render(args.render)
        return {}
    os.makedirs(args.out, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    splits = {domain: split_bytes(text, args.val_share) for domain, text in load_corpus(args.corpus).items()}
    train_ids = {domain: train for domain, (train, _) in splits.items()}
    val_data = {domain: val_batches(val, 16, args.seq, args.val_tokens) for domain, (_, val) in splits.items()}
    env = moe_bench.environment(torch.device("cpu"), torch.float32, argv)
    env["command"] = "python benchmarks/balance_study.py " + " ".join(argv)
    cells = [(m, a, s) for m in args.model_list for s in args.seed_list for a in args.arm_list]
    progress = moe_bench.Progress(len(cells) * args.steps)
    runs = []
    start = time.perf_counter()
    try:
        for model, arm, seed in cells:
            progress.label = f"{model} {arm} seed {seed}"
            result = run(arm, model, seed, args, train_ids, val_data)
            progress.update(args.steps)
            progress.log(f"{model} {arm:<15} seed {seed}: val ppl {result['val_ppl']:.3f}  MaxVio_global "
                         f"{result['maxvio_global']:.3f}  MaxVio_batch {result['maxvio_batch_mean']:.3f}  "
                         f"{result['seconds']:.0f}s  (~{progress.eta()} left)")
            runs.append(result)
    finally:
        torch.set_num_threads(threads)
        progress.close()
    env["load_average_1m_end"] = moe_bench._load_average()
    settings = {k: v for k, v in vars(args).items() if k not in ("arm_list", "seed_list", "model_list", "render")}
    settings.update(seeds=args.seed_list, models={m: dict(zip(("experts", "top_k", "intermediate_over_dim", "shared"),
                                                              MODELS[m], strict=True)) for m in args.model_list},
                    lossfree_scaled_rate=scaled_rate(args.steps))
    data = dict(environment=env, settings=settings,
                data=dict(corpus=args.corpus,
                          source={"prose": "pydoc_data.topics", "code": "stdlib " + ", ".join(CODE_MODULES)},
                          train_bytes={d: len(train) for d, (train, _) in splits.items()},
                          val_bytes={d: len(val) for d, (_, val) in splits.items()},
                          val_tokens_per_pass={d: sum(t.numel() for _, t in b) for d, b in val_data.items()}),
                wall_seconds=time.perf_counter() - start, summary=summarize(runs), runs=runs)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(data, f)
    render(args.out)
    print(markdown(data))
    print(f"wrote {args.out}/results.json, results.md, results.png")
    return data


if __name__ == "__main__":
    main()
