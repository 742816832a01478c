"""Triton kernel for the biased group-limited top-k router (reference: `dsv3.layers.reference.router_topk_torch`).

One program per token holds its E logits as a (groups, experts per group) tile: sigmoid, bias, the per-group
sum of the top top_k/topk_group scores (PER_GROUP: 2 for V3), the choice of topk_group groups and the top_k
experts are all done in registers by repeated max/argmax (top_k and topk_group are small constants, 8 and 4 for
V3), and the normalized, scaled weights are written once. Ties between equal scores resolve to the lower expert index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import next_pow2


@triton.jit
def _router_kernel(
    LOGITS,
    BIAS,
    W_OUT,
    IDX_OUT,
    stride_l,
    scaling,
    N_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    TOP_K: tl.constexpr,
    PER_GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_GS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)  # group index
    j = tl.arange(0, BLOCK_GS)  # index inside the group
    valid = (g[:, None] < N_GROUP) & (j[None, :] < GROUP_SIZE)  # (BLOCK_G, BLOCK_GS)
    e = tl.where(valid, g[:, None] * GROUP_SIZE + j[None, :], N_GROUP * GROUP_SIZE)  # expert id of each slot
    u = tl.load(LOGITS + row * stride_l + e, mask=valid, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-u))  # affinities
    c = s
    if HAS_BIAS:
        c = s + tl.load(BIAS + e, mask=valid, other=0.0).to(tl.float32)
    c = tl.where(valid, c, float("-inf"))  # (BLOCK_G, BLOCK_GS) selection scores

    if TOPK_GROUP < N_GROUP:
        # group score = sum of the PER_GROUP largest c in the group, taken one at a time
        rest = c
        gscore = tl.zeros([BLOCK_G], dtype=tl.float32)
        for _ in tl.static_range(PER_GROUP):
            gscore = gscore + tl.max(rest, axis=1)  # (BLOCK_G,)
            arg = tl.argmax(rest, axis=1)
            rest = tl.where(j[None, :] == arg[:, None], float("-inf"), rest)
        gscore = tl.where(g < N_GROUP, gscore, float("-inf"))
        keep = g < 0  # all False
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.argmax(gscore, axis=0)
            keep = keep | (g == best)
            gscore = tl.where(g == best, float("-inf"), gscore)
        c = tl.where(keep[:, None], c, float("-inf"))

    k = tl.arange(0, BLOCK_K)
    w_vec = tl.zeros([BLOCK_K], dtype=tl.float32)
    i_vec = tl.zeros([BLOCK_K], dtype=tl.int64)
    big = N_GROUP * GROUP_SIZE
    for kk in tl.static_range(TOP_K):
        m = tl.max(tl.max(c, axis=1), axis=0)
        idx = tl.min(tl.min(tl.where(c == m, e, big), axis=1), axis=0)  # lowest expert reaching the max
        chosen = e == idx
        w = tl.sum(tl.sum(tl.where(chosen, s, 0.0), axis=1), axis=0)
        w_vec = tl.where(k == kk, w, w_vec)
        i_vec = tl.where(k == kk, idx.to(tl.int64), i_vec)
        c = tl.where(chosen, float("-inf"), c)
    if NORM:
        w_vec = w_vec / (tl.sum(w_vec, axis=0) + 1e-20)
    w_vec = w_vec * scaling
    kmask = k < TOP_K
    tl.store(W_OUT + row * TOP_K + k, w_vec, mask=kmask)
    tl.store(IDX_OUT + row * TOP_K + k, i_vec, mask=kmask)


def router_topk(logits, bias, top_k, n_group, topk_group, routed_scaling_factor, norm_topk_prob=True):
    N, E = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    weights = torch.empty((N, top_k), device=logits.device, dtype=torch.float32)  # (N, top_k)
    indices = torch.empty((N, top_k), device=logits.device, dtype=torch.int64)  # (N, top_k)
    if N == 0:
        return weights, indices
    group_size = E // n_group
    bias_arg = bias.contiguous() if bias is not None else logits
    _router_kernel[(N,)](
        logits,
        bias_arg,
        weights,
        indices,
        logits.stride(0),
        float(routed_scaling_factor),
        N_GROUP=n_group,
        GROUP_SIZE=group_size,
        TOPK_GROUP=topk_group,
        TOP_K=top_k,
        PER_GROUP=top_k // topk_group,
        HAS_BIAS=bias is not None,
        NORM=bool(norm_topk_prob),
        BLOCK_G=next_pow2(n_group),
        BLOCK_GS=next_pow2(group_size),
        BLOCK_K=next_pow2(top_k),
        num_warps=4 if E >= 128 else 1,
    )
    return weights, indices
