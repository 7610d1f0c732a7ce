"""The "torch" backend: sort slots by expert once, two grouped GEMMs, a weighted combine.

Legend: N tokens, k slots per token, S = N*k rows of the sorted batch (R <= S rows kept when a
capacity limit drops some), E experts, D model width, I expert hidden width. Weights use the
HuggingFace layout: gate_up [E, 2I, D], down [E, D, I].

Reference math (ops/loop.py does exactly this, one expert at a time):
    h = x_e @ gate_up[e]^T;  a = act(h[:, :I]) * h[:, I:];  y = (w * a) @ down[e]^T;  out += y
With expert biases (gpt-oss) h gets + b1[e] and y gets + w * b2[e]; their gradients are per-expert
row sums (index_add on CPU, a segmented sum in the deterministic mode).
Here the whole FFN is one autograd.Function whose forward keeps only h [R, 2I] (plus x, which
the caller holds anyway): the gathered rows x[token] are gathered again in the backward and the
activation a is recomputed from h, so the saved activations are 2I floats per routed slot
(the dense equal-FLOPs MLP saves more). `recompute="gemm1"` saves nothing but x and runs GEMM 1
again in the backward (less memory, one more GEMM). The routing weight is folded into a before
the second GEMM, so the combine is a plain row sum. Grouped GEMMs run on
`torch.nn.functional.grouped_mm` (or `torch._grouped_mm`) where device, dtype and strides allow,
else on a padded batched matmul; never a Python loop.

Decode sizes: CPU's grouped_mm costs a few small ops per expert, empty or not, so at S <= SMALL_ROWS
with many experts (E >= SMALL_EXPERTS_PER_ROW * S) each slot's expert weights are gathered
([S, 2I, D], [S, D, I]: only the experts in use are read) and two batched mat-vecs run, no sort,
no plan. Inference on CPU (no grad, nothing dropped) otherwise takes `lean_forward`: the sorted
forward with the fewest ops around the two GEMMs. Tests compare both with the loop backend.

torch.compile: eager calls run the autograd.Function directly; while compiling, the same
forward and backward run inside two `torch.library.custom_op`s (moe_kit::sorted_ffn_fwd /
_bwd) with fake implementations, so dynamo traces moe_ffn with no graph break, whatever the
dtype and token count (the grouped_mm probe, the padded capacity and the drop count are read
inside the opaque op).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from moe_kit.activations import gated_act, gated_act_backward, gated_act_parts, gated_activation
from moe_kit.ops.routing import RoutingPlan, routing_plan

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SMALL_ROWS = 8  # the gathered-weights decode path: S = N*k <= SMALL_ROWS ...
SMALL_EXPERTS_PER_ROW = 16  # ... and E >= 16 * S (copying S experts' weights beats grouped_mm's per-expert cost)
CHUNK_BYTES = 8 * 2**20  # CPU backward: [R, D] temporaries (x[token], dX rows) made in groups of experts of ~this size
Tensor = torch.Tensor


# ----------------------------------------------------------------------------- grouped GEMMs


@functools.cache
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Probe once per (device type, dtype): grouped_mm exists and runs both GEMM forms here.

    Never called while compiling: the sorted FFN is an opaque custom op there (see module doc).
    """
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
    if any(width * dtype.itemsize % 16 for width in widths):
        return False
    return _grouped_mm_works(device.type, dtype)


class GroupedGemm:
    """Per-expert GEMMs over rows sorted by expert (expert e owns rows offsets[e]:offsets[e+1]).

    forward(a [R, K], w [E, M, K]) -> [R, M]      rows times their expert's w[e]^T
    backward_input(g [R, M], w [E, M, K]) -> [R, K]
    weight_grad(g [R, M], a [R, K]) -> [E, M, K]  sum over expert e's rows of g^T a
    """

    def __init__(self, plan: RoutingPlan, num_rows: int, use_grouped: bool):
        self.use_grouped = use_grouped and plan.pad_to is None
        if self.use_grouped:
            self.ends = plan.offsets[1:].to(torch.int32)
        else:  # padded layout: row r goes to [expert_of_row[r], position[r]] of an [E, C, .] tensor
            self.expert = plan.expert_of_row[:num_rows]
            self.position = torch.arange(num_rows, device=self.expert.device) - plan.offsets[self.expert]
            if plan.pad_to is not None:  # pad_to_capacity: a static [E, C, .] batch, no host sync
                self.capacity = plan.pad_to
            else:
                self.capacity = int(plan.counts.max()) if plan.counts.numel() else 0  # one host sync (eager only)
            self.num_experts = plan.num_experts

    def _pad(self, rows: Tensor) -> Tensor:
        padded = rows.new_zeros(self.num_experts, self.capacity, rows.shape[1])
        padded[self.expert, self.position] = rows
        return padded

    def forward(self, a: Tensor, w: Tensor) -> Tensor:
        if self.use_grouped:
            return _grouped_mm(a, w.transpose(1, 2), offs=self.ends)
        return torch.bmm(self._pad(a), w.transpose(1, 2))[self.expert, self.position]

    def backward_input(self, g: Tensor, w: Tensor) -> Tensor:
        if self.use_grouped:
            return _grouped_mm(g, w, offs=self.ends)
        return torch.bmm(self._pad(g), w)[self.expert, self.position]

    def weight_grad(self, g: Tensor, a: Tensor) -> Tensor:
        if self.use_grouped:
            return _grouped_mm(g.t(), a, offs=self.ends)
        return torch.bmm(self._pad(g).transpose(1, 2), self._pad(a))


# ----------------------------------------------------------------------------- the sorted expert FFN


def _plan_gemm(plan: RoutingPlan, x: Tensor, gate_up: Tensor, down: Tensor) -> tuple[int, GroupedGemm]:
    """Rows kept (a host sync only when slots may be dropped) and the grouped GEMMs of the plan."""
    num_rows = int(plan.offsets[-1]) if plan.has_dropped else plan.slot_of_row.numel()
    use = use_grouped_mm(x.dtype, x.device, *gate_up.shape[1:], down.shape[2])
    return num_rows, GroupedGemm(plan, num_rows, use)


def sorted_ffn_forward(x, weights, gate_up, down, plan, activation, limit, deterministic, save, planned=None,
                       gate_up_bias=None, down_bias=None):
    """-> (out [N, D], saved h [R, 2I] or None). save: "h" | "none" (recompute GEMM 1 in backward).
    gate_up_bias [E, 2I] / down_bias [E, D]: optional expert biases (the down bias weighted by w)."""
    num_rows, gemm = planned or _plan_gemm(plan, x, gate_up, down)
    token = plan.token_of_row[:num_rows]
    w_rows = weights.reshape(-1).index_select(0, plan.slot_of_row[:num_rows]).to(x.dtype)  # [R]
    h = _gemm1(gemm, x.index_select(0, token), gate_up, gate_up_bias, plan, num_rows)  # [R, 2I]; rows die here
    y = _scaled_gemm2(gemm.forward, gated_act(h, activation, limit), down, w_rows.unsqueeze(1))  # [R, D]
    if down_bias is not None:
        y.addcmul_(down_bias.index_select(0, plan.expert_of_row[:num_rows]), w_rows.unsqueeze(1))
    out = _sum_rows_per_token(y, plan, x.shape[0], num_rows, deterministic)
    return out, (h if save == "h" else None)


def _gemm1(gemm, x_rows, gate_up, gate_up_bias, plan, num_rows):
    """h [R, 2I] = x_rows @ gate_up[e]^T (+ gate_up_bias[e]) per row of expert e."""
    h = gemm.forward(x_rows, gate_up)
    if gate_up_bias is not None:
        h.add_(gate_up_bias.index_select(0, plan.expert_of_row[:num_rows]))
    return h


def _sum_rows_per_expert(rows: Tensor, plan: RoutingPlan, num_rows: int, deterministic: bool) -> Tensor:
    """rows [R, C] sorted by expert -> [E, C], each expert the sum of its rows (a bias gradient).

    deterministic: a segmented sum (a fixed order on every device); otherwise index_add (fast on
    CPU; atomic, so run-to-run different, on CUDA)."""
    if deterministic:
        return torch.segment_reduce(rows, "sum", lengths=plan.counts)
    return rows.new_zeros(plan.num_experts, rows.shape[1]).index_add_(0, plan.expert_of_row[:num_rows], rows)


def _scaled_gemm2(forward, act, down, w_rows):
    """w * (act @ down^T) per row, the weight applied on the narrower side (act [R, I] or y [R, D])."""
    if act.shape[1] <= down.shape[1]:
        return forward(act.mul_(w_rows), down)
    return forward(act, down).mul_(w_rows)


def sorted_ffn_backward(grad_out, x, weights, gate_up, down, h, plan, activation, limit, deterministic, needs,
                        planned=None, gate_up_bias=None, down_bias=None):
    """grad_out [N, D] -> (d_x, d_weights, d_gate_up, d_down, d_gate_up_bias, d_down_bias), None
    where `needs` (six flags; four: no bias gradients) is False.

    Order keeps few [R, .] buffers alive at once: d_down (needs act and grad_y) first, then dH,
    then d_x, and only then x[token] is gathered again for d_gate_up.
    """
    need_x, need_weights, need_gate_up, need_down, need_gate_up_bias, need_down_bias = (*needs, False, False)[:6]
    num_rows, gemm = planned or _plan_gemm(plan, x, gate_up, down)
    token = plan.token_of_row[:num_rows]
    w_rows = weights.reshape(-1).index_select(0, plan.slot_of_row[:num_rows]).to(x.dtype).unsqueeze(1)  # [R, 1]
    if h is None:  # recompute="gemm1"
        h = _gemm1(gemm, x.index_select(0, token), gate_up, gate_up_bias, plan, num_rows)
    grad_y = grad_out.to(x.dtype).contiguous().index_select(0, token)  # [R, D]
    grad_act = gemm.backward_input(grad_y, down)  # [R, I], d(out)/d(act) before the weight
    grad_weights = grad_down = grad_gate_up = grad_x = activated = grad_gate_up_bias = grad_down_bias = None
    scaled = False  # grad_y multiplied by w in place
    if need_weights or need_down:
        act, activated = gated_act_parts(h, activation, limit)  # [R, I] each, recomputed from h
        if need_weights:
            grad_w_rows = torch.linalg.vecdot(grad_act, act)  # [R]
            if down_bias is not None:  # y = w * (act @ down^T + b2): d w = <grad_y, act @ down^T + b2>
                grad_w_rows += torch.linalg.vecdot(grad_y, down_bias.index_select(0, plan.expert_of_row[:num_rows]))
            grad_w_rows = grad_w_rows.to(weights.dtype)
            grad_weights = grad_w_rows.new_zeros(plan.slot_of_row.numel())
            grad_weights[plan.slot_of_row[:num_rows]] = grad_w_rows
            grad_weights = grad_weights.view(weights.shape)
        if need_down:  # (w * grad_y)^T act = grad_y^T (w * act): scale the narrower one
            if act.shape[1] <= grad_y.shape[1] and not need_down_bias:
                grad_down = gemm.weight_grad(grad_y, act.mul_(w_rows))
            else:
                grad_down = gemm.weight_grad(grad_y.mul_(w_rows), act)
                scaled = True
        del act
    if need_down_bias:  # sum over expert e's rows of w * grad_y
        grad_down_bias = _sum_rows_per_expert(grad_y if scaled else grad_y.mul_(w_rows), plan, num_rows, deterministic)
    del grad_y
    if need_x or need_gate_up or need_gate_up_bias:
        grad_h = gated_act_backward(grad_act.mul_(w_rows), h, activation, limit, activated)  # [R, 2I]
        del grad_act, h, activated
        if need_gate_up_bias:
            grad_gate_up_bias = _sum_rows_per_expert(grad_h, plan, num_rows, deterministic)
        chunks = _expert_chunks(plan, num_rows, x.shape[1] * x.element_size(), gemm, deterministic, x.device)
        if chunks is None:
            if need_x:
                grad_x = _sum_rows_per_token(gemm.backward_input(grad_h, gate_up), plan, x.shape[0], num_rows,
                                             deterministic)
            if need_gate_up:
                grad_gate_up = gemm.weight_grad(grad_h, x.index_select(0, token))
        else:  # [R, D] temporaries (dX rows, x[token] again) made one group of whole experts at a time
            if need_x:
                grad_x = x.new_zeros(x.shape)
                for e0, e1, r0, r1 in chunks:
                    ends = (plan.offsets[e0 + 1:e1 + 1] - r0).to(torch.int32)
                    grad_x.index_add_(0, token[r0:r1], _grouped_mm(grad_h[r0:r1], gate_up[e0:e1], offs=ends))
            if need_gate_up:
                grad_gate_up = gate_up.new_empty(gate_up.shape)
                for e0, e1, r0, r1 in chunks:
                    ends = (plan.offsets[e0 + 1:e1 + 1] - r0).to(torch.int32)
                    grad_gate_up[e0:e1] = _grouped_mm(grad_h[r0:r1].t(), x.index_select(0, token[r0:r1]), offs=ends)
    grads = grad_x, grad_weights, grad_gate_up, grad_down, grad_gate_up_bias, grad_down_bias
    return grads[:len(needs)]


def _expert_chunks(plan: RoutingPlan, num_rows: int, row_bytes: int, gemm: GroupedGemm, deterministic: bool,
                   device: torch.device) -> list[tuple[int, int, int, int]] | None:
    """Groups (first expert, end expert, first row, end row) of whole consecutive experts holding
    about CHUNK_BYTES of [rows, D] each (an expert bigger than that is a group of its own); None
    when one piece will do: small batches, the padded path, the deterministic combine, or a device
    where reading the offsets on the host would synchronize (CPU only)."""
    if not gemm.use_grouped or deterministic or device.type != "cpu" or num_rows * row_bytes <= CHUNK_BYTES:
        return None
    bounds = plan.offsets.tolist()  # a host copy; free on CPU
    target = max(1, CHUNK_BYTES // row_bytes)  # rows per group
    chunks, first = [], 0
    while first < plan.num_experts:
        end = first + 1
        while end < plan.num_experts and bounds[end + 1] - bounds[first] <= target:
            end += 1
        chunks.append((first, end, bounds[first], bounds[end]))
        first = end
    return chunks


class _SortedExpertsFFN(torch.autograd.Function):
    """out [N, D] = sum over kept rows r of w[r] * FFN_{e(r)}(x[token(r)]) (see module doc)."""

    @staticmethod
    def forward(ctx, x, weights, gate_up, down, gate_up_bias, down_bias, plan, activation, limit, deterministic, save):
        gate_up, down = gate_up.contiguous(), down.contiguous()  # no-ops for parameters
        planned = _plan_gemm(plan, x, gate_up, down)  # rows kept and GEMM layout: worked out once, for both passes
        out, h = sorted_ffn_forward(x, weights, gate_up, down, plan, activation, limit, deterministic, save, planned,
                                    gate_up_bias, down_bias)
        ctx.save_for_backward(x, weights, gate_up, down, h, gate_up_bias, down_bias)
        ctx.plan, ctx.activation, ctx.limit, ctx.deterministic = plan, activation, limit, deterministic
        ctx.planned = planned
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weights, gate_up, down, h, gate_up_bias, down_bias = ctx.saved_tensors
        grads = sorted_ffn_backward(grad_out, x, weights, gate_up, down, h, ctx.plan, ctx.activation, ctx.limit,
                                    ctx.deterministic, ctx.needs_input_grad[:6], ctx.planned, gate_up_bias, down_bias)
        return (*grads, None, None, None, None, None)


def _sum_rows_per_token(rows: Tensor, plan: RoutingPlan, num_tokens: int, num_rows: int, deterministic: bool):
    """rows [R, D] sorted by expert -> [N, D], each token the sum of its rows.

    deterministic: gather back to slot order ([N, k, D], zeros for dropped slots) and sum over k;
    otherwise index_add (fast on CPU; atomic, so run-to-run different, on CUDA).
    """
    if not deterministic:
        return rows.new_zeros(num_tokens, rows.shape[1]).index_add_(0, plan.token_of_row[:num_rows], rows)
    if num_rows < plan.row_of_slot.numel():
        rows = torch.cat([rows, rows.new_zeros(plan.row_of_slot.numel() - num_rows, rows.shape[1])])
    return rows.index_select(0, plan.row_of_slot).view(num_tokens, plan.top_k, rows.shape[1]).sum(dim=1)


# ----------------------------------------------------------------------------- compiled path: custom ops

_PLAN_FIELDS = ("slot_of_row", "token_of_row", "row_of_slot", "expert_of_row", "counts", "offsets")


def _plan_of(tensors, num_experts: int, top_k: int, has_dropped: bool, pad_to: int | None = None) -> RoutingPlan:
    return RoutingPlan(*tensors, num_experts=num_experts, top_k=top_k, has_dropped=has_dropped, pad_to=pad_to)


@torch.library.custom_op("moe_kit::sorted_ffn_fwd", mutates_args=())
def _sorted_ffn_fwd_op(
    x: Tensor, weights: Tensor, gate_up: Tensor, down: Tensor, gate_up_bias: Tensor | None, down_bias: Tensor | None,
    plan: list[Tensor], num_experts: int, has_dropped: bool, activation: str, limit: float | None,
    deterministic: bool, save_h: bool, pad_to: int | None,
) -> tuple[Tensor, Tensor]:
    """(out [N, D], h [S, 2I] (rows past the kept ones zero) or [0, 2I] unless save_h)."""
    routing = _plan_of(plan, num_experts, weights.shape[1], has_dropped, pad_to)
    out, h = sorted_ffn_forward(x, weights, gate_up.contiguous(), down.contiguous(), routing, activation, limit,
                                deterministic, "h" if save_h else "none", None, gate_up_bias, down_bias)
    if h is None:
        return out, x.new_empty(0, gate_up.shape[1])
    if h.shape[0] < routing.slot_of_row.numel():  # dropped slots: fixed shape for the fake kernel
        h = torch.cat([h, h.new_zeros(routing.slot_of_row.numel() - h.shape[0], h.shape[1])])
    return out, h


@_sorted_ffn_fwd_op.register_fake
def _(x, weights, gate_up, down, gate_up_bias, down_bias, plan, num_experts, has_dropped, activation, limit,
      deterministic, save_h, pad_to):
    return x.new_empty(x.shape), x.new_empty(weights.numel() if save_h else 0, gate_up.shape[1])


@torch.library.custom_op("moe_kit::sorted_ffn_bwd", mutates_args=())
def _sorted_ffn_bwd_op(
    grad_out: Tensor, x: Tensor, weights: Tensor, gate_up: Tensor, down: Tensor, gate_up_bias: Tensor | None,
    down_bias: Tensor | None, h: Tensor, plan: list[Tensor], num_experts: int, has_dropped: bool, activation: str,
    limit: float | None, deterministic: bool, needs: list[bool], pad_to: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (d_x, d_weights, d_gate_up, d_down, d_gate_up_bias, d_down_bias), each empty [0] when not needed."""
    routing = _plan_of(plan, num_experts, weights.shape[1], has_dropped, pad_to)
    saved = None
    if h.shape[0]:
        saved = h[: int(routing.offsets[-1])] if has_dropped else h
    grads = sorted_ffn_backward(grad_out, x, weights, gate_up.contiguous(), down.contiguous(), saved, routing,
                                activation, limit, deterministic, needs, None, gate_up_bias, down_bias)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@_sorted_ffn_bwd_op.register_fake
def _(grad_out, x, weights, gate_up, down, gate_up_bias, down_bias, h, plan, num_experts, has_dropped, activation,
      limit, deterministic, needs, pad_to):
    inputs = (x, weights, gate_up, down, gate_up_bias, down_bias)
    return tuple(t.new_empty(t.shape) if n else x.new_empty(0) for t, n in zip(inputs, needs, strict=True))


def _op_setup_context(ctx, inputs, output):
    (x, weights, gate_up, down, gate_up_bias, down_bias, plan, num_experts, has_dropped, activation, limit,
     deterministic, _, pad_to) = inputs
    ctx.save_for_backward(x, weights, gate_up, down, gate_up_bias, down_bias, output[1], *plan)
    ctx.args = (num_experts, has_dropped, activation, limit, deterministic)
    ctx.pad_to = pad_to
    ctx.mark_non_differentiable(output[1])


def _op_backward(ctx, grad_out, _grad_h):
    x, weights, gate_up, down, gate_up_bias, down_bias, h, *plan = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:6])
    grads = torch.ops.moe_kit.sorted_ffn_bwd(grad_out, x, weights, gate_up, down, gate_up_bias, down_bias, h, plan,
                                             *ctx.args, needs, ctx.pad_to)
    grads = [g if n else None for g, n in zip(grads, needs, strict=True)]
    return (*grads, [None] * len(plan), None, None, None, None, None, None, None)


_sorted_ffn_fwd_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ----------------------------------------------------------------------------- decode path: gathered weights


def small_ffn(x, weights, indices, gate_up, down, activation="silu", limit=None, has_dropped=False,
              gate_up_bias=None, down_bias=None):
    """S = N*k <= SMALL_ROWS: each slot's expert weights (and biases) gathered ([S, 2I, D], [S, D, I]),
    two batched mat-vecs, a sum over k. Plain autograd; ids == E (dropped slots, has_dropped) contribute zero."""
    num_tokens, top_k = indices.shape
    num_experts = gate_up.shape[0]
    flat = indices.reshape(-1)
    kept = None
    if has_dropped:
        kept = flat < num_experts
        flat = flat.clamp(max=num_experts - 1)
    x_rows = x.repeat_interleave(top_k, dim=0).unsqueeze(2)  # [S, D, 1]
    h = torch.bmm(gate_up.index_select(0, flat), x_rows).squeeze(2)  # [S, 2I]
    if gate_up_bias is not None:
        h = h + gate_up_bias.index_select(0, flat)
    act = gated_activation(h, limit, activation)  # [S, I], plain autograd
    scale = weights.reshape(-1, 1).to(x.dtype)
    if kept is not None:
        scale = scale * kept.unsqueeze(1)
    y = torch.bmm(down.index_select(0, flat), (act * scale).unsqueeze(2)).squeeze(2)  # [S, D]
    if down_bias is not None:
        y = y + down_bias.index_select(0, flat) * scale
    return y.view(num_tokens, top_k, x.shape[1]).sum(1).to(x.dtype)  # x.dtype under autocast too


# ----------------------------------------------------------------------------- inference path: fewest ops


def lean_forward(x, weights, indices, gate_up, down, activation="silu", limit=None):
    """sorted_ffn_forward for CPU inference (no grad, nothing dropped, index_add combine, grouped_mm
    usable, N > 0) with the least work around the two GEMMs: no full RoutingPlan (no inverse
    permutation), expert ends from one bincount, only the span of used experts handed to grouped_mm.
    At decode sizes the fixed cost of each op is what is measured."""
    top_k = indices.shape[1]
    flat = indices.reshape(-1)
    expert, slot = torch.sort(flat, stable=True)  # rows sorted by expert
    # grouped_mm on CPU runs a few small ops per expert, empty or not: pass only the span of
    # experts from the first to the last one used (views of the weights; host reads are free on
    # CPU). Each eager op costs microseconds here, so: one strided view and one host read for both ends
    bounds = expert[:: max(expert.numel() - 1, 1)].tolist()
    first, last = bounds[0], bounds[-1]
    gate_up, down = gate_up[first:last + 1], down[first:last + 1]
    ends = torch.bincount(flat, minlength=last + 1)[first:].cumsum(0, dtype=torch.int32)
    token = slot.div(top_k, rounding_mode="floor")
    h = _grouped_mm(x.index_select(0, token), gate_up.transpose(1, 2), offs=ends)  # [S, 2I]
    w_rows = weights.reshape(-1, 1).index_select(0, slot)  # [S, 1]
    if w_rows.dtype != x.dtype:
        w_rows = w_rows.to(x.dtype)
    y = _scaled_gemm2(lambda a, w: _grouped_mm(a, w.transpose(1, 2), offs=ends), gated_act(h, activation, limit),
                      down, w_rows)  # [S, D]
    return torch.zeros_like(x).index_add_(0, token, y)


def decode_size(num_rows: int, num_experts: int) -> bool:
    """Whether small_ffn runs S = N*k rows over E experts: 0 < S <= SMALL_ROWS and E >= SMALL_EXPERTS_PER_ROW * S."""
    return 0 < num_rows <= SMALL_ROWS and num_rows * SMALL_EXPERTS_PER_ROW <= num_experts


def lean_inference_applies(x, gate_up, down, has_dropped=False, pad_to=None, has_bias=False,
                           deterministic=None) -> bool:
    """Whether inference_ffn / lean_forward may run x [N, D] once no autograd graph is needed: CPU,
    rows present, not compiling (the sorted FFN's custom op does its host reads there), nothing
    dropped or padded, no expert biases, not a fixed-order combine (deterministic True), and a
    dtype and widths grouped_mm runs."""
    return (
        x.device.type == "cpu" and x.shape[0] > 0 and not has_dropped and pad_to is None and not has_bias
        and deterministic is not True and not torch.compiler.is_compiling()
        and use_grouped_mm(x.dtype, x.device, *gate_up.shape[1:], down.shape[2])
    )


def inference_ffn(x, weights, indices, gate_up, down, activation="silu", limit=None):
    """moe_ffn_torch's pick for eager CPU inference, without its checks and branches: small_ffn
    at decode sizes with many experts, else lean_forward. The caller (MoELayer's inference path)
    made sure of what both need: no grad, nothing dropped, no expert biases, N > 0, grouped_mm usable."""
    if decode_size(indices.numel(), gate_up.shape[0]):
        return small_ffn(x, weights, indices, gate_up, down, activation, limit)
    return lean_forward(x, weights, indices, gate_up, down, activation, limit)


# ----------------------------------------------------------------------------- entry point


def moe_ffn_torch(
    x: Tensor,
    weights: Tensor,
    indices: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    swiglu_limit: float | None = None,
    has_dropped: bool = False,
    deterministic: bool | None = None,
    *,
    activation: str = "silu",
    recompute: str = "act",
    small: bool | None = None,
    pad_to: int | None = None,
    gate_up_proj_bias: Tensor | None = None,
    down_proj_bias: Tensor | None = None,
) -> Tensor:
    """x [N, D], weights [N, k], indices int [N, k] (E = dropped when has_dropped) -> [N, D].

    deterministic=None: a fixed-order combine on CUDA, index_add on CPU (deterministic there too).
    recompute: "act" (save h, recompute the activation; default) | "gemm1" (save only x, run GEMM 1
    again in the backward). small: None = the decode path when N*k <= SMALL_ROWS (eager only);
    True / False force it on / off. pad_to: run every expert's GEMMs on exactly pad_to rows
    (MoEConfig.pad_to_capacity: a static [E, C, .] batch; needs pad_to >= every expert's count).
    gate_up_proj_bias [E, 2I] / down_proj_bias [E, D]: optional expert biases (not on lean_forward).
    """
    biases = (gate_up_proj_bias, down_proj_bias)
    has_bias = gate_up_proj_bias is not None or down_proj_bias is not None
    if pad_to is not None:
        small = False
    if deterministic is None:
        deterministic = x.device.type != "cpu"
    if recompute not in ("act", "gemm1"):
        raise ValueError(f"recompute must be 'act' or 'gemm1', got {recompute!r}")
    compiling = torch.compiler.is_compiling()
    if small is None:
        small = not compiling and decode_size(indices.numel(), gate_up_proj.shape[0])
    if small:
        return small_ffn(x, weights, indices, gate_up_proj, down_proj, activation, swiglu_limit, has_dropped, *biases)
    graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weights, gate_up_proj, down_proj, *biases))
    if not graph and lean_inference_applies(x, gate_up_proj, down_proj, has_dropped, pad_to, has_bias, deterministic):
        return lean_forward(x, weights, indices, gate_up_proj, down_proj, activation, swiglu_limit)
    plan = routing_plan(indices, gate_up_proj.shape[0], has_dropped, pad_to)
    if compiling:
        save_h = recompute == "act" and torch.is_grad_enabled()
        out, _ = torch.ops.moe_kit.sorted_ffn_fwd(
            x, weights, gate_up_proj, down_proj, *biases, [getattr(plan, f) for f in _PLAN_FIELDS], plan.num_experts,
            has_dropped, activation, None if swiglu_limit is None else float(swiglu_limit), deterministic, save_h,
            pad_to,
        )
        return out
    if not graph:
        return sorted_ffn_forward(x, weights, gate_up_proj, down_proj, plan, activation, swiglu_limit, deterministic,
                                  "none", None, *biases)[0]  # no autograd.Function, nothing saved
    return _SortedExpertsFFN.apply(
        x, weights, gate_up_proj, down_proj, *biases, plan, activation, swiglu_limit, deterministic,
        "h" if recompute == "act" else "none",
    )
