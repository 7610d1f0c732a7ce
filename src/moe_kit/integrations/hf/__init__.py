"""HuggingFace transformers bridge (needs `pip install moe-kit[hf]`, transformers >= 5.0).

Two ways to run a transformers MoE model on moe_kit:

- `register()` adds "moe_kit" to transformers' ExpertsInterface: the model keeps its own modules
  and routers, only the experts' math runs on `moe_kit.ops.moe_ffn`
  (`model.set_experts_implementation("moe_kit")`, `from_pretrained(..., experts_implementation=
  "moe_kit")` after register(), or `register(model)` to check every experts module and switch).
- `convert(model)` replaces each sparse-MoE block (router + experts + shared expert) by an
  equivalent `moe_kit.MoELayer` holding the same tensors, so moe_kit's balancing losses,
  expert-bias updates and routing stats work while fine-tuning; `convert_back(model)` restores
  the transformers blocks (e.g. before `save_pretrained`).

Supported: Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3, DeepSeek-V4 (hash layers,
sqrtsoftplus, clamped SwiGLU). Experts with biases, transposed or interleaved weights or another
activation raise ValueError.

torch.compile: see the notes in the moe_kit.integrations docstring.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "moe_kit.integrations.hf needs transformers>=5.0 (ExpertsInterface): pip install 'moe-kit[hf]'"
    ) from error

from moe_kit.integrations.hf.convert import convert, convert_back
from moe_kit.integrations.hf.experts_bridge import moe_kit_experts_forward, register
from moe_kit.integrations.hf.layout import experts_activation, experts_swiglu_limit
from moe_kit.integrations.hf.specs import SPECS, VERIFIED, BlockSpec, is_moe_block
from moe_kit.integrations.hf.upcycle import upcycle

__all__ = [
    "register",
    "convert",
    "convert_back",
    "moe_kit_experts_forward",
    "experts_swiglu_limit",
    "SPECS",
    "VERIFIED",
    "BlockSpec",
    "is_moe_block",
    "upcycle",
    "experts_activation",
]
