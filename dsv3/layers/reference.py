"""The paper's math in plain torch: the readable references of RMSNorm, RoPE, the router and the routed experts.

Each function here is the definition that the layers (``norm.py``, ``rope.py``, ``moe.py``) compute: they call it
through ``dsv3.kernels``, whose dispatch runs either this reference (anywhere, differentiable) or a fused Triton
kernel tested against it. This module imports torch only, so ``dsv3.kernels`` can import it without a cycle
(imports flow layers.reference <- kernels <- layers.norm/rope/moe/mla).

| function            | paper                | what                                                            |
|---------------------|----------------------|-----------------------------------------------------------------|
| rms_norm_torch      | Sec. 2               | RMSNorm, optionally after the residual add                      |
| apply_rope_torch    | Sec. 2.1.1, Eq. 3, 8 | rotation of interleaved pairs on the decoupled rope slice       |
| router_topk_torch   | Sec. 2.1.2, Eq. 13-16| sigmoid, bias for selection only, group-limited top-k           |
| moe_experts_torch   | Sec. 2.1.2, Eq. 12   | the routed experts' SwiGLU FFNs, weighted by the gates          |
| mla_decode_torch    | Sec. 2.1.1, Eq. 1-11 | absorbed (latent) attention of MLA, for prefill and decode      |
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------- RMSNorm
def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm (paper Sec. 2; every block normalizes its input before attention and before the MoE, and MLA
    normalizes its compressed latents), optionally fused with the residual add that precedes it:

        s = x + residual                             (when a residual is given)
        y = weight * (s / sqrt(mean(s^2) + eps))     statistics in fp32, cast back to s.dtype before the weight

    Returns y, or ``(y, s)`` with a residual. The cast before the weight matches transformers' DeepseekV3RMSNorm bit
    for bit, so the output dtype is ``promote(weight.dtype, s.dtype)``.
    """
    if residual is not None:
        s = x + residual  # (..., D) the updated residual stream
        return rms_norm_torch(s, weight, eps), s
    # F.rms_norm(h) = h * rsqrt(mean(h^2) + eps) in one call: the same bits as spelling it out, in fewer dispatches
    if x.dtype == weight.dtype == torch.float32:  # nothing to cast: the weight goes into the same op
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    h = F.rms_norm(x.float(), x.shape[-1:], eps=eps)  # (..., D) fp32
    return weight * h.to(x.dtype)


# ---------------------------------------------------------------------------------------------------- RoPE
def apply_rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding on the decoupled rope slice of q and k (paper Sec. 2.1.1, Eq. 3 and 8), in the
    INTERLEAVED layout of the released weights: the pair (x[2i], x[2i+1]) of x (B, T, H, R) rotates by theta_{t,i},

        out[2i]   = x[2i] cos - x[2i+1] sin
        out[2i+1] = x[2i] sin + x[2i+1] cos

    ``cos``/``sin`` are (B, T, R/2) tables, one row per position of each sequence (YaRN's frequencies and attention
    factor already folded in by ``dsv3.layers.rope``). Computed in fp32, rounded once to x.dtype.
    """
    B, T, H, R = x.shape
    xf = x.float().view(B, T, H, R // 2, 2)  # (B, T, H, R/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]  # (B, T, H, R/2) each
    c, s = cos[:, :, None, :].float(), sin[:, :, None, :].float()  # (B, T, 1, R/2)
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)  # (B, T, H, R/2, 2)
    return out.view(B, T, H, R).to(x.dtype)


# ---------------------------------------------------------------------------------------------------- router
def router_topk_torch(
    logits,
    bias,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool = True,
    return_steps: bool = False,
):
    """The DeepSeek-V3 router (paper Sec. 2.1.2, Eq. 13-16 and "Auxiliary-Loss-Free Load Balancing"; the
    "noaux_tc" method of the released config). For each token with router logits u (E,) and correction bias b (E,):

        s      = sigmoid(u)                              affinities (Eq. 15)
        c      = s + b                                   biased scores: used ONLY to choose experts
        group  = sum of the top K_r/M of c inside each of n_group contiguous groups of E / n_group experts
                 (K_r = top_k, M = topk_group: V3's 8 / 4 = the top 2)
        keep the M groups with the largest group score; experts elsewhere get c = -inf (not 0)
        idx    = top_k experts by c (sorted by descending c)
        g      = s[idx]                                  gating weights come from the UNBIASED affinities
        g      = g / (sum(g) + 1e-20)   if norm_topk_prob  (Eq. 16)
        g      = g * routed_scaling_factor

    logits (N, E), bias (E,) or None. Returns (weights (N, top_k) fp32, indices (N, top_k) int64), differentiable
    w.r.t. the logits through g. ``return_steps=True`` returns a dict of every intermediate instead (the book's
    step-by-step view): ``scores`` s, ``biased`` c, ``group_scores`` (N, G), ``kept_groups`` (N, G) bool, ``ids``,
    ``weights``, and ``per_group`` = K_r/M.
    """
    N, E = logits.shape
    per_group = top_k // topk_group  # K_r / M affinities make a group's score
    scores = logits.float().sigmoid()  # (N, E) affinities s
    biased = scores.detach() + (bias.float() if bias is not None else 0.0)  # (N, E) selection scores c
    selection, group_scores, kept = biased, None, None
    if topk_group < n_group or return_steps:
        grouped = biased.view(N, n_group, E // n_group)  # (N, G, E/G)
        group_scores = grouped.topk(per_group, dim=-1).values.sum(-1)  # (N, G)
        group_idx = group_scores.topk(topk_group, dim=-1).indices  # (N, M)
        kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)  # (N, G)
        selection = grouped.masked_fill(~kept[:, :, None], float("-inf")).view(N, E)  # dropped groups: -inf, not 0
    indices = selection.topk(top_k, dim=-1, sorted=True).indices  # (N, top_k) by descending c
    weights = scores.gather(1, indices)  # (N, top_k) unbiased affinities
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * routed_scaling_factor
    if return_steps:
        return dict(
            scores=scores,
            bias=bias,
            biased=biased,
            group_scores=group_scores,
            kept_groups=kept,
            ids=indices,
            weights=weights,
            per_group=per_group,
            n_group=n_group,
            topk_group=topk_group,
        )
    return weights, indices


# ---------------------------------------------------------------------------------------------------- experts
def expert_counts(topk_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: (E,) int64 (the load that Sec. 2.1.2's balancing watches)."""
    return torch.bincount(topk_ids.reshape(-1), minlength=n_experts)


def moe_experts_torch(x, w_gate, w_up, w_down, topk_weights, topk_ids, linear=None):
    """The routed experts of DeepSeekMoE (paper Sec. 2.1.2, Eq. 12): every token n goes to K experts and

        out_n = sum_k g[n, k] * FFN_e(x_n),   e = ids[n, k],   FFN_e(x) = W_down,e (silu(W_gate,e x) * (W_up,e x))

    x (N, D); w_gate, w_up (E, I, D) and w_down (E, D, I) as nn.Linear stores them; topk_weights/topk_ids (N, K).
    The (token, slot) pairs are sorted by expert and each expert that received tokens runs once on its contiguous
    slice (a loop over experts, never over tokens), then one ``index_add_`` sums the weighted rows per token.
    ``linear(rows, w, e)`` computes rows @ w[e]^T for one of the stacked weights w (default: a plain matmul);
    the FP8 recipe (``dsv3.fp8``) passes its FP8 GEMM here.
    """
    N, D = x.shape
    E = w_gate.shape[0]
    K = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)  # (N*K,) expert of each pair
    order = torch.argsort(flat_ids, stable=True)  # (N*K,) pairs grouped by expert
    token = order // K  # (N*K,) token of each sorted pair
    acc_dtype = torch.promote_types(x.dtype, torch.float32)  # accumulate in fp32 (fp64 stays fp64)
    out = torch.zeros((N, D), device=x.device, dtype=acc_dtype)  # (N, D) accumulator
    if N == 0:
        return out.to(x.dtype)
    counts = expert_counts(flat_ids, E).tolist()
    gate_w = topk_weights.reshape(-1)[order, None].to(acc_dtype)  # (N*K, 1)
    if linear is None and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_gate, w_up, w_down, topk_weights))
    ):
        return _moe_experts_no_grad(x, w_gate, w_up, w_down, gate_w, token, counts, out)
    ys, start = [], 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        xe = x[token[start : start + c]]  # (c, D) the rows this expert serves
        if linear is None:
            h = F.silu(xe @ w_gate[e].t()) * (xe @ w_up[e].t())  # (c, I)
            ys.append(h @ w_down[e].t())  # (c, D)
        else:
            h = F.silu(linear(xe, w_gate, e)) * linear(xe, w_up, e)  # (c, I)
            ys.append(linear(h, w_down, e))  # (c, D)
        start += c
    out.index_add_(0, token, torch.cat(ys).to(acc_dtype) * gate_w)  # each token sums its K weighted rows
    return out.to(x.dtype)


def _moe_experts_no_grad(x, w_gate, w_up, w_down, gate_w, token, counts, out):
    """The same loop without autograd (inference), in fewer passes over memory and the same bits: one gather of the
    sorted rows instead of one per expert, each expert's result written into its slice of one buffer (no
    concatenation), silu, product and gating weight applied in place."""
    xs = x[token]  # (N*K, D) the rows of every pair, grouped by expert
    ys = torch.empty(
        (xs.shape[0], w_down.shape[1]), device=x.device, dtype=torch.promote_types(x.dtype, w_down.dtype)
    )  # (N*K, D)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        xe = xs[start : start + c]  # (c, D) the rows this expert serves
        h = F.silu(xe @ w_gate[e].t(), inplace=True).mul_(xe @ w_up[e].t())  # (c, I)
        torch.mm(h, w_down[e].t(), out=ys[start : start + c])  # (c, D)
        start += c
    ys = ys.to(out.dtype)
    out.index_add_(0, token, ys.mul_(gate_w) if ys.dtype == gate_w.dtype else ys * gate_w)
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------------- MLA
def gather_paged(pool: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """(num_blocks, page, d) pool + (B, max_blocks) table -> contiguous (B, max_blocks * page, d)."""
    B, nb = block_table.shape
    page, d = pool.shape[1], pool.shape[2]
    idx = block_table.long().clamp(0, pool.shape[0] - 1)  # unused entries may hold anything
    return pool[idx].reshape(B, nb * page, d)


def mla_decode_torch(q_latent, q_rope, ckv_cache, krope_cache, seq_lens, scale, block_table=None, starts=None):
    """Multi-head Latent Attention in latent space (paper Sec. 2.1.1, "absorbed"), the one reference for prefill and
    decode. Absorbing W^UK into the query and W^UV into the output turns attention into a multi-query attention over
    the cached latent itself:

        q_latent[h] = q_nope[h] W^UK[h]                                    (B, Tq, H, r)   done by the caller
        score[h, s] = scale * (q_latent[h] . c^KV[s] + q_rope[h] . k^R[s])
        o_latent[h] = softmax_s(score[h]) c^KV                              (B, Tq, H, r)   this function
        output      = o_latent[h] W^UV[h]^T ...                            done by the caller

    The Tq queries of sequence b are its last Tq positions: query t sees positions s with
    starts[b] <= s < seq_lens[b] - Tq + t + 1 (causal; ``starts`` (B,), default 0, skips left padding, and a padding
    query sees only itself, so no row is empty). Scores are fp32; the Tq * H queries of a sequence share its cache,
    so each product is one batched matmul. ``block_table`` reads a paged cache (see ``dsv3.kernels.mla``).
    """
    B, Tq, H, r = q_latent.shape
    if block_table is not None:
        ckv_cache = gather_paged(ckv_cache, block_table)  # (B, S, r)
        krope_cache = gather_paged(krope_cache, block_table)  # (B, S, dr)
    L = min(int(seq_lens.max()), ckv_cache.shape[1]) if B else 0  # positions any query can see
    ckv = ckv_cache[:, :L].float()  # (B, L, r)
    q = q_latent.reshape(B, Tq * H, r).float()  # (B, Tq*H, r): query t's heads are rows t*H .. t*H + H - 1
    q_r = q_rope.reshape(B, Tq * H, -1).float()  # (B, Tq*H, dr)
    scores = torch.bmm(q, ckv.transpose(1, 2))  # (B, Tq*H, L): all heads read the same latent, like MQA
    scores = scores.baddbmm_(q_r, krope_cache[:, :L].float().transpose(1, 2)).mul_(scale)  # + the shared rope key
    masked = Tq > 1 or B > 1 or starts is not None  # one sequence and one query sees all L positions
    if masked:
        pos = torch.arange(L, device=q_latent.device)[None, None, :]  # (1, 1, L)
        limit = (seq_lens.long()[:, None] - Tq + torch.arange(Tq, device=q_latent.device)[None, :] + 1)[:, :, None]
        visible = pos < limit  # (B, Tq, L) causal
        if starts is not None:
            visible &= (pos >= starts.long()[:, None, None]) | (pos == limit - 1)  # left padding: never a key
        scores = scores.view(B, Tq, H, L).masked_fill_(~visible[:, :, None, :], float("-inf")).view(B, Tq * H, L)
    p = torch.softmax(scores, dim=-1)  # (B, Tq*H, L)
    if masked:
        p = p.nan_to_num(0.0)  # a query with nothing visible (seq_len < Tq) reads nothing
    return torch.bmm(p, ckv).view(B, Tq, H, r).to(q_latent.dtype)  # (B, Tq, H, r)
