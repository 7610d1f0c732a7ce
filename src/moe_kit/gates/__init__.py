"""Routers: one routing scheme per file, the shared Router base, and model-wide training calls.

    router.py         Router: router linear (fp32, outside autocast), weight normalization, losses
    scores.py         logits -> scores (softmax / sigmoid / sqrtsoftplus)
    token_choice.py   TopKGate: top-k token choice with expert bias and group-limited routing
    hash.py           HashGate and hash_table: experts fixed by token id
    expert_choice.py  ExpertChoiceGate: each expert takes its top-C tokens (routing="expert_choice")
    sinkhorn.py       SinkhornGate: top-k of Sinkhorn-balanced scores in training (routing="sinkhorn")
    training.py       update_expert_bias, set_aux_loss_scale, balancing_loss
"""

from moe_kit.gates.expert_choice import ExpertChoiceGate
from moe_kit.gates.hash import HashGate, hash_table
from moe_kit.gates.router import Router
from moe_kit.gates.scores import routing_scores
from moe_kit.gates.sinkhorn import SinkhornGate, sinkhorn_log_plan
from moe_kit.gates.token_choice import TopKGate
from moe_kit.gates.training import balancing_loss, set_aux_loss_scale, update_expert_bias

__all__ = [
    "Router",
    "TopKGate",
    "HashGate",
    "hash_table",
    "ExpertChoiceGate",
    "SinkhornGate",
    "sinkhorn_log_plan",
    "routing_scores",
    "update_expert_bias",
    "set_aux_loss_scale",
    "balancing_loss",
]
