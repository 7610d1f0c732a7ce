"""torch.library entry points across torch versions and the Triton interpreter.

torch >= 2.6 has `triton_op` (a custom op whose body torch.compile can trace into, reaching the
Triton kernels) and `wrap_triton` (marks a kernel launch inside such a body). Older torch, and
the Triton interpreter (TRITON_INTERPRET=1, where wrap_triton hands back the raw interpreted
kernel, which cannot run on fake tensors), get a plain opaque `custom_op` with the explicit fake
implementation, and kernels launched directly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe_kit.ops.triton.configs import interpreting

try:
    from torch.library import triton_op as _triton_op
    from torch.library import wrap_triton
except ImportError:  # torch < 2.6
    _triton_op = None

    def wrap_triton(kernel):
        return kernel


INTERPRETED = interpreting()  # this package was imported under TRITON_INTERPRET=1: kernels are interpreted


def define_op(name: str, fake: Callable) -> Callable:
    """Decorator: register `fn` as the custom op `name` ("moe_kit::...") with no mutated inputs.

    With triton_op the body itself is the fake implementation (kernel launches are skipped on
    fake tensors); `fake` (shapes only) is registered on the custom_op fallback. The choice is
    made when the op is defined (at import).
    """

    def wrap(fn: Callable):
        if _triton_op is not None and not INTERPRETED:
            return _triton_op(name, mutates_args=())(fn)
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.register_fake(fake)
        return op

    return wrap
