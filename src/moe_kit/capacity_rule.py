"""Exact capacity arithmetic shared by the expert-choice gate and the token-choice drop (ops.capacity).

capacity_factor is taken as the decimal it was written as (1.1 is 11/10), so C is the exact
ceiling. Megatron-Core's get_capacity computes math.ceil((N*k / E) * cf) in floats, which rounds
up past an exact integer in cases such as cf=1.1 with 400 slots on 8 experts (50.0 * 1.1 =
55.00000000000001: Megatron 56, moe_kit 55), cf=0.9 with 100 slots on 6 experts (16 against 15)
and cf=1.3 with 70 slots on 13 experts (8 against 7); 1.1 * 100 / 10 is 11 in both.
"""

from __future__ import annotations

from fractions import Fraction


def decimal_ratio(value: float) -> tuple[int, int]:
    """(p, q) with p / q the shortest decimal that round-trips to `value`: 1.1 -> (11, 10)."""
    ratio = Fraction(repr(float(value)))
    return ratio.numerator, ratio.denominator


def capacity_of(num_slots, num_experts: int, ratio: tuple[int, int]):
    """ceil(p/q * num_slots / num_experts) in integers; num_slots may be an int, an int64 tensor
    (no host sync) or a symbolic size under torch.compile, so compiled layers compute `ratio` =
    decimal_ratio(capacity_factor) once, eagerly."""
    numerator, denominator = ratio[0], ratio[1] * num_experts
    return (numerator * num_slots + denominator - 1) // denominator  # ceil of a non-negative ratio
