"""Rotary position embedding on the decoupled rope slice of q and k (paper Sec. 2.1.1, Eq. 3 and 8).

Layout: INTERLEAVED, as in the released weights: the pair (x[2i], x[2i+1]) rotates by theta_{t,i},

    out[2i]   = x[2i] cos - x[2i+1] sin
    out[2i+1] = x[2i] sin + x[2i+1] cos

`cos`/`sin` are (B, T, R/2) fp32 tables, one row per position of each sequence (so a batch may hold sequences
at different offsets, as in decoding); the caller folds YaRN's frequencies and attention factor into them
(`dsv3.layers.rope`). The rotation is computed in fp32 and rounded once to x.dtype. Its backward is the
rotation by -theta (the matrix is orthogonal), so the same kernel serves both directions.
"""
from __future__ import annotations

import torch

from . import backend


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


def apply_rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Reference: rotate interleaved pairs of x (B, T, H, R) by the angles in cos/sin (B, T, R/2)."""
    B, T, H, R = x.shape
    xf = x.float().view(B, T, H, R // 2, 2)  # (B, T, H, R/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]  # (B, T, H, R/2) each
    c, s = cos[:, :, None, :].float(), sin[:, :, None, :].float()  # (B, T, 1, R/2)
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)  # (B, T, H, R/2, 2)
    return out.view(B, T, H, R).to(x.dtype)


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
