"""Fused output projection + cross-entropy for training (the LM head of Sec. 2 and the MTP heads of Sec. 2.2
all end in this loss over a 129,280-token vocabulary).

`F.cross_entropy(hidden @ weight.T, labels)` materializes an (N, V) logits tensor (and its gradient): at V3's
vocabulary that is 0.5 MB per token in fp32. Here the vocabulary is processed in chunks of C columns:

forward, for each chunk c:   L = hidden @ W_c^T (N, C);  (m, s) <- online log-sum-exp update with L;
                             t <- L[n, label_n] if the label falls in the chunk
                             loss_n = m + log s - t,  mean over labels != ignore_index
backward, for each chunk c:  recompute L; G = (softmax(L) - onehot) * dloss / n_valid (in place of L)
                             d_hidden += G @ W_c;   d_W_c = G^T @ hidden

so only one (N, C) chunk lives at a time. The matmuls go to cuBLAS/torch; the per-chunk softmax work (the
online update and the gradient of the logits) is what the Triton kernels fuse (`cross_entropy_triton.py`).
`linear_cross_entropy_torch` runs the same chunked algorithm with torch ops for the chunk work.
"""

from __future__ import annotations

import torch

from . import backend


def _auto_chunk(n_rows: int, vocab: int) -> int:
    """Chunk width so one fp32 (N, C) chunk stays near 256 MiB; a multiple of 128."""
    c = (1 << 26) // max(1, n_rows)
    return int(max(128, min(vocab, c // 128 * 128 or 128)))


# chunk operations: torch versions (the Triton versions have the same signatures)


def lse_update_torch(logits, m, s, tgt, labels, v0):
    """Fold one chunk of logits (N, C) into the running max m (N,), sum s (N,) and target logit tgt (N,)."""
    C = logits.shape[1]
    lf = logits.float()  # (N, C)
    m_new = torch.maximum(m, lf.amax(dim=1))  # (N,)
    s.mul_(torch.exp(m - m_new)).add_(torch.exp(lf - m_new[:, None]).sum(dim=1))
    m.copy_(m_new)
    local = labels - v0  # (N,)
    inside = (local >= 0) & (local < C)
    picked = lf.gather(1, local.clamp(0, C - 1)[:, None]).squeeze(1)  # (N,)
    tgt.copy_(torch.where(inside, picked, tgt))


def logits_grad_torch(logits, lse, labels, v0, scale):
    """In place: logits (N, C) <- (softmax - onehot) * scale (N,) (0 for ignored rows: scale is 0 there)."""
    C = logits.shape[1]
    g = torch.exp(logits.float() - lse[:, None]) * scale[:, None]  # (N, C)
    local = labels - v0
    inside = (local >= 0) & (local < C)
    rows = torch.nonzero(inside).squeeze(1)
    g[rows, local[rows]] -= scale[rows]
    logits.copy_(g)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, ops):
        lse_update, logits_grad = ops
        N = hidden.shape[0]
        V = weight.shape[0]
        C = chunk_size or _auto_chunk(N, V)
        m = torch.full((N,), float("-inf"), device=hidden.device, dtype=torch.float32)  # (N,) running max
        s = torch.zeros((N,), device=hidden.device, dtype=torch.float32)  # (N,) running sum of exp
        tgt = torch.zeros((N,), device=hidden.device, dtype=torch.float32)  # (N,) logit of the label
        for v0 in range(0, V, C):
            logits = hidden @ weight[v0 : v0 + C].t()  # (N, C) one chunk
            lse_update(logits, m, s, tgt, labels, v0)
        lse = m + torch.log(s)  # (N,)
        valid = labels != ignore_index  # (N,)
        n_valid = valid.sum()
        loss = torch.where(valid, lse - tgt, 0.0).sum() / n_valid  # nan when nothing is valid, like torch
        ctx.save_for_backward(hidden, weight, labels, lse, valid, n_valid)
        ctx.chunk, ctx.ops = C, ops
        return loss

    @staticmethod
    def backward(ctx, dloss):
        hidden, weight, labels, lse, valid, n_valid = ctx.saved_tensors
        _, logits_grad = ctx.ops
        C = ctx.chunk
        V = weight.shape[0]
        scale = torch.where(valid, dloss / n_valid, 0.0).float()  # (N,) d loss / d loss_n
        d_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32)  # (N, D)
        d_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None  # (V, D)
        for v0 in range(0, V, C):
            w_c = weight[v0 : v0 + C]  # (C, D)
            g = hidden @ w_c.t()  # (N, C) recomputed logits, overwritten by their gradient
            logits_grad(g, lse, labels, v0, scale)
            d_hidden.add_(g @ w_c)  # (N, D) accumulated in fp32
            if d_weight is not None:
                d_weight[v0 : v0 + C] = g.t() @ hidden  # (C, D)
        d_hidden = d_hidden.to(hidden.dtype) if ctx.needs_input_grad[0] else None
        return d_hidden, d_weight, None, None, None, None


def _check(hidden, weight, labels):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden (N, D) and weight (V, D) disagree: "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"linear_cross_entropy: labels must be ({hidden.shape[0]},), got {tuple(labels.shape)}")


def linear_cross_entropy_torch(hidden, weight, labels, ignore_index: int = -100, chunk_size: int | None = None):
    """Chunked reference (torch ops for the chunk work). Mean CE over labels != ignore_index, fp32."""
    _check(hidden, weight, labels)
    return _LinearCrossEntropy.apply(
        hidden, weight, labels, ignore_index, chunk_size, (lse_update_torch, logits_grad_torch)
    )


def linear_cross_entropy_triton(hidden, weight, labels, ignore_index: int = -100, chunk_size: int | None = None):
    """Chunked algorithm with the per-chunk softmax work in Triton kernels."""
    _check(hidden, weight, labels)
    mod = backend.load("cross_entropy_triton")
    return _LinearCrossEntropy.apply(
        hidden, weight, labels, ignore_index, chunk_size, (mod.lse_update, mod.logits_grad)
    )


def linear_cross_entropy(hidden, weight, labels, ignore_index: int = -100, chunk_size: int | None = None):
    """Mean cross-entropy of `hidden @ weight.T` against labels, without materializing the (N, V) logits."""
    _check(hidden, weight, labels)
    V = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        raise ValueError(f"linear_cross_entropy: label {labels[bad][0].item()} is outside the vocabulary [0, {V})")
    if backend.use_triton(hidden, weight, labels):
        return linear_cross_entropy_triton(hidden, weight, labels, ignore_index, chunk_size)
    return linear_cross_entropy_torch(hidden, weight, labels, ignore_index, chunk_size)
