"""benchmarks/moe_bench.py: the sweep's output schema, its providers, and the output check that
must refuse to time a backend that computes something else."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import moe_bench  # noqa: E402

from moe_kit import MoEConfig, MoELayer  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = ["--repeats", "1", "--warmup", "0", "--quiet"]


def run(tmp_path, *args) -> dict:
    return moe_bench.main([*args, "--out", str(tmp_path), *FAST])


def test_tiny_sweep_writes_json_markdown_and_png(tmp_path):
    data = run(tmp_path, "--preset", "tiny", "--tokens", "32,64", "--device", "cpu", "--pass", "both")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(data["rows"]))
    env = saved["environment"]
    for key in ("device", "device_name", "torch", "triton", "date", "threads", "command"):
        assert key in env
    assert env["device"] == "cpu" and env["torch"] == torch.__version__

    hf = ["hf_eager", "hf_grouped_mm", "hf_batched_mm"]
    providers = [f"moe_kit_{b}" for b in moe_bench.available_backends(torch.device("cpu"))] + hf + ["dense"]
    assert {"moe_kit_torch", "moe_kit_loop"} <= set(providers)
    cells = {(r["backend"], r["pass"], r["tokens"]) for r in saved["rows"]}
    assert cells == {(p, s, t) for p in providers for s in ("fwd", "fwdbwd") for t in (32, 64)}
    assert len(saved["rows"]) == len(cells)
    for row in saved["rows"]:
        for key in ("backend", "pass", "tokens", "ms", "tflops", "ms_min", "ms_max", "samples_ms"):
            assert key in row
        assert row["ms_min"] <= row["ms"] <= row["ms_max"] and row["tflops"] > 0
        assert row["tflops"] == pytest.approx(row["flops"] / row["ms"] / 1e9)
        if row["backend"] == "dense":
            assert row["max_rel_err"] is None
        else:
            assert 0 <= row["max_rel_err"] <= 1e-4
    fwd = next(r for r in saved["rows"] if r["pass"] == "fwd" and r["tokens"] == 32)
    bwd = next(r for r in saved["rows"] if r["pass"] == "fwdbwd" and r["tokens"] == 32)
    assert fwd["flops"] == 6 * 32 * 64 * 2 * 32 and bwd["flops"] == 3 * fwd["flops"]

    table = (tmp_path / "results.md").read_text()
    assert table.startswith("**tiny**") and "| pass | tokens | provider |" in table
    assert table.count("\n| fwd |") == 2 * len(providers) and "hf_eager" in table
    assert (tmp_path / "results.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    "preset, extra",
    [
        pytest.param("deepseek-v3", [], id="sigmoid-groups-bias-shared"),
        pytest.param("deepseek-v4", ["--layer-id", "0"], id="hash-sqrtsoftplus-clamp"),
    ],
)
def test_routing_hf_lacks_goes_through_the_moe_kit_gate(tmp_path, preset, extra):
    data = run(tmp_path, "--preset", preset, "--scale", "0.01", "--tokens", "24", "--pass", "fwdbwd",
               "--backends", "torch", "--hf", "eager,grouped_mm", *extra)
    assert data["config"]["hf_eager_routing"] == "HF providers take moe_kit's routing"
    assert {r["backend"] for r in data["rows"]} == {"moe_kit_torch", "hf_eager", "hf_grouped_mm", "dense"}
    assert all(r["max_rel_err"] <= 1e-4 for r in data["rows"] if r["backend"] != "dense")
    if preset == "deepseek-v4":
        assert data["config"]["hash_routed"]


def test_bf16_check_uses_the_bf16_tolerance(tmp_path):
    data = run(tmp_path, "--preset", "tiny", "--tokens", "48", "--pass", "fwd", "--dtype", "bfloat16")
    errors = [r["max_rel_err"] for r in data["rows"] if r["backend"] != "dense"]
    assert max(errors) <= 2e-2 and data["environment"]["dtype"] == "bfloat16"


def test_a_broken_backend_is_refused_before_timing(tmp_path, monkeypatch):
    real = moe_bench.make_providers

    class OffByOnePermille(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, input_ids=None):
            return self.inner(x, input_ids) * 1.001

    def broken(layer, backends, hf=()):
        providers = real(layer, backends, hf)
        providers["moe_kit_torch"] = OffByOnePermille(providers["moe_kit_torch"])
        return providers

    monkeypatch.setattr(moe_bench, "make_providers", broken)
    with pytest.raises(moe_bench.OutputMismatch, match="moe_kit_torch: output differs"):
        run(tmp_path, "--preset", "tiny", "--tokens", "32", "--pass", "fwd")
    assert not (tmp_path / "results.json").exists()


def test_render_rebuilds_table_and_plot_from_json(tmp_path, capsys):
    run(tmp_path, "--preset", "tiny", "--tokens", "16", "--pass", "fwd", "--backends", "torch")
    table = (tmp_path / "results.md").read_text()
    (tmp_path / "results.md").unlink()
    (tmp_path / "results.png").unlink()
    moe_bench.main(["--render", str(tmp_path)])
    assert (tmp_path / "results.md").read_text() == table
    assert (tmp_path / "results.png").read_bytes().startswith(PNG_MAGIC)
    said = capsys.readouterr().out
    assert "wrote" in said and str(tmp_path / "results.md") in said and str(tmp_path / "results.png") in said


def test_hf_providers_and_batched_mm_limit(tmp_path):
    """hf_grouped_mm (HF's default) is the headline column; hf_batched_mm is skipped where its copies are too big."""
    data = run(tmp_path, "--preset", "tiny", "--tokens", "8,64", "--pass", "fwd", "--backends", "torch",
               "--hf", "grouped_mm,batched_mm", "--batched-mm-limit-gib", str(40 * 3 * 32 * 64 * 4 / 2**30))
    cells = {(r["backend"], r["tokens"]) for r in data["rows"]}
    assert ("hf_batched_mm", 8) in cells and ("hf_batched_mm", 64) not in cells and ("hf_grouped_mm", 64) in cells
    assert data["skipped"] == [dict(provider="hf_batched_mm", tokens=64, reason=data["skipped"][0]["reason"])]
    assert "speed-up vs hf_grouped_mm (HF default)" in (tmp_path / "results.md").read_text()


def test_hf_providers_are_transformers_own_block_where_it_applies():
    """For Qwen3-MoE / Mixtral-shaped routing the HF providers are transformers' own sparse block
    (router module + experts module dispatching to each implementation) on the layer's parameters,
    in the mode each pass runs in; elsewhere HF's experts functions behind moe_kit's routing."""
    from baselines import HFBlock, HFEagerLoop, HFExperts

    layer = MoELayer(moe_bench.build_config("qwen3-30b-a3b", 0.03))
    providers = moe_bench.make_providers(layer, ["torch"], ("eager", "grouped_mm", "batched_mm"))
    for name in ("hf_eager", "hf_grouped_mm", "hf_batched_mm"):
        block = providers[name]
        assert isinstance(block, HFBlock) and block.block.gate.weight is layer.gate.weight, name
        assert block.block.experts.config._experts_implementation == name[3:]
    x = torch.randn(5, layer.cfg.hidden_size)
    with torch.no_grad():
        ref = layer.eval()(x)
        for name in ("hf_eager", "hf_grouped_mm", "hf_batched_mm"):
            torch.testing.assert_close(providers[name](x), ref, rtol=1e-5, atol=1e-6)
    moe_bench.timed_call(layer, x, None, None, "fwd")
    assert not layer.training
    moe_bench.timed_call(layer, x, None, torch.ones_like(x), "fwdbwd")
    assert layer.training
    other = moe_bench.make_providers(MoELayer(moe_bench.build_config("deepseek-v3", 0.01)), ["torch"],
                                     ("eager", "grouped_mm"))
    assert isinstance(other["hf_eager"], HFEagerLoop) and isinstance(other["hf_grouped_mm"], HFExperts)


def test_progress_estimates_time_left():
    progress = moe_bench.Progress(10, enabled=False)
    assert progress.eta() == "?"
    progress.start -= 5.0  # 5 s for the first 2 units: 20 s for the 8 left
    progress.update(2)
    assert progress.eta() in ("20s", "19s", "21s")


def test_gemm_rate_and_bad_arguments(tmp_path):
    data = run(tmp_path, "--preset", "tiny", "--tokens", "16", "--pass", "fwd", "--gemm-size", "64", "--no-hf")
    assert data["dense_gemm"]["size"] == 64 and data["dense_gemm"]["tflops"] > 0
    assert {r["backend"] for r in data["rows"]} == {"moe_kit_torch", "moe_kit_loop", "dense"}
    assert "Device dense GEMM rate" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit):
        run(tmp_path, "--preset", "tiny", "--tokens", "16", "--backends", "triton")
    with pytest.raises(SystemExit):
        run(tmp_path, "--preset", "not-a-model", "--tokens", "16")


def test_scaled_presets_keep_routing_and_shrink_sizes():
    qwen = moe_bench.build_config("qwen3-30b-a3b", 0.125)
    assert (qwen.hidden_size, qwen.intermediate_size, qwen.num_experts, qwen.top_k) == (256, 96, 128, 8)
    mixtral = moe_bench.build_config("mixtral-8x7b", 0.125)
    assert (mixtral.hidden_size, mixtral.intermediate_size) == (512, 1792)
    assert mixtral.aux_loss_coef == 0.0 and mixtral.norm_topk_prob
    v3 = moe_bench.build_config("deepseek-v3", 0.125)
    full = MoEConfig.preset("deepseek-v3")
    assert v3.shared_intermediate_size == 256 and v3.n_groups == full.n_groups and v3.route_scale == full.route_scale
    assert {"mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3", "deepseek-v4", "tiny"} <= set(moe_bench.PRESET_NAMES)


def test_cpu_layer_writes_json_and_markdown(tmp_path, capsys):
    import cpu_layer

    data = cpu_layer.main(["--hidden", "32", "--inter", "16", "--experts", "8", "--top-k", "2", "--fwd-tokens", "1,3",
                           "--fwdbwd-tokens", "16", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(data["rows"]))
    cells = {(r["provider"], r["pass"], r["tokens"]) for r in saved["rows"]}
    providers = {"moe_kit", "hf_block+moe_kit_experts", "hf_grouped_mm", "hf_batched_mm", "hf_eager", "dense"}
    assert cells == {(p, s, t) for p in providers for s, t in (("fwd", 1), ("fwd", 3), ("fwdbwd", 16))}
    assert all(r["max_rel_err"] <= 1e-4 for r in saved["rows"] if r["provider"] != "dense")
    table = (tmp_path / "results.md").read_text()
    assert "| fwd | 1 | hf_grouped_mm |" in table and "target" not in table
    assert "fwd T=1: moe_kit" in capsys.readouterr().err  # progress on stderr


def test_memory_benchmark_reports_the_ratio(tmp_path):
    import memory

    out = memory.main(["--tokens", "256", "--hidden", "32", "--inter", "16", "--experts", "4", "--top-k", "2",
                       "--variants", "dense,moe_kit", "--json", str(tmp_path / "memory.json"), "--quiet"])
    rows = {r["variant"]: r for r in out["rows"]}
    assert set(rows) == {"dense", "moe_kit"}
    assert rows["moe_kit"]["saved_mib"] > 0 and out["ratio"] is not None
    # moe_kit keeps h [N*k, 2I] (plus small plan tensors); the dense MLP keeps h, act and silu(gate) of width k*I
    assert rows["moe_kit"]["saved_mib"] < rows["dense"]["saved_mib"]
    assert json.loads((tmp_path / "memory.json").read_text())["ratio"] == out["ratio"]


def test_balance_study_runs_every_arm_end_to_end(tmp_path):
    import balance_study

    data = balance_study.main(["--steps", "2", "--seeds", "0", "--models", "e8k2,e32k4s1", "--dim", "16",
                               "--heads", "2", "--layers", "1", "--seq", "8", "--micro-batch", "2", "--accum", "2",
                               "--val-tokens", "32", "--threads", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(data["summary"]))
    runs = {(r["model"], r["arm"]): r for r in saved["runs"]}
    assert set(runs) == {(m, a) for m in ("e8k2", "e32k4s1") for a in balance_study.ARMS}
    for run in saved["runs"]:
        assert len(run["loss_curve"]) == len(run["maxvio_batch_curve"]) == 2
        assert run["val_ppl"] == pytest.approx(math.exp(run["val_loss"])) and 1 < run["val_ppl"] < 256 * 4
        assert run["maxvio_global"] == pytest.approx(sum(run["maxvio_global_per_layer"].values()) / 1)
        assert 0 <= run["maxvio_global"] <= run["maxvio_global_worst"] + 1e-12
        assert run["dropped_share"] == 0.0  # every arm is dropless; expert choice reports unrouted instead
        assert (run["unrouted_share"] is not None) == (run["arm"] == "expert_choice")
    assert runs["e8k2", "expert_choice"]["maxvio_global"] == 0.0  # C tokens per expert by construction
    assert runs["e8k2", "lossfree_scaled"]["bias_update_rate"] == pytest.approx(1e-3 * 1000 / 2)
    assert runs["e8k2", "lossfree_u1e-3"]["bias_update_rate"] == pytest.approx(1e-3)
    table = (tmp_path / "results.md").read_text()
    assert "| e32k4s1 | global_batch |" in table and "pydoc_data.topics" in table
    assert (tmp_path / "results.png").read_bytes().startswith(PNG_MAGIC)
    (tmp_path / "results.md").unlink()
    balance_study.main(["--render", str(tmp_path)])
    assert (tmp_path / "results.md").read_text() == table
    for run in saved["runs"]:  # the router's top-k score sum lies between uniform scores (k/E) and 1
        assert run["topk_score_sum_uniform"] - 1e-6 <= run["topk_score_sum"] <= 1 + 1e-6
        assert run["domain_spread"] is None and set(run["domain_ppl"]) == {"prose"}


def test_balance_study_mixed_corpus_measures_domain_specialization(tmp_path):
    import balance_study

    arms = "none,aux_1e-3,global_batch,global_batch_1e-2"
    data = balance_study.main(["--steps", "2", "--seeds", "0", "--models", "e8k2", "--dim", "16", "--heads", "2",
                               "--layers", "2", "--seq", "8", "--micro-batch", "2", "--accum", "2", "--corpus", "mixed",
                               "--arms", arms, "--val-tokens", "32", "--out", str(tmp_path)])
    assert set(data["data"]["train_bytes"]) == {"prose", "code"} and data["data"]["corpus"] == "mixed"
    assert data["data"]["val_tokens_per_pass"] == {"prose": 32, "code": 32}
    for run in data["runs"]:
        assert 0.0 <= run["domain_spread"] <= 1.0
        assert run["domain_peak"] >= 2 / 8 - 1e-9  # the largest of E frequencies whose mean is k/E
        # overall validation loss: the token-weighted mean of the two domains' (equal token counts)
        assert run["val_loss"] == pytest.approx(sum(math.log(p) for p in run["domain_ppl"].values()) / 2)
    cfg = balance_study.arm_config("global_batch_1e-2", "e8k2", balance_study.parse_args([]))
    assert (cfg.aux_loss_coef, cfg.aux_loss_type) == (1e-2, "global_batch")
    table = (tmp_path / "results.md").read_text()
    assert "domain spread (peak)" in table and "stdlib argparse.py" in table and "| e8k2 | global_batch_1e-2 |" in table


def test_balance_study_code_domain_is_python_source():
    import balance_study

    corpus = balance_study.load_corpus("mixed")
    assert corpus["prose"] == balance_study.load_text()
    code = corpus["code"].decode("utf-8")
    assert len(code) > 300_000 and "def " in code and "class ArgumentParser" in code
    with pytest.raises(ValueError, match="corpus"):
        balance_study.load_corpus("poetry")


def test_balance_study_arms_and_data():
    import balance_study

    args = balance_study.parse_args(["--steps", "500"])
    cfg = {arm: balance_study.arm_config(arm, "e32k4s1", args) for arm in balance_study.ARMS}
    assert cfg["none"].aux_loss_coef == 0 and not cfg["none"].expert_bias and cfg["none"].num_shared_experts == 1
    assert (cfg["aux_1e-2"].aux_loss_coef, cfg["aux_1e-2"].aux_loss_type) == (1e-2, "global")
    assert (cfg["aux_1e-3"].aux_loss_coef, cfg["global_batch"].aux_loss_type) == (1e-3, "global_batch")
    assert cfg["lossfree_scaled"].bias_update_rate == pytest.approx(2e-3) and cfg["lossfree_scaled"].expert_bias
    assert (cfg["aux_z"].aux_loss_coef, cfg["aux_z"].z_loss_coef) == (1e-3, 1e-3)
    assert (cfg["expert_choice"].routing, cfg["expert_choice"].capacity_factor) == ("expert_choice", 4.0)
    assert cfg["sinkhorn"].routing == "sinkhorn"
    text = balance_study.load_text()
    assert len(text) > 400_000 and b"The" in text  # the standard library's English documentation
    train, val = balance_study.split_bytes(text, 0.1)
    assert len(train) + len(val) == len(text) and len(val) == len(text) - int(len(text) * 0.9)
    (inputs, targets), *_ = balance_study.val_batches(val, 4, 16, 64)
    assert inputs.shape == (4, 16) and torch.equal(inputs[0, 1:], targets[0, :-1])
    assert torch.equal(inputs[1, 0:1], targets[0, -1:])  # consecutive windows
    with pytest.raises(SystemExit):
        balance_study.parse_args(["--arms", "nope"])
