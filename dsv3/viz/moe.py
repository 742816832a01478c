"""Tables and figures of Chapter 3 ("DeepSeekMoE", paper Sec. 2.1.2, Eq. 12-16): fine-grained expert arithmetic,
the router's decisions step by step, group (node)-limited routing, and what the experts of a trained model do.

Everything is computed from ``dsv3`` objects: the arithmetic from a ``ModelConfig``, the routing walk-through
from a real ``Router`` (``Router.steps`` asks the router's reference for its intermediate values), and the
activation views from the ``Routing`` records a ``DeepSeekV3`` forward pass returns. ``tests/test_viz_moe.py``
checks them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..config import ModelConfig
from ..layers.moe import Router
from .display import COLORS, COLORWAY, figure, theme

GROUP_COLORS = [
    COLORS["blue"],
    COLORS["orange"],
    COLORS["green"],
    COLORS["violet"],
    COLORS["cyan"],
    COLORS["pink"],
    COLORS["lime"],
    COLORS["red"],
]
MUTED = "rgba(128, 128, 128, 0.35)"
TEXT_LINE = "rgba(60, 60, 60, 0.9)"


def book_moe_config(**overrides) -> ModelConfig:
    """The model Chapters 3 and 4 train live: ``ModelConfig.tiny()`` at a quarter of its width, without MTP.

    The expert layout is tiny's (1 shared + 16 routed experts in 4 groups, top-2 groups, top-4 experts, 1 dense
    + 2 MoE blocks); only the widths shrink (d = 64, expert width 32), so a few hundred steps fit in seconds."""
    base = dict(
        hidden_size=64,
        intermediate_size=192,
        moe_intermediate_size=32,
        kv_lora_rank=32,
        q_lora_rank=48,
        num_nextn_predict_layers=0,
    )
    base.update(overrides)
    return ModelConfig.tiny(**base)


# ---------------------------------------------------------------------------------------------------------------
# Fine-grained experts: parameters, FLOPs and combinations at equal compute
# ---------------------------------------------------------------------------------------------------------------


def group_limited_combinations(n_experts: int, n_group: int, topk_group: int, top_k: int) -> int:
    """How many different sets of ``top_k`` experts a router may pick when they must lie in at most ``topk_group``
    of ``n_group`` equal groups (inclusion-exclusion over the groups actually touched)."""
    size = n_experts // n_group
    total = 0
    for j in range(1, min(topk_group, top_k) + 1):
        # sets of top_k experts inside j given groups that touch all j of them
        exactly = sum((-1) ** i * math.comb(j, i) * math.comb((j - i) * size, top_k) for i in range(j + 1))
        total += math.comb(n_group, j) * exactly
    return total


def granularity_table(config: ModelConfig, splits: Sequence[int] | None = None) -> list[dict]:
    """Rows of equal total parameters and equal compute: each coarse expert cut into ``m`` fine ones (DeepSeekMoE's
    "fine-grained expert segmentation"). ``m = K_r`` is the config itself; ``m = 1`` routes each token to one
    expert ``K_r`` times as wide. Per MoE layer: routed experts, width, top-k, routed and router parameters,
    routed FLOPs per token (forward, 2 per multiply-add) and the number of distinct expert sets a token can use."""
    d, K, N, w = config.hidden_size, config.num_experts_per_tok, config.n_routed_experts, config.moe_intermediate_size
    if splits is None:
        splits = [m for m in (1, 2, 4, 8, 16, 32) if m <= K and K % m == 0]
    rows = []
    for m in splits:
        if K % m:
            raise ValueError(f"granularity_table: split {m} does not divide num_experts_per_tok={K}")
        n, width, k = N * m // K, w * K // m, m
        rows.append(
            dict(
                split=m,
                experts=n,
                width=width,
                top_k=k,
                routed_params=n * 3 * d * width,
                router_params=n * d,
                routed_flops=2 * k * 3 * d * width,
                router_flops=2 * n * d,
                combinations=math.comb(n, k),
            )
        )
    return rows


def _si(n: float) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g}"


def granularity_markdown(rows: list[dict]) -> str:
    """``granularity_table`` rows as a Markdown table."""
    lines = [
        "| experts x width | top-k | routed params / layer | routed FLOPs / token | router params | "
        "expert sets a token can use |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['experts']} x {r['width']:,} | {r['top_k']} | {_si(r['routed_params'])} | "
            f"{_si(r['routed_flops'])} | {r['router_params']:,} | {r['combinations']:,} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The router, step by step
# ---------------------------------------------------------------------------------------------------------------


def routing_steps(router: Router, x: torch.Tensor) -> dict:
    """Every intermediate value of the biased, group-limited routing of tokens x (N, D) (Eq. 13-16 plus node-limited
    routing), as the router's own reference computes them (``Router.steps``, i.e. ``router_topk_torch`` asked for
    its intermediates):

    ``scores`` s (N, E), ``biased`` s + b (N, E), ``group_scores`` (N, G) = sum of the top K_r/M (``per_group``) of
    s + b per group, ``kept_groups`` (N, G) bool, ``ids`` (N, K) chosen by s + b among the kept groups, ``weights``
    (N, K) = s of the chosen, normalized over them and times ``routed_scaling_factor``."""
    return router.steps(x)


def _r(t: torch.Tensor, digits: int = 4) -> list:
    return [round(v, digits) for v in t.tolist()]


def group_routing_figure(steps: dict, tokens: Sequence[int] = (0, 1, 2, 3, 4, 5)) -> go.Figure:
    """One token's routing: top, each expert's affinity s (bar) and biased score s + b (diamond), colored by
    group, grey where the group is masked, solid where the expert is chosen; bottom, the group scores (sums of the
    top K_r/M of s + b), the kept groups in color. A slider steps through ``tokens`` (precomputed frames)."""
    E, G, top = steps["scores"].shape[1], steps["n_group"], steps["per_group"]
    size = E // G
    experts = list(range(E))

    def traces(t: int) -> list:
        kept = steps["kept_groups"][t].tolist()
        chosen = set(steps["ids"][t].tolist())
        colors, lines = [], []
        for e in experts:
            g = e // size
            base = GROUP_COLORS[g % len(GROUP_COLORS)]
            colors.append(base if e in chosen else (MUTED if not kept[g] else _fade(base)))
            lines.append(2 if e in chosen else 0)
        text = [f"g = {w:.2f}" for w in steps["weights"][t].tolist()]
        weight_of = dict(zip(steps["ids"][t].tolist(), text))
        return [
            go.Bar(
                x=experts,
                y=_r(steps["scores"][t]),
                marker=dict(color=colors, line=dict(width=lines, color=TEXT_LINE)),
                text=[weight_of.get(e, "") for e in experts],
                textposition="outside",
                textfont=dict(size=11),
                cliponaxis=False,
                name="affinity s",
                hovertemplate="expert %{x}: s = %{y:.3f}<extra></extra>",
            ),
            go.Scatter(
                x=experts,
                y=_r(steps["biased"][t]),
                mode="markers",
                name="s + b (chooses)",
                marker=dict(symbol="diamond", size=9, color=COLORS["slate"]),
                hovertemplate="expert %{x}: s + b = %{y:.3f}<extra></extra>",
            ),
            go.Bar(
                x=[f"group {g}" for g in range(G)],
                y=_r(steps["group_scores"][t]),
                name="group score",
                marker=dict(color=[GROUP_COLORS[g % len(GROUP_COLORS)] if kept[g] else MUTED for g in range(G)]),
                text=["kept" if kept[g] else "masked" for g in range(G)],
                textposition="outside",
                hovertemplate=f"%{{x}}: top-{top} sum of s + b = %{{y:.3f}}<extra></extra>",
                showlegend=False,
            ),
        ]

    fig = make_subplots(
        rows=2,
        cols=1,
        row_heights=[0.62, 0.38],
        vertical_spacing=0.2,
        subplot_titles=(
            "s (bars, color = group) and s + b (◆); chosen: outlined, with g",
            f"group scores: sum of the top-{top} s + b in each group",
        ),
    )
    for i, tr in enumerate(traces(tokens[0])):
        fig.add_trace(tr, row=1 if i < 2 else 2, col=1)
    fig.frames = [go.Frame(name=f"token {t}", data=traces(t), traces=[0, 1, 2]) for t in tokens]
    top = max(float(steps["biased"][list(tokens)].max()), float(steps["scores"][list(tokens)].max()))
    low = min(0.0, float(steps["biased"][list(tokens)].min()))
    fig.update_yaxes(range=[low, top * 1.3], title_text="s, s + b", row=1, col=1)
    fig.update_yaxes(
        range=[
            min(0.0, float(steps["group_scores"][list(tokens)].min())),
            float(steps["group_scores"][list(tokens)].max()) * 1.3,
        ],
        row=2,
        col=1,
    )
    fig.update_xaxes(title_text="routed expert", dtick=1, range=[-0.6, E - 0.4], row=1, col=1)
    fig.update_layout(
        template=theme,
        height=600,
        margin=dict(t=90, b=90),
        barmode="overlay",
        showlegend=False,
        uniformtext=dict(minsize=10, mode="show"),
        title=f"Group-limited routing of one token: keep {steps['topk_group']} of {G} groups, "
        f"then the top-{steps['ids'].shape[1]} experts",
        sliders=[
            dict(
                active=0,
                y=-0.08,
                pad=dict(t=20),
                currentvalue=dict(prefix=""),
                steps=[
                    dict(
                        label=f"token {t}",
                        method="animate",
                        args=[
                            [f"token {t}"],
                            dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0)),
                        ],
                    )
                    for t in tokens
                ],
            )
        ],
    )
    return fig


def _fade(hex_color: str, alpha: float = 0.35) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r}, {g}, {b}, {alpha})"


# ---------------------------------------------------------------------------------------------------------------
# Experts of a trained model
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def domain_expert_loads(model, corpus, batch_size: int = 8, seq_len: int = 64, max_batches: int = 2) -> torch.Tensor:
    """(L, n_domains, N_r) int64: how many (token, slot) pairs of each domain's validation windows each routed
    expert of each main-model MoE layer receives (on the CPU; the batches go to ``model.device``)."""
    was_training = model.training
    model.eval()
    rows = []
    for d in corpus.domains:
        total = None
        for batch in corpus.val_batches(batch_size, seq_len, max_batches=max_batches, domain=d):
            counts = model(batch.input_ids.to(model.device)).expert_counts.cpu()  # (L, N_r)
            total = counts if total is None else total + counts
        rows.append(total)
    model.train(was_training)
    return torch.stack(rows, dim=1)  # (L, D, N_r)


def domain_summary(counts: torch.Tensor, domains: Sequence[str], top: int = 3, rare: float = 0.01) -> list[str]:
    """One line per domain from a (domains, experts) count matrix: its ``top`` most used experts with their share
    of the domain's routed pairs, and the experts that get less than ``rare`` of them."""
    share = counts.double() / counts.sum(-1, keepdim=True)  # (D, E)
    lines = []
    for d, row in zip(domains, share):
        best = row.topk(top)
        favourites = ", ".join(f"{int(e)} ({v:.0%})" for v, e in zip(best.values.tolist(), best.indices.tolist()))
        unused = [int(e) for e in (row < rare).nonzero().flatten()]
        lines.append(f"{d:12s} favourites {favourites}; under {rare:.0%}: {unused}")
    return lines


def rounded(t: torch.Tensor, digits: int = 3) -> list:
    """A tensor as (nested) Python floats rounded to ``digits``, for printing stable numbers."""
    values = t.tolist()
    if isinstance(values, float):
        return round(values, digits)
    return [rounded(torch.tensor(v), digits) if isinstance(v, list) else round(v, digits) for v in values]


def mutual_information(counts: torch.Tensor) -> float:
    """I(domain; expert) in bits from a (domains, experts) count matrix: 0 when every domain spreads its tokens
    over the experts in the same proportions, log2(domains) at most (each domain with experts of its own)."""
    p = counts.double() / counts.sum()  # (D, E)
    outer = p.sum(1, keepdim=True) * p.sum(0, keepdim=True)  # (D, E) product of the marginals
    nz = p > 0
    return float((p[nz] * (p[nz] / outer[nz]).log2()).sum())


def domain_expert_figure(loads: dict[str, torch.Tensor], domains: Sequence[str]) -> go.Figure:
    """Heatmap: share (%) of each domain's routed (token, slot) pairs that go to each expert, rows normalized.
    ``loads`` maps a view name ("layer 1, trained") to a (domains, experts) count matrix; a dropdown picks it."""
    names = list(loads)
    fig = figure(title="Which experts each domain uses (share of the domain's routed tokens, %)", height=330)
    for i, name in enumerate(names):
        c = loads[name].double()
        share = (100 * c / c.sum(1, keepdim=True)).round(decimals=1)  # (D, E)
        fig.add_trace(
            go.Heatmap(
                z=share.tolist(),
                x=list(range(c.shape[1])),
                y=list(domains),
                visible=i == 0,
                colorscale="Viridis",
                zmin=0,
                zmax=max(25.0, float(share.max())),
                colorbar=dict(title="%"),
                name=name,
                hovertemplate="%{y}, expert %{x}: %{z:.1f}%<extra>" + name + "</extra>",
            )
        )
    fig.update_xaxes(title_text="routed expert", dtick=1)
    fig.update_yaxes(autorange="reversed")  # the first domain on top
    fig.update_layout(
        margin=dict(t=90),
        updatemenus=[
            dict(
                type="dropdown",
                x=1.0,
                xanchor="right",
                y=1.02,
                yanchor="bottom",
                active=0,
                buttons=[
                    dict(label=name, method="restyle", args=[{"visible": [j == i for j in range(len(names))]}])
                    for i, name in enumerate(names)
                ],
            )
        ],
    )
    return fig


def show_piece(piece: str) -> str:
    """A token's text made visible on an axis: spaces as a middle dot, newlines as a return arrow."""
    return piece.replace(" ", "·").replace("\n", "↵").replace("\t", "→") or "∅"


@torch.no_grad()
def sentence_routing(model, tokenizer, text: str) -> dict:
    """Route ``text`` through a model: its token pieces and, per main-model MoE layer, the chosen experts
    ``ids`` (N, K) and gating weights ``weights`` (N, K), on the CPU (the model runs on ``model.device``)."""
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("sentence_routing: the text encodes to no tokens")
    if len(ids) > model.config.max_position_embeddings:
        raise ValueError(
            f"sentence_routing: {len(ids)} tokens exceed the model's context {model.config.max_position_embeddings}"
        )
    was_training = model.training
    model.eval()
    out = model(torch.tensor([ids], device=model.device))
    model.train(was_training)
    layers = [i for i in range(model.config.num_hidden_layers) if model.config.is_moe_layer(i)]
    return dict(
        pieces=[tokenizer.decode([i]) for i in ids],
        token_ids=ids,
        layers=[f"block {i}" for i in layers],
        ids=[r.topk_ids.cpu().clone() for r in out.routing],
        weights=[r.topk_weights.cpu().clone() for r in out.routing],
        n_experts=model.config.n_routed_experts,
    )


def _layer_menu(n_layers: int, per_layer: int, labels: Sequence[str]) -> list:
    """A dropdown above the plot's right corner that shows the traces of one layer (``per_layer`` traces each)."""
    buttons = []
    for i, label in enumerate(labels):
        visible = [j // per_layer == i for j in range(n_layers * per_layer)]
        buttons.append(dict(label=label, method="restyle", args=[{"visible": visible}]))
    return [dict(type="dropdown", buttons=buttons, x=1.0, xanchor="right", y=1.02, yanchor="bottom", active=0)]


def token_expert_heatmap(info: dict, title: str = "Token-by-expert gating weights") -> go.Figure:
    """Heatmap per MoE layer (dropdown): rows are the tokens of ``info`` (from ``sentence_routing``), columns the
    routed experts, color the gating weight g (blank where the expert is not chosen)."""
    N, E = len(info["pieces"]), info["n_experts"]
    labels = [f"{show_piece(p)} ({t})" for t, p in enumerate(info["pieces"])]  # position keeps labels unique
    fig = figure(title=title, height=max(360, 16 * N + 150))
    for li, (ids, w) in enumerate(zip(info["ids"], info["weights"])):
        z = torch.full((N, E), float("nan"))
        z.scatter_(1, ids, w.float())
        cells = [[None if v != v else round(v, 3) for v in row] for row in z.tolist()]  # NaN -> a gap
        fig.add_trace(
            go.Heatmap(
                z=cells,
                x=list(range(E)),
                y=labels,
                visible=li == 0,
                hoverongaps=False,
                colorscale="Viridis",
                zmin=0,
                colorbar=dict(title="g"),
                name=info["layers"][li],
                hovertemplate="%{y} → expert %{x}: g = %{z:.2f}<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="routed expert", dtick=1)
    fig.update_yaxes(autorange="reversed", tickfont=dict(size=10), type="category")
    fig.update_layout(updatemenus=_layer_menu(len(info["ids"]), 1, info["layers"]))
    return fig


def sentence_experts_figure(info: dict, title: str | None = None) -> go.Figure:
    """Which experts each token of a sentence visits: x = the sentence's tokens (their text on the axis), y = the
    routed expert, one marker per (token, choice) sized by its gating weight; a dropdown over the MoE layers."""
    N, E = len(info["pieces"]), info["n_experts"]
    K = info["ids"][0].shape[1]
    text = [show_piece(p) for p in info["pieces"]]
    fig = figure(title=title or "Experts visited by each token", height=420)
    for li, (ids, w) in enumerate(zip(info["ids"], info["weights"])):
        for k in range(K):
            fig.add_trace(
                go.Scatter(
                    x=list(range(N)),
                    y=ids[:, k].tolist(),
                    mode="markers",
                    visible=li == 0,
                    name=f"choice {k + 1}",
                    legendgroup=f"choice {k + 1}",
                    showlegend=li == 0,
                    marker=dict(
                        size=[round(6 + 9 * v, 2) for v in w[:, k].tolist()],
                        color=COLORWAY[k % len(COLORWAY)],
                        line=dict(width=0),
                    ),
                    customdata=[[text[n], round(float(w[n, k]), 3)] for n in range(N)],
                    hovertemplate="%{customdata[0]} → expert %{y} (g = %{customdata[1]})<extra>"
                    + info["layers"][li]
                    + "</extra>",
                )
            )
    fig.update_xaxes(tickvals=list(range(N)), ticktext=text, tickangle=-60, tickfont=dict(size=11))
    fig.update_yaxes(title_text="routed expert", range=[-0.7, E - 0.3], dtick=1)
    fig.update_layout(
        margin=dict(t=90),
        updatemenus=_layer_menu(len(info["ids"]), K, info["layers"]),
        legend=dict(orientation="h", y=1.02, x=0, xanchor="left", yanchor="bottom"),
    )
    return fig


def moe_table(configs: dict[str, ModelConfig]) -> str:
    """Markdown: the MoE hyper-parameters with the report's values (Sec. 4.2, from Chapter 1's table) next to each
    config's."""
    from .overview import HYPERPARAMETERS, config_value

    names = list(configs)
    lines = [
        "| field | symbol | paper | " + " | ".join(names) + " | meaning |",
        "| --- | --- | --- | " + " | ".join("---" for _ in names) + " | --- |",
    ]
    for h in HYPERPARAMETERS["MoE"]:
        values = [config_value(c, h.field) for c in configs.values()]
        paper = "—" if h.paper is None else f"{h.paper:,}"
        lines.append(
            f"| `{h.field}` | {h.symbol} | {paper} | " + " | ".join(f"{v:,}" for v in values) + f" | {h.meaning} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The live view: type a sentence, see its experts (an HTML widget, so the saved notebook and nbval see one widget)
# ---------------------------------------------------------------------------------------------------------------

EXPERT_PALETTE = [
    "#3b82f6",
    "#f59e0b",
    "#10b981",
    "#ef4444",
    "#8b5cf6",
    "#06b6d4",
    "#ec4899",
    "#84cc16",
    "#64748b",
    "#2563eb",
    "#d97706",
    "#059669",
    "#dc2626",
    "#7c3aed",
    "#0891b2",
    "#db2777",
]


def sentence_table_html(info: dict) -> str:
    """An HTML table of ``sentence_routing``'s result: one row per token, one column per MoE block, each chosen
    expert a colored chip (one color per expert id, more opaque for a larger gating weight)."""
    import html

    head = "".join(f"<th style='padding:2px 8px;text-align:left'>{html.escape(name)}</th>" for name in info["layers"])
    rows = []
    top = max(float(w.max()) for w in info["weights"]) or 1.0
    for t, piece in enumerate(info["pieces"]):
        cells = []
        for ids, w in zip(info["ids"], info["weights"]):
            chips = []
            for e, g in sorted(zip(ids[t].tolist(), w[t].tolist())):
                color = EXPERT_PALETTE[e % len(EXPERT_PALETTE)]
                alpha = round(0.35 + 0.65 * g / top, 2)
                chips.append(
                    f"<span title='g = {g:.2f}' style='display:inline-block;min-width:1.8em;margin:1px;"
                    f"padding:0 3px;border-radius:3px;text-align:center;color:white;background:{color};"
                    f"opacity:{alpha}'>{e}</span>"
                )
            cells.append(f"<td style='padding:1px 8px'>{''.join(chips)}</td>")
        rows.append(
            f"<tr><td style='padding:1px 8px;font-family:monospace'>{html.escape(show_piece(piece))}</td>"
            + "".join(cells)
            + "</tr>"
        )
    return (
        "<table style='border-collapse:collapse;font-size:13px'><tr><th style='padding:2px 8px;"
        f"text-align:left'>token</th>{head}</tr>" + "".join(rows) + "</table>"
    )


def sentence_widget(model, tokenizer, text: str, max_tokens: int = 64):
    """ipywidgets: a text box whose text is routed through ``model`` on every change; the experts each token visits
    appear as ``sentence_table_html`` (at most ``max_tokens`` tokens). No Output widget, no figure: the saved
    notebook keeps the last table in its widget state, and the static site shows it."""
    import ipywidgets as widgets

    box = widgets.Textarea(
        value=text, description="text", continuous_update=False, layout=widgets.Layout(width="520px", height="70px")
    )
    table = widgets.HTML()

    def update(_change=None) -> None:
        value = box.value
        ids = tokenizer.encode(value)
        if not ids:
            table.value = "<i>type some text</i>"
            return
        if len(ids) > max_tokens:
            value = tokenizer.decode(ids[:max_tokens])
        table.value = sentence_table_html(sentence_routing(model, tokenizer, value)) + (
            f"<i>(first {max_tokens} tokens)</i>" if len(ids) > max_tokens else ""
        )

    box.observe(update, names="value")
    update()
    return widgets.VBox([box, table])
