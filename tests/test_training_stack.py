"""moe_kit inside a real training stack (issue 10): every path against a plain single-process fp32 run.

DDP and FSDP2 (gloo, 2 processes, 3 micro-batches per step, the ranks routing differently, expert
bias updated after every step), GradScaler in both loss modes, autocast bf16, activation
checkpointing (reentrant and not), meta-device construction, padding (token_mask), config edits
after build, model.to(bf16), expert-parallel config agreement and the all-underflow NaN fix.

All multi-process checks share one spawn of 2 gloo ranks (module fixture `spawned`): each rank runs
every part and saves what it saw; the test process recomputes the reference and compares. A part
that raises on a rank is saved as its traceback, so one failing part fails only its own test.
Tolerances are normwise relative errors (`rel_err`) far below 1%: a 1% error in any compared
tensor fails.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import traceback
import zlib
from functools import partial

import conftest
import pytest
import torch
import torch.distributed as dist
from gloo_ranks import run_ranks
from torch import nn
from torch.utils.checkpoint import checkpoint

import moe_kit
from moe_kit import MoEConfig, MoELayer
from moe_kit.balancing import switch_aux_loss

D, INTER, E, K, VOCAB = 8, 6, 4, 2, 32
FP32_TOL = 2e-5  # fp32 vs fp32 through a different (but exact-in-math) path
BF16_TOL = 3e-2  # bf16 compute vs the fp32 reference
STEPS, MICRO, WORLD = 3, 3, 2


def make_cfg(**overrides) -> MoEConfig:
    settings = dict(hidden_size=D, intermediate_size=INTER, num_experts=E, top_k=K)
    settings.update(overrides)
    return MoEConfig(**settings)


# noaux_tc bias, both losses, a hash layer (layer 0) and a top-k layer (layer 1), shared experts.
# The bias rate is large so that a wrong bias changes which experts later steps pick.
TRAIN_CFG = dict(
    expert_bias=True, bias_update_rate=0.05, aux_loss_coef=0.1, z_loss_coef=0.01,
    n_hash_layers=1, vocab_size=VOCAB, num_shared_experts=1,
)

rel_err = partial(conftest.rel_err, floor=1e-3)  # floor: see conftest.rel_err


class Net(nn.Module):
    """proj -> + MoE (hash gate, layer 0) -> + MoE (top-k gate, layer 1): a tiny two-block model."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.moe0 = MoELayer(cfg, layer_id=0)
        self.moe1 = MoELayer(cfg, layer_id=1)

    def forward(self, x, input_ids, token_mask=None):
        h = self.proj(x)
        h = h + self.moe0(h, input_ids, token_mask)
        return h + self.moe1(h, input_ids, token_mask)

    def gates(self):
        return [self.moe0.gate, self.moe1.gate]


def build_net(cfg: MoEConfig | None = None) -> Net:
    torch.manual_seed(0)
    return Net(cfg or make_cfg(**TRAIN_CFG))


def shift(rank: int) -> torch.Tensor:
    """A per-rank offset of the inputs: the two ranks route to different experts."""
    gen = torch.Generator().manual_seed(1000 + rank)
    return 1.5 * torch.randn(D, generator=gen)


def micro_batch(step: int, rank: int, micro: int):
    """(x [2, 4, D], ids [2, 4], cotangent [2, 4, D]) of one micro-batch, the same in every process."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{step}/{rank}/{micro}".encode()))
    x = torch.randn(2, 4, D, generator=gen) + shift(rank)
    ids = torch.randint(0, VOCAB, (2, 4), generator=gen)
    cot = torch.randn(2, 4, D, generator=gen)
    return x, ids, cot


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def train_reference(steps: int = STEPS, world: int = WORLD, micro: int = MICRO) -> list[dict]:
    """The single-process fp32 run the distributed runs must equal: every step sees the micro-batches
    of every rank, the main loss divided by micro * world (DDP / FSDP average over ranks) and the
    attached balancing losses scaled the same way. Records per step: main losses and aux / z values
    per (rank, micro), each rank's expert counts, the gradients, the expert biases after the update."""
    net = build_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    moe_kit.set_aux_loss_scale(net, 1.0 / (micro * world))
    history = []
    for step in range(steps):
        opt.zero_grad()
        record = dict(loss={}, aux={}, z={}, counts={})
        for rank in range(world):
            before = [g.expert_counts.clone() for g in net.gates() if g.expert_counts is not None]
            for m in range(micro):
                x, ids, cot = micro_batch(step, rank, m)
                out = net(x, ids)
                loss = (out * cot).mean()
                (loss / (micro * world)).backward()
                record["loss"][rank, m] = loss.item()
                record["aux"][rank, m] = [layer.stats.aux_loss for layer in (net.moe0, net.moe1)]
                record["z"][rank, m] = [layer.stats.z_loss for layer in (net.moe0, net.moe1)]
            after = [g.expert_counts.clone() for g in net.gates() if g.expert_counts is not None]
            record["counts"][rank] = [a - b for a, b in zip(after, before, strict=True)]
        record["grads"] = grads_of(net)
        opt.step()
        moe_kit.update_expert_bias(net)
        record["bias"] = net.moe1.gate.expert_bias.clone()
        history.append(record)
    return history


@pytest.fixture(scope="module")
def reference_run():
    return train_reference()


# ----------------------------------------------------------------------------- the ranks


def _train_rank(net: nn.Module, rank: int, inner: Net, full_grads, no_sync=None) -> list[dict]:
    """The rank's half of train_reference (attach mode, accumulation over MICRO micro-batches)."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    moe_kit.set_aux_loss_scale(net, 1.0 / MICRO)
    history = []
    for step in range(STEPS):
        opt.zero_grad()
        record = dict(loss={}, aux={}, z={})
        for m in range(MICRO):
            x, ids, cot = micro_batch(step, rank, m)
            sync = no_sync() if (no_sync is not None and m < MICRO - 1) else contextlib.nullcontext()
            with sync:
                out = net(x, ids)
                loss = (out * cot).mean()
                (loss / MICRO).backward()
            record["loss"][m] = loss.item()
            record["aux"][m] = [layer.stats.aux_loss for layer in (inner.moe0, inner.moe1)]
            record["z"][m] = [layer.stats.z_loss for layer in (inner.moe0, inner.moe1)]
        record["counts"] = [g.expert_counts.clone() for g in inner.gates() if g.expert_counts is not None]
        record["grads"] = full_grads(inner)
        opt.step()
        moe_kit.update_expert_bias(net)
        record["bias"] = inner.moe1.gate.expert_bias.clone()
        record["bias_buffer_dtype"] = inner.moe1.gate.expert_bias.dtype
        history.append(record)
    return history


def _part_ddp(rank: int, use_no_sync: bool = False) -> dict:
    """DDP with its default buffer sync. Without no_sync every micro-batch's forward broadcasts rank
    0's buffers (how the old counts buffer got overwritten); with no_sync only the first one does."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    inner = build_net()
    buffers = dict(inner.named_buffers())
    ddp = DDP(inner)
    history = _train_rank(ddp, rank, inner, grads_of, no_sync=ddp.no_sync if use_no_sync else None)
    return dict(history=history, buffers=sorted(buffers))


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of an FSDP2 model gathered to full tensors (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return {
        name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
        for name, p in model.named_parameters()
    }


def _part_fsdp2(rank: int) -> dict:
    """FSDP2: fully_shard each MoE layer and the root, default (averaging) gradient reduction."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    inner = build_net()
    fully_shard(inner.moe0, mesh=mesh)
    fully_shard(inner.moe1, mesh=mesh)
    fully_shard(inner, mesh=mesh)
    return dict(history=_train_rank(inner, rank, inner, full_grads))


def _part_fsdp2_meta(rank: int) -> dict:
    """The FSDP2 init recipe: build on meta, fully_shard, to_empty, reset_parameters, load the
    reference weights (full state dict), then train as _part_fsdp2."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    with torch.device("meta"):
        inner = Net(make_cfg(**TRAIN_CFG))
    fully_shard(inner.moe0, mesh=mesh)
    fully_shard(inner.moe1, mesh=mesh)
    fully_shard(inner, mesh=mesh)
    inner.to_empty(device="cpu")
    inner.proj.reset_parameters()
    inner.moe0.reset_parameters()
    inner.moe1.reset_parameters()
    gate = inner.moe1.gate
    after_reset = dict(tid2eid=inner.moe0.gate.tid2eid.clone(), bias=gate.expert_bias.clone(),
                       counts=gate.expert_counts.clone(),
                       finite=all(bool(torch.isfinite(p.full_tensor()).all()) for p in inner.parameters()))
    set_model_state_dict(inner, build_net().state_dict(), options=StateDictOptions(full_state_dict=True))
    return dict(history=_train_rank(inner, rank, inner, full_grads), after_reset=after_reset)


def _part_ep_config(rank: int) -> dict:
    """Ranks building from different configs: a ValueError naming the field, on every rank."""
    group = dist.group.WORLD
    result = {}
    for name, overrides in (("top_k", dict(top_k=1 + rank)), ("aux_loss_coef", dict(aux_loss_coef=0.1 * rank)),
                            ("score_func", dict(score_func=("softmax", "sigmoid")[rank]))):
        try:
            MoELayer(make_cfg(**overrides), ep_group=group)
            result[name] = None
        except ValueError as err:
            result[name] = str(err)
    try:  # the backend is each rank's own business (same math)
        MoELayer(make_cfg(backend=("torch", "loop")[rank]), ep_group=group)
        result["backend"] = None
    except ValueError as err:
        result["backend"] = str(err)
    try:
        MoELayer(make_cfg(), layer_id=rank, ep_group=group)
        result["layer_id"] = None
    except ValueError as err:
        result["layer_id"] = str(err)
    return result


def _part_ep_nan(rank: int) -> dict:
    """group_balancing.py: sigmoid / sqrtsoftplus scores + aux loss, one token whose logits are all
    -1e4 (its scores underflow to 0): the router gradient stays finite on every rank."""
    result = {}
    for score_func in ("sigmoid", "sqrtsoftplus"):
        torch.manual_seed(0)
        layer = MoELayer(make_cfg(score_func=score_func, aux_loss_coef=0.1, norm_topk_prob=False),
                         ep_group=dist.group.WORLD)
        moe_kit.set_aux_loss_scale(layer, 2.0**16)
        x = underflow_batch(layer.gate, rank)
        (2.0**16 * layer(x)).sum().backward()
        result[score_func] = dict(grad=layer.gate.weight.grad.clone(), aux=layer.stats.aux_loss)
    return result


EP_MASK_CASES = {
    "bias-shared-aux-z": dict(expert_bias=True, num_shared_experts=1, aux_loss_coef=0.2, z_loss_coef=0.02),
    "capacity-aux": dict(capacity_factor=1.0, aux_loss_coef=0.2, expert_bias=True),
}


def ep_mask_reference_layer(name: str) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(make_cfg(**EP_MASK_CASES[name]))
    if layer.gate.expert_bias is not None:
        with torch.no_grad():
            layer.gate.expert_bias.copy_(0.05 * torch.randn(E))
    return layer


def ep_mask_inputs(name: str, rank: int):
    """(x [3, 4, D], cotangent zero on padding, mask [3, 4]) of `rank`; rank 1 pads more."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"ep-mask/{name}/{rank}".encode()))
    x = torch.randn(3, 4, D, generator=gen) + shift(rank)
    mask = torch.rand(3, 4, generator=gen) < (0.7, 0.4)[rank]
    cot = torch.randn(3, 4, D, generator=gen) * mask.unsqueeze(-1)
    return x, cot, mask


def _part_ep_mask(rank: int) -> dict:
    """Expert-parallel layer fed padded batches: outputs, gradients, counts and group stats."""
    from moe_kit.distributed import shard_state_dict

    result = {}
    for name, overrides in EP_MASK_CASES.items():
        full = ep_mask_reference_layer(name)
        layer = MoELayer(make_cfg(**overrides), ep_group=dist.group.WORLD)
        layer.load_state_dict(shard_state_dict(full.state_dict(), layer))
        x, cot, mask = ep_mask_inputs(name, rank)
        x = x.requires_grad_(True)
        out = layer(x, token_mask=mask)
        (out * cot).sum().backward()
        stats = layer.stats
        counts = None if layer.gate.expert_counts is None else layer.gate.expert_counts.clone()
        result[name] = dict(out=out.detach(), grad_x=x.grad, grads=grads_of(layer), counts=counts,
                            load=stats.load, aux=stats.aux_loss, z=stats.z_loss, dropped=stats.dropped_fraction)
    return result


GLOBAL_BATCH_CFG = dict(aux_loss_type="global_batch", aux_loss_coef=0.5)


def _part_ddp_global_batch(rank: int) -> dict:
    """DDP, aux_loss_type "global_batch": one step of MICRO micro-batches (no optimizer step)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    inner = build_net(make_cfg(**GLOBAL_BATCH_CFG))
    ddp = DDP(inner)
    moe_kit.set_aux_loss_scale(ddp, 1.0 / MICRO)
    aux = {}
    for m in range(MICRO):
        x, ids, cot = micro_batch(0, rank, m)
        ((ddp(x, ids) * cot).mean() / MICRO).backward()
        aux[m] = [layer.stats.aux_loss for layer in (inner.moe0, inner.moe1)]
    return dict(aux=aux, grads=grads_of(inner))


PARTS = {
    "ddp_global_batch": _part_ddp_global_batch,
    "ddp": _part_ddp,
    "ddp_no_sync": lambda rank: _part_ddp(rank, use_no_sync=True),
    "fsdp2": _part_fsdp2,
    "fsdp2_meta": _part_fsdp2_meta,
    "ep_config": _part_ep_config,
    "ep_nan": _part_ep_nan,
    "ep_mask": _part_ep_mask,
}


def _every_part(rank: int, world: int) -> dict:
    results = {}
    for name, part in PARTS.items():
        try:
            results[name] = part(rank)
        except Exception:  # saved, so the test of this part fails with the rank's traceback
            results[name] = dict(error=traceback.format_exc())
        dist.barrier()
    return results


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """[results of rank 0, rank 1] from one spawn of 2 gloo processes running every part."""
    return run_ranks(_every_part, WORLD, tmp_path_factory.mktemp("stack"), collective_timeout_s=60)


def part_results(spawned, name: str) -> list[dict]:
    results = [r[name] for r in spawned]
    for rank, r in enumerate(results):
        if isinstance(r, dict) and "error" in r:
            pytest.fail(f"part {name!r} raised on rank {rank}:\n{r['error']}")
    return results


# ----------------------------------------------------------------------------- DDP / FSDP2 vs reference


@pytest.mark.parametrize(
    "part",
    [pytest.param("ddp", id="ddp-sync-every-micro-batch"), pytest.param("ddp_no_sync", id="ddp-no_sync"),
     pytest.param("fsdp2", id="fsdp2-fully_shard"), pytest.param("fsdp2_meta", id="fsdp2-meta-init")],
)
def test_data_parallel_matches_single_process(spawned, reference_run, part):
    """Per step: each rank's losses and aux / z values equal the reference's for its micro-batches,
    each rank's expert counts are its own (not rank 0's), the synchronized gradients equal the
    reference's, and after update_expert_bias every rank holds the reference's expert bias."""
    results = part_results(spawned, part)
    ranks_differ = False
    for step, ref in enumerate(reference_run):
        for rank, result in enumerate(results):
            got = result["history"][step]
            for m in range(MICRO):
                assert got["loss"][m] == pytest.approx(ref["loss"][rank, m], rel=1e-5, abs=1e-6), (step, rank, m)
                for g, w in zip(got["aux"][m] + got["z"][m], ref["aux"][rank, m] + ref["z"][rank, m], strict=True):
                    assert g == pytest.approx(w, rel=1e-5), (step, rank, m)
            for g, w in zip(got["counts"], ref["counts"][rank], strict=True):
                assert torch.equal(g, w), (step, rank, g, w)  # this rank's own routing, all micro-batches
            for name, want in ref["grads"].items():
                assert rel_err(got["grads"][name], want) <= FP32_TOL, (step, rank, name)
            assert got["bias_buffer_dtype"] == torch.float32
            assert torch.equal(got["bias"], ref["bias"]), (step, rank, got["bias"], ref["bias"])
        ranks_differ |= not torch.equal(ref["counts"][0][0], ref["counts"][1][0])
    assert ranks_differ, "the two ranks must route differently, or broadcasting counts would go unnoticed"
    assert reference_run[-1]["bias"].abs().sum() > 0


def test_fsdp2_meta_init_resets_every_buffer(spawned):
    """After fully_shard on a meta model, to_empty and reset_parameters: hash table, zero expert
    bias and zero counts on the CPU, finite weights (then the training above equals the reference)."""
    for result in part_results(spawned, "fsdp2_meta"):
        state = result["after_reset"]
        assert torch.equal(state["tid2eid"], moe_kit.hash_table(VOCAB, E, K))
        assert torch.equal(state["bias"], torch.zeros(E)) and torch.equal(state["counts"], torch.zeros(E))
        assert state["finite"]


def test_global_batch_aux_counts_every_rank_and_micro_batch(spawned):
    """aux_loss_type "global_batch" under DDP: at micro-batch m, f counts the plain top-k of every
    rank's micro-batches 0..m (all-reduced), P is the rank's own micro-batch; DDP's averaged
    gradients equal a single process that attaches each (rank, micro) loss with that f."""
    results = part_results(spawned, "ddp_global_batch")
    net = build_net(make_cfg(**GLOBAL_BATCH_CFG)).train()  # losses train only in training mode
    layers = (net.moe0, net.moe1)
    inputs = {}  # (layer, rank, micro) -> the layer's input, from a first pass
    hooks = [layer.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__((i, *key), args[0].detach()))
             for i, layer in enumerate(layers)]
    for rank in range(WORLD):
        for m in range(MICRO):
            key = (rank, m)
            x, ids, _ = micro_batch(0, rank, m)
            with torch.no_grad():
                net(x, ids)
    for hook in hooks:
        hook.remove()

    def slots(i, rank, m):  # float64 [E + 1]: plain top-k counts, then the slot total
        scores = torch.softmax(inputs[i, rank, m].reshape(-1, D) @ layers[i].gate.weight.detach().T, -1)
        top = scores.topk(K, dim=-1).indices.reshape(-1)
        return torch.cat([torch.bincount(top, minlength=E).double(), torch.tensor([float(top.numel())])])

    moe_kit.set_aux_loss_scale(net, 1.0 / (MICRO * WORLD))
    seen = [torch.zeros(E + 1, dtype=torch.float64) for _ in layers]
    for m in range(MICRO):
        for i in range(len(layers)):
            seen[i] += sum(slots(i, rank, m) for rank in range(WORLD))
        for rank in range(WORLD):
            for i, layer in enumerate(layers):  # the forward adds its own slots back: f = seen
                layer.gate.global_batch_counts = seen[i] - slots(i, rank, m)
            x, ids, cot = micro_batch(0, rank, m)
            ((net(x, ids) * cot).mean() / (MICRO * WORLD)).backward()
            want = [layer.stats.aux_loss for layer in layers]
            assert results[rank]["aux"][m] == pytest.approx(want, rel=1e-5), (rank, m)
    ref = grads_of(net)
    for result in results:
        for name, want in ref.items():
            assert rel_err(result["grads"][name], want) <= FP32_TOL, name
    assert ref["moe1.gate.weight"].norm() > 0


def test_ddp_does_not_broadcast_expert_counts(spawned):
    """The old bug: expert_counts was a buffer, so DDP (broadcast_buffers=True) copied rank 0's counts
    over rank 1's before every forward. Now it is no buffer, and rank 1 keeps its own counts."""
    results = part_results(spawned, "ddp")
    for result in results:
        assert not any(name.endswith("expert_counts") for name in result["buffers"]), result["buffers"]
        assert any(name.endswith("expert_bias") for name in result["buffers"])
    first = [r["history"][0]["counts"][0] for r in results]
    assert not torch.equal(first[0], first[1])  # rank 1 did not receive rank 0's counts
    assert all(c.sum() == MICRO * 8 * K for c in first)  # 3 micro-batches of 8 tokens, k slots each


def test_expert_counts_not_in_buffers_or_state_dict():
    net = build_net()
    assert not any(name.endswith("expert_counts") for name, _ in net.named_buffers())
    assert not any(key.endswith("expert_counts") for key in net.state_dict())
    assert "moe1.gate.expert_bias" in net.state_dict()


# ----------------------------------------------------------------------------- expert parallel config check


def test_ep_ranks_with_different_configs_raise(spawned):
    results = part_results(spawned, "ep_config")
    for result in results:
        for field in ("top_k", "aux_loss_coef", "score_func", "layer_id"):
            assert result[field] is not None, f"ranks with different {field} built a layer"
            assert field in result[field], result[field]
        assert result["backend"] is None, result["backend"]


@pytest.mark.parametrize("name", list(EP_MASK_CASES))
def test_ep_token_mask_equals_single_process_on_real_tokens(spawned, name):
    """Expert parallel (2 ranks) with padding = one process fed the real tokens of both ranks in
    rank order: real outputs, input / expert / summed gate gradients, summed counts, group stats."""
    results = [r[name] for r in part_results(spawned, "ep_mask")]
    ref = ep_mask_reference_layer(name)
    inputs = [ep_mask_inputs(name, rank) for rank in range(WORLD)]
    x_real = torch.cat([x[mask] for x, _, mask in inputs]).requires_grad_(True)
    out = ref(x_real)
    (out * torch.cat([cot[mask] for _, cot, mask in inputs])).sum().backward()
    masks = [mask for _, _, mask in inputs]
    assert rel_err(torch.cat([r["out"][m] for r, m in zip(results, masks, strict=True)]), out) <= FP32_TOL
    assert rel_err(torch.cat([r["grad_x"][m] for r, m in zip(results, masks, strict=True)]), x_real.grad) <= FP32_TOL
    for r, m in zip(results, masks, strict=True):
        assert not r["grad_x"][~m].any()
    for pname, p in ref.named_parameters():
        grads = [r["grads"][pname] for r in results]
        got = torch.cat(grads) if pname.startswith("experts.") else torch.stack(grads).sum(0)
        assert rel_err(got, p.grad) <= FP32_TOL, pname
    stats = ref.stats
    if ref.cfg.capacity_factor is not None:
        assert stats.dropped_fraction > 0
    for r in results:
        assert torch.equal(r["load"], stats.load)
        assert r["dropped"] == pytest.approx(stats.dropped_fraction, abs=1e-9)
        for got, want in ((r["aux"], stats.aux_loss), (r["z"], stats.z_loss)):
            assert (got is None) == (want is None)
            if want is not None:
                assert got == pytest.approx(want, rel=1e-5)
    if ref.gate.expert_counts is not None:
        assert torch.equal(sum(r["counts"] for r in results), ref.gate.expert_counts)


# ----------------------------------------------------------------------------- NaN: scores that all underflow


def underflow_batch(gate, rank: int = 0) -> torch.Tensor:
    """x [5, D] whose token 2 has router logits of exactly -1e4 for every expert (row of gate.weight
    column 0 set to 1, the token's other features 0)."""
    with torch.no_grad():
        gate.weight[:, 0] = 1.0
    gen = torch.Generator().manual_seed(7 + rank)
    x = torch.randn(5, D, generator=gen)
    x[2] = 0.0
    x[2, 0] = -1e4
    return x


@pytest.mark.parametrize("score_func", ["sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize(
    "norm, scale",
    [pytest.param(False, 1.0, id="aux-only"), pytest.param(False, 2.0**16, id="aux-gradscaler-2e16"),
     pytest.param(True, 2.0**16, id="norm_topk_prob-gradscaler-2e16")],
)
def test_underflowing_token_gives_finite_router_gradient(score_func, norm, scale):
    """balancing.py (and the top-k weight normalization): Switch aux loss with one token whose
    scores all underflow -> finite router gradient and aux value, also under a GradScaler-sized
    loss scale (a 1e-38 floor on the score sums turned g * 2**16 / 1e-38 into inf, times 0: NaN)."""
    torch.manual_seed(0)
    layer = MoELayer(make_cfg(score_func=score_func, aux_loss_coef=0.1, norm_topk_prob=norm))
    moe_kit.set_aux_loss_scale(layer, scale)
    x = underflow_batch(layer.gate)
    with torch.no_grad():
        assert float(nn.functional.linear(x[2:3], layer.gate.weight).max()) == -1e4
    (scale * layer(x)).sum().backward()
    assert torch.isfinite(layer.gate.weight.grad).all()
    assert math.isfinite(layer.stats.aux_loss)
    scores = torch.cat([torch.sigmoid(torch.full((1, E), -1e4)), torch.rand(3, E)]).requires_grad_(True)
    (scale * switch_aux_loss(scores, scores.detach().topk(K).indices, E)).backward()
    assert torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("score_func", ["sigmoid", "sqrtsoftplus"])
def test_underflowing_token_gives_finite_router_gradient_expert_parallel(spawned, score_func):
    """group_balancing.py, the same with the losses' statistics over a 2-rank EP group."""
    results = part_results(spawned, "ep_nan")
    for result in results:
        assert torch.isfinite(result[score_func]["grad"]).all()
        assert math.isfinite(result[score_func]["aux"])


# ----------------------------------------------------------------------------- GradScaler


def layer_and_batches(**overrides):
    """A layer with large balancing losses (so a lost aux / z gradient shows) and 2 micro-batches."""
    torch.manual_seed(0)
    settings = dict(aux_loss_coef=0.5, z_loss_coef=0.05, expert_bias=True, num_shared_experts=1)
    settings.update(overrides)
    layer = MoELayer(make_cfg(**settings))
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(2, 6, D, generator=gen), 0.1 * torch.randn(2, 6, D, generator=gen)) for _ in range(2)]
    return layer, batches


def fp32_grads(accum: int = 2) -> dict[str, torch.Tensor]:
    """Reference: fp32, no scaler, main loss / accum, attached losses scaled 1 / accum."""
    layer, batches = layer_and_batches()
    moe_kit.set_aux_loss_scale(layer, 1.0 / accum)
    for x, cot in batches:
        ((layer(x) * cot).sum() / accum).backward()
    return grads_of(layer)


@pytest.mark.parametrize("fp16", [pytest.param(False, id="fp32"), pytest.param(True, id="autocast-fp16")])
@pytest.mark.parametrize(
    "mode",
    [pytest.param("attach-float", id="attach-float-scale"), pytest.param("attach-tensor", id="attach-tensor-scale"),
     pytest.param("return", id="return-balancing_loss")],
)
def test_gradscaler_recipe_matches_fp32(mode, fp16):
    """torch.amp.GradScaler (2 accumulation steps): after scaler.unscale_ every gradient, the
    router's included, equals the unscaled fp32 run's, in both loss modes. The attach-mode recipe
    sets the scale between forward and backward (float) or before the forward (tensor). Under autocast fp16 (the real
    GradScaler use) the gradients match to fp16 accuracy, far below the 1% a lost loss would cost."""
    accum = 2
    want = fp32_grads(accum)
    layer, batches = layer_and_batches(loss_mode="return" if mode == "return" else "attach")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12 if fp16 else 2.0**16, growth_interval=1000)
    for x, cot in batches:
        if mode == "attach-tensor":  # before the forward (suits torch.compile too)
            moe_kit.set_aux_loss_scale(layer, torch.tensor(scaler.get_scale() / accum))
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            out = layer(x)
            loss = (out.float() * cot).sum()
            if mode == "return":
                loss = loss + moe_kit.balancing_loss(layer)
        assert out.dtype == (torch.float16 if fp16 else torch.float32)
        if mode == "attach-float":  # between forward and backward, as documented
            moe_kit.set_aux_loss_scale(layer, scaler.get_scale() / accum)
        scaler.scale(loss / accum).backward()
    scaler.unscale_(opt)
    for name, grad in want.items():
        assert rel_err(dict(layer.named_parameters())[name].grad, grad) <= (3e-3 if fp16 else 1e-6), name
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale  # no inf / NaN was found


def test_gradscaler_without_recipe_loses_the_balancing_gradient():
    """The check above is sensitive: attach mode without set_aux_loss_scale(scale / M) leaves the
    balancing-loss gradient divided by 2**16 after unscale_, far more than 1% off on the router."""
    want = fp32_grads(2)
    layer, batches = layer_and_batches()
    moe_kit.set_aux_loss_scale(layer, 0.5)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for x, cot in batches:
        scaler.scale((layer(x) * cot).sum() / 2).backward()
    scaler.unscale_(opt)
    assert rel_err(layer.gate.weight.grad, want["gate.weight"]) > 0.05
    assert rel_err(layer.experts.down_proj.grad, want["experts.down_proj"]) <= 1e-6


def test_balancing_loss_errors():
    """balancing_loss refuses attach-mode gates (the loss would count twice) and forwards that ran
    without autograd."""
    layer, batches = layer_and_batches()
    layer(batches[0][0])
    with pytest.raises(ValueError, match="loss_mode"):
        moe_kit.balancing_loss(layer)
    layer, batches = layer_and_batches(loss_mode="return")
    with torch.no_grad():
        layer(batches[0][0])
    with pytest.raises(ValueError, match="without autograd"):
        moe_kit.balancing_loss(layer)


def test_balancing_loss_list_form():
    """The list form (aux_loss_type / aux_loss_coef tuples): balancing_loss returns the sum of every
    type's loss and z (loss_mode "return"), and refuses attach mode like the single form."""
    kinds = dict(aux_loss_type=("global", "sequence"), aux_loss_coef=(0.1, 0.2), expert_bias=False)
    layer, batches = layer_and_batches(loss_mode="return", **kinds)
    x = batches[0][0]
    layer(x)
    total = moe_kit.balancing_loss(layer)
    assert total.requires_grad
    torch.testing.assert_close(total.detach(), layer.gate.aux_loss + layer.gate.z_loss, rtol=0, atol=0)
    s = torch.softmax(x.reshape(-1, D) @ layer.gate.weight.detach().T, -1)
    top = s.topk(K, dim=-1).indices
    want = 0.1 * switch_aux_loss(s, top, E) + 0.2 * switch_aux_loss(s, top, E, "sequence", (2, 6))
    torch.testing.assert_close(layer.gate.aux_loss, want, rtol=1e-6, atol=0)
    layer, _ = layer_and_batches(**kinds)
    layer(x)
    with pytest.raises(ValueError, match="loss_mode"):
        moe_kit.balancing_loss(layer)


@pytest.mark.parametrize("loss_mode", ["attach", "return"])
def test_balancing_losses_only_in_training_mode(loss_mode):
    """Megatron / transformers: an eval-mode forward, grad enabled, attaches no loss (the router
    gradient of a zero upstream stays exactly 0) and balancing_loss gives 0.0; the stats still
    report the training-mode values of the same input (no jitter)."""
    layer, batches = layer_and_batches(loss_mode=loss_mode, expert_bias=False)
    x = batches[0][0]
    layer.train()
    layer(x)
    trained = layer.stats
    layer.zero_grad()
    layer.eval()
    out = layer(x)
    assert out.requires_grad
    term = moe_kit.balancing_loss(layer) if loss_mode == "return" else torch.zeros(())
    assert not term.requires_grad and term.item() == 0.0
    (out * 0).sum().backward()
    assert layer.gate.weight.grad is not None and not layer.gate.weight.grad.any()
    assert layer.gate.balancing_term is None
    evaluated = layer.stats
    assert trained.aux_loss is not None and trained.z_loss is not None
    assert (evaluated.aux_loss, evaluated.z_loss) == (trained.aux_loss, trained.z_loss)
    layer.train()
    loss = (layer(x) * 0).sum()
    (loss + moe_kit.balancing_loss(layer) if loss_mode == "return" else loss).backward()
    assert layer.gate.weight.grad.abs().sum() > 1e-4  # training mode: the losses train the router again


# ----------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("backend", ["loop", "torch"])
def test_autocast_bf16_router_stays_fp32(backend):
    """Under torch.autocast(bf16): the gate returns exactly the fp32 router's weights and experts on
    the same fp32 activations; the layer routes identically (same load, counts, aux / z values); its
    output and every gradient equal an explicit computation with the fp32 router and the experts on
    bf16 copies of x and of the weights (so the experts really run in bf16), and stay within bf16
    error of the all-fp32 run."""
    torch.manual_seed(0)
    layer = MoELayer(make_cfg(num_experts=8, aux_loss_coef=0.1, z_loss_coef=0.01, expert_bias=True,
                              num_shared_experts=1, backend=backend))
    with torch.no_grad():
        layer.gate.expert_bias.copy_(0.01 * torch.randn(8))
    x = torch.randn(512, D)
    cot = torch.randn(512, D)
    w_ref, i_ref = layer.gate(x)
    layer.gate.expert_counts.zero_()
    ref, manual = copy.deepcopy(layer), copy.deepcopy(layer)
    out_ref = ref(x)
    (out_ref * cot).sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, i = layer.gate(x)
        assert w.dtype == torch.float32
        assert torch.equal(i, i_ref) and torch.equal(w, w_ref)
        bf16_logits = nn.functional.linear(x, layer.gate.weight)  # what autocast makes of a plain router
        assert bf16_logits.dtype == torch.bfloat16
        assert not torch.equal(bf16_logits.float().softmax(-1).gather(1, i_ref), w_ref)  # the check can fail
        layer.gate.expert_counts.zero_()
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(layer.stats.load, ref.stats.load)
    assert layer.stats.aux_loss == ref.stats.aux_loss and layer.stats.z_loss == ref.stats.z_loss
    assert torch.equal(layer.gate.expert_counts, ref.gate.expert_counts)
    (out.float() * cot).sum().backward()

    weights, indices = manual.gate(x)  # explicit bf16 experts, fp32 router, no autocast
    x_bf16 = x.to(torch.bfloat16)
    experts = manual.experts
    out_manual = moe_kit.ops.moe_ffn(x_bf16, weights, indices, experts.gate_up_proj.to(torch.bfloat16),
                                     experts.down_proj.to(torch.bfloat16), backend=backend)
    out_manual = out_manual + manual.shared_experts(x_bf16)
    (out_manual.float() * cot).sum().backward()
    assert rel_err(out, out_manual) <= 1e-3
    assert 0 < rel_err(out, out_ref) <= BF16_TOL
    ref_params, manual_params = dict(ref.named_parameters()), dict(manual.named_parameters())
    for name, p in layer.named_parameters():
        assert p.grad.dtype == torch.float32, name
        assert rel_err(p.grad, manual_params[name].grad) <= 1e-3, name
        assert rel_err(p.grad, ref_params[name].grad) <= BF16_TOL, name


def test_autocast_backends_agree():
    """loop (the reference) and torch backends compute the same bf16 result under autocast."""
    outs = []
    for backend in ("loop", "torch"):
        torch.manual_seed(0)
        layer = MoELayer(make_cfg(num_experts=8, backend=backend))
        x = torch.randn(64, D)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(layer(x))
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    assert rel_err(outs[1], outs[0]) <= 1e-2


# ----------------------------------------------------------------------------- activation checkpointing


class CheckpointNet(nn.Module):
    def __init__(self, cfg: MoEConfig, reentrant: bool | None):
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.moe = MoELayer(cfg)
        self.reentrant = reentrant

    def forward(self, x):
        h = self.proj(x)
        if self.reentrant is None:
            return self.moe(h)
        return checkpoint(self.moe, h, use_reentrant=self.reentrant)


def run_checkpoint_net(reentrant: bool | None, loss_mode: str = "attach"):
    torch.manual_seed(0)
    cfg = make_cfg(aux_loss_coef=0.3, z_loss_coef=0.03, expert_bias=True, num_shared_experts=1, loss_mode=loss_mode)
    net = CheckpointNet(cfg, reentrant)
    gen = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(2):  # two micro-batches: counts must add up once per forward
        x, cot = torch.randn(3, 5, D, generator=gen), torch.randn(3, 5, D, generator=gen)
        loss = (net(x) * cot).sum()
        if loss_mode == "return":
            loss = loss + moe_kit.balancing_loss(net)
        loss.backward()
        losses.append(loss.item())
    stats = net.moe.stats
    return dict(grads=grads_of(net), counts=net.moe.gate.expert_counts.clone(), losses=losses,
                load=stats.load, aux=stats.aux_loss, z=stats.z_loss)


@pytest.mark.parametrize(
    "reentrant, loss_mode",
    [pytest.param(True, "attach", id="reentrant-attach"), pytest.param(False, "attach", id="nonreentrant-attach"),
     pytest.param(False, "return", id="nonreentrant-return")],
)
def test_activation_checkpointing_matches_plain_run(reentrant, loss_mode):
    """Same gradients (router included: the balancing losses reach the backward once), same stats,
    and expert counts not doubled by the backward-time recompute."""
    want = run_checkpoint_net(None)
    got = run_checkpoint_net(reentrant, loss_mode)
    assert want["counts"].sum() == 2 * 15 * K  # 2 micro-batches of 15 tokens, k slots each
    assert torch.equal(got["counts"], want["counts"])
    assert torch.equal(got["load"], want["load"])
    assert got["aux"] == pytest.approx(want["aux"], rel=1e-6) and got["z"] == pytest.approx(want["z"], rel=1e-6)
    if loss_mode == "attach":
        assert got["losses"] == pytest.approx(want["losses"], rel=1e-6)
    for name, grad in want["grads"].items():
        assert rel_err(got["grads"][name], grad) <= 1e-6, name


def test_reentrant_checkpointing_with_returned_losses_raises():
    """Reentrant checkpointing runs the forward under no_grad: balancing_loss says so, not 0."""
    with pytest.raises(ValueError, match="use_reentrant=False"):
        run_checkpoint_net(True, "return")


def test_counting_policy():
    """Counts: training forwards (also under no_grad); never eval, inference_mode or meta."""
    torch.manual_seed(0)
    layer = MoELayer(make_cfg(expert_bias=True))
    x = torch.randn(6, D)
    layer(x)
    assert layer.gate.expert_counts.sum() == 6 * K
    with torch.no_grad():
        layer(x)
    assert layer.gate.expert_counts.sum() == 12 * K
    with torch.inference_mode():
        layer(x)
    layer.eval()
    layer(x)
    layer.train()
    assert layer.gate.expert_counts.sum() == 12 * K
    with torch.device("meta"):
        meta = MoELayer(make_cfg(expert_bias=True))
    meta(torch.empty(6, D, device="meta"))
    assert meta.gate.expert_counts.is_meta


# ----------------------------------------------------------------------------- meta-device construction


def train_net(net: Net, steps: int = 3) -> list[dict]:
    """A few steps of the reference recipe on one process: losses, gradients, expert bias, weights."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    history = []
    for step in range(steps):
        opt.zero_grad()
        losses = []
        for m in range(2):
            x, ids, cot = micro_batch(step, m, m)
            loss = (net(x, ids) * cot).mean()
            (loss / 2).backward()
            losses.append(loss.item())
        counts = net.moe1.gate.expert_counts.clone()
        grads = grads_of(net)
        opt.step()
        moe_kit.update_expert_bias(net)
        history.append(dict(losses=losses, counts=counts, grads=grads, bias=net.moe1.gate.expert_bias.clone(),
                            load0=net.moe0.stats.load))
    history.append(dict(params={n: p.detach().clone() for n, p in net.named_parameters()}))
    return history


def assert_same_training(got: list[dict], want: list[dict]) -> None:
    for step, (g, w) in enumerate(zip(got[:-1], want[:-1], strict=True)):
        assert g["losses"] == pytest.approx(w["losses"], rel=1e-6, abs=1e-7), step
        assert torch.equal(g["counts"], w["counts"]) and g["counts"].sum() > 0, step
        assert torch.equal(g["bias"], w["bias"]), step
        assert torch.equal(g["load0"], w["load0"]), step  # the hash layer routes by the same table
        for name, grad in w["grads"].items():
            assert rel_err(g["grads"][name], grad) <= 1e-6, (step, name)
    for name, p in want[-1]["params"].items():
        assert rel_err(got[-1]["params"][name], p) <= 1e-6, name


def meta_net() -> Net:
    with torch.device("meta"):
        net = Net(make_cfg(**TRAIN_CFG))
    assert all(p.is_meta for p in net.parameters())
    return net


def test_meta_build_to_empty_reset_parameters():
    """meta -> to_empty -> reset_parameters: every parameter and buffer initialized (hash table,
    zero expert bias and counts on the real device, router weight in nn.Linear's range); loading
    the reference weights then trains exactly like the normally built model."""
    net = meta_net()
    net.to_empty(device="cpu")
    net.proj.reset_parameters()
    net.moe0.reset_parameters()
    net.moe1.reset_parameters()
    table = moe_kit.hash_table(VOCAB, E, K)
    assert torch.equal(net.moe0.gate.tid2eid, table)
    gate = net.moe1.gate
    assert torch.equal(gate.expert_bias, torch.zeros(E)) and gate.expert_bias.dtype == torch.float32
    assert torch.equal(gate.expert_counts, torch.zeros(E)) and gate.expert_counts.device.type == "cpu"
    for layer in (net.moe0, net.moe1):
        bound = 1 / math.sqrt(D)
        assert 0 < layer.gate.weight.abs().max() <= bound and layer.gate.weight.std() > bound / 4
        for p in layer.parameters():
            assert torch.isfinite(p).all() and p.abs().max() < 1
    normal = build_net()
    net.load_state_dict(normal.state_dict())
    assert_same_training(train_net(net), train_net(normal))


def test_meta_build_load_state_dict_assign():
    """meta -> load_state_dict(assign=True): the counts (not in the state dict) come back on the real
    device, balancing works, hash routing works; training equals the normally built model."""
    net = meta_net()
    normal = build_net()
    net.load_state_dict({k: v.clone() for k, v in normal.state_dict().items()}, assign=True)
    assert not any(t.is_meta for t in list(net.parameters()) + list(net.buffers()))
    assert_same_training(train_net(net), train_net(normal))


def test_meta_forward_gives_shapes_only():
    """A meta-built layer runs on meta inputs (shape propagation) and counts nothing."""
    with torch.device("meta"):
        net = Net(make_cfg(**TRAIN_CFG))
        x = torch.empty(2, 3, D)
        ids = torch.zeros(2, 3, dtype=torch.long)
    out = net(x, ids, torch.ones(2, 3, dtype=torch.bool, device="meta"))
    assert out.is_meta and out.shape == (2, 3, D)


def test_reset_parameters_reinitializes_a_used_layer():
    """reset_parameters on a trained layer: bias and counts back to zero, hash table rebuilt."""
    net = build_net()
    train_net(net, steps=1)
    net.moe0(torch.randn(4, D), torch.arange(4))  # counts again
    with torch.no_grad():
        net.moe0.gate.tid2eid.zero_()
    for layer in (net.moe0, net.moe1):
        layer.reset_parameters()
    assert torch.equal(net.moe0.gate.tid2eid, moe_kit.hash_table(VOCAB, E, K))
    assert not net.moe1.gate.expert_bias.any() and not net.moe1.gate.expert_counts.any()


# ----------------------------------------------------------------------------- padding (token_mask)


@dataclasses.dataclass(frozen=True)
class MaskCase:
    cfg: dict
    mask_dtype: torch.dtype = torch.bool
    sequence: bool = False  # aux_loss_type "sequence": padding at the ends, one sequence all padding


MASK_CASES = [
    pytest.param(MaskCase(dict(expert_bias=True, num_shared_experts=1, aux_loss_coef=0.2, z_loss_coef=0.02)),
                 id="bias-shared-aux-z"),
    pytest.param(MaskCase(dict(expert_bias=True, aux_loss_coef=0.2), mask_dtype=torch.long), id="int-mask"),
    pytest.param(MaskCase(dict(z_loss_coef=0.02, score_func="sigmoid"), mask_dtype=torch.float32),
                 id="float-mask-sigmoid"),
    pytest.param(MaskCase(dict(hash_routing=True, vocab_size=VOCAB, aux_loss_coef=0.2, num_shared_experts=1)),
                 id="hash-shared"),
    pytest.param(MaskCase(dict(capacity_factor=1.0, aux_loss_coef=0.2, expert_bias=True)), id="capacity"),
    pytest.param(MaskCase(dict(capacity_factor=1.0, num_shared_experts=1, backend="loop")), id="capacity-loop-shared"),
    pytest.param(MaskCase(dict(aux_loss_coef=0.2, aux_loss_type="sequence", z_loss_coef=0.02, expert_bias=True),
                          sequence=True), id="sequence-aux"),
]


def masked_batch(case: MaskCase):
    """x [3, 5, D], ids, cotangent, mask [3, 5] and the index that picks the real tokens."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 5, D, generator=gen)
    ids = torch.randint(0, VOCAB, (3, 5), generator=gen)
    cot = torch.randn(3, 5, D, generator=gen)
    if case.sequence:  # sequences 0 and 2 hold 3 real tokens, sequence 1 none
        mask = torch.zeros(3, 5, dtype=torch.bool)
        mask[[0, 2], :3] = True
    else:
        mask = torch.rand(3, 5, generator=gen) < 0.6
    ids = torch.where(mask, ids, torch.full_like(ids, -7))  # padding's ids are garbage, never checked
    return x, ids, cot, mask


def real_only(t: torch.Tensor, mask: torch.Tensor, case: MaskCase) -> torch.Tensor:
    if case.sequence:
        return t[[0, 2], :3]
    return t[mask]


@pytest.mark.parametrize("case", MASK_CASES)
def test_token_mask_equals_running_only_the_real_tokens(case):
    """Real tokens' outputs, every gradient (padding's cotangent is zero, as a masked loss makes it),
    expert counts, aux / z values, load and dropped fraction equal a forward of the real tokens
    alone; padded tokens get no routed expert (output = shared expert or 0) and no input gradient."""
    torch.manual_seed(0)
    layer = MoELayer(make_cfg(**case.cfg))
    if layer.gate.expert_bias is not None:
        with torch.no_grad():
            layer.gate.expert_bias.copy_(0.05 * torch.randn(E))
    ref = copy.deepcopy(layer)
    x, ids, cot, mask = masked_batch(case)
    x = x.requires_grad_(True)
    use_ids = case.cfg.get("hash_routing", False)
    out = layer(x, ids if use_ids else None, token_mask=mask.to(case.mask_dtype))
    (out * cot * mask.unsqueeze(-1)).sum().backward()

    x_real = real_only(x.detach(), mask, case).requires_grad_(True)
    out_real = ref(x_real, real_only(ids, mask, case) if use_ids else None)
    (out_real * real_only(cot, mask, case)).sum().backward()

    assert rel_err(real_only(out, mask, case), out_real) <= 1e-6
    padded = out[~mask]
    if layer.shared_experts is None:
        assert not padded.any()
    else:
        assert rel_err(padded, layer.shared_experts(x.detach()[~mask])) <= 1e-6
    assert rel_err(real_only(x.grad, mask, case), x_real.grad) <= 1e-6
    assert not x.grad[~mask].any()
    ref_params = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        assert rel_err(p.grad, ref_params[name].grad) <= 1e-6, name
    got, want = layer.stats, ref.stats
    assert torch.equal(got.load, want.load)
    assert got.dropped_fraction == want.dropped_fraction
    if case.cfg.get("capacity_factor"):
        assert want.dropped_fraction > 0  # the capacity case really drops
    for g, w in ((got.aux_loss, want.aux_loss), (got.z_loss, want.z_loss)):
        assert (g is None) == (w is None)
        if w is not None:
            assert g == pytest.approx(w, rel=1e-6)
    if layer.gate.expert_counts is not None:
        assert torch.equal(layer.gate.expert_counts, ref.gate.expert_counts)
        assert layer.gate.expert_counts.sum() == int(mask.sum()) * K


def test_token_mask_all_padding():
    """A batch of padding only: zero routed output, nothing counted, no NaN anywhere."""
    torch.manual_seed(0)
    layer = MoELayer(make_cfg(expert_bias=True, aux_loss_coef=0.2, z_loss_coef=0.02, capacity_factor=1.0))
    x = torch.randn(4, D, requires_grad=True)
    out = layer(x, token_mask=torch.zeros(4, dtype=torch.bool))
    out.sum().backward()
    assert not out.any() and not layer.gate.expert_counts.any()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    assert layer.stats.load.sum() == 0 and layer.stats.dropped_fraction == 0.0


# ----------------------------------------------------------------------------- config and dtype casts


def test_config_edits_after_build_change_nothing():
    """Editing the caller's config after build leaves the layer as built; its own copy is frozen;
    to_dict / from_dict round-trip through JSON and rebuild the same layer."""
    cfg = make_cfg(aux_loss_coef=0.1, expert_bias=True, num_shared_experts=1)
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    ref = copy.deepcopy(layer)
    cfg.top_k = 1
    cfg.score_func = "sigmoid"
    cfg.aux_loss_coef = 0.9
    cfg.route_scale = 3.0
    cfg.capacity_factor = 0.5
    x = torch.randn(2, 5, D)
    out, out_ref = layer(x), ref(x)
    assert torch.equal(out, out_ref)
    assert layer.stats.aux_loss == ref.stats.aux_loss
    out.sum().backward()
    out_ref.sum().backward()
    for (name, p), q in zip(layer.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    assert layer.cfg.top_k == K and layer.gate.cfg.top_k == K
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.cfg.top_k = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.gate.cfg.aux_loss_coef = 0.0
    original = make_cfg(aux_loss_coef=0.1, expert_bias=True, num_shared_experts=1)
    rebuilt = MoEConfig.from_dict(json.loads(json.dumps(layer.cfg.to_dict())))
    assert rebuilt == original
    torch.manual_seed(0)
    assert torch.equal(MoELayer(rebuilt)(x), out_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_model_cast_keeps_expert_bias_and_counts_fp32(dtype):
    """model.to(bf16) / .half(): expert bias and counts stay fp32 with their exact values (a bf16
    round trip would round 1e-3 + 2**-20 and 257); updates after the cast are exact fp32 updates."""
    torch.manual_seed(0)
    net = Net(make_cfg(expert_bias=True, bias_update_rate=1e-4, n_hash_layers=1, vocab_size=VOCAB))
    gate = net.moe1.gate
    with torch.no_grad():
        gate.expert_bias.copy_(torch.tensor([1e-3 + 2**-20, -0.3 + 1e-6, 0.7 - 3e-6, 2**-30]))
    gate.expert_counts = torch.tensor([257.0, 1.0, 1025.0, 3.0])
    bias, counts = gate.expert_bias.clone(), gate.expert_counts.clone()
    cast = copy.deepcopy(net).to(dtype) if dtype == torch.bfloat16 else copy.deepcopy(net).half()
    cgate = cast.moe1.gate
    assert cgate.weight.dtype == dtype and cast.moe1.experts.down_proj.dtype == dtype
    assert cgate.expert_bias.dtype == torch.float32 and torch.equal(cgate.expert_bias, bias)
    assert cgate.expert_counts.dtype == torch.float32 and torch.equal(cgate.expert_counts, counts)
    assert cast.state_dict()["moe1.gate.expert_bias"].dtype == torch.float32
    assert torch.equal(cast.float().moe1.gate.expert_bias, bias)
    moe_kit.update_expert_bias(cast)
    want = (bias + 1e-4 * torch.sign(counts.mean() - counts)).clamp(-1.0, 1.0)
    assert torch.equal(cgate.expert_bias, want)
    cast.to(dtype)
    x = torch.randn(2, 4, D, dtype=dtype)
    out = cast(x, torch.randint(0, VOCAB, (2, 4)))
    assert out.dtype == dtype and cgate.expert_counts.dtype == torch.float32 and cgate.expert_counts.sum() == 8 * K
