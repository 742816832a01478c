"""RMSNorm, optionally fused with the residual add that precedes it (paper Sec. 2; every block normalizes its
input before attention and before the MoE, and MLA normalizes its compressed latents).

    s = x + residual                             (when a residual is given)
    y = weight * (s / sqrt(mean(s^2) + eps))     statistics in fp32, cast back to s.dtype before the weight

The cast before the weight matches transformers' DeepseekV3RMSNorm bit for bit, so the output dtype is
`promote(weight.dtype, s.dtype)`. The fused kernel reads x and residual once, writes s (the new residual
stream) and y, and keeps one fp32 `rstd` per row for the backward pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Reference: `rms_norm(x)` or, with a residual, `(rms_norm(x + residual), x + residual)`."""
    if residual is not None:
        s = x + residual  # (..., D) the updated residual stream
        return rms_norm_torch(s, weight, eps), s
    # F.rms_norm(h) = h * rsqrt(mean(h^2) + eps) in one call: the same bits as spelling it out, in fewer dispatches
    if x.dtype == weight.dtype == torch.float32:  # nothing to cast: the weight goes into the same op
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    h = F.rms_norm(x.float(), x.shape[-1:], eps=eps)  # (..., D) fp32
    return weight * h.to(x.dtype)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Fused Triton RMSNorm (+ residual add), forward and backward; same semantics as `rms_norm_torch`."""
    return backend.load("norm_triton").rms_norm(x, weight, eps, residual)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm over the last dim; with `residual`, returns `(norm(x + residual), x + residual)`."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"rms_norm: x has last dim {x.shape[-1]} but weight has {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    if backend.use_triton(x, weight, residual):
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_torch(x, weight, eps, residual)
