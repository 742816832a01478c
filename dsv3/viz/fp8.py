"""The numerics behind the FP8 recipe (paper Sec. 3.3.2), measured: used by ``benchmarks/bench_fp8.py`` and
Chapter 10.

- Scaling granularity: the e4m3 round-trip error of per-tensor vs 1 x 128 (activations) / 128 x 128 (weights)
  scales, on the inputs of a trained model's linear layers, with and without injected outlier channels. One large
  value sets the scale of everything that shares it: per tensor, the small values fall below e4m3's range
  (subnormal or zero); per 1 x 128 tile only the outlier's own tile pays.
- Accumulation precision: an FP8 GEMM on the H800 keeps "around 14 bits" in its tensor-core accumulator (Sec.
  3.3.2). ``accumulate`` emulates such an accumulator, alone or with the fix of the paper (copy the partial sum to
  an fp32 register every 128 elements of K), and ``accumulation_errors`` measures the error against an exact sum
  as K grows (V3's K: 7168 = hidden size, 18432 = dense FFN width).

Chapter 10's figures: ``outlier_sweep`` + ``granularity_figure`` (per-tensor vs per-tile error as outliers grow),
``accumulation_figure`` (error vs K) and ``loss_curves_figure`` (an FP8 and an fp32 training run side by side).

Chapter 7's FP8 figures (Fig. 7 of the paper) close the module: how much e4m3 with fine-grained scales loses for
weights (128 x 128 blocks), activations (1 x 128 tiles, with outlier channels) and the block-scaled GEMM, against
bf16 and one scale per tensor, computed with ``dsv3.kernels.fp8``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..checkpoint import FP8_BLOCK  # Sec. 3.3.2: 1 x 128 activation tiles, 128 x 128 weight blocks
from ..fp8 import fp8_modules
from ..kernels import fp8
from ..kernels.fp8 import FP8_DTYPE, quantize_dequantize
from .display import COLORS, figure, significant

ACT_TILE = (1, 128)
WEIGHT_TILE = (128, 128)
V3_K = (7168, 18432)  # hidden size, dense FFN intermediate size of DeepSeek-V3


# ---------------------------------------------------------------------------------------------- granularity


def roundtrip_error(t: torch.Tensor, tile: tuple[int, int] | None) -> dict[str, float]:
    """Error of t (M, K) after e4m3 with one scale per ``tile`` (None: per tensor): ``rel_error`` = ||q - t|| / ||t||
    (Frobenius), ``median_rel`` = median over nonzero entries of |q - t| / |t|, ``underflow`` = share of nonzero
    entries that became 0."""
    t = t.float()
    q = quantize_dequantize(t, tile)
    nz = t != 0
    rel = ((q - t).abs() / t.abs())[nz]
    return {
        "rel_error": ((q - t).norm() / t.norm()).item(),
        "median_rel": rel.median().item() if rel.numel() else 0.0,
        "underflow": ((q == 0) & nz).float().sum().item() / max(int(nz.sum()), 1),
    }


def inject_outliers(x: torch.Tensor, n_channels: int = 4, factor: float = 100.0, seed: int = 0) -> torch.Tensor:
    """x (M, K) with ``n_channels`` random channels multiplied by ``factor``: the few huge channels that LLM
    activations develop (the case fine-grained scaling is for)."""
    g = torch.Generator().manual_seed(seed)
    channels = torch.randperm(x.shape[-1], generator=g)[:n_channels]
    out = x.clone()
    out[..., channels] *= factor
    return out


@torch.no_grad()
def linear_inputs(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every linear layer the FP8 recipe covers (attention projections, dense/shared FFN; MTP modules
    included), as (tokens, in_features), from one forward of ``model`` on ``input_ids``."""
    found, hooks = {}, []
    for name, module in fp8_modules(model).items():
        if isinstance(module, torch.nn.Linear):
            hooks.append(
                module.register_forward_hook(
                    lambda m, args, out, name=name: found.__setitem__(
                        name, args[0].detach().reshape(-1, args[0].shape[-1])
                    )
                )
            )
    try:
        model(input_ids, return_mtp=True)
    finally:
        for h in hooks:
            h.remove()
    return found


def granularity_table(tensors: Mapping[str, torch.Tensor], tile: tuple[int, int] = ACT_TILE) -> list[dict]:
    """One row per tensor: its round-trip errors with one scale per tensor and with one per ``tile``."""
    rows = []
    for name, t in tensors.items():
        per_tensor, fine = roundtrip_error(t, None), roundtrip_error(t, tile)
        rows.append(
            {
                "tensor": name,
                "shape": tuple(t.shape),
                "amax/rms": (t.abs().max() / t.float().pow(2).mean().sqrt()).item(),
                **{f"tensor {k}": v for k, v in per_tensor.items()},
                **{f"tile {k}": v for k, v in fine.items()},
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------- accumulation


def round_bits(v: torch.Tensor, bits: int, mode: str = "truncate") -> torch.Tensor:
    """v (float64) kept to ``bits`` significant bits: "truncate" (toward zero: low bits shifted out while aligning
    addends, as in a fixed-width adder) or "nearest"."""
    m, e = torch.frexp(v)  # v = m * 2^e, 0.5 <= |m| < 1
    scaled = m * 2.0**bits
    scaled = scaled.trunc() if mode == "truncate" else scaled.round()
    return torch.ldexp(scaled, e - bits)


def accumulate(
    a: torch.Tensor, b: torch.Tensor, bits: int | None = 14, promote_every: int | None = None, mode: str = "truncate"
) -> torch.Tensor:
    """Dot products of the rows of a (M, K) and b (N, K), summed one product at a time into an accumulator that
    keeps ``bits`` significant bits (None: exact, float64). ``promote_every`` = N_C: every N_C products the
    partial sum is added to an fp32 accumulator and restarts from zero (Sec. 3.3.2, N_C = 128). Returns (M, N)
    float64."""
    a, b = a.double(), b.double()
    M, K = a.shape
    N = b.shape[0]
    prods = (a.t()[:, :, None] * b.t()[:, None, :]).contiguous()  # (K, M, N) each exact: e4m3 x e4m3 in float64
    if bits is None:
        return prods.sum(0)
    total = torch.zeros(M, N, dtype=torch.float64)  # the fp32 register of the promotion
    part = torch.zeros(M, N, dtype=torch.float64)  # the limited tensor-core accumulator
    for k in range(K):
        part = round_bits(part + prods[k], bits, mode)
        if promote_every and (k + 1) % promote_every == 0:
            total = (total + part).float().double()
            part.zero_()
    return (total + part).float().double() if promote_every else part


def accumulation_errors(
    ks: Sequence[int] = (128, 512, 1024, 2048, 4096, 7168, 18432),
    bits: int = 14,
    interval: int = 128,
    outputs: int = 8,
    mode: str = "truncate",
    seed: int = 0,
) -> list[dict]:
    """For each K: the norm-wise relative error ||y - y_exact|| / ||y_exact|| of ``outputs`` x ``outputs`` dot
    products of e4m3 operands (1 x 128 tile scales applied to whole rows of random normal data), with a ``bits``
    accumulator alone and with promotion to fp32 every ``interval`` products."""
    rows = []
    for K in ks:
        g = torch.Generator().manual_seed(seed + K)
        a = torch.randn(outputs, K, generator=g).to(FP8_DTYPE).float()  # exact e4m3 values
        b = torch.randn(outputs, K, generator=g).to(FP8_DTYPE).float()
        exact = accumulate(a, b, None)
        rows.append(
            {
                "K": K,
                "limited": norm_error(accumulate(a, b, bits, None, mode), exact),
                "promoted": norm_error(accumulate(a, b, bits, interval, mode), exact),
                "fp32 matmul": norm_error((a @ b.t()).double(), exact),
            }
        )
    return rows


def norm_error(y: torch.Tensor, exact: torch.Tensor) -> float:
    """||y - exact|| / ||exact|| (Frobenius)."""
    return ((y - exact).norm() / exact.norm()).item()


def format_table(rows: Sequence[dict], digits: int = 4) -> str:
    """Rows of dicts as an aligned text table (floats in ``digits`` significant digits)."""
    keys = list(rows[0])
    table = [keys] + [[f"{r[k]:.{digits}g}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(keys))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


# ---------------------------------------------------------------------------------------------- figures


def outlier_sweep(
    tensors: Mapping[str, torch.Tensor],
    factors: Sequence[float] = (1.0, 1e2, 1e3, 1e4, 1e5),
    n_channels: int = 4,
    tile: tuple[int, int] = ACT_TILE,
) -> list[dict]:
    """For each outlier ``factor`` (1: the tensors as they are): the round-trip errors of every tensor after
    ``inject_outliers`` (seed = the tensor's position), per tensor and per ``tile``, averaged over the tensors."""
    rows = []
    for factor in factors:
        table = granularity_table(
            {
                n: inject_outliers(t, n_channels, factor, seed=i) if factor != 1 else t
                for i, (n, t) in enumerate(tensors.items())
            },
            tile,
        )
        keys = [k for k in table[0] if k.startswith(("tensor ", "tile "))]
        rows.append({"factor": float(factor), **{k: sum(r[k] for r in table) / len(table) for k in keys}})
    return rows


def granularity_figure(rows: Sequence[dict], title: str = "") -> go.Figure:
    """``outlier_sweep`` rows: median elementwise relative error and share of values flushed to zero, one scale per
    tensor vs one per tile, against the outliers' factor (log axes)."""
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.12,
        subplot_titles=("median relative error", "share of values that become 0"),
    )
    x = [r["factor"] for r in rows]
    for col, metric in ((1, "median_rel"), (2, "underflow")):
        for scope, color, label in (
            ("tensor", COLORS["red"], "one scale per tensor"),
            ("tile", COLORS["blue"], "one scale per 1 × 128 tile"),
        ):
            fig.add_scatter(
                x=x,
                y=significant([r[f"{scope} {metric}"] for r in rows]),
                mode="lines+markers",
                name=label,
                legendgroup=scope,
                showlegend=col == 1,
                line=dict(color=color),
                row=1,
                col=col,
            )
    fig.update_xaxes(type="log", title="outlier factor (4 channels × factor)")
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(tickformat=".0%", row=1, col=2)
    fig.update_layout(
        title=title or "e4m3 round trip of the linear layers' inputs, outliers injected",
        height=380,
        legend=dict(orientation="h", y=-0.25),
    )
    return fig


def accumulation_figure(rows: Sequence[dict], bits: int = 14, interval: int = 128) -> go.Figure:
    """``accumulation_errors`` rows: relative error of a ``bits``-bit accumulator alone and promoted to fp32 every
    ``interval`` products, against K (log-log), with V3's two inner dimensions marked."""
    fig = figure(
        title=f"Accumulating e4m3 products: {bits}-bit accumulator vs promotion every {interval}",
        height=380,
        xaxis=dict(type="log", title="inner dimension K"),
        yaxis=dict(type="log", title="relative error ‖y − y<sub>exact</sub>‖ / ‖y<sub>exact</sub>‖"),
        legend=dict(orientation="h", y=-0.25),
    )
    ks = [r["K"] for r in rows]
    for key, color, label in (
        ("limited", COLORS["red"], f"{bits}-bit accumulator only"),
        ("promoted", COLORS["blue"], f"promoted to fp32 every {interval}"),
    ):
        fig.add_scatter(
            x=ks, y=significant([r[key] for r in rows]), mode="lines+markers", name=label, line=dict(color=color)
        )
    for K, what in zip(V3_K, ("hidden size", "dense FFN width")):
        if min(ks) <= K <= max(ks):
            fig.add_vline(x=K, line=dict(color=COLORS["slate"], dash="dot", width=1))
            fig.add_annotation(
                x=math.log10(K), y=1, yref="paper", text=f"V3 {what}<br>K = {K:,}", showarrow=False, yanchor="bottom"
            )
    return fig


def loss_curves_figure(histories: Mapping[str, Sequence[dict]], title: str = "") -> go.Figure:
    """Training runs side by side: the training loss per step (lines) and the validation loss (markers), one
    colour per run (``{"fp32": result.history, "FP8": ...}``)."""
    palette = [COLORS["slate"], COLORS["orange"], COLORS["blue"], COLORS["green"]]
    fig = figure(
        title=title or "Training loss, FP8 recipe vs fp32",
        height=380,
        xaxis=dict(title="step"),
        yaxis=dict(title="loss (cross-entropy, nats)"),
        legend=dict(orientation="h", y=-0.25),
    )
    for (label, history), color in zip(histories.items(), palette):
        fig.add_scatter(
            x=[h["step"] for h in history],
            y=significant([h["main_loss"] for h in history]),
            mode="lines",
            name=f"{label} train",
            line=dict(color=color),
        )
        val = [h for h in history if "val_loss" in h]
        fig.add_scatter(
            x=[h["step"] for h in val],
            y=significant([h["val_loss"] for h in val]),
            mode="markers",
            name=f"{label} validation",
            marker=dict(color=color, size=9, symbol="diamond"),
        )
    return fig


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
