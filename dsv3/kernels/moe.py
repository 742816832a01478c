"""The routed experts of DeepSeekMoE (paper Sec. 2.1.2, Eq. 12): the dispatch between the reference
(`dsv3.layers.reference.moe_experts_torch`, sum_k g[n, k] * FFN_{ids[n, k]}(x_n) written out as a loop over the
experts that received tokens) and the fused version (`moe_triton.py`): the (token, slot) pairs are sorted by
expert and padded per expert to a multiple of the tile height, one grouped GEMM launch computes silu(gate) * up
for every expert, a second computes down with the gating weight fused, and the top_k partial outputs of a token
are summed in one reduction. Its backward is grouped the same way (one launch per projection and per gradient
kind). Both are differentiable w.r.t. x, the three weight tensors and the gating weights.

Weights follow nn.Linear: w_gate, w_up (E, I, D), w_down (E, D, I).
"""

from __future__ import annotations

from ..layers.reference import expert_counts, moe_experts_torch
from . import backend

__all__ = ["expert_counts", "moe_experts", "moe_experts_torch", "moe_experts_triton"]


def _check(x, w_gate, w_up, w_down, topk_weights, topk_ids):
    if x.dim() != 2:
        raise ValueError(f"moe_experts: x must be (N, D), got {tuple(x.shape)}")
    N, D = x.shape
    if w_gate.dim() != 3 or w_gate.shape[2] != D or w_up.shape != w_gate.shape:
        raise ValueError(
            f"moe_experts: w_gate/w_up must be (E, I, D={D}), got {tuple(w_gate.shape)}, {tuple(w_up.shape)}"
        )
    E, I, _ = w_gate.shape
    if w_down.shape != (E, D, I):
        raise ValueError(f"moe_experts: w_down must be (E, D, I) = {(E, D, I)}, got {tuple(w_down.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != N or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"moe_experts: topk_ids/topk_weights must be (N={N}, K), got {tuple(topk_ids.shape)}, "
            f"{tuple(topk_weights.shape)}"
        )


def moe_experts_triton(x, w_gate, w_up, w_down, topk_weights, topk_ids):
    """Fused grouped-GEMM MoE (forward and backward in Triton)."""
    return backend.load("moe_triton").moe_experts(x, w_gate, w_up, w_down, topk_weights, topk_ids)


def moe_experts(x, w_gate, w_up, w_down, topk_weights, topk_ids):
    """Routed experts: x (N, D) -> (N, D) in x.dtype, sum_k g[n,k] * FFN_{ids[n,k]}(x_n)."""
    _check(x, w_gate, w_up, w_down, topk_weights, topk_ids)
    same_dtype = w_gate.dtype == w_up.dtype == w_down.dtype == x.dtype
    # "auto" runs mixed dtypes through torch; an explicit "triton" lets the kernel raise its clear error
    if backend.use_triton(x, w_gate, w_up, w_down, topk_weights, topk_ids) and (
        same_dtype or backend.get_backend() == "triton"
    ):
        return moe_experts_triton(x, w_gate, w_up, w_down, topk_weights, topk_ids)
    return moe_experts_torch(x, w_gate, w_up, w_down, topk_weights, topk_ids)
