"""RMSNorm, optionally fused with the residual add that precedes it: the dispatch between the reference
(`dsv3.layers.reference.rms_norm_torch`, where the math is written out) and the fused Triton kernel, which reads x
and residual once, writes s = x + residual (the new residual stream) and y, and keeps one fp32 `rstd` per row for
the backward pass.
"""

from __future__ import annotations

import torch

from ..layers.reference import rms_norm_torch
from . import backend

__all__ = ["rms_norm", "rms_norm_torch", "rms_norm_triton"]


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
