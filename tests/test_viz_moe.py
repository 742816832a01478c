"""Chapter 3's figures and helpers (dsv3.viz.moe) against dsv3's own routing and the paper's arithmetic."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dsv3 import ModelConfig, balance
from dsv3.layers.moe import DeepSeekMoE
from dsv3.viz import moe as vm
from helpers import random_model, small_config

V3 = ModelConfig.deepseek_v3()


class ToyTokenizer:
    """Bytes as tokens (ids < 256), enough for sentence_routing on a small random model."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids) -> str:
        return bytes(ids).decode(errors="replace")


def _moe(cfg: ModelConfig, seed: int = 0) -> DeepSeekMoE:
    torch.manual_seed(seed)
    moe = DeepSeekMoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.1)
        moe.gate.e_score_correction_bias.normal_(0.0, 0.1)
    return moe


# --- fine-grained arithmetic -------------------------------------------------------------------------------------


def test_granularity_table_keeps_params_and_flops_and_counts_combinations():
    rows = vm.granularity_table(V3)
    assert [(r["experts"], r["width"], r["top_k"]) for r in rows] == [
        (32, 16384, 1),
        (64, 8192, 2),
        (128, 4096, 4),
        (256, 2048, 8),
    ]
    d = V3.hidden_size
    for r in rows:
        assert r["routed_params"] == 256 * 3 * d * 2048  # the released routed experts of one layer
        assert r["routed_flops"] == 2 * 8 * 3 * d * 2048
        assert r["router_params"] == r["experts"] * d
        assert r["combinations"] == math.comb(r["experts"], r["top_k"])
    assert rows[-1]["combinations"] == 409_663_695_276_000
    with pytest.raises(ValueError, match="does not divide"):
        vm.granularity_table(V3, splits=[3])
    md = vm.granularity_markdown(rows)
    assert "256 x 2,048 | 8 | 11.27 G" in md and md.count("\n") == len(rows) + 1


@pytest.mark.parametrize("E,G,M,K", [(8, 4, 2, 3), (12, 4, 2, 4), (16, 4, 2, 4), (8, 2, 1, 2), (6, 3, 3, 2)])
def test_group_limited_combinations_brute_force(E, G, M, K):
    size = E // G
    brute = sum(1 for c in itertools.combinations(range(E), K) if len({e // size for e in c}) <= M)
    assert vm.group_limited_combinations(E, G, M, K) == brute


def test_group_limit_allows_a_sixth_of_v3_sets():
    reachable = vm.group_limited_combinations(256, 8, 4, 8)
    assert 0.17 < reachable / math.comb(256, 8) < 0.18
    assert vm.group_limited_combinations(256, 8, 8, 8) == math.comb(256, 8)  # no limit: everything


def test_moe_table_lists_paper_values():
    md = vm.moe_table({"V3": V3, "tiny": ModelConfig.tiny()})
    assert "| `n_routed_experts` | $N_r$ | 256 | 256 | 16 |" in md
    assert "| `topk_group` | $M$ | 4 | 4 | 2 |" in md


# --- the router, step by step -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg", [small_config(), ModelConfig.tiny(), small_config(n_routed_experts=12, num_experts_per_tok=6, topk_group=2)]
)  # K_r/M = 3
def test_router_steps_reach_the_routers_decisions(cfg):
    moe = _moe(cfg, seed=3)
    x = torch.randn(50, cfg.hidden_size)
    with torch.no_grad():
        st = moe.gate.steps(x)
    weights, ids, scores = moe.gate(x)
    assert torch.equal(st["ids"], ids)
    assert torch.allclose(st["weights"], weights, atol=1e-6)
    assert torch.allclose(st["scores"], scores)
    assert (st["kept_groups"].sum(-1) == cfg.topk_group).all()
    # every chosen expert lies in a kept group; the group scores are sums of the top K_r/M of s + b
    size, top = cfg.n_routed_experts // cfg.n_group, cfg.num_experts_per_tok // cfg.topk_group
    assert st["per_group"] == top
    assert st["kept_groups"].gather(1, ids // size).all()
    by_hand = (st["scores"] + moe.gate.e_score_correction_bias).view(len(x), cfg.n_group, size)
    assert torch.allclose(st["group_scores"], by_hand.sort(-1, descending=True).values[..., :top].sum(-1))
    assert (balance.groups_per_token(ids, cfg.n_group, cfg.n_routed_experts) <= cfg.topk_group).all()


def test_group_routing_figure_frames_follow_the_tokens():
    cfg = ModelConfig.tiny()
    moe = _moe(cfg)
    with torch.no_grad():
        st = moe.gate.steps(torch.randn(6, cfg.hidden_size))
    fig = vm.group_routing_figure(st, tokens=range(4))
    assert len(fig.frames) == 4 and len(fig.layout.sliders[0].steps) == 4
    for t, frame in enumerate(fig.frames):
        bars, biased, groups = frame.data
        assert bars.y == tuple(round(v, 4) for v in st["scores"][t].tolist())
        assert biased.y == tuple(round(v, 4) for v in st["biased"][t].tolist())
        kept_labels = [i for i, txt in enumerate(groups.text) if txt == "kept"]
        assert kept_labels == st["kept_groups"][t].nonzero().flatten().tolist()
        outlined = [e for e, w in enumerate(bars.marker.line.width) if w > 0]
        assert outlined == sorted(st["ids"][t].tolist())


# --- a model's experts ------------------------------------------------------------------------------------------


def test_mutual_information():
    assert vm.mutual_information(torch.tensor([[5, 5, 5], [5, 5, 5]])) == pytest.approx(0.0, abs=1e-12)
    assert vm.mutual_information(torch.tensor([[4, 0], [0, 4]])) == pytest.approx(1.0)
    three = torch.tensor([[3, 0, 0], [0, 3, 0], [0, 0, 3]])
    assert vm.mutual_information(three) == pytest.approx(math.log2(3))
    partial = vm.mutual_information(torch.tensor([[3, 1], [1, 3]]))
    assert 0 < partial < 1


def test_domain_summary_and_rounded():
    lines = vm.domain_summary(torch.tensor([[6, 3, 1, 0], [0, 0, 5, 5]]), ["a", "b"], top=2)
    assert lines[0].startswith("a") and "0 (60%), 1 (30%)" in lines[0] and lines[0].endswith("under 1%: [3]")
    assert lines[1].endswith("[0, 1]")
    assert vm.rounded(torch.tensor([0.12345, 2.0]), 2) == [0.12, 2.0]
    assert vm.rounded(torch.tensor([[0.111, 0.999]]), 1) == [[0.1, 1.0]]
    assert vm.rounded(torch.tensor(1.2345), 2) == 1.23


class _Corpus:
    """The two methods domain_expert_loads uses, over random token streams."""

    def __init__(self, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.domains = ("low", "high")
        self.streams = {
            "low": torch.randint(0, vocab // 2, (200,), generator=g),
            "high": torch.randint(vocab // 2, vocab, (200,), generator=g),
        }

    def val_batches(self, batch_size, seq_len, max_batches=None, domain=None):
        from dsv3.data import val_batches

        return val_batches({domain: self.streams[domain]}, batch_size, seq_len, max_batches)


def test_domain_expert_loads_count_every_choice():
    cfg = small_config()
    model = random_model(cfg)
    loads = vm.domain_expert_loads(model, _Corpus(cfg.vocab_size), batch_size=2, seq_len=8, max_batches=2)
    assert loads.shape == (cfg.num_moe_layers, 2, cfg.n_routed_experts)
    assert (loads.sum(-1) == 2 * 2 * 8 * cfg.num_experts_per_tok).all()  # batches x rows x tokens x K
    corpus = _Corpus(cfg.vocab_size)
    batch = corpus.val_batches(2, 8, max_batches=1, domain="high")[0]
    with torch.no_grad():
        first = model(batch.input_ids).expert_counts
    assert (loads[:, 1] >= first).all()
    fig = vm.domain_expert_figure({"a": loads[0], "b": loads[1]}, corpus.domains)
    assert len(fig.data) == 2 and fig.data[0].visible and not fig.data[1].visible
    share = torch.tensor(fig.data[0].z)
    assert torch.allclose(share.sum(-1), torch.full((2,), 100.0), atol=0.2)


def test_sentence_routing_and_figures():
    cfg = small_config()
    model = random_model(cfg)
    info = vm.sentence_routing(model, ToyTokenizer(), "ab c\n")
    assert info["pieces"] == ["a", "b", " ", "c", "\n"] and info["layers"] == ["block 1", "block 2"]
    with torch.no_grad():
        out = model(torch.tensor([info["token_ids"]]))
    for mine, r in zip(info["ids"], out.routing):
        assert torch.equal(mine, r.topk_ids)
    heat = vm.token_expert_heatmap(info)
    assert len(heat.data) == cfg.num_moe_layers
    z = torch.tensor([[float("nan") if v is None else v for v in row] for row in heat.data[0].z])
    chosen = ~z.isnan()
    assert (chosen.sum(-1) == cfg.num_experts_per_tok).all()  # one gating weight per chosen expert
    assert torch.equal(chosen.nonzero()[:, 1].view(5, -1), info["ids"][0].sort(-1).values)
    assert torch.allclose(z.nan_to_num().sum(-1), torch.full((5,), cfg.routed_scaling_factor), atol=1e-2)
    assert heat.data[0].y[2] == "· (2)" and heat.data[0].y[4] == "↵ (4)"
    fig = vm.sentence_experts_figure(info)
    K = cfg.num_experts_per_tok
    assert len(fig.data) == cfg.num_moe_layers * K
    assert fig.data[0].y == tuple(info["ids"][0][:, 0].tolist())
    assert list(fig.layout.xaxis.ticktext) == ["a", "b", "·", "c", "↵"]
    buttons = fig.layout.updatemenus[0].buttons
    assert buttons[1].args[0]["visible"] == [False] * K + [True] * K
    with pytest.raises(ValueError, match="no tokens"):
        vm.sentence_routing(model, ToyTokenizer(), "")


def test_book_moe_config_is_tiny_layout():
    c = vm.book_moe_config()
    t = ModelConfig.tiny()
    for f in (
        "n_routed_experts",
        "n_shared_experts",
        "n_group",
        "topk_group",
        "num_experts_per_tok",
        "num_hidden_layers",
        "first_k_dense_replace",
        "vocab_size",
    ):
        assert getattr(c, f) == getattr(t, f)
    assert c.hidden_size == 64 and c.num_nextn_predict_layers == 0
    assert vm.book_moe_config(num_hidden_layers=2).num_moe_layers == 1


def test_sentence_table_and_widget():
    pytest.importorskip("ipywidgets")
    cfg = small_config()
    model = random_model(cfg)
    info = vm.sentence_routing(model, ToyTokenizer(), "ab c")
    table = vm.sentence_table_html(info)
    assert table.count("<tr>") == 1 + 4
    for ids in info["ids"]:
        for t in range(4):
            for e in ids[t].tolist():
                assert f"'>{e}</span>" in table
    box = vm.sentence_widget(model, ToyTokenizer(), "ab c", max_tokens=3)
    text, html = box.children
    assert html.value.startswith(vm.sentence_table_html(vm.sentence_routing(model, ToyTokenizer(), "ab ")))
    assert "first 3 tokens" in html.value
    text.value = ""
    assert "type some text" in html.value
