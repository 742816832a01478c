"""Figures of Chapter 9 ("Training across nodes", paper Sec. 2.1.2 and 3.2.2): what the node limit and the
deduplicated dispatch save on InfiniBand. The data come from ``dsv3.parallel.cost``; ``tests/test_viz_parallel.py``
checks them."""

from __future__ import annotations

import plotly.graph_objects as go

from ..config import ModelConfig
from .display import COLORS, figure


def node_limit_figure(rows: list[dict], config: ModelConfig) -> go.Figure:
    """IB bytes per token per MoE layer against the node limit M, one line per dispatch (deduplicated: one copy per
    remote node; per expert), from ``dsv3.parallel.cost.cost_rows(..., limits=range(1, n_group + 1))``; the
    config's ``topk_group`` is marked."""
    dispatches = ("deduplicated", "per expert")
    if not rows or {r["dispatch"] for r in rows} != set(dispatches):
        raise ValueError("node_limit_figure: expects cost_rows with both dispatches (deduplicated, per expert)")
    per_group = config.n_routed_experts // config.n_group
    fig = figure(
        title=f"IB traffic per token per MoE layer vs the node limit M ({config.n_routed_experts} experts, "
        f"top-{config.num_experts_per_tok}, {config.n_group} nodes)",
        height=380,
        xaxis=dict(title="node limit M (topk_group)", dtick=1),
        yaxis=dict(title="IB kilobytes per token", rangemode="tozero"),
        legend=dict(orientation="h", y=-0.25),
    )
    for dispatch, color in zip(dispatches, (COLORS["blue"], COLORS["slate"])):
        sel = sorted((r for r in rows if r["dispatch"] == dispatch), key=lambda r: r["M"])
        fig.add_scatter(
            x=[r["M"] for r in sel],
            y=[r["ib_bytes"] / 1e3 for r in sel],
            mode="lines+markers",
            name=f"{dispatch} ({'one copy per remote node' if dispatch == 'deduplicated' else 'one per expert'})",
            line=dict(color=color),
            customdata=[[r["ib_copies"], r["nodes"], r["M"] * per_group, r["ib_us"]] for r in sel],
            hovertemplate="M = %{x}: %{y:.1f} kB, %{customdata[0]:.2f} IB copies, %{customdata[1]:.2f} nodes, "
            "%{customdata[2]} candidate experts, %{customdata[3]:.3f} µs at 50 GB/s<extra></extra>",
        )
    fig.add_vline(
        x=config.topk_group,
        line=dict(color=COLORS["orange"], dash="dash"),
        annotation_text=f"V3: M = {config.topk_group}",
        annotation_position="top",
    )
    return fig
