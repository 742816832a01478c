"""DeepSeekMoE (paper Sec. 2.1.2, Eq. 12-16; taught in Chapters 3 and 4): shared experts plus fine-grained routed
experts, sigmoid affinities, the auxiliary-loss-free correction bias and group (node)-limited top-k routing.

By default dispatch never drops a token: every token goes to exactly ``num_experts_per_tok`` routed experts
(DeepSeek-V3's "No Token-Dropping", Sec. 2.1.2). A capacity factor (``DeepSeekV3(config, capacity_factor=...)``,
``model.set_capacity(...)`` or ``with model.capacity(...)``) turns on GShard-style capacity
dropping, for comparison only (Chapter 4): each expert keeps at most ceil(cf * N * K / N_r) of its (token, slot)
pairs. Tokens are sorted by expert and each expert runs once on its contiguous slice (``dsv3.kernels.moe_experts``;
a grouped GEMM on GPU). The per-expert token counts come back with the output for the balancing code
(``dsv3.balance``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import ModelConfig
from .reference import router_topk_torch

CAPACITY_PRIORITIES = ("order", "weight")


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). The dense FFN of the first layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # inference: the same bits with two fewer (..., I) temporaries
            return self.down_proj(F.silu(self.gate_proj(x), inplace=True).mul_(self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (..., D)


@dataclass
class Routing:
    """What one MoE layer decided for N = B*T tokens (consumed by ``dsv3.balance`` and the book's figures)."""

    topk_ids: torch.Tensor  # (N, K_r) int64, the chosen routed experts
    topk_weights: torch.Tensor  # (N, K_r) fp32, gating weights g_{i,t} (normalized, times routed_scaling_factor)
    scores: torch.Tensor  # (N, N_r) fp32, sigmoid affinities s_{i,t} (differentiable: the balance loss needs them)
    counts: torch.Tensor  # (N_r,) int64, tokens sent to each expert
    batch_shape: tuple[int, int]  # (B, T), to regroup per sequence
    # fraction of (token, slot) pairs dropped by a capacity factor: 0.0 by default (none); with a capacity factor a
    # () fp64 tensor on the device, so that the forward pass never waits for the host (float() reads it)
    dropped: float | torch.Tensor = 0.0


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

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) -> router logits u = x e_i^T (N, N_r), in fp32 as released."""
        return F.linear(x.float(), self.weight.float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> gating weights (N, K) fp32, expert ids (N, K) int64, affinities (N, N_r) fp32."""
        logits = self.logits(x)  # (N, N_r)
        weights, ids = kernels.router_topk(logits, *self._settings())
        return weights, ids, logits.sigmoid()

    def steps(self, x: torch.Tensor) -> dict:
        """Every intermediate of routing x (N, D), from the reference itself (``router_topk_torch`` with
        ``return_steps=True``): affinities, biased scores, group scores, kept groups, chosen ids, weights."""
        return router_topk_torch(self.logits(x), *self._settings(), return_steps=True)

    def _settings(self) -> tuple:
        """The arguments after the logits that every router_topk implementation takes, in its order."""
        return (
            self.e_score_correction_bias.float(),
            self.top_k,
            self.n_group,
            self.topk_group,
            self.routed_scaling_factor,
            self.norm_topk_prob,
        )


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

    def __init__(self, config: ModelConfig, capacity_factor: float | None = None, capacity_priority: str = "order"):
        super().__init__()
        self.n_routed_experts = config.n_routed_experts
        self.gate = Router(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts > 0
            else None
        )
        self._capacity: tuple[float | None, str] = (None, "order")
        self.set_capacity(capacity_factor, capacity_priority)

    @property
    def capacity_factor(self) -> float | None:
        """None: never drop a token (V3); a number: GShard-style dropping (set with ``set_capacity``)."""
        return self._capacity[0]

    @property
    def capacity_priority(self) -> str:
        """What a full expert keeps: "order" (slot, then token) or "weight" (largest gating weights)."""
        return self._capacity[1]

    def set_capacity(self, capacity_factor: float | None, priority: str = "order") -> None:
        """Turn capacity dropping on (a factor > 0) or off (None); checked here, not at the next forward."""
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 (or None for no dropping), got {capacity_factor!r}")
        if priority not in CAPACITY_PRIORITIES:
            raise ValueError(f"capacity priority must be one of {CAPACITY_PRIORITIES}, got {priority!r}")
        self._capacity = (None if capacity_factor is None else float(capacity_factor), priority)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """x (B, T, D) -> (FFN output (B, T, D) without the residual, the routing decisions)."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)  # (N, D)
        weights, ids, scores = self.gate(flat)  # (N, K), (N, K), (N, N_r)
        dropped = 0.0
        if self.capacity_factor is not None:
            keep = capacity_keep(
                ids, weights, self.n_routed_experts, self.capacity_factor, self.capacity_priority
            )  # (N, K) bool
            weights = weights * keep  # a dropped pair contributes nothing (the token keeps its residual)
            dropped = 1.0 - keep.float().mean().double()  # () fp64, read by whoever needs the number
        y = self.experts(flat, weights, ids)  # (N, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)  # (N, D)
        counts = kernels.expert_counts(ids, self.n_routed_experts)  # (N_r,) assigned, before any dropping
        return y.view(B, T, D), Routing(ids, weights, scores, counts, (B, T), dropped)


def capacity_keep(
    ids: torch.Tensor, weights: torch.Tensor, n_experts: int, capacity_factor: float, priority: str = "order"
) -> torch.Tensor:
    """GShard-style expert capacity (a comparison for Chapter 4; DeepSeek-V3 drops nothing): which (token, slot)
    pairs of ids (N, K) an expert with room for C = ceil(capacity_factor * N * K / n_experts) pairs keeps.

    ``priority="order"``: first choices of all tokens before second choices, each in token order (GShard);
    ``"weight"``: the pairs with the largest gating weights first. Returns (N, K) bool, True = kept.
    """
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0 (or None for no dropping), got {capacity_factor!r}")
    if priority not in CAPACITY_PRIORITIES:
        raise ValueError(f"capacity priority must be one of {CAPACITY_PRIORITIES}, got {priority!r}")
    N, K = ids.shape
    capacity = math.ceil(capacity_factor * N * K / n_experts)
    if priority == "order":
        pref = torch.arange(N * K, device=ids.device).view(K, N).t().reshape(-1)  # (N*K,) slot-major rank of a pair
        by_pref = torch.argsort(pref)  # (N*K,) pairs in preference order
    else:
        by_pref = torch.argsort(weights.detach().reshape(-1), descending=True, stable=True)  # (N*K,)
    flat = ids.reshape(-1)  # (N*K,) expert of each pair
    order = by_pref[torch.argsort(flat[by_pref], stable=True)]  # (N*K,) grouped by expert, preferred first
    counts = torch.bincount(flat, minlength=n_experts)  # (E,)
    first = counts.cumsum(0) - counts  # (E,) where each expert's run starts in `order`
    rank = torch.empty_like(flat)  # (N*K,) position of a pair in its expert's queue
    rank[order] = torch.arange(N * K, device=ids.device) - first[flat[order]]
    return (rank < capacity).view(N, K)
