"""Expert parallelism, the functional floor: tokens travel to the rank holding their expert and back.

Where this sits (one direction of imports): `moe_kit.ep` imports config/experts/ops and
torch.distributed, never gates/layer; `gates.py` (balancing losses over the group) and `layer.py`
(`MoELayer(cfg, ep_group=...)`) import from it; the user-side helpers (DP x EP groups, gradient
all-reduce, checkpoint sharding) live on the top floor in `moe_kit.distributed`.

    all_to_all.py   differentiable all_to_all_single with uneven splits; the per-expert count exchange
    dispatch.py     ep_moe_ffn: route -> exchange -> local experts (global capacity) -> exchange back -> combine
    losses.py       Switch aux loss and z-loss with group-wide statistics
"""

from moe_kit.ep.all_to_all import all_to_all, exchange_counts
from moe_kit.ep.dispatch import EPResult, ep_moe_ffn, expert_slice, local_experts
from moe_kit.ep.losses import group_balancing_losses

__all__ = [
    "all_to_all",
    "exchange_counts",
    "EPResult",
    "ep_moe_ffn",
    "expert_slice",
    "local_experts",
    "group_balancing_losses",
]
