"""The book's architecture diagrams: drawn from the config (change it and the labels change), one style that
reads in light and dark mode (transparent, theme text colour, translucent fills), self-contained."""

import json
import re

import plotly.graph_objects as go
import pytest

from dsv3.config import ModelConfig
from dsv3.viz import diagrams as dg
from dsv3.viz import mimebundle

V3, TINY = ModelConfig.deepseek_v3(), ModelConfig.tiny()


def all_diagrams(config):
    return {
        "stack": dg.block_stack_diagram(config),
        "mla": dg.mla_diagram(config),
        "paths": dg.mla_paths_diagram(config),
        "moe": dg.moe_diagram(config),
        "bias": dg.bias_loop_diagram(config, 0.001),
        "mtp": dg.mtp_diagram(config),
        "spec": dg.speculative_round_diagram(config),
        "place": dg.expert_placement_diagram(config, 4, 4),
        "fp8": dg.fp8_linear_diagram(config),
    }


def texts(fig: go.Figure) -> str:
    return " ".join(a.text or "" for a in fig.layout.annotations) + " " + (fig.layout.title.text or "")


def highlighted(fig: go.Figure) -> int:
    return sum(1 for s in fig.layout.shapes if s.line.width == 3)


@pytest.mark.parametrize("config", [V3, TINY], ids=["v3", "tiny"])
def test_every_diagram_has_one_style_for_light_and_dark(config):
    for name, fig in all_diagrams(config).items():
        assert isinstance(fig, go.Figure) and fig.layout.title.text, name
        layout = fig.to_plotly_json()["layout"]
        assert "paper_bgcolor" not in layout and "plot_bgcolor" not in layout, f"{name}: keep the theme's background"
        assert all("color" not in (a.font.to_plotly_json() if a.font else {}) for a in fig.layout.annotations), (
            f"{name}: text keeps the theme's colour (the site lightens it in dark mode)"
        )
        for shape in fig.layout.shapes:
            alpha = float(re.match(r"rgba\(.*,\s*([\d.]+)\)", shape.fillcolor).group(1))
            assert alpha <= 0.35, f"{name}: an opaque fill would hide the page's background"
        assert not fig.layout.xaxis.visible and not fig.layout.yaxis.visible
        assert "http" not in fig.to_json(), f"{name}: the site is offline"
        assert "text/html" in mimebundle(fig)


def test_labels_come_from_the_config():
    mla = texts(dg.mla_diagram(TINY))
    assert f"d<sub>c</sub> = {TINY.kv_lora_rank}" in mla and f"{TINY.num_attention_heads} × " in mla
    changed = texts(dg.mla_diagram(TINY.replace(kv_lora_rank=48)))
    assert "d<sub>c</sub> = 48" in changed and f"48 + {TINY.qk_rope_head_dim} = {48 + TINY.qk_rope_head_dim}" in changed
    stack = texts(dg.block_stack_diagram(V3))
    assert f"× {V3.first_k_dense_replace}" in stack and f"× {V3.num_moe_layers}" in stack
    assert f"{V3.vocab_size:,} × {V3.hidden_size:,}" in stack
    assert "γ = 0.001" in texts(dg.bias_loop_diagram(V3, 0.001))


def test_mla_highlights_exactly_the_cached_tensors():
    assert highlighted(dg.mla_diagram(V3)) == 2  # c^KV and k^R
    assert "576 numbers" in texts(dg.mla_diagram(V3))  # 512 + 64, from cache_elements_per_layer
    assert highlighted(dg.mla_diagram(V3.replace(q_lora_rank=None))) == 2


def test_paths_show_the_decode_cost_of_the_package():
    from dsv3.viz.mla import decode_cost

    cost = decode_cost(V3)
    t = texts(dg.mla_paths_diagram(V3))
    assert f"{cost['naive']['macs']:,} multiply-adds" in t and f"{cost['absorbed']['macs']:,} multiply-adds" in t


@pytest.mark.parametrize("config", [V3, TINY], ids=["v3", "tiny"])
def test_moe_highlights_one_real_routing(config):
    groups, experts = dg.example_routing(config)
    assert len(experts) == config.num_experts_per_tok and len(set(experts)) == len(experts)
    assert len(groups) <= config.topk_group  # group-limited routing, done by dsv3's Router
    assert all(e // config.experts_per_group in groups for e in experts)
    fig = dg.moe_diagram(config)
    assert highlighted(fig) == config.num_experts_per_tok
    expert_boxes = [s for s in fig.layout.shapes if s.type == "path"]
    assert len(expert_boxes) == config.n_routed_experts + 3  # the experts, u_t, router, shared expert


def test_mtp_chain_has_one_module_per_depth():
    for depth in (1, 3):
        fig = dg.mtp_diagram(TINY.replace(num_nextn_predict_layers=depth))
        t = texts(fig)
        assert all(f"MTP module {k}:" in t for k in range(1, depth + 1)) and f"MTP module {depth + 1}" not in t
        assert f"t<sub>i+{depth + 1}</sub>" in t
        assert "shared<br>embedding" in t and "shared<br>output head" in t


def test_speculative_round_drafts_and_verifies():
    fig = dg.speculative_round_diagram(V3, num_draft=3)
    t = texts(fig)
    assert t.count("d<sub>3</sub>") == 2 and "over 4 positions" in t
    assert "4 tokens this round" in t and "1 token this round" in t
    assert "1 draft token" in dg.speculative_round_diagram(V3).layout.title.text  # default: the MTP depth (1)


def test_expert_placement_puts_each_expert_once():
    fig = dg.expert_placement_diagram(V3)
    hovers = [h for h in fig.data[0].hovertext if h.startswith("GPU ")]
    assert len(hovers) == V3.n_group * 8
    groups, experts = dg.example_routing(V3)
    reached = [h for h in hovers if "reached" in h]
    assert len(reached) == len({e // (V3.n_routed_experts // 64) for e in experts})
    assert f"at most {V3.topk_group}" in fig.layout.title.text
    with pytest.raises(ValueError, match="do not split evenly"):
        dg.expert_placement_diagram(V3, nodes=3)


def test_diagrams_are_deterministic():
    assert json.dumps(all_diagrams(TINY)["moe"].to_plotly_json(), default=str) == json.dumps(
        all_diagrams(TINY)["moe"].to_plotly_json(), default=str
    )


def test_fp8_linear_highlights_the_cached_fp8_input():
    fig = dg.fp8_linear_diagram(V3)
    t = texts(fig)
    assert f"{V3.hidden_size} → {V3.moe_intermediate_size}" in fig.layout.title.text
    assert "1 × 128 tile" in t and "128 × 128 block" in t and "Fprop" in t and "Dgrad" in t and "Wgrad" in t
    assert highlighted(fig) == 1  # only the FP8 copy of the input is kept for the backward
    cached = [h for h in fig.data[0].hovertext if h.startswith("cached")]
    assert cached == ["cached for the backward: 1.031 bytes per element instead of 2 (52% of bf16) for 4,096 tokens"]
    assert (
        "moe_intermediate" not in t and str(TINY.moe_intermediate_size) in dg.fp8_linear_diagram(TINY).layout.title.text
    )
