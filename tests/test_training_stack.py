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

import copy
import dataclasses
import datetime
import json
import math
import os
import socket
import sys
import time
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

import moe_kit
from moe_kit import MoEConfig, MoELayer
from moe_kit.balancing import switch_aux_loss

D, INTER, E, K, VOCAB = 8, 6, 4, 2, 32
FP32_TOL = 2e-5  # fp32 vs fp32 through a different (but exact-in-math) path
BF16_TOL = 3e-2  # bf16 compute vs the fp32 reference
STEPS, MICRO, WORLD = 3, 3, 2
SPAWN_TIMEOUT_S = 240


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


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-3) -> float:
    """Normwise ||a - b|| / max(||b||, floor) in float64."""
    assert a.shape == b.shape, (a.shape, b.shape)
    a, b = a.detach().double(), b.detach().double()
    return (a - b).norm().item() / max(b.norm().item(), floor)


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
        record["params"] = {n: p.detach().clone() for n, p in net.named_parameters()}
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
            sync = no_sync() if (no_sync is not None and m < MICRO - 1) else _null()
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


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _part_ddp(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    inner = build_net()
    buffers = dict(inner.named_buffers())
    ddp = DDP(inner)  # buffers synced before every forward: that copied rank 0's counts before
    history = _train_rank(ddp, rank, inner, grads_of, no_sync=ddp.no_sync)
    return dict(history=history, buffers=sorted(buffers))


def _part_fsdp2(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (WORLD,))
    inner = build_net()
    fully_shard(inner.moe0, mesh=mesh)
    fully_shard(inner.moe1, mesh=mesh)
    fully_shard(inner, mesh=mesh)

    def full_grads(model):
        return {
            name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
            for name, p in model.named_parameters()
        }

    return dict(history=_train_rank(inner, rank, inner, full_grads))


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


PARTS = {"ddp": _part_ddp, "fsdp2": _part_fsdp2, "ep_config": _part_ep_config, "ep_nan": _part_ep_nan}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, part in PARTS.items():
            try:
                results[name] = part(rank)
            except Exception:  # saved, so the test of this part fails with the rank's traceback
                results[name] = dict(error=traceback.format_exc())
            dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """[results of rank 0, rank 1] from one spawn of 2 gloo processes running every part."""
    out_dir = str(tmp_path_factory.mktemp("stack"))
    context = mp.start_processes(
        _worker, args=(WORLD, _free_port(), out_dir), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{WORLD} ranks did not finish in {SPAWN_TIMEOUT_S} s (a collective hung?)")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def part_results(spawned, name: str) -> list[dict]:
    results = [r[name] for r in spawned]
    for rank, r in enumerate(results):
        if isinstance(r, dict) and "error" in r:
            pytest.fail(f"part {name!r} raised on rank {rank}:\n{r['error']}")
    return results


# ----------------------------------------------------------------------------- DDP / FSDP2 vs reference


@pytest.mark.parametrize("part", [pytest.param("ddp", id="ddp"), pytest.param("fsdp2", id="fsdp2-fully_shard")])
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
