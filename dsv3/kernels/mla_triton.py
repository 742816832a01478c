"""Triton kernels for MLA: split-KV flash decoding over the latent cache, and flash-attention prefill
(references: `dsv3.layers.reference.mla_decode_torch`, `mla.attention_prefill_torch`).

Decode, stage 1 (`_mla_decode_kernel`), grid (query-row blocks, splits, B): a program takes BLOCK_H query rows
of one sequence (rows = (token, head) pairs, all sharing the latent cache, so one cache tile feeds all of them)
and one contiguous slice of that sequence's positions. It streams the slice in BLOCK_N tiles, each from one
page when the cache is paged, computing scores against the latent (512) and rope (64) parts with two dots and
keeping an online softmax (running max m, sum l, output acc, in fp32 and base 2). Positions before the
sequence's start (left padding) are masked, except a padding query's own position. It writes acc / l and the
log-sum-exp of its slice. Stage 2 (`_mla_reduce_kernel`) merges the splits:
    o = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max).
With one split the first stage writes the output directly.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .backend import cdiv, interpret_mode, next_pow2, num_sms

LOG2E = 1.4426950408889634


@triton.jit
def _mla_decode_kernel(
    Q,
    QR,
    CKV,
    KR,
    SEQ_LENS,
    STARTS,
    BLOCK_TABLE,
    O,
    O_PART,
    LSE_PART,
    TQ,
    H,
    R,
    DR,
    qk_scale,  # qk_scale = softmax scale * log2(e)
    sqb,
    sqt,
    sqh,
    sqd,  # q_latent (B, Tq, H, r)
    srb,
    srt,
    srh,
    srd,  # q_rope (B, Tq, H, dr)
    sc0,
    sc1,
    scd,  # ckv: (B, S, r) or (blocks, page, r)
    sk0,
    sk1,
    skd,  # krope: (B, S, dr) or (blocks, page, dr)
    sbt0,
    sbt1,  # block_table (B, max_blocks)
    sob,
    sot,
    soh,
    sod,  # output (B, Tq, H, r)
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_DR: tl.constexpr,
):
    pid_h = tl.program_id(0)  # fastest-varying: the row blocks of one (sequence, split) run together and
    split = tl.program_id(1)  # share its cache tiles through L2
    b = tl.program_id(2).to(tl.int64)
    seq_len = tl.load(SEQ_LENS + b).to(tl.int32)
    first = tl.load(STARTS + b).to(tl.int32)  # the sequence's first real position (left padding before it)
    rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # query rows: row = t * H + h
    row_mask = rows < TQ * H
    t = rows // H
    h = rows % H
    d = tl.arange(0, BLOCK_R)
    dr = tl.arange(0, BLOCK_DR)
    d_mask = d < R
    dr_mask = dr < DR
    q = tl.load(
        Q + b * sqb + t[:, None] * sqt + h[:, None] * sqh + d[None, :] * sqd,
        mask=row_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # (BLOCK_H, BLOCK_R)
    qr = tl.load(
        QR + b * srb + t[:, None] * srt + h[:, None] * srh + dr[None, :] * srd,
        mask=row_mask[:, None] & dr_mask[None, :],
        other=0.0,
    )  # (BLOCK_H, BLOCK_DR)
    limit = seq_len - TQ + t + 1  # (BLOCK_H,) causal limit of each query row

    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) positions
        n_mask = offs < end
        if PAGED:  # the whole tile lies in one page (BLOCK_N divides PAGE_SIZE, n0 is a multiple of BLOCK_N)
            page = tl.load(BLOCK_TABLE + b * sbt0 + (n0 // PAGE_SIZE) * sbt1).to(tl.int64)
            c_row = page * sc0 + (offs % PAGE_SIZE) * sc1
            k_row = page * sk0 + (offs % PAGE_SIZE) * sk1
        else:
            c_row = b * sc0 + offs.to(tl.int64) * sc1
            k_row = b * sk0 + offs.to(tl.int64) * sk1
        kv = tl.load(
            CKV + c_row[:, None] + d[None, :] * scd, mask=n_mask[:, None] & d_mask[None, :], other=0.0
        )  # (BLOCK_N, BLOCK_R) latents
        kr = tl.load(
            KR + k_row[:, None] + dr[None, :] * skd, mask=n_mask[:, None] & dr_mask[None, :], other=0.0
        )  # (BLOCK_N, BLOCK_DR) rope keys
        s = tl.dot(q, tl.trans(kv), input_precision=DOT_PRECISION)
        s = tl.dot(qr, tl.trans(kr), s, input_precision=DOT_PRECISION)  # (BLOCK_H, BLOCK_N)
        s = s * qk_scale
        visible = (offs[None, :] < limit[:, None]) & ((offs[None, :] >= first) | (offs[None, :] == limit[:, None] - 1))
        s = tl.where(visible & n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(kv.dtype), kv, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if NUM_SPLITS == 1:
        o_ptr = O + b * sob + t[:, None] * sot + h[:, None] * soh + d[None, :] * sod
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    else:
        part = (b * (TQ * H) + rows) * NUM_SPLITS + split  # (BLOCK_H,) row of the (B*Tq*H, splits) layout
        tl.store(O_PART + part[:, None].to(tl.int64) * R + d[None, :], out, mask=row_mask[:, None] & d_mask[None, :])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(LSE_PART + part, lse, mask=row_mask)


@triton.jit
def _mla_reduce_kernel(
    O_PART,
    LSE_PART,
    O,
    TQ,
    H,
    R,
    sob,
    sot,
    soh,
    sod,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # over B * Tq * H
    b = row // (TQ * H)
    t = (row // H) % TQ
    h = row % H
    sp = tl.arange(0, BLOCK_S)
    lse = tl.load(LSE_PART + row * NUM_SPLITS + sp, mask=sp < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    den = tl.sum(tl.exp2(lse - m), axis=0)
    d = tl.arange(0, BLOCK_R)
    d_mask = d < R
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for s in range(NUM_SPLITS):
        w = tl.exp2(tl.load(LSE_PART + row * NUM_SPLITS + s) - m)
        acc += w * tl.load(O_PART + (row * NUM_SPLITS + s) * R + d, mask=d_mask, other=0.0)
    out = acc / tl.where(den == 0.0, 1.0, den)
    tl.store(O + b * sob + t * sot + h * soh + d * sod, out.to(O.dtype.element_ty), mask=d_mask)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def decode_config(rows: int, r: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Tile sizes for the decode kernel (rows = Tq * H query rows sharing the cache). Chosen so that at
    r = 512 nothing spills on sm_90 (checked with ptxas): 16 rows x 32 positions with 4 warps, or 32 x 32
    with 8 warps; pre-Ampere GPUs (64 KB of shared memory) get 16 x 16 without pipelining."""
    if interpret_mode():
        return dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # twice the bytes per tile: keep shared memory within an A100's 163 KB
        return dict(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=2)
    if rows <= 16:
        return dict(BLOCK_H=16, BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_H=32, BLOCK_N=32 if r > 256 else 64, num_warps=8, num_stages=2)


def choose_splits(batch: int, row_blocks: int, max_len: int, device: torch.device, block_n: int) -> int:
    """Enough KV splits to give every SM about two programs, each split at least 256 positions long."""
    programs = batch * row_blocks
    want = cdiv(2 * num_sms(device), max(1, programs))
    return max(1, min(want, cdiv(max_len, max(256, block_n)), 64))


def mla_decode(
    q_latent,
    q_rope,
    ckv_cache,
    krope_cache,
    seq_lens,
    scale,
    block_table=None,
    num_splits=None,
    config=None,
    starts=None,
):
    B, Tq, H, r = q_latent.shape
    dr = q_rope.shape[-1]
    cdt = ckv_cache.dtype
    if krope_cache.dtype != cdt:
        raise TypeError(f"mla_decode_triton: ckv_cache is {cdt} but krope_cache is {krope_cache.dtype}")
    q = q_latent.to(cdt)
    qr = q_rope.to(cdt)
    out = torch.empty((B, Tq, H, r), device=q_latent.device, dtype=q_latent.dtype)  # (B, Tq, H, r)
    if B == 0 or Tq * H == 0:
        return out
    cfg = dict(decode_config(Tq * H, r, q.device, cdt), **(config or {}))
    block_h, block_n = cfg.pop("BLOCK_H"), cfg.pop("BLOCK_N")
    paged = block_table is not None
    if paged:
        page = ckv_cache.shape[1]
        block_n = min(block_n, page)
        if page % block_n or page & (page - 1):
            raise ValueError(f"mla_decode_triton: page size {page} must be a power of two >= 16")
        max_len = block_table.shape[1] * page
        bt = block_table
    else:
        page = 1
        max_len = ckv_cache.shape[1]
        bt = seq_lens  # unused placeholder pointer
    row_blocks = cdiv(Tq * H, block_h)
    if num_splits is None:
        num_splits = choose_splits(B, row_blocks, max_len, q.device, block_n)
    seq_lens = seq_lens.to(torch.int32)
    starts = torch.zeros_like(seq_lens) if starts is None else starts.to(device=q.device, dtype=torch.int32)
    if num_splits > 1:
        o_part = torch.empty((B * Tq * H, num_splits, r), device=q.device, dtype=torch.float32)
        lse_part = torch.empty((B * Tq * H, num_splits), device=q.device, dtype=torch.float32)
    else:
        o_part = lse_part = out
    _mla_decode_kernel[(row_blocks, num_splits, B)](
        q,
        qr,
        ckv_cache,
        krope_cache,
        seq_lens,
        starts,
        bt,
        out,
        o_part,
        lse_part,
        Tq,
        H,
        r,
        dr,
        scale * LOG2E,
        *q.stride(),
        *qr.stride(),
        *ckv_cache.stride(),
        *krope_cache.stride(),
        bt.stride(0),
        bt.stride(-1) if paged else 0,
        *out.stride(),
        PAGED=paged,
        PAGE_SIZE=page,
        NUM_SPLITS=num_splits,
        DOT_PRECISION=_dot_precision(cdt),
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_R=next_pow2(r),
        BLOCK_DR=max(16, next_pow2(dr)),
        **cfg,
    )
    if num_splits > 1:
        _mla_reduce_kernel[(B * Tq * H,)](
            o_part,
            lse_part,
            out,
            Tq,
            H,
            r,
            *out.stride(),
            NUM_SPLITS=num_splits,
            BLOCK_S=next_pow2(num_splits),
            BLOCK_R=next_pow2(r),
            num_warps=4,
        )
    return out


# ------------------------------------------------------------------------------------------ prefill


@triton.jit
def _flash_attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    T,
    H,
    DQK,
    DV,
    qk_scale,
    sqb,
    sqh,
    sqt,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    sob,
    soh,
    sot,
    sod,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Flash attention forward: one program per (query block, batch * head); online softmax over key blocks."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    hh = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dq = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    m_mask = offs_m < T
    q = tl.load(
        Q + b * sqb + hh * sqh + offs_m[:, None].to(tl.int64) * sqt + dq[None, :] * sqd,
        mask=m_mask[:, None] & (dq[None, :] < DQK),
        other=0.0,
    )  # (BLOCK_M, BLOCK_DQK)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    hi = tl.minimum((pid_m + 1) * BLOCK_M, T) if CAUSAL else T
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < T
        k = tl.load(
            K + b * skb + hh * skh + offs_n[:, None].to(tl.int64) * skt + dq[None, :] * skd,
            mask=n_mask[:, None] & (dq[None, :] < DQK),
            other=0.0,
        )  # (BLOCK_N, BLOCK_DQK)
        v = tl.load(
            V + b * svb + hh * svh + offs_n[:, None].to(tl.int64) * svt + dv[None, :] * svd,
            mask=n_mask[:, None] & (dv[None, :] < DV),
            other=0.0,
        )  # (BLOCK_N, BLOCK_DV)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        visible = n_mask[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptr = O + b * sob + hh * soh + offs_m[:, None].to(tl.int64) * sot + dv[None, :] * sod
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=m_mask[:, None] & (dv[None, :] < DV))


def attention_prefill(q, k, v, scale, causal=True):
    B, H, T, Dqk = q.shape
    Dv = v.shape[-1]
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention_prefill_triton: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if scale is None:
        scale = 1.0 / math.sqrt(Dqk)
    out = torch.empty((B, H, T, Dv), device=q.device, dtype=q.dtype)  # (B, H, T, Dv)
    if B * H * T == 0:
        return out
    old_gpu = q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 0)
    block_m = 16 if interpret_mode() else (32 if old_gpu else 64)
    block_n = 16 if interpret_mode() else (32 if Dqk > 128 or old_gpu else 64)
    stages = 1 if old_gpu else 2
    _flash_attn_fwd_kernel[(cdiv(T, block_m), B * H)](
        q,
        k,
        v,
        out,
        T,
        H,
        Dqk,
        Dv,
        scale * LOG2E,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        CAUSAL=causal,
        DOT_PRECISION=_dot_precision(q.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_DQK=max(16, next_pow2(Dqk)),
        BLOCK_DV=max(16, next_pow2(Dv)),
        num_warps=4 if Dqk <= 64 else 8,
        num_stages=stages,
    )
    return out
