"""Coverage of transformers' MoE families by moe_kit.integrations.hf, measured on the installed transformers.

    python benchmarks/hf_coverage.py [--families qwen2_moe,mixtral] [--compile] [--json OUT] [--md docs/hf_coverage.md]

For every model family whose modeling file uses `@use_experts_implementation`, a tiny causal LM is
built from the family's config class (sizes shrunk by name: hidden 32, 8 experts, k 2, 2 layers,
...; families whose config does not build that way are listed with the error), in fp32 train mode
with decisive routers (router std 0.4, experts std 0.25 and their biases too, random expert bias). Then:
- experts implementation: `hf.register(model)` (experts on moe_kit, transformers' router);
- convert: `hf.convert(model)` (the whole block a MoELayer), whose state_dict must list the same
  keys, shapes and dtypes as transformers' (what save_pretrained writes); convert_back restores the
  blocks and the state_dict must load strictly into a fresh model of the class;
- compile (with --compile): `torch.compile(model, fullgraph=True, backend="aot_eager")`, forward
  and backward, in both modes, and of the unmodified transformers model for reference (a family
  that fails there fails for reasons outside moe_kit).
Each cell is the worst normwise relative error of the logits and of every parameter's gradient
against transformers' eager experts, or the reason it is refused. Data first (--json), the
markdown table is made from it (--md).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import time
import warnings

import torch
import transformers

import moe_kit
from moe_kit.integrations import hf
from moe_kit.integrations.hf.convert import _convert
from moe_kit.integrations.hf.specs import VERIFIED

SHRINK = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_local_experts=8,
    n_routed_experts=8, moe_num_experts=8, num_experts_per_tok=2, moe_topk=2, max_position_embeddings=64,
    first_k_dense_replace=0, n_group=2, topk_group=1, shared_expert_intermediate_size=24,
    shared_intermediate_size=24, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8,
    v_head_dim=8, router_jitter_noise=0.0, input_jitter_noise=0.0, sliding_window=16, pad_token_id=0,
    bos_token_id=1, eos_token_id=2, use_cache=False, shared_expert_combination_strategy="sum",
)
SEQ = 8


def moe_families() -> list[str]:
    root = os.path.dirname(transformers.__file__)
    found = []
    for path in sorted(glob.glob(os.path.join(root, "models", "*", "modeling_*.py"))):
        with open(path) as f:
            if "@use_experts_implementation" in f.read():
                found.append(os.path.basename(os.path.dirname(path)))
    return found


# Second tries for configs the plain shrink does not build: MLA attention wants as many KV heads
# as query heads, some configs leave the shared-expert count unset.
DROP = object()  # leave the config's default
RETRIES = (
    {},
    dict(num_key_value_heads=4),
    dict(num_key_value_heads=4, head_dim=DROP),
    dict(num_key_value_heads=4, head_dim=DROP, n_group=1, topk_group=1),
    dict(num_key_value_heads=4, head_dim=DROP, n_group=1, topk_group=1, n_shared_experts=1, num_shared_experts=1),
)
MAX_PARAMS = 5_000_000  # a config the shrink did not reach (e.g. a nested text_config) is not built


def tiny_model(family: str, retry: int = 0):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if family not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise LookupError("no causal-LM class")
    config_cls = CONFIG_MAPPING[family]
    defaults = config_cls().to_dict()
    kwargs = {k: v for k, v in {**SHRINK, **RETRIES[retry]}.items() if k in defaults and v is not DROP}
    config = config_cls(**kwargs)
    model_cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family])
    with torch.device("meta"):
        size = sum(p.numel() for p in model_cls(config).parameters())
    if size > MAX_PARAMS:
        raise LookupError(f"the shrunk config still has {size / 1e6:.0f}M parameters (nested sub-configs?)")
    torch.manual_seed(0)
    return model_cls(config)


def first_building(family: str):
    """(retry index, model, ids, eager result) of the first shrink that builds and runs."""
    ids = torch.randint(3, 96, (2, SEQ), generator=torch.Generator().manual_seed(1))
    error = None
    for retry in range(len(RETRIES)):
        try:
            model = strengthen(tiny_model(family, retry)).train()
            state = {k: v.clone() for k, v in model.state_dict().items()}
            return retry, state, ids, run(model, ids)
        except LookupError:
            raise
        except Exception as caught:  # noqa: BLE001 - try the next shrink
            error = caught
    raise error


@torch.no_grad()
def strengthen(model):
    for name, module in model.named_modules():
        if isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter):
            module.gate_up_proj.normal_(0.0, 0.25)
            module.down_proj.normal_(0.0, 0.25)
            for attr in ("gate_up_proj_bias", "down_proj_bias"):  # gpt-oss: transformers starts them at zero
                if isinstance(getattr(module, attr, None), torch.nn.Parameter):
                    getattr(module, attr).normal_(0.0, 0.25)
        if name.endswith(("mlp.gate", "mlp.router", "moe.gate", "block_sparse_moe.gate")):
            for p in module.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.4)
        for attr in ("e_score_correction_bias", "expert_bias"):
            tensor = getattr(module, attr, None)
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                tensor.normal_(0.0, 0.05)
        if isinstance(getattr(module, "tid2eid", None), torch.Tensor):  # hash layers: a balanced table
            vocab, top_k = module.tid2eid.shape
            module.tid2eid.copy_(moe_kit.hash_table(vocab, module.num_experts, top_k, seed=1))
    return model


def rel(a, b, floor=1e-8):
    return float((a.double() - b.double()).norm() / max(float(b.double().norm()), floor))


def run(model, ids, fn=None, converted=False):
    """Logits and {name: grad}; with `converted`, grads are read after convert_back (the same
    parameter objects under the transformers names)."""
    model.zero_grad(set_to_none=True)
    out = (model if fn is None else fn)(input_ids=ids, labels=ids)
    out.loss.backward()
    if converted:
        hf.convert_back(model)
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def parity(got, ref) -> float:
    (logits, grads), (ref_logits, ref_grads) = got, ref
    worst = rel(logits, ref_logits)
    for name, grad in ref_grads.items():
        if name in grads:
            worst = max(worst, rel(grads[name], grad))
        elif grad.abs().max() > 0:
            return float("inf")
    return worst


def short(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{type(error).__name__}: {text}"[:220]


def block_classes(family: str) -> list[type]:
    """The classes of `family`'s modeling file that build a `.experts` module (MoE blocks)."""
    import importlib
    import inspect

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    found = []
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ == module.__name__ and issubclass(cls, torch.nn.Module):
            source = inspect.getsource(cls.__init__) if "__init__" in vars(cls) else ""
            if "self.experts =" in source and "self.self_attn" not in source:
                found.append(cls)
    return found


def tiny_text_config(family: str, retry: int):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[family]
    config_cls = (getattr(config_cls, "sub_configs", None) or {}).get("text_config", config_cls)
    defaults = config_cls().to_dict()
    return config_cls(**{k: v for k, v in {**SHRINK, **RETRIES[retry]}.items() if k in defaults and v is not DROP})


def tiny_block(cls: type, family: str):
    """(block, config) of the first shrink under which `cls` builds and runs a forward."""
    import inspect

    error = None
    for retry in range(len(RETRIES)):
        try:
            config = tiny_text_config(family, retry)
            torch.manual_seed(0)
            if "layer_idx" in inspect.signature(cls.__init__).parameters:  # the last layer: no hash routing
                block = cls(config, layer_idx=config.num_hidden_layers - 1)
            else:
                block = cls(config)
            with torch.no_grad():  # a bare block is not initialized by transformers: no torch.empty garbage
                for param in block.parameters():
                    param.normal_(0.0, 0.1)
            block(torch.randn(1, 3, config.hidden_size))
            return block, config
        except Exception as caught:  # noqa: BLE001 - try the next shrink
            error = caught
    raise error


def measure_blocks(family: str, why: str) -> dict:
    """Block-level parity when no tiny causal LM builds: each MoE block class of the family, built
    from the shrunk text config, against its converted MoELayer (output and gradients)."""
    row = {"family": family, "build": f"block only ({why[:80]})", "level": "block"}
    try:
        classes = block_classes(family)
    except Exception as error:  # noqa: BLE001
        row["build"] = f"{why}; block: {short(error)}"
        return row
    if not classes:
        row["build"] = why
        return row
    worst, blocks, errors, unbuilt = 0.0, [], [], []
    for cls in classes:
        try:
            block, config = tiny_block(cls, family)
        except Exception as error:  # noqa: BLE001 - transformers' own block does not run at these sizes
            unbuilt.append(f"{cls.__name__} not built: {short(error)}")
            continue
        try:
            holder = torch.nn.Module()
            holder.mlp = strengthen(block).train()
            x = torch.randn(2, SEQ, config.hidden_size, generator=torch.Generator().manual_seed(2))
            ref = block_run(holder, x)
            layout = state_layout(holder)
            _convert(holder, {}, verified_only=False)
            if state_layout(holder) != layout:
                raise AssertionError("the converted block's state_dict differs from transformers' (keys/shapes/dtypes)")
            got = block_run(holder, x, converted=True)
            worst = max(worst, parity(got, ref))
            blocks.append(cls.__name__)
        except Exception as error:  # noqa: BLE001
            errors.append(f"{cls.__name__}: {short(error)}")
    row["blocks"] = [cls.__name__ for cls in classes]
    if blocks or errors:
        row["convert"] = "; ".join(errors)[:300] if errors else worst
        row["verified"] = all(b in VERIFIED for b in blocks)
    else:
        row["build"] = f"{why}; " + "; ".join(unbuilt)[:300]
    return row


def state_layout(module) -> list:
    """[(key, shape, dtype)] of a state_dict: what a checkpoint written from it looks like."""
    return [(k, tuple(v.shape), v.dtype) for k, v in module.state_dict().items()]


def block_run(holder, x, converted=False):
    holder.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_()
    out = holder.mlp(xx)
    out = out[0] if isinstance(out, tuple) else out
    out.square().mean().backward()
    if converted:
        hf.convert_back(holder)
    grads = {n: p.grad for n, p in holder.named_parameters() if p.grad is not None}
    grads["input"] = xx.grad
    return out.detach(), grads


def measure(family: str, do_compile: bool) -> dict:
    row = {"family": family}
    try:
        retry, state, ids, ref = first_building(family)
    except Exception as error:  # noqa: BLE001 - record why the tiny model does not build or run
        return measure_blocks(family, short(error))

    def fresh():
        model = tiny_model(family, retry)
        model.load_state_dict(state)
        return model.train()

    row["build"] = "ok"
    row["blocks"] = sorted({type(m).__name__ for m in fresh().modules() if hf.is_moe_block(m)})
    if not row["blocks"]:
        return measure_blocks(family, "the tiny config has no MoE layer")
    try:
        model = fresh()
        hf.register(model)
        row["experts_impl"] = parity(run(model, ids), ref)
    except Exception as error:  # noqa: BLE001
        row["experts_impl"] = short(error)
    try:
        model = fresh()
        verified = all(b in VERIFIED for b in row["blocks"])
        layout = state_layout(model)
        _convert(model, {}, verified_only=False)
        if state_layout(model) != layout:
            raise AssertionError("the converted model's state_dict differs from transformers' (keys/shapes/dtypes)")
        row["convert"] = parity(run(model, ids, converted=True), ref)
        row["verified"] = verified
        clean = tiny_model(family, retry)
        clean.load_state_dict(model.state_dict())
        row["convert_back"] = parity(run(clean.train(), ids), ref)
    except Exception as error:  # noqa: BLE001
        row.setdefault("convert", short(error))
        row.setdefault("convert_back", "-")
    if do_compile:
        for mode in ("eager", "experts_impl", "convert"):
            if mode != "eager" and not isinstance(row.get(mode), float):
                row[f"compile_{mode}"] = "-"
                continue
            try:
                torch._dynamo.reset()
                model = fresh()
                if mode == "experts_impl":
                    hf.register(model)
                elif mode == "convert":
                    _convert(model, {}, verified_only=False)
                compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
                row[f"compile_{mode}"] = parity(run(model, ids, compiled, converted=mode == "convert"), ref)
            except Exception as error:  # noqa: BLE001
                row[f"compile_{mode}"] = short(error)
    return row


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.1e}"
    if value is None:
        return "-"
    return str(value).replace("|", "/")


def summary(rows: list[dict]) -> str:
    def ok(row, key):
        return isinstance(row.get(key), float) and row[key] <= 1e-3

    models = [r for r in rows if r.get("build") == "ok"]
    blocks = [r for r in rows if r.get("level") == "block" and "convert" in r]
    converted = [r for r in models + blocks if ok(r, "convert") and r.get("verified")]
    return (
        f"{len(rows)} families use transformers' experts interface; {len(models)} tiny causal LMs built, "
        f"{len(blocks)} more families measured block by block. Experts implementation equal to eager: "
        f"{sum(ok(r, 'experts_impl') for r in models)} of {len(models)}; `hf.convert`: {len(converted)} families; "
        f"fullgraph compile equal to eager: {sum(ok(r, 'compile_experts_impl') for r in models)} (experts "
        f"implementation) and {sum(ok(r, 'compile_convert') for r in models)} (convert) of the "
        f"{sum(ok(r, 'compile_eager') for r in models)} whose unmodified transformers model compiles."
    )


def markdown(rows: list[dict], env: dict) -> str:
    lines = [
        "# transformers MoE families on moe_kit",
        "",
        f"Generated by `python benchmarks/hf_coverage.py` on transformers {env['transformers']}, torch {env['torch']} "
        f"({env['machine']}). Tiny fp32 models from each family's config class, train mode; each number is the worst "
        "normwise relative error of logits and parameter gradients against transformers' eager experts. "
        "`convert` numbers for blocks not in `specs.VERIFIED` are measured with the check bypassed; "
        "`hf.convert` itself refuses them.",
        "",
        summary(rows),
        "",
        "| family | MoE block | experts implementation | convert | convert_back | compile (experts impl.) "
        "| compile (convert) | compile (transformers' own experts, for reference) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.get("level") == "block" and "convert" in row:
            lines.append(
                f"| {row['family']} | {', '.join(row.get('blocks', []))} (block alone: {cell(row['build'])}) | "
                f"- | {cell(row['convert'])}{'' if row.get('verified') else ' (not in VERIFIED)'} | - | - | - | - |"
            )
            continue
        if row.get("build") != "ok":
            lines.append(f"| {row['family']} | not built: {cell(row.get('build'))} | | | | | | |")
            continue
        convert = cell(row.get("convert"))
        if isinstance(row.get("convert"), float) and not row.get("verified"):
            convert += " (not in VERIFIED)"
        lines.append(
            f"| {row['family']} | {', '.join(row.get('blocks', []))} | {cell(row.get('experts_impl'))} | {convert} "
            f"| {cell(row.get('convert_back'))} | {cell(row.get('compile_experts_impl'))} "
            f"| {cell(row.get('compile_convert'))} | {cell(row.get('compile_eager'))} |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=None, help="comma-separated model types (default: every MoE family)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile(fullgraph=True) both modes")
    parser.add_argument("--json", default=None)
    parser.add_argument("--md", default=None)
    parser.add_argument("--from-json", default=None, help="only write --md from a JSON written earlier")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
        with open(args.md, "w") as f:
            f.write(markdown(data["rows"], data["env"]))
        return
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    families = args.families.split(",") if args.families else moe_families()
    rows = []
    for family in families:
        start = time.time()
        row = measure(family, args.compile)
        row["seconds"] = round(time.time() - start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    env = dict(transformers=transformers.__version__, torch=torch.__version__,
               machine=f"{platform.machine()} CPU, {platform.python_version()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(rows, env))


if __name__ == "__main__":
    main()
