"""Chapter 5's helpers (dsv3.viz.mtp) against dsv3's own computations: the measured causal chain, the sharing of
embedding and head, the gradient paths, the lambda schedule and the agreement statistics."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dsv3.train import TrainConfig, mtp_weight_at
from dsv3.viz import mtp as vm
from helpers import random_model, small_config

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small ops run faster on one thread


@pytest.fixture(scope="module")
def model2():
    """A random model with two MTP depths (so the chain has more than one link)."""
    return random_model(small_config(num_nextn_predict_layers=2), seed=1)


def ids_of(n, seed=0, vocab=320):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_chain_figure_frames_match_the_chain():
    T = 6
    positions = [T, T - 1, T - 2]
    chain = vm.Chain(
        vm.Chain(torch.zeros(3, T, T, dtype=torch.bool), positions, 1.0, 0.0).expected(), positions, 1.0, 0.0
    )  # what Chapter 5's probe measures on a correct model
    labels = [f"t{j}" for j in range(T + 1)]
    fig = vm.chain_figure(chain, labels)
    assert len(fig.frames) == T and len(fig.layout.sliders[0].steps) == T
    for i, frame in enumerate(fig.frames):
        z = frame.data[0].z
        for k in range(3):
            if i >= chain.positions[k]:
                assert all(c == 0 for c in z[k])
                continue
            assert z[k][i + k + 1] == 3  # target
            assert z[k][i + k] == 2  # the token this depth reads through its embedding (the input for k = 0)
            assert [j for j in range(T) if z[k][j] in (1, 2)] == list(range(i + k + 1))
    with pytest.raises(ValueError, match="T \\+ 1 = 7"):
        vm.chain_figure(chain, labels[:-1])


def test_shared_embedding_and_head(model2):
    B, T = 2, 7
    ids = torch.stack([ids_of(T, 5), ids_of(T, 6)])
    calls = vm.shared_module_calls(model2, ids)
    D = model2.config.hidden_size
    assert calls == {
        "embed_tokens": [(B, T), (B, T - 1), (B, T - 2)],
        "lm_head": [(B, T, D), (B, T - 1, D), (B, T - 2, D)],
    }
    V = model2.config.vocab_size
    assert vm.vocab_sized_parameters(model2.mtp, V) == []
    assert vm.vocab_sized_parameters(model2, V) == ["embed_tokens.weight", "lm_head.weight"]
    assert not model2.embed_tokens._forward_hooks and not model2.lm_head._forward_hooks  # hooks removed


def test_gradient_norms_follow_the_graph(model2):
    ids = ids_of(8, 7)[None]
    labels = ids_of(8, 8)[None]
    norms = vm.gradient_norms(model2, ids, labels)
    assert norms["main_loss"]["MTP modules"] == 0.0
    assert all(v > 0 for v in norms["mtp_loss"].values())
    assert norms["main_loss"]["main blocks"] > 0
    # the shared head's norm from the main loss equals a direct autograd computation
    model2.zero_grad(set_to_none=True)
    model2(ids, labels=labels).main_loss.backward()
    assert math.isclose(
        norms["main_loss"]["shared output head"], float(model2.lm_head.weight.grad.norm()), rel_tol=1e-5
    )
    model2.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model2.parameters())


def test_lambda_schedule_and_table():
    cfg = TrainConfig(steps=148)
    lam = vm.lambda_schedule(cfg)
    assert lam == [mtp_weight_at(s, cfg) for s in range(148)]
    assert lam.count(0.3) == 100 and lam.count(0.1) == 48  # the switch at 10/14.8 of the steps
    assert vm.paper_lambda(0.0) == 0.3 and vm.paper_lambda(0.67) == 0.3 and vm.paper_lambda(0.68) == 0.1
    rows = {name: (paper, ours) for name, paper, ours in vm.schedule_table(cfg, 1)}
    assert rows["MTP depth D"] == ("1", "1")
    assert rows["switch after"][1].startswith("step 100 of 148")
    fig = vm.lambda_figure(cfg, [{"step": s + 1, "mtp_weight": w, "mtp_loss": 2.0} for s, w in enumerate(lam)])
    assert list(fig.data[1].y) == lam
    assert list(fig.data[3].y)[:2] == [0.6, 0.6] and list(fig.data[3].y)[-1] == 0.2  # lambda x L_MTP


def test_runs_figure_draws_each_run():
    hist = [{"step": s, "main_loss": 6.0 - s / 10, "mtp_weight": 0.3} for s in range(1, 11)]
    hist[4]["val_loss"], hist[4]["val_mtp_loss"] = 5.5, 5.7
    hist[9]["val_loss"], hist[9]["val_mtp_loss"] = 5.0, 5.1
    off = [dict(h, mtp_weight=0.0) for h in hist]
    fig = vm.runs_figure({"A": hist, "B": off})
    assert [t.name for t in fig.data] == [
        "A: train (smoothed)",
        "A: validation",
        "A: L<sub>Main</sub>",
        "A: L<sub>MTP</sub> (depth 1)",
        "B: train (smoothed)",
        "B: validation",
    ]
    assert list(fig.data[1].y) == [5.5, 5.0] and list(fig.data[3].y) == [5.7, 5.1]
    assert vm.smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])


def test_agreement_against_a_hand_computation(model2):
    T = 10
    batches = [
        SimpleNamespace(
            input_ids=torch.stack([ids_of(T, s), ids_of(T, s + 10)]),
            labels=torch.stack([ids_of(T, s + 20), ids_of(T, s + 30)]),
        )
        for s in (0, 1)
    ]
    stats = vm.mtp_agreement(model2, batches)
    assert len(stats) == 2
    with torch.no_grad():
        for k in (1, 2):
            agree = mtp_right = main_right = n = 0
            for b in batches:
                out = model2(b.input_ids, return_mtp=True)
                draft = out.mtp_logits[k - 1].argmax(-1)
                later = out.logits.argmax(-1)[:, k:]
                agree += int((draft == later).sum())
                mtp_right += int((draft == b.labels[:, k:]).sum())
                main_right += int((later == b.labels[:, k:]).sum())
                n += draft.numel()
            s = stats[k - 1]
            assert s["positions"] == n == 2 * 2 * (T - k)
            assert (s["agree"], s["mtp_acc"], s["main_acc"]) == (agree / n, mtp_right / n, main_right / n)
    fig = vm.agreement_figure({"x": stats[0]})
    assert [t.y[0] for t in fig.data] == [round(stats[0][k], 3) for k in ("main_acc", "mtp_acc", "agree")]


def test_token_labels_make_whitespace_visible():
    class Tok:
        def decode(self, ids):
            return {0: " the", 1: "\n", 2: ""}[ids[0]]

    assert vm.token_labels(Tok(), torch.tensor([0, 1, 2])) == ["␣the", "⏎", "∅"]


def test_alignment_claim_of_the_chapter(model2):
    """The chapter's statement: depth k's logits are (B, T-k, V) and their loss is the CE vs tokens shifted by k+1."""
    window = torch.stack([ids_of(12, 40), ids_of(12, 41)])
    ids, labels = window[:, :-1], window[:, 1:]
    with torch.no_grad():
        out = model2(ids, labels=labels)
    V = model2.config.vocab_size
    for k, lg in enumerate(out.mtp_logits, 1):
        assert lg.shape == (2, 11 - k, V)
        assert torch.allclose(out.mtp_losses[k - 1], F.cross_entropy(lg.reshape(-1, V), window[:, k + 1 :].reshape(-1)))
