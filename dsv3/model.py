"""DeepSeekV3: embedding -> blocks (MLA + dense FFN / DeepSeekMoE) -> norm -> output head, plus the MTP modules.

``model(input_ids, labels=...)`` returns logits, the main next-token loss, each MTP depth's loss and the combined
training objective L = L_main + lambda/D * sum_k L_MTP^k (paper Eq. 24-25). Parameter names follow the released
checkpoint except for the stacked experts and the MTP modules (``dsv3.checkpoint`` maps them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers.block import Block
from .layers.mla import KVCache
from .layers.moe import DeepSeekMoE, Experts, Routing, Router
from .layers.mtp import MTPModule
from .layers.norm import RMSNorm
from .layers.rope import RotaryEmbedding

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    """What a forward pass returns. Losses are None without labels; MTP fields are empty unless MTP ran."""

    logits: torch.Tensor  # (B, T, V)
    hidden: torch.Tensor  # (B, T, D), final normalized hidden state (h^0 for the first MTP module)
    loss: torch.Tensor | None = None  # L_main + mtp_weight * mean_k L_MTP^k
    main_loss: torch.Tensor | None = None  # next-token cross-entropy
    mtp_loss: torch.Tensor | None = None  # mean over depths of L_MTP^k
    mtp_losses: list[torch.Tensor] = field(default_factory=list)  # L_MTP^k for k = 1..D
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: (B, T - k, V), predicts t_{i+k+1}
    routing: list[Routing] = field(default_factory=list)  # one per MoE block of the main model
    mtp_routing: list[Routing] = field(default_factory=list)  # one per MTP module

    @property
    def expert_counts(self) -> torch.Tensor:
        """(n_moe_layers, N_r) tokens per routed expert in each main-model MoE layer."""
        return torch.stack([r.counts for r in self.routing]) if self.routing else torch.empty(0)


class DeepSeekV3(nn.Module):
    """The whole model (paper Sec. 2). ``config.num_nextn_predict_layers`` MTP modules share embedding and head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(config, k) for k in range(1, config.num_nextn_predict_layers + 1))
        self.rotary = RotaryEmbedding(config)
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """N(0, initializer_range) for every matrix and embedding, ones for norms, zero correction biases."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, Experts):
                for p in (module.gate_proj, module.up_proj, module.down_proj):
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif isinstance(module, Router):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                module.e_score_correction_bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    # ------------------------------------------------------------------ helpers a reader asks for
    def num_parameters(self, include_mtp: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if include_mtp else n - sum(p.numel() for p in self.mtp.parameters())

    def moe_layers(self, include_mtp: bool = True) -> list[DeepSeekMoE]:
        """Every DeepSeekMoE of the model, main blocks first (the balancing code walks these)."""
        blocks = list(self.layers) + (list(self.mtp) if include_mtp else [])
        return [b.mlp for b in blocks if b.is_moe]

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self, batch_size: int, max_len: int, kind: str = "latent") -> KVCache:
        """A preallocated cache for this model (``kind`` "latent" = absorbed MLA, "naive" = decompressed K/V)."""
        return KVCache(self.config, batch_size, max_len, kind, dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, mtp_weight: float = 0.3, return_mtp: bool | None = None,
                absorbed: bool = False) -> ModelOutput:
        """Run the model.

        input_ids (B, T). ``labels`` (B, T) are the next tokens, already aligned (labels[:, t] follows
        input_ids[:, t]; -100 = ignore). ``attention_mask`` (B, S) marks real tokens (1) vs padding (0) over the
        cached and new positions. With a ``cache`` the new tokens go after its ``length`` filled positions.
        ``return_mtp`` (default: when labels are given) also runs the MTP modules; ``mtp_weight`` is lambda.
        ``absorbed`` picks the MLA path when no cache is given (a cache's kind decides otherwise).
        """
        self._check_inputs(input_ids, labels, cache)
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if labels is not None and labels.dtype != torch.int64:
            labels = labels.long()  # int32 labels, as input_ids may be (cross_entropy wants int64)
        if isinstance(mtp_weight, (int, float)) and not math.isfinite(mtp_weight):
            raise ValueError(f"mtp_weight must be a finite number, got {mtp_weight!r}")
        if position_ids is not None:
            self._check_positions(position_ids, B, T)
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)  # (B, T)
        mask = self._attention_mask(B, T, start, attention_mask, cache, input_ids.device)  # (B, 1, T, S) | None
        cos, sin = self.rotary(position_ids)  # (B, T, R/2) each

        x = self.embed_tokens(input_ids)  # (B, T, D)
        routing = []
        for block in self.layers:
            x, r = block(x, cos, sin, mask, cache, start, absorbed)  # (B, T, D)
            if r is not None:
                routing.append(r)
        hidden = self.norm(x)  # (B, T, D)
        logits = self.lm_head(hidden)  # (B, T, V)
        if cache is not None:
            cache.length = start + T
        out = ModelOutput(logits=logits, hidden=hidden, routing=routing)

        if return_mtp is None:
            return_mtp = labels is not None
        if return_mtp and len(self.mtp) > 0 and cache is None:
            self._run_mtp(out, input_ids, position_ids, mask, absorbed)
        if labels is not None:
            out.main_loss = _cross_entropy(logits, labels)
            out.loss = out.main_loss
            if out.mtp_logits:
                out.mtp_losses = [_cross_entropy(lg, labels[:, k:]) for k, lg in enumerate(out.mtp_logits, 1)]
                out.mtp_loss = torch.stack(out.mtp_losses).mean()
                out.loss = out.main_loss + mtp_weight * out.mtp_loss
        return out

    def _run_mtp(self, out: ModelOutput, input_ids, position_ids, mask, absorbed) -> None:
        """Depth k at position i sees h^{k-1}_i and Emb(t_{i+k}) and predicts t_{i+k+1} (sequences shrink by k)."""
        T = input_ids.shape[1]
        h = out.hidden  # (B, T, D) = h^0
        for k, module in enumerate(self.mtp, 1):
            if T - k <= 0:
                break
            h = h[:, : T - k]  # (B, T-k, D): positions that still have a token t_{i+k}
            emb = self.embed_tokens(input_ids[:, k:])  # (B, T-k, D)
            cos, sin = self.rotary(position_ids[:, : T - k])  # MTP positions are those of h, i
            sub_mask = None if mask is None else mask[:, :, : T - k, : T - k]
            h, r = module(h, emb, cos, sin, sub_mask, None, 0, absorbed)  # (B, T-k, D)
            out.mtp_logits.append(self.lm_head(h))  # (B, T-k, V)
            if r is not None:
                out.mtp_routing.append(r)

    def mtp_step(self, depth: int, prev_hidden: torch.Tensor, tokens: torch.Tensor, position_ids: torch.Tensor,
                 cache: KVCache | None = None, start: int = 0,
                 attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP module on its own (for drafting): h^{depth-1} (B, T, D) and tokens t_{i+depth} (B, T) at positions
        (B, T) -> (normalized h^depth (B, T, D), logits (B, T, V)). With a cache, its layer gets positions
        [start, start + T)."""
        module = self.mtp[depth - 1]
        B, T = tokens.shape
        mask = self._attention_mask(B, T, start, attention_mask, cache, tokens.device, update_cache_mask=False)
        cos, sin = self.rotary(position_ids)  # (B, T, R/2)
        h, _ = module(prev_hidden, self.embed_tokens(tokens), cos, sin, mask, cache, start)  # (B, T, D)
        return h, self.lm_head(h)  # (B, T, D), (B, T, V)

    def _attention_mask(self, B, T, start, attention_mask, cache, device, update_cache_mask=True):
        """(B, 1, T, S) bool mask (True = attend) for queries at cache positions [start, start+T), or None when
        nothing is padded and causal attention needs no offset: no cached positions, or a single query (which sees
        every key, as in a decoding step)."""
        S = start + T
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor):
                raise ValueError(f"attention_mask must be a tensor of 1 (token) and 0 (padding), got "
                                 f"{type(attention_mask).__name__}")
            if attention_mask.shape != (B, S):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)} "
                                 f"(cached + new positions)")
            if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)][0].item()
                raise ValueError(f"attention_mask must hold only 1 (token) and 0 (padding), got {bad!r}")
            key_ok = attention_mask.to(device=device, dtype=torch.bool)  # (B, S)
            if cache is not None and update_cache_mask:
                cache.key_mask[:, :S] = key_ok
                cache.padded = cache.padded or not bool(key_ok.all())
        elif cache is not None:
            key_ok = cache.key_mask[:, :S]  # (B, S)
        else:
            key_ok = None
        if key_ok is not None and bool(key_ok.all()):
            key_ok = None
        if key_ok is None and (start == 0 or T == 1):
            return None
        q_pos = torch.arange(start, S, device=device)  # (T,)
        k_pos = torch.arange(S, device=device)  # (S,)
        mask = (k_pos[None, :] <= q_pos[:, None]).expand(B, 1, T, S)  # (B, 1, T, S) causal
        if key_ok is not None:
            # a padding query still sees itself, so no softmax row is empty (its output is never used)
            mask = mask & (key_ok[:, None, None, :] | (k_pos[None, :] == q_pos[:, None]))
        return mask

    def _check_positions(self, position_ids, B: int, T: int) -> None:
        if (not isinstance(position_ids, torch.Tensor) or position_ids.shape != (B, T)
                or position_ids.is_floating_point()):
            raise ValueError(f"position_ids must be an integer tensor of shape {(B, T)} like input_ids, got "
                             f"{getattr(position_ids, 'dtype', type(position_ids).__name__)} "
                             f"{tuple(getattr(position_ids, 'shape', ()))}")
        lo, hi = (int(v) for v in torch.aminmax(position_ids))
        if lo < 0 or hi >= self.config.max_position_embeddings:
            raise ValueError(f"position_ids holds position {lo if lo < 0 else hi}, outside [0, "
                             f"max_position_embeddings={self.config.max_position_embeddings})")

    def _check_inputs(self, input_ids, labels, cache) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be an integer tensor of shape (batch, seq), got "
                             f"{type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor of shape (batch, seq), got "
                             f"{input_ids.dtype} {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty")
        lo, hi = (int(v) for v in torch.aminmax(input_ids))  # one pass, two values
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, {self.config.vocab_size})")
        end = (cache.length if cache is not None else 0) + input_ids.shape[1]
        if end > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {end} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if labels is None:
            return
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be an integer tensor like input_ids, got "
                             f"{getattr(labels, 'dtype', type(labels).__name__)}")
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {tuple(input_ids.shape)}")
        ignored = labels == IGNORE_INDEX
        outside = ~ignored & ((labels < 0) | (labels >= self.config.vocab_size))
        if bool(outside.any()):
            raise ValueError(f"labels holds token id {int(labels[outside][0])}, outside the vocabulary "
                             f"[0, {self.config.vocab_size}) (and not the ignore index {IGNORE_INDEX})")
        if bool(ignored.all()):
            raise ValueError(f"labels are all the ignore index {IGNORE_INDEX}: there is no target to compute a loss on")


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labels that are not IGNORE_INDEX, in fp32."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)
