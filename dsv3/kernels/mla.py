"""Multi-head Latent Attention for decoding, in the absorbed form (paper Sec. 2.1.1, Eq. 1-11).

The cache holds, per position, only the compressed latent c^KV (kv_lora_rank = 512 at V3 size) and the
decoupled rope key k^R (64), shared by all heads. Absorbing W^UK into the query and W^UV into the output
projection turns attention into a multi-query attention over the latent itself:

    q_latent[h] = q_nope[h] @ W^UK[h]                                   (B, Tq, H, r)     done by the caller
    score[h, s] = scale * (q_latent[h] . c^KV[s] + q_rope[h] . k^R[s])
    o_latent[h] = softmax_s(score[h]) @ c^KV                             (B, Tq, H, r)     this op
    output      = o_latent[h] @ W^UV[h] ...                             done by the caller

so each cached position is read once for all H heads: the op is memory-bound at small batch, which is
what the "flash decoding" split of the cache across programs (then one reduction) is for.

Cache layouts: contiguous (B, S_max, r) / (B, S_max, dr), or PAGED pools (num_blocks, page, r) /
(num_blocks, page, dr) with a block_table (B, max_blocks) int32 mapping each sequence's logical block to a
pool block (page = 64 in inference engines), so sequences of different lengths share one pool.
seq_lens (B,) counts the valid positions INCLUDING the Tq new tokens, which sit at seq_len - Tq ... seq_len - 1;
query t sees positions < seq_len - Tq + t + 1 (Tq = 2 when the MTP draft is verified in the same step).

`attention_prefill` is plain causal attention over full heads (q, k (B, H, T, Dqk), v (B, H, T, Dv)) used by
the naive/prefill path; its reference is torch's SDPA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend


def _check_decode(q_latent, q_rope, ckv_cache, krope_cache, seq_lens, block_table):
    if q_latent.dim() != 4 or q_rope.dim() != 4 or q_latent.shape[:3] != q_rope.shape[:3]:
        raise ValueError(f"mla_decode: q_latent (B, Tq, H, r) and q_rope (B, Tq, H, dr) disagree: "
                         f"{tuple(q_latent.shape)}, {tuple(q_rope.shape)}")
    B, Tq, H, r = q_latent.shape
    dr = q_rope.shape[-1]
    if ckv_cache.dim() != 3 or ckv_cache.shape[-1] != r:
        raise ValueError(f"mla_decode: ckv_cache must be (B or blocks, S or page, r={r}), got {tuple(ckv_cache.shape)}")
    if krope_cache.shape != (*ckv_cache.shape[:2], dr):
        raise ValueError(f"mla_decode: krope_cache must be {(*ckv_cache.shape[:2], dr)}, "
                         f"got {tuple(krope_cache.shape)}")
    if seq_lens.shape != (B,):
        raise ValueError(f"mla_decode: seq_lens must be ({B},), got {tuple(seq_lens.shape)}")
    if block_table is None and ckv_cache.shape[0] != B:
        raise ValueError(f"mla_decode: contiguous cache has batch {ckv_cache.shape[0]}, queries have {B}")
    if block_table is not None and (block_table.dim() != 2 or block_table.shape[0] != B):
        raise ValueError(f"mla_decode: block_table must be (B={B}, max_blocks), got {tuple(block_table.shape)}")


def gather_paged(pool: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """(num_blocks, page, d) pool + (B, max_blocks) table -> contiguous (B, max_blocks * page, d)."""
    B, nb = block_table.shape
    page, d = pool.shape[1], pool.shape[2]
    idx = block_table.long().clamp(0, pool.shape[0] - 1)  # unused entries may hold anything
    return pool[idx].reshape(B, nb * page, d)


def mla_decode_torch(q_latent, q_rope, ckv_cache, krope_cache, seq_lens, scale, block_table=None):
    """Reference absorbed MLA decode: scores in fp32 over the filled prefix of the cache, masked softmax, weighted
    sum of the latents. The Tq * H queries of a sequence share its cache, so each product is one batched matmul."""
    B, Tq, H, r = q_latent.shape
    if block_table is not None:
        ckv_cache = gather_paged(ckv_cache, block_table)  # (B, S, r)
        krope_cache = gather_paged(krope_cache, block_table)  # (B, S, dr)
    L = min(int(seq_lens.max()), ckv_cache.shape[1]) if B else 0  # positions any query can see
    ckv = ckv_cache[:, :L].float()  # (B, L, r)
    q = q_latent.reshape(B, Tq * H, r).float()  # (B, Tq*H, r): query t's heads are rows t*H .. t*H + H - 1
    q_r = q_rope.reshape(B, Tq * H, -1).float()  # (B, Tq*H, dr)
    scores = torch.bmm(q, ckv.transpose(1, 2))  # (B, Tq*H, L)
    scores = scores.baddbmm_(q_r, krope_cache[:, :L].float().transpose(1, 2)).mul_(scale)  # + rope part
    masked = Tq > 1 or B > 1  # one sequence and one query sees all L positions
    if masked:
        pos = torch.arange(L, device=q_latent.device)  # (L,)
        limit = seq_lens.long()[:, None] - Tq + torch.arange(Tq, device=q_latent.device)[None, :] + 1  # (B, Tq)
        visible = pos[None, None, :] < limit[:, :, None]  # (B, Tq, L)
        scores = scores.view(B, Tq, H, L).masked_fill_(~visible[:, :, None, :], float("-inf")).view(B, Tq * H, L)
    p = torch.softmax(scores, dim=-1)  # (B, Tq*H, L)
    if masked:
        p = p.nan_to_num_(0.0)  # rows with nothing visible -> 0
    return torch.bmm(p, ckv).view(B, Tq, H, r).to(q_latent.dtype)  # (B, Tq, H, r)


def mla_decode_triton(q_latent, q_rope, ckv_cache, krope_cache, seq_lens, scale, block_table=None, num_splits=None):
    """Split-KV flash decoding over the latent cache (contiguous or paged), then one reduction kernel."""
    return backend.load("mla_triton").mla_decode(q_latent, q_rope, ckv_cache, krope_cache, seq_lens, scale,
                                                 block_table, num_splits)


def mla_decode(q_latent, q_rope, ckv_cache, krope_cache, seq_lens, scale, block_table=None):
    """Absorbed MLA attention for decoding (forward only): returns o_latent (B, Tq, H, r) in q's dtype."""
    _check_decode(q_latent, q_rope, ckv_cache, krope_cache, seq_lens, block_table)
    # pre-Ampere GPUs (64 KB shared memory) cannot hold V3-size latent tiles: "auto" keeps them on torch
    small_smem = q_latent.is_cuda and torch.cuda.get_device_capability(q_latent.device) < (8, 0)
    if small_smem and q_latent.shape[-1] > 256 and backend.get_backend() == "auto":
        return mla_decode_torch(q_latent, q_rope, ckv_cache, krope_cache, seq_lens, scale, block_table)
    if backend.use_triton(q_latent, q_rope, ckv_cache, krope_cache, seq_lens, block_table):
        return mla_decode_triton(q_latent, q_rope, ckv_cache, krope_cache, seq_lens, scale, block_table)
    return mla_decode_torch(q_latent, q_rope, ckv_cache, krope_cache, seq_lens, scale, block_table)


def attention_prefill_torch(q, k, v, scale, causal=True, mask=None):
    """Reference: torch SDPA. q, k (B, H, T|S, Dqk), v (B, H, S, Dv) -> (B, H, T, Dv); ``mask`` bool, True = attend.

    MLA's value heads are narrower than its query/key heads (128 vs 192 at V3 size); torch's fused CPU/GPU SDPA
    kernels want equal widths and otherwise fall back to the slow math path, so V is zero-padded to Dqk and the
    padding sliced off the output (zero columns of V contribute nothing).
    """
    dv = v.shape[-1]
    if dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))  # (B, H, S, Dqk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale)
    return out[..., :dv]


def attention_prefill_triton(q, k, v, scale, causal=True):
    """Triton flash attention forward (inference; Dqk = 192 and Dv = 128 at V3 size)."""
    return backend.load("mla_triton").attention_prefill(q, k, v, scale, causal)


def attention_prefill(q, k, v, scale, causal=True):
    """Full-head attention for prefill. The Triton kernel is forward-only: with autograd recording and inputs
    that require grad, SDPA runs (training)."""
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"attention_prefill: q, k (B, H, T, Dqk) and v (B, H, T, Dv) disagree: "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not needs_grad and backend.use_triton(q, k, v):
        return attention_prefill_triton(q, k, v, scale, causal)
    return attention_prefill_torch(q, k, v, scale, causal)
