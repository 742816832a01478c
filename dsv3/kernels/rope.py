"""Rotary position embedding on the decoupled rope slice of q and k (interleaved pairs): the dispatch between the
reference (`dsv3.layers.reference.apply_rope_torch`, where the rotation is written out) and the Triton kernel.

`cos`/`sin` are (B, T, R/2) fp32 tables, one row per position of each sequence (so a batch may hold sequences
at different offsets, as in decoding). The kernel's backward is the rotation by -theta (the matrix is
orthogonal), so the same kernel serves both directions.
"""

from __future__ import annotations

import torch

from ..layers.reference import apply_rope_torch
from . import backend

__all__ = ["apply_rope", "apply_rope_torch", "apply_rope_triton"]


def _tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Check shapes; (T, R/2) or (1, T, R/2) tables are broadcast over the batch (a free expand)."""
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"apply_rope: x must be (B, T, H, R) with R even, got {tuple(x.shape)}")
    B, T, _, R = x.shape
    if cos.shape == sin.shape == (B, T, R // 2):  # the model's own call: nothing to broadcast
        return cos, sin
    out = []
    for name, t in (("cos", cos), ("sin", sin)):
        t = t[None] if t.dim() == 2 else t
        if t.dim() != 3 or t.shape[1:] != (T, R // 2) or t.shape[0] not in (1, B):
            raise ValueError(f"apply_rope: {name} must be (B, T, R/2) = {(B, T, R // 2)}, got {tuple(t.shape)}")
        out.append(t.expand(B, T, R // 2))
    return out


def apply_rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Triton RoPE (any strides: x may be the rope slice of a larger q). `inplace=True` (no autograd) rotates
    x itself; otherwise a new contiguous tensor is returned and autograd works through it."""
    return backend.load("rope_triton").apply_rope(x, cos, sin, inplace)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs of x (B, T, H, R); returns a new tensor in x.dtype."""
    cos, sin = _tables(x, cos, sin)
    if backend.use_triton(x, cos, sin):
        return apply_rope_triton(x, cos, sin)
    return apply_rope_torch(x, cos, sin)
