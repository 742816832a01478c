"""Chapter 1's tables and figures (dsv3.viz.overview) against count_parameters, flops_per_token and a real model."""

import pytest
import torch

from dsv3 import DeepSeekV3, ModelConfig, count_parameters, flops_per_token
from dsv3.viz import overview
from helpers import small_config

V3 = ModelConfig.deepseek_v3()


def test_v3_preset_matches_every_value_the_paper_states():
    assert overview.paper_mismatches(V3) == []
    stated = [h for rows in overview.HYPERPARAMETERS.values() for h in rows if h.paper is not None]
    assert len(stated) >= 15
    bad = overview.paper_mismatches(V3.replace(kv_lora_rank=256))
    assert len(bad) == 1 and bad[0].startswith("kv_lora_rank")


def test_hyperparameter_table_rows_and_ratio():
    tiny = ModelConfig.tiny()
    table = overview.hyperparameter_table({"V3": V3, "tiny": tiny}, ratio=True).splitlines()
    n_rows = sum(len(rows) for rows in overview.HYPERPARAMETERS.values())
    assert len(table) == 2 + n_rows
    hidden = next(line for line in table if "`hidden_size`" in line)
    assert "| 7,168 | 256 | 28 |" in hidden
    assert overview.config_value(V3, "rope_scaling.factor") == 40.0
    assert overview.config_value(V3, "yarn_mscale") == pytest.approx(
        0.1 * torch.log(torch.tensor(40.0)).item() + 1, abs=1e-4
    )
    with_paper = overview.hyperparameter_table({"V3": V3}, paper=True)
    assert "| 1,536 | 1,536 |" in with_paper  # q_lora_rank: paper and preset


@pytest.mark.parametrize("include_mtp", [False, True])
def test_parameter_tree_sums_to_count_parameters(include_mtp):
    for cfg in (V3, ModelConfig.tiny()):
        parts = overview.parameter_parts(cfg, include_mtp=include_mtp)
        counts = count_parameters(cfg)
        root = parts[0]
        assert root.parent == "" and root.total == counts["total_with_mtp" if include_mtp else "total"]
        if not include_mtp:
            assert root.activated == counts["activated"]
        for p in parts:  # branchvalues="total": every inner node is the sum of its children
            children = [q for q in parts if q.parent == p.id]
            if children:
                assert p.total == sum(q.total for q in children) and p.activated == sum(q.activated for q in children)
            assert 0 <= p.activated <= p.total


def test_parameter_tree_equals_the_instantiated_model():
    cfg = small_config(first_k_dense_replace=2, num_hidden_layers=4)
    model = DeepSeekV3(cfg)
    parts = {p.id: p for p in overview.parameter_parts(cfg, include_mtp=True)}

    def numel(modules):
        return sum(p.numel() for m in modules for p in m.parameters())

    dense = [b for b in model.layers if not b.is_moe]
    moe = [b for b in model.layers if b.is_moe]
    assert len(dense) == 2 and len(moe) == 2
    assert parts["embedding"].total == model.embed_tokens.weight.numel()
    assert parts["output_head"].total == model.lm_head.weight.numel()
    assert parts["dense/attention"].total == numel(b.self_attn for b in dense)
    assert parts["dense/dense_ffn"].total == numel(b.mlp for b in dense)
    assert parts["moe/attention"].total == numel(b.self_attn for b in moe)
    assert parts["moe/router"].total == numel(b.mlp.gate for b in moe)
    assert parts["moe/routed_experts"].total == numel(b.mlp.experts for b in moe)
    assert parts["moe/routed_experts"].activated * cfg.n_routed_experts == (
        parts["moe/routed_experts"].total * cfg.num_experts_per_tok
    )
    assert parts["moe/shared_experts"].total == numel(b.mlp.shared_experts for b in moe)
    assert parts["moe/norms"].total == numel(m for b in moe for m in (b.input_layernorm, b.post_attention_layernorm))
    assert parts["mtp1"].total == numel(model.mtp)
    assert parts["DeepSeek-V3"].total == model.num_parameters()


def test_sunburst_views():
    fig = overview.parameter_sunburst(V3)
    assert len(fig.data) == 3 and [t.visible for t in fig.data] == [True, False, False]
    counts = count_parameters(V3)
    total, activated, with_mtp = (t.values[0] for t in fig.data)
    assert (total, activated, with_mtp) == (counts["total"], counts["activated"], counts["total_with_mtp"])
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.args[0]["visible"] for b in buttons] == [[True, False, False], [False, True, False], [False, False, True]]
    assert "671.03B" in buttons[0].label and "36.63B" in buttons[1].label


@pytest.mark.parametrize("seq_len", [1, 4096, 131072])
def test_token_flow_adds_up_to_flops_per_token(seq_len):
    for cfg in (V3, ModelConfig.tiny()):
        flow = overview.token_flow(cfg, seq_len)
        main = [s for s in flow if s.kind != "mtp"]
        assert sum(s.flops for s in main) == pytest.approx(flops_per_token(cfg, seq_len)["total"], rel=1e-12)
        assert sum(s.params for s in main) == count_parameters(cfg)["total"]
        assert sum(s.activated for s in main) == count_parameters(cfg)["activated"]
        kinds = [s.kind for s in flow]
        assert kinds == (
            ["embedding"]
            + ["dense"] * cfg.first_k_dense_replace
            + ["moe"] * cfg.num_moe_layers
            + ["head"]
            + ["mtp"] * cfg.num_nextn_predict_layers
        )
        mtp = [s for s in flow if s.kind == "mtp"]
        assert sum(s.params for s in mtp) == count_parameters(cfg)["mtp"]


def test_token_flow_table_merges_blocks():
    table = overview.token_flow_table(V3)
    assert "blocks 0–2 (3 x)" in table and "blocks 3–60 (58 x)" in table
    assert len(table.splitlines()) == 2 + 5  # embedding, dense, MoE, head, MTP


def test_token_flow_figure_slider_recomputes_attention():
    seq_lens = (4096, 131072)
    fig = overview.token_flow_figure(V3, seq_lens)
    steps = fig.layout.sliders[0].steps
    assert len(steps) == 2
    weights = sum(sum(t.y) for t in fig.data[:-1])  # one bar trace per kind of stage, constant over the slider
    assert [t.name for t in fig.data][-1].startswith("attention")
    assert sum(len(t.x) for t in fig.data[:-1]) == len(fig.data[-1].x) == len(overview.token_flow(V3))
    for T, step in zip(seq_lens, steps):
        (attention,) = step.args[0]["y"]
        assert list(step.args[2]) == [len(fig.data) - 1]  # the slider restyles the attention trace only
        total = (weights + sum(attention)) * 1e9
        flow_mtp = [s for s in overview.token_flow(V3, T) if s.kind == "mtp"]
        assert total == pytest.approx(flops_per_token(V3, T)["total"] + sum(s.flops for s in flow_mtp), rel=1e-9)


def test_flops_figure_traces():
    seq_lens = [1024, 32768]
    fig = overview.flops_figure(V3, seq_lens)
    assert len(fig.data) == 4
    for T, w, a in zip(seq_lens, fig.data[0].y, fig.data[1].y):
        f = flops_per_token(V3, T)
        assert w * 1e9 == pytest.approx(f["matmul"]) and a * 1e9 == pytest.approx(f["attention"])
        assert w * 1e9 == pytest.approx(2 * count_parameters(V3)["activated"])
    for T, w, a in zip(seq_lens, fig.data[2].y, fig.data[3].y):
        assert (w + a) * 1e9 == pytest.approx(flops_per_token(V3, T, training=True)["total"])


def test_headline_table_and_expert_heatmap():
    table = overview.headline_table(V3)
    assert "| total parameters (main model) | 671B | 671.03B |" in table
    counts = torch.tensor([[3, 0, 5], [1, 1, 6]])
    fig = overview.expert_counts_figure(counts, [1, 2])
    assert [list(r) for r in fig.data[0].z] == counts.tolist()
    assert list(fig.data[0].y) == ["layer 1", "layer 2"]
