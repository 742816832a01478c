"""Tables, figures and the gamma widget of Chapter 4 ("Load balancing without auxiliary loss", paper Sec. 2.1.2,
Eq. 16-20): routing collapse, the auxiliary loss and its gradient, the bias rule over training, MaxVio, the
sequence-wise loss, and token dropping with a capacity factor.

The training histories come from ``dsv3.train.train`` (one dict per optimizer step with ``loads``, ``biases``,
``max_vio``; see ``TrainResult``), the losses from ``dsv3.balance``, the dropping from
``dsv3.layers.moe.capacity_keep``; nothing here re-implements them (Chapter 4 writes Eq. 17-20 with Python loops in
its own cells, the lesson, and asserts it against ``dsv3.balance``).
``tests/test_viz_balance.py`` checks every function on synthetic histories and tiny random models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from .. import balance as bal
from ..layers.moe import Routing, capacity_keep
from .display import COLORS, COLORWAY, figure, theme

MODE_COLORS = {"bias": COLORS["green"], "aux": COLORS["orange"], "none": COLORS["red"]}

# Paper Sec. 4.1-4.2: the batch size grows from 3072 to 15360 sequences over the first 469B tokens, sequences are
# 4096 tokens long, and gamma = 0.001 holds for the first 14.3T tokens.
PAPER_BATCH_START, PAPER_BATCH_END, PAPER_RAMP_TOKENS = 3072, 15360, 469e9
PAPER_SEQ_LEN, PAPER_GAMMA_TOKENS = 4096, 14.3e12


def paper_bias_steps() -> int:
    """About how many optimizer steps DeepSeek-V3 updates its biases with gamma = 0.001: the batch-size ramp (taken
    as linear in tokens, so the steps are an integral of 1 / batch tokens) plus the steps at 15360 x 4096 tokens."""
    a, b = PAPER_BATCH_START * PAPER_SEQ_LEN, PAPER_BATCH_END * PAPER_SEQ_LEN  # tokens per step at both ends
    ramp = PAPER_RAMP_TOKENS / (b - a) * math.log(b / a)  # integral of dT / (a + (b - a) T / T_ramp)
    rest = (PAPER_GAMMA_TOKENS - PAPER_RAMP_TOKENS) / b
    return round(ramp + rest)


def hyperparameter_table(gamma: float, seq_alpha: float, aux_alpha: float, steps: int) -> str:
    """Markdown: the paper's balancing hyper-parameters next to the ones the chapter's runs use."""
    v3_steps = paper_bias_steps()
    rows = [
        ("bias update speed γ", f"{bal.PAPER_BIAS_UPDATE_SPEED:g}", f"{gamma:g}"),
        ("steps with γ > 0", f"≈ {v3_steps:,}", f"{steps:,}"),
        (
            "largest possible bias drift γ × steps",
            f"≈ {bal.PAPER_BIAS_UPDATE_SPEED * v3_steps:,.0f}",
            f"{gamma * steps:g}",
        ),
        ("sequence-wise loss α (Eq. 17)", f"{bal.PAPER_SEQ_AUX_ALPHA:g}", f"{seq_alpha:g}"),
        ("batch-wise auxiliary loss α (baseline)", "not used", f"{aux_alpha:g}"),
    ]
    lines = ["| hyper-parameter | paper (DeepSeek-V3) | this chapter |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Histories: MaxVio, loads, biases
# ---------------------------------------------------------------------------------------------------------------


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def max_vio_figure(
    histories: Mapping[str, list[dict]], ceiling: float | None = None, smooth: int = 5, key: str = "max_vio"
) -> go.Figure:
    """MaxVio of every training batch (faint) and its ``smooth``-step moving average (bold), one color per run;
    ``ceiling`` (N_r / K_r - 1, total collapse) as a dashed line."""
    fig = figure(title="MaxVio per training batch (mean over the MoE layers)", height=420)
    for i, (name, h) in enumerate(histories.items()):
        color = MODE_COLORS.get(name.split()[0], COLORWAY[i % len(COLORWAY)])
        steps = [e["step"] for e in h]
        raw = [e[key] for e in h]
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=[round(v, 4) for v in raw],
                mode="lines",
                name=name,
                legendgroup=name,
                showlegend=False,
                line=dict(color=color, width=1),
                opacity=0.35,
                hovertemplate=f"{name}, step %{{x}}: %{{y:.2f}}<extra></extra>",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=[round(v, 4) for v in moving_average(raw, smooth)],
                mode="lines",
                name=name,
                legendgroup=name,
                line=dict(color=color, width=3),
                hovertemplate=f"{name}, step %{{x}}, {smooth}-step mean: %{{y:.2f}}<extra></extra>",
            )
        )
    if ceiling is not None:
        last = max(e["step"] for h in histories.values() for e in h)
        fig.add_trace(
            go.Scatter(
                x=[1, last],
                y=[ceiling, ceiling],
                mode="lines",
                name="total collapse",
                line=dict(color=COLORS["slate"], dash="dash", width=1.5),
                hovertemplate=f"N<sub>r</sub>/K<sub>r</sub> − 1 = {ceiling:g}<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="optimizer step")
    fig.update_yaxes(title_text="MaxVio = max load / mean load − 1", rangemode="tozero")
    fig.update_layout(margin=dict(t=90), legend=dict(orientation="h", y=1.02, x=0, xanchor="left", yanchor="bottom"))
    return fig


def load_share(history: list[dict], layer: int = 0) -> torch.Tensor:
    """(steps, N_r) share of the routed (token, slot) pairs each expert of MoE layer ``layer`` got at each step."""
    loads = torch.tensor([e["loads"][layer] for e in history], dtype=torch.float64)  # (S, N_r)
    return loads / loads.sum(-1, keepdim=True)


def load_heatmap(history: list[dict], layer: int = 0, title: str | None = None) -> go.Figure:
    """Heatmap of ``load_share`` over training: experts (rows) by step (columns), in % of the routed pairs."""
    share = (100 * load_share(history, layer)).t()  # (N_r, S)
    E = share.shape[0]
    fig = figure(
        title=title or f"Share of the routed tokens per expert (MoE layer {layer}), %", height=380, margin=dict(t=80)
    )
    fig.add_trace(
        go.Heatmap(
            z=[[round(v, 2) for v in row] for row in share.tolist()],
            x=[e["step"] for e in history],
            y=list(range(E)),
            colorscale="Viridis",
            zmin=0,
            zmax=max(25.0, float(share.max())),
            colorbar=dict(title="%"),
            hovertemplate="step %{x}, expert %{y}: %{z:.1f}%<extra></extra>",
        )
    )
    fig.update_xaxes(title_text="optimizer step")
    fig.update_yaxes(title_text="routed expert", dtick=1)
    return fig


def bias_evolution_figure(
    histories: Mapping[float, list[dict]],
    layer: int = 0,
    every: int = 2,
    active: float | None = None,
    layer_name: str | None = None,
) -> go.Figure:
    """The bias rule at work: top, each expert's correction bias b_i; bottom, its load relative to the mean,
    load_i / mean - 1 (above 0: overloaded, so b_i steps down by gamma). Frames over the optimizer steps (a
    slider and a play button) and a second slider over the precomputed gamma values (one run each)."""
    gammas = list(histories)
    active = gammas[0] if active is None else active
    n = min(len(h) for h in histories.values())
    frame_steps = sorted(set(range(every - 1, n, every)) | {0, n - 1})  # history indices shown
    E = len(next(iter(histories.values()))[0]["biases"][layer])
    experts = list(range(E))

    def bars(h: list[dict], i: int) -> tuple[list[float], list[float]]:
        bias = [round(b, 5) for b in h[i]["biases"][layer]]
        load = torch.tensor(h[i]["loads"][layer], dtype=torch.float64)
        vio = load / load.mean() - 1 if load.sum() > 0 else torch.zeros_like(load)
        return bias, [round(v, 4) for v in vio.tolist()]

    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        subplot_titles=("correction bias b<sub>i</sub>", "load<sub>i</sub> / mean load − 1"),
    )
    for g in gammas:
        bias, vio = bars(histories[g], frame_steps[-1])  # the figure opens on the last step; play replays all
        fig.add_trace(
            go.Bar(
                x=experts,
                y=bias,
                name=f"γ = {g:g}",
                visible=g == active,
                showlegend=False,
                marker=dict(color=[COLORS["green"] if b >= 0 else COLORS["red"] for b in bias]),
                hovertemplate="expert %{x}: b = %{y:.4f}<extra>γ = " + f"{g:g}" + "</extra>",
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Bar(
                x=experts,
                y=vio,
                name=f"γ = {g:g}",
                visible=g == active,
                showlegend=False,
                marker=dict(color=COLORS["blue"]),
                hovertemplate="expert %{x}: %{y:+.2f}<extra>γ = " + f"{g:g}" + "</extra>",
            ),
            row=2,
            col=1,
        )

    def frame_data(i: int) -> list:
        data = []
        for g in gammas:
            bias, vio = bars(histories[g], i)
            data += [
                go.Bar(y=bias, marker=dict(color=[COLORS["green"] if b >= 0 else COLORS["red"] for b in bias])),
                go.Bar(y=vio),
            ]
        return data

    steps = [histories[gammas[0]][i]["step"] for i in frame_steps]
    fig.frames = [
        go.Frame(name=f"step {s}", data=frame_data(i), traces=list(range(2 * len(gammas))))
        for i, s in zip(frame_steps, steps)
    ]
    all_bias = [b for h in histories.values() for e in h[:n] for b in e["biases"][layer]]
    lo, hi = min(all_bias + [0.0]), max(all_bias + [0.0])
    pad = 0.1 * (hi - lo) or 0.01
    vio_max = max(max(bars(h, i)[1]) for h in histories.values() for i in frame_steps)
    fig.update_yaxes(range=[lo - pad, hi + pad], row=1, col=1)
    fig.update_yaxes(range=[-1.05, vio_max * 1.1 + 0.1], row=2, col=1)
    fig.update_xaxes(title_text="routed expert", dtick=1, row=2, col=1)
    animate = dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0))
    sliders = [
        dict(
            active=len(steps) - 1,
            x=0.12,
            len=0.88,
            y=-0.1,
            pad=dict(t=10),
            currentvalue=dict(prefix="after "),
            steps=[dict(label=f"step {s}", method="animate", args=[[f"step {s}"], animate]) for s in steps],
        )
    ]
    if len(gammas) > 1:
        sliders.append(
            dict(
                active=gammas.index(active),
                x=0.12,
                len=0.88,
                y=-0.36,
                pad=dict(t=10),
                currentvalue=dict(prefix="bias update speed γ = "),
                steps=[
                    dict(label=f"{g:g}", method="restyle", args=[{"visible": [h == g for h in gammas for _ in (0, 1)]}])
                    for g in gammas
                ],
            )
        )
    fig.update_layout(
        template=theme,
        height=640 if len(gammas) > 1 else 580,
        margin=dict(t=80, b=190 if len(gammas) > 1 else 110),
        title=f"Bias and load of every expert during training ({layer_name or f'MoE layer {layer}'})",
        updatemenus=[
            dict(
                type="buttons",
                showactive=False,
                x=0.0,
                xanchor="left",
                y=-0.1,
                yanchor="top",
                pad=dict(t=28),
                buttons=[
                    dict(
                        label="▶ play",
                        method="animate",
                        args=[
                            [f"step {s}" for s in steps],
                            dict(mode="immediate", frame=dict(duration=120, redraw=True), transition=dict(duration=0)),
                        ],
                    )
                ],
            )
        ],
        sliders=sliders,
    )
    return fig


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], top: float | None = None) -> str:
    """Values as a row of block characters, from 0 (▁) to ``top`` (█; default the largest value)."""
    top = max(values) if top is None else top
    if top <= 0:
        return SPARK[0] * len(values)
    return "".join(SPARK[min(len(SPARK) - 1, max(0, round(v / top * (len(SPARK) - 1))))] for v in values)


def _bar(value: float, scale: float, color: str, signed: bool = True) -> str:
    """A horizontal bar as inline HTML: centred on zero when ``signed``, ``scale`` = the value of a half width."""
    half = 70  # px
    width = round(min(abs(value) / scale, 1.0) * half) if scale > 0 else 0
    bar = f"<div style='width:{width}px;height:10px;background:{color}'></div>"
    if not signed:
        return f"<div style='display:flex;width:{2 * half}px'>{bar}</div>"
    left = bar if value < 0 else ""
    right = bar if value >= 0 else ""
    return (
        f"<div style='display:flex;width:{2 * half}px'><div style='width:{half}px;display:flex;"
        f"justify-content:flex-end;border-right:1px solid #888'>{left}</div><div style='width:{half}px'>"
        f"{right}</div></div>"
    )


def gamma_report_html(gamma: float, history: list[dict], layer: int = 0, ceiling: float | None = None) -> str:
    """The live view of one run as HTML: MaxVio per step as a sparkline, and each expert's final bias and load
    (relative to the mean) as bars. Plain HTML, so it lives in an ipywidgets ``HTML`` widget."""
    import html

    last = history[-1]
    bias = last["biases"][layer]
    load = torch.tensor(last["loads"][layer], dtype=torch.float64)
    vio = (load / load.mean() - 1).tolist() if load.sum() > 0 else [0.0] * len(bias)
    tail = history[-10:]
    late = sum(e["max_vio"] for e in tail) / len(tail)
    b_scale = max(max(abs(b) for b in bias), 1e-9)
    v_scale = max(max(abs(v) for v in vio), 1e-9)
    rows = "".join(
        f"<tr><td style='padding:0 6px;text-align:right'>{e}</td><td style='padding:0 6px'>"
        f"{_bar(b, b_scale, COLORS['green'] if b >= 0 else COLORS['red'])}</td><td style='padding:0 6px;"
        f"font-family:monospace'>{b:+.3f}</td><td style='padding:0 6px'>{_bar(v, v_scale, COLORS['blue'])}</td>"
        f"<td style='padding:0 6px;font-family:monospace'>{v:+.2f}</td></tr>"
        for e, (b, v) in enumerate(zip(bias, vio))
    )
    spark = html.escape(sparkline([e["max_vio"] for e in history], ceiling))
    return (
        f"<div style='font-size:13px'><b>γ = {gamma:g}</b>, {len(history)} steps: MaxVio over the last "
        f"{len(tail)} steps {late:.2f}, bias range {max(bias) - min(bias):.3f}<br>"
        f"MaxVio per step: <span style='font-family:monospace'>{spark}</span>"
        f"<table style='border-collapse:collapse;margin-top:4px'><tr><th>expert</th><th colspan=2>bias b "
        f"after the last step</th><th colspan=2>load / mean − 1 in the last step</th></tr>{rows}</table></div>"
    )


def gamma_widget(
    train_history: Callable[[float], list[dict]],
    gammas: Sequence[float],
    cache: dict[float, list[dict]] | None = None,
    layer: int = 0,
    value: float | None = None,
    ceiling: float | None = None,
):
    """ipywidgets: a slider over gamma that shows ``gamma_report_html`` of a run with that gamma, training it with
    ``train_history(gamma)`` unless ``cache`` already holds its history (live recomputation in a kernel; the
    precomputed ``bias_evolution_figure`` is the static view). Only an ``HTML`` widget is updated, so the saved
    notebook keeps the last report in its widget state and nbval sees nothing but the widget."""
    import ipywidgets as widgets

    cache = {} if cache is None else cache
    slider = widgets.SelectionSlider(
        options=[(f"{g:g}", g) for g in gammas],
        value=value if value is not None else gammas[0],
        description="γ",
        continuous_update=False,
        layout=widgets.Layout(width="420px"),
    )
    report = widgets.HTML()

    def draw(gamma: float) -> None:
        if gamma not in cache:
            report.value = f"<i>training a run with γ = {gamma:g} ...</i>"
            cache[gamma] = train_history(gamma)
        report.value = gamma_report_html(gamma, cache[gamma], layer, ceiling)

    slider.observe(lambda change: draw(change["new"]), names="value")
    draw(slider.value)
    return widgets.VBox([slider, report])


# ---------------------------------------------------------------------------------------------------------------
# The auxiliary loss and its gradient
# ---------------------------------------------------------------------------------------------------------------


def _flat(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, like)])


def balance_gradients(model, input_ids: torch.Tensor, labels: torch.Tensor, aux_alpha: float, seq_alpha: float) -> dict:
    """Where the balance losses push the weights, next to the language-modeling loss, on one batch:
    gradient norms of L_main, of the batch-wise auxiliary loss (``aux_alpha``) and of the sequence-wise loss
    (``seq_alpha``), on the routers' centroids and on all other weights, and the cosine between each balance
    gradient and the L_main gradient (over all weights). The balance losses see the hidden states through the
    affinities, so their gradient reaches attention and embeddings too, not only the routers."""
    routers = [layer.gate.weight for layer in model.moe_layers()]
    router_ids = {id(p) for p in routers}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in router_ids]
    params = routers + others
    was_training = model.training
    model.train()
    with torch.enable_grad():
        out = model(input_ids.to(model.device), labels=labels.to(model.device))
        losses = {
            "main": out.main_loss,
            "aux": bal.batch_aux_loss(out.routing, aux_alpha),
            "seq": bal.sequence_balance_loss(out.routing, seq_alpha),
        }
        grads = {k: torch.autograd.grad(v, params, retain_graph=True, allow_unused=True) for k, v in losses.items()}
    model.train(was_training)
    n_r = len(routers)
    result = {"losses": {k: v.item() for k, v in losses.items()}}
    main = _flat(grads["main"], params).double()
    for k, g in grads.items():
        flat = _flat(g, params).double()
        result[k] = {
            "router_norm": float(_flat(g[:n_r], routers).norm()),
            "other_norm": float(_flat(g[n_r:], others).norm()),
            "cos_with_main": float(torch.nn.functional.cosine_similarity(flat, main, dim=0)),
        }
    return result


# ---------------------------------------------------------------------------------------------------------------
# Token dropping with a capacity factor
# ---------------------------------------------------------------------------------------------------------------


def dropped_fraction(
    topk_ids: torch.Tensor, n_experts: int, factors: Sequence[float], priority: str = "order"
) -> list[float]:
    """For each capacity factor, the fraction of (token, slot) pairs that GShard-style capacity
    (``capacity_keep``: at most ceil(cf * N * K / N_r) pairs per expert) would drop from these routing choices."""
    weights = torch.ones(topk_ids.shape, device=topk_ids.device)
    return [1.0 - capacity_keep(topk_ids, weights, n_experts, cf, priority).float().mean().item() for cf in factors]


def capacity_figure(curves: Mapping[str, Sequence[float]], factors: Sequence[float]) -> go.Figure:
    """Dropped fraction of (token, slot) pairs against the capacity factor, one line per routing (model)."""
    fig = figure(title="Tokens dropped by an expert capacity limit (DeepSeek-V3 drops none)", height=400)
    for i, (name, fractions) in enumerate(curves.items()):
        color = MODE_COLORS.get(name.split()[0], COLORWAY[i % len(COLORWAY)])
        fig.add_trace(
            go.Scatter(
                x=list(factors),
                y=[round(100 * v, 3) for v in fractions],
                mode="lines+markers",
                name=name,
                line=dict(color=color, width=2.5),
                hovertemplate=f"{name}<br>capacity factor %{{x}}: %{{y:.1f}}% dropped<extra></extra>",
            )
        )
    fig.add_vline(x=1.0, line=dict(color=COLORS["slate"], dash="dot", width=1))
    fig.update_xaxes(title_text="capacity factor (room per expert / mean load)")
    fig.update_yaxes(title_text="dropped (token, slot) pairs, %", rangemode="tozero")
    fig.update_layout(margin=dict(t=90), legend=dict(orientation="h", y=1.02, x=0, xanchor="left", yanchor="bottom"))
    return fig


def mean_affinity(routing: Routing) -> torch.Tensor:
    """(N_r,) each expert's affinity s_{i,t} averaged over the tokens of a routing: the router's own preference,
    before any bias. Its spread across experts is what a balancing bias has to offset."""
    return routing.scores.detach().float().mean(0)
