"""Multi-head Latent Attention in the absorbed form (paper Sec. 2.1.1, Eq. 1-11): the dispatch between the latent-
attention reference (`dsv3.layers.reference.mla_decode_torch`, where the math is written out; it serves prefill and
decode alike) and the fused split-KV Triton kernel, plus full-head attention for the naive path.

The cache holds, per position, only the compressed latent c^KV (kv_lora_rank = 512 at V3 size) and the decoupled
rope key k^R (64), shared by all heads, so each cached position is read once for all H heads: the op is
memory-bound at small batch, which is what the "flash decoding" split of the cache across programs (then one
reduction) is for.

Cache layouts: contiguous (B, S_max, r) / (B, S_max, dr), or PAGED pools (num_blocks, page, r) /
(num_blocks, page, dr) with a block_table (B, max_blocks) int32 mapping each sequence's logical block to a
pool block (page = 64 in inference engines), so sequences of different lengths share one pool.
seq_lens (B,) counts the valid positions INCLUDING the Tq new tokens, which sit at seq_len - Tq ... seq_len - 1;
query t sees positions < seq_len - Tq + t + 1 (Tq = 2 when the MTP draft is verified in the same step).
starts (B,) (optional) is each sequence's first real position: a left-padded batch keeps the fused kernel, its
padding is simply never attended.

`attention_prefill` is plain causal attention over full heads (q, k (B, H, T, Dqk), v (B, H, T, Dv)) used by
the naive/prefill path; its reference is torch's SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layers.reference import gather_paged, mla_decode_torch
from . import backend

__all__ = [
    "attention_prefill",
    "attention_prefill_torch",
    "attention_prefill_triton",
    "gather_paged",
    "mla_decode",
    "mla_decode_torch",
    "mla_decode_triton",
]


def _check_decode(q_latent, q_rope, ckv_cache, krope_cache, seq_lens, block_table, starts):
    if q_latent.dim() != 4 or q_rope.dim() != 4 or q_latent.shape[:3] != q_rope.shape[:3]:
        raise ValueError(
            f"mla_decode: q_latent (B, Tq, H, r) and q_rope (B, Tq, H, dr) disagree: "
            f"{tuple(q_latent.shape)}, {tuple(q_rope.shape)}"
        )
    B, Tq, H, r = q_latent.shape
    dr = q_rope.shape[-1]
    if ckv_cache.dim() != 3 or ckv_cache.shape[-1] != r:
        raise ValueError(f"mla_decode: ckv_cache must be (B or blocks, S or page, r={r}), got {tuple(ckv_cache.shape)}")
    if krope_cache.shape != (*ckv_cache.shape[:2], dr):
        raise ValueError(
            f"mla_decode: krope_cache must be {(*ckv_cache.shape[:2], dr)}, got {tuple(krope_cache.shape)}"
        )
    if seq_lens.shape != (B,):
        raise ValueError(f"mla_decode: seq_lens must be ({B},), got {tuple(seq_lens.shape)}")
    if starts is not None and starts.shape != (B,):
        raise ValueError(f"mla_decode: starts must be ({B},), got {tuple(starts.shape)}")
    if block_table is None and ckv_cache.shape[0] != B:
        raise ValueError(f"mla_decode: contiguous cache has batch {ckv_cache.shape[0]}, queries have {B}")
    if block_table is not None and (block_table.dim() != 2 or block_table.shape[0] != B):
        raise ValueError(f"mla_decode: block_table must be (B={B}, max_blocks), got {tuple(block_table.shape)}")


def mla_decode_triton(
    q_latent, q_rope, ckv_cache, krope_cache, seq_lens, scale, block_table=None, starts=None, num_splits=None
):
    """Split-KV flash decoding over the latent cache (contiguous or paged), then one reduction kernel."""
    return backend.load("mla_triton").mla_decode(
        q_latent, q_rope, ckv_cache, krope_cache, seq_lens, scale, block_table, num_splits, starts=starts
    )


def mla_decode(q_latent, q_rope, ckv_cache, krope_cache, seq_lens, scale, block_table=None, starts=None):
    """Absorbed MLA attention of Tq new queries per sequence over its latent cache (a decoding step, a speculative
    verification or a whole prefill): returns o_latent (B, Tq, H, r) in q's dtype. The Triton kernel is forward-only:
    with autograd recording and inputs that require grad, the reference runs."""
    _check_decode(q_latent, q_rope, ckv_cache, krope_cache, seq_lens, block_table, starts)
    args = (q_latent, q_rope, ckv_cache, krope_cache, seq_lens, scale, block_table, starts)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_latent, q_rope, ckv_cache, krope_cache))
    # pre-Ampere GPUs (64 KB shared memory) cannot hold V3-size latent tiles: "auto" keeps them on torch
    small_smem = q_latent.is_cuda and torch.cuda.get_device_capability(q_latent.device) < (8, 0)
    if needs_grad or (small_smem and q_latent.shape[-1] > 256 and backend.get_backend() == "auto"):
        return mla_decode_torch(*args)
    if backend.use_triton(q_latent, q_rope, ckv_cache, krope_cache, seq_lens, block_table, starts):
        return mla_decode_triton(*args)
    return mla_decode_torch(*args)


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
        raise ValueError(
            f"attention_prefill: q, k (B, H, T, Dqk) and v (B, H, T, Dv) disagree: "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not needs_grad and backend.use_triton(q, k, v):
        return attention_prefill_triton(q, k, v, scale, causal)
    return attention_prefill_torch(q, k, v, scale, causal)
