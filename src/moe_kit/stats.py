"""Routing statistics and diagnostics: what each MoE layer did, and how that evolves in training.

Bottom layer of moe_kit: imports nothing from the package (MoE layers are found by duck typing,
a module whose `stats` is a RoutingStats; gates by their `track_entropy` flag). matplotlib is
imported only inside the plot functions (`pip install moe-kit[plot]`).

Legend: N tokens, E experts, L MoE layers, T recorded steps.

    monitor = RoutingMonitor(model)          # asks every gate to keep its router entropy
    for step in range(steps):
        ...; optimizer.step(); moe_kit.update_expert_bias(model)
        monitor.record(step)                 # one row per MoE layer: load, MaxVio, max/mean, cv, entropy...
        with monitor.evaluate(step):         # every forward inside adds to one load per layer:
            for batch in validation: model(batch)   # MaxVio_global of the pass
    monitor.to_json("routing.json"); monitor.to_markdown("routing.md"); monitor.plot("routing.png")

MaxVio (Wang et al. 2024, arXiv 2408.15664, section 4.1, Eq. 4): (max_i load_i - mean load) /
mean load, mean load = routed slots / E (the load under perfect balance). MaxVio_batch is that of
one training batch (a row's load), MaxVio_global that of the loads summed over an evaluation pass
(the paper's validation set); the paper reports the mean over layers.

Expert specialization (Qiu et al. 2025, arXiv 2501.11873) is measured two ways in that paper. The
per-domain selection frequency of each expert (their Figure 1b) needs a domain label per token,
which routing alone does not carry: count each domain's batches with its own LoadCounter and
compare the loads (`domain_selection`). The top-k score sum (their section 5, Figure 4a) is a
routing-only number: `topk_score_sum`, kept per forward by gates that track their entropy and
reported by the monitor.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RoutingStats:
    load: torch.Tensor  # int64 [E]: routed slots each expert processed (dropped slots excluded)
    aux_loss: float | None  # coef * Switch aux loss, as it enters the gradient; None when off
    z_loss: float | None  # coef * router z-loss; None when off
    dropped_fraction: float  # share of the N*k slots dropped by the capacity limit
    bias: torch.Tensor | None  # fp32 [E]: expert bias (aux-loss-free balancing), None when off
    unrouted_fraction: float | None = None  # expert choice: share of real tokens no expert took; else None

    @property
    def max_over_mean_load(self) -> float:
        """Max / mean of `load` (1.0 is perfect balance)."""
        mean = self.load.float().mean()
        return float(self.load.max() / mean) if mean > 0 else float("nan")

    @property
    def load_cv(self) -> float:
        """Coefficient of variation of `load` (0.0 is perfect balance); see `load_cv`."""
        return load_cv(self.load)

    @property
    def max_violation(self) -> float:
        """MaxVio of `load`: (max load - mean load) / mean load (0.0 is perfect balance); see `max_violation`."""
        return max_violation(self.load)


def routing_stats(model: nn.Module) -> dict[str, RoutingStats]:
    """{module name: RoutingStats} for every MoE layer of `model` that has run a forward."""
    found = {}
    for name, module in model.named_modules():
        stats = getattr(module, "stats", None)
        if isinstance(stats, RoutingStats):
            found[name] = stats
    return found


# ----------------------------------------------------------------------------- formulas


def load_cv(load: torch.Tensor) -> float:
    """std / mean of the per-expert load [E], population std (divide by E); nan when no load.

    0 when every expert gets the same share; sqrt(E - 1) when one expert gets everything.
    """
    load = load.double()
    mean = load.mean()
    if not mean > 0:
        return float("nan")
    return float(load.std(correction=0) / mean)


def max_violation(load: torch.Tensor) -> float:
    """MaxVio of the per-expert load [E] (Wang et al. 2024, arXiv 2408.15664, section 4.1):
    (max_i load_i - mean load) / mean load, with mean load = load.sum() / E, the load of every
    expert under perfect balance.

    0 when every expert gets the same share, E - 1 when one expert gets everything. 0.0 when no slot
    is routed at all (an all-padding batch, an empty layer): no expert is above the balanced load,
    and averages over steps stay finite. Same value as max_over_mean_load - 1 otherwise.
    """
    if load.dim() != 1 or load.numel() == 0:
        raise ValueError(f"max_violation needs a load of shape [E] with E >= 1, got shape {tuple(load.shape)}")
    if load.is_floating_point() and not bool(torch.isfinite(load).all()):
        raise ValueError("max_violation: the load holds a non-finite value")
    load = load.double()
    if bool((load < 0).any()):
        raise ValueError("max_violation: the load holds a negative count")
    mean = load.sum() / load.numel()
    if not mean > 0:
        return 0.0
    return float((load.max() - mean) / mean)


@torch.no_grad()
def score_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Router entropy in nats: mean over tokens of H(p), p = scores / scores.sum(-1), scores [N, E].

    log(E) when every token spreads its scores evenly, 0 when each token puts all of it on one
    expert. Works for softmax, sigmoid and sqrtsoftplus scores alike (normalized per token, as the
    Switch aux loss does). A 0-dim fp32 tensor (nan when N = 0), so reading it costs no host sync.
    """
    probs = token_probs(scores)
    plogp = torch.special.xlogy(probs, probs)  # 0 * log 0 = 0
    return -plogp.sum(dim=-1).mean()


def token_probs(scores: torch.Tensor) -> torch.Tensor:
    """scores [N, E] -> detached fp32 p = scores / scores.sum(-1) per token (softmax rows unchanged)."""
    scores = scores.detach().float()
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


@torch.no_grad()
def topk_score_sum(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Router confidence in its top k (Qiu et al. 2025, arXiv 2501.11873, section 5, Figure 4a, "the
    average of the topK score sums"): mean over tokens of the sum of the k largest entries of
    p = scores / scores.sum(-1), scores [N, E] (a no-op for softmax scores; sigmoid and sqrtsoftplus
    scores are normalized per token, as in score_entropy).

    k / E when every token spreads its scores evenly, 1.0 when each token puts all of them on at
    most k experts. The balancing losses push it down (towards uniform scores), the language-model
    loss up; Qiu et al. find it higher with global-batch balancing, whose experts specialize. A 0-dim
    fp32 tensor (nan when N = 0), so reading it costs no host sync.
    """
    if not 1 <= k <= scores.shape[-1]:
        raise ValueError(f"topk_score_sum needs 1 <= k <= E = {scores.shape[-1]}, got k={k}")
    return token_probs(scores).topk(k, dim=-1).values.sum(dim=-1).mean()


def domain_selection(loads: dict[str, torch.Tensor], top_k: int) -> dict:
    """Expert specialization across domains from one layer's per-domain loads (Qiu et al. 2025,
    arXiv 2501.11873, Figure 1b: "the frequency of each expert selection" for each domain's tokens).

    loads: {domain: [E] routed slots per expert over that domain's tokens} (e.g. one LoadCounter per
    domain); top_k: experts per token, so that a domain's tokens are its slots / top_k (dropless
    token choice). Returns a dict: frequency ({domain: [E] floats, the share of the domain's tokens
    that chose each expert; top_k / E each under uniform routing}), peak ({domain: the largest
    frequency}), uniform (top_k / E) and spread: the mean over domain pairs of the total-variation
    distance 0.5 * sum_e |p_a(e) - p_b(e)|, p = load / load.sum(): 0 when every domain uses the
    experts alike, 1 when no expert serves two domains (None for one domain).
    """
    if not loads:
        raise ValueError("domain_selection needs the loads of at least one domain")
    sizes = {tuple(load.shape) for load in loads.values()}
    if len(sizes) != 1 or len(next(iter(sizes))) != 1:
        raise ValueError(f"domain_selection needs one [E] load per domain, got shapes {sorted(sizes)}")
    num_experts = next(iter(sizes))[0]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"domain_selection needs 1 <= top_k <= E = {num_experts}, got top_k={top_k}")
    frequency, shares = {}, {}
    for domain, load in loads.items():
        load = load.detach().double().cpu()
        slots = float(load.sum())
        if not slots > 0 or bool((load < 0).any()):
            raise ValueError(f"domain {domain!r}: its load needs routed slots and no negative count")
        frequency[domain] = (load * top_k / slots).tolist()
        shares[domain] = load / slots
    names = list(shares)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    spread = (sum(0.5 * float((shares[a] - shares[b]).abs().sum()) for a, b in pairs) / len(pairs)
              if pairs else None)
    return dict(frequency=frequency, peak={d: max(f) for d, f in frequency.items()}, uniform=top_k / num_experts,
                spread=spread)


# ----------------------------------------------------------------------------- monitor


class RoutingMonitor:
    """Records the routing of every MoE layer of `model`, one row per layer per `record(step)`.

    Row keys: step, layer (module name), load (list of E ints: routed slots per expert),
    max_violation (MaxVio_batch), max_over_mean, cv, entropy (nats; None when not tracked),
    entropy_max (log E), topk_score_sum (see `topk_score_sum`; k / E is uniform; None when not
    tracked), dropped_fraction, bias_min / bias_max (None without expert bias), aux_loss,
    z_loss. Every number describes the layer's last forward before `record` (call it after the
    optimizer step; with gradient accumulation that is the last micro-batch, unless the step's
    forwards ran inside `with monitor.count() as counter:` and `record(step, counter)` is called:
    then load, max_violation, max_over_mean and cv are those of the whole step's load).
    Non-finite values are stored as None so the history is plain JSON.

    `with monitor.evaluate(step):` sums every MoE layer's load over the forwards inside (an
    evaluation pass) and appends one row per layer to `evaluations`: step, layer, load, forwards,
    max_violation (MaxVio_global of the pass), max_over_mean, cv, topk_score_sum (mean over the
    pass's forwards; None when not tracked).

    `entropy=True` sets `track_entropy` on every gate of `model` so each forward keeps a detached
    mean router entropy and top-k score sum (two [N, E] reductions); `close()` turns that off again.
    A monitor built with `model=None` (e.g. `RoutingMonitor.from_json`) only holds and plots history.
    """

    def __init__(self, model: nn.Module | None = None, entropy: bool = True):
        self.model = model
        self.history: list[dict] = []
        self.evaluations: list[dict] = []  # one row per layer per evaluate() pass
        self._gates = []
        if model is not None and entropy:
            self._gates = [m for m in model.modules() if hasattr(m, "track_entropy")]
            for gate in self._gates:
                gate.track_entropy = True

    def record(self, step: int, counter: LoadCounter | None = None) -> list[dict]:
        """Append (and return) one row per MoE layer that has run a forward.

        counter: a LoadCounter (from `count()`) that saw this step's forwards, e.g. all micro-batches
        of a gradient-accumulation step; the rows' load and balance numbers are then its sums.
        """
        self._need_model()
        rows = []
        for name, stats in routing_stats(self.model).items():
            gate = getattr(self.model.get_submodule(name), "gate", None)
            tracked = getattr(gate, "track_entropy", False)
            row = stats_row(step, name, stats, getattr(gate, "entropy", None) if tracked else None,
                            getattr(gate, "topk_score_sum", None) if tracked else None)
            if counter is not None and name in counter.loads:
                row.update(load_row(counter.loads[name]))
            rows.append(row)
        self.history.extend(rows)
        return rows

    def count(self) -> LoadCounter:
        """A LoadCounter on this monitor's model: `with monitor.count() as c: ...; monitor.record(step, c)`."""
        self._need_model()
        return LoadCounter(self.model)

    @contextlib.contextmanager
    def evaluate(self, step: int):
        """Context manager: the load of every MoE layer summed over the forwards inside it (one
        evaluation pass, e.g. the validation set), appended to `evaluations` on exit (one row per
        layer: step, layer, load, forwards, max_violation = MaxVio_global, max_over_mean, cv,
        topk_score_sum). Yields the LoadCounter; nothing is appended if the block raises."""
        with self.count() as counter:
            yield counter
        score_sums = counter.topk_score_sum()
        rows = [dict(step=int(step), layer=name, forwards=counter.forwards[name], **load_row(load),
                     topk_score_sum=score_sums.get(name))
                for name, load in counter.loads.items()]
        self.evaluations.extend(rows)

    def max_violation_global(self, step: int | None = None) -> dict[str, float]:
        """{layer: MaxVio_global} of the evaluation pass at `step` (default: the last one)."""
        if step is None:
            step = max((row["step"] for row in self.evaluations), default=None)
        return {row["layer"]: row["max_violation"] for row in self.evaluations if row["step"] == step}

    def _need_model(self) -> None:
        if self.model is None:
            raise ValueError("this RoutingMonitor has no model to read (it was built from saved history)")

    def close(self) -> None:
        """Stop the gates computing their entropy and top-k score sum (the history stays)."""
        for gate in self._gates:
            gate.track_entropy = False
            gate.entropy = gate.topk_score_sum = None
        self._gates = []

    def __enter__(self) -> RoutingMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def layers(self) -> list[str]:
        """Layer names in the order first recorded."""
        return list(dict.fromkeys(row["layer"] for row in self.history))

    def to_json(self, path, **extra) -> None:
        """Write {"history": [...rows], "evaluations": [...rows], **extra} to `path` (extra: what
        from_json read, then these)."""
        with open(path, "w") as f:
            json.dump({**getattr(self, "extra", {}), **extra, "history": self.history,
                       "evaluations": self.evaluations}, f)

    def to_markdown(self, path=None) -> str:
        """A table, one line per layer: steps recorded, mean and last MaxVio_batch, last max/mean
        load, mean dropped fraction, MaxVio_global of the last evaluation pass, mean top-k score sum
        ("-" when not tracked). Written to `path` if given."""
        last_eval = self.max_violation_global()
        lines = ["| layer | steps | mean MaxVio_batch | last MaxVio_batch | last max/mean load | mean dropped "
                 "| MaxVio_global (last eval) | mean top-k score sum |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for layer in dict.fromkeys([*self.layers(), *last_eval]):
            rows = [row for row in self.history if row["layer"] == layer]
            vio = [row["max_violation"] for row in rows if row.get("max_violation") is not None]
            dropped = [row["dropped_fraction"] for row in rows if row.get("dropped_fraction") is not None]
            score_sums = [row["topk_score_sum"] for row in rows if row.get("topk_score_sum") is not None]
            last = rows[-1] if rows else {}
            lines.append(f"| {layer} | {len(rows)} | {_fmt(_mean(vio))} | {_fmt(last.get('max_violation'))} "
                         f"| {_fmt(last.get('max_over_mean'))} | {_fmt(_mean(dropped))} "
                         f"| {_fmt(last_eval.get(layer))} | {_fmt(_mean(score_sums))} |")
        text = "\n".join(lines) + "\n"
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @property
    def last_step(self) -> int | None:
        """The largest recorded step (None before the first record)."""
        return max((row["step"] for row in self.history), default=None)

    @classmethod
    def from_json(cls, path, model: nn.Module | None = None, entropy: bool = True,
                  until_step: int | None = None) -> RoutingMonitor:
        """The monitor saved by `to_json`; with `model`, it goes on recording (resume after a restart).

            monitor = RoutingMonitor.from_json("routing.json", model=model, until_step=ckpt_step)
            for step in range(ckpt_step + 1, steps): ...; monitor.record(step)

        until_step: drop saved rows of later steps (recorded after the checkpoint the run restarts
        from, so they would be recorded twice). With `model`, every layer named in the history must
        be a submodule of it (ValueError naming those that are not: a different model). The other
        keys saved with the history are kept in `monitor.extra` and written again by `to_json`.
        """
        with open(path) as f:
            data = json.load(f)
        history = data["history"]
        if until_step is not None:
            history = [row for row in history if row["step"] <= until_step]
        if model is not None:
            names = {name for name, _ in model.named_modules()}
            missing = [layer for layer in dict.fromkeys(row["layer"] for row in history) if layer not in names]
            if missing:
                raise ValueError(f"{path}: the model has no layers named {missing}; resume with the model it recorded")
        evaluations = data.get("evaluations", [])
        if until_step is not None:
            evaluations = [row for row in evaluations if row["step"] <= until_step]
        monitor = cls(model, entropy=entropy)
        monitor.history = history
        monitor.evaluations = evaluations
        monitor.extra = {key: value for key, value in data.items() if key not in ("history", "evaluations")}
        return monitor

    def plot(self, path, title: str | None = None, layers: list[str] | None = None,
             metric: str = "max_violation") -> None:
        """PNG of the load heatmap (layers x experts, over steps) above `metric` per layer (default
        MaxVio_batch, with the evaluation passes' MaxVio_global as markers)."""
        plot_routing({title or "routing": self.history}, path, layers=layers, title=title, metric=metric,
                     evaluations={title or "routing": self.evaluations})


def stats_row(step: int, layer: str, stats: RoutingStats, entropy: torch.Tensor | float | None = None,
              score_sum: torch.Tensor | float | None = None) -> dict:
    """One history row from a layer's RoutingStats (and its gate's mean router entropy and top-k score sum)."""
    bias = stats.bias
    return dict(
        step=int(step),
        layer=layer,
        **load_row(stats.load),
        entropy=None if entropy is None else _finite(float(entropy)),
        entropy_max=math.log(stats.load.numel()),
        topk_score_sum=None if score_sum is None else _finite(float(score_sum)),
        dropped_fraction=_finite(stats.dropped_fraction),
        bias_min=None if bias is None else float(bias.min()),
        bias_max=None if bias is None else float(bias.max()),
        aux_loss=None if stats.aux_loss is None else _finite(stats.aux_loss),
        z_loss=None if stats.z_loss is None else _finite(stats.z_loss),
    )


def load_row(load: torch.Tensor) -> dict:
    """The row keys that depend on the load alone: load (list of E ints), max_violation, max_over_mean, cv."""
    load = load.detach().cpu()
    mean = load.double().mean()
    return dict(
        load=[int(v) for v in load.tolist()],
        max_violation=max_violation(load),
        max_over_mean=_finite(load.max() / mean) if mean > 0 else None,
        cv=_finite(load_cv(load)),
    )


class LoadCounter:
    """Context manager: sums the routed load [E] of every MoE layer of `model` over all forwards run
    inside it (a forward hook per layer reads its `stats`). MoE layers are found by duck typing: a
    module whose class has a `stats` property.

        with LoadCounter(model) as counter:
            for batch in batches: model(batch)
        counter.loads        # {layer name: int64 [E] summed load}
        counter.forwards     # {layer name: forwards counted}
        counter.topk_score_sum()   # {layer name: mean over forwards}, for gates tracking it
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.loads: dict[str, torch.Tensor] = {}
        self.forwards: dict[str, int] = {}
        self._score_sums: dict[str, list[torch.Tensor]] = {}  # each forward's gate.topk_score_sum, if tracked
        self._handles = []

    def __enter__(self) -> LoadCounter:
        for name, module in self.model.named_modules():
            if isinstance(getattr(type(module), "stats", None), property):
                self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def add(module, args, output):
            stats = module.stats
            if not isinstance(stats, RoutingStats):
                return
            load = stats.load.detach().cpu().to(torch.int64)
            self.loads[name] = load if name not in self.loads else self.loads[name] + load
            self.forwards[name] = self.forwards.get(name, 0) + 1
            gate = getattr(module, "gate", None)
            if getattr(gate, "track_entropy", False) and gate.topk_score_sum is not None:
                self._score_sums.setdefault(name, []).append(gate.topk_score_sum)
        return add

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def max_violation(self) -> dict[str, float]:
        """{layer: MaxVio of its summed load}."""
        return {name: max_violation(load) for name, load in self.loads.items()}

    def topk_score_sum(self) -> dict[str, float | None]:
        """{layer: mean over the counted forwards of its gate's top-k score sum} for layers whose gate
        tracks it (RoutingMonitor(entropy=True) sets that); non-finite means are None."""
        return {name: _finite(float(torch.stack(values).mean())) for name, values in self._score_sums.items()}


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


# ----------------------------------------------------------------------------- plots (data -> figure)


def load_matrix(history: list[dict], layers: list[str] | None = None):
    """History rows -> (steps [T], layers [L], blocks: list of L arrays [E_l, T] of load / mean load).

    A step where a layer has no row (or no load) is nan in that layer's block.
    """
    import numpy as np

    layers = layers or list(dict.fromkeys(row["layer"] for row in history))
    steps = sorted({row["step"] for row in history})
    column = {step: i for i, step in enumerate(steps)}
    blocks = []
    for layer in layers:
        rows = [row for row in history if row["layer"] == layer]
        num_experts = len(rows[0]["load"]) if rows else 0
        block = np.full((num_experts, len(steps)), np.nan)
        for row in rows:
            load = np.asarray(row["load"], dtype=float)
            if load.mean() > 0:
                block[:, column[row["step"]]] = load / load.mean()
        blocks.append(block)
    return np.asarray(steps), layers, blocks


def draw_load_heatmap(ax, history: list[dict], layers: list[str] | None = None, vmax: float | None = None):
    """Draw load / mean load as a heatmap on `ax`: x = step, y = experts of each layer stacked
    (layer 0's experts at the top). White is the mean load, red overloaded, blue starved.
    Returns the mappable for a colorbar."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    steps, layers, blocks = load_matrix(history, layers)
    image = np.concatenate(blocks, axis=0) if blocks else np.zeros((0, len(steps)))
    if vmax is None:
        vmax = float(np.nanmax(image)) if np.isfinite(image).any() else 2.0
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(vmax, 1.5))
    if len(steps) > 1:
        gaps = np.diff(steps)
        edges = np.concatenate([[steps[0] - gaps[0] / 2], steps[:-1] + gaps / 2, [steps[-1] + gaps[-1] / 2]])
    else:
        edges = np.array([steps[0] - 0.5, steps[0] + 0.5]) if len(steps) else np.array([0.0, 1.0])
    mesh = ax.pcolormesh(edges, np.arange(image.shape[0] + 1), image, cmap="RdBu_r", norm=norm, rasterized=True)
    ax.invert_yaxis()
    starts = np.cumsum([0] + [block.shape[0] for block in blocks])
    for start in starts[1:-1]:
        ax.axhline(start, color="black", linewidth=0.8)
    ax.set_yticks((starts[:-1] + starts[1:]) / 2)
    ax.set_yticklabels([_short(layer) for layer in layers])
    ax.set_xlabel("step")
    ax.set_ylabel("experts of each layer")
    return mesh


def draw_metric(ax, history: list[dict], metric: str = "max_over_mean", label: str | None = None, color=None):
    """Line of `metric` over steps: mean over layers, band from the best to the worst layer."""
    import numpy as np

    steps = sorted({row["step"] for row in history})
    values = {step: [] for step in steps}
    for row in history:
        if row.get(metric) is not None:
            values[row["step"]].append(row[metric])
    steps = [step for step in steps if values[step]]
    mean = np.array([np.mean(values[s]) for s in steps])
    low = np.array([np.min(values[s]) for s in steps])
    high = np.array([np.max(values[s]) for s in steps])
    (line,) = ax.plot(steps, mean, label=label, color=color, linewidth=1.6)
    ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("step")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    return line


METRIC_LABELS = {
    "max_violation": "MaxVio (max - mean load) / mean",
    "max_over_mean": "max / mean expert load",
    "cv": "load coefficient of variation",
    "entropy": "router entropy (nats)",
    "dropped_fraction": "dropped fraction",
}


def plot_routing(runs: dict[str, list[dict]], path, layers: list[str] | None = None, title: str | None = None,
                 metric: str = "max_over_mean", dpi: int = 110,
                 evaluations: dict[str, list[dict]] | None = None) -> None:
    """PNG: one load heatmap per run (side by side, one shared colour scale) above one panel with
    `metric` over steps for every run (line: mean over layers, band: best to worst layer).
    evaluations: {run: RoutingMonitor.evaluations rows}; their `metric` (mean over layers) is drawn
    as markers, e.g. MaxVio_global beside the training MaxVio_batch."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    names = list(runs)
    vmax = 1.5
    for history in runs.values():
        for block in load_matrix(history, layers)[2]:
            if np.isfinite(block).any():
                vmax = max(vmax, float(np.nanmax(block)))
    width = max(6.0, 4.2 * len(names) + 1.0)
    fig = Figure(figsize=(width, 7.2), layout="constrained")
    grid = fig.add_gridspec(2, len(names), height_ratios=[3, 2])
    mesh = None
    for i, name in enumerate(names):
        ax = fig.add_subplot(grid[0, i])
        mesh = draw_load_heatmap(ax, runs[name], layers, vmax=vmax)
        ax.set_title(f"{name}: expert load over training" if len(names) > 1 else "expert load over training")
        if i:  # the layer names are on the first panel
            ax.set_ylabel("")
            ax.set_yticklabels([])
    fig.colorbar(mesh, ax=fig.axes, location="right", shrink=0.9, label="expert load / mean load (1 = balanced)")
    ax = fig.add_subplot(grid[1, :])
    for name in names:
        line = draw_metric(ax, runs[name], metric, label=name if len(names) > 1 else None)
        evals = [row for row in (evaluations or {}).get(name, []) if row.get(metric) is not None]
        if evals:
            steps = sorted({row["step"] for row in evals})
            means = [float(np.mean([r[metric] for r in evals if r["step"] == s])) for s in steps]
            ax.plot(steps, means, marker="D", linestyle="none", color=line.get_color(),
                    label=f"{name}: evaluation pass (global)" if len(names) > 1 else "evaluation pass (global)")
    if metric == "max_over_mean":
        ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    if metric == "max_violation":
        ax.axhline(0.0, color="gray", linestyle=":", linewidth=1)
    ax.set_title(f"{METRIC_LABELS.get(metric, metric)}: mean over layers, band from best to worst layer", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=dpi)


def _short(layer: str) -> str:
    return layer if len(layer) <= 14 else "..." + layer[-11:]
