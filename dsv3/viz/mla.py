"""Figures and small helpers of Chapter 2, Multi-head Latent Attention (paper Sec. 2.1.1, Eq. 1-11; Sec. 4.3).

Everything here computes with ``dsv3``: cache sizes come from ``dsv3.kv_cache_bytes``, RoPE/YaRN frequencies from
``dsv3.layers.rope.yarn_inv_freq``, rotations from ``RotaryEmbedding.apply``, intermediates from hooks on a real
``DeepSeekV3`` forward pass and decode timings from a real cache. The chapter calls these and explains what it sees.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..accounting import kv_cache_bytes
from ..config import ModelConfig
from ..layers.rope import RotaryEmbedding, yarn_inv_freq
from .display import COLORS, theme

KIND_COLORS = {"MHA": COLORS["red"], "GQA": COLORS["orange"], "MQA": COLORS["green"], "MLA": COLORS["blue"]}
DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "fp32": torch.float32}
H800_BYTES = 80 * 10**9  # HBM of one H800, the GPU DeepSeek-V3 was trained and served on (Sec. 3.1)

# Table 1 of "Insights into DeepSeek-V3" (Zhao et al., ISCA 2025, arXiv 2505.09343): KV cache per token in bf16.
# Attention shapes of the two comparison models from their released configs: layers, query heads, KV heads, head dim.
PAPER_KV_PER_TOKEN_KB = {"DeepSeek-V3 (MLA)": 70.272, "Qwen-2.5 72B (GQA)": 327.680, "LLaMA-3.1 405B (GQA)": 516.096}
GQA_MODELS = {"Qwen-2.5 72B (GQA)": (80, 64, 8, 128), "LLaMA-3.1 405B (GQA)": (126, 128, 8, 128)}


# ---------------------------------------------------------------------------------------------------------------
# What each attention kind caches
# ---------------------------------------------------------------------------------------------------------------


def gqa_groups(config: ModelConfig) -> int:
    """The GQA group count the chapter compares with: 8 key/value heads (LLaMA-3, Qwen-2.5), or half the heads."""
    H = config.num_attention_heads
    return 8 if H > 8 and H % 8 == 0 else max(H // 2, 1)


def attention_variants(config: ModelConfig) -> list[tuple[str, str, int | None]]:
    """``(label, kind, groups)`` for MHA, GQA-g, MQA and MLA, in the order of decreasing cache."""
    g = gqa_groups(config)
    return [("MHA", "mha", None), (f"GQA-{g}", "gqa", g), ("MQA", "mqa", None), ("MLA", "mla", None)]


def _family(label: str) -> str:
    return label.split("-")[0]


def cache_elements_per_layer(config: ModelConfig, kind: str, groups: int | None = None) -> int:
    """Cached numbers per token and layer: ``kv_cache_bytes`` for one token, divided by layers and element size."""
    return kv_cache_bytes(config, 1, dtype=torch.uint8, attention=kind, groups=groups) // config.num_hidden_layers


def cache_table(configs: dict[str, ModelConfig], dtype: torch.dtype = torch.bfloat16) -> str:
    """Markdown table: what each attention kind caches per token and layer, and bytes per token, for each config."""
    element = torch.empty((), dtype=dtype).element_size()
    what = {
        "MHA": "$n_h$ keys $(d_h + d_h^R)$ + $n_h$ values $d_h$",
        "GQA": "$n_g$ keys + $n_g$ values",
        "MQA": "1 key + 1 value",
        "MLA": "$\\mathbf{c}^{KV}_t$ ($d_c$) + $\\mathbf{k}^R_t$ ($d_h^R$)",
    }
    header = ["attention", "cached per token and layer"]
    for name in configs:
        header += [f"{name}: numbers/layer", f"{name}: bytes/token", f"{name}: × MLA"]
    rows = []
    for i, family in enumerate(("MHA", "GQA", "MQA", "MLA")):
        labels, cells = [], []
        for cfg in configs.values():
            label, kind, g = attention_variants(cfg)[i]
            n = kv_cache_bytes(cfg, 1, dtype=dtype, attention=kind, groups=g)
            mla = kv_cache_bytes(cfg, 1, dtype=dtype, attention="mla")
            labels.append(label)
            cells += [f"{n // (element * cfg.num_hidden_layers):,}", f"{n:,}", f"{n / mla:.2f}"]
        rows.append([" / ".join(dict.fromkeys(labels)), what[family]] + cells)
    return markdown_table(header, rows)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table (the chapter shows it with ``IPython.display.Markdown``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def gqa_model_config(num_layers: int, num_heads: int, head_dim: int) -> ModelConfig:
    """A ModelConfig with another model's attention shape (only what ``kv_cache_bytes`` reads: layers, heads and
    head widths; keys of width ``head_dim``, split evenly between the two parts our config names)."""
    return ModelConfig.deepseek_v3().replace(
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        qk_nope_head_dim=head_dim // 2,
        qk_rope_head_dim=head_dim // 2,
        v_head_dim=head_dim,
    )


def paper_kv_comparison() -> list[tuple[str, float, int]]:
    """``(model, paper KB per token, dsv3 bytes per token)`` for the three rows of the Insights paper's Table 1."""
    rows = [
        ("DeepSeek-V3 (MLA)", PAPER_KV_PER_TOKEN_KB["DeepSeek-V3 (MLA)"], kv_cache_bytes(ModelConfig.deepseek_v3(), 1))
    ]
    for name, (layers, heads, kv_heads, head_dim) in GQA_MODELS.items():
        cfg = gqa_model_config(layers, heads, head_dim)
        rows.append((name, PAPER_KV_PER_TOKEN_KB[name], kv_cache_bytes(cfg, 1, attention="gqa", groups=kv_heads)))
    return rows


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, 3 significant digits)."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} {units[i]}" if i == 0 else f"{n:.3g} {units[i]}"


def _byte_ticks(lo: float, hi: float, step: int = 5) -> dict:
    """Log-axis ticks at every 2**step bytes between lo and hi, labelled in binary units (1 KiB, 32 KiB, 1 MiB)."""
    exps = range(int(math.floor(math.log2(max(lo, 1)) / step)), int(math.ceil(math.log2(hi) / step)) + 1)
    vals = [2 ** (step * e) for e in exps]
    return dict(tickvals=vals, ticktext=[human_bytes(v) for v in vals])


def cache_per_token_figure(configs: dict[str, ModelConfig], dtype: torch.dtype = torch.bfloat16) -> go.Figure:
    """Bars: KV-cache bytes per token (all layers) for MHA, GQA, MQA and MLA, one panel per config (log scale)."""
    names = list(configs)
    fig = make_subplots(
        rows=1,
        cols=len(names),
        subplot_titles=[
            f"{n}: {c.num_hidden_layers} layers, {c.num_attention_heads} heads" for n, c in configs.items()
        ],
    )
    for col, (name, cfg) in enumerate(configs.items(), 1):
        labels, values = [], []
        for label, kind, g in attention_variants(cfg):
            labels.append(label)
            values.append(kv_cache_bytes(cfg, 1, dtype=dtype, attention=kind, groups=g))
        fig.add_trace(
            go.Bar(
                x=labels,
                y=values,
                marker_color=[KIND_COLORS[_family(lb)] for lb in labels],
                text=[human_bytes(v) for v in values],
                textposition="outside",
                showlegend=False,
                hovertemplate="%{x}: %{y:,} bytes per token<extra>" + name + "</extra>",
            ),
            row=1,
            col=col,
        )
        fig.update_yaxes(
            type="log",
            row=1,
            col=col,
            range=[math.log10(min(values)) - 0.3, math.log10(max(values)) + 0.5],
            **_byte_ticks(min(values), max(values)),
        )
    dname = {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))
    fig.update_layout(template=theme, height=380, title=f"KV cache per token, all layers ({dname})")
    fig.update_yaxes(title_text="bytes per token", row=1, col=1)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# The KV-cache calculator
# ---------------------------------------------------------------------------------------------------------------


def _seq_grid(config: ModelConfig) -> list[int]:
    top = int(math.log2(config.max_position_embeddings))
    return [2**k for k in range(max(top - 10, 4), top + 1)] + (
        [config.max_position_embeddings] if 2**top < config.max_position_embeddings else []
    )


def kv_cache_calculator(
    configs: dict[str, ModelConfig] | None = None,
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128),
    dtypes: tuple[str, ...] = ("bf16", "fp8", "fp32"),
    active_batch: int = 1,
) -> go.Figure:
    """KV-cache bytes against sequence length (x, up to each model's context), one line per attention kind, one
    panel per config; a slider over the batch size (precomputed frames) and a dropdown over the cache dtype, so the
    figure recomputes nothing and works on a static page. The V3 panel marks one H800's 80 GB of HBM."""
    configs = configs or {"DeepSeek-V3": ModelConfig.deepseek_v3(), "tiny": ModelConfig.tiny()}
    names = list(configs)
    fig = make_subplots(
        rows=1,
        cols=len(names),
        subplot_titles=[f"{n} (context up to {c.max_position_embeddings:,})" for n, c in configs.items()],
    )
    traces: list[dict] = []  # (config name, dtype, label) per data trace, in fig.data order
    grids = {n: _seq_grid(c) for n, c in configs.items()}

    def series(name: str, label: str, kind: str, g, dtype: str, batch: int) -> list[int]:
        cfg = configs[name]
        return [kv_cache_bytes(cfg, s, batch=batch, dtype=DTYPES[dtype], attention=kind, groups=g) for s in grids[name]]

    for col, name in enumerate(names, 1):
        for dtype in dtypes:
            for label, kind, g in attention_variants(configs[name]):
                y = series(name, label, kind, g, dtype, active_batch)
                fig.add_trace(
                    go.Scatter(
                        x=grids[name],
                        y=y,
                        mode="lines+markers",
                        name=_family(label),
                        legendgroup=_family(label),
                        showlegend=col == 1,
                        visible=dtype == dtypes[0],
                        line=dict(color=KIND_COLORS[_family(label)], width=2.5 if kind == "mla" else 1.8),
                        customdata=[human_bytes(v) for v in y],
                        hovertemplate=f"{label} ({dtype})<br>%{{x:,}} tokens: %{{customdata}}<extra>{name}</extra>",
                    ),
                    row=1,
                    col=col,
                )
                traces.append(dict(name=name, dtype=dtype, label=label, kind=kind, groups=g))
    n_data = len(traces)
    first = names[0]
    fig.add_trace(
        go.Scatter(
            x=[grids[first][0], grids[first][-1]],
            y=[H800_BYTES] * 2,
            mode="lines",
            name="one H800 (80 GB)",
            line=dict(color=COLORS["slate"], dash="dash", width=1.5),
            hovertemplate="80 GB of HBM<extra></extra>",
        ),
        row=1,
        col=1,
    )

    frames = []
    for b in batches:
        data = []
        for t in traces:
            y = series(t["name"], t["label"], t["kind"], t["groups"], t["dtype"], b)
            data.append(go.Scatter(y=y, customdata=[human_bytes(v) for v in y]))
        frames.append(go.Frame(name=f"batch {b}", data=data, traces=list(range(n_data))))
    fig.frames = frames
    fig.update_layout(
        sliders=[
            dict(
                active=list(batches).index(active_batch),
                x=0.3,
                len=0.7,
                y=-0.12,
                pad=dict(t=30),
                currentvalue=dict(prefix="batch size: "),
                steps=[
                    dict(
                        label=str(b),
                        method="animate",
                        args=[
                            [f"batch {b}"],
                            dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0)),
                        ],
                    )
                    for b in batches
                ],
            )
        ]
    )
    buttons = []
    for dtype in dtypes:
        visible = [t["dtype"] == dtype for t in traces] + [True]
        buttons.append(dict(label=f"dtype: {dtype}", method="restyle", args=[{"visible": visible}]))
    fig.update_layout(
        updatemenus=[dict(type="dropdown", buttons=buttons, x=0.0, xanchor="left", y=-0.24, yanchor="top", active=0)]
    )
    for col, name in enumerate(names, 1):
        cfg = configs[name]
        smallest = min(kv_cache_bytes(cfg, grids[name][0], dtype=DTYPES[d], attention="mla") for d in dtypes)
        largest = max(
            kv_cache_bytes(cfg, grids[name][-1], batch=max(batches), dtype=DTYPES[d], attention="mha") for d in dtypes
        )
        lo, hi = smallest / 2, largest * 2
        fig.update_xaxes(type="log", title_text="sequence length (tokens)", row=1, col=col)
        fig.update_yaxes(type="log", range=[math.log10(lo), math.log10(hi)], row=1, col=col, **_byte_ticks(lo, hi))
    fig.update_yaxes(title_text="KV cache (all layers)", row=1, col=1)
    fig.update_layout(
        template=theme,
        height=500,
        margin=dict(t=120, b=110),
        hovermode="x unified",
        title="KV-cache calculator: bytes against sequence length",
        legend=dict(orientation="h", y=1.1, x=0, yanchor="bottom"),
    )
    return fig


def kv_cache_report(
    seq_len: int = 131072,
    batch: int = 1,
    dtype: str = "bf16",
    attention: str = "mla",
    gqa_groups: int = 8,
    configs: dict[str, ModelConfig] | None = None,
) -> str:
    """Text for the live calculator: cache bytes of every attention kind for each config, the chosen one marked."""
    configs = configs or {"DeepSeek-V3": ModelConfig.deepseek_v3(), "tiny": ModelConfig.tiny()}
    if attention not in ("mla", "mha", "gqa", "mqa"):
        raise ValueError(f"attention must be one of mla, mha, gqa, mqa, got {attention!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    lines = [f"seq_len {seq_len:,} x batch {batch} in {dtype}"]
    for name, cfg in configs.items():
        mla = kv_cache_bytes(cfg, seq_len, batch=batch, dtype=DTYPES[dtype], attention="mla")
        beyond = (
            f", beyond its context of {cfg.max_position_embeddings:,} tokens"
            if seq_len > cfg.max_position_embeddings
            else ""
        )
        lines.append(f"{name} ({cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads{beyond}):")
        for kind in ("mha", "gqa", "mqa", "mla"):
            label = f"gqa-{gqa_groups}" if kind == "gqa" else kind
            if kind == "gqa" and cfg.num_attention_heads % gqa_groups:
                text = f"n/a ({gqa_groups} groups do not divide {cfg.num_attention_heads} heads)"
            else:
                n = kv_cache_bytes(
                    cfg,
                    seq_len,
                    batch=batch,
                    dtype=DTYPES[dtype],
                    attention=kind,
                    groups=gqa_groups if kind == "gqa" else None,
                )
                ratio = f"{n / mla:8.2f} x MLA" if mla else ""
                text = f"{n:>22,} bytes = {human_bytes(n):>10} {ratio}"
            mark = "  <-" if kind == attention else ""
            lines.append(f"  {label.upper():<7} {text}{mark}")
    return "\n".join(lines)


def kv_cache_widget(
    seq_len: int = 32 * 1024, batch: int = 8, dtype: str = "bf16", attention: str = "mla", gqa_groups: int = 8
):
    """The live calculator for a kernel: sliders and menus that recompute ``kv_cache_report`` on every change.

    The report is an HTML widget (no ``print`` into an Output widget), so the saved notebook holds the last report
    in its widget state, the static site shows it, and nbval sees nothing but the widget itself.
    """
    import html

    import ipywidgets as w

    v3 = ModelConfig.deepseek_v3()
    controls = dict(
        seq_len=w.IntSlider(value=seq_len, min=1024, max=v3.max_position_embeddings, step=1024, description="seq_len"),
        batch=w.IntSlider(value=batch, min=1, max=256, description="batch"),
        dtype=w.Dropdown(options=list(DTYPES), value=dtype, description="dtype"),
        attention=w.Dropdown(options=["mla", "mha", "gqa", "mqa"], value=attention, description="attention"),
        gqa_groups=w.Dropdown(options=[1, 2, 4, 8, 16, 32, 64, 128], value=gqa_groups, description="gqa_groups"),
    )
    out = w.HTML()

    def update(_change=None) -> None:
        text = kv_cache_report(**{name: c.value for name, c in controls.items()})
        out.value = f"<pre>{html.escape(text)}</pre>"

    for c in controls.values():
        c.observe(update, names="value")
    update()
    return w.VBox(
        [
            w.HBox([controls["seq_len"], controls["batch"]]),
            w.HBox([controls["dtype"], controls["attention"], controls["gqa_groups"]]),
            out,
        ]
    )


# ---------------------------------------------------------------------------------------------------------------
# RoPE as a matrix, and YaRN
# ---------------------------------------------------------------------------------------------------------------


def rope_matrix(
    inv_freq: torch.Tensor, position, attention_factor: float = 1.0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """R_t (R x R): the matrix with ``R_t @ x == RotaryEmbedding.apply(x at position t)``, built by rotating the
    identity with dsv3's own RoPE (interleaved pairs). ``position`` an int, or a sequence/tensor of N positions
    (returns (N, R, R))."""
    R = 2 * inv_freq.shape[0]
    pos = torch.as_tensor(position, dtype=torch.float64)
    positions = pos.reshape(-1)  # (N,)
    angles = (positions[:, None] * inv_freq.double()[None, :]).to(dtype)  # (N, R/2)
    cos = (angles.cos() * attention_factor)[:, None, :]  # (N, 1, R/2)
    sin = (angles.sin() * attention_factor)[:, None, :]
    eye = torch.eye(R, dtype=dtype).expand(len(positions), 1, R, R)  # R "heads", each a basis vector e_j
    rotated = RotaryEmbedding.apply(eye, cos, sin)[:, 0]  # (N, R, R): row j = R_t e_j
    out = rotated.transpose(-1, -2)  # (N, R, R)
    return out[0] if pos.dim() == 0 else out


def yarn_wavelengths(config: ModelConfig, factor: float | None = None) -> dict:
    """Per RoPE pair of ``config`` (``qk_rope_head_dim`` / 2 pairs): wavelength in tokens before and after YaRN
    (with ``factor`` replacing the config's), and each pair's regime: "extrapolated" (kept as trained),
    "ramp" (partly divided) or "interpolated" (divided by the factor), read off ``yarn_inv_freq``'s output."""
    if config.rope_scaling is None:
        raise ValueError("yarn_wavelengths: the config has no rope_scaling (YaRN)")
    rs = dict(config.rope_scaling)
    if factor is not None:
        rs["factor"] = float(factor)
    dim, base = config.qk_rope_head_dim, config.rope_theta
    trained, _ = yarn_inv_freq(dim, base, None)  # (dim/2,)
    scaled, attention_factor = yarn_inv_freq(dim, base, rs)  # (dim/2,)
    # the regimes do not depend on the factor (only on beta_fast/slow): read them at a factor where they differ
    probe, _ = yarn_inv_freq(dim, base, dict(rs, factor=2.0))
    ratio = (probe / trained).tolist()
    regime = ["extrapolated" if r > 1 - 1e-6 else "interpolated" if abs(2 * r - 1) < 1e-6 else "ramp" for r in ratio]
    return dict(
        pair=list(range(dim // 2)),
        trained=[2 * math.pi / f for f in trained.tolist()],
        yarn=[2 * math.pi / f for f in scaled.tolist()],
        regime=regime,
        factor=rs["factor"],
        attention_factor=attention_factor,
        original_context=rs["original_max_position_embeddings"],
    )


def _sig(values: list[float], digits: int = 6) -> list[float]:
    """Round to ``digits`` significant digits, so figure JSON does not depend on the last bits of a float."""
    return [float(f"{v:.{digits}g}") for v in values]


def yarn_figure(
    config: ModelConfig | None = None, factors: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 40, 64)
) -> go.Figure:
    """Wavelength (tokens per full turn) of every RoPE pair before and after YaRN, with a slider over the factor s.

    The shaded bands are YaRN's regimes: fast pairs that turn many times within the original context are kept
    (extrapolated), slow pairs are divided by s (interpolated), a linear ramp joins them.
    """
    config = config or ModelConfig.deepseek_v3()
    active = config.rope_scaling["factor"]
    if active not in factors:
        factors = tuple(sorted(set(factors) | {active}))
    base = yarn_wavelengths(config, active)
    pairs, original = base["pair"], base["original_context"]
    fig = go.Figure(layout=dict(template=theme))
    fig.add_trace(
        go.Scatter(
            x=pairs,
            y=_sig(base["trained"]),
            mode="markers",
            name="RoPE as trained",
            marker=dict(color=COLORS["slate"], size=7, symbol="circle-open"),
            hovertemplate="pair %{x}: %{y:,.4g} tokens<extra>trained</extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=pairs,
            y=_sig(base["yarn"]),
            mode="lines+markers",
            name=f"YaRN, s = {active:g}",
            line=dict(color=COLORS["blue"]),
            marker=dict(size=6),
            customdata=base["regime"],
            hovertemplate="pair %{x}: %{y:,.4g} tokens (%{customdata})<extra>YaRN</extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[pairs[0], pairs[-1]],
            y=[original] * 2,
            mode="lines",
            name=f"original context {original:,}",
            line=dict(color=COLORS["orange"], dash="dash"),
            hoverinfo="skip",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[pairs[0], pairs[-1]],
            y=[original * active] * 2,
            mode="lines",
            name="extended context s × original",
            line=dict(color=COLORS["green"], dash="dot"),
            hovertemplate="%{y:,} tokens<extra></extra>",
        )
    )
    bands = {}
    for i, r in enumerate(base["regime"]):
        lo, hi = bands.get(r, (i, i))
        bands[r] = (min(lo, i), max(hi, i))
    fills = {
        "extrapolated": "rgba(16, 185, 129, 0.10)",
        "ramp": "rgba(245, 158, 11, 0.12)",
        "interpolated": "rgba(59, 130, 246, 0.10)",
    }
    for r, (lo, hi) in bands.items():
        fig.add_vrect(
            x0=lo - 0.5,
            x1=hi + 0.5,
            fillcolor=fills[r],
            line_width=0,
            layer="below",
            annotation_text=f"{r} (pairs {lo}-{hi})",
            annotation_position="top left",
            annotation_font_size=11,
        )
    frames = []
    for s in factors:
        w = yarn_wavelengths(config, s)
        frames.append(
            go.Frame(
                name=f"s={s:g}",
                traces=[1, 3],
                data=[go.Scatter(y=_sig(w["yarn"]), name=f"YaRN, s = {s:g}"), go.Scatter(y=[original * s] * 2)],
            )
        )
    fig.frames = frames
    fig.update_layout(
        sliders=[
            dict(
                active=list(factors).index(active),
                x=0.05,
                len=0.9,
                y=-0.15,
                pad=dict(t=30),
                currentvalue=dict(prefix="YaRN factor s: "),
                steps=[
                    dict(
                        label=f"{s:g}",
                        method="animate",
                        args=[
                            [f"s={s:g}"],
                            dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0)),
                        ],
                    )
                    for s in factors
                ],
            )
        ]
    )
    top = max(max(base["trained"]) * max(factors), original * max(factors)) * 3
    fig.update_layout(
        height=500,
        margin=dict(t=90, b=120),
        title=f"RoPE wavelength per pair ({config.qk_rope_head_dim // 2} pairs of "
        f"d<sub>h</sub><sup>R</sup> = {config.qk_rope_head_dim}, base {config.rope_theta:g})",
        xaxis=dict(title="pair index i (frequency falls to the right)", range=[-0.6, pairs[-1] + 0.6]),
        yaxis=dict(
            title="wavelength 2π/θ_i (tokens, log)",
            type="log",
            range=[math.log10(min(base["trained"])) - 0.3, math.log10(top)],
        ),
        legend=dict(orientation="h", y=1.02, x=0, yanchor="bottom"),
    )
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Intermediates of a real forward pass
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class MLACapture:
    """One MLA layer's tensors from a real forward pass (hooks + the two kinds of cache), batch of B, T tokens."""

    c_q: torch.Tensor  # (B, T, d_c') query latent c^Q (after its RMSNorm), Eq. 6
    q_nope: torch.Tensor  # (B, T, H, d_h) q^C, Eq. 7
    q_rope: torch.Tensor  # (B, T, H, d_h^R) q^R after RoPE, Eq. 8
    c_kv: torch.Tensor  # (B, T, d_c) the cached latent c^KV (after its RMSNorm), Eq. 1
    k_rope: torch.Tensor  # (B, T, d_h^R) the cached, rotated, shared key k^R, Eq. 3
    keys: torch.Tensor  # (B, T, H, d_h + d_h^R) what a naive cache holds as keys, Eq. 4
    values: torch.Tensor  # (B, T, H, d_h) what a naive cache holds as values, Eq. 5


@torch.no_grad()
def capture_mla(model, input_ids: torch.Tensor, layer: int = 0) -> MLACapture:
    """Run ``model`` twice on ``input_ids`` (with a latent and with a naive cache) and return layer ``layer``'s
    MLA tensors: the latents from forward hooks on its projections, keys/values and k^R from the caches."""
    attn = model.layers[layer].self_attn
    if attn.q_lora_rank is None:
        raise ValueError("capture_mla needs query compression (config.q_lora_rank set)")
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, out):
            seen[name] = out[0] if isinstance(out, tuple) else out

        return hook

    handles = [
        attn.q_a_layernorm.register_forward_hook(keep("c_q")),
        attn.q_b_proj.register_forward_hook(keep("q")),
        attn.kv_a_layernorm.register_forward_hook(keep("c_kv")),
    ]
    input_ids = input_ids.to(model.device)
    B, T = input_ids.shape
    try:
        latent = model.new_cache(B, T, "latent")
        model(input_ids, cache=latent)
    finally:
        for h in handles:
            h.remove()
    naive = model.new_cache(B, T, "naive")
    model(input_ids, cache=naive)
    H = attn.n_heads
    q = seen["q"].view(B, T, H, attn.qk_dim)  # (B, T, H, qk)
    q_nope, q_rope = q.split([attn.nope_dim, attn.rope_dim], dim=-1)
    positions = torch.arange(T, device=input_ids.device).expand(B, T)  # (B, T)
    cos, sin = model.rotary(positions)  # (B, T, R/2)
    return MLACapture(
        c_q=seen["c_q"],
        q_nope=q_nope,
        q_rope=RotaryEmbedding.apply(q_rope, cos, sin),
        c_kv=latent.a[layer][:, :T],
        k_rope=latent.b[layer][:, :T],
        keys=naive.a[layer][:, :T],
        values=naive.b[layer][:, :T],
    )


# ---------------------------------------------------------------------------------------------------------------
# Decode cost: what one step reads and computes per cached token, and measured step times
# ---------------------------------------------------------------------------------------------------------------


def decode_cost(config: ModelConfig) -> dict[str, dict[str, int]]:
    """Per decode step, layer and cached token: numbers read from the cache and multiply-adds of attention, for the
    naive path (scores over n_h keys of d_h + d_h^R, sums over n_h values of d_h) and the absorbed one (scores over
    c^KV (d_c) and k^R (d_h^R) per head, the weighted sum of c^KV per head)."""
    H, r, R = config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim
    naive_read = cache_elements_per_layer(config, "mha")
    return {
        "naive": {"read": naive_read, "macs": H * (config.qk_head_dim + config.v_head_dim)},
        "absorbed": {"read": cache_elements_per_layer(config, "mla"), "macs": H * (r + R) + H * r},
    }


@torch.no_grad()
def time_decode(
    model,
    contexts: list[int],
    kinds: tuple[str, ...] = ("latent", "naive"),
    batch: int = 1,
    steps: int = 8,
    repeats: int = 3,
    seed: int = 0,
    threads: int | None = 1,
) -> list[dict]:
    """Milliseconds per greedy decode step after a real prefill of ``context`` random tokens, for each cache kind
    (``model.new_cache(batch, context + steps, kind)`` then single-token forwards).

    Each step is timed on its own and the fastest of ``repeats`` x ``steps`` is reported (like ``timeit``), so a
    step that the operating system interrupts does not count. On a CPU the timing runs on ``threads`` threads
    (default 1: the tiny model's operations are too small to gain from more, and one thread does not wait for a
    busy second core); ``None`` keeps torch's setting. Returns one dict per (context, kind): ``context``,
    ``kind``, ``ms`` (per step), ``cache_bytes``, ``max_len``.
    """
    gen = torch.Generator().manual_seed(seed)
    cuda = model.device.type == "cuda"
    saved = torch.get_num_threads()
    if threads is not None and not cuda:
        torch.set_num_threads(threads)
    try:
        return _time_decode(model, contexts, kinds, batch, steps, repeats, gen, cuda)
    finally:
        torch.set_num_threads(saved)


def _time_decode(model, contexts, kinds, batch, steps, repeats, gen, cuda) -> list[dict]:
    rows = []
    for ctx in contexts:
        prompt = torch.randint(0, model.config.vocab_size, (batch, ctx), generator=gen).to(model.device)
        for kind in kinds:
            cache = model.new_cache(batch, ctx + steps, kind)
            first = model(prompt, cache=cache).logits[:, -1:].argmax(-1)  # (B, 1)
            best = math.inf
            for _ in range(repeats):
                cache.truncate(ctx)
                tok = first
                for _ in range(steps):
                    if cuda:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    tok = model(tok, cache=cache).logits[:, -1:].argmax(-1)  # (B, 1)
                    if cuda:
                        torch.cuda.synchronize()
                    best = min(best, time.perf_counter() - start)
            rows.append(dict(context=ctx, kind=kind, ms=best * 1e3, cache_bytes=cache.nbytes, max_len=ctx + steps))
    return rows
