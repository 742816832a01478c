"""Triton kernels for the per-chunk work of the fused linear + cross-entropy (reference: the torch chunk ops in
`cross_entropy.py`; the chunked algorithm itself is shared).

`_lse_update_kernel`: one program per row streams the row of the (N, C) logits chunk once, folding it into the
running max and sum of exponentials (online log-sum-exp) and picking up the label's logit.
`_logits_grad_kernel`: overwrites the recomputed logits chunk with its gradient (softmax - onehot) * scale,
so the backward needs no second (N, C) buffer.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .backend import cdiv, next_pow2


@triton.jit
def _lse_update_kernel(L, M, S, TGT, LABELS, C, v0, stride_l, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    m_run = tl.load(M + row)
    s_run = tl.load(S + row)
    tgt = tl.load(TGT + row)
    local = tl.load(LABELS + row) - v0  # label's column inside this chunk (may be outside [0, C))
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(L + row * stride_l + cols, mask=cols < C, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_run, tl.max(x, axis=0))
        s_run = s_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m_run = m_new
        hit = cols == local
        tgt = tl.where(tl.sum(hit.to(tl.int32), axis=0) > 0, tl.sum(tl.where(hit, x, 0.0), axis=0), tgt)
    tl.store(M + row, m_run)
    tl.store(S + row, s_run)
    tl.store(TGT + row, tgt)


@triton.jit
def _logits_grad_kernel(L, LSE, LABELS, SCALE, C, v0, stride_l, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    ptr = L + row * stride_l + cols
    x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row)
    local = tl.load(LABELS + row) - v0
    g = tl.exp(x - lse) * scale
    g = tl.where(cols == local, g - scale, g)
    tl.store(ptr, g.to(L.dtype.element_ty), mask=mask)


def lse_update(logits, m, s, tgt, labels, v0):
    N, C = logits.shape
    if N == 0:
        return
    BLOCK_C = min(4096, next_pow2(C))
    _lse_update_kernel[(N,)](
        logits, m, s, tgt, labels, C, v0, logits.stride(0), BLOCK_C=BLOCK_C, num_warps=8 if BLOCK_C >= 2048 else 4
    )


def logits_grad(logits, lse, labels, v0, scale):
    N, C = logits.shape
    if N == 0:
        return
    BLOCK_C = min(2048, next_pow2(C))
    _logits_grad_kernel[(N, cdiv(C, BLOCK_C))](
        logits, lse, labels, scale, C, v0, logits.stride(0), BLOCK_C=BLOCK_C, num_warps=4
    )
