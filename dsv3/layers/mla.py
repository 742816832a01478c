"""Multi-head Latent Attention (paper Sec. 2.1.1, Eq. 1-11; taught in Chapter 2).

Keys and values are jointly compressed into one latent c_KV (``kv_lora_rank`` wide) per token, plus one shared
RoPE key k^R. Two equivalent ways to attend, picked once, by the cache's ``kind`` (without a cache, by ``latent``):

* **naive**: decompress c_KV into per-head keys and values with ``kv_b_proj`` (W^UK, W^UV) and run ordinary
  attention; the cache holds the decompressed K and V (n_h x (d_h + d_h^R + d_h) values per token and layer).
* **latent** (absorbed): fold W^UK into the query (q^C W^UK attends directly to c_KV) and W^UV after the attention
  (the output is read in latent space, then decompressed); the cache holds only c_KV and k^R
  (kv_lora_rank + qk_rope_head_dim values per token and layer: 576 at V3 size). One op serves prefill and decode:
  ``dsv3.kernels.mla_decode`` (the fused split-KV kernel on a GPU, ``dsv3.layers.reference.mla_decode_torch``
  elsewhere).

A left-padded batch carries its padding as per-row start offsets (``starts`` (B,): each row's first real
position), so ragged batches keep the fused kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..config import ModelConfig
from .norm import RMSNorm
from .rope import RotaryEmbedding

CACHE_KINDS = ("latent", "naive")


class KVCache:
    """Preallocated per-layer KV cache for all main and MTP blocks, shared by a batch (Chapter 2 and 6).

    ``kind="latent"`` stores c_KV (B, S, kv_lora_rank) and k^R (B, S, qk_rope_head_dim) per layer, used by the
    absorbed path; ``kind="naive"`` stores decompressed keys (B, S, H, qk_head_dim) and values (B, S, H, v_head_dim).
    ``length`` positions are filled; ``starts`` (B,) is each row's first real position (the slots before it hold left
    padding, never attended). ``truncate(n)`` rolls the cache back (speculative decoding rejects drafted tokens this
    way); nothing is reallocated.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        kind: str = "latent",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        num_layers: int | None = None,
    ):
        if kind not in CACHE_KINDS:
            raise ValueError(f"KVCache kind must be one of {CACHE_KINDS}, got {kind!r}")
        if max_len <= 0 or batch_size <= 0:
            raise ValueError(f"KVCache needs positive batch_size and max_len, got {batch_size} and {max_len}")
        self.config, self.kind, self.max_len, self.batch_size = config, kind, max_len, batch_size
        n = config.num_hidden_layers + config.num_nextn_predict_layers if num_layers is None else num_layers
        B, S, H = batch_size, max_len, config.num_attention_heads
        if kind == "latent":
            shapes = ((B, S, config.kv_lora_rank), (B, S, config.qk_rope_head_dim))
        else:
            shapes = ((B, S, H, config.qk_head_dim), (B, S, H, config.v_head_dim))
        self.a = [torch.zeros(shapes[0], dtype=dtype, device=device) for _ in range(n)]  # c_KV or K per layer
        self.b = [torch.zeros(shapes[1], dtype=dtype, device=device) for _ in range(n)]  # k^R or V per layer
        self.starts = torch.zeros(B, dtype=torch.long, device=device)  # (B,) first real slot of each row
        self.ragged = False  # whether any row starts after slot 0 (else attention needs no padding mask)
        self.length = 0
        self.layer_lengths = [0] * n

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache tensors of the main model's layers (what ``kv_cache_bytes`` predicts)."""
        L = self.config.num_hidden_layers
        return sum(t.numel() * t.element_size() for t in self.a[:L] + self.b[:L])

    def bytes_per_token(self) -> int:
        return self.nbytes // (self.batch_size * self.max_len)

    def write(self, layer: int, start: int, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new entries at positions [start, start + T) and return views of [0, start + T)."""
        T = a.shape[1]
        end = start + T
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: writing positions up to {end} into a cache of max_len {self.max_len}")
        self.a[layer][:, start:end] = a
        self.b[layer][:, start:end] = b
        self.layer_lengths[layer] = end
        return self.a[layer][:, :end], self.b[layer][:, :end]

    def truncate(self, length: int) -> None:
        """Forget every position at or after ``length`` (in all layers)."""
        self.length = min(self.length, length)
        self.layer_lengths = [min(n, length) for n in self.layer_lengths]


class MultiHeadLatentAttention(nn.Module):
    """MLA with the released parameter names (q_a_proj, q_a_layernorm, q_b_proj | q_proj, kv_a_proj_with_mqa,
    kv_a_layernorm, kv_b_proj, o_proj)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.qk_dim, self.v_dim = config.qk_head_dim, config.v_head_dim
        self.scale = config.softmax_scale
        D, H = config.hidden_size, self.n_heads
        bias = config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_dim, bias=False)  # W^Q (no query compression)
        else:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=bias)  # W^DQ, Eq. 6
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_dim, bias=False)  # [W^UQ; W^QR], Eq. 7-8
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.rope_dim, bias=bias)  # [W^DKV; W^KR], Eq. 1, 3
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)  # [W^UK; W^UV]
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=bias)  # W^O, Eq. 11

    # -- the up-projections as per-head matrices, views of kv_b_proj.weight (no copy) --
    def w_uk(self) -> torch.Tensor:
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim]  # (H, d_nope, r): k^C_h = W^UK_h c_KV

    def w_uv(self) -> torch.Tensor:
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, self.nope_dim :]  # (H, d_v, r): v^C_h = W^UV_h c_KV

    # -- the two absorbed products, one bmm over heads each (a step has a handful of queries, where einsum's own
    # bookkeeping costs more than the product) --
    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q^C (B, T, H, d_nope) -> q^C W^UK (B, T, H, r): the query that attends to c_KV directly."""
        B, T, H, d = q_nope.shape
        q = torch.bmm(q_nope.reshape(B * T, H, d).transpose(0, 1), self.w_uk())  # (H, B*T, r)
        return q.transpose(0, 1).reshape(B, T, H, self.kv_lora_rank)

    def expand_output(self, o_lat: torch.Tensor) -> torch.Tensor:
        """Attention output in latent space (B, T, H, r) -> W^UV applied per head, (B, T, H * d_v)."""
        B, T, H, r = o_lat.shape
        o = torch.bmm(o_lat.reshape(B * T, H, r).transpose(0, 1), self.w_uv().transpose(1, 2))  # (H, B*T, d_v)
        return o.transpose(0, 1).reshape(B, T, H * self.v_dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        starts: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
        latent: bool = False,
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). The new tokens sit at positions [start, start + T) and attend causally to
        [0, start + T) (with a cache, their entries are written there first). ``starts`` (B,) or None (all 0): each
        row's first real position; left padding before it is never attended. The algorithm is the cache's kind, or
        without a cache ``latent`` (absorbed attention) vs the naive default.
        """
        B, T, _ = x.shape
        H = self.n_heads
        if self.q_lora_rank is None:
            q = self.q_proj(x)  # (B, T, H * qk_dim)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # (B, T, H * qk_dim)
        q = q.view(B, T, H, self.qk_dim)  # (B, T, H, qk_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)  # (B, T, H, nope), (B, T, H, rope)

        kv = self.kv_a_proj_with_mqa(x)  # (B, T, r + rope)
        c_kv, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)  # (B, T, r), (B, T, rope)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, T, r): the latent that is cached
        # the query heads and the one key shared by all heads turn by the same angles: rotate them together
        rotated = RotaryEmbedding.apply(torch.cat([q_rope, k_rope.unsqueeze(2)], dim=2), cos, sin)  # (B, T, H+1, rope)
        q_rope, k_rope = rotated[:, :, :H], rotated[:, :, H]  # (B, T, H, rope), (B, T, rope)

        if (cache.kind == "latent") if cache is not None else latent:
            if cache is not None:
                c_kv, k_rope = cache.write(layer, start, c_kv, k_rope)  # (B, S, r), (B, S, rope)
            return self.o_proj(self._attend_absorbed(q_nope, q_rope, c_kv, k_rope, starts))  # (B, T, D)
        k_nope, v = self._decompress(c_kv)  # (B, T, H, nope), (B, T, H, v)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(B, T, H, self.rope_dim)], dim=-1)  # (B, T, H, qk)
        if cache is not None:
            k, v = cache.write(layer, start, k, v)  # (B, S, H, qk), (B, S, H, v)
        mask = attention_mask(B, T, start, starts, x.device)  # (B, 1, T, S) or None: plain causal
        out = self._attend_naive(torch.cat([q_nope, q_rope], dim=-1), k, v, mask)  # (B, T, H, v)
        return self.o_proj(out.reshape(B, T, H * self.v_dim))  # (B, T, D)

    def _decompress(self, c_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, T, self.n_heads, self.nope_dim + self.v_dim)  # (B, T, H, nope + v)
        return kv.split([self.nope_dim, self.v_dim], dim=-1)

    def _attend_naive(self, q, k, v, mask):
        """Standard attention over decompressed heads: q (B, T, H, qk), k (B, S, H, qk), v (B, S, H, v)."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T|S, dim)
        if mask is None and q.shape[2] == k.shape[2]:  # plain causal over these tokens: flash attention on GPU
            out = kernels.attention_prefill(q, k, v, self.scale, causal=q.shape[2] > 1)  # (B, H, T, v)
        else:  # a mask, or one query over a cache (mask None: it sees every key)
            out = kernels.attention_prefill_torch(q, k, v, self.scale, causal=False, mask=mask)  # (B, H, T, v)
        return out.transpose(1, 2)  # (B, T, H, v)

    def _attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, starts) -> torch.Tensor:
        """Attention in latent space (Sec. 2.1.1, "absorbed"), for prefill and decode alike: the T queries are the
        last T of the S positions of c_kv (B, S, r) and k_rope (B, S, rope). W^UK is folded into the query, the
        scores and the weighted sum read c_KV directly (``dsv3.kernels.mla_decode``: the fused kernel on a GPU,
        ``dsv3.layers.reference.mla_decode_torch`` elsewhere), and W^UV decompresses the result. -> (B, T, H * v)."""
        B, S = c_kv.shape[:2]
        seq_lens = torch.full((B,), S, dtype=torch.int32, device=c_kv.device)  # (B,)
        o_lat = kernels.mla_decode(
            self.absorb_query(q_nope), q_rope, c_kv, k_rope, seq_lens, self.scale, starts=starts
        )  # (B, T, H, r)
        return self.expand_output(o_lat)  # (B, T, H * v)


def attention_mask(B: int, T: int, start: int, starts: torch.Tensor | None, device) -> torch.Tensor | None:
    """(B, 1, T, S) bool mask (True = attend) of T queries at positions [start, start + T) over keys [0, S = start + T),
    for the naive path; None when plain causal attention needs no offset and nothing is padded (no cached positions,
    or a single query, which sees every key). ``starts`` (B,): each row's first real position; a padding query still
    sees itself, so no softmax row is empty (its output is never used)."""
    if starts is None and (start == 0 or T == 1):
        return None
    S = start + T
    q_pos = torch.arange(start, S, device=device)  # (T,)
    k_pos = torch.arange(S, device=device)  # (S,)
    mask = (k_pos[None, :] <= q_pos[:, None]).expand(B, 1, T, S)  # (B, 1, T, S) causal
    if starts is not None:
        mask = mask & ((k_pos[None, :] >= starts[:, None])[:, None, None, :] | (k_pos[None, :] == q_pos[:, None]))
    return mask
