"""Chapter 9's figure (dsv3.viz.parallel) from dsv3.parallel.cost."""

from __future__ import annotations

import pytest

from dsv3 import ModelConfig
from dsv3.parallel import plan_topology
from dsv3.parallel.cost import cost_rows
from dsv3.viz.parallel import node_limit_figure


def test_node_limit_figure_plots_the_cost_rows():
    v3 = ModelConfig.deepseek_v3()
    topo = plan_topology(64, 64, v3.n_routed_experts, v3.n_group, ranks_per_node=8)
    rows = cost_rows(v3, topo, 14336, limits=range(1, 9), n_tokens=2048)
    fig = node_limit_figure(rows, v3)
    dedup, naive = fig.data
    assert list(dedup.x) == list(range(1, 9)) and list(naive.x) == list(range(1, 9))
    want = [r["ib_bytes"] / 1e3 for r in rows if r["dispatch"] == "deduplicated"]
    assert list(dedup.y) == pytest.approx(want)
    assert all(d <= n for d, n in zip(dedup.y, naive.y))  # deduplication never sends more
    assert fig.layout.shapes[0].x0 == v3.topk_group
    with pytest.raises(ValueError, match="both dispatches"):
        node_limit_figure([r for r in rows if r["dispatch"] == "deduplicated"], v3)


def test_pipeline_figure_draws_every_action_where_the_timeline_puts_it():
    from dsv3.parallel.pipeline import Action, schedule_timeline
    from dsv3.viz.parallel import pipeline_figure

    # 2 ranks, 2 micro-batches, 1F1B: rank 0 F0 F1 B0 B1; rank 1 F0 B0 F1 B1
    order = {
        0: [(0, "F", 0), (0, "F", 1), (0, "B", 0), (0, "B", 1)],
        1: [(1, "F", 0), (1, "B", 0), (1, "F", 1), (1, "B", 1)],
    }
    rows = schedule_timeline({r: [Action(*a, slot) for slot, a in enumerate(acts)] for r, acts in order.items()}, 2)
    fig = pipeline_figure({"1F1B": rows}, n_ranks=2)
    bars = [(y, base, width, text) for d in fig.data for y, base, width, text in zip(d.y, d.base, d.x, d.text)]
    assert len(bars) == len(rows) == 8
    want = {(f"1F1B · rank {r['rank']}", r["start"], r["end"] - r["start"], str(r["microbatch"])) for r in rows}
    assert set(bars) == want
    # rank 1's first forward waits for rank 0's: the bubble is drawn as a gap before it
    assert min(b for y, b, _, _ in bars if y.endswith("rank 1")) == 1.0
    with pytest.raises(ValueError, match="no timelines"):
        pipeline_figure({}, 2)
