"""The "torch" backend: sort slots by expert once, two grouped GEMMs, a weighted combine.

Legend: N tokens, k slots per token, S = N*k rows of the sorted batch (R <= S rows kept when a
capacity limit drops some), E experts, D model width, I expert hidden width. Weights use the
HuggingFace layout: gate_up [E, 2I, D], down [E, D, I].

Reference math (ops/loop.py does exactly this, one expert at a time):
    h = x_e @ gate_up[e]^T;  a = silu(h[:, :I]) * h[:, I:];  y = (w * a) @ down[e]^T;  out += y
Here the whole FFN is one autograd.Function: it saves only x_rows, h and a, writes the backward
into few buffers, and folds the routing weight into a before the second GEMM, so the combine is
a plain row sum. Grouped GEMMs run on `torch.nn.functional.grouped_mm` (or `torch._grouped_mm`)
where device, dtype and strides allow, else on a padded batched matmul; never a Python loop.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from moe_kit.ops.routing import RoutingPlan, routing_plan

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- grouped GEMMs


@functools.cache
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Probe once per (device type, dtype): grouped_mm exists and runs both GEMM forms here."""
    if _grouped_mm is None:
        return False
    try:
        a = torch.ones(16, 8, device=device_type, dtype=dtype)
        w = torch.ones(2, 8, 8, device=device_type, dtype=dtype)
        ends = torch.tensor([8, 16], device=device_type, dtype=torch.int32)
        out = _grouped_mm(a, w.transpose(1, 2), offs=ends)
        dw = _grouped_mm(out.t(), a, offs=ends)
        return bool(out[0, 0] == 8) and bool(dw[1, 0, 0] == 64)
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def use_grouped_mm(dtype: torch.dtype, device: torch.device, *widths: int) -> bool:
    """grouped_mm needs fp32/bf16/fp16 and every row of every operand 16-byte aligned."""
    if _grouped_mm is None or dtype not in _GROUPED_MM_DTYPES:
        return False
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:
        return False  # grouped_mm's fake kernel takes bf16 only: compiled fp32/fp16 use the padded bmm
    size = torch.empty((), dtype=dtype).element_size()
    if any(width * size % 16 for width in widths):
        return False
    return _grouped_mm_works(device.type, dtype)


class GroupedGemm:
    """Per-expert GEMMs over rows sorted by expert (expert e owns rows offsets[e]:offsets[e+1]).

    forward(a [R, K], w [E, M, K]) -> [R, M]      rows times their expert's w[e]^T
    backward_input(g [R, M], w [E, M, K]) -> [R, K]
    weight_grad(g [R, M], a [R, K]) -> [E, M, K]  sum over expert e's rows of g^T a
    """

    def __init__(self, plan: RoutingPlan, num_rows: int, use_grouped: bool):
        self.use_grouped = use_grouped
        if use_grouped:
            self.ends = plan.offsets[1:].to(torch.int32)
        else:  # padded layout: row r goes to [expert_of_row[r], position[r]] of an [E, C, .] tensor
            self.expert = plan.expert_of_row[:num_rows]
            self.position = torch.arange(num_rows, device=self.expert.device) - plan.offsets[self.expert]
            self.capacity = int(plan.counts.max()) if plan.counts.numel() else 0  # one host sync
            self.num_experts = plan.num_experts

    def _pad(self, rows: torch.Tensor) -> torch.Tensor:
        padded = rows.new_zeros(self.num_experts, self.capacity, rows.shape[1])
        padded[self.expert, self.position] = rows
        return padded

    def forward(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.use_grouped:
            return _grouped_mm(a, w.transpose(1, 2), offs=self.ends)
        return torch.bmm(self._pad(a), w.transpose(1, 2))[self.expert, self.position]

    def backward_input(self, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.use_grouped:
            return _grouped_mm(g, w, offs=self.ends)
        return torch.bmm(self._pad(g), w)[self.expert, self.position]

    def weight_grad(self, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if self.use_grouped:
            return _grouped_mm(g.t(), a, offs=self.ends)
        return torch.bmm(self._pad(g).transpose(1, 2), self._pad(a))


# ----------------------------------------------------------------------------- the expert FFN


def _clamped_halves(h: torch.Tensor, limit: float | None):
    gate, up = h.chunk(2, dim=-1)
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return gate, up


class _SortedExpertsFFN(torch.autograd.Function):
    """out [N, D] = sum over kept rows r of w[r] * SwiGLU_{e(r)}(x[token(r)]) (see module doc).

    Elementwise work runs in place on buffers this function owns: on CPU every fresh large
    tensor costs page faults, so the only allocations are the gather and GEMM outputs.
    """

    @staticmethod
    def forward(ctx, x, weights, gate_up, down, plan, num_rows, limit, deterministic):
        gate_up, down = gate_up.contiguous(), down.contiguous()  # no-ops for parameters
        gemm = GroupedGemm(plan, num_rows, use_grouped_mm(x.dtype, x.device, *gate_up.shape[1:], down.shape[2]))
        token = plan.token_of_row[:num_rows]
        w_rows = weights.reshape(-1).index_select(0, plan.slot_of_row[:num_rows]).to(x.dtype)  # [R]
        x_rows = x.index_select(0, token)  # [R, D]
        h = gemm.forward(x_rows, gate_up)  # [R, 2I]
        gate, up = _clamped_halves(h, limit)
        act = F.silu(gate).mul_(up)  # [R, I]
        y = gemm.forward(act, down).mul_(w_rows.unsqueeze(1))  # [R, D], w * (act @ down^T)
        out = _sum_rows_per_token(y, plan, x.shape[0], num_rows, deterministic)
        ctx.save_for_backward(x_rows, h, act, w_rows, gate_up, down)
        ctx.gemm, ctx.plan, ctx.num_rows, ctx.limit, ctx.deterministic = gemm, plan, num_rows, limit, deterministic
        ctx.x_shape, ctx.weights_shape, ctx.weights_dtype = x.shape, weights.shape, weights.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x_rows, h, act, w_rows, gate_up, down = ctx.saved_tensors
        gemm, plan, num_rows, limit = ctx.gemm, ctx.plan, ctx.num_rows, ctx.limit
        grad_y = grad_out.contiguous().index_select(0, plan.token_of_row[:num_rows])  # [R, D]
        grad_act = gemm.backward_input(grad_y, down)  # [R, I], d(out)/d(act) before the weight
        grad_weights = None
        if ctx.needs_input_grad[1]:
            grad_w_rows = torch.linalg.vecdot(grad_act, act).to(ctx.weights_dtype)  # [R]
            grad_weights = grad_w_rows.new_zeros(plan.slot_of_row.numel())
            grad_weights[plan.slot_of_row[:num_rows]] = grad_w_rows
            grad_weights = grad_weights.view(ctx.weights_shape)
        scale = w_rows.unsqueeze(1)
        grad_down = gemm.weight_grad(grad_y.mul_(scale), act) if ctx.needs_input_grad[3] else None
        grad_h = _swiglu_backward(grad_act.mul_(scale), h, limit)  # [R, 2I]
        grad_gate_up = gemm.weight_grad(grad_h, x_rows) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x_rows = gemm.backward_input(grad_h, gate_up)  # [R, D]
            grad_x = _sum_rows_per_token(grad_x_rows, plan, ctx.x_shape[0], num_rows, ctx.deterministic)
        return grad_x, grad_weights, grad_gate_up, grad_down, None, None, None, None


def _swiglu_backward(grad_act: torch.Tensor, h: torch.Tensor, limit: float | None) -> torch.Tensor:
    """d(silu(gate) * up)/d[gate, up] with the optional clamp; grad_act [R, I], h [R, 2I] -> [R, 2I]."""
    gate, up = _clamped_halves(h, limit)
    grad_h = torch.empty_like(h)
    grad_gate, grad_up = grad_h.chunk(2, dim=-1)
    torch.mul(grad_act, up, out=grad_gate)
    torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
    torch.ops.aten.silu.out(gate, out=grad_up)
    grad_up.mul_(grad_act)
    if limit is not None:  # clamp passes the gradient only inside its bounds (limits included)
        raw_gate, raw_up = h.chunk(2, dim=-1)
        grad_gate.masked_fill_(raw_gate > limit, 0)
        grad_up.masked_fill_(raw_up.abs() > limit, 0)
    return grad_h


def _sum_rows_per_token(rows: torch.Tensor, plan: RoutingPlan, num_tokens: int, num_rows: int, deterministic: bool):
    """rows [R, D] sorted by expert -> [N, D], each token the sum of its rows.

    deterministic: gather back to slot order ([N, k, D], zeros for dropped slots) and sum over k;
    otherwise index_add (fast on CPU; atomic, so run-to-run different, on CUDA).
    """
    if not deterministic:
        return rows.new_zeros(num_tokens, rows.shape[1]).index_add_(0, plan.token_of_row[:num_rows], rows)
    if num_rows < plan.row_of_slot.numel():
        rows = torch.cat([rows, rows.new_zeros(plan.row_of_slot.numel() - num_rows, rows.shape[1])])
    return rows.index_select(0, plan.row_of_slot).view(num_tokens, plan.top_k, rows.shape[1]).sum(dim=1)


def moe_ffn_torch(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    swiglu_limit: float | None = None,
    has_dropped: bool = False,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """x [N, D], weights [N, k], indices int [N, k] (E = dropped when has_dropped) -> [N, D].

    deterministic=None: a fixed-order combine on CUDA, index_add on CPU (deterministic there too).
    """
    plan = routing_plan(indices, gate_up_proj.shape[0], has_dropped)
    num_rows = int(plan.offsets[-1]) if has_dropped else plan.slot_of_row.numel()  # host sync only with drops
    if deterministic is None:
        deterministic = x.device.type != "cpu"
    return _SortedExpertsFFN.apply(
        x, weights, gate_up_proj, down_proj, plan, num_rows, swiglu_limit, deterministic
    )
