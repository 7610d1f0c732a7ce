"""Every rank of an expert-parallel group must build its MoELayer from the same config.

Ranks that disagree would exchange differently sized tensors (a C++ abort inside the collective)
or, worse, mismatch silently (a different top_k). One all_gather_object at construction turns
that into a ValueError naming the field.
"""

from __future__ import annotations

import torch.distributed as dist

IGNORED_FIELDS = ("backend",)  # ranks may pick different kernels for the same math


def check_same_config(settings: dict, group) -> None:
    """settings: a JSON-safe dict (MoEConfig.to_dict() plus layer facts such as layer_id).
    Raise ValueError on every rank when any rank of `group` holds different settings."""
    world = dist.get_world_size(group)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, settings, group=group)
    reference = gathered[0]
    for rank, other in enumerate(gathered[1:], start=1):
        names = sorted(
            name for name in set(reference) | set(other)
            if name not in IGNORED_FIELDS and reference.get(name) != other.get(name)
        )
        if names:
            detail = ", ".join(f"{n}: rank 0 has {reference.get(n)!r}, rank {rank} has {other.get(n)!r}" for n in names)
            raise ValueError(f"expert-parallel ranks must share one MoEConfig; differing field(s) {detail}")
