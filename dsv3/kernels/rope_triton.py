"""Triton kernel for interleaved RoPE (reference: `rope.apply_rope_torch`).

One program per (batch, position) and block of heads: it loads the R/2 cosines and sines of that position once
and rotates the pairs of every head in the block. Input and output take arbitrary strides, so the rope slice
q[..., nope:] is rotated without a copy, and `inplace=True` writes the result back over it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import cdiv, next_pow2


@triton.jit
def _rope_kernel(
    X,
    Y,
    COS,
    SIN,
    T,
    H,
    HALF,
    sxb,
    sxt,
    sxh,
    sxr,  # strides of x (B, T, H, R)
    syb,
    syt,
    syh,
    syr,  # strides of y
    scb,
    sct,
    sci,  # strides of cos (B, T, R/2)
    ssb,
    sst,
    ssi,  # strides of sin
    SIGN: tl.constexpr,  # +1 forward, -1 backward (rotation by -theta)
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    pid_bt = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = (pid_bt // T).to(tl.int64)
    t = (pid_bt % T).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)  # pair index
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_i = i < HALF
    mask = (h[:, None] < H) & mask_i[None, :]  # (BLOCK_H, BLOCK_HALF)
    c = tl.load(COS + b * scb + t * sct + i * sci, mask=mask_i, other=1.0).to(tl.float32)[None, :]
    s = tl.load(SIN + b * ssb + t * sst + i * ssi, mask=mask_i, other=0.0).to(tl.float32)[None, :]
    s = s * SIGN
    x_ptr = X + b * sxb + t * sxt + h[:, None].to(tl.int64) * sxh + (2 * i)[None, :] * sxr
    x0 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_H, BLOCK_HALF) even elements
    x1 = tl.load(x_ptr + sxr, mask=mask, other=0.0).to(tl.float32)  # odd elements
    y_ptr = Y + b * syb + t * syt + h[:, None].to(tl.int64) * syh + (2 * i)[None, :] * syr
    tl.store(y_ptr, (x0 * c - x1 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + syr, (x0 * s + x1 * c).to(Y.dtype.element_ty), mask=mask)


def rope_launch(x, cos, sin, out, sign: int) -> None:
    B, T, H, R = x.shape
    half = R // 2
    BLOCK_HALF = next_pow2(half)
    BLOCK_H = max(1, min(next_pow2(H), 2048 // BLOCK_HALF))
    if B * T == 0 or H == 0:
        return
    grid = (B * T, cdiv(H, BLOCK_H))
    _rope_kernel[grid](
        x,
        out,
        cos,
        sin,
        T,
        H,
        half,
        *x.stride(),
        *out.stride(),
        *cos.stride(),
        *sin.stride(),
        SIGN=sign,
        BLOCK_H=BLOCK_H,
        BLOCK_HALF=BLOCK_HALF,
        num_warps=4,
    )


class _RopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)  # (B, T, H, R) contiguous
        rope_launch(x, cos, sin, out, 1)
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        dx = torch.empty(dy.shape, device=dy.device, dtype=dy.dtype)  # (B, T, H, R)
        rope_launch(dy, cos, sin, dx, -1)
        return dx, None, None


def apply_rope(x, cos, sin, inplace=False):
    if inplace:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("apply_rope_triton(inplace=True) is for inference; x requires grad")
        rope_launch(x, cos, sin, x, 1)  # each program reads its pairs before writing them
        return x
    return _RopeFn.apply(x, cos, sin)
