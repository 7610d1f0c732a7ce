"""Routing diagnostics: the cv / entropy formulas, RoutingMonitor against hand-computed numbers,
its JSON round trip and plots, and a smoke run of examples/routing_collapse.py."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from torch import nn

import moe_kit
from moe_kit import MoEConfig, MoELayer
from moe_kit.stats import (
    LoadCounter,
    RoutingMonitor,
    domain_selection,
    load_cv,
    load_matrix,
    max_violation,
    plot_routing,
    score_entropy,
    topk_score_sum,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- formulas


@pytest.mark.parametrize(
    "load, expected",
    [
        pytest.param([4, 4, 4, 4], 0.0, id="balanced"),
        pytest.param([8, 0, 0, 0], math.sqrt(3), id="one-hot-expert"),
        pytest.param([1, 2, 3, 6], math.sqrt(3.5) / 3, id="hand"),  # mean 3, var (4+1+0+9)/4
        pytest.param([0, 0, 0], float("nan"), id="no-load"),
    ],
)
def test_load_cv(load, expected):
    got = load_cv(torch.tensor(load))
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "load, expected",
    [
        pytest.param([4, 4, 4, 4], 0.0, id="balanced"),
        pytest.param([8, 0, 0, 0], 3.0, id="one-hot-expert-is-E-minus-1"),
        pytest.param([3, 1, 0, 0], 2.0, id="hand"),  # mean 1: (3 - 1) / 1
        pytest.param([1, 2, 3, 6], 1.0, id="hand-2"),  # mean 3: (6 - 3) / 3
        pytest.param([5, 4, 3], 0.25, id="odd-E"),  # mean 4: (5 - 4) / 4
        pytest.param([7], 0.0, id="one-expert"),
        pytest.param([0, 0, 0], 0.0, id="no-routed-slot-is-zero"),
    ],
)
def test_max_violation_matches_its_definition(load, expected):
    got = max_violation(torch.tensor(load))
    assert got == pytest.approx(expected, abs=1e-12)
    mean = sum(load) / len(load)
    if mean > 0:  # the definition, spelled out
        assert got == pytest.approx((max(load) - mean) / mean, abs=1e-12)
    assert max_violation(torch.tensor(load, dtype=torch.float32)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "load, match",
    [
        pytest.param(torch.zeros(0, dtype=torch.long), "shape", id="empty"),
        pytest.param(torch.ones(2, 3, dtype=torch.long), "shape", id="2d"),
        pytest.param(torch.tensor([1, -1, 2]), "negative", id="negative"),
        pytest.param(torch.tensor([1.0, float("nan")]), "non-finite", id="nan"),
    ],
)
def test_max_violation_rejects_bad_load(load, match):
    with pytest.raises(ValueError, match=match):
        max_violation(load)


def test_routing_stats_max_violation_property():
    layer = one_hot_router_layer()
    layer(torch.eye(4)[[0, 0, 0, 1]])  # load [3, 1, 0, 0]
    assert layer.stats.load.tolist() == [3, 1, 0, 0]
    assert layer.stats.max_violation == pytest.approx(2.0)
    layer(torch.eye(4))
    assert layer.stats.max_violation == 0.0


def test_score_entropy_formula():
    uniform = torch.full((5, 8), 0.3)  # any positive constant: normalized to 1/8
    assert float(score_entropy(uniform)) == pytest.approx(math.log(8), rel=1e-6)
    one_hot = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.7]])
    assert float(score_entropy(one_hot)) == pytest.approx(0.0, abs=1e-7)
    # sigmoid-style scores that do not sum to 1: [1, 1, 2] -> p = [1/4, 1/4, 1/2] -> H = 1.5 ln 2
    mixed = torch.tensor([[1.0, 1.0, 2.0], [0.5, 0.5, 0.5]])
    assert float(score_entropy(mixed)) == pytest.approx((1.5 * math.log(2) + math.log(3)) / 2, rel=1e-6)
    assert math.isnan(float(score_entropy(torch.zeros(0, 4))))


def test_topk_score_sum_formula():
    uniform = torch.full((3, 8), 0.2)  # normalized to 1/8 each: the top 2 hold 2/8
    assert float(topk_score_sum(uniform, 2)) == pytest.approx(0.25, rel=1e-6)
    concentrated = torch.tensor([[0.0, 0.6, 0.4, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert float(topk_score_sum(concentrated, 2)) == pytest.approx(1.0, rel=1e-6)
    # sigmoid-style scores: [1, 1, 2] -> p = [1/4, 1/4, 1/2], top 1 = 1/2; [3, 1, 0] -> 3/4
    mixed = torch.tensor([[1.0, 1.0, 2.0], [3.0, 1.0, 0.0]])
    assert float(topk_score_sum(mixed, 1)) == pytest.approx((0.5 + 0.75) / 2, rel=1e-6)
    assert float(topk_score_sum(mixed, 3)) == pytest.approx(1.0, rel=1e-6)
    assert math.isnan(float(topk_score_sum(torch.zeros(0, 4), 2)))
    for k in (0, 5):
        with pytest.raises(ValueError, match="k"):
            topk_score_sum(uniform[:, :4], k)


def test_domain_selection_frequency_peak_and_spread():
    # top-2 of 4 experts; code: 10 tokens (20 slots), prose: 5 tokens (10 slots)
    got = domain_selection({"code": torch.tensor([10, 6, 4, 0]), "prose": torch.tensor([0, 0, 5, 5])}, top_k=2)
    assert got["frequency"]["code"] == pytest.approx([1.0, 0.6, 0.4, 0.0])  # every code token took expert 0
    assert got["frequency"]["prose"] == pytest.approx([0.0, 0.0, 1.0, 1.0])
    assert got["peak"] == {"code": pytest.approx(1.0), "prose": pytest.approx(1.0)} and got["uniform"] == 0.5
    # shares [.5, .3, .2, 0] vs [0, 0, .5, .5]: 0.5 * (.5 + .3 + .3 + .5)
    assert got["spread"] == pytest.approx(0.8)
    same = domain_selection({"a": torch.tensor([3, 3]), "b": torch.tensor([1, 1]), "c": torch.tensor([2, 2])}, 1)
    assert same["spread"] == 0.0 and same["frequency"]["b"] == pytest.approx([0.5, 0.5])
    disjoint = domain_selection({"a": torch.tensor([4, 0]), "b": torch.tensor([0, 4])}, 1)
    assert disjoint["spread"] == pytest.approx(1.0)
    assert domain_selection({"only": torch.tensor([1, 2])}, 1)["spread"] is None


@pytest.mark.parametrize(
    "loads, top_k, match",
    [
        pytest.param({}, 1, "at least one", id="no-domain"),
        pytest.param({"a": torch.tensor([1, 2]), "b": torch.tensor([1, 2, 3])}, 1, "one \\[E\\] load", id="sizes"),
        pytest.param({"a": torch.tensor([0, 0])}, 1, "routed slots", id="empty-domain"),
        pytest.param({"a": torch.tensor([1, 2])}, 3, "top_k", id="k-over-E"),
    ],
)
def test_domain_selection_rejects_bad_input(loads, top_k, match):
    with pytest.raises(ValueError, match=match):
        domain_selection(loads, top_k)


def test_routing_stats_cv_property():
    layer = MoELayer(MoEConfig(hidden_size=8, intermediate_size=4, num_experts=4, top_k=2))
    layer(torch.randn(16, 8))
    assert layer.stats.load_cv == pytest.approx(load_cv(layer.stats.load))


# ----------------------------------------------------------------------------- monitor vs hand values


def one_hot_router_layer(**overrides) -> MoELayer:
    """D = E = 4, k = 1, router weight 10 * I: token e (one-hot input) picks expert e."""
    cfg = MoEConfig(hidden_size=4, intermediate_size=4, num_experts=4, top_k=1, **overrides)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.gate.weight.copy_(10 * torch.eye(4))
    return layer


def softmax_row_entropy(logits: list[float]) -> float:
    z = sum(math.exp(v) for v in logits)
    return -sum(math.exp(v) / z * (v - math.log(z)) for v in logits)


def test_monitor_matches_hand_computed_values():
    model = nn.Sequential(one_hot_router_layer(), one_hot_router_layer())
    monitor = RoutingMonitor(model)
    x = torch.eye(4)[[0, 0, 0, 1]]  # tokens to experts 0, 0, 0, 1 -> load [3, 1, 0, 0]
    with torch.no_grad():
        model[0](x)
        model[1](x[:2])  # layer 1 only sees tokens to expert 0 -> load [2, 0, 0, 0]
    rows = monitor.record(step=7)
    assert [r["layer"] for r in rows] == ["0", "1"] and all(r["step"] == 7 for r in rows)
    first, second = rows
    assert first["load"] == [3, 1, 0, 0]
    assert first["max_violation"] == pytest.approx(2.0)
    assert first["max_over_mean"] == pytest.approx(3.0)
    assert first["cv"] == pytest.approx(math.sqrt(1.5))  # deviations 2, 0, -1, -1
    assert first["entropy"] == pytest.approx(softmax_row_entropy([10, 0, 0, 0]), abs=1e-6)  # ~1.5e-3
    assert first["entropy_max"] == pytest.approx(math.log(4))
    top1 = math.exp(10) / (math.exp(10) + 3)  # softmax of [10, 0, 0, 0] at its top expert, k = 1
    assert first["topk_score_sum"] == pytest.approx(top1, rel=1e-6)
    assert first["dropped_fraction"] == 0.0
    assert first["bias_min"] is None and first["bias_max"] is None
    assert first["aux_loss"] is None and first["z_loss"] is None
    assert second["load"] == [2, 0, 0, 0]
    assert second["max_violation"] == pytest.approx(3.0)
    assert second["max_over_mean"] == pytest.approx(4.0)
    assert second["cv"] == pytest.approx(math.sqrt(3))
    assert monitor.history == rows
    monitor.record(step=8)
    assert [r["step"] for r in monitor.history] == [7, 7, 8, 8]
    assert monitor.layers() == ["0", "1"]


def test_monitor_maxvio_batch_over_micro_batches_and_global_over_an_eval_pass(tmp_path):
    model = nn.Sequential(one_hot_router_layer(), one_hot_router_layer())
    monitor = RoutingMonitor(model)
    eye = torch.eye(4)
    with monitor.count() as counter:  # one step of two micro-batches
        model(eye[[0, 0, 0, 1]])  # layer 0 [3, 1, 0, 0]; layer 1 sees layer 0's output: one-hot too
        model(eye[[2, 3]])  # [0, 0, 1, 1]
    first, second = monitor.record(1, counter)
    assert counter.forwards == {"0": 2, "1": 2}
    assert first["load"] == [3, 1, 1, 1]  # summed: mean 1.5, MaxVio (3 - 1.5) / 1.5 = 1
    assert first["max_violation"] == pytest.approx(1.0) and first["max_over_mean"] == pytest.approx(2.0)
    assert second["load"] == counter.loads["1"].tolist() and sum(second["load"]) == 6
    (plain,) = monitor.record(2)[:1]  # without a counter: the last forward only
    assert plain["load"] == [0, 0, 1, 1] and plain["max_violation"] == pytest.approx(1.0)

    model.eval()
    with torch.no_grad(), monitor.evaluate(step=2):
        for tokens in ([0, 1, 1, 1], [1, 1, 2, 3], [0, 1, 2, 3]):
            model(eye[tokens])
    # MaxVio_global: loads summed over the pass, [2, 6, 2, 2]: mean 3, (6 - 3) / 3
    rows = monitor.evaluations
    assert [r["layer"] for r in rows] == ["0", "1"] and rows[0]["load"] == [2, 6, 2, 2]
    assert rows[0]["forwards"] == 3 and rows[0]["max_violation"] == pytest.approx(1.0)
    # every token one-hot: the top-1 score of softmax(10 e_i) in each of the 3 forwards
    assert rows[0]["topk_score_sum"] == pytest.approx(math.exp(10) / (math.exp(10) + 3), rel=1e-6)
    assert monitor.max_violation_global() == {"0": pytest.approx(1.0), "1": rows[1]["max_violation"]}
    # the per-batch MaxVio of the same pass are 2, 1 and 0: their mean is not MaxVio_global
    assert LoadCounter(model).loads == {}  # a counter sees nothing outside its block
    model(eye[[0, 0]])
    assert len(monitor.evaluations) == 2  # the pass ended with its block

    monitor.to_json(tmp_path / "r.json")
    loaded = RoutingMonitor.from_json(tmp_path / "r.json")
    assert loaded.evaluations == monitor.evaluations and loaded.max_violation_global(2)["0"] == pytest.approx(1.0)
    assert RoutingMonitor.from_json(tmp_path / "r.json", until_step=1).evaluations == []
    table = monitor.to_markdown(tmp_path / "r.md")
    assert (tmp_path / "r.md").read_text() == table
    # mean / last MaxVio_batch 1, global 1; top-k (k = 1) score sum of one-hot tokens: softmax(10 e_i) at e_i
    top1 = math.exp(10) / (math.exp(10) + 3)
    assert f"| 0 | 2 | 1.000 | 1.000 | 2.000 | 0.000 | 1.000 | {top1:.3f} |" in table


def test_monitor_evaluate_appends_nothing_when_the_pass_fails():
    layer = one_hot_router_layer()
    monitor = RoutingMonitor(layer)
    with pytest.raises(ValueError), monitor.evaluate(step=0):
        layer(torch.eye(4))
        layer(torch.randn(2, 5))  # wrong width
    assert monitor.evaluations == [] and layer._forward_hooks == {}


def test_monitor_reads_bias_dropped_and_losses():
    biased = one_hot_router_layer(expert_bias=True, bias_update_rate=0.25)
    capped = one_hot_router_layer(capacity_factor=1.0, aux_loss_coef=0.5, z_loss_coef=0.1)
    model = nn.ModuleDict({"biased": biased, "capped": capped})
    monitor = RoutingMonitor(model)
    x = torch.eye(4)[[0, 0, 0, 1]]
    biased(x)  # training mode: counts [3, 1, 0, 0], mean 1
    moe_kit.update_expert_bias(model)  # bias = 0.25 * sign(1 - load) = [-0.25, 0, 0.25, 0.25]
    biased(x)
    capped(x)  # capacity ceil(1.0 * 4 * 1 / 4) = 1 slot per expert: 2 of the 4 slots dropped
    rows = {r["layer"]: r for r in monitor.record(0)}
    assert rows["biased"]["bias_min"] == pytest.approx(-0.25) and rows["biased"]["bias_max"] == pytest.approx(0.25)
    assert rows["capped"]["dropped_fraction"] == pytest.approx(0.5)
    assert rows["capped"]["load"] == [1, 1, 0, 0]
    assert rows["capped"]["aux_loss"] == pytest.approx(capped.stats.aux_loss)
    assert rows["capped"]["z_loss"] == pytest.approx(capped.stats.z_loss)


def test_monitor_entropy_flag_close_and_hash_gate():
    cfg = MoEConfig(hidden_size=8, intermediate_size=4, num_experts=4, top_k=2, hash_routing=True, vocab_size=10)
    model = nn.ModuleDict({"hash": MoELayer(cfg), "plain": MoELayer(cfg.replace(hash_routing=False))})
    x, ids = torch.randn(6, 8), torch.randint(0, 10, (6,))
    with RoutingMonitor(model) as monitor:
        assert model["hash"].gate.track_entropy and model["plain"].gate.track_entropy
        model["hash"](x, ids)
        model["plain"](x)
        rows = {r["layer"]: r for r in monitor.record(0)}
        for name in ("hash", "plain"):
            gate = model[name].gate
            scores = torch.softmax(x @ gate.weight.detach().T, dim=-1)
            expected = float(-(scores * scores.log()).sum(-1).mean())
            assert rows[name]["entropy"] == pytest.approx(expected, rel=1e-5)
            top2 = float(scores.topk(2, dim=-1).values.sum(-1).mean())
            assert rows[name]["topk_score_sum"] == pytest.approx(top2, rel=1e-5)
    assert not model["plain"].gate.track_entropy and model["plain"].gate.entropy is None
    assert model["plain"].gate.topk_score_sum is None
    quiet = RoutingMonitor(model, entropy=False)
    model["plain"](x)
    assert all(r["entropy"] is None and r["topk_score_sum"] is None for r in quiet.record(1))
    with quiet.evaluate(2):
        model["plain"](x)
    assert quiet.evaluations[0]["topk_score_sum"] is None


def test_monitor_topk_score_sum_of_expert_choice_and_sigmoid_gates():
    cfg = MoEConfig(hidden_size=8, intermediate_size=4, num_experts=4, top_k=2)
    model = nn.ModuleDict({"ec": MoELayer(cfg.replace(routing="expert_choice", capacity_factor=2.0)),
                           "sigmoid": MoELayer(cfg.replace(score_func="sigmoid"))})
    x = torch.randn(6, 8)
    with RoutingMonitor(model) as monitor:
        for layer in model.values():
            layer(x)
        rows = {r["layer"]: r for r in monitor.record(0)}
    for name, act in (("ec", lambda z: torch.softmax(z, -1)), ("sigmoid", torch.sigmoid)):
        scores = act(x @ model[name].gate.weight.detach().T)
        probs = scores / scores.sum(-1, keepdim=True)
        assert rows[name]["topk_score_sum"] == pytest.approx(float(probs.topk(2, -1).values.sum(-1).mean()), rel=1e-5)


def test_monitor_skips_layers_without_a_forward_and_needs_a_model():
    model = nn.ModuleDict({"ran": one_hot_router_layer(), "idle": one_hot_router_layer()})
    monitor = RoutingMonitor(model)
    model["ran"](torch.eye(4))
    assert [r["layer"] for r in monitor.record(0)] == ["ran"]
    with pytest.raises(ValueError, match="no model"):
        RoutingMonitor().record(0)


def test_monitor_empty_batch_is_json_safe(tmp_path):
    layer = one_hot_router_layer()
    monitor = RoutingMonitor(layer)
    layer(torch.zeros(0, 4))
    (row,) = monitor.record(0)
    assert row["load"] == [0, 0, 0, 0]
    assert row["max_over_mean"] is None and row["cv"] is None and row["entropy"] is None
    monitor.to_json(tmp_path / "h.json")
    assert "NaN" not in (tmp_path / "h.json").read_text()


def test_json_round_trip(tmp_path):
    model = nn.Sequential(one_hot_router_layer(expert_bias=True), one_hot_router_layer())
    monitor = RoutingMonitor(model)
    for step in range(3):
        model(torch.randn(10, 4))
        moe_kit.update_expert_bias(model)
        monitor.record(step)
    path = tmp_path / "routing.json"
    monitor.to_json(path, run="demo")
    data = json.loads(path.read_text())
    assert data["run"] == "demo" and len(data["history"]) == 6
    loaded = RoutingMonitor.from_json(path)
    assert loaded.history == monitor.history
    assert loaded.model is None and loaded.layers() == ["0", "1"]


def test_from_json_resumes_recording_after_a_restart(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(one_hot_router_layer(), one_hot_router_layer())
    monitor = RoutingMonitor(model)
    for step in range(5):
        model(torch.randn(10, 4))
        monitor.record(step)
    path = tmp_path / "routing.json"
    monitor.to_json(path, run="demo")
    # the run restarts from a checkpoint of step 2 with a freshly built model
    fresh = nn.Sequential(one_hot_router_layer(), one_hot_router_layer())
    resumed = RoutingMonitor.from_json(path, model=fresh, until_step=2)
    assert resumed.last_step == 2 and resumed.history == monitor.history[:6]
    assert all(layer.gate.track_entropy for layer in fresh)  # records entropy again, like a new monitor
    for step in range(3, 5):
        fresh(torch.randn(10, 4))
        resumed.record(step)
    assert [r["step"] for r in resumed.history] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    resumed.to_json(path)
    again = json.loads(path.read_text())
    assert again["run"] == "demo" and len(again["history"]) == 10
    with pytest.raises(ValueError, match="no layers named"):
        RoutingMonitor.from_json(path, model=nn.Sequential(one_hot_router_layer()))


# ----------------------------------------------------------------------------- plots


def test_load_matrix_is_load_over_mean():
    history = [
        dict(step=1, layer="a", load=[3, 1, 0, 0]),
        dict(step=2, layer="a", load=[1, 1, 1, 1]),
        dict(step=2, layer="b", load=[0, 6]),
    ]
    steps, layers, blocks = load_matrix(history)
    assert steps.tolist() == [1, 2] and layers == ["a", "b"]
    assert blocks[0].tolist() == [[3.0, 1.0], [1.0, 1.0], [0.0, 1.0], [0.0, 1.0]]
    assert math.isnan(blocks[1][0, 0]) and blocks[1][:, 1].tolist() == [0.0, 2.0]


def test_plots_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    model = nn.Sequential(one_hot_router_layer(), one_hot_router_layer())
    monitor = RoutingMonitor(model)
    for step in range(4):
        model(torch.randn(12, 4))
        monitor.record(step)
    with monitor.evaluate(3):
        model(torch.randn(12, 4))
    monitor.plot(tmp_path / "one.png", title="one run")
    plot_routing({"a": monitor.history, "b": monitor.history[:4]}, tmp_path / "two.png", metric="cv")
    for name in ("one.png", "two.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


# ----------------------------------------------------------------------------- the collapse example


def test_routing_collapse_example_smoke(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import routing_collapse
    finally:
        sys.path.pop(0)
    out = tmp_path / "collapse"
    routing_collapse.main(["--steps", "4", "--out", str(out), "--layers", "2", "--batch", "4", "--seq", "16"])
    data = json.loads((out / "collapse.json").read_text())
    assert {"none", "aux_loss", "noaux_tc"} <= set(data["modes"])  # the example may compare more schemes
    for mode, result in data["modes"].items():
        assert result["max_over_mean_load"] >= 1.0
        assert math.isfinite(result["loss"]) and math.isfinite(result["eval_loss"])
        assert len(result["loss_curve"]) == 4
        assert len(result["history"]) == 4 * 2  # steps x layers
        assert data["summary"][mode]["max_over_mean_load"] == result["max_over_mean_load"]
    if _has_matplotlib():
        for name in ("collapse.png", "load_none.png", "load_aux_loss.png", "load_noaux_tc.png"):
            assert (out / name).read_bytes().startswith(PNG_MAGIC)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
