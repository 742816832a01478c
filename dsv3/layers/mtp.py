"""Multi-Token Prediction modules (paper Sec. 2.2, Eq. 21-25; taught in Chapters 5 and 6).

Module k (k = 1..D) predicts token t_{i+k+1} at position i. It keeps the causal chain: its input combines the
previous depth's representation h^{k-1}_i with the embedding of token t_{i+k}:

    h'^k_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])      (Eq. 21; embedding first, as the weights are)
    h^k    = Block_k(h'^k)                                           (Eq. 22, a full MLA + MoE block)
    P^k    = OutHead(shared_head.norm(h^k))                          (Eq. 23; head and embedding shared)

The representation passed on to depth k+1 is the normalized one, shared_head.norm(h^k); h^0 is the main model's
final normalized hidden state (the input of its output head), as in transformers' MTP implementation.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .block import Block
from .mla import KVCache
from .moe import Routing
from .norm import RMSNorm


class SharedHead(nn.Module):
    """The released ``shared_head``: its own final norm; the output projection is the main model's lm_head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPModule(Block):
    """One MTP depth: a Block (released names at layer index num_hidden_layers + k - 1) plus enorm, hnorm, eh_proj
    and shared_head.norm."""

    def __init__(self, config: ModelConfig, depth: int):
        super().__init__(config, layer_idx=config.num_hidden_layers + depth - 1)
        self.depth = depth
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)  # M_k
        self.shared_head = SharedHead(config)

    def forward(
        self,
        prev_hidden: torch.Tensor,
        token_embeds: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        starts: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        latent: bool = False,
    ) -> tuple[torch.Tensor, Routing | None]:
        """prev_hidden h^{k-1} (B, T, D), token_embeds Emb(t_{i+k}) (B, T, D) -> normalized h^k (B, T, D), routing."""
        x = self.eh_proj(torch.cat([self.enorm(token_embeds), self.hnorm(prev_hidden)], dim=-1))  # (B, T, D)
        h, routing = super().forward(x, cos, sin, starts, cache, start, latent)  # (B, T, D)
        return self.shared_head.norm(h), routing
