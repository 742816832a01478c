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
