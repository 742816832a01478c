"""Chapter 7's pictures of the kernels' data layouts: the padded, expert-sorted rows of the fused MoE (drawn from
the kernel's own ``moe_align``) and the paged latent cache of MLA decoding, split across programs."""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
import torch

from ..kernels.backend import cdiv, load
from .display import COLORS, figure

# ---------------------------------------------------------------------------------------------------------------
# Layout pictures: fused MoE rows, paged and split latent cache
# ---------------------------------------------------------------------------------------------------------------


def moe_layout(topk_ids: torch.Tensor, n_experts: int, block_m: int) -> dict:
    """The fused MoE kernel's row layout, from the kernel's own ``moe_align``: for every row block, its expert and,
    for every row, the (token, slot) pair it holds (None for padding). Unused tail blocks are dropped."""
    sorted_pair, block_expert, _, _ = load("moe_triton").moe_align(topk_ids, n_experts, block_m)
    K = topk_ids.shape[1]
    NK = topk_ids.numel()
    blocks = []
    for b, e in enumerate(block_expert.tolist()):
        if e >= n_experts:
            continue
        rows = sorted_pair[b * block_m : (b + 1) * block_m].tolist()
        blocks.append(dict(expert=e, pairs=[(p // K, p % K) if p < NK else None for p in rows]))
    return dict(blocks=blocks, block_m=block_m, n_experts=n_experts, tokens=topk_ids.shape[0], top_k=K)


def moe_layout_figure(topk_ids: torch.Tensor, n_experts: int, block_m: int) -> go.Figure:
    """Each row of the heatmap is one tile of `block_m` rows handed to one program of the grouped GEMM: the pairs
    routed to one expert, padded to a multiple of the tile height."""
    lay = moe_layout(topk_ids, n_experts, block_m)
    E = n_experts
    z, text = [], []
    for blk in lay["blocks"]:
        z.append([blk["expert"] if p is not None else E for p in blk["pairs"]])  # E: padding
        text.append([f"t{p[0]}" if p is not None else "pad" for p in blk["pairs"]])
    palette = [COLORS[c] for c in ("blue", "orange", "green", "violet", "cyan", "pink", "lime", "red")]
    colors = [palette[e % len(palette)] for e in range(E)] + ["rgba(128, 128, 128, 0.25)"]
    scale = []
    for i, c in enumerate(colors):  # one flat band per category: experts 0..E-1, then padding
        scale += [[i / len(colors), c], [(i + 1) / len(colors), c]]
    labels = [f"tile {i}: expert {b['expert']}" for i, b in enumerate(lay["blocks"])]
    fig = figure(
        title=f"Fused MoE: {lay['tokens']} tokens x top-{lay['top_k']}, sorted by expert, tiles of {block_m} rows",
        height=80 + 34 * len(labels),
    )
    fig.add_trace(
        go.Heatmap(
            z=z,
            text=text,
            texttemplate="%{text}",
            y=labels,
            x=[f"row {i}" for i in range(block_m)],
            colorscale=scale,
            zmin=-0.5,
            zmax=E + 0.5,
            showscale=False,
            xgap=2,
            ygap=2,
            hovertemplate="%{y}, %{x}: %{text}<extra></extra>",
        )
    )
    fig.update_layout(
        yaxis=dict(autorange="reversed", showgrid=False), xaxis=dict(showgrid=False, side="top"), margin=dict(t=90)
    )
    return fig


def split_ranges(seq_len: int, num_splits: int, block_n: int) -> list[tuple[int, int]]:
    """The [start, end) slice of a sequence each split-KV program takes: splits of equal length rounded up to whole
    tiles of `block_n` positions (the partition of ``_mla_decode_kernel``); trailing splits may be empty."""
    split_len = cdiv(cdiv(seq_len, num_splits), block_n) * block_n
    return [(s * split_len, min((s + 1) * split_len, seq_len)) for s in range(num_splits)]


def paged_cache_figure(
    seq_lens: Sequence[int], page: int = 64, num_splits: int = 4, block_n: int = 32, seed: int = 0
) -> go.Figure:
    """A batch of sequences in a paged latent cache: each bar is one page of `page` positions, labeled with the pool
    block the block table maps it to (shuffled, as a serving engine's allocator leaves them) and colored by the
    split-KV program that reads it."""
    g = torch.Generator().manual_seed(seed)
    n_pages = [cdiv(s, page) for s in seq_lens]
    pool = torch.randperm(sum(n_pages) + 3, generator=g).tolist()
    palette = [COLORS[c] for c in ("blue", "orange", "green", "violet", "cyan", "pink")]
    fig = figure(
        title=f"Paged latent cache: pages of {page}, {num_splits} splits per sequence", height=140 + 48 * len(seq_lens)
    )
    at = 0
    shown = set()
    for b, L in enumerate(seq_lens):
        ranges = split_ranges(L, num_splits, block_n)
        for p in range(n_pages[b]):
            lo, hi = p * page, min((p + 1) * page, L)
            for s, (a, z) in enumerate(ranges):  # a page may be shared by two splits (tiles are smaller)
                a2, z2 = max(a, lo), min(z, hi)
                if a2 >= z2:
                    continue
                name = f"split {s}"
                fig.add_trace(
                    go.Bar(
                        y=[f"seq {b} ({L})"],
                        x=[z2 - a2],
                        base=[a2],
                        orientation="h",
                        name=name,
                        legendgroup=name,
                        showlegend=name not in shown,
                        marker=dict(color=palette[s % len(palette)], line=dict(width=1, color="white")),
                        text=[f"#{pool[at + p]}"] if a2 == lo else [""],
                        textposition="inside",
                        insidetextanchor="start",
                        hovertemplate=f"seq {b}, positions {a2}-{z2 - 1}<br>page {p} -> pool block {pool[at + p]}"
                        f"<br>split {s}<extra></extra>",
                    )
                )
                shown.add(name)
        at += n_pages[b]
    fig.update_layout(
        barmode="overlay",
        xaxis=dict(title="cached position"),
        yaxis=dict(autorange="reversed"),
        legend=dict(orientation="h", y=-0.25),
    )
    return fig
