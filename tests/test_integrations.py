"""moe_kit.swap_ffn, moe_kit.upcycle (copies and fine-grained split), and torch.compile of MoELayer.

No transformers needed here (tests/test_hf.py covers the HF bridge).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from functools import partial

import conftest
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_kit
from moe_kit import Expert, MoEConfig, MoELayer
from moe_kit.ops import moe_ffn

D, FF = 32, 48  # model width, dense hidden width


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny layers: one intra-op thread (on a busy 2-core box, OpenMP barriers of a 2-thread run
    wait for descheduled threads and make every op ~100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


rel_err = partial(conftest.rel_err, floor=1e-6)  # floor: see conftest.rel_err


class SwiGLU(nn.Module):
    """A Llama-style dense MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim=D, hidden=FF, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(D, D)
        self.mlp = SwiGLU()

    def forward(self, x):
        return x + self.mlp(x + self.attn(x))


class Toy(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(n))
        self.final_ffn = SwiGLU()
        self.mlps = nn.ModuleList([SwiGLU()])  # a container named like an FFN: not an FFN itself

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.final_ffn(x)


def cfg_for(**overrides) -> MoEConfig:
    return MoEConfig(**{**dict(hidden_size=D, intermediate_size=FF, num_experts=4, top_k=2, norm_topk_prob=True,
                               backend="torch"), **overrides})


# ----------------------------------------------------------------------------- swap_ffn


def test_swap_ffn_default_filter_replaces_mlps_and_returns_names():
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(2, 5, D)
    dense_out = model(x)
    names = moe_kit.swap_ffn(model, lambda name, mlp: moe_kit.upcycle(mlp, cfg_for()))
    assert names == ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp", "final_ffn"]  # not the `mlps` list
    assert all(isinstance(model.get_submodule(n), MoELayer) for n in names)
    assert isinstance(model.layers[1].mlp, MoELayer) and isinstance(model.layers[1].attn, nn.Linear)
    assert rel_err(model(x), dense_out) < 1e-5  # upcycled copies with norm_topk_prob: same function
    with pytest.warns(UserWarning, match="replaced nothing"):
        assert moe_kit.swap_ffn(model, lambda n, m: pytest.fail("swapped twice")) == []  # MoELayers are skipped


def test_swap_ffn_passes_the_layer_index_to_make_layer_that_takes_it():
    """A DeepSeek-V4-style config hashes only the first n_hash_layers layers: make_layer gets each
    module's layer index (the number in its name) when it takes `layer_id`."""
    model = Toy()
    cfg = cfg_for(n_hash_layers=1, vocab_size=50)
    seen = []

    def make(name, mlp, layer_id):
        seen.append((name, layer_id))
        return moe_kit.upcycle(mlp, cfg, layer_id)

    moe_kit.swap_ffn(model, make, filter_fn=lambda n, m: n.startswith("layers.") and n.endswith(".mlp"))
    assert seen == [("layers.0.mlp", 0), ("layers.1.mlp", 1), ("layers.2.mlp", 2)]
    gates = [type(model.layers[i].mlp.gate).__name__ for i in range(3)]
    assert gates == ["HashGate", "TopKGate", "TopKGate"]
    kwargs = []
    moe_kit.swap_ffn(Toy(), lambda name, mlp, **kw: kwargs.append(kw) or nn.Identity())  # **kwargs gets it too
    assert [kw["layer_id"] for kw in kwargs] == [0, 1, 2, 3]  # final_ffn has no number: its rank among picks


def test_swap_ffn_warns_when_nothing_matches():
    encoder = nn.TransformerEncoderLayer(d_model=D, nhead=4, dim_feedforward=FF)  # FFN in linear1 / linear2
    with pytest.warns(UserWarning, match="linear1"):
        assert moe_kit.swap_ffn(encoder, lambda n, m: pytest.fail("nothing to swap")) == []


def test_swap_ffn_custom_filter_inside_containers_and_no_descent():
    torch.manual_seed(0)
    model = Toy()
    seen = []

    def make(name, module):
        seen.append((name, type(module).__name__))
        return nn.Identity()

    names = moe_kit.swap_ffn(model, make, filter_fn=lambda n, m: isinstance(m, (Block, SwiGLU)))
    assert names == ["layers.0", "layers.1", "layers.2", "final_ffn", "mlps.0"]  # layers.i.mlp not visited
    assert [kind for _, kind in seen] == ["Block"] * 3 + ["SwiGLU"] * 2
    assert isinstance(model.layers[0], nn.Identity) and isinstance(model.mlps[0], nn.Identity)
    assert len(model.layers) == 3


def test_swap_ffn_root_never_replaced_and_errors():
    mlp = SwiGLU()
    assert moe_kit.swap_ffn(mlp, lambda n, m: nn.Identity(), filter_fn=lambda n, m: True) == [
        "gate_proj", "up_proj", "down_proj", "act_fn"
    ]
    with pytest.raises(TypeError, match="must return an nn.Module"):
        moe_kit.swap_ffn(Toy(), lambda n, m: "not a module")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        moe_kit.swap_ffn("model", lambda n, m: m)


# ----------------------------------------------------------------------------- upcycle


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="softmax-k2"),
        pytest.param(dict(top_k=1), id="k1"),
        pytest.param(dict(top_k=4), id="k=E"),
        pytest.param(dict(score_func="sigmoid", expert_bias=True), id="sigmoid-bias"),
        pytest.param(dict(score_func="sqrtsoftplus", n_groups=2, topk_groups=1), id="sqrtsoftplus-groups"),
        pytest.param(dict(hash_routing=True, vocab_size=50), id="hash"),
        pytest.param(dict(num_shared_experts=1, shared_intermediate_size=16, shared_expert_gate=True), id="shared"),
    ],
)
def test_upcycle_copies_equal_dense_at_init(overrides):
    torch.manual_seed(0)
    dense = SwiGLU()
    layer = moe_kit.upcycle(dense, cfg_for(**overrides))
    x = torch.randn(3, 7, D, requires_grad=True)
    ids = torch.randint(0, 50, (3, 7))
    out = layer(x, ids if overrides.get("hash_routing") else None)
    assert rel_err(out, dense(x)) < 1e-6
    for e in range(4):  # every expert is the dense MLP
        assert torch.equal(layer.experts.gate_up_proj[e], torch.cat([dense.gate_proj.weight, dense.up_proj.weight]))
        assert torch.equal(layer.experts.down_proj[e], dense.down_proj.weight)
    assert layer.gate.weight.abs().max() < 0.1  # small router
    out.square().sum().backward()  # and it trains
    assert layer.experts.gate_up_proj.grad.abs().sum() > 0


def test_upcycle_without_renormalization_is_not_dense():
    torch.manual_seed(0)
    dense = SwiGLU()
    layer = moe_kit.upcycle(dense, cfg_for(norm_topk_prob=False))
    x = torch.randn(16, D)
    assert rel_err(layer(x), dense(x)) > 0.1  # softmax weights of 2 of 4 experts sum to ~0.5


def test_upcycle_fine_grained_split():
    """F=48 split in g=3 pieces of 16 units, 6 experts: expert e holds piece e % 3, down scaled by 3."""
    torch.manual_seed(0)
    dense = SwiGLU()
    cfg = cfg_for(intermediate_size=16, num_experts=6, top_k=3)
    layer = moe_kit.upcycle(dense, cfg)
    gate_up, down = layer.experts.gate_up_proj, layer.experts.down_proj
    for e in range(6):
        piece = slice(16 * (e % 3), 16 * (e % 3 + 1))
        assert torch.equal(gate_up[e, :16], dense.gate_proj.weight[piece])
        assert torch.equal(gate_up[e, 16:], dense.up_proj.weight[piece])
        assert torch.equal(down[e], 3 * dense.down_proj.weight[:, piece])
    x = torch.randn(10, D)
    # exact when a token's k = g experts hold each piece once with weight 1/g
    for chosen in ([0, 1, 2], [3, 4, 5], [0, 4, 2]):
        idx = torch.tensor(chosen).expand(10, 3)
        out = moe_ffn(x, torch.full((10, 3), 1 / 3), idx, gate_up.detach(), down.detach())
        assert rel_err(out, dense(x)) < 1e-6, chosen
    # in expectation over uniform choices of k = 3 of the 6 experts (all 20 subsets, weight 1/3 each)
    subsets = torch.combinations(torch.arange(6), 3)  # [20, 3]
    every = moe_ffn(x.repeat(20, 1), torch.full((200, 3), 1 / 3), subsets.repeat_interleave(10, dim=0),
                    gate_up.detach(), down.detach())  # [20 * 10, D], subset-major
    assert rel_err(every.view(20, 10, D).mean(dim=0), dense(x)) < 1e-6


def test_upcycle_keeps_device_dtype_and_expert_module():
    dense = Expert(D, FF).to(torch.bfloat16)
    layer = moe_kit.upcycle(dense, cfg_for(expert_bias=True))
    assert layer.experts.gate_up_proj.dtype == torch.bfloat16 and layer.gate.expert_bias.dtype == torch.float32
    x = torch.randn(4, D, dtype=torch.bfloat16)
    assert rel_err(layer(x), dense(x)) < 2e-2


@pytest.mark.parametrize(
    "dense, overrides, match",
    [
        pytest.param(SwiGLU(), dict(intermediate_size=20), "divide", id="width-not-divisor"),
        pytest.param(SwiGLU(), dict(intermediate_size=16, num_experts=4), "multiple of 3", id="experts-not-multiple"),
        pytest.param(SwiGLU(), dict(hidden_size=16), "hidden_size=16", id="wrong-width"),
        pytest.param(SwiGLU(bias=True), {}, "bias", id="bias"),
        pytest.param(nn.Linear(D, D), {}, "gate_proj", id="not-swiglu"),
    ],
)
def test_upcycle_errors(dense, overrides, match):
    with pytest.raises(ValueError, match=match):
        moe_kit.upcycle(dense, cfg_for(**overrides))


def test_upcycle_rejects_other_activation_and_bad_cfg():
    dense = SwiGLU()
    dense.act_fn = nn.GELU()
    with pytest.raises(ValueError, match="silu"):
        moe_kit.upcycle(dense, cfg_for())
    with pytest.raises(TypeError, match="MoEConfig"):
        moe_kit.upcycle(SwiGLU(), dict(hidden_size=D))


def test_import_moe_kit_does_not_import_transformers():
    code = "import sys, moe_kit; moe_kit.swap_ffn; moe_kit.upcycle; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- torch.compile


@pytest.fixture(scope="module")
def inductor():
    """Skip when inductor cannot build C++ kernels on this machine."""
    torch._dynamo.reset()
    try:
        torch.compile(lambda t: t.sin() + 1)(torch.randn(8))
    except Exception as error:  # noqa: BLE001 - any toolchain failure means "cannot test here"
        pytest.skip(f"torch.compile (inductor, CPU) unavailable here: {type(error).__name__}: {error}")


def _compile_vs_eager(dtype):
    """Eager vs torch.compile (inductor) of one MoELayer: outputs, grads of x and of every
    parameter, and the expert-bias counts. About 10 s of compilation on 2 CPU cores."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=32, intermediate_size=16, num_experts=8, top_k=2, backend="torch",
                    num_shared_experts=1, expert_bias=True, aux_loss_coef=1e-2)
    eager = MoELayer(cfg).to(dtype).train()
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer)
    x = torch.randn(2, 16, 32, dtype=dtype)
    results = []
    for layer, fn in ((eager, eager), (compiled_layer, compiled)):
        xx = x.clone().requires_grad_()
        out = fn(xx)
        F.mse_loss(out.float(), torch.ones_like(out, dtype=torch.float32)).backward()
        results.append((out, [xx.grad] + [p.grad for p in layer.parameters()], layer.gate.expert_counts.clone()))
    return results


def test_compile_moelayer_bf16_matches_eager(inductor):
    """bf16: compiles (with graph breaks, see moe_kit.integrations.hf docs) and matches eager."""
    (out0, grads0, counts0), (out1, grads1, counts1) = _compile_vs_eager(torch.bfloat16)
    assert rel_err(out1, out0) < 2e-2
    for g1, g0 in zip(grads1, grads0, strict=True):
        assert rel_err(g1, g0) < 3e-2
    assert torch.equal(counts1, counts0)


def test_compile_moelayer_fp32_matches_eager(inductor):
    """fp32: compiled code takes the padded-bmm path (grouped_mm's fake kernel is bf16-only)."""
    (out0, grads0, counts0), (out1, grads1, counts1) = _compile_vs_eager(torch.float32)
    assert rel_err(out1, out0) < 1e-5
    for g1, g0 in zip(grads1, grads0, strict=True):
        assert rel_err(g1, g0) < 1e-5
    assert torch.equal(counts1, counts0)


def test_activation_of_names_plain_gated_activations_only():
    """activation_of names act for act(gate) * up; quick_gelu is not "swiglu_oai" (which also adds 1
    to up), so a plain quick_gelu block is refused instead of converted to the wrong function."""
    from moe_kit.integrations.upcycle import activation_of

    assert activation_of(torch.nn.functional.silu) == "silu"
    assert activation_of(lambda t: torch.nn.functional.gelu(t, approximate="tanh")) == "gelu_tanh"
    assert activation_of(lambda t: t * torch.sigmoid(1.702 * t)) is None
    assert activation_of(torch.tanh) is None
