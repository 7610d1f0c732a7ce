"""Integrations, the top floor of moe_kit: put MoE layers into existing models.

- `swap_ffn(model, make_layer, filter_fn=None)`: replace FFN modules in place.
- `upcycle(dense_mlp, cfg)`: a MoELayer initialized from a dense SwiGLU MLP (sparse upcycling).
- `moe_kit.integrations.hf`: the HuggingFace transformers bridge (`register`, `convert`,
  `convert_back`); it imports transformers, so it is not imported here.

torch.compile (torch 2.13, CPU, inductor), for MoELayer with the "torch" backend, and so for
converted HF models and the "moe_kit" experts implementation, which run the same code:
- bf16: compiles and matches eager (tests/test_integrations.py), with graph breaks at
  ops/torch_ops.py `_grouped_mm_works` (dynamo ignores functools.cache and re-traces the probe;
  `bool(tensor)` is a .item()), and, with expert_bias in training, gates.py `is_recomputing()`
  (`torch._C._current_graph_task_id` is not traceable) and `torch.bincount` (data-dependent
  output shape). A break inside `_SortedExpertsFFN.forward` keeps the autograd.Function out of the
  graph: its forward is compiled in pieces, its backward runs eagerly.
- fp32 / fp16: compiles and matches eager (tests/test_integrations.py). grouped_mm's fake kernel
  takes bf16 only, so while compiling `use_grouped_mm` answers False for other dtypes and the
  padded batched matmul runs instead, with one more break at `GroupedGemm.__init__`
  (`int(plan.counts.max())`, the padded capacity). Removing every break needs the FFN as a
  `torch.library.custom_op` with a fake implementation (STYLE.md #7), as the triton backend does.
"""

from moe_kit.integrations.swap import swap_ffn
from moe_kit.integrations.upcycle import upcycle

__all__ = ["swap_ffn", "upcycle"]
