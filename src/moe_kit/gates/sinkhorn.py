"""SinkhornGate: top-k of the Sinkhorn-balanced router scores in training, plain top-k in eval.

The balanced linear assignment of BASE layers (Lewis et al., 2021) as Megatron-Core approximates it
(moe_router_load_balancing_type="sinkhorn"). Legend: N tokens (N_real real ones), E experts,
k experts per token; logits L [N, E].

Megatron's `sinkhorn(cost=L)` scales P = exp(L) by row factors d0 [N] and column factors d1 [E]
until rows sum to 1/N and columns to 1/E (every expert gets the same share of the tokens):
    d0 = 1 / (N * (exp(L) @ d1)),   d1 = 1 / (E * (d0 @ exp(L))),   repeated from d1 = 1
Here the same iteration runs in log space (u = log d0, v = log d1, logsumexp instead of sums of
exponentials), so logits of any size stay finite (exp(L) overflows fp32 at L > 88), in fp32 (fp64
with router_dtype fp64), under no_grad:
    u = -log N - logsumexp_e(L + v),   v = -log E - logsumexp_n(L + u)   (padding rows left out)
Stopping: after SINKHORN_MAX_ITERS iterations or once mean |v_new - v| <= SINKHORN_TOL (the
relative change of d1; Megatron's mean |d1_new - d1|, tol 1e-4, is the same where d1 ~ 1, but
stays finite for large logits). An iteration past convergence leaves u, v unchanged, so eager
mode (which stops early, one host sync every SINKHORN_CHECK_EVERY iterations) and torch.compile
(all iterations, no sync) choose the same experts.

Selection: top-k over experts of log P = L + u + v. u is constant per token, so this is top-k of
L + v: the Sinkhorn column factors act as a per-expert bias fitted to the batch. Weights come from
the unnormalized scores of the chosen experts, as in Megatron: scores = cfg.score_func(L) gathered
at the chosen experts, then norm_topk_prob / route_scale as in TopKGate. (Megatron hard-codes the
score function: sigmoid for k = 1, softmax for k > 1; set cfg.score_func accordingly to match it.)
Eval mode: plain top-k of the scores (no balancing), as Megatron.

What it buys: the soft plan is balanced exactly, its hard top-k only roughly (a router sending
~all tokens to 2 of 8 experts, top-2 of 1024 tokens: max/mean load 1.50 instead of 4.0, see
tests/test_routing_schemes.py; exact balance is expert choice's). Nothing trains the router itself
toward balance, so eval-mode (plain top-k) load may stay skewed: examples/routing_collapse.py
measures it. With very few tokens (N = 1: every plan entry is 1/E) the plan ties and the choice
is arbitrary; Sinkhorn is meant for training batches.
Under expert parallelism each rank balances its own tokens (the gate is replicated, no exchange).
"""

from __future__ import annotations

import math

import torch

from moe_kit.config import MoEConfig, register_scheme_check
from moe_kit.gates.router import Router

# Wanted as MoEConfig fields (sinkhorn_max_iters, sinkhorn_tol); module constants until then.
SINKHORN_MAX_ITERS = 64  # upper bound on the iterations of one forward
SINKHORN_TOL = 1e-4  # stop once mean |v_new - v| <= tol (Megatron's tol)
SINKHORN_CHECK_EVERY = 8  # eager: one host sync per this many iterations to stop early


class SinkhornGate(Router):
    """Sinkhorn-balanced top-k router (cfg.routing == "sinkhorn").

    forward(x [..., D], token_mask bool [...] = None) -> (weights [N, k] in the router dtype,
    indices int64 [N, k]). Padded tokens (token_mask False) take no part in the balancing.
    After a training forward, `sinkhorn_iters` is the number of iterations the last forward ran
    (an int in eager mode; None when compiled or in eval).
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        check_sinkhorn_config(self.cfg)
        self.expert_bias = None
        self.expert_counts = None
        self.sinkhorn_iters: int | None = None

    def forward(
        self, x: torch.Tensor, *, input_ids: torch.Tensor | None = None, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., D] -> (weights [N, k] in the router dtype, indices int64 [N, k]); input_ids unused."""
        scores, logits, batch_shape, mask = self._score(x, token_mask)  # [N, E] each
        self.sinkhorn_iters = None
        if self.training:
            plan, self.sinkhorn_iters = sinkhorn_log_plan(logits.detach(), mask, SINKHORN_MAX_ITERS, SINKHORN_TOL)
            indices = plan.topk(self.top_k, dim=-1).indices  # [N, k]
        else:
            indices = scores.detach().topk(self.top_k, dim=-1).indices
        return self._finish_weights(scores, indices, logits, batch_shape, mask), indices


def check_sinkhorn_config(cfg: MoEConfig) -> None:
    """The fields Sinkhorn routing cannot take (ValueError naming them)."""
    if cfg.expert_bias or cfg.n_groups > 1:
        raise ValueError(
            "routing='sinkhorn' is incompatible with expert_bias and n_groups > 1 (the Sinkhorn plan "
            "balances the selection itself, as Megatron's sinkhorn load balancing)"
        )
    if cfg.routes_by_hash:
        raise ValueError("routing='sinkhorn' is incompatible with hash routing (hash_routing / n_hash_layers)")


register_scheme_check("sinkhorn", check_sinkhorn_config)


@torch.no_grad()
def sinkhorn_log_plan(
    logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    max_iters: int = SINKHORN_MAX_ITERS,
    tol: float = SINKHORN_TOL,
    check_every: int = SINKHORN_CHECK_EVERY,
) -> tuple[torch.Tensor, int | None]:
    """log of Megatron's sinkhorn(logits): (log P [N, E], iterations run or None when compiled).

    P = diag(exp(u)) exp(L) diag(exp(v)): rows sum to 1/N_real, columns to 1/E (over real rows).
    logits [N, E] (computed in fp32, or fp64 if given fp64); mask bool [N] or None (False rows
    take no part in the column sums; their rows of log P are still filled). tol=0 runs max_iters.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(dtype)
    num_tokens, num_experts = logits.shape
    if mask is None:
        columns = logits
        log_n = math.log(max(num_tokens, 1))
    else:
        columns = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))  # padding rows add nothing
        log_n = mask.sum().clamp_min(1).to(dtype).log()
    log_e = math.log(num_experts)
    v = logits.new_zeros(num_experts)  # log d1, d1 = 1 at the start
    u = logits.new_zeros(num_tokens)
    done = torch.zeros((), dtype=torch.bool, device=logits.device)
    eager = not (torch.compiler.is_compiling() or logits.is_meta)
    iters = 0
    for it in range(max_iters):
        u_new = -log_n - torch.logsumexp(logits + v, dim=1)  # [N]
        v_new = -log_e - torch.logsumexp(columns + u_new.unsqueeze(1), dim=0)  # [E]
        v_new = torch.where(torch.isfinite(v_new), v_new, 0.0)  # no real token: nothing to balance
        change = (v_new - v).abs().mean()
        u, v = torch.where(done, u, u_new), torch.where(done, v, v_new)  # converged: frozen
        done = done | (change <= tol)
        iters = it + 1
        if eager and iters % check_every == 0 and bool(done):  # one host sync per check_every iterations
            break
    return logits + u.unsqueeze(1) + v, (iters if eager else None)
