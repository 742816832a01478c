"""The transformer block: pre-norm MLA and pre-norm FFN (dense SwiGLU in the first layers, DeepSeekMoE after)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .mla import KVCache, MultiHeadLatentAttention
from .moe import MLP, DeepSeekMoE, Routing
from .norm import RMSNorm


class Block(nn.Module):
    """h = x + MLA(norm(x)); out = h + FFN(norm(h)). Names follow the release: input_layernorm, self_attn,
    post_attention_layernorm, mlp."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = DeepSeekMoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        starts: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        latent: bool = False,
    ) -> tuple[torch.Tensor, Routing | None]:
        """x (B, T, D) -> (B, T, D) and the MoE routing (None for a dense block). ``starts`` (B,): each row's first
        real position (left padding), or None."""
        attn = self.self_attn(self.input_layernorm(x), cos, sin, starts, cache, self.layer_idx, start, latent)
        normed, h = self.post_attention_layernorm(attn, residual=x)  # norm(x + attn) and h = x + attn, one pass on GPU
        if self.is_moe:
            ffn, routing = self.mlp(normed)
        else:
            ffn, routing = self.mlp(normed), None
        return h + ffn, routing
