"""Integrations, the top floor of moe_kit: put MoE layers into existing models.

- `swap_ffn(model, make_layer, filter_fn=None)`: replace FFN modules in place (make_layer gets the
  module's layer index as `layer_id=` when it takes one).
- `upcycle(dense_mlp, cfg)`: a MoELayer initialized from a dense SwiGLU MLP (sparse upcycling).
- `moe_kit.integrations.hf`: the HuggingFace transformers bridge (`register`, `convert`,
  `convert_back`, `upcycle` of whole dense models); it imports transformers, so it is not
  imported here.

torch.compile of converted HF models and of the "moe_kit" experts implementation runs the same
code as MoELayer / moe_ffn; tests/test_hf.py checks `torch.compile(model, fullgraph=True)` (no
graph break) against eager in both modes, forward and backward, at two token counts.
"""

from moe_kit.integrations.swap import swap_ffn
from moe_kit.integrations.upcycle import upcycle

__all__ = ["swap_ffn", "upcycle"]
