"""Triton fused MoE: grouped GEMMs over all experts in one launch per projection (reference: `moe.moe_experts_torch`).

Layout. The N*K (token, slot) pairs are sorted by expert and each expert's run is padded to a multiple of the
tile height BLOCK_M ("padded layout", P rows). `sorted_pair[r]` is the pair at padded row r (N*K for padding);
`block_expert[b]` the expert of row block b (E for the unused tail of the buffer, whose programs exit at once).
The buffer is sized by an upper bound, cdiv(N*K, BLOCK_M) + min(E, N*K) blocks, so no host sync is needed.

Forward (2 launches + 1 reduction):
    h[r]      = silu(x[tok(r)] @ W_gate[e]^T) * (x[tok(r)] @ W_up[e]^T)      `_gate_up_kernel`  (P, I)
    y[pair]   = g[pair] * (h[r] @ W_down[e]^T)                                `_grouped_mm_kernel` (N*K, D)
    out[n]    = sum_k y[n*K + k]                                              one torch reduction, in fp32

Backward (for dout (N, D)), with a = silu(gate) * up recomputed:
    gate, up  = x W_gate^T, x W_up^T             `_gate_up_kernel` (SAVE_GU)
    z         = dout[tok] @ W_down[e]            `_grouped_mm_kernel` (A gathered)      (P, I)
    dg_pair   = sum_i a * z;  da = g * z;  dgate = da * up * silu'(gate);  dup = da * silu(gate)   (torch)
    dx        = sum_k (dgate @ W_gate[e] + dup @ W_up[e])        `_grouped_mm_kernel` (DUAL, scattered to pairs)
    dW_down[e]  = sum over e's rows (g * dout[tok])^T a          `_wgrad_kernel`
    dW_gate[e]  = sum over e's rows dgate^T x[tok]               `_wgrad_kernel`
    dW_up[e]    = sum over e's rows dup^T x[tok]                 `_wgrad_kernel`
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import cdiv, interpret_mode, next_pow2


@triton.jit
def _gate_up_kernel(
    X,
    WG,
    WU,
    H,
    G_OUT,
    U_OUT,
    SORTED_PAIR,
    BLOCK_EXPERT,
    NK,
    D,
    I,
    n_experts,
    sxm,
    sxk,  # x (N, D)
    swe,
    swn,
    swk,  # w_gate / w_up (E, I, D), same strides
    shm,
    shn,  # h or gate/up outputs (P, I)
    TOPK: tl.constexpr,
    SAVE_GU: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(BLOCK_EXPERT + pid_m)
    if e < n_experts:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(SORTED_PAIR + rows)
        valid = pair < NK
        tok = (pair // TOPK).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < I
        wg_ptr = WG + e.to(tl.int64) * swe + offs_n[None, :] * swn
        wu_ptr = WU + e.to(tl.int64) * swe + offs_n[None, :] * swn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < D
            a = tl.load(
                X + tok[:, None] * sxm + offs_k[None, :] * sxk, mask=valid[:, None] & k_mask[None, :], other=0.0
            )  # (BLOCK_M, BLOCK_K)
            w_mask = k_mask[:, None] & n_mask[None, :]
            wg = tl.load(wg_ptr + offs_k[:, None] * swk, mask=w_mask, other=0.0)  # (BLOCK_K, BLOCK_N)
            wu = tl.load(wu_ptr + offs_k[:, None] * swk, mask=w_mask, other=0.0)
            acc_g = tl.dot(a, wg, acc_g, input_precision=DOT_PRECISION)
            acc_u = tl.dot(a, wu, acc_u, input_precision=DOT_PRECISION)
        out_off = rows[:, None].to(tl.int64) * shm + offs_n[None, :] * shn
        if SAVE_GU:  # backward: the pre-activations, fp32
            tl.store(G_OUT + out_off, acc_g, mask=n_mask[None, :])
            tl.store(U_OUT + out_off, acc_u, mask=n_mask[None, :])
        else:
            h = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up
            tl.store(H + out_off, h.to(H.dtype.element_ty), mask=n_mask[None, :])


@triton.jit
def _grouped_mm_kernel(
    A,
    A2,
    B,
    B2,
    C,
    SORTED_PAIR,
    BLOCK_EXPERT,
    TOPK_W,
    NK,
    N,
    K,
    n_experts,
    sam,
    sak,  # A (rows, K): padded rows, or token rows when A_GATHER
    sbe,
    sbk,
    sbn,  # B (E, K, N) given by strides, so W or W^T without a copy
    scm,
    scn,  # C (rows, N): padded rows, or pair rows when SCATTER
    TOPK: tl.constexpr,
    A_GATHER: tl.constexpr,
    DUAL: tl.constexpr,
    SCALE: tl.constexpr,
    SCATTER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C[rows of block] = A[rows] @ B[e] (+ A2[rows] @ B2[e] if DUAL) (* gating weight if SCALE)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(BLOCK_EXPERT + pid_m)
    if e < n_experts:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(SORTED_PAIR + rows)
        valid = pair < NK
        if A_GATHER:
            a_rows = (pair // TOPK).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        b_ptr = B + e.to(tl.int64) * sbe + offs_n[None, :] * sbn
        b2_ptr = B2 + e.to(tl.int64) * sbe + offs_n[None, :] * sbn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            a_off = a_rows[:, None] * sam + offs_k[None, :] * sak
            a_mask = valid[:, None] & k_mask[None, :]
            b_mask = k_mask[:, None] & n_mask[None, :]
            a = tl.load(A + a_off, mask=a_mask, other=0.0)  # (BLOCK_M, BLOCK_K)
            b = tl.load(b_ptr + offs_k[:, None] * sbk, mask=b_mask, other=0.0)  # (BLOCK_K, BLOCK_N)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            if DUAL:
                a2 = tl.load(A2 + a_off, mask=a_mask, other=0.0)
                b2 = tl.load(b2_ptr + offs_k[:, None] * sbk, mask=b_mask, other=0.0)
                acc = tl.dot(a2, b2, acc, input_precision=DOT_PRECISION)
        if SCALE:
            acc = acc * tl.load(TOPK_W + pair, mask=valid, other=0.0)[:, None]
        if SCATTER:
            c_off = pair[:, None].to(tl.int64) * scm + offs_n[None, :] * scn
            tl.store(C + c_off, acc.to(C.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])
        else:
            c_off = rows[:, None].to(tl.int64) * scm + offs_n[None, :] * scn
            tl.store(C + c_off, acc.to(C.dtype.element_ty), mask=n_mask[None, :])


@triton.jit
def _wgrad_kernel(
    A,
    B,
    DW,
    SORTED_PAIR,
    EXPERT_START,
    EXPERT_END,
    TOPK_W,
    NK,
    M,
    N,
    sar,
    sac,  # A (rows, M): padded rows, or token rows when A_GATHER
    sbr,
    sbc,  # B (rows, N): padded rows, or token rows when B_GATHER
    swe,
    swm,
    swn,  # DW (E, M, N)
    TOPK: tl.constexpr,
    A_GATHER: tl.constexpr,
    A_SCALE: tl.constexpr,
    B_GATHER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """DW[e] = sum over the padded rows r of expert e of A[r]^T B[r] (a weight gradient per expert)."""
    e = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(EXPERT_START + e)
    end = tl.load(EXPERT_END + e)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        pair = tl.load(SORTED_PAIR + rows)
        valid = pair < NK
        tok = (pair // TOPK).to(tl.int64)
        if A_GATHER:
            a_rows = tok
        else:
            a_rows = rows.to(tl.int64)
        if B_GATHER:
            b_rows = tok
        else:
            b_rows = rows.to(tl.int64)
        at = tl.load(
            A + a_rows[None, :] * sar + offs_m[:, None] * sac, mask=valid[None, :] & m_mask[:, None], other=0.0
        )  # (BLOCK_M, BLOCK_R) = A^T tile
        if A_SCALE:
            w = tl.load(TOPK_W + pair, mask=valid, other=0.0)
            at = (at.to(tl.float32) * w[None, :]).to(at.dtype)
        b = tl.load(
            B + b_rows[:, None] * sbr + offs_n[None, :] * sbc, mask=valid[:, None] & n_mask[None, :], other=0.0
        )  # (BLOCK_R, BLOCK_N)
        acc = tl.dot(at, b, acc, input_precision=DOT_PRECISION)
    dw_off = e.to(tl.int64) * swe + offs_m[:, None] * swm + offs_n[None, :] * swn
    tl.store(DW + dw_off, acc.to(DW.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------- host side


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: follow torch's matmul setting (full fp32 unless TF32 is allowed); fp16/bf16 ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _tile(dim: int, cap: int) -> int:
    """A tile width for a matmul dimension: a power of two >= 16 (tl.dot's minimum), at most cap."""
    return max(16, min(cap, next_pow2(dim)))


def choose_block_m(nk: int, n_experts: int) -> int:
    """Rows per tile: small when experts see few tokens (decode), larger for prefill/training batches."""
    per_expert = nk / max(1, n_experts)
    if interpret_mode() or per_expert <= 16:
        return 16
    return 32 if per_expert <= 64 else 64


def moe_align(topk_ids: torch.Tensor, n_experts: int, block_m: int):
    """Sort the pairs by expert and pad each expert's run to a multiple of block_m, without a host sync.

    Returns sorted_pair (P,) int32 (N*K marks padding), block_expert (P/block_m,) int32 (E marks unused
    blocks), expert_start/expert_end (E,) int32 (each expert's padded row range).
    """
    NK = topk_ids.numel()
    device = topk_ids.device
    flat = topk_ids.reshape(-1)  # (NK,)
    counts = torch.bincount(flat, minlength=n_experts)  # (E,)
    order = torch.argsort(flat, stable=True)  # (NK,)
    padded = (counts + block_m - 1) // block_m * block_m  # (E,)
    expert_end = padded.cumsum(0)  # (E,)
    expert_start = expert_end - padded  # (E,)
    first = counts.cumsum(0) - counts  # (E,) first sorted position of each expert
    sorted_expert = flat[order]  # (NK,)
    dest = expert_start[sorted_expert] + torch.arange(NK, device=device) - first[sorted_expert]  # (NK,)
    max_blocks = cdiv(NK, block_m) + min(n_experts, NK)
    sorted_pair = torch.full((max_blocks * block_m,), NK, device=device, dtype=torch.int32)  # (P,)
    sorted_pair[dest] = order.to(torch.int32)
    block_start = torch.arange(max_blocks, device=device) * block_m  # (P/block_m,)
    block_expert = torch.searchsorted(expert_end, block_start, right=True).to(torch.int32)  # E past the end
    return sorted_pair, block_expert, expert_start.to(torch.int32), expert_end.to(torch.int32)


def _gate_up(x, w_gate, w_up, sorted_pair, block_expert, topk, block_m, save_gu):
    NK = x.shape[0] * topk
    D = x.shape[1]
    E, I, _ = w_gate.shape
    P = sorted_pair.numel()
    BLOCK_N, BLOCK_K = _tile(I, 64), _tile(D, 64)
    if save_gu:
        g = torch.empty((P, I), device=x.device, dtype=torch.float32)  # (P, I)
        u = torch.empty((P, I), device=x.device, dtype=torch.float32)  # (P, I)
        h = g
    else:
        h = torch.empty((P, I), device=x.device, dtype=x.dtype)  # (P, I)
        g = u = h
    grid = (block_expert.numel(), cdiv(I, BLOCK_N))
    _gate_up_kernel[grid](
        x,
        w_gate,
        w_up,
        h,
        g,
        u,
        sorted_pair,
        block_expert,
        NK,
        D,
        I,
        E,
        x.stride(0),
        x.stride(1),
        w_gate.stride(0),
        w_gate.stride(1),
        w_gate.stride(2),
        h.stride(0),
        h.stride(1),
        TOPK=topk,
        SAVE_GU=save_gu,
        DOT_PRECISION=_dot_precision(x.dtype),
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        num_warps=4,
        num_stages=3,
    )
    return (g, u) if save_gu else h


def _grouped_mm(
    a,
    b,
    b_strides,
    n_out,
    k_dim,
    out,
    sorted_pair,
    block_expert,
    topk,
    nk,
    block_m,
    a2=None,
    b2=None,
    topk_w=None,
    a_gather=False,
    scatter=False,
):
    """out[rows] = a[rows] @ B[e] (+ a2[rows] @ B2[e]) (* gating weight); B[e] read through b_strides."""
    E = b.shape[0]
    BLOCK_N, BLOCK_K = _tile(n_out, 64), _tile(k_dim, 64)
    grid = (block_expert.numel(), cdiv(n_out, BLOCK_N))
    _grouped_mm_kernel[grid](
        a,
        a2 if a2 is not None else a,
        b,
        b2 if b2 is not None else b,
        out,
        sorted_pair,
        block_expert,
        topk_w if topk_w is not None else a,
        nk,
        n_out,
        k_dim,
        E,
        a.stride(0),
        a.stride(1),
        *b_strides,
        out.stride(0),
        out.stride(1),
        TOPK=topk,
        A_GATHER=a_gather,
        DUAL=a2 is not None,
        SCALE=topk_w is not None,
        SCATTER=scatter,
        DOT_PRECISION=_dot_precision(a.dtype),
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        num_warps=4,
        num_stages=3,
    )
    return out


def _wgrad(
    a, b, out, sorted_pair, expert_start, expert_end, topk, nk, block_m, topk_w=None, a_gather=False, b_gather=False
):
    """out[e] (M, N) = sum over expert e's rows of a[r]^T b[r]."""
    E, M, N = out.shape
    BLOCK_M, BLOCK_N = _tile(M, 64), _tile(N, 64)
    grid = (E, cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))
    _wgrad_kernel[grid](
        a,
        b,
        out,
        sorted_pair,
        expert_start,
        expert_end,
        topk_w if topk_w is not None else a,
        nk,
        M,
        N,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        TOPK=topk,
        A_GATHER=a_gather,
        A_SCALE=topk_w is not None,
        B_GATHER=b_gather,
        DOT_PRECISION=_dot_precision(a.dtype),
        BLOCK_R=block_m,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        num_warps=4,
        num_stages=3,
    )
    return out


def moe_forward(x, w_gate, w_up, w_down, topk_weights, topk_ids, align=None):
    """Fused forward. Returns out (N, D) in x.dtype and the alignment (for the backward pass)."""
    N, D = x.shape
    E = w_gate.shape[0]
    K = topk_ids.shape[1]
    NK = N * K
    if align is None:
        block_m = choose_block_m(NK, E)
        align = (*moe_align(topk_ids, E, block_m), block_m)
    sorted_pair, block_expert, _, _, block_m = align
    h = _gate_up(x, w_gate, w_up, sorted_pair, block_expert, K, block_m, save_gu=False)  # (P, I)
    y = torch.empty((NK, D), device=x.device, dtype=x.dtype)  # (N*K, D) weighted expert outputs
    topk_w = topk_weights.reshape(-1).float().contiguous()  # (N*K,)
    _grouped_mm(
        h,
        w_down,
        (w_down.stride(0), w_down.stride(2), w_down.stride(1)),
        D,
        w_down.shape[2],
        y,
        sorted_pair,
        block_expert,
        K,
        NK,
        block_m,
        topk_w=topk_w,
        scatter=True,
    )
    out = y.view(N, K, D).sum(1, dtype=torch.float32).to(x.dtype)  # (N, D) top_k outputs added in fp32
    return out, align


class _MoEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, topk_weights, topk_ids):
        out, align = moe_forward(x, w_gate, w_up, w_down, topk_weights, topk_ids)
        ctx.save_for_backward(x, w_gate, w_up, w_down, topk_weights, topk_ids, *align[:4])
        ctx.block_m = align[4]
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w_gate, w_up, w_down, topk_weights, topk_ids, sorted_pair, block_expert, e_start, e_end = ctx.saved_tensors
        block_m = ctx.block_m
        N, D = x.shape
        E, I, _ = w_gate.shape
        K = topk_ids.shape[1]
        NK = N * K
        P = sorted_pair.numel()
        dt = x.dtype
        dout = dout.contiguous()
        topk_w = topk_weights.reshape(-1).float().contiguous()  # (N*K,)
        valid = sorted_pair < NK  # (P,)
        pair_idx = torch.where(valid, sorted_pair, 0).long()  # (P,)
        w_rows = torch.where(valid, topk_w[pair_idx], 0.0)  # (P,) gating weight of each padded row

        gate, up = _gate_up(x, w_gate, w_up, sorted_pair, block_expert, K, block_m, save_gu=True)  # (P, I) fp32
        z = torch.empty((P, I), device=x.device, dtype=torch.float32)  # (P, I) = dout[tok] @ W_down[e]
        _grouped_mm(
            dout.to(dt),
            w_down,
            (w_down.stride(0), w_down.stride(1), w_down.stride(2)),
            I,
            D,
            z,
            sorted_pair,
            block_expert,
            K,
            NK,
            block_m,
            a_gather=True,
        )
        sg = torch.sigmoid(gate)
        silu = gate * sg  # (P, I)
        a = (silu * up).to(dt)  # (P, I) the activation the forward fed to W_down
        d_topk = torch.zeros(NK, device=x.device, dtype=torch.float32)  # (N*K,)
        d_topk.index_add_(0, pair_idx, torch.where(valid, (a.float() * z).sum(-1), 0.0))
        da = w_rows[:, None] * z  # (P, I)
        d_up = (da * silu).to(dt)  # (P, I)
        d_gate = (da * up * sg * (1 + gate * (1 - sg))).to(dt)  # (P, I) silu'(g) = s (1 + g (1 - s))
        del gate, up, sg, silu, da, z

        dx = None
        if ctx.needs_input_grad[0]:
            dx_pairs = torch.empty((NK, D), device=x.device, dtype=dt)  # (N*K, D)
            _grouped_mm(
                d_gate,
                w_gate,
                (w_gate.stride(0), w_gate.stride(1), w_gate.stride(2)),
                D,
                I,
                dx_pairs,
                sorted_pair,
                block_expert,
                K,
                NK,
                block_m,
                a2=d_up,
                b2=w_up,
                scatter=True,
            )
            dx = dx_pairs.view(N, K, D).sum(1, dtype=torch.float32).to(dt)  # (N, D)
        dwg = dwu = dwd = None
        if ctx.needs_input_grad[1]:
            dwg = _wgrad(
                d_gate, x, torch.empty_like(w_gate), sorted_pair, e_start, e_end, K, NK, block_m, b_gather=True
            )  # (E, I, D)
        if ctx.needs_input_grad[2]:
            dwu = _wgrad(
                d_up, x, torch.empty_like(w_up), sorted_pair, e_start, e_end, K, NK, block_m, b_gather=True
            )  # (E, I, D)
        if ctx.needs_input_grad[3]:
            dwd = _wgrad(
                dout.to(dt),
                a,
                torch.empty_like(w_down),
                sorted_pair,
                e_start,
                e_end,
                K,
                NK,
                block_m,
                topk_w=topk_w,
                a_gather=True,
            )  # (E, D, I)
        dtw = d_topk.view(N, K).to(topk_weights.dtype) if ctx.needs_input_grad[4] else None
        return dx, dwg, dwu, dwd, dtw, None


def moe_experts(x, w_gate, w_up, w_down, topk_weights, topk_ids):
    if not (w_gate.dtype == w_up.dtype == w_down.dtype == x.dtype):
        raise TypeError(
            f"moe_experts_triton: x and the expert weights must share a dtype, got x {x.dtype}, "
            f"w_gate {w_gate.dtype}, w_up {w_up.dtype}, w_down {w_down.dtype}"
        )
    x = x.contiguous()
    w_gate, w_up, w_down = w_gate.contiguous(), w_up.contiguous(), w_down.contiguous()  # no-ops for parameters
    if x.shape[0] == 0:
        return x.new_zeros(x.shape)
    return _MoEFn.apply(x, w_gate, w_up, w_down, topk_weights, topk_ids)
