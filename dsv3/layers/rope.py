"""Rotary position embedding with YaRN context extension, in the released interleaved layout (paper Sec. 2.1.1, 4.3).

Only the decoupled slice of each query head and the one shared key (``qk_rope_head_dim`` wide) is rotated; MLA's
compressed part carries no position, which is what makes weight absorption possible (Chapter 2).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import kernels
from ..config import ModelConfig, yarn_mscale


def yarn_inv_freq(dim: int, base: float, rope_scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies (dim/2,) and the cos/sin attention factor for RoPE, with YaRN if configured.

    YaRN (Peng et al. 2023) keeps the fast-rotating pairs as trained (extrapolation), divides the slow ones by
    ``factor`` (interpolation), and ramps linearly between the pair indices where a pair completes ``beta_fast``
    and ``beta_slow`` turns over the original context.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # (dim/2,)
    if rope_scaling is None or rope_scaling["type"] != "yarn":
        return inv_freq, 1.0
    factor = rope_scaling["factor"]
    original = rope_scaling["original_max_position_embeddings"]

    def pair_index(turns: float) -> float:  # the pair whose wavelength fits `turns` times into `original`
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(pair_index(rope_scaling["beta_fast"])), 0)
    high = min(math.ceil(pair_index(rope_scaling["beta_slow"])), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # (dim/2,) 0 -> 1
    keep = 1.0 - ramp  # 1 = extrapolate (unchanged), 0 = interpolate (divided by factor)
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep  # (dim/2,)
    mscale, mscale_all = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
    if mscale and mscale_all:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """Computes (cos, sin) of shape (B, T, qk_rope_head_dim/2) for given positions; ``apply`` rotates q or k."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = yarn_inv_freq(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (R/2,)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids[..., None].float() * self.inv_freq  # (B, T, R/2)
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, T, H, R) by the angles behind cos/sin (B, T, R/2)."""
        return kernels.apply_rope(x, cos, sin)
