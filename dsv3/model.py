"""DeepSeekV3: embedding -> blocks (MLA + dense FFN / DeepSeekMoE) -> norm -> output head, plus the MTP modules.

``model(input_ids, labels=...)`` returns logits, the main next-token loss, each MTP depth's loss and the combined
training objective L = L_main + lambda/D * sum_k L_MTP^k (paper Eq. 24-25). Parameter names follow the released
checkpoint except for the stacked experts and the MTP modules (``dsv3.checkpoint`` maps them).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import ModelConfig
from .layers.block import Block
from .layers.mla import KVCache
from .layers.moe import DeepSeekMoE, Experts, Router, Routing
from .layers.mtp import MTPModule
from .layers.norm import RMSNorm
from .layers.rope import RotaryEmbedding

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    """What a forward pass returns. Losses are None without labels; MTP fields are empty unless MTP ran.

    ``logits`` and ``mtp_logits`` are computed from the hidden states by the output head on first access when the
    forward did not need them: a training step whose loss runs fused (``dsv3.kernels.linear_cross_entropy``, no
    (N, V) logits) never materializes them unless asked.
    """

    hidden: torch.Tensor  # (B, T, D), final normalized hidden state (h^0 for the first MTP module)
    head: nn.Module | None = field(default=None, repr=False)  # the output head that turns hidden states into logits
    loss: torch.Tensor | None = None  # L_main + mtp_weight * mean_k L_MTP^k
    main_loss: torch.Tensor | None = None  # next-token cross-entropy
    mtp_loss: torch.Tensor | None = None  # mean over depths of L_MTP^k
    mtp_losses: list[torch.Tensor] = field(default_factory=list)  # L_MTP^k for k = 1..D
    mtp_hidden: list[torch.Tensor] = field(default_factory=list)  # depth k: (B, T - k, D), normalized h^k
    routing: list[Routing] = field(default_factory=list)  # one per MoE block of the main model
    mtp_routing: list[Routing] = field(default_factory=list)  # one per MTP module
    _logits: torch.Tensor | None = field(default=None, repr=False)
    _mtp_logits: list[torch.Tensor | None] = field(default_factory=list, repr=False)

    @property
    def logits(self) -> torch.Tensor:
        """(B, T, V) next-token logits."""
        if self._logits is None:
            self._logits = self.head(self.hidden)
        return self._logits

    @property
    def mtp_logits(self) -> list[torch.Tensor]:
        """Depth k: (B, T - k, V), predicts t_{i+k+1}."""
        self._mtp_logits += [None] * (len(self.mtp_hidden) - len(self._mtp_logits))
        for k, h in enumerate(self.mtp_hidden):
            if self._mtp_logits[k] is None:
                self._mtp_logits[k] = self.head(h)
        return list(self._mtp_logits)

    @property
    def expert_counts(self) -> torch.Tensor:
        """(n_moe_layers, N_r) tokens per routed expert in each main-model MoE layer."""
        return torch.stack([r.counts for r in self.routing]) if self.routing else torch.empty(0)


class DeepSeekV3(nn.Module):
    """The whole model (paper Sec. 2). ``config.num_nextn_predict_layers`` MTP modules share embedding and head.

    ``capacity_factor`` / ``capacity_priority``: GShard-style token dropping in every MoE layer, for comparison only
    (DeepSeek-V3 drops nothing: the default None); ``set_capacity`` and ``capacity`` change it later.
    """

    def __init__(self, config: ModelConfig, capacity_factor: float | None = None, capacity_priority: str = "order"):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(config, k) for k in range(1, config.num_nextn_predict_layers + 1))
        self.rotary = RotaryEmbedding(config)
        self.set_capacity(capacity_factor, capacity_priority)
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

    def set_capacity(self, capacity_factor: float | None, priority: str = "order") -> None:
        """Expert capacity of every MoE layer (main and MTP): None = no dropping (V3), or a factor > 0."""
        for layer in self.moe_layers():
            layer.set_capacity(capacity_factor, priority)

    @contextlib.contextmanager
    def capacity(self, capacity_factor: float | None, priority: str = "order"):
        """``with model.capacity(1.0): ...`` runs the block with a capacity limit and restores each layer's own."""
        old = [(layer.capacity_factor, layer.capacity_priority) for layer in self.moe_layers()]
        self.set_capacity(capacity_factor, priority)
        try:
            yield self
        finally:
            for layer, (cf, prio) in zip(self.moe_layers(), old):
                layer.set_capacity(cf, prio)

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
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        mtp_weight: float = 0.3,
        return_mtp: bool | None = None,
        absorbed: bool | None = None,
        check_ids: bool = True,
    ) -> ModelOutput:
        """Run the model.

        input_ids (B, T). ``labels`` (B, T) are the next tokens, already aligned (labels[:, t] follows
        input_ids[:, t]; -100 = ignore). ``attention_mask`` (B, S) marks real tokens (1) after LEFT padding (0) over
        the cached and new positions; it becomes per-row start offsets (a cache keeps them for the next steps).
        With a ``cache`` the new tokens go after its ``length`` filled positions. ``return_mtp`` (default: when labels
        are given) also runs the MTP modules; ``mtp_weight`` is lambda. MLA's algorithm is the cache's kind;
        without a cache ``absorbed=True`` runs the latent (absorbed) attention instead of the naive one.
        ``check_ids=False`` skips the check that every id lies in the vocabulary, which reads the ids back to the
        host (a device synchronization): for loops whose ids were checked once where they came in (the trainer's
        tokenizer against the vocabulary, the tokens generation picks itself).
        """
        self._check_inputs(input_ids, labels, cache, check_ids)
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if cache is not None and absorbed is not None and absorbed != (cache.kind == "latent"):
            raise ValueError(
                f"absorbed={absorbed} contradicts the {cache.kind!r} cache, whose kind picks the "
                f"attention (leave absorbed unset with a cache)"
            )
        latent = bool(absorbed)
        if labels is not None and labels.dtype != torch.int64:
            labels = labels.long()  # int32 labels, as input_ids may be (cross_entropy wants int64)
        if isinstance(mtp_weight, (int, float)) and not math.isfinite(mtp_weight):
            raise ValueError(f"mtp_weight must be a finite number, got {mtp_weight!r}")
        if position_ids is not None:
            self._check_positions(position_ids, B, T, check_ids)
        else:
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)  # (B, T)
        starts = self._row_starts(B, start + T, attention_mask, cache, input_ids.device)  # (B,) or None
        cos, sin = self.rotary(position_ids)  # (B, T, R/2) each

        x = self.embed_tokens(input_ids)  # (B, T, D)
        routing = []
        for block in self.layers:
            x, r = block(x, cos, sin, starts, cache, start, latent)  # (B, T, D)
            if r is not None:
                routing.append(r)
        if cache is not None:
            cache.length = start + T
        if return_mtp is None:
            return_mtp = labels is not None
        return_mtp = return_mtp and cache is None  # the MTP modules train; decoding drafts with mtp_step
        return self.head_outputs(x, routing, input_ids, labels, position_ids, starts, latent, mtp_weight, return_mtp)

    def head_outputs(
        self,
        x: torch.Tensor,
        routing: list[Routing],
        input_ids: torch.Tensor,
        labels: torch.Tensor | None,
        position_ids: torch.Tensor,
        starts: torch.Tensor | None = None,
        latent: bool = False,
        mtp_weight: float = 0.3,
        return_mtp: bool = True,
    ) -> ModelOutput:
        """The end of ``forward`` after the last block: final norm, the MTP modules (when ``return_mtp``; they need
        the input ids for their embeddings), logits or the fused loss, and the losses. x (B, T, D) is the residual
        stream after the last block; ``routing`` the main blocks' routings. The last stage of a pipeline-parallel
        run (``dsv3.parallel.pipeline``) calls it with the blocks of the earlier stages run elsewhere."""
        hidden = self.norm(x)  # (B, T, D)
        out = ModelOutput(hidden=hidden, head=self.lm_head, routing=routing)
        if return_mtp and len(self.mtp) > 0:
            self._run_mtp(out, input_ids, position_ids, starts, latent)
        # the fused loss needs no logits: they are then computed only when asked for
        fused = labels is not None and self._fused_loss(hidden, labels)
        if not fused:
            out._logits = self.lm_head(hidden)  # (B, T, V)
            out._mtp_logits = [self.lm_head(h) for h in out.mtp_hidden]  # depth k: (B, T-k, V)
        if labels is not None:
            out.main_loss = self._head_loss(hidden, out._logits, labels)
            out.loss = out.main_loss
            if out.mtp_hidden:
                out.mtp_losses = [
                    self._head_loss(h, out._mtp_logits[k - 1] if not fused else None, labels[:, k:])
                    for k, h in enumerate(out.mtp_hidden, 1)
                ]
                out.mtp_loss = torch.stack(out.mtp_losses).mean()
                out.loss = out.main_loss + mtp_weight * out.mtp_loss
        return out

    def _fused_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> bool:
        """Whether the losses run fused (``kernels.linear_cross_entropy``, no (B, T, V) logits): where the kernels
        run Triton. The torch path keeps ``F.cross_entropy`` over materialized logits: the chunked online
        log-sum-exp rounds differently, and the book's CPU training runs are chaotic (one ulp moves their committed
        curves)."""
        return kernels.backend.use_triton(hidden, self.lm_head.weight, labels)

    def _head_loss(self, hidden: torch.Tensor, logits: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of the output head on ``hidden`` (B, T, D) against labels (B, T), in fp32:
        from ``logits`` when given, else fused by the vocabulary-chunked ``kernels.linear_cross_entropy`` (its Triton
        kernels, chosen by ``_fused_loss``; the labels were checked once in ``forward``)."""
        if logits is None:
            D = hidden.shape[-1]
            return kernels.linear_cross_entropy_triton(
                hidden.reshape(-1, D), self.lm_head.weight, labels.reshape(-1), IGNORE_INDEX
            )
        return _cross_entropy(logits, labels)

    def _run_mtp(self, out: ModelOutput, input_ids, position_ids, starts, latent) -> None:
        """Depth k at position i sees h^{k-1}_i and Emb(t_{i+k}) and predicts t_{i+k+1} (sequences shrink by k)."""
        T = input_ids.shape[1]
        h = out.hidden  # (B, T, D) = h^0
        for k, module in enumerate(self.mtp, 1):
            if T - k <= 0:
                break
            h = h[:, : T - k]  # (B, T-k, D): positions that still have a token t_{i+k}
            emb = self.embed_tokens(input_ids[:, k:])  # (B, T-k, D)
            cos, sin = self.rotary(position_ids[:, : T - k])  # MTP positions are those of h, i
            h, r = module(h, emb, cos, sin, starts, None, 0, latent)  # (B, T-k, D): the same rows, the same padding
            out.mtp_hidden.append(h)  # (B, T-k, D); logits (B, T-k, V) on demand
            if r is not None:
                out.mtp_routing.append(r)

    def mtp_step(
        self,
        depth: int,
        prev_hidden: torch.Tensor,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP module on its own (for drafting): h^{depth-1} (B, T, D) and tokens t_{i+depth} (B, T) at positions
        (B, T) -> (normalized h^depth (B, T, D), logits (B, T, V)). With a cache, its layer gets positions
        [start, start + T)."""
        module = self.mtp[depth - 1]
        B, T = tokens.shape
        starts = self._row_starts(B, start + T, attention_mask, cache, tokens.device, update_cache=False)
        cos, sin = self.rotary(position_ids)  # (B, T, R/2)
        h, _ = module(prev_hidden, self.embed_tokens(tokens), cos, sin, starts, cache, start)  # (B, T, D)
        return h, self.lm_head(h)  # (B, T, D), (B, T, V)

    def _row_starts(self, B, S, attention_mask, cache, device, update_cache=True) -> torch.Tensor | None:
        """Left padding as per-row start offsets: (B,) each row's first real position among the S cached + new ones,
        or None when no row is padded. ``attention_mask`` (B, S) must be zeros then ones in every row; with a cache
        the offsets are kept there (``cache.starts``) for the steps that follow."""
        if attention_mask is None:
            if cache is None or not cache.ragged:
                return None
            return cache.starts
        if not isinstance(attention_mask, torch.Tensor):
            raise ValueError(
                f"attention_mask must be a tensor of 1 (token) and 0 (padding), got {type(attention_mask).__name__}"
            )
        if attention_mask.shape != (B, S):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)} (cached + new positions)"
            )
        if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)][0].item()
            raise ValueError(f"attention_mask must hold only 1 (token) and 0 (padding), got {bad!r}")
        real = attention_mask.to(device=device, dtype=torch.bool)  # (B, S)
        starts = S - real.sum(dim=1)  # (B,) padding slots before each row's first real token
        left_padded = real == (torch.arange(S, device=device)[None, :] >= starts[:, None])  # (B, S)
        ragged, ok = (bool(v) for v in torch.stack([starts.any(), left_padded.all()]))  # one sync for both
        if not ok:
            row = int((~left_padded).any(dim=1).nonzero()[0])
            raise ValueError(
                f"attention_mask row {row} is not left padding (zeros, then ones): padding is carried as "
                f"per-row start offsets; left-pad the rows (dsv3.generate does this for ragged prompts)"
            )
        if cache is not None and update_cache:
            cache.starts.copy_(starts)
            cache.ragged = ragged
        return starts if ragged else None

    def _check_positions(self, position_ids, B: int, T: int, check_values: bool = True) -> None:
        if (
            not isinstance(position_ids, torch.Tensor)
            or position_ids.shape != (B, T)
            or position_ids.is_floating_point()
        ):
            raise ValueError(
                f"position_ids must be an integer tensor of shape {(B, T)} like input_ids, got "
                f"{getattr(position_ids, 'dtype', type(position_ids).__name__)} "
                f"{tuple(getattr(position_ids, 'shape', ()))}"
            )
        if not check_values:  # a loop that made the positions itself (generation) skips the read to the host
            return
        lo, hi = (int(v) for v in torch.aminmax(position_ids))
        if lo < 0 or hi >= self.config.max_position_embeddings:
            raise ValueError(
                f"position_ids holds position {lo if lo < 0 else hi}, outside [0, "
                f"max_position_embeddings={self.config.max_position_embeddings})"
            )

    def _check_inputs(self, input_ids, labels, cache, check_ids: bool = True) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(
                f"input_ids must be an integer tensor of shape (batch, seq), got {type(input_ids).__name__}"
            )
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be an integer tensor of shape (batch, seq), got "
                f"{input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty")
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
                raise ValueError(
                    f"labels must be an integer tensor like input_ids, got "
                    f"{getattr(labels, 'dtype', type(labels).__name__)}"
                )
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {tuple(input_ids.shape)}")
        if check_ids:  # ids and labels in one read (labels: ignored positions count as 0)
            values = [*torch.aminmax(input_ids)]
            if labels is not None:
                ignored = labels == IGNORE_INDEX
                values += [*torch.aminmax(labels.masked_fill(ignored, 0)), ignored.all().to(values[0].dtype)]
            read = torch.stack(values).tolist()
            for name, lo, hi in zip(("input_ids", "labels"), read[0:4:2], read[1:4:2]):
                if lo < 0 or hi >= self.config.vocab_size:
                    bad = lo if lo < 0 else hi
                    ignore = f" (and not the ignore index {IGNORE_INDEX})" if name == "labels" else ""
                    raise ValueError(
                        f"{name} holds token id {bad}, outside the vocabulary [0, {self.config.vocab_size}){ignore}"
                    )
            if labels is not None and read[4]:
                raise ValueError(
                    f"labels are all the ignore index {IGNORE_INDEX}: there is no target to compute a loss on"
                )
        end = (cache.length if cache is not None else 0) + input_ids.shape[1]
        if end > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {end} exceeds max_position_embeddings={self.config.max_position_embeddings}"
            )


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labels that are not IGNORE_INDEX, in fp32."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)
