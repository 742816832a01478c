"""Facts as code: parameter counts, KV-cache bytes and FLOPs per token, computed from a ModelConfig alone
(no weights needed, so the 671B model is counted on a laptop). Chapters 1, 2 and 8 print these next to the paper.
"""

from __future__ import annotations

import numbers

import torch

from .config import ModelConfig

ATTENTION_KINDS = ("mla", "mha", "gqa", "mqa")


def _check_config(config) -> None:
    if not isinstance(config, ModelConfig):
        raise ValueError(
            f"config must be a dsv3.ModelConfig (ModelConfig.from_hf reads a config.json or dict), got "
            f"{type(config).__name__}"
        )


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy integers too


def _attention_params(c: ModelConfig) -> int:
    H = c.num_attention_heads
    if c.q_lora_rank is None:
        q = c.hidden_size * H * c.qk_head_dim
    else:
        q = c.hidden_size * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim
    kv = c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    kv += c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)
    o = H * c.v_head_dim * c.hidden_size
    bias = (c.q_lora_rank or 0) + c.kv_lora_rank + c.qk_rope_head_dim + c.hidden_size if c.attention_bias else 0
    return q + kv + o + bias


def block_params(c: ModelConfig, moe: bool, active: bool) -> dict[str, int]:
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    parts = {"attention": _attention_params(c), "norms": 2 * c.hidden_size}
    if moe:
        parts["router"] = c.n_routed_experts * c.hidden_size
        parts["shared_experts"] = c.n_shared_experts * expert
        parts["routed_experts"] = (c.num_experts_per_tok if active else c.n_routed_experts) * expert
    else:
        parts["dense_ffn"] = 3 * c.hidden_size * c.intermediate_size
    return parts


def count_parameters(config: ModelConfig) -> dict:
    """Parameter counts of DeepSeek-V3 from its config (paper: 671B total, 37B activated per token, Sec. 4.2).

    Returns ``total`` (main model, without MTP: the paper's 671B), ``activated`` (parameters whose weights take part
    in one token's computation: the K_r chosen routed experts, not the other experts, and not the embedding table,
    which is a lookup), ``activated_with_embedding``, ``mtp`` (the MTP modules' own parameters; they share the
    embedding and output head), ``total_with_mtp``, and ``breakdown``: component -> count for the main model.
    """
    _check_config(config)
    c = config
    embed = c.vocab_size * c.hidden_size
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    breakdown = {"embedding": embed, "output_head": head, "final_norm": c.hidden_size}
    activated = head + c.hidden_size
    for i in range(c.num_hidden_layers):
        moe = c.is_moe_layer(i)
        for name, n in block_params(c, moe, active=False).items():
            breakdown[name] = breakdown.get(name, 0) + n
        activated += sum(block_params(c, moe, active=True).values())
    total = sum(breakdown.values())
    mtp = 0
    for k in range(c.num_nextn_predict_layers):
        moe = c.is_moe_layer(c.num_hidden_layers + k)
        mtp += sum(block_params(c, moe, active=False).values())
        mtp += 2 * c.hidden_size + 2 * c.hidden_size * c.hidden_size + c.hidden_size  # enorm, hnorm, eh_proj, norm
    return {
        "total": total,
        "activated": activated,
        "activated_with_embedding": activated + embed,
        "mtp": mtp,
        "total_with_mtp": total + mtp,
        "breakdown": breakdown,
    }


def kv_cache_bytes(
    config: ModelConfig,
    seq_len: int,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    attention: str = "mla",
    groups: int | None = None,
) -> int:
    """Bytes of KV cache for ``batch`` sequences of ``seq_len`` tokens over the main model's layers.

    ``"mla"`` caches c_KV and the shared RoPE key: (kv_lora_rank + qk_rope_head_dim) per token and layer
    (V3: 576 x 61 layers x 2 bytes = 70,272 bytes per token in bf16). The others are what the same model would cache
    with ordinary attention of the same head count and head width (qk_head_dim for keys, v_head_dim for values):
    ``"mha"`` every head, ``"gqa"`` ``groups`` key/value heads, ``"mqa"`` one.
    """
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
    _check_config(config)
    if not _is_int(seq_len) or seq_len < 0:
        raise ValueError(f"seq_len must be an integer >= 0, got {seq_len!r}")
    if not _is_int(batch) or batch <= 0:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype such as torch.bfloat16, got {dtype!r}")
    c = config
    if attention == "mla":
        per_layer = c.kv_lora_rank + c.qk_rope_head_dim
    else:
        if attention == "gqa":
            if not _is_int(groups) or groups <= 0 or c.num_attention_heads % groups:
                raise ValueError(
                    f"gqa needs groups dividing num_attention_heads={c.num_attention_heads}, got groups={groups!r}"
                )
            kv_heads = groups
        else:
            kv_heads = c.num_attention_heads if attention == "mha" else 1
        per_layer = kv_heads * (c.qk_head_dim + c.v_head_dim)
    element = torch.empty((), dtype=dtype).element_size()
    return per_layer * c.num_hidden_layers * seq_len * batch * element


def flops_per_token(config: ModelConfig, seq_len: int = 4096, training: bool = False) -> dict:
    """Forward FLOPs for one token at context ``seq_len`` (2 per multiply-add of activated weights, plus attention
    scores and weighted sums over ``seq_len`` keys, causal average seq_len/2); x3 with ``training`` (backward)."""
    c = config
    matmul = 2 * count_parameters(c)["activated"]
    attn_dims = c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)
    attention = 2 * attn_dims * (seq_len / 2) * c.num_hidden_layers
    total = (matmul + attention) * (3 if training else 1)
    return {"matmul": matmul, "attention": attention, "total": total}
