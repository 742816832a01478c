"""Figures of Chapter 9 ("Training across nodes", paper Sec. 2.1.2, 3.2.1 and 3.2.2): what the node limit and the
deduplicated dispatch save on InfiniBand (data from ``dsv3.parallel.cost``), and the pipeline schedules a run
executed, laid out in time (``dsv3.parallel.pipeline.schedule_timeline``). ``tests/test_viz_parallel.py`` checks
them."""

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


PIPELINE_KINDS = {
    "F": ("forward", COLORS["blue"]),
    "B": ("backward (input and weights)", COLORS["orange"]),
    "I": ("backward: input gradient", COLORS["red"]),
    "W": ("backward: weight gradient", COLORS["green"]),
}


def pipeline_figure(timelines: dict[str, list[dict]], n_ranks: int) -> go.Figure:
    """One row per rank and schedule, one bar per action of ``schedule_timeline`` (colour: forward, backward, input
    or weight gradient; label: the micro-batch; hatched: the stages a DualPipeV rank holds on the way back up);
    the blank space is the bubble. ``timelines``: schedule name -> rows."""
    if not timelines:
        raise ValueError("pipeline_figure: no timelines given")
    names = list(timelines)
    rows_y = [f"{name} · rank {r}" for name in names for r in range(n_ranks)]
    end = max(r["end"] for rows in timelines.values() for r in rows)
    fig = figure(
        title="What each rank ran, laid out in time",
        height=120 + 46 * len(rows_y),
        barmode="overlay",
        xaxis=dict(title="time (1 = one rank's forward over its blocks on one micro-batch)", range=[0, end + 0.5]),
        yaxis=dict(categoryorder="array", categoryarray=list(reversed(rows_y)), title=None),
        legend=dict(orientation="h", y=1.0, yanchor="bottom", x=0),
        margin=dict(t=110),
    )
    shown = set()
    for name, rows in timelines.items():
        stages = max(r["stage"] for r in rows) + 1
        for kind, (label, color) in PIPELINE_KINDS.items():
            for back in (False, True):
                sel = [r for r in rows if r["kind"] == kind and (r["stage"] >= n_ranks) == back]
                if not sel:
                    continue
                fig.add_bar(
                    y=[f"{name} · rank {r['rank']}" for r in sel],
                    x=[r["end"] - r["start"] for r in sel],
                    base=[r["start"] for r in sel],
                    orientation="h",
                    name=label,
                    legendgroup=label,
                    showlegend=label not in shown,
                    marker=dict(
                        color=color,
                        line=dict(color="white", width=1),
                        pattern=dict(shape="/" if back else "", fillmode="overlay", fgcolor="white", fgopacity=0.45),
                    ),
                    text=[str(r["microbatch"]) for r in sel],
                    textposition="inside",
                    insidetextanchor="middle",
                    customdata=[[r["stage"], stages, r["microbatch"]] for r in sel],
                    hovertemplate=f"{label}: stage %{{customdata[0]}} of %{{customdata[1]}}, micro-batch "
                    "%{customdata[2]}, t = %{base} to %{x}<extra></extra>",
                )
                shown.add(label)
    return fig
