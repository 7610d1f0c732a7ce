"""Expert parallelism over gloo on CPU: `MoELayer(cfg, ep_group=group)` on W = 2 and 4 processes
against one process holding every expert, fed the batch concatenated in rank order.

One spawn per world size: every rank runs every case and saves what it saw (outputs, gradients,
stats, gathered state dict); the test process recomputes the single-process reference and compares.
Each rank feeds a differently sized batch, one rank none at all, and some rank sends no token to
some expert (checked below, not hoped for).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import partial

import conftest
import pytest
import torch
import torch.distributed as dist
from gloo_ranks import run_ranks

import moe_kit
from moe_kit import MoEConfig, MoELayer
from moe_kit.distributed import (
    all_reduce_gradients,
    broadcast_parameters,
    full_state_dict,
    init_expert_parallel,
    shard_state_dict,
)

D, INTER = 16, 12
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Case:
    cfg: dict
    sizes: dict  # world size -> per-rank leading size (tokens, or sequences when `seq` is set)
    dtype: torch.dtype = torch.float64
    seq: int | None = None  # x is [B_r, seq, D] when set, else [N_r, D]
    zero_gate: bool = False  # all router scores equal: every weight ties
    masked: bool = False  # a token_mask with some padding on every rank with tokens


CASES = {
    "softmax-k2-aux-z": Case(
        dict(num_experts=8, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01), {2: (11, 3), 4: (6, 0, 13, 3)}
    ),
    "sigmoid-groups-bias-shared": Case(
        dict(num_experts=8, top_k=3, score_func="sigmoid", n_groups=4, topk_groups=2, route_scale=2.5,
             expert_bias=True, num_shared_experts=1, shared_expert_gate=True),
        {2: (9, 0), 4: (5, 8, 0, 2)},
    ),
    "capacity": Case(
        dict(num_experts=8, top_k=2, capacity_factor=1.0, aux_loss_coef=0.05), {2: (12, 5), 4: (7, 2, 10, 0)}
    ),
    "capacity-ties": Case(dict(num_experts=4, top_k=1, capacity_factor=1.0), {2: (5, 3), 4: (2, 3, 0, 4)},
                          zero_gate=True),
    # drop_policy "position" on [B, S] input: sequence-major over the rank-ordered batch, as one process
    "capacity-position-seq": Case(
        dict(num_experts=8, top_k=2, capacity_factor=1.0, drop_policy="position"), {2: (3, 2), 4: (2, 0, 3, 1)},
        seq=5,
    ),
    "capacity-position-mask": Case(
        dict(num_experts=4, top_k=2, capacity_factor=1.0, drop_policy="position", aux_loss_coef=0.1),
        {2: (9, 6), 4: (5, 0, 7, 4)}, masked=True,
    ),
    "pad-to-capacity-probs-mask": Case(  # every local expert GEMM on exactly C rows (checked below)
        dict(num_experts=8, top_k=2, capacity_factor=1.0, pad_to_capacity=True, backend="torch"),
        {2: (3, 2), 4: (2, 1, 0, 3)}, seq=4, masked=True,
    ),
    "sequence-aux": Case(
        dict(num_experts=8, top_k=2, aux_loss_coef=0.1, aux_loss_type="sequence", z_loss_coef=0.01),
        {2: (3, 1), 4: (2, 0, 3, 1)}, seq=4,
    ),
    "hash-loop-limit-fp32": Case(
        dict(num_experts=4, top_k=2, hash_routing=True, vocab_size=50, swiglu_limit=0.5, backend="loop"),
        {2: (7, 4), 4: (3, 5, 0, 6)}, dtype=torch.float32,
    ),
    "torch-fp32-shared": Case(
        dict(num_experts=8, top_k=2, num_shared_experts=1, backend="torch"), {2: (10, 6), 4: (4, 9, 0, 5)},
        dtype=torch.float32,
    ),
    "bf16-model-shared": Case(
        dict(num_experts=8, top_k=2, num_shared_experts=1, aux_loss_coef=0.1), {2: (12, 7), 4: (6, 0, 9, 4)},
        dtype=torch.bfloat16,
    ),
    "gpt-oss-experts": Case(  # expert biases (sharded / gathered by the state-dict helpers), router bias
        dict(num_experts=8, top_k=2, activation="swiglu_oai", swiglu_limit=1.0, expert_proj_bias=True,
             router_bias=True), {2: (8, 5), 4: (3, 0, 7, 2)},
    ),
}
DP_X_EP = Case(dict(num_experts=8, top_k=2, num_shared_experts=1), {4: (5, 9, 0, 4)})


# ----------------------------------------------------------------------------- shared by both sides


def make_cfg(case: Case) -> MoEConfig:
    extra = {"router_dtype": torch.float64} if case.dtype == torch.float64 else {}
    return MoEConfig(hidden_size=D, intermediate_size=INTER, **case.cfg, **extra)


def build_full(case: Case) -> MoELayer:
    """The single-process layer holding every expert (the weights every rank shards from)."""
    torch.manual_seed(0)
    layer = MoELayer(make_cfg(case)).to(case.dtype)
    with torch.no_grad():
        if layer.gate.expert_bias is not None:
            layer.gate.expert_bias.copy_(0.05 * torch.randn(layer.cfg.num_experts))
        if case.zero_gate:
            layer.gate.weight.zero_()
        for bias in (layer.gate.bias, getattr(layer.experts, "gate_up_proj_bias", None),
                     getattr(layer.experts, "down_proj_bias", None)):
            if bias is not None:  # zero at init: give them values that show up in every output
                bias.copy_(0.3 * torch.randn(bias.shape))
    return layer


def rank_inputs(name: str, case: Case, world: int, rank: int):
    """(x, input_ids or None, cotangent, token_mask or None) of `rank`; the same on both sides."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{world}/{rank}".encode()))
    lead = (case.sizes[world][rank],) if case.seq is None else (case.sizes[world][rank], case.seq)
    x = torch.randn(*lead, D, generator=gen, dtype=torch.float64).to(case.dtype)
    ids = torch.randint(0, case.cfg["vocab_size"], lead, generator=gen) if case.cfg.get("hash_routing") else None
    cot = torch.randn(*lead, D, generator=gen, dtype=torch.float64).to(case.dtype)
    mask = torch.rand(lead, generator=gen) < 0.7 if case.masked else None
    return x, ids, cot, mask


def run_layer(layer, x, ids, cot, mask=None, requires_grad=True):
    x = x.clone().requires_grad_(requires_grad)
    layer.train()
    out = layer(x, ids, token_mask=mask)
    (out * cot).sum().backward()
    return x, out


# ----------------------------------------------------------------------------- the ranks


def _run_case(name: str, case: Case, world: int, rank: int, requires_grad: bool = True) -> dict:
    group = dist.group.WORLD
    full = build_full(case)
    layer = MoELayer(make_cfg(case), ep_group=group).to(case.dtype)
    layer.load_state_dict(shard_state_dict(full.state_dict(), layer))
    x_in, ids, cot, mask = rank_inputs(name, case, world, rank)
    with conftest.BmmShapes() as gemms:
        x, out = run_layer(layer, x_in, ids, cot, mask, requires_grad)
    stats = layer.stats
    moe_kit.update_expert_bias(layer, group)
    gathered = full_state_dict(layer)
    layer.eval()
    with torch.no_grad():
        out_eval = layer(x_in, ids, token_mask=mask)
    return dict(
        gemm_shapes=gemms.shapes, sent=(layer.dispatcher.sent_rows, layer.dispatcher.sent_bytes,
                                        sum(layer.dispatcher.send_splits)),
        out=out.detach(), out_eval=out_eval, grad_x=x.grad,
        grads={n: p.grad for n, p in layer.named_parameters()},
        load=stats.load, aux=stats.aux_loss, z=stats.z_loss, dropped=stats.dropped_fraction,
        bias=None if layer.gate.expert_bias is None else layer.gate.expert_bias.clone(),
        state=gathered if rank == 0 else None,
    )


def _run_dp_x_ep(rank: int) -> dict:
    """W = 4 as DP 2 x EP 2: broadcast replicas, step, all-reduce gradients over the right groups."""
    groups = init_expert_parallel(2)
    full = build_full(DP_X_EP)
    layer = MoELayer(make_cfg(DP_X_EP), ep_group=groups.ep_group).to(DP_X_EP.dtype)
    layer.load_state_dict(shard_state_dict(full.state_dict(), layer))
    with torch.no_grad():  # spoil the replicas that broadcast_parameters must overwrite
        if rank == 3:
            layer.gate.weight.add_(1.0)
        if groups.dp_rank == 1:
            layer.experts.down_proj.mul_(2.0)
    broadcast_parameters(layer, groups)
    x, out = run_layer(layer, *rank_inputs("dp-x-ep", DP_X_EP, 4, rank))
    all_reduce_gradients(layer, groups)
    return dict(out=out.detach(), grads={n: p.grad for n, p in layer.named_parameters()},
                ep_rank=groups.ep_rank, dp_rank=groups.dp_rank)


def _rank_results(rank: int, world: int) -> dict:
    results = {name: _run_case(name, case, world, rank) for name, case in CASES.items()}
    results["mixed-requires-grad"] = _run_case(
        "softmax-k2-aux-z", CASES["softmax-k2-aux-z"], world, rank, requires_grad=rank == 0
    )
    try:
        MoELayer(MoEConfig(hidden_size=D, intermediate_size=INTER, num_experts=2 * world - 1, top_k=1),
                 ep_group=dist.group.WORLD)
        results["error"] = None
    except ValueError as err:
        results["error"] = str(err)
    if world == 4:
        results["dp-x-ep"] = _run_dp_x_ep(rank)
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def ranks(request, tmp_path_factory):
    """(world, [results of rank 0, 1, ...]) from one spawn of `world` gloo processes."""
    world = request.param
    return world, run_ranks(_rank_results, world, tmp_path_factory.mktemp(f"ep{world}"))


# ----------------------------------------------------------------------------- the reference side


rel_err = partial(conftest.rel_err, floor=1e-2)  # floor: see conftest.rel_err


def reference(name: str, case: Case, world: int):
    """Single-process layer on the concatenated batch: (layer after the bias update, x, out, out_eval, stats)."""
    layer = build_full(case)
    parts = [rank_inputs(name, case, world, r) for r in range(world)]
    x_in = torch.cat([p[0] for p in parts])
    ids = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
    mask = None if parts[0][3] is None else torch.cat([p[3] for p in parts])
    x, out = run_layer(layer, x_in, ids, torch.cat([p[2] for p in parts]), mask)
    stats = layer.stats
    moe_kit.update_expert_bias(layer)
    layer.eval()
    with torch.no_grad():
        out_eval = layer(x_in, ids, token_mask=mask)
    return layer, x, out, out_eval, stats


def combine_grads(results: list[dict], name: str) -> torch.Tensor:
    """Expert weights: concatenate the ranks' slices; replicated weights: sum the rank-local grads."""
    grads = [r["grads"][name] for r in results]
    return torch.cat(grads) if name.startswith("experts.") else torch.stack(grads).sum(0)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_single_process(ranks, name):
    world, all_results = ranks
    case = CASES[name]
    results = [r[name] for r in all_results]
    ref, x, out, out_eval, stats = reference(name, case, world)
    tol = TOL[case.dtype]
    assert rel_err(torch.cat([r["out"] for r in results]), out) <= tol
    assert rel_err(torch.cat([r["grad_x"] for r in results]), x.grad) <= tol
    for pname, p in ref.named_parameters():
        assert rel_err(combine_grads(results, pname), p.grad) <= tol, pname
    assert rel_err(torch.cat([r["out_eval"] for r in results]), out_eval) <= tol  # no-grad, after the bias step
    for r in results:  # statistics are the group's, identical on every rank
        assert torch.equal(r["load"], stats.load)
        assert r["dropped"] == pytest.approx(stats.dropped_fraction, abs=1e-12)
        for got, want in ((r["aux"], stats.aux_loss), (r["z"], stats.z_loss)):
            assert (got is None) == (want is None)
            if want is not None:
                assert got == pytest.approx(want, rel=1e-9 if case.dtype == torch.float64 else 1e-4)
        if ref.gate.expert_bias is not None:
            assert torch.equal(r["bias"], ref.gate.expert_bias)
    state = all_results[0][name]["state"]  # full_state_dict gathers the experts back
    assert state.keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert torch.equal(state[key], value), key


def rank_counts(name: str, case: Case, world: int) -> list[torch.Tensor]:
    """Per rank: slots it routes to each expert ([E] each), from the replicated gate."""
    gate = build_full(case).gate
    counts = []
    for r in range(world):
        x, ids, _, mask = rank_inputs(name, case, world, r)
        with torch.no_grad():
            _, idx = gate(x, input_ids=ids)
        if mask is not None:
            idx = idx[mask.reshape(-1)]
        counts.append(torch.bincount(idx.reshape(-1), minlength=case.cfg["num_experts"]))
    return counts


def test_cases_cover_edge_routing(ranks):
    """In each world some rank has no tokens, some rank with tokens sends none to some expert (the
    ranks' batches differ in size), and every capacity case really drops slots."""
    world, _ = ranks
    empty_rank = skipped_expert = False
    for name, case in CASES.items():
        sizes = case.sizes[world]
        assert len(set(sizes)) > 1, name
        empty_rank |= 0 in sizes
        counts = rank_counts(name, case, world)
        skipped_expert |= any(size > 0 and bool((c == 0).any()) for size, c in zip(sizes, counts, strict=True))
        if case.cfg.get("capacity_factor") is not None:
            assert reference(name, case, world)[4].dropped_fraction > 0, name
    assert empty_rank and skipped_expert


def test_capacity_ties_keep_the_first_slots_in_rank_order(ranks):
    """Equal weights everywhere: the expert keeps the first C slots of the rank-ordered batch."""
    world, all_results = ranks
    case = CASES["capacity-ties"]
    out = torch.cat([r["capacity-ties"]["out"] for r in all_results])
    total = sum(case.sizes[world])
    capacity = -(-total // case.cfg["num_experts"])  # ceil(1.0 * N * 1 / E)
    assert bool(out[:capacity].abs().sum(-1).gt(0).all()) and not bool(out[capacity:].any())


def test_pad_to_capacity_runs_every_local_expert_on_capacity_rows(ranks):
    """pad_to_capacity under EP: each rank's expert GEMMs (forward and backward) run on [El, C, .]
    batches, C the group's capacity, and the values equal one process (test_matches_single_process)."""
    world, all_results = ranks
    name = "pad-to-capacity-probs-mask"
    case = CASES[name]
    masks = [rank_inputs(name, case, world, r)[3] for r in range(world)]
    real_slots = sum(int(m.sum()) for m in masks) * case.cfg["top_k"]
    capacity = -(-real_slots // case.cfg["num_experts"])  # ceil(1.0 * slots / E)
    for r in all_results:
        shapes = r[name]["gemm_shapes"]
        assert shapes and all(s[0] == case.cfg["num_experts"] // world and capacity in s[1:] for s in shapes), shapes


def test_dispatcher_counts_the_rows_it_sends(ranks):
    """sent_rows = slots sent to the experts' ranks + result rows sent back; sent_bytes = their
    D-vectors in the activation dtype, plus one int64 drop priority per slot sent under capacity."""
    world, all_results = ranks
    for name in ("softmax-k2-aux-z", "capacity-position-seq"):
        case = CASES[name]
        for rank, r in enumerate(all_results):
            rows, nbytes, sent = r[name]["sent"]
            x, ids, _, mask = rank_inputs(name, case, world, rank)
            real = x[..., 0].numel() if mask is None else int(mask.sum())
            assert sent == real * case.cfg["top_k"]  # every real slot travels (to its expert's rank, maybe this one)
            received = rows - sent
            assert received >= 0
            priority = sent * 8 if case.cfg.get("capacity_factor") else 0
            assert nbytes == rows * D * x.element_size() + priority
    totals = [sum(r[name]["sent"][0] for r in all_results) for name in ("softmax-k2-aux-z",)]
    slots = sum(CASES["softmax-k2-aux-z"].sizes[world]) * 2
    assert totals == [2 * slots]  # over the group: every slot goes out once and comes back once


def test_backward_joins_when_some_ranks_need_no_input_grad(ranks):
    """Only rank 0's x requires grad: every rank still runs the backward exchange (no hang), and
    the expert and gate gradients are those of the full run."""
    world, all_results = ranks
    results = [r["mixed-requires-grad"] for r in all_results]
    assert results[0]["grad_x"] is not None and all(r["grad_x"] is None for r in results[1:])
    ref = reference("softmax-k2-aux-z", CASES["softmax-k2-aux-z"], world)[0]
    for pname, p in ref.named_parameters():
        assert rel_err(combine_grads(results, pname), p.grad) <= TOL[torch.float64], pname


def test_experts_not_divisible_by_world(ranks):
    world, all_results = ranks
    for r in all_results:
        assert f"num_experts={2 * world - 1}" in r["error"] and f"world size {world}" in r["error"]


def test_dp_x_ep_gradients(ranks):
    """DP 2 x EP 2: after all_reduce_gradients every replica holds the single-process gradient of the
    whole 4-rank batch divided by 4 (dense: on all ranks; experts: on both holders of a slice)."""
    world, all_results = ranks
    if world != 4:
        pytest.skip("DP x EP needs 4 ranks")
    results = [r["dp-x-ep"] for r in all_results]
    assert [(r["dp_rank"], r["ep_rank"]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    ref, x, out, _, _ = reference("dp-x-ep", DP_X_EP, 4)
    assert rel_err(torch.cat([r["out"] for r in results]), out) <= TOL[torch.float64]
    for pname, p in ref.named_parameters():
        for r in results:
            want = p.grad / 4
            if pname.startswith("experts."):
                per_rank = p.shape[0] // 2
                want = want[r["ep_rank"] * per_rank : (r["ep_rank"] + 1) * per_rank]
            assert rel_err(r["grads"][pname], want) <= TOL[torch.float64], (pname, r["ep_rank"], r["dp_rank"])


# ----------------------------------------------------------------------------- no processes needed


def test_ep_group_needs_initialized_process_group():
    cfg = MoEConfig(hidden_size=D, intermediate_size=INTER, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="init_process_group"):
        MoELayer(cfg, ep_group=object())

