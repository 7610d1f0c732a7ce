"""Expert parallelism, the functional floor: tokens travel to the rank holding their expert and back.

Where this sits (one direction of imports): `moe_kit.ep` imports config/experts/ops and
torch.distributed, never gates/layer; `layer.py` (`MoELayer(cfg, ep_group=...)`) imports from it.
The balancing losses with group-wide statistics live one floor down, in moe_kit.group_balancing,
beside the gates that attach them; the user-side helpers (DP x EP groups, gradient
all-reduce, checkpoint sharding) live on the top floor in `moe_kit.distributed`.

    all_to_all.py   differentiable all_to_all_single with uneven splits; the per-expert count exchange
    agreement.py    check_same_config: every rank built its layer from the same config
    dispatch.py     AllToAllDispatcher: exchange -> local experts (the shared capacity rule) -> exchange back
                    -> combine
"""

from moe_kit.ep.agreement import check_same_config
from moe_kit.ep.all_to_all import all_to_all, exchange_counts
from moe_kit.ep.dispatch import AllToAllDispatcher, expert_slice, local_experts

__all__ = [
    "check_same_config",
    "all_to_all",
    "exchange_counts",
    "AllToAllDispatcher",
    "expert_slice",
    "local_experts",
]
