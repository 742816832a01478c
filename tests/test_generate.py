"""Generation: cached decoding (absorbed vs naive), batches, sampling, speculative decoding with MTP, errors, CLI."""

import pytest
import torch

from dsv3 import kv_cache_bytes, save_pretrained
from dsv3.generate import generate, greedy_verify, residual_distribution, sampling_probs, speculative_verify
from helpers import random_model, small_config

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small ops run faster on one thread


def prompt(n, seed=0, vocab=320):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def agreeing_model(cfg, alpha=0.3, seed=0):
    """A random model whose MTP modules mostly agree with the main model, so drafts are often accepted.

    Every block's output projections are scaled by ``alpha``, so the main model's next token is mostly (not always)
    the "bigram" argmax head(norm(Emb(t))); each MTP module reads Emb(t_{i+k}) through an identity eh_proj and the
    main model's final norm, so it predicts that same bigram token. Context still matters (attention is scaled,
    not removed), so a stale cache entry would change the output.
    """
    model = random_model(cfg, seed=seed)
    D = cfg.hidden_size
    with torch.no_grad():
        for block in list(model.layers) + list(model.mtp):
            block.self_attn.o_proj.weight.mul_(alpha)
            if block.is_moe:
                block.mlp.experts.down_proj.mul_(alpha)
                block.mlp.shared_experts.down_proj.weight.mul_(alpha)
            else:
                block.mlp.down_proj.weight.mul_(alpha)
        for module in model.mtp:
            module.eh_proj.weight[:, :D] = torch.eye(D)
            module.eh_proj.weight[:, D:] = torch.randn(D, D) * 0.02
            module.enorm.weight.fill_(1.0)
            module.shared_head.norm.weight.copy_(model.norm.weight)
    return model


def tv(a, b):
    return 0.5 * (a - b).abs().sum().item()


# ---------------------------------------------------------------------------------------------- plain decoding


def test_greedy_equals_uncached_argmax_loop():
    """The cached decode gives the tokens a cache-free loop of full forwards gives."""
    model = random_model(small_config())
    ids = prompt(9)[None]
    gen = generate(model, ids, 10)
    seq = ids
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(gen.tokens, seq[:, 9:])
    assert gen.stats.main_forwards == 10 and gen.stats.tokens_per_forward == 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_absorbed_and_naive_decode_give_same_tokens(seed):
    model = random_model(small_config(), seed=seed)
    prompts = [prompt(5, seed), prompt(11, seed + 10)]
    latent = generate(model, prompts, 16, cache_kind="latent")
    naive = generate(model, prompts, 16, cache_kind="naive")
    assert torch.equal(latent.tokens, naive.tokens)
    assert latent.tokens.shape == (2, 16)


@pytest.mark.parametrize("kind", ["latent", "naive"])
def test_decoding_goes_on_from_the_returned_cache(kind):
    """generate runs under inference mode, but the cache it returns is ordinary: a caller can keep decoding into it
    (outside inference mode) and gets the tokens a longer generate call gives."""
    model = random_model(small_config())
    ids = prompt(7)[None]
    short = generate(model, ids, 5, cache_kind=kind)  # its cache holds the prompt and 4 of the 5 new tokens
    assert not any(t.is_inference() for t in short.cache.a + short.cache.b)
    longer = generate(model, ids, 6, cache_kind=kind)
    with torch.no_grad():  # feed the 5th token into the returned cache
        nxt = model(short.tokens[:, -1:], cache=short.cache).logits[:, -1].argmax(-1)  # (1,)
    assert short.cache.length == 7 + 5 and torch.equal(nxt, longer.tokens[:, 5])


def test_cache_bytes_equal_the_formula():
    cfg = small_config()
    model = random_model(cfg)
    prompts = [prompt(7), prompt(12, 1), prompt(3, 2)]
    for kind, attention in (("latent", "mla"), ("naive", "mha")):
        stats = generate(model, prompts, 9, cache_kind=kind).stats
        assert stats.cache_len == 12 + 9  # allocated once: longest prompt + max_new_tokens
        assert stats.cache_bytes == kv_cache_bytes(cfg, 21, batch=3, dtype=torch.float32, attention=attention)
    spec = generate(
        random_model(small_config(num_nextn_predict_layers=2)), prompts, 9, speculative=True, num_draft=2
    ).stats  # the MTP layers' entries are not part of the main-model figure
    assert spec.cache_bytes == kv_cache_bytes(cfg, 21, batch=3, dtype=torch.float32)
    latent = kv_cache_bytes(cfg, 1, dtype=torch.float32)
    naive = kv_cache_bytes(cfg, 1, dtype=torch.float32, attention="mha")
    assert latent * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) == naive * (
        cfg.kv_lora_rank + cfg.qk_rope_head_dim
    )


def test_batch_equals_per_row_and_rows_stop_on_their_own():
    model = random_model(small_config())
    prompts = [prompt(4, 1), prompt(13, 2), prompt(8, 3)]
    alone = [generate(model, p, 12).tokens[0] for p in prompts]
    batch = generate(model, prompts, 12)
    for row, ref in zip(batch.tokens, alone):
        assert torch.equal(row, ref)
    # stop on a token that row 1 produces early: row 1 ends there, the others go on (or stop on their own)
    stop = int(alone[1][3])
    batch = generate(model, prompts, 12, stop_tokens=[stop], pad_token_id=-1)
    for b, p in enumerate(prompts):
        ref = generate(model, p, 12, stop_tokens=stop).sequences()[0]
        assert batch.sequences()[b] == ref
        hits = [i for i, t in enumerate(alone[b].tolist()) if t == stop]
        assert len(ref) == (hits[0] + 1 if hits else 12)
        assert (batch.tokens[b, len(ref) :] == -1).all()
    assert batch.lengths[1] <= 4


def test_padded_tensor_input_equals_list_input():
    model = random_model(small_config())
    a, b = prompt(6, 4), prompt(10, 5)
    ids = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros(2, 10, dtype=torch.long)
    ids[0, :6], mask[0, :6] = a, 1  # right-padded rows are accepted too
    ids[1], mask[1] = b, 1
    assert torch.equal(generate(model, ids, 8, attention_mask=mask).tokens, generate(model, [a, b], 8).tokens)


def test_streaming_callback_sees_every_token():
    model = random_model(small_config())
    seen = {0: [], 1: []}
    gen = generate(model, [prompt(3), prompt(5, 1)], 7, callback=lambda row, ids: seen[row].extend(ids))
    assert [seen[0], seen[1]] == gen.sequences()


# ---------------------------------------------------------------------------------------------- sampling


def test_sampling_probs_by_hand():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    assert torch.allclose(sampling_probs(logits), torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    assert torch.allclose(sampling_probs(logits, top_k=2), torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7]]))
    assert torch.allclose(sampling_probs(logits, top_p=0.65), torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7]]))
    assert torch.allclose(sampling_probs(logits, top_p=0.75), torch.tensor([[0.0, 4 / 9, 2 / 9, 3 / 9]]))
    assert torch.allclose(sampling_probs(logits, top_p=0.01), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    sharp = sampling_probs(logits, temperature=0.5)
    assert torch.allclose(sharp, torch.tensor([[0.01, 0.16, 0.04, 0.09]]) / 0.30)


def test_sampling_is_seeded():
    model = random_model(small_config())
    run = lambda seed: generate(model, prompt(5), 12, temperature=1.0, top_p=0.95, seed=seed).tokens
    torch.manual_seed(0)
    first = run(3)
    torch.manual_seed(1)  # the seed argument alone decides the samples, not torch's global generator
    assert torch.equal(run(3), first)
    assert not torch.equal(run(4), first)


def test_greedy_verify_by_hand():
    logits = torch.full((2, 3, 5), -1.0)
    logits[0, 0, 2] = logits[0, 1, 4] = logits[0, 2, 1] = 1.0  # argmax path 2, 4, 1
    logits[1, 0, 3] = logits[1, 1, 0] = logits[1, 2, 0] = 1.0  # argmax path 3, 0, 0
    n_acc, nxt = greedy_verify(logits, torch.tensor([[2, 4], [3, 1]]))
    assert n_acc.tolist() == [2, 1] and nxt.tolist() == [1, 0]


def test_accept_resample_rule_gives_the_target_exactly():
    """sum over drafts of q(d) min(1, p/q) [d = x] + P(reject) residual(x) = p(x), for hand-made p and q."""
    p = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0])
    q = torch.tensor([0.1, 0.4, 0.2, 0.0, 0.3])
    accept = torch.where(q > 0, (p / q).clamp(max=1), torch.zeros(()))
    kept = q * accept  # P(draft = x and accepted)
    out = kept + (1 - kept.sum()) * residual_distribution(p, q)
    assert torch.allclose(out, p, atol=1e-7)
    assert torch.allclose(residual_distribution(p, q), torch.tensor([0.4, 0.0, 0.0, 0.1, 0.0]) / 0.5)
    assert torch.allclose(residual_distribution(p, p), p)  # nothing can be rejected; no division by zero


def test_speculative_verify_preserves_a_markov_chain():
    """Monte Carlo over 200k rows with k = 2 drafts from a draft chain q and target chain p (hand-made, prefix-
    dependent): the first emitted token is ~ p_1, the second (after an accepted first draft) ~ p_2(. | x1), the
    third (after two accepted) ~ p_3(. | x1, x2), with the acceptance probabilities min(p, q) of the rule."""
    V, B = 5, 200_000
    g = torch.Generator().manual_seed(0)
    dist = lambda *shape: torch.distributions.Dirichlet(torch.full((V,), 0.7)).sample(shape)
    torch.manual_seed(0)
    P1, Q1, P2, Q2, P3 = dist(), dist(), dist(V), dist(V), dist(V, V)  # P2[x1], P3[x1, x2]
    d1 = torch.multinomial(Q1.expand(B, V), 1, generator=g)[:, 0]
    d2 = torch.multinomial(Q2[d1], 1, generator=g)[:, 0]
    p = torch.stack([P1.expand(B, V), P2[d1], P3[d1, d2]], dim=1)  # (B, 3, V)
    q = torch.stack([Q1.expand(B, V), Q2[d1]], dim=1)  # (B, 2, V)
    n_acc, nxt = speculative_verify(p, q, torch.stack([d1, d2], 1), generator=g)

    x1 = torch.where(n_acc >= 1, d1, nxt)
    assert tv(torch.bincount(x1, minlength=V) / B, P1) < 0.006
    one = n_acc >= 1  # x1 = d1 was accepted: the second token is x2 = d2 or the replacement
    x2 = torch.where(n_acc >= 2, d2, nxt)[one]
    joint = torch.bincount(d1[one] * V + x2, minlength=V * V).view(V, V) / B
    expect = torch.minimum(P1, Q1)[:, None] * P2  # P(x1 accepted) * p_2(x2 | x1)
    assert tv(joint, expect) < 0.01
    two = n_acc == 2  # both accepted: the bonus token is drawn from p_3(. | x1, x2)
    triple = torch.bincount((d1[two] * V + d2[two]) * V + nxt[two], minlength=V**3).view(V, V, V) / B
    expect = torch.minimum(P1, Q1)[:, None, None] * torch.minimum(P2, Q2)[:, :, None] * P3
    assert tv(triple, expect) < 0.015


# ---------------------------------------------------------------------------------------------- speculative


@pytest.mark.parametrize("n_mtp", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_speculative_equals_greedy_on_random_models(n_mtp, seed):
    """Random MTP modules: nearly every draft is rejected, so every round rolls the cache back."""
    model = random_model(small_config(num_nextn_predict_layers=n_mtp), seed=seed)
    ids = prompt(6 + seed, seed)
    plain = generate(model, ids, 14).tokens
    for k in (1, 2, 3):
        spec = generate(model, ids, 14, speculative=True, num_draft=k)
        assert torch.equal(spec.tokens, plain), (k, spec.stats)
        assert spec.stats.drafted > 0 and len(spec.stats.acceptance_per_position) == k


@pytest.mark.parametrize("n_mtp", [1, 2])
def test_greedy_speculative_equals_greedy_when_drafts_are_accepted(n_mtp):
    """MTP modules that mostly agree: rounds accept several drafts and reject others (both paths exercised)."""
    model = agreeing_model(small_config(num_nextn_predict_layers=n_mtp))
    prompts = [prompt(8, 1), prompt(5, 2)]
    for ids in (prompts[0], prompts):  # one row, and a batch of different lengths
        plain = generate(model, ids, 30).tokens
        for k in (1, 2, 3):
            spec = generate(model, ids, 30, speculative=True, num_draft=k)
            assert torch.equal(spec.tokens, plain), (k, spec.stats)
            s = spec.stats
            assert 0 < s.accepted < s.drafted, s  # some drafts accepted, some rejected
            assert s.main_forwards == s.rounds + 1 and s.new_tokens == spec.tokens.numel()
            assert s.drafted == sum(s.drafted_per_position) and s.accepted == sum(s.accepted_per_position)
            assert s.acceptance_per_position[0] == s.accepted_per_position[0] / s.drafted_per_position[0]
            assert s.tokens_per_forward > 1.2 and s.main_forwards < 30
            if k > 1 and ids is prompts[0]:
                assert s.accepted_per_position[1] > 0, s  # rounds that kept two drafts or more


def test_speculative_with_stop_tokens_in_a_batch():
    model = agreeing_model(small_config(num_nextn_predict_layers=2))
    prompts = [prompt(8, 1), prompt(5, 2), prompt(11, 3)]
    plain = generate(model, prompts, 25)
    stop = int(plain.tokens[0, 6])
    ref = generate(model, prompts, 25, stop_tokens=[stop])
    spec = generate(model, prompts, 25, stop_tokens=[stop], speculative=True, num_draft=3)
    assert spec.sequences() == ref.sequences()
    assert spec.lengths[0] <= 7


def test_mtp_cache_layers_hold_what_a_fresh_pass_computes():
    """After speculative decoding, each MTP module's cache layer equals, over the positions whose inputs are all
    committed, a fresh pass of the chain h^k_i = MTP_k(h^{k-1}_i, t_{i+k}) over the final sequence."""
    cfg = small_config(num_nextn_predict_layers=2)
    model = agreeing_model(cfg)
    ids = prompt(7, 4)
    for k in (1, 2, 4):
        gen = generate(model, ids, 24, speculative=True, num_draft=k)
        seq = torch.cat([ids, gen.tokens[0]])[None]  # (1, T)
        T, L = seq.shape[1], cfg.num_hidden_layers
        fresh = model.new_cache(1, T)
        with torch.no_grad():
            h = model(seq, cache=fresh).hidden  # (1, T, D) = h^0
            pos = torch.arange(T)[None]
            for depth in (1, 2):
                h, _ = model.mtp_step(depth, h[:, : T - depth], seq[:, depth:], pos[:, : T - depth], fresh)
        for depth, n in enumerate(gen.mtp_lengths, 1):
            assert (n > T // 2) if k >= depth else (n == 0), (k, depth, n, T)  # kept up to date (or never used)
            assert torch.allclose(gen.cache.a[L + depth - 1][:, :n], fresh.a[L + depth - 1][:, :n], atol=1e-5)
            assert torch.allclose(gen.cache.b[L + depth - 1][:, :n], fresh.b[L + depth - 1][:, :n], atol=1e-5)


def test_speculative_sampling_keeps_the_distribution():
    """Sampled speculative decoding draws the first three tokens from the same distribution as plain sampling:
    both empirical distributions (3000 rows each) match the exact target computed by enumeration, while the
    draft model's own distribution is far from it (so accepting every draft would fail)."""
    V, temperature, top_k = 12, 1.0, 8
    cfg = small_config(vocab_size=V, num_nextn_predict_layers=1)
    model = random_model(cfg, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)  # peaked, distinct main and MTP distributions
    ids = prompt(4, 0, vocab=V)
    probs = lambda seqs: sampling_probs(model(seqs).logits[:, -1], temperature, top_k)  # (n, V)
    with torch.no_grad():
        p1 = probs(ids[None])[0]  # (V,)
        x = torch.arange(V)
        p2 = probs(torch.cat([ids.expand(V, 4), x[:, None]], 1))  # (V, V): p(x2 | x1)
        pairs = torch.cartesian_prod(x, x)  # (V*V, 2)
        p3 = probs(torch.cat([ids.expand(V * V, 4), pairs], 1)).view(V, V, V)  # p(x3 | x1, x2)
        seqs = torch.cat([ids.expand(V, 4), x[:, None]], 1)  # (V, 5): prompt, x1
        h = model(seqs).hidden  # (V, 5, D); the MTP at positions 0..3 reads h^0_i and t_{i+1}
        _, draft_logits = model.mtp_step(1, h[:, :4], seqs[:, 1:], torch.arange(4).expand(V, 4))
        q2 = sampling_probs(draft_logits[:, -1], temperature, top_k)  # (V, V): the MTP's guess of x2 given x1
    exact = [p1, p1 @ p2, torch.einsum("a,ab,abc->c", p1, p2, p3)]
    assert tv(p1 @ q2, exact[1]) > 0.2  # the draft distribution alone is clearly wrong

    B = 3000
    batch = ids.expand(B, 4)
    plain = generate(model, batch, 3, temperature=temperature, top_k=top_k, seed=1).tokens
    spec = generate(model, batch, 3, temperature=temperature, top_k=top_k, seed=2, speculative=True, num_draft=2)
    for t in range(3):
        for tokens in (plain, spec.tokens):
            assert tv(torch.bincount(tokens[:, t], minlength=V) / B, exact[t]) < 0.04, t
    assert 0 < spec.stats.accepted < spec.stats.drafted  # both the accept and the resample path were taken


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make,kwargs,message",
    [
        (lambda c: torch.zeros(1, 0, dtype=torch.long), {}, "prompt is empty"),
        (lambda c: [], {}, "prompt is empty"),
        (lambda c: [[3, 4], []], {}, "prompt 1 has no tokens"),
        (lambda c: torch.tensor([[5, c.vocab_size]]), {}, "token id 320, outside the vocabulary \\[0, 320\\)"),
        (lambda c: [[1, 2], [-1]], {}, "prompt 1 holds token id -1"),
        (
            lambda c: torch.zeros(1, 500, dtype=torch.long),
            {},
            "prompt length 500 \\+ max_new_tokens 20 = 520 exceeds max_position_embeddings=512",
        ),
        (lambda c: [1, 2], {"speculative": True}, "MTP modules, but this model has none"),
        (lambda c: [1, 2], {"temperature": -1.0}, "temperature must be >= 0"),
        (lambda c: [1, 2], {"top_p": 0.0}, "top_p must be in \\(0, 1\\]"),
        (lambda c: [1, 2], {"cache_kind": "paged"}, "cache_kind must be one of"),
        (lambda c: torch.zeros(2, 3), {}, "integer token ids"),
    ],
)
def test_bad_inputs(make, kwargs, message):
    cfg = small_config(num_nextn_predict_layers=0)
    model = random_model(cfg)
    with pytest.raises(ValueError, match=message):
        generate(model, make(cfg), 20, **kwargs)


def test_bad_generation_settings():
    model = random_model(small_config())
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 0"):
        generate(model, [1, 2], 0)
    with pytest.raises(ValueError, match="num_draft must be a positive integer, got 0"):
        generate(model, [1, 2], 4, speculative=True, num_draft=0)


# ---------------------------------------------------------------------------------------------- command line


def test_cli_streams_ids_and_stats(tmp_path, capsys):
    from dsv3.cli import main

    model = random_model(small_config(num_nextn_predict_layers=1))
    save_pretrained(model, tmp_path)
    ref = generate(model, [5, 6, 7], 6).sequences()[0]
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(tmp_path),
                "--prompt-ids",
                "5 6 7",
                "--max-new-tokens",
                "6",
                "--no-stop",
                "--speculative",
                "--num-draft",
                "2",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == [str(t) for t in [5, 6, 7] + ref]
    assert "tokens/forward" in lines[1] and "accepted" in lines[1]
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "hello"]) == 2  # vocab 320 != tokenizer
    assert "pass the prompt as --prompt-ids" in capsys.readouterr().err


def test_cli_decodes_with_the_bundled_tokenizer(tmp_path, capsys):
    from dsv3.cli import main
    from dsv3.data import load_tokenizer

    tok = load_tokenizer()
    model = random_model(small_config(vocab_size=len(tok), num_nextn_predict_layers=0))
    save_pretrained(model, tmp_path)
    text = "To be, or not"
    gen = generate(model, tok.encode(text), 8, stop_tokens=[model.config.eos_token_id])
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", text, "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(text + tok.decode(gen.sequences()[0]))
    assert f"{int(gen.lengths[0])} tokens in" in out
