"""Chapter 6's helpers (dsv3.viz.speculative) against dsv3.generate: traced rounds, the acceptance sweep, the
accept/resample rule (exact and Monte Carlo), and plain vs speculative sampling of a model."""

from __future__ import annotations

import pytest
import torch
from test_generate import agreeing_model, prompt

from dsv3.generate import generate
from dsv3.viz import speculative as vs
from helpers import random_model, small_config

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small ops run faster on one thread


@pytest.fixture(scope="module")
def model():
    """MTP modules that mostly agree with the main model: rounds accept some drafts and reject others."""
    return agreeing_model(small_config(num_nextn_predict_layers=1))


class Tok:
    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_trace_reads_the_rounds_of_generate(model, k):
    ids = prompt(8, 1)
    tr = vs.trace(model, ids, 24, num_draft=k)
    plain = generate(model, ids, 24).tokens[0].tolist()
    assert tr.tokens() == tr.generation.tokens[0].tolist() == plain
    assert len(tr.rounds) == tr.generation.stats.rounds
    accepted = [r.accepted for r in tr.rounds]
    assert sum(accepted) == tr.generation.stats.accepted
    assert any(a > 0 for a in accepted) and any(a < len(r.drafts) for a, r in zip(accepted, tr.rounds))
    for r in tr.rounds:
        assert len(r.verified) == len(r.inputs) <= k + 1
        assert r.drafts[: r.accepted] == r.verified[: r.accepted]  # accepted drafts are the main model's argmax
        assert r.next == r.verified[r.accepted]
        if r.accepted < len(r.drafts):
            assert r.drafts[r.accepted] != r.next  # the first rejected draft is replaced
    # each round starts from the token the previous one ended with
    for a, b in zip(tr.rounds, tr.rounds[1:]):
        assert b.committed == a.next and b.start == a.start + len(a.emitted)
    text = vs.rounds_text(tr, Tok())
    assert text.count("|") == len(tr.rounds)
    assert text.replace("|", "").startswith(Tok().decode(tr.tokens()))  # the last round may run past the budget
    with pytest.raises(ValueError, match="temperature must be 0"):
        vs.trace(model, ids, 4, temperature=1.0)
    assert "forward" not in vars(model)  # the wrapper is gone


def test_round_figure_cells(model):
    tr = vs.trace(model, prompt(8, 1), 24, num_draft=3)
    fig = vs.round_figure(tr, Tok())
    assert len(fig.frames) == len(tr.rounds)
    for r, frame in zip(tr.rounds, fig.frames):
        text, z = frame.data[0].text, frame.data[0].z
        assert text[0][0] == f"<{r.committed}>"
        outcomes = [t for t in text[2][1:] if t]
        assert outcomes.count("accepted") == r.accepted
        assert outcomes.count("correction") + outcomes.count("bonus") == 1
        assert text[2][0] == f"+{r.accepted + 1} token" + ("s" if r.accepted else "")
        assert z[0][r.accepted + 1] == (3 if r.accepted < len(r.drafts) else 0)  # the rejected draft is red
    assert "2 accepted" in vs.describe_round(
        vs.Round(start=1, inputs=[5, 6, 7, 8], verified=[6, 7, 9, 3], accepted=2, next=9), Tok()
    )


def test_acceptance_sweep_equals_the_stats_of_generate(model):
    prompts = [prompt(8, 1).tolist(), prompt(6, 2).tolist()]
    sweeps = vs.acceptance_sweep(model, prompts, 20, drafts=(1, 2))
    assert sweeps[0].tokens_per_forward == 1.0 and sweeps[0].acceptance_per_position == []
    for k in (1, 2):
        s = sweeps[k]
        assert s.equal_to_greedy
        stats = [generate(model, p, 20, speculative=True, num_draft=k).stats for p in prompts]
        assert s.main_forwards == sum(st.main_forwards for st in stats)
        assert s.accepted_per_position == [sum(st.accepted_per_position[j] for st in stats) for j in range(k)]
        assert s.tokens_per_forward == 40 / s.main_forwards > 1.2
    fig = vs.sweep_figure(sweeps)
    measured = [t for t in fig.data if t.name == "measured"][0]
    assert list(measured.y) == [round(sweeps[k].tokens_per_forward, 3) for k in (0, 1, 2)]


def test_sweep_flags_a_lossy_decoder(model, monkeypatch):
    """If speculative decoding changed a token, equal_to_greedy says so (the check can fail)."""
    real = vs.generate

    def lossy(m, ids, n, speculative=False, **kw):
        gen = real(m, ids, n, speculative=speculative, **kw)
        if speculative:
            gen.tokens[0, -1] = (gen.tokens[0, -1] + 1) % m.config.vocab_size
        return gen

    monkeypatch.setattr(vs, "generate", lossy)
    assert not vs.acceptance_sweep(model, [prompt(8, 1).tolist()], 12, drafts=(1,))[1].equal_to_greedy


def test_accept_resample_is_exact_for_random_pairs():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = torch.rand(7, generator=g) * (torch.rand(7, generator=g) > 0.3)
        q = torch.rand(7, generator=g) * (torch.rand(7, generator=g) > 0.3)
        p, q = p / p.sum(), q / q.sum()
        ex = vs.accept_resample(p, q)
        assert torch.allclose(ex["output"], p.double(), atol=1e-12)
        assert torch.isclose(ex["acceptance"], 1 - 0.5 * (p - q).abs().sum().double(), atol=1e-12)  # 1 - TV


def test_monte_carlo_uses_the_rule_of_generate():
    p = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0])
    q = torch.tensor([0.1, 0.4, 0.2, 0.0, 0.3])
    mc = vs.monte_carlo(p, q, 100_000, seed=1)
    assert vs.total_variation(mc["output"], p) < 0.01
    assert abs(float(mc["acceptance"]) - 0.5) < 0.01
    assert torch.allclose(mc["kept"], torch.minimum(p, q).double(), atol=0.01)
    assert mc["output"][4] == 0  # never emitted: p(e) = 0
    fig = vs.accept_resample_figure(p, q, list("abcde"), mc)
    kept, resampled = fig.data[1], fig.data[2]
    assert [round(a + b, 4) for a, b in zip(kept.y, resampled.y)] == [round(v, 4) for v in p.tolist()]
    assert list(resampled.base) == list(kept.y)


def test_frequencies_is_the_empirical_distribution():
    freq = vs.frequencies(torch.tensor([0, 2, 2, 1]), 5)
    assert freq.dtype == torch.float64 and freq.tolist() == [0.25, 0.25, 0.5, 0.0, 0.0]


def test_exact_first_tokens_by_enumeration():
    cfg = small_config(vocab_size=12, num_nextn_predict_layers=1)
    m = random_model(cfg, seed=3)
    ids = prompt(4, 0, vocab=12).tolist()
    p1, p2 = vs.exact_first_tokens(m, ids, temperature=1.0, top_k=0)
    with torch.no_grad():
        ref1 = m(torch.tensor([ids])).logits[0, -1].softmax(-1).double()
        ref2 = sum(ref1[x] * m(torch.tensor([ids + [x]])).logits[0, -1].softmax(-1).double() for x in range(12))
    assert torch.allclose(p1, ref1, atol=1e-6) and torch.allclose(p2, ref2, atol=1e-6)
    p1k, _ = vs.exact_first_tokens(m, ids, temperature=1.0, top_k=3)
    assert int((p1k > 0).sum()) == 3


def test_first_tokens_match_the_exact_distribution():
    """Plain and speculative sampling of a small model both match the enumeration (the check has teeth: the draft
    module's own distribution is far from the target)."""
    cfg = small_config(vocab_size=12, num_nextn_predict_layers=1)
    m = random_model(cfg, seed=3)
    with torch.no_grad():
        m.lm_head.weight.mul_(12.0)
    ids = prompt(4, 0, vocab=12).tolist()
    exact = vs.exact_first_tokens(m, ids, temperature=1.0, top_k=8)
    samples = vs.first_tokens(m, ids, n=3000, num_tokens=2, temperature=1.0, top_k=8, seed=0)
    assert 0 < float(samples["acceptance"]) < 1
    for t in range(2):
        for name in ("plain", "speculative"):
            freq = torch.bincount(samples[name][:, t], minlength=12).double() / 3000
            assert vs.total_variation(freq, exact[t]) < 0.04, (t, name)
    fig = vs.first_tokens_figure(samples, exact, Tok(), top=5)
    assert len(fig.data) == 6 and len(fig.layout.updatemenus[0].buttons) == 2
    assert [t.visible for t in fig.data] == [True, True, True, False, False, False]
