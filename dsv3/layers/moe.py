"""DeepSeekMoE (paper Sec. 2.1.2, Eq. 12-16; taught in Chapters 3 and 4): shared experts plus fine-grained routed
experts, sigmoid affinities, the auxiliary-loss-free correction bias and group (node)-limited top-k routing.

Dispatch never drops a token: every token goes to exactly ``num_experts_per_tok`` routed experts. Tokens are
sorted by expert and each expert runs once on its contiguous slice (``dsv3.kernels.moe_experts``; a grouped GEMM on
GPU). The per-expert token counts come back with the output for the balancing code (``dsv3.balance``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import ModelConfig


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). The dense FFN of the first layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (..., D)


@dataclass
class Routing:
    """What one MoE layer decided for N = B*T tokens (consumed by ``dsv3.balance`` and the book's figures)."""

    topk_ids: torch.Tensor  # (N, K_r) int64, the chosen routed experts
    topk_weights: torch.Tensor  # (N, K_r) fp32, gating weights g_{i,t} (normalized, times routed_scaling_factor)
    scores: torch.Tensor  # (N, N_r) fp32, sigmoid affinities s_{i,t} (differentiable: the balance loss needs them)
    counts: torch.Tensor  # (N_r,) int64, tokens sent to each expert
    batch_shape: tuple[int, int]  # (B, T), to regroup per sequence


class Router(nn.Module):
    """The gate: affinities s = sigmoid(u W^T) (Eq. 15), selection by s + b under group limits, weights from s alone.

    ``e_score_correction_bias`` (b_i) is a buffer, never trained by gradients: the balancing code moves it by +-gamma
    (Sec. 2.1.2). It changes which experts are chosen, never the gating weights.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.routed_scaling_factor = config.routed_scaling_factor
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))  # (N_r, D) centroids e_i
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))  # (N_r,) fp32

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> gating weights (N, K) fp32, expert ids (N, K) int64, affinities (N, N_r) fp32."""
        logits = F.linear(x.float(), self.weight.float())  # (N, N_r), routing in fp32 as released
        weights, ids = kernels.router_topk(logits, self.e_score_correction_bias.float(), self.top_k, self.n_group,
                                           self.topk_group, self.routed_scaling_factor, self.norm_topk_prob)
        return weights, ids, logits.sigmoid()


class Experts(nn.Module):
    """The N_r routed experts, stored stacked as (E, out, in) tensors so one grouped GEMM can run them all.

    The released checkpoint names each expert separately (``experts.{e}.gate_proj.weight``); ``dsv3.checkpoint``
    splits and stacks on save and load.
    """

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        E, D, I = n_experts, hidden_size, intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))  # (E, I, D)
        self.up_proj = nn.Parameter(torch.empty(E, I, D))  # (E, I, D)
        self.down_proj = nn.Parameter(torch.empty(E, D, I))  # (E, D, I)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x (N, D), weights/ids (N, K) -> sum_k weights[n, k] * FFN_{ids[n, k]}(x_n), shape (N, D)."""
        return kernels.moe_experts(x, self.gate_proj, self.up_proj, self.down_proj, weights, ids)


class DeepSeekMoE(nn.Module):
    """h' = h + sum_i FFN^(s)_i(h) + sum_i g_i FFN^(r)_i(h) (Eq. 12), with the released names gate / experts /
    shared_experts."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_routed_experts = config.n_routed_experts
        self.gate = Router(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts > 0 else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """x (B, T, D) -> (FFN output (B, T, D) without the residual, the routing decisions)."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)  # (N, D)
        weights, ids, scores = self.gate(flat)  # (N, K), (N, K), (N, N_r)
        y = self.experts(flat, weights, ids)  # (N, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)  # (N, D)
        counts = kernels.expert_counts(ids, self.n_routed_experts)  # (N_r,)
        return y.view(B, T, D), Routing(ids, weights, scores, counts, (B, T))
