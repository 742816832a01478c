"""Triton kernels for FP8 block scaling (references in `fp8.py`): activation quantization per 1x128 tile,
weight dequantization per 128x128 block, and the block-scaled FP8 GEMM.

e4m3fn bits: s eeee mmm, exponent bias 7, value (-1)^s 2^(e-7) (1 + m/8) for e > 0 and (-1)^s 2^-6 (m/8)
for e = 0. `_e4m3_decode` / `_e4m3_encode` build these from and to fp32 bits with integer arithmetic
(round to nearest even, like torch's cast), which works on every GPU and in the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import cdiv, interpret_mode, next_pow2


@triton.jit
def _e4m3_decode(bits):
    """uint8 e4m3fn bit patterns -> fp32 values."""
    b = bits.to(tl.uint32)
    sign = (b >> 7) << 31
    e = (b >> 3) & 15
    m = b & 7
    normal = (sign | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)  # rebias 7 -> 127
    sub = m.to(tl.float32) * 0.001953125  # m * 2^-9
    sub = tl.where(sign != 0, -sub, sub)
    return tl.where(e == 0, sub, normal)


@triton.jit
def _e4m3_encode(v):
    """fp32 values (|v| <= 448 expected; larger values saturate) -> uint8 e4m3fn bits, round to nearest even."""
    sign = (v.to(tl.uint32, bitcast=True) >> 31) & 1
    a = tl.minimum(tl.abs(v), 448.0)
    ab = a.to(tl.uint32, bitcast=True)
    # normal range (a >= 2^-6): round the 23-bit mantissa to 3 bits; a carry correctly bumps the exponent
    rounded = ab + 0x7FFFF + ((ab >> 20) & 1)
    normal = (rounded >> 20) - (120 << 3)
    # subnormal range: adding 2^14 (whose ulp is 2^-9) rounds a to a multiple of 2^-9
    sub = (a + 16384.0).to(tl.uint32, bitcast=True) - 0x46800000
    code = tl.where(a < 0.015625, sub, normal)
    return (code | (sign << 7)).to(tl.uint8)


@triton.jit
def _act_quant_kernel(X, Q, S, K, sxm, sqm, ssm, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    offs = kb * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(X + row * sxm + offs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,) one 1 x 128 tile
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
    y = tl.math.div_rn(x, scale)  # correctly rounded, like torch's division
    tl.store(Q + row * sqm + offs, _e4m3_encode(y), mask=mask)
    tl.store(S + row * ssm + kb, scale)


@triton.jit
def _weight_dequant_kernel(
    W,
    S,
    OUT,
    M,
    N,
    sw0,
    sw1,
    ss0,
    ss1,
    so0,
    so1,
    QBLOCK: tl.constexpr,
    TILE_M: tl.constexpr,
    TILE_N: tl.constexpr,
):
    rows = tl.program_id(0) * TILE_M + tl.arange(0, TILE_M)
    cols = tl.program_id(1) * TILE_N + tl.arange(0, TILE_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    rows64 = rows.to(tl.int64)
    bits = tl.load(W + rows64[:, None] * sw0 + cols[None, :] * sw1, mask=mask, other=0)
    s = tl.load(S + (rows // QBLOCK)[:, None] * ss0 + (cols // QBLOCK)[None, :] * ss1, mask=mask, other=0.0)
    out = _e4m3_decode(bits) * s
    tl.store(OUT + rows64[:, None] * so0 + cols[None, :] * so1, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_gemm_kernel(
    A,
    AS,
    W,
    WS,
    C,
    M,
    N,
    K,
    sam,
    sak,
    sasm,
    sask,  # a (M, K) e4m3 (uint8 bits unless NATIVE), a_scale (M, Kb)
    swn,
    swk,
    swsn,
    swsk,  # w (N, K) e4m3 (uint8 bits unless NATIVE), w_scale (Nb, Kb), or (N, Kb) if W_ROW_SCALE
    scm,
    scn,
    NATIVE: tl.constexpr,  # fp8 tensor-core dot (sm >= 89, K % QBLOCK == 0); else decode to fp16 dots
    QBLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    W_ROW_SCALE: tl.constexpr = False,  # W quantized per 1 x QBLOCK tile like A (the Wgrad GEMM of training)
):
    """C = sum over K blocks kb of (A[:, kb] @ W[:, kb]^T) * a_scale[:, kb] * w_scale[n // QBLOCK, kb]
    (or * w_scale[n, kb] with W_ROW_SCALE). BLOCK_N divides QBLOCK, so each program's columns share one weight
    scale per K block."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row tiles in a row share the W tiles they stream, for L2 reuse
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_a = offs_m % M  # wrapped indices keep every load in bounds; the extra rows are never stored
    rows_w = offs_n % N
    offs_k = tl.arange(0, QBLOCK)
    a_ptr = A + rows_a[:, None].to(tl.int64) * sam + offs_k[None, :] * sak
    w_ptr = W + rows_w[:, None].to(tl.int64) * swn + offs_k[None, :] * swk
    as_ptr = AS + rows_a.to(tl.int64) * sasm
    ws_ptr = WS + (pid_n * BLOCK_N // QBLOCK) * swsn  # BLOCK_N divides QBLOCK: one weight scale per tile row
    ws_rows = WS + rows_w.to(tl.int64) * swsn  # (BLOCK_N,) with W_ROW_SCALE: one scale per row of W and K block
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, QBLOCK)):
        if NATIVE:
            a = tl.load(a_ptr)  # (BLOCK_M, QBLOCK) e4m3
            w = tl.load(w_ptr)  # (BLOCK_N, QBLOCK) e4m3
            part = tl.dot(a, tl.trans(w))  # fp8 x fp8 -> fp32 on the tensor cores
        else:
            k_mask = offs_k < K - kb * QBLOCK
            a = tl.load(a_ptr, mask=k_mask[None, :], other=0)  # uint8 bits
            w = tl.load(w_ptr, mask=k_mask[None, :], other=0)
            part = tl.dot(_e4m3_decode(a).to(tl.float16), tl.trans(_e4m3_decode(w).to(tl.float16)))
        a_s = tl.load(as_ptr + kb * sask)  # (BLOCK_M,) activation scales of this K block
        if W_ROW_SCALE:
            w_rows = tl.load(ws_rows + kb * swsk)  # (BLOCK_N,) scales of W's rows in this K block
            acc += part * a_s[:, None] * w_rows[None, :]  # promoted to fp32 every QBLOCK elements of K
        else:
            w_s = tl.load(ws_ptr + kb * swsk)  # scalar: weight scale of this (N block, K block)
            acc += part * (a_s * w_s)[:, None]
        a_ptr += QBLOCK * sak
        w_ptr += QBLOCK * swk
    c_off = offs_m[:, None].to(tl.int64) * scm + offs_n[None, :] * scn
    tl.store(C + c_off, acc.to(C.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# ----------------------------------------------------------------------------------------------- host side


def _bits(t: torch.Tensor) -> torch.Tensor:
    """View an fp8 tensor as its uint8 bit patterns (free)."""
    return t.view(torch.uint8)


def act_quant(x: torch.Tensor, block: int = 128):
    K = x.shape[-1]
    if block & (block - 1):
        raise ValueError(f"act_quant_triton: block={block} must be a power of two")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    Kb = cdiv(K, block)
    q = torch.empty((M, K), device=x.device, dtype=torch.float8_e4m3fn)  # (M, K)
    s = torch.empty((M, Kb), device=x.device, dtype=torch.float32)  # (M, Kb)
    if M * K > 0:
        _act_quant_kernel[(M, Kb)](
            x2, _bits(q), s, K, x2.stride(0), q.stride(0), s.stride(0), BLOCK=block, num_warps=1 if block <= 128 else 4
        )
    return q.view(*x.shape[:-1], K), s.view(*x.shape[:-1], Kb)


def weight_dequant(w_fp8, scale_inv, block: int = 128, dtype=torch.bfloat16):
    M, N = w_fp8.shape
    out = torch.empty((M, N), device=w_fp8.device, dtype=dtype)  # (M, N)
    tile = 64
    if M * N > 0:
        _weight_dequant_kernel[(cdiv(M, tile), cdiv(N, tile))](
            _bits(w_fp8),
            scale_inv,
            out,
            M,
            N,
            *w_fp8.stride(),
            *scale_inv.stride(),
            *out.stride(),
            QBLOCK=block,
            TILE_M=tile,
            TILE_N=tile,
            num_warps=4,
        )
    return out


def native_fp8(device: torch.device) -> bool:
    """Tensor cores with e4m3 inputs: Ada (8.9) and Hopper (9.0) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_gemm(
    a_fp8,
    a_scale,
    w_fp8,
    w_scale_inv,
    out_dtype=torch.bfloat16,
    block: int = 128,
    native=None,
    config=None,
    w_row_scale: bool = False,
):
    """config: optional (BLOCK_M, BLOCK_N, num_warps, num_stages) override (the benchmark sweeps it).
    w_row_scale: w_scale_inv is (N, ceil(K/block)), one scale per 1 x block tile of w (as for activations)."""
    K = a_fp8.shape[-1]
    N = w_fp8.shape[0]
    if block < 16 or block & (block - 1):
        raise ValueError(f"fp8_gemm_triton: block={block} must be a power of two >= 16")
    a2 = a_fp8.reshape(-1, K)
    as2 = a_scale.reshape(-1, a_scale.shape[-1])
    M = a2.shape[0]
    if as2.shape != (M, cdiv(K, block)):
        raise ValueError(f"fp8_gemm_triton: a_scale must be (..., {cdiv(K, block)}), got {tuple(a_scale.shape)}")
    c = torch.empty((M, N), device=a_fp8.device, dtype=out_dtype)  # (M, N)
    if native is None:
        native = native_fp8(a_fp8.device)
    native = native and K % block == 0  # the native path loads whole K blocks without masks
    if M * N > 0:
        # tiles checked with ptxas for sm_90 (no spills up to 64 x 64; 128 x 128 spills little)
        if interpret_mode():
            BLOCK_M, BLOCK_N, warps, stages = 16, 32, 4, 1
        elif a_fp8.is_cuda and torch.cuda.get_device_capability(a_fp8.device) < (8, 0):
            BLOCK_M, BLOCK_N, warps, stages = max(16, min(64, next_pow2(M))), 64, 4, 2
        elif M <= 64:
            BLOCK_M, BLOCK_N, warps, stages = max(16, next_pow2(M)), 64, 4, 4
        else:
            BLOCK_M, BLOCK_N, warps, stages = 128, 128, 8, 4
        if config is not None:
            BLOCK_M, BLOCK_N, warps, stages = config
        BLOCK_N = min(BLOCK_N, block)  # a tile's columns must share one weight-scale block
        grid = (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),)
        a_arg, w_arg = (a2, w_fp8) if native else (_bits(a2), _bits(w_fp8))
        _fp8_gemm_kernel[grid](
            a_arg,
            as2,
            w_arg,
            w_scale_inv,
            c,
            M,
            N,
            K,
            a2.stride(0),
            a2.stride(1),
            as2.stride(0),
            as2.stride(1),
            w_fp8.stride(0),
            w_fp8.stride(1),
            w_scale_inv.stride(0),
            w_scale_inv.stride(1),
            c.stride(0),
            c.stride(1),
            NATIVE=native,
            QBLOCK=block,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            GROUP_M=8,
            W_ROW_SCALE=w_row_scale,
            num_warps=warps,
            num_stages=stages,
        )
    return c.view(*a_fp8.shape[:-1], N)
