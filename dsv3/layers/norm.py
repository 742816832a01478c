"""RMSNorm, the only normalization in DeepSeek-V3 (before attention, before the FFN, on the latents, in MTP)."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 and cast back (as the released model does).

    ``forward(x, residual)`` fuses the residual add: it returns ``(norm(x + residual), x + residual)``, the pattern
    of every pre-norm block, which the Triton kernel does in one pass over memory (Chapter 7).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # (dim,)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return kernels.rms_norm(x, self.weight, self.eps, residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
