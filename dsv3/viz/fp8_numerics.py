"""Chapter 7's FP8 numerics (paper Sec. 3.3.2, Fig. 7): how much e4m3 with fine-grained scales loses, for weights
(128 x 128 blocks), activations (1 x 128 tiles, with outlier channels) and the block-scaled GEMM, against bf16 and
one scale per tensor, computed with ``dsv3.kernels.fp8``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..checkpoint import FP8_BLOCK  # Sec. 3.3.2: 1 x 128 activation tiles, 128 x 128 weight blocks
from ..kernels import fp8
from .display import COLORS, figure, significant

# ---------------------------------------------------------------------------------------------------------------
# FP8 block quantization (Sec. 3.3.2, Fig. 7)
# ---------------------------------------------------------------------------------------------------------------


def fp8_example_weight(rows: int = 1024, cols: int = 768, seed: int = 0, spread: float = 1.2) -> torch.Tensor:
    """A synthetic weight whose magnitude varies by row and by column (log-normal gains with log-std `spread`, wider
    than in most trained layers, on purpose), so that 128 x 128 blocks need scales orders of magnitude apart."""
    g = torch.Generator().manual_seed(seed)
    row_gain = torch.exp(spread * torch.randn(rows, 1, generator=g))  # (rows, 1)
    col_gain = torch.exp(spread * torch.randn(1, cols, generator=g))  # (1, cols)
    return 0.02 * torch.randn(rows, cols, generator=g) * row_gain * col_gain  # (rows, cols)


def fp8_example_activation(
    width: int = 1024, seed: int = 0, outliers: Sequence[int] = (37, 300, 301), outlier_scale: float = 1000.0
) -> torch.Tensor:
    """One token's activation row with a few outlier channels (the case Sec. 3.3.2's fine-grained scaling is for)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(width, generator=g)  # (width,)
    x[list(outliers)] *= outlier_scale
    return x


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|approx - exact| / |exact| elementwise (exact == 0 entries are dropped)."""
    approx, exact = approx.double().flatten(), exact.double().flatten()
    keep = exact != 0
    return ((approx - exact).abs() / exact.abs())[keep]


def weight_errors(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Relative error of each weight in bf16, in e4m3 with 128 x 128 block scales, and in e4m3 with one scale
    for the whole tensor (a single block covering it)."""
    q, s = fp8.weight_quant(w)
    q1, s1 = fp8.weight_quant(w, block=max(w.shape))
    return {
        "bf16": relative_error(w.bfloat16(), w),
        "fp8, 128x128 blocks": relative_error(fp8.weight_dequant(q, s, dtype=torch.float32), w),
        "fp8, one scale per tensor": relative_error(
            fp8.weight_dequant(q1, s1, block=max(w.shape), dtype=torch.float32), w
        ),
    }


def fp8_scale_figure(w: torch.Tensor, block: int = FP8_BLOCK) -> go.Figure:
    """The `weight_scale_inv` grid of a weight: one fp32 scale per block x block block (log10 color, value text)."""
    _, s = fp8.weight_quant(w, block)
    z = [significant(row) for row in torch.log10(s).tolist()]
    text = [[f"{v:.1e}" for v in row] for row in s.tolist()]
    fig = figure(title=f"weight_scale_inv: one scale per {block} x {block} block", height=110 + 40 * s.shape[0])
    fig.add_trace(
        go.Heatmap(
            z=z,
            text=text,
            texttemplate="%{text}",
            colorscale="Viridis",
            xgap=2,
            ygap=2,
            x=[f"cols {j * block}-{min((j + 1) * block, w.shape[1]) - 1}" for j in range(s.shape[1])],
            y=[f"rows {i * block}-{min((i + 1) * block, w.shape[0]) - 1}" for i in range(s.shape[0])],
            colorbar=dict(title="log10 scale"),
            hovertemplate="%{y}, %{x}<br>scale %{text}<extra></extra>",
        )
    )
    fig.update_layout(yaxis=dict(autorange="reversed", showgrid=False), xaxis=dict(showgrid=False, tickangle=-30))
    return fig


def error_histogram_figure(
    errors: dict[str, torch.Tensor], lo: float = -7.0, hi: float = 0.5, bins: int = 75
) -> go.Figure:
    """Histograms of log10 relative error (counts precomputed, so the figure stays small). Errors below 10^lo
    (exact values included) fall into the first bin, errors of 10^hi or more (flushed to zero) into the last."""
    fig = figure(title="Relative error of each weight after rounding", height=460)
    width = (hi - lo) / bins
    centers = [round(lo + (i + 0.5) * width, 6) for i in range(bins)]
    colors = [COLORS["blue"], COLORS["green"], COLORS["red"]]
    for (name, err), color in zip(errors.items(), colors):
        logs = torch.log10(err.clamp_min(10**lo)).clamp(max=hi - 1e-9)
        counts = torch.histc(logs.float(), bins=bins, min=lo, max=hi)
        share = [round(v, 4) for v in (counts / err.numel() * 100).tolist()]
        fig.add_trace(
            go.Bar(
                x=centers,
                y=share,
                name=name,
                marker_color=color,
                opacity=0.65,
                width=width,
                hovertemplate="log10 error %{x:.2f}: %{y:.2f}% of weights<extra>" + name + "</extra>",
            )
        )
    ticks = list(range(math.ceil(lo), math.floor(hi) + 1))
    fig.update_layout(
        barmode="overlay",
        bargap=0,
        xaxis=dict(
            title="relative error |w<sub>q</sub> − w| / |w| (below 1e-7: first bar)",
            tickvals=ticks,
            ticktext=[f"1e{t}" if t else "1" for t in ticks],
        ),
        yaxis=dict(title="% of weights"),
        legend=dict(orientation="h", yanchor="top", y=-0.25, x=0),
    )
    return fig


def act_errors(x: torch.Tensor, block: int = FP8_BLOCK) -> dict[str, torch.Tensor]:
    """Per-channel relative error of one activation row x (K,) after the e4m3 round trip, with 1 x `block` tiles
    (``act_quant``) and with one scale for the whole row. Also returns the tile scales."""
    K = x.shape[-1]
    q, s = fp8.act_quant(x[None], block)  # (1, K), (1, K/block)
    q1, s1 = fp8.act_quant(x[None], K)  # one scale for the row
    tiled = fp8.act_dequant_torch(q, s, block)[0]  # (K,)
    whole = fp8.act_dequant_torch(q1, s1, K)[0]  # (K,)
    exact = x.double().abs()
    return {
        "1x128 tiles": (tiled.double() - x.double()).abs() / exact,
        "one scale per row": (whole.double() - x.double()).abs() / exact,
        "tile scales": s[0],
        "row scale": s1[0],
    }


def act_tiles_figure(x: torch.Tensor, block: int = FP8_BLOCK) -> go.Figure:
    """Top: |x| per channel and each 1 x `block` tile's amax (= scale x 448), against one amax for the row.
    Bottom: each channel's relative error after the e4m3 round trip against its magnitude relative to the scale
    it was divided by, for tile scales and for one scale per row: below 2^-6 (e4m3's smallest normal number)
    precision falls off."""
    K = x.shape[-1]
    errs = act_errors(x, block)
    fig = make_subplots(
        rows=2,
        cols=1,
        vertical_spacing=0.16,
        subplot_titles=(
            "|x| per channel, and the amax of each tile and of the row",
            "relative error against |x| / scale",
        ),
    )
    fig.update_layout(
        height=680,
        title=f"act_quant: one token, {K} channels, {K // block} tiles",
        legend=dict(orientation="h", yanchor="top", y=-0.1, x=0),
    )
    fig.add_trace(
        go.Scatter(
            x0=0,
            dx=1,
            y=significant(x.abs().tolist(), 3),
            mode="markers",
            name="|x|",
            marker=dict(size=3, color=COLORS["slate"]),
        ),
        row=1,
        col=1,
    )
    amax = significant((errs["tile scales"] * fp8.FP8_MAX).tolist(), 4)  # one per tile
    fig.add_trace(
        go.Scatter(
            x=[t * block for t in range(len(amax))] + [K - 1],
            y=amax + amax[-1:],
            mode="lines",
            line=dict(color=COLORS["blue"], shape="hv"),
            name="tile amax (scale x 448)",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=[0, K - 1],
            y=significant([float(errs["row scale"][0]) * fp8.FP8_MAX] * 2),
            mode="lines",
            line=dict(color=COLORS["red"], dash="dash"),
            name="row amax (one scale)",
        ),
        row=1,
        col=1,
    )
    tile_scale = errs["tile scales"].repeat_interleave(block)[:K]  # (K,) the scale each channel was divided by
    floor = 1e-5
    for name, scale, color in (
        ("1x128 tiles", tile_scale, COLORS["blue"]),
        ("one scale per row", errs["row scale"].expand(K), COLORS["red"]),
    ):
        fig.add_trace(
            go.Scatter(
                x=significant((x.abs() / scale).tolist(), 3),
                y=significant(errs[name].clamp_min(floor).tolist(), 3),
                mode="markers",
                marker=dict(size=4, color=color, opacity=0.6),
                name=f"error, {name}",
            ),
            row=2,
            col=1,
        )
    fig.add_trace(
        go.Scatter(
            x=[2**-6] * 2,
            y=[floor, 1.0],
            mode="lines",
            name="2<sup>-6</sup>: smallest normal",
            line=dict(color=COLORS["slate"], dash="dot", width=1),
        ),
        row=2,
        col=1,
    )
    fig.update_yaxes(type="log", row=1, col=1, title="|x|")
    fig.update_xaxes(title="channel", row=1, col=1)
    fig.update_yaxes(type="log", row=2, col=1, title="relative error")
    fig.update_xaxes(type="log", row=2, col=1, title="|x| / scale (the value e4m3 stores; at most 448)")
    return fig


def gemm_errors(
    m: int = 16, n: int = 128, k: int = 256, seed: int = 0, x_scale: float = 1.0, device: str = "cpu"
) -> dict:
    """Relative (Frobenius) error of y = x w^T against the exact (fp64) product, for: the FP8 block GEMM through
    the dispatcher (act_quant + fp8_gemm, on `device`), its torch reference (on the CPU), and a bf16 matmul."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * x_scale  # (m, k)
    w = fp8_example_weight(n, k, seed + 1)  # (n, k)
    exact = x.double() @ w.double().t()  # (m, n)
    wq, ws = fp8.weight_quant(w)
    a, sa = fp8.act_quant(x.to(device))
    fused = fp8.fp8_gemm(a, sa, wq.to(device), ws.to(device), out_dtype=torch.float32).cpu()  # (m, n)
    ref = fp8.fp8_gemm_torch(*fp8.act_quant_torch(x), wq, ws, out_dtype=torch.float32)  # (m, n)
    bf16 = (x.bfloat16() @ w.bfloat16().t()).float()  # (m, n)

    def rel(y):
        return float((y.double() - exact).norm() / exact.norm())

    return {
        "fp8_gemm": rel(fused),
        "fp8_gemm_torch": rel(ref),
        "bf16 matmul": rel(bf16),
        "fp8_gemm vs its reference": float((fused.double() - ref.double()).abs().max() / ref.abs().max()),
    }
