"""Triton kernels for RMSNorm fused with the residual add (reference: `norm.rms_norm_torch`).

Forward: one program per row; the row (D <= 16K) sits in registers, so x and residual are read once and
s = x + residual and y are written once: the op moves 3 (or 5 with a residual) x D elements per row, the
minimum. Backward: each program walks a contiguous range of rows, writes dx and accumulates its share of
dweight in fp32; the partial sums (one row per program) are added by torch.

Gradient of y = w * n(s), n = s * rstd, rstd = (mean(s^2) + eps)^(-1/2), for one row:
    dn = dy * w
    ds = rstd * (dn - n * mean(dn * n))            (+ the gradient that flows into the returned s)
    dw = sum over rows of dy * n
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import cdiv, next_pow2, num_sms


@triton.jit
def _rms_norm_fwd_kernel(
    X,
    R,
    W,
    Y,
    S,
    RSTD,  # pointers: x, residual, weight, y, s (= x + residual), rstd (M,) fp32
    stride_x,
    stride_r,
    stride_y,
    stride_s,  # row strides (the last dim is contiguous)
    D,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)  # the add, rounded like torch's
        tl.store(S + row * stride_s + cols, x, mask=mask)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)
    n = (h * rstd).to(x.dtype).to(tl.float32)  # cast to the input dtype before the weight, like transformers
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * n).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    S,
    W,
    RSTD,
    DS_OUT,
    DX,
    DW_PART,  # DS_OUT: gradient of the returned s (if HAS_DS); DW_PART (P, D) fp32
    stride_dy,
    stride_s,
    stride_dso,
    stride_dx,
    M,
    D,
    rows_per_program,
    HAS_DS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        row64 = tl.cast(row, tl.int64)
        s = tl.load(S + row64 * stride_s + cols, mask=mask, other=0.0)
        h = s.to(tl.float32)
        rstd = tl.load(RSTD + row64)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        n = h * rstd
        dw += dy * n.to(s.dtype).to(tl.float32)
        dn = dy * w
        dh = rstd * (dn - n * (tl.sum(dn * n, axis=0) / D))
        if HAS_DS:
            dh += tl.load(DS_OUT + row64 * stride_dso + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row64 * stride_dx + cols, dh, mask=mask)
    tl.store(DW_PART + pid * D + cols, dw, mask=mask)


def _num_warps(block_d: int) -> int:
    return max(1, min(16, block_d // 512))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (M, D) with a contiguous last dim (a view when possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def rms_norm_fwd(x, weight, eps, residual=None):
    """Launch the forward kernel. Returns y, s (None without a residual), rstd (M,) fp32."""
    D = x.shape[-1]
    x2 = _rows(x)  # (M, D)
    M = x2.shape[0]
    s_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
    y = torch.empty((M, D), device=x.device, dtype=torch.promote_types(weight.dtype, s_dtype))  # (M, D)
    rstd = torch.empty((M,), device=x.device, dtype=torch.float32)  # (M,)
    if residual is not None:
        r2 = _rows(residual)  # (M, D)
        s = torch.empty((M, D), device=x.device, dtype=s_dtype)  # (M, D)
    else:
        r2, s = x2, x2
    BLOCK_D = next_pow2(D)
    if M > 0:
        _rms_norm_fwd_kernel[(M,)](
            x2,
            r2,
            weight,
            y,
            s,
            rstd,
            x2.stride(0),
            r2.stride(0),
            y.stride(0),
            s.stride(0),
            D,
            eps,
            HAS_RES=residual is not None,
            BLOCK_D=BLOCK_D,
            num_warps=_num_warps(BLOCK_D),
        )
    y = y.view(*x.shape[:-1], D)
    if residual is None:
        return y, None, rstd
    return y, s.view(*x.shape[:-1], D), rstd


def rms_norm_bwd(dy, s, weight, rstd, ds_out=None):
    """Launch the backward kernel. s: the normalized input (M, D). Returns ds (M, D) in s.dtype, dweight (D,) fp32."""
    M, D = s.shape
    dy2 = _rows(dy)
    dx = torch.empty((M, D), device=s.device, dtype=s.dtype)  # (M, D)
    P = max(1, min(M, 4 * num_sms(s.device)))  # programs, each with a contiguous block of rows
    rows_per_program = cdiv(M, P)
    P = cdiv(M, rows_per_program) if M > 0 else 1
    dw_part = torch.zeros((P, D), device=s.device, dtype=torch.float32)  # (P, D)
    dso = _rows(ds_out) if ds_out is not None else dy2
    BLOCK_D = next_pow2(D)
    if M > 0:
        _rms_norm_bwd_kernel[(P,)](
            dy2,
            s,
            weight,
            rstd,
            dso,
            dx,
            dw_part,
            dy2.stride(0),
            s.stride(0),
            dso.stride(0),
            dx.stride(0),
            M,
            D,
            rows_per_program,
            HAS_DS=ds_out is not None,
            BLOCK_D=BLOCK_D,
            num_warps=_num_warps(BLOCK_D),
        )
    return dx, dw_part.sum(0)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        y, s, rstd = rms_norm_fwd(x, weight, eps, residual)
        s_saved = s if s is not None else x
        ctx.save_for_backward(_rows(s_saved), weight, rstd)
        ctx.has_res = residual is not None
        ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None)
        if s is None:
            return y
        return y, s

    @staticmethod
    def backward(ctx, dy, ds_out=None):
        s, weight, rstd = ctx.saved_tensors
        shape = dy.shape  # autograd materializes unused output gradients as zeros
        ds, dw = rms_norm_bwd(dy, s, weight, rstd, ds_out if ctx.has_res else None)
        ds = ds.view(shape)
        x_dtype, r_dtype = ctx.dtypes
        dx = ds.to(x_dtype) if ctx.needs_input_grad[0] else None
        dweight = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        dres = ds.to(r_dtype) if ctx.has_res and ctx.needs_input_grad[2] else None
        return dx, dweight, dres, None


def rms_norm(x, weight, eps, residual=None):
    """Triton RMSNorm with the semantics of `norm.rms_norm_torch` (autograd through x, residual, weight)."""
    return _RMSNormFn.apply(x, weight, residual, eps)
