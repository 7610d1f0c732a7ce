"""Every parallel layout trains like one process (gloo on CPU, float64).

Layouts: DDP x2 (torch DDP), and moe_kit.distributed.parallelize on meshes ("dp", "ep") of shape
(1, 2) "EP x2", (1, 4) "EP x4", (2, 1) "FSDP2 x2" and (2, 2) "dp2 x ep2". One process is the
reference itself. Each layout is one spawn running every CASE for 3 AdamW steps; each rank feeds its
own rows of the global batch [B, S, D].

What is defined per rank, hence the matching reference ("units": the token sets routed together):
- token choice (softmax, sigmoid, hash): capacity, and the aux / z losses, are those of the ep
  group's tokens (moe_kit.group_balancing); with ep = 1 (DDP, FSDP2) of the rank's micro-batch, as
  Megatron's per-micro-batch aux loss. Units = ep groups. "global_batch" takes f from every rank.
- expert choice and sinkhorn balance among the tokens the gate sees: a rank's own. Units = ranks
  (their experts still see every token of the ep group through the all-to-all).
The reference runs one process per unit on the same weights: main loss weighted by the unit's share
of the global batch, balancing-loss gradients by 1/dp (the mean over ep groups); with one unit
(EP over the whole world) that is exactly one process on the global batch.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import run_ranks
from torch import nn

import moe_kit
from moe_kit import MoEConfig, MoELayer

D, INTER, B, S, STEPS, LR = 16, 12, 4, 6, 3, 1e-2
TOL = 2e-5
VOCAB = 50

# routing x capacity x token_mask: every value of each axis at least once, most pairs once
CASES = {
    "softmax-gb-z/none/mask": (dict(top_k=2, aux_loss_coef=0.1, aux_loss_type="global_batch", z_loss_coef=0.01), True),
    "softmax-gb-z/probs": (dict(top_k=2, aux_loss_coef=0.1, aux_loss_type="global_batch", z_loss_coef=0.01,
                                capacity_factor=1.0), False),
    "sigmoid-bias-seq/probs/mask": (dict(top_k=3, score_func="sigmoid", n_groups=4, topk_groups=2, expert_bias=True,
                                         aux_loss_coef=0.05, aux_loss_type="sequence", num_shared_experts=1,
                                         capacity_factor=1.0), True),
    "sigmoid-bias-seq/pad": (dict(top_k=3, score_func="sigmoid", n_groups=4, topk_groups=2, expert_bias=True,
                                  aux_loss_coef=0.05, aux_loss_type="sequence", capacity_factor=1.0,
                                  pad_to_capacity=True), False),
    "hash/none": (dict(top_k=2, hash_routing=True, vocab_size=VOCAB, aux_loss_coef=0.05), False),
    "hash/position/mask": (dict(top_k=2, hash_routing=True, vocab_size=VOCAB, capacity_factor=1.0,
                                drop_policy="position"), True),
    "softmax/position": (dict(top_k=2, capacity_factor=1.0, drop_policy="position"), False),
    "softmax/pad/mask": (dict(top_k=2, capacity_factor=1.0, pad_to_capacity=True, z_loss_coef=0.01), True),
    "expert-choice/mask": (dict(top_k=2, routing="expert_choice", capacity_factor=1.0), True),
    "expert-choice": (dict(top_k=2, routing="expert_choice", capacity_factor=1.0), False),
    "sinkhorn/none/mask": (dict(top_k=2, routing="sinkhorn"), True),
}
PER_RANK_ROUTING = ("expert_choice", "sinkhorn")
BUG_CASE = "softmax-gb-z/none/mask"
CKPT_CASE = "sigmoid-bias-seq/probs/mask"  # expert bias, shared expert: the DCP checks use this model
LAYOUTS = {"ddp2": (2, None), "ep2": (2, (1, 2)), "ep4": (4, (1, 4)), "fsdp2": (2, (2, 1)), "dp2ep2": (4, (2, 2))}


class Net(nn.Module):
    """Linear -> MoELayer -> Linear: dense parameters on both sides of the experts."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe = MoELayer(cfg)
        self.out = nn.Linear(D, D)

    def forward(self, x, ids=None, mask=None):
        return self.out(self.moe(self.inp(x), input_ids=ids, token_mask=mask))


def build(name: str) -> Net:
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=D, intermediate_size=INTER, num_experts=8, router_dtype=torch.float64,
                    **CASES[name][0])
    return Net(cfg).double()


def batch(name: str, step: int):
    """The global batch of `step`: x [B, S, D], ids [B, S], mask bool [B, S] or None, target [B, S, D]."""
    gen = torch.Generator().manual_seed(1000 * step + sum(map(ord, name)))
    x = torch.randn(B, S, D, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (B, S), generator=gen)
    mask = torch.rand(B, S, generator=gen) > 0.3
    mask[:, 0] = True
    target = torch.randn(B, S, D, generator=gen, dtype=torch.float64)
    return x, ids, (mask if CASES[name][1] else None), target


def loss_of(out, target):
    return (out - target).square().mean()


def _rows(t, first, count):
    return None if t is None else t[first : first + count]


# ----------------------------------------------------------------------------- one rank


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _names(model):
    return [(n.removeprefix("module."), p) for n, p in model.named_parameters()]


def _train(model, name, rank, world, fsdp):
    """3 steps on this rank's rows; returns what the parent compares."""
    rows = B // world
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    layer = next(m for m in model.modules() if isinstance(m, MoELayer))
    steps = []
    for step in range(STEPS):
        x, ids, mask, target = (_rows(t, rank * rows, rows) for t in batch(name, step))
        opt.zero_grad()
        out = model(x, ids, mask)
        loss_of(out, target).backward()
        grads = {n: _full(p.grad) for n, p in _names(model)}
        norm = moe_kit.distributed.clip_grad_norm_(model, 1e9) if fsdp else torch.nn.utils.clip_grad_norm_(
            model.parameters(), 1e9)
        stats = layer.stats
        steps.append(dict(out=out.detach(), grads=grads, norm=float(norm), aux=stats.aux_loss, z=stats.z_loss,
                          load=stats.load.clone()))
        opt.step()
        moe_kit.update_expert_bias(model)
        steps[-1]["bias"] = None if layer.gate.expert_bias is None else layer.gate.expert_bias.clone()
    params = {n: _full(p) for n, p in _names(model)}
    return dict(steps=steps, params=params)


def _state_dict(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in full.items()}


def _dcp_load(model, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = get_model_state_dict(model)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state)


def _rank_main(rank: int, world: int, layout: str, ckpt: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    from moe_kit.distributed import parallelize

    shape = LAYOUTS[layout][1]
    mesh = None if shape is None else init_device_mesh("cpu", shape, mesh_dim_names=("dp", "ep"))

    def wrap(model):
        if mesh is None:
            return nn.parallel.DistributedDataParallel(model)
        return parallelize(model, mesh)

    results = {}
    for name in CASES:
        model = wrap(build(name))
        results[name] = _train(model, name, rank, world, mesh is not None)
        if name == CKPT_CASE and mesh is not None:
            results["full_state_dict"] = _state_dict(model)
            dcp.save(_sharded(model), checkpoint_id=os.path.join(ckpt, layout))
    if layout == "ep2":
        results["mesh_errors"] = _mesh_errors()
        try:
            parallelize(build(CKPT_CASE), mesh).moe.reset_parameters()
            results["reset_error"] = None
        except ValueError as error:
            results["reset_error"] = str(error)
        results["sent"] = _sent_bytes(parallelize(build("softmax-gb-z/none/mask"), mesh), rank, world)
    if layout == "dp2ep2":
        results["bug_grads"] = _expert_grads_with_dp_divide(mesh, rank, world)
        results["clipped"] = _clip_twice(mesh, rank, world)
    if layout == "ep4":  # reshard: EP 2 -> EP 4, dp x ep (2, 2) -> (1, 4), then save for one process
        for source in ("ep2", "dp2ep2"):
            model = wrap(build(CKPT_CASE))
            _dcp_load(model, os.path.join(ckpt, source))
            results[f"loaded_{source}"] = _state_dict(model)
            if source == "dp2ep2":
                dcp.save(_sharded(model), checkpoint_id=os.path.join(ckpt, "dp2ep2_as_ep4"))
    return results


def _mesh_errors() -> list[str]:
    """parallelize's messages for meshes that are not ("dp", "ep")."""
    from torch.distributed.device_mesh import init_device_mesh

    from moe_kit.distributed import parallelize

    messages = []
    for shape, names in (((1, 2), ("data", "expert")), ((2,), ("ep",))):
        try:
            parallelize(build(CKPT_CASE), init_device_mesh("cpu", shape, mesh_dim_names=names))
        except ValueError as error:
            messages.append(str(error))
    return messages


def _sharded(model):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model)


def _sent_bytes(model, rank, world):
    """Bytes of token payload this rank sent in one forward's all-to-alls (both directions), as the
    dispatcher counts them (`layer.dispatcher.sent_bytes`)."""
    x, ids, mask, _ = (_rows(t, rank * (B // world), B // world) for t in batch("softmax-gb-z/none/mask", 0))
    model(x, ids, mask)
    return dict(sent=int(model.moe.dispatcher.sent_bytes), real_tokens=int(mask.sum()))


def _clip_twice(mesh, rank, world):
    """clip_grad_norm_ to half the norm, then the norm of what is left."""
    from moe_kit.distributed import clip_grad_norm_, parallelize

    model = parallelize(build(BUG_CASE), mesh)
    x, ids, mask, target = (_rows(t, rank * (B // world), B // world) for t in batch(BUG_CASE, 0))
    loss_of(model(x, ids, mask), target).backward()
    first = float(clip_grad_norm_(model, 1e9))
    clip_grad_norm_(model, first / 2)
    return first, float(clip_grad_norm_(model, 1e9))


def _expert_grads_with_dp_divide(mesh, rank, world):
    """The classic bug: FSDP's default divide factor (dp) on the expert parameters."""
    from moe_kit.distributed import parallelize

    name = BUG_CASE
    model = parallelize(build(name), mesh)
    model.moe.experts.set_gradient_divide_factor(float(mesh["dp"].size()))
    x, ids, mask, target = (_rows(t, rank * (B // world), B // world) for t in batch(name, 0))
    loss_of(model(x, ids, mask), target).backward()
    return {n: _full(p.grad) for n, p in _names(model) if ".experts." in n}


# ----------------------------------------------------------------------------- the reference


def reference(name: str, layout: str) -> dict:
    """One process per unit (see the module doc), the same weights, gradients summed."""
    world, shape = LAYOUTS[layout]
    dp, ep = (world, 1) if shape is None else shape
    cfg_kw = CASES[name][0]
    per_rank = cfg_kw.get("routing") in PER_RANK_ROUTING
    return dict(_reference(name, B // world if per_rank else B // dp, dp), ep=ep)


@functools.cache
def _reference(name: str, unit_rows: int, dp: int) -> dict:
    """reference() for units of `unit_rows` sequences, balancing-loss gradients times 1/dp (cached:
    several layouts share units; callers do not modify the result)."""
    units = B // unit_rows
    model = build(name)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    layer = model.moe
    layer.gate.loss_scale = 1.0 / dp
    steps = []
    global_batch = any(kind == "global_batch" for kind, _ in layer.cfg.aux_losses)
    for step in range(STEPS):
        x, ids, mask, target = batch(name, step)
        opt.zero_grad()
        own = []  # global_batch: each unit's own counts, so that every unit sees the whole step's
        if global_batch:
            with torch.no_grad():  # f of global_batch: every unit's counts, before any unit's loss
                for u in range(units):
                    before = torch.zeros(0) if layer.gate.global_batch_counts is None else \
                        layer.gate.global_batch_counts.clone()
                    model(*(_rows(t, u * unit_rows, unit_rows) for t in (x, ids, mask)))
                    after = layer.gate.global_batch_counts.clone()
                    own.append(after - before if before.numel() else after)
            total = layer.gate.global_batch_counts.clone()
        outs, auxes, zs, loads = [], [], [], []
        for u in range(units):
            xu, idu, mu, tu = (_rows(t, u * unit_rows, unit_rows) for t in (x, ids, mask, target))
            if global_batch:  # this forward adds its own counts back: the state is the step's total
                layer.gate.global_batch_counts = total - own[u]
            out = model(xu, idu, mu)
            (loss_of(out, tu) / units).backward()
            stats = layer.stats
            outs.append(out.detach())
            auxes.append(stats.aux_loss)
            zs.append(stats.z_loss)
            loads.append(stats.load.clone())
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))
        opt.step()
        moe_kit.update_expert_bias(model)
        bias = None if layer.gate.expert_bias is None else layer.gate.expert_bias.clone()
        steps.append(dict(out=torch.cat(outs), grads=grads, norm=norm, aux=auxes, z=zs, loads=loads, bias=bias))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return dict(steps=steps, params=params, state_dict=model.state_dict(), unit_rows=unit_rows)


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-6))


# ----------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every layout's rank results (ep2 and dp2ep2 before ep4, which loads their checkpoints)."""
    ckpt = str(tmp_path_factory.mktemp("dcp"))
    out = {}
    for layout in ("ddp2", "ep2", "fsdp2", "dp2ep2", "ep4"):
        world = LAYOUTS[layout][0]
        compute = functools.partial(_rank_main, layout=layout, ckpt=ckpt)
        out[layout] = run_ranks(compute, world, tmp_path_factory.mktemp(layout))
    out["ckpt"] = ckpt
    return out


def _compare(ranks: list[dict], name: str, layout: str) -> list[str]:
    ref = reference(name, layout)
    world, shape = LAYOUTS[layout]
    ep = 1 if shape is None else shape[1]
    rows = B // world
    bad = []

    def check(what, got, want):
        if want is None or got is None:
            if not (want is None and got is None):
                bad.append(f"{what}: {got} vs {want}")
            return
        err = rel(got, want)
        if not err <= TOL:
            bad.append(f"{what}: rel {err:.2e}")

    for rank, result in enumerate(ranks):
        group = rank // ep  # this rank's ep group: ranks group*ep .. group*ep + ep - 1
        for step, (got, want) in enumerate(zip(result["steps"], ref["steps"], strict=True)):
            tag = f"rank {rank} step {step}"
            check(f"{tag} out", got["out"], want["out"][rank * rows : (rank + 1) * rows])
            for n, g in got["grads"].items():
                check(f"{tag} grad {n}", g, want["grads"][n])
            check(f"{tag} grad norm", got["norm"], want["norm"])
            group_rows = (group * ep * rows, (group + 1) * ep * rows)
            units = [u for u in range(B // ref["unit_rows"])
                     if group_rows[0] <= u * ref["unit_rows"] < group_rows[1]]
            check(f"{tag} load", got["load"], sum(want["loads"][u] for u in units))
            if len(units) == 1:  # losses of the group: the unit's
                check(f"{tag} aux", got["aux"], want["aux"][units[0]])
                check(f"{tag} z", got["z"], want["z"][units[0]])
            check(f"{tag} expert bias", got["bias"], want["bias"])
        for n, p in result["params"].items():
            check(f"rank {rank} param {n} after {STEPS} steps", p, ref["params"][n])
    return bad


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(CASES))
def test_layout_trains_like_one_process(runs, layout, name):
    bad = _compare([r[name] for r in runs[layout]], name, layout)
    assert not bad, f"{layout} / {name}: " + "; ".join(bad[:8]) + f" ({len(bad)} in all)"


def test_expert_gradient_scaled_by_ep_is_caught(runs):
    """FSDP's default divide factor (dp) on experts that the all-to-all already fed every token of
    the ep group: expert gradients ep = 2 times too large. The comparison above flags it."""
    ref = reference(BUG_CASE, "dp2ep2")["steps"][0]["grads"]
    for rank in runs["dp2ep2"]:
        grads = rank["bug_grads"]
        assert grads  # the experts' gradients
        for n, g in grads.items():
            assert rel(g, 2 * ref[n]) <= TOL, n
            assert rel(g, ref[n]) > 0.5, n


@pytest.mark.parametrize("layout", ["ep2", "ep4", "fsdp2", "dp2ep2"])
def test_full_state_dict_is_the_single_process_state_dict(runs, layout):
    want = reference(CKPT_CASE, layout)["state_dict"]
    for rank in runs[layout]:
        got = rank["full_state_dict"]
        assert list(got) == list(want)
        for key in want:
            assert got[key].shape == want[key].shape, key
            assert rel(got[key], want[key]) <= TOL, key
    assert "moe.gate.expert_bias" in want and want["moe.experts.gate_up_proj"].shape[0] == 8


@pytest.mark.parametrize("source", ["ep2", "dp2ep2"])
def test_dcp_checkpoint_reshards_to_ep4(runs, source):
    """What the source layout saved (its full state dict, bit for bit) is what EP x4 loads."""
    want = runs[source][0]["full_state_dict"]
    for rank in runs["ep4"]:
        got = rank[f"loaded_{source}"]
        assert list(got) == list(want)
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_dcp_checkpoint_loads_in_one_process(runs):
    """dp x ep (2, 2) -> (1, 4) -> one process (no process group)."""
    import torch.distributed.checkpoint as dcp

    assert not dist.is_initialized()
    model = build(CKPT_CASE)
    state = model.state_dict()
    dcp.load(state, checkpoint_id=os.path.join(runs["ckpt"], "dp2ep2_as_ep4"), no_dist=True)
    model.load_state_dict(state)
    want = runs["dp2ep2"][0]["full_state_dict"]
    assert list(model.state_dict()) == list(want)
    for key, value in model.state_dict().items():
        assert torch.equal(value, want[key]), key


def test_all_to_all_bytes_match_the_formula(runs):
    """Every routed slot's D-vector goes to its expert's rank and back (fp64 here: 8 bytes), so
    the group's payload is 2 * k * real tokens * D * itemsize (no capacity: no weights travel)."""
    sent = [rank["sent"] for rank in runs["ep2"]]
    top_k = CASES["softmax-gb-z/none/mask"][0]["top_k"]
    real = sum(s["real_tokens"] for s in sent)
    assert sum(s["sent"] for s in sent) == 2 * top_k * real * D * 8
    assert all(s["sent"] > 0 for s in sent)


def test_parallelize_rejects_a_mesh_not_named_dp_ep(runs):
    for rank in runs["ep2"]:
        assert len(rank["mesh_errors"]) == 2
        assert all("('dp', 'ep')" in message for message in rank["mesh_errors"])


def test_reset_parameters_of_parallelized_experts_raises(runs):
    """A parallelized layer's DTensor experts are not re-drawn in place (which shard gets which
    draw?): reset_parameters raises a ValueError saying to initialize before parallelize."""
    for rank in runs["ep2"]:
        assert rank["reset_error"] is not None and "before parallelize" in rank["reset_error"]


def _example_rank(rank: int, world: int, ckpt: str) -> float:
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    import train_parallel

    return train_parallel.main(["--dp", "1", "--ep", "2", "--steps", "2", "--batch", "2", "--seq", "16",
                                "--ckpt", ckpt])


def test_train_parallel_example(tmp_path):
    """examples/train_parallel.py on 2 ranks (ep 2): trains, and its DCP checkpoint loads in one process."""
    import sys

    import torch.distributed.checkpoint as dcp

    ckpt = str(tmp_path / "ckpt")
    losses = run_ranks(functools.partial(_example_rank, ckpt=ckpt), 2, tmp_path)
    assert all(0 < loss < 10 for loss in losses)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    import train_parallel

    model = train_parallel.build_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dcp.load(state, checkpoint_id=ckpt, no_dist=True)
    initial = model.state_dict()
    assert not torch.equal(state["blocks.1.mlp.experts.down_proj"], initial["blocks.1.mlp.experts.down_proj"])
    assert state["blocks.0.mlp.gate.expert_bias"].abs().sum() > 0  # 2 bias steps, restored too
    model.load_state_dict(state)  # every key, full [E, ...] experts


def test_clip_grad_norm_clips_to_the_single_process_norm(runs):
    want = reference(BUG_CASE, "dp2ep2")["steps"][0]["norm"]
    for rank in runs["dp2ep2"]:
        first, after = rank["clipped"]
        assert abs(first - want) <= TOL * want
        assert abs(after - want / 2) <= 1e-5 * want
