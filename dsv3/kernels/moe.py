"""The routed experts of DeepSeekMoE (paper Sec. 2.1.2, Eq. 12): every token n goes to top_k experts and

    out_n = sum_k g[n, k] * FFN_e(x_n),   e = ids[n, k],   FFN_e(x) = W_down,e (silu(W_gate,e x) * (W_up,e x))

Weights follow nn.Linear: w_gate, w_up (E, I, D), w_down (E, D, I). The (token, slot) pairs are sorted by
expert so that each expert multiplies one contiguous block of rows.

`moe_experts_torch` is the readable reference: a loop over the experts that received tokens (never over
tokens), each doing three matmuls on its rows, then one `index_add_` of the weighted results back to the tokens.
`moe_experts_triton` is the fused version (`moe_triton.py`): the pairs are padded per expert to a multiple of the
tile height, one grouped GEMM launch computes silu(gate) * up for every expert, a second computes down with the
gating weight fused, and the top_k partial outputs of a token are summed in one reduction. Its backward is
grouped the same way (one launch per projection and per gradient kind). Both are differentiable w.r.t. x, the
three weight tensors and the gating weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend


def expert_counts(topk_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: (E,) int64 (the load that Sec. 2.1.2's balancing watches)."""
    return torch.bincount(topk_ids.reshape(-1), minlength=n_experts)


def _check(x, w_gate, w_up, w_down, topk_weights, topk_ids):
    if x.dim() != 2:
        raise ValueError(f"moe_experts: x must be (N, D), got {tuple(x.shape)}")
    N, D = x.shape
    if w_gate.dim() != 3 or w_gate.shape[2] != D or w_up.shape != w_gate.shape:
        raise ValueError(f"moe_experts: w_gate/w_up must be (E, I, D={D}), got {tuple(w_gate.shape)}, "
                         f"{tuple(w_up.shape)}")
    E, I, _ = w_gate.shape
    if w_down.shape != (E, D, I):
        raise ValueError(f"moe_experts: w_down must be (E, D, I) = {(E, D, I)}, got {tuple(w_down.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != N or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"moe_experts: topk_ids/topk_weights must be (N={N}, K), got {tuple(topk_ids.shape)}, "
                         f"{tuple(topk_weights.shape)}")


def moe_experts_torch(x, w_gate, w_up, w_down, topk_weights, topk_ids, linear=None):
    """Reference: sort the (token, slot) pairs by expert and run each expert once on its slice.

    ``linear(rows, w, e)`` computes rows @ w[e]^T for one of the stacked weights w (default: a plain matmul);
    the FP8 recipe (``dsv3.fp8``) passes its FP8 GEMM here."""
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
    ys, start = [], 0
    for e, c in enumerate(expert_counts(flat_ids, E).tolist()):
        if c == 0:
            continue
        xe = x[token[start:start + c]]  # (c, D) the rows this expert serves
        if linear is None:
            h = F.silu(xe @ w_gate[e].t()) * (xe @ w_up[e].t())  # (c, I)
            ys.append(h @ w_down[e].t())  # (c, D)
        else:
            h = F.silu(linear(xe, w_gate, e)) * linear(xe, w_up, e)  # (c, I)
            ys.append(linear(h, w_down, e))  # (c, D)
        start += c
    gate_w = topk_weights.reshape(-1)[order, None].to(acc_dtype)  # (N*K, 1)
    out.index_add_(0, token, torch.cat(ys).to(acc_dtype) * gate_w)  # each token sums its K weighted rows
    return out.to(x.dtype)


def moe_experts_triton(x, w_gate, w_up, w_down, topk_weights, topk_ids):
    """Fused grouped-GEMM MoE (forward and backward in Triton)."""
    return backend.load("moe_triton").moe_experts(x, w_gate, w_up, w_down, topk_weights, topk_ids)


def moe_experts(x, w_gate, w_up, w_down, topk_weights, topk_ids):
    """Routed experts: x (N, D) -> (N, D) in x.dtype, sum_k g[n,k] * FFN_{ids[n,k]}(x_n)."""
    _check(x, w_gate, w_up, w_down, topk_weights, topk_ids)
    same_dtype = w_gate.dtype == w_up.dtype == w_down.dtype == x.dtype
    # "auto" runs mixed dtypes through torch; an explicit "triton" lets the kernel raise its clear error
    if backend.use_triton(x, w_gate, w_up, w_down, topk_weights, topk_ids) and (
            same_dtype or backend.get_backend() == "triton"):
        return moe_experts_triton(x, w_gate, w_up, w_down, topk_weights, topk_ids)
    return moe_experts_torch(x, w_gate, w_up, w_down, topk_weights, topk_ids)
