"""Generation: prefill, decoding over the latent KV cache, sampling, and speculative decoding with the MTP modules
(paper Sec. 2.1.1 for the cache, Sec. 2.2 and 5.4.3 for MTP drafting; taught in Chapters 2 and 6).

``generate(model, prompts, max_new_tokens)`` runs one prefill over the (left-padded) prompts, then one decode step
per new token. The cache is allocated once for the final length; with ``cache_kind="latent"`` (the default) every
MLA layer stores only c_KV and k^R and attends with the absorbed weights, ``"naive"`` stores decompressed keys and
values for comparison.

With ``speculative=True`` the MTP modules draft ``num_draft`` tokens, the main model checks them all in one forward
over the cache, and the cache is rolled back past the first rejected draft (``KVCache.truncate``). Module k at
position i reads the previous depth's representation h^{k-1}_i and the token t_{i+k} (Sec. 2.2), so its own cache
layer is a causal attention over positions too; after every round each module re-runs only the positions whose
inputs changed. When ``num_draft`` exceeds the number of modules, the last module continues on its own output,
one position further each step, as the inference engines do. Greedy speculative output equals greedy output token
for token; with sampling, the rule of Leviathan et al. (2023) and Chen et al. (2023) -- accept a draft with
probability min(1, p/q), otherwise resample from max(0, p - q) normalized -- keeps the target distribution.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .config import ModelConfig
from .layers.mla import CACHE_KINDS, KVCache

# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution a token is drawn from: softmax(logits / temperature) restricted to the ``top_k`` most likely
    tokens and to the smallest set whose mass reaches ``top_p`` (nucleus), renormalized. logits (..., V) -> fp32."""
    logits = logits.float() / temperature  # (..., V)
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)  # (..., V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # (..., V)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass strictly ahead of each token
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One sample per row of probs (..., V) -> (...,) int64."""
    flat = probs.reshape(-1, probs.shape[-1])  # (N, V)
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """max(0, p - q) normalized, over the last dim: where a rejected draft's replacement is drawn from.

    If q >= p everywhere (q == p up to rounding) no draft can be rejected; p itself is returned for safety."""
    r = (p - q).clamp(min=0)  # (..., V)
    mass = r.sum(dim=-1, keepdim=True)  # (..., 1)
    return torch.where(mass > 0, r / mass.clamp(min=torch.finfo(r.dtype).tiny), p)


def speculative_verify(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling: which drafts the target accepts and the token that follows them.

    p (B, k+1, V): target probabilities at the k draft positions plus one more; q (B, k, V): the draft
    probabilities each draft was drawn from; drafts (B, k). Draft j is accepted with probability
    min(1, p_j(d_j) / q_j(d_j)) while every earlier one was; at the first rejection the next token is drawn from
    ``residual_distribution(p_j, q_j)``; if all k are accepted it is drawn from p_{k+1} (the bonus token).
    Each token emitted this way is distributed exactly as p given the ones before it.
    Returns (number accepted (B,), next token (B,)).
    """
    B, k = drafts.shape
    if k == 0:
        return torch.zeros(B, dtype=torch.long, device=p.device), _draw(p[:, 0], generator)
    p_d = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)  # (B, k) target prob of each draft
    q_d = q.gather(-1, drafts[..., None]).squeeze(-1)  # (B, k) draft prob of each draft (> 0: it was drawn)
    u = torch.rand(B, k, generator=generator, device=p.device)  # (B, k)
    accept = u * q_d < p_d  # u < p/q, i.e. accept with probability min(1, p/q)
    n_acc = accept.long().cumprod(dim=-1).sum(dim=-1)  # (B,) accepted prefix length
    rows = torch.arange(B, device=p.device)
    j = n_acc.clamp(max=k - 1)  # (B,) first rejected position (unused when all accepted)
    resid = residual_distribution(p[rows, j], q[rows, j])  # (B, V)
    dist = torch.where((n_acc == k)[:, None], p[:, k], resid)  # (B, V)
    return n_acc, _draw(dist, generator)


def greedy_verify(target_logits: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification: drafts (B, k) are accepted while each equals the target's argmax at its position;
    the next token is the argmax after the accepted ones. target_logits (B, k+1, V).
    Returns (number accepted (B,), next token (B,))."""
    target = target_logits.argmax(dim=-1)  # (B, k+1)
    k = drafts.shape[1]
    n_acc = (drafts == target[:, :k]).long().cumprod(dim=-1).sum(dim=-1)  # (B,)
    return n_acc, target.gather(1, n_acc[:, None]).squeeze(1)


# ---------------------------------------------------------------------------------------------------------------
# What generate returns
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class GenerationStats:
    """Counters and timings of one ``generate`` call (``str(stats)`` is the one-line summary the CLI prints)."""

    batch_size: int
    prompt_tokens: int  # real prompt tokens over all rows (padding excluded)
    new_tokens: int = 0  # tokens generated over all rows (stop tokens included)
    cache_kind: str = "latent"
    cache_len: int = 0  # positions the cache was allocated for: padded prompt + max_new_tokens
    cache_bytes: int = 0  # main-model KV cache bytes (equals kv_cache_bytes(config, cache_len, batch_size, dtype))
    main_forwards: int = 0  # forward passes of the main model, prefill included
    row_forwards: int = 0  # sum over main forwards of the rows still generating
    prefill_s: float = 0.0
    decode_s: float = 0.0  # everything after the prefill (drafting and verification included)
    wall_s: float = 0.0
    speculative: bool = False
    num_draft: int = 0
    rounds: int = 0  # verification forwards (speculative only)
    drafted: int = 0  # drafted tokens, over unfinished rows
    accepted: int = 0  # drafted tokens the verification accepted (a batch keeps its rows' minimum: tokens_per_forward)
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per main-model forward and row: 1.0 without speculation, up to num_draft + 1 with it."""
        return self.new_tokens / max(self.row_forwards, 1)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second after the prefill (the first token of each row comes from the prefill)."""
        return (self.new_tokens - self.batch_size) / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def acceptance_per_position(self) -> list[float]:
        """Per draft position j: the fraction of rounds (and rows) in which drafts 1..j were all accepted."""
        return [a / d if d else float("nan") for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    @property
    def mean_accepted_length(self) -> float:
        """Drafts kept per verification round and row (the bonus token not counted)."""
        per_row_rounds = self.drafted_per_position[0] if self.drafted_per_position else 0
        return self.accepted / per_row_rounds if per_row_rounds else float("nan")

    def as_dict(self) -> dict:
        out = asdict(self)
        for name in (
            "tokens_per_forward",
            "decode_tokens_per_s",
            "acceptance_rate",
            "acceptance_per_position",
            "mean_accepted_length",
        ):
            out[name] = getattr(self, name)
        return out

    def __str__(self) -> str:
        s = (
            f"{self.new_tokens} tokens in {self.wall_s:.2f}s (prefill {self.prefill_s:.3f}s, "
            f"decode {self.decode_tokens_per_s:.1f} tok/s), {self.main_forwards} main forwards, "
            f"{self.tokens_per_forward:.2f} tokens/forward, {self.cache_kind} cache {self.cache_bytes:,} bytes"
        )
        if self.speculative:
            per_pos = ", ".join(f"{a:.2f}" for a in self.acceptance_per_position)
            s += (
                f"; drafted {self.drafted}, accepted {self.accepted} ({self.acceptance_rate:.1%}), "
                f"per position [{per_pos}], mean accepted length {self.mean_accepted_length:.2f}"
            )
        return s


@dataclass
class Generation:
    """The result of ``generate``.

    ``tokens`` (B, N) holds each row's new tokens (stop token included), then ``pad_token_id`` after the row ended;
    ``lengths`` (B,) how many are real. ``cache`` is the KV cache at the end; ``mtp_lengths[k-1]`` how many leading
    positions of MTP module k's cache layer hold entries whose inputs are all committed tokens.
    """

    tokens: torch.Tensor  # (B, N)
    lengths: torch.Tensor  # (B,)
    stats: GenerationStats
    cache: KVCache
    mtp_lengths: list[int] = field(default_factory=list)

    def sequences(self) -> list[list[int]]:
        """Each row's new tokens as a list of ids."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]


# ---------------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------------


def _as_prompts(input_ids, attention_mask) -> list[torch.Tensor]:
    """One 1-D int64 tensor per prompt, from a 1-D/2-D tensor (with an optional mask marking real tokens), a list of
    ids, or a list of such lists/tensors of different lengths."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            attention_mask = None if attention_mask is None else torch.as_tensor(attention_mask).reshape(1, -1)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (seq,) or (batch, seq), got {tuple(input_ids.shape)}")
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids holds no prompt (batch size 0)")
        if attention_mask is None:
            return [row.long() for row in input_ids]
        attention_mask = torch.as_tensor(attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                f"{tuple(input_ids.shape)} like input_ids"
            )
        if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)][0].item()
            raise ValueError(f"attention_mask must hold only 1 (token) and 0 (padding), got {bad!r}")
        return [row[m.bool()].long() for row, m in zip(input_ids, attention_mask)]
    if attention_mask is not None:
        raise ValueError("attention_mask is only accepted with a tensor input_ids; pass ragged prompts as a list")
    if not isinstance(input_ids, Sequence) or isinstance(input_ids, (str, bytes)):
        raise ValueError(f"input_ids must be a tensor or a list of token ids, got {type(input_ids).__name__}")
    if len(input_ids) == 0:
        raise ValueError("the prompt is empty: input_ids has no tokens")
    if all(isinstance(t, int) for t in input_ids):
        input_ids = [input_ids]
    prompts = []
    for b, row in enumerate(input_ids):
        if isinstance(row, torch.Tensor):
            prompts.append(row.reshape(-1).long())
        elif isinstance(row, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in row):
            huge = [t for t in row if not -(2**63) <= t < 2**63]
            if huge:
                raise ValueError(f"prompt {b} holds token id {huge[0]}, outside the vocabulary")
            prompts.append(torch.tensor(list(row), dtype=torch.long))
        else:
            raise ValueError(f"prompt {b} must be a list of int token ids or a 1-D tensor, got {row!r:.60}")
    return prompts


def _stop_set(stop_tokens, config) -> set[int]:
    """``stop_tokens`` (None, one id, or a list of ids) as a set of token ids of the vocabulary."""
    if stop_tokens is None:
        return set()
    ids = [stop_tokens] if isinstance(stop_tokens, numbers.Integral) else stop_tokens
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, set, frozenset, torch.Tensor)):
        raise ValueError(f"stop_tokens must be a token id or a list of token ids, got {stop_tokens!r}")
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < config.vocab_size:
            raise ValueError(f"stop_tokens holds {t!r}, not a token id of the vocabulary [0, {config.vocab_size})")
    return {int(t) for t in ids}


def _check(
    model,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    cache_kind: str,
    speculative: bool,
    num_draft: int,
    seed: int | None = None,
) -> None:
    config = model.config
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise ValueError(f"seed must be None or an integer in [0, 2**64), got {seed!r}")
    for b, p in enumerate(prompts):
        if p.numel() == 0:
            raise ValueError(
                f"the prompt is empty (prompt {b} has no tokens)"
                if len(prompts) > 1
                else "the prompt is empty: generation needs at least one token to start from"
            )
        lo, hi = int(p.min()), int(p.max())
        if lo < 0 or hi >= config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"prompt {b} holds token id {bad}, outside the vocabulary [0, {config.vocab_size})")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    longest = max(p.numel() for p in prompts)
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"prompt length {longest} + max_new_tokens {max_new_tokens} = {longest + max_new_tokens} "
            f"exceeds max_position_embeddings={config.max_position_embeddings}"
        )
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ValueError(f"temperature must be >= 0 (0 = greedy) and finite, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer (0 = off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if cache_kind not in CACHE_KINDS:
        raise ValueError(f"cache_kind must be one of {CACHE_KINDS}, got {cache_kind!r}")
    if speculative:
        if len(model.mtp) == 0:
            raise ValueError(
                "speculative decoding drafts with the MTP modules, but this model has none "
                "(config.num_nextn_predict_layers=0)"
            )
        if not isinstance(num_draft, int) or isinstance(num_draft, bool) or num_draft < 1:
            raise ValueError(f"num_draft must be a positive integer, got {num_draft!r}")


# ---------------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(
    model,
    input_ids,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_tokens: Sequence[int] | int | None = None,
    cache_kind: str = "latent",
    speculative: bool = False,
    num_draft: int = 1,
    pad_token_id: int | None = None,
    callback: Callable[[int, list[int]], None] | None = None,
) -> Generation:
    """Generate up to ``max_new_tokens`` tokens after each prompt.

    ``input_ids``: a 1-D tensor or list of ids (one prompt), a (B, T) tensor (with ``attention_mask`` (B, T)
    marking real tokens when the rows are padded, on either side), or a list of prompts of different lengths.
    Prompts are left-padded internally; each row's positions start at 0 with its first real token.
    ``temperature=0`` is greedy; otherwise tokens are drawn from ``sampling_probs`` (temperature, ``top_k``,
    ``top_p``) with a generator seeded by ``seed``. A row ends at its first token in ``stop_tokens`` (kept in the
    output). ``cache_kind`` "latent" decodes with absorbed MLA over c_KV + k^R, "naive" with decompressed K/V.
    ``speculative=True`` drafts ``num_draft`` tokens per round with the MTP modules (see the module docstring).
    ``callback(row, new_ids)`` is called whenever a row gains tokens (streaming).
    """
    t_start = time.perf_counter()
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise ValueError(f"generate needs a dsv3.DeepSeekV3 model, got {type(model).__name__}")
    prompts = _as_prompts(input_ids, attention_mask)
    _check(model, prompts, max_new_tokens, temperature, top_k, top_p, cache_kind, speculative, num_draft, seed)
    stop_tokens = _stop_set(stop_tokens, config)
    device = model.device
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()

    # -- left-pad the prompts: row b has pad[b] padding slots, then its tokens; position = slot - pad[b] --
    B, N = len(prompts), max_new_tokens
    lens = torch.tensor([p.numel() for p in prompts], device=device)  # (B,)
    P = int(lens.max())
    pad = P - lens  # (B,)
    S = P + N  # every slot the cache will ever hold
    seq = torch.zeros(B, S, dtype=torch.long, device=device)  # (B, S) token at each slot
    for b, p in enumerate(prompts):
        seq[b, P - p.numel() : P] = p.to(device)
    slots = torch.arange(S, device=device)  # (S,)
    positions = (slots[None, :] - pad[:, None]).clamp(min=0)  # (B, S) RoPE position of each slot
    mask = slots[None, :P] >= pad[:, None]  # (B, P) True = real token

    if speculative:  # a round never drafts past the token budget, so larger requests change nothing
        num_draft = min(num_draft, max(N - 1, 1))
    D = len(model.mtp) if speculative else 0
    cache = KVCache(config, B, S, cache_kind, dtype=model.dtype, device=device, num_layers=config.num_hidden_layers + D)
    k = num_draft if speculative else 0
    stats = GenerationStats(
        batch_size=B,
        prompt_tokens=int(lens.sum()),
        cache_kind=cache_kind,
        cache_len=S,
        cache_bytes=cache.nbytes,
        speculative=speculative,
        num_draft=k,
        drafted_per_position=[0] * k,
        accepted_per_position=[0] * k,
    )
    rows = _Rows(B, N, stop_tokens, callback, stats)

    def choose(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pick a token per row of logits (..., V): (token (...), the distribution it was drawn from or None)."""
        if temperature == 0:
            return logits.argmax(dim=-1), None
        probs = sampling_probs(logits, temperature, top_k, top_p)  # (..., V)
        return _draw(probs, generator), probs

    # no autograd bookkeeping at all inside (about 10% of a CPU decoding step); the cache and seq were made outside
    # it, so they stay ordinary tensors that the caller may go on using with autograd or in place
    with torch.inference_mode():
        # -- prefill --
        out = model(
            seq[:, :P], attention_mask=mask, position_ids=positions[:, :P], cache=cache, check_ids=False
        )  # _check read every prompt id once
        stats.main_forwards += 1
        if not bool(torch.isfinite(out.logits[:, -1]).all()):  # argmax of NaN is token 0: garbage, not an error
            raise ValueError(
                "the model's logits after the prompt are not finite (NaN or Inf): its weights hold "
                "NaN/Inf or overflow in its dtype"
            )
        tok, _ = choose(out.logits[:, -1])  # (B,)
        seq[:, P] = tok
        rows.commit(tok[:, None])
        stats.prefill_s = time.perf_counter() - t_start
        t_decode = time.perf_counter()

        if not speculative:
            n = P  # slots filled in the cache
            while not rows.all_done:
                out = model(
                    seq[:, n : n + 1], position_ids=positions[:, n : n + 1], cache=cache, check_ids=False
                )  # logits (B, 1, V); ids of its own choosing
                stats.main_forwards += 1
                n += 1
                tok, _ = choose(out.logits[:, -1])  # (B,)
                seq[:, n] = tok
                rows.commit(tok[:, None])
            mtp_lengths: list[int] = []
        else:
            mtp_lengths = _speculative_loop(
                model,
                seq,
                positions,
                cache,
                out.hidden,
                P,
                num_draft,
                temperature == 0,
                choose,
                lambda lg: sampling_probs(lg, temperature, top_k, top_p),
                generator,
                rows,
                stats,
            )
    stats.decode_s = time.perf_counter() - t_decode
    stats.wall_s = time.perf_counter() - t_start
    lengths = [len(r) for r in rows.tokens]
    tokens = torch.full((B, max(lengths)), pad_token_id, dtype=torch.long)  # (B, longest row)
    for b, r in enumerate(rows.tokens):
        tokens[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return Generation(
        tokens=tokens.to(device),
        lengths=torch.tensor(lengths, device=device),
        stats=stats,
        cache=cache,
        mtp_lengths=mtp_lengths,
    )


class _Rows:
    """Each row's generated tokens, kept as Python lists: a step appends a few ids per row, so this bookkeeping
    costs microseconds instead of a dozen tensor ops per step."""

    def __init__(self, B: int, N: int, stop: set[int], callback, stats: GenerationStats):
        self.tokens: list[list[int]] = [[] for _ in range(B)]
        self.done = [False] * B
        self.N, self.stop, self.callback, self.stats = N, stop, callback, stats

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def active(self) -> list[int]:
        return [b for b, d in enumerate(self.done) if not d]

    def remaining(self) -> int:
        """Tokens every unfinished row may still add (they are always equally long)."""
        return self.N - max(len(self.tokens[b]) for b in self.active())

    def commit(self, new: torch.Tensor) -> None:
        """Append new (B, m) to every unfinished row, up to its first stop token and the N-token budget."""
        self.stats.row_forwards += len(self.active())
        for b, ids in enumerate(new.tolist()):
            if self.done[b]:
                continue
            out, kept = self.tokens[b], []
            for t in ids[: self.N - len(out)]:
                kept.append(t)
                if t in self.stop:
                    self.done[b] = True
                    break
            out.extend(kept)
            self.done[b] = self.done[b] or len(out) >= self.N
            self.stats.new_tokens += len(kept)
            if self.callback is not None and kept:
                self.callback(b, kept)


def _speculative_loop(
    model, seq, positions, cache, prefill_hidden, P, num_draft, greedy, choose, target_probs, generator, rows, stats
) -> list[int]:
    """Draft with the MTP modules, verify with the main model, keep the accepted prefix; repeat.

    Invariant at the start of a round: slots [0, n) are in the main cache, seq[:, n] is the newest committed token
    (not yet fed to the model), hidden[0][:, i] = h^0_i for i < n, and MTP module k's cache layer holds correct
    entries for its first valid[k] positions (entry i is correct when h^{k-1}_i is and t_{i+k} is committed).
    All rows commit the same number of tokens per round (the fewest any unfinished row accepted), so the rows stay
    aligned in the cache; each kept token was accepted by its own row, so nothing changes the target distribution.
    """
    B, S = seq.shape
    D = len(model.mtp)
    hidden = [
        torch.zeros(B, S, model.config.hidden_size, dtype=model.dtype, device=seq.device) for _ in range(D + 1)
    ]  # hidden[k][:, i] = h^k_i (k = 0: the main model's final normalized state)
    hidden[0][:, :P] = prefill_hidden
    valid = [0] * (D + 1)  # valid[k]: leading positions of module k's layer that are correct (index 0 unused)
    computed = [0] * (D + 1)  # computed[k]: positions module k has run through
    n = P
    while not rows.all_done:
        k = min(num_draft, rows.remaining() - 1)  # never draft past the token budget

        # -- draft: modules 1..min(D, k) at position n-1 (each first catches up on the positions it has not seen
        # with correct inputs), then the last module autoregressively at positions n, n+1, ... --
        drafts, q = [], []
        h_last = None
        for depth in range(1, min(D, k) + 1):
            v = valid[depth]
            tokens = seq[:, v + depth : n + depth]  # (B, T): t_{i+depth} for i in [v, n); beyond n they are drafts
            h, logits = model.mtp_step(depth, hidden[depth - 1][:, v:n], tokens, positions[:, v:n], cache, start=v)
            hidden[depth][:, v:n] = h  # (B, T, D)
            computed[depth] = n
            d, probs = choose(logits[:, -1])  # (B,) predicts t_{n+depth}
            seq[:, n + depth] = d
            drafts.append(d)
            q.append(probs)
            h_last = h[:, -1:]  # (B, 1, D)
        for step in range(D + 1, k + 1):  # reuse the last module on its own output, one position further
            i = n - 1 + step - D  # its position; its token is the previous draft t_{i+D}
            h_last, logits = model.mtp_step(
                D, h_last, seq[:, i + D : i + D + 1], positions[:, i : i + 1], cache, start=i
            )
            d, probs = choose(logits[:, -1])  # (B,) predicts t_{n+step}
            seq[:, n + step] = d
            drafts.append(d)
            q.append(probs)

        # -- verify: the newest committed token and the k drafts in one forward --
        out = model(
            seq[:, n : n + k + 1], position_ids=positions[:, n : n + k + 1], cache=cache, check_ids=False
        )  # logits (B, k+1, V); ids checked by _check or chosen here
        stats.main_forwards += 1
        stats.rounds += 1
        hidden[0][:, n : n + k + 1] = out.hidden
        draft_ids = torch.stack(drafts, dim=1) if drafts else seq[:, :0]  # (B, k)
        if greedy:
            n_acc, nxt = greedy_verify(out.logits, draft_ids)  # (B,), (B,)
        else:
            p = target_probs(out.logits)  # (B, k+1, V) under the same temperature / top-k / top-p
            n_acc, nxt = speculative_verify(p, torch.stack(q, dim=1) if q else p[:, :0], draft_ids, generator)

        # -- keep the same number of tokens in every row: the fewest accepted by an unfinished row, then one more
        # (that row's replacement or bonus token; a row that accepted more keeps its accepted draft there) --
        per_row = n_acc.tolist()
        live = [per_row[b] for b in rows.active()]  # what each unfinished row's verification accepted
        a = min(live)
        accepted_or_next = torch.cat([draft_ids, nxt[:, None]], dim=1)  # (B, k+1)
        last = torch.where(n_acc == a, nxt, accepted_or_next[:, a])  # (B,)
        new = torch.cat([draft_ids[:, :a], last[:, None]], dim=1)  # (B, a+1)
        for j in range(k):
            stats.drafted_per_position[j] += len(live)
            stats.accepted_per_position[j] += sum(x > j for x in live)
        stats.drafted += len(live) * k
        stats.accepted += sum(live)
        seq[:, n + 1 : n + a + 2] = new
        rows.commit(new)
        n += a + 1
        cache.truncate(n)  # forget the rejected drafts' keys and values
        for depth in range(1, D + 1):  # entries whose token index reaches the new last token are stale
            valid[depth] = max(0, min(computed[depth], n - depth))
    return valid[1:]
