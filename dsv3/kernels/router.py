"""The DeepSeek-V3 router as one op: a biased, group-limited top-k (paper Sec. 2.1.2 Eq. 13-16 and
Sec. 2.1.2 "Auxiliary-Loss-Free Load Balancing"; the "noaux_tc" method of the released config).

For each token with router logits u (E,) and the correction bias b (E,):

    s      = sigmoid(u)                              affinities (Eq. 15)
    c      = s + b                                   biased scores: used ONLY to choose experts
    group  = sum of the top-2 of c inside each of n_group contiguous groups of E / n_group experts
    keep the topk_group groups with the largest group score; experts elsewhere get c = -inf
    idx    = top_k experts by c (sorted by descending c)
    g      = s[idx]                                  gating weights come from the UNBIASED affinities
    g      = g / (sum(g) + 1e-20)   if norm_topk_prob  (Eq. 16)
    g      = g * routed_scaling_factor

Returns (weights (N, top_k) fp32, indices (N, top_k) int64). The torch reference is differentiable with
respect to the logits through g; the Triton kernel is forward-only, so with autograd recording and logits
that require grad the dispatcher runs the reference (training), and the kernel serves inference.
"""
from __future__ import annotations

import torch

from . import backend


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
    if topk_group < n_group and E // n_group < 2:
        raise ValueError(f"router_topk: group scores sum the top-2 experts of a group, but groups have {E // n_group}")
    if not 1 <= top_k <= topk_group * (E // n_group):
        raise ValueError(
            f"router_topk: top_k={top_k} must be in [1, topk_group * E / n_group = {topk_group * (E // n_group)}]"
        )


def router_topk_torch(logits, bias, top_k: int, n_group: int, topk_group: int, routed_scaling_factor: float,
                      norm_topk_prob: bool = True):
    """Reference biased grouped top-k; see the module docstring. logits (N, E), bias (E,) or None."""
    N, E = logits.shape
    scores = logits.float().sigmoid()  # (N, E) affinities s
    biased = scores.detach() + (bias.float() if bias is not None else 0.0)  # (N, E) selection scores c
    if topk_group < n_group:
        grouped = biased.view(N, n_group, E // n_group)  # (N, G, E/G)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (N, G)
        group_idx = group_scores.topk(topk_group, dim=-1).indices  # (N, topk_group)
        group_drop = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, False)  # (N, G)
        biased = grouped.masked_fill(group_drop[:, :, None], float("-inf")).view(N, E)  # dropped groups: -inf, not 0
    indices = biased.topk(top_k, dim=-1, sorted=True).indices  # (N, top_k) by descending c
    weights = scores.gather(1, indices)  # (N, top_k) unbiased affinities
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, indices


def router_topk_triton(logits, bias, top_k: int, n_group: int, topk_group: int, routed_scaling_factor: float,
                       norm_topk_prob: bool = True):
    """One Triton program per token does the whole routing (forward only: no autograd)."""
    return backend.load("router_triton").router_topk(
        logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)


def router_topk(logits, bias, top_k: int, n_group: int, topk_group: int, routed_scaling_factor: float,
                norm_topk_prob: bool = True):
    """Biased group-limited top-k routing. Returns (weights (N, top_k) fp32, indices (N, top_k) int64)."""
    _check(logits, bias, top_k, n_group, topk_group)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    if not needs_grad and backend.use_triton(logits, bias):
        return router_topk_triton(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)
    return router_topk_torch(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob)
