"""Load balancing of DeepSeekMoE (paper Sec. 2.1.2; taught in Chapter 4).

DeepSeek-V3 keeps its routed experts busy without an auxiliary loss in the gradient. Each MoE layer's router holds
a bias b_i (``gate.e_score_correction_bias``) that is added to the affinities only to *choose* experts (the gating
weights still come from the raw affinities). After every optimizer step the bias moves by the update speed gamma
toward balance, using the loads counted over the step's whole (global) batch:

    b_i <- b_i + gamma * sign(mean_j load_j - load_i)     overloaded: -gamma, underloaded: +gamma, balanced: 0

This is the auxiliary-loss-free strategy of Wang et al. 2024 ("Auxiliary-Loss-Free Load Balancing Strategy for
Mixture-of-Experts", arXiv 2408.15664). The paper trains with gamma = 0.001 for the first 14.3T tokens and
gamma = 0 for the last 500B (Sec. 4.2). A small complementary *sequence-wise* loss (Eq. 17-20, alpha = 0.0001)
guards against extreme imbalance inside single sequences:

    f_i = N_r / (K_r T) * sum_t 1[expert i in the top-K_r of token t]      (Eq. 18)
    s'_{i,t} = s_{i,t} / sum_j s_{j,t}                                      (Eq. 19)
    P_i = 1/T * sum_t s'_{i,t}                                               (Eq. 20)
    L_Bal = alpha * sum_i f_i P_i                                            (Eq. 17)

For comparison, ``batch_aux_loss`` is the conventional auxiliary loss (Switch Transformer / GShard style) over the
whole batch instead of one sequence, the baseline the aux-loss-free paper improves on.

Metrics: expert loads, MaxVio = max_i load_i / mean_j load_j - 1 (Wang et al. Sec. 4.1; per batch, or over a whole
validation set for the "global" MaxVio) and the number of groups (nodes) each token touches under group-limited
routing (at most ``topk_group`` = M, Sec. 2.1.2 "Node-Limited Routing").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .layers.moe import DeepSeekMoE, Routing

BALANCE_MODES = ("bias", "aux", "none")
PAPER_BIAS_UPDATE_SPEED = 0.001  # gamma of DeepSeek-V3 pre-training (Sec. 4.2)
PAPER_SEQ_AUX_ALPHA = 0.0001  # alpha of the sequence-wise balance loss (Sec. 4.2)
PAPER_BIAS_UPDATE_UNTIL = 14.3 / 14.8  # gamma = 0.001 for the first 14.3T of 14.8T tokens, then 0


# ---------------------------------------------------------------------- loads and MaxVio
def expert_loads(routings: Sequence[Routing]) -> torch.Tensor:
    """(L, N_r) int64: tokens sent to each routed expert, one row per MoE layer (in the order given), on the
    routings' device (reading it is the caller's one host synchronization)."""
    return torch.stack([r.counts.detach().long() for r in routings])


def max_vio(loads: torch.Tensor) -> torch.Tensor:
    """MaxVio = max_i load_i / mean_j load_j - 1 along the last dim: 0 when perfectly balanced, N_r/K_r - 1 when a
    few experts take every token. loads (..., N_r) -> (...,) fp32 (0 for an all-zero row)."""
    load = loads.float()
    mean = load.mean(-1)  # (...,)
    return torch.where(mean > 0, load.amax(-1) / mean.clamp_min(1e-12) - 1.0, torch.zeros_like(mean))


def groups_per_token(topk_ids: torch.Tensor, n_group: int, n_experts: int) -> torch.Tensor:
    """How many distinct expert groups (nodes in training) each token's top-K experts lie in: (N,) int64.

    Under group-limited routing this never exceeds ``topk_group`` (M = 4 nodes for V3, Sec. 2.1.2)."""
    N, K = topk_ids.shape
    groups = topk_ids // (n_experts // n_group)  # (N, K) group of each chosen expert
    touched = torch.zeros(N, n_group, dtype=torch.bool, device=topk_ids.device)  # (N, G)
    touched.scatter_(1, groups, True)
    return touched.sum(-1)  # (N,)


# ---------------------------------------------------------------------- the bias update (aux-loss-free)
@torch.no_grad()
def bias_update(bias: torch.Tensor, loads: torch.Tensor, gamma: float) -> torch.Tensor:
    """Move one layer's correction bias (N_r,) in place by gamma toward balance; return the step taken (N_r,).

    ``loads`` (N_r,) counts the tokens each expert received over the whole optimizer step (all micro-batches).
    Overloaded experts (load above the mean) get -gamma, underloaded ones +gamma, exactly balanced ones 0.
    """
    if gamma < 0:
        raise ValueError(f"bias update speed gamma must be >= 0, got {gamma}")
    if loads.shape != bias.shape:
        raise ValueError(f"loads has shape {tuple(loads.shape)}, expected the bias shape {tuple(bias.shape)}")
    load = loads.to(device=bias.device, dtype=torch.float32)  # (N_r,)
    step = gamma * torch.sign(load.mean() - load)  # (N_r,) +gamma underloaded, -gamma overloaded
    bias += step.to(bias.dtype)
    return step


def update_biases(moe_layers: Sequence[DeepSeekMoE], loads: torch.Tensor, gamma: float) -> None:
    """Apply ``bias_update`` to every MoE layer; ``loads`` (L, N_r) in the order of ``model.moe_layers()``."""
    if len(moe_layers) != loads.shape[0]:
        raise ValueError(f"got loads for {loads.shape[0]} MoE layers, but the model has {len(moe_layers)}")
    for layer, load in zip(moe_layers, loads):
        bias_update(layer.gate.e_score_correction_bias, load, gamma)


# ---------------------------------------------------------------------- balance losses
def _f_and_p(routing: Routing, n_seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of tokens (n_seq groups of N / n_seq tokens): f_i (Eq. 18) and P_i (Eq. 20), each (n_seq, N_r)."""
    N, E = routing.scores.shape
    K = routing.topk_ids.shape[1]
    T = N // n_seq
    s = routing.scores.float()  # (N, N_r), differentiable
    s_norm = s / s.sum(-1, keepdim=True)  # (N, N_r) s'_{i,t}, Eq. 19
    P = s_norm.view(n_seq, T, E).mean(1)  # (n_seq, N_r), Eq. 20
    hits = torch.zeros(N, E, device=s.device, dtype=torch.float32)  # (N, N_r)
    hits.scatter_(1, routing.topk_ids, 1.0)  # 1[expert i in top-K of token t]
    f = hits.view(n_seq, T, E).sum(1) * (E / (K * T))  # (n_seq, N_r), Eq. 18
    return f, P


def sequence_balance_loss(routings: Sequence[Routing], alpha: float) -> torch.Tensor:
    """The complementary sequence-wise balance loss (Eq. 17-20): alpha * sum_i f_i P_i per sequence, averaged over
    the sequences of the batch and summed over the MoE layers given. f carries no gradient; P does."""
    total = None
    for r in routings:
        B, _ = r.batch_shape
        f, P = _f_and_p(r, B)  # (B, N_r) each
        loss = (f * P).sum(-1).mean()  # mean over sequences
        total = loss if total is None else total + loss
    if total is None:
        return torch.zeros(())
    return alpha * total


def batch_aux_loss(routings: Sequence[Routing], alpha: float) -> torch.Tensor:
    """The conventional auxiliary balance loss (Switch/GShard style, the aux-loss-free paper's baseline) computed
    over the whole batch: alpha * sum_i f_i P_i with f and P over all B*T tokens, on normalized sigmoid affinities,
    summed over the MoE layers given."""
    total = None
    for r in routings:
        f, P = _f_and_p(r, 1)  # (1, N_r) each
        loss = (f * P).sum()
        total = loss if total is None else total + loss
    if total is None:
        return torch.zeros(())
    return alpha * total


def balance_loss(
    routings: Sequence[Routing], mode: str, seq_aux_alpha: float = PAPER_SEQ_AUX_ALPHA, aux_alpha: float = 0.0
) -> torch.Tensor:
    """The balance term the trainer adds to the loss for a ``balance`` mode: ``"bias"`` the sequence-wise loss with
    ``seq_aux_alpha`` (the bias itself moves outside the gradient), ``"aux"`` the batch-wise auxiliary loss with
    ``aux_alpha``, ``"none"`` zero."""
    if mode == "bias":
        return sequence_balance_loss(routings, seq_aux_alpha) if seq_aux_alpha > 0 else torch.zeros(())
    if mode == "aux":
        return batch_aux_loss(routings, aux_alpha) if aux_alpha > 0 else torch.zeros(())
    if mode == "none":
        return torch.zeros(())
    raise ValueError(f"balance must be one of {BALANCE_MODES}, got {mode!r}")


# ---------------------------------------------------------------------- what a training step reports
def mean_groups_per_token(routings: Sequence[Routing], n_group: int) -> torch.Tensor:
    """(L,) fp32 on the routings' device, per MoE layer: the mean number of expert groups (nodes) a token's routed
    experts lie in."""
    return torch.stack([groups_per_token(r.topk_ids, n_group, r.scores.shape[1]).float().mean() for r in routings])


def routing_metrics(routings: Sequence[Routing], n_group: int) -> dict:
    """Per-layer statistics of one forward pass (JSON-serializable): loads, MaxVio, mean groups per token and the
    dropped fraction (nonzero only with a capacity factor)."""
    loads = expert_loads(routings)  # (L, N_r)
    return {
        "loads": loads.tolist(),
        "max_vio_layers": max_vio(loads).tolist(),
        "groups_per_token": mean_groups_per_token(routings, n_group).tolist(),
        "dropped": [float(r.dropped) for r in routings],
    }
