"""moe_kit: Mixture-of-Experts layers for PyTorch."""

from moe_kit.config import MoEConfig
from moe_kit.experts import Expert, GroupedExperts, SharedExpert
from moe_kit.gates import (
    HashGate,
    TopKGate,
    balancing_loss,
    hash_table,
    set_aux_loss_scale,
    update_expert_bias,
)
from moe_kit.integrations import swap_ffn, upcycle
from moe_kit.layer import MoELayer
from moe_kit.replay import record_routing, replay_routing
from moe_kit.stats import RoutingMonitor, RoutingStats, routing_stats

__all__ = [
    "MoEConfig",
    "TopKGate",
    "HashGate",
    "hash_table",
    "update_expert_bias",
    "set_aux_loss_scale",
    "balancing_loss",
    "Expert",
    "SharedExpert",
    "GroupedExperts",
    "MoELayer",
    "RoutingStats",
    "RoutingMonitor",
    "routing_stats",
    "swap_ffn",
    "upcycle",
    "record_routing",
    "replay_routing",
]

__version__ = "0.1.0"
