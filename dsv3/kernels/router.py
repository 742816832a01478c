"""The DeepSeek-V3 router as one op, a biased group-limited top-k (paper Sec. 2.1.2): the dispatch between the
reference (`dsv3.layers.reference.router_topk_torch`, where the routing math is written out) and the Triton kernel,
which does the whole routing of a token in one program.

Returns (weights (N, top_k) fp32, indices (N, top_k) int64). The reference is differentiable with respect to the
logits through the gating weights; the Triton kernel is forward-only, so with autograd recording and logits that
require grad the dispatcher runs the reference (training), and the kernel serves inference.
"""

from __future__ import annotations

import torch

from ..layers.reference import router_topk_torch
from . import backend

__all__ = ["router_topk", "router_topk_torch", "router_topk_triton"]


def _check(logits, bias, top_k, n_group, topk_group):
    if logits.dim() != 2:
        raise ValueError(f"router_topk: logits must be (N, E), got {tuple(logits.shape)}")
    E = logits.shape[1]
    if bias is not None and bias.shape != (E,):
        raise ValueError(f"router_topk: bias must be ({E},), got {tuple(bias.shape)}")
    if n_group < 1 or E % n_group:
        raise ValueError(f"router_topk: n_routed_experts={E} is not divisible by n_group={n_group}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"router_topk: topk_group={topk_group} must be in [1, n_group={n_group}]")
    if top_k % topk_group:
        raise ValueError(
            f"router_topk: top_k={top_k} is not divisible by topk_group={topk_group} (a group's score "
            f"sums its top top_k/topk_group affinities)"
        )
    if not 1 <= top_k <= topk_group * (E // n_group):
        raise ValueError(
            f"router_topk: top_k={top_k} must be in [1, topk_group * E / n_group = {topk_group * (E // n_group)}]"
        )


def router_topk_triton(
    logits, bias, top_k: int, n_group: int, topk_group: int, routed_scaling_factor: float, norm_topk_prob: bool = True
):
    """One Triton program per token does the whole routing (forward only: no autograd)."""
    return backend.load("router_triton").router_topk(
        logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob
    )


def router_topk(
    logits, bias, top_k: int, n_group: int, topk_group: int, routed_scaling_factor: float, norm_topk_prob: bool = True
):
    """Biased group-limited top-k routing. Returns (weights (N, top_k) fp32, indices (N, top_k) int64)."""
    _check(logits, bias, top_k, n_group, topk_group)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    if not needs_grad and backend.use_triton(logits, bias):
        return router_topk_triton(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)
    return router_topk_torch(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)
