"""Fine-tune a transformers Qwen3-MoE with moe_kit: convert, train with expert-bias balancing, save.

    pip install 'moe-kit[hf]'
    python examples/finetune_hf_moe.py [--steps 300] [--balance bias|none] [--out DIR]

1. Builds a tiny Qwen3-MoE from its config class (no download).
2. `moe_kit.integrations.hf.convert(model, expert_bias=True)` swaps each sparse-MoE block for a
   moe_kit.MoELayer holding the same tensors (same logits), with aux-loss-free balancing on.
3. Trains a few hundred steps on CPU on synthetic next-token data (a random sparse Markov chain,
   so the best possible loss is known), calling `moe_kit.update_expert_bias(model)` after every
   optimizer step; prints the loss and each layer's routing balance (max / mean expert load).
4. `save_pretrained` on the converted model writes a normal transformers checkpoint (the
   converted layers save under Qwen3-MoE's own key names; no convert_back needed), and a plain
   `from_pretrained` reload is checked against the trained model. Qwen3-MoE has no place for the
   learned expert bias: save_pretrained warns, and writes it under moe_kit's name
   (`...mlp.gate.expert_bias`, which transformers reports as an unexpected key and ignores) and to
   moe_kit_state.safetensors beside the checkpoint; `convert(reloaded, expert_bias=True)` +
   `load_state_dict` of that file brings it back.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file

import moe_kit
from moe_kit import MoELayer
from moe_kit.integrations import hf

try:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
    from transformers.utils.logging import disable_progress_bar
except ImportError as error:  # pragma: no cover
    raise SystemExit("this example needs transformers: pip install 'moe-kit[hf]'") from error

VOCAB, SEQ, BATCH = 256, 32, 16


class MarkovText:
    """Token sequences from a random sparse Markov chain: each token has 4 possible successors."""

    def __init__(self, vocab: int, fanout: int = 4, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.next_tokens = torch.stack([torch.randperm(vocab, generator=gen)[:fanout] for _ in range(vocab)])
        weights = -torch.rand(vocab, fanout, generator=gen).log()  # normalized: Dirichlet(1, ..., 1)
        self.next_probs = weights / weights.sum(dim=-1, keepdim=True)  # [V, fanout]
        self.gen = gen

    def batch(self, batch: int, seq: int) -> torch.Tensor:
        ids = torch.empty(batch, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, self.next_tokens.shape[0], (batch,), generator=self.gen)
        for t in range(1, seq):
            choice = torch.multinomial(self.next_probs[ids[:, t - 1]], 1, generator=self.gen).squeeze(1)
            ids[:, t] = self.next_tokens[ids[:, t - 1], choice]
        return ids

    def best_loss(self, ids: torch.Tensor) -> float:
        """Mean -log p(next | current) under the true chain: no model can do better on average."""
        probs = self.next_probs[ids[:, :-1]]  # [B, S-1, fanout]
        hit = self.next_tokens[ids[:, :-1]] == ids[:, 1:, None]
        return float(-(probs * hit).sum(-1).log().mean())


def tiny_qwen3_moe(seed: int = 0) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=SEQ, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    return Qwen3MoeForCausalLM(config)


def balance_line(loads: dict[str, torch.Tensor]) -> str:
    """'layer: max/mean' for the expert loads summed over the last logging window."""
    return "  ".join(f"L{name.split('.')[2]} {float(load.max() / load.float().mean()):.2f}"
                     for name, load in loads.items())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--balance", choices=["bias", "none"], default="bias", help="expert-bias updates or none")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1 is fastest for this size)")
    parser.add_argument("--out", type=Path, default=None, help="checkpoint folder (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    disable_progress_bar()

    data = MarkovText(VOCAB)
    model = tiny_qwen3_moe().train()
    probe = data.batch(4, SEQ)
    with torch.no_grad():
        hf_logits = model(probe).logits
    names = hf.convert(model, expert_bias=args.balance == "bias", bias_update_rate=1e-3)
    with torch.no_grad():
        err = rel_err(model(probe).logits, hf_logits)
    print(f"converted {names} to MoELayer; logits vs transformers: rel. error {err:.1e}")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    window = {name: torch.zeros(8, dtype=torch.long) for name in names}
    start, losses = time.time(), []
    for step in range(1, args.steps + 1):
        ids = data.batch(BATCH, SEQ)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        moe_kit.update_expert_bias(model)  # no-op when --balance none
        losses.append(loss.item())
        for name, stats in moe_kit.routing_stats(model).items():
            window[name] += stats.load
        if step == 1 or step % args.log_every == 0:
            mean = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
            print(f"step {step:4d}  loss {mean:.3f}  balance (max/mean load) {balance_line(window)}"
                  f"  {time.time() - start:5.1f}s")
            window = {name: torch.zeros_like(load) for name, load in window.items()}

    model.eval()
    held_out = data.batch(64, SEQ)
    with torch.no_grad():
        out = model(held_out, labels=held_out)
        trained_logits = out.logits
    print(f"held-out loss {out.loss.item():.3f} (uniform guess {math.log(VOCAB):.3f}, "
          f"best possible {data.best_loss(held_out):.3f})")
    for name, stats in moe_kit.routing_stats(model).items():
        bias = "off" if stats.bias is None else f"[{stats.bias.min():+.3f}, {stats.bias.max():+.3f}]"
        print(f"  {name}: load {stats.load.tolist()}  max/mean {stats.max_over_mean_load:.2f}  bias {bias}")

    # Save a transformers checkpoint straight from the converted model (transformers key names).
    has_bias = any(isinstance(m, MoELayer) and m.gate.expert_bias is not None for m in model.modules())
    with tempfile.TemporaryDirectory() if args.out is None else nullcontext(args.out) as out_dir:
        save_and_reload(model, has_bias, Path(out_dir), held_out, trained_logits)


def save_and_reload(model, has_bias: bool, out_dir: Path, held_out: torch.Tensor, trained_logits: torch.Tensor):
    """save_pretrained of the converted model, a plain transformers reload, and (with the expert
    bias) convert + load_state_dict of the checkpoint, each compared with the trained model."""
    model.save_pretrained(out_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        plain = reloaded(held_out).logits
    print(f"saved to {out_dir}; reloaded transformers model vs trained: rel. error {rel_err(plain, trained_logits):.1e}"
          f"{' (expert bias not applied: Qwen3-MoE has none)' if has_bias else ''}")
    if has_bias:
        hf.convert(reloaded, expert_bias=True)
        biases = load_file(out_dir / "moe_kit_state.safetensors")  # under the model's own key names
        missing, unexpected = reloaded.load_state_dict(biases, strict=False)
        assert not unexpected and len(biases) == 2, (unexpected, list(biases))
        with torch.no_grad():
            again = reloaded(held_out).logits
        print(f"reloaded + convert(expert_bias=True) + the checkpoint's expert bias: "
              f"rel. error {rel_err(again, trained_logits):.1e}")


if __name__ == "__main__":
    main()
