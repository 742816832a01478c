"""Tables and figures of Chapter 1 ("DeepSeek-V3 at a glance"): the hyper-parameters, where the parameters live,
the FLOPs per token and the path of one token through the model, all computed from a ``ModelConfig``.

Everything here is derived from ``dsv3.accounting`` (the same per-block counts ``count_parameters`` sums), so the
figures cannot disagree with the numbers the chapter prints; ``tests/test_viz_overview.py`` checks them against an
instantiated model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go

from ..accounting import block_params, count_parameters, flops_per_token
from ..config import ModelConfig, yarn_mscale
from .display import COLORS, figure

# ---------------------------------------------------------------------------------------------------------------
# Hyper-parameters
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hyper:
    """One row of the hyper-parameter table."""

    field: str  # ModelConfig field, or "rope_scaling.<key>", or a derived name (see config_value)
    symbol: str  # the paper's notation (Markdown math), "" when the paper names no symbol
    meaning: str
    paper: Any = None  # the value the report states (Sec. 4.2 / 4.3), None when it states none


# Values stated in the technical report (arXiv 2412.19437). Sec. 4.2 "Hyper-Parameters" gives the model's shape,
# Sec. 4.3 "Long Context Extension" the YaRN settings (s = 40, alpha = 1, beta = 32, sqrt(t) = 0.1 ln s + 1).
HYPERPARAMETERS: dict[str, tuple[Hyper, ...]] = {
    "backbone": (
        Hyper("vocab_size", "", "tokenizer vocabulary (byte-level BPE)"),
        Hyper("hidden_size", "$d$", "model width", 7168),
        Hyper("num_hidden_layers", "", "transformer blocks of the main model", 61),
        Hyper("first_k_dense_replace", "", "leading blocks with a dense FFN instead of MoE", 3),
        Hyper("intermediate_size", "", "width of the dense SwiGLU FFN"),
    ),
    "attention (MLA)": (
        Hyper("num_attention_heads", "$n_h$", "attention heads", 128),
        Hyper("qk_nope_head_dim", "$d_h$", "per-head query/key width without position", 128),
        Hyper("v_head_dim", "$d_h$", "per-head value width", 128),
        Hyper("qk_rope_head_dim", "$d_h^R$", "per-head width of the decoupled RoPE query/key", 64),
        Hyper("kv_lora_rank", "$d_c$", "KV compression width (what is cached)", 512),
        Hyper("q_lora_rank", "$d_c'$", "query compression width", 1536),
    ),
    "MoE": (
        Hyper("n_shared_experts", "$N_s$", "shared experts per MoE layer", 1),
        Hyper("n_routed_experts", "$N_r$", "routed experts per MoE layer", 256),
        Hyper("num_experts_per_tok", "$K_r$", "routed experts activated per token", 8),
        Hyper("moe_intermediate_size", "", "width of one expert", 2048),
        Hyper("n_group", "", "expert groups (one per node)"),
        Hyper("topk_group", "$M$", "groups (nodes) one token may use", 4),
        Hyper("routed_scaling_factor", "", "scale of the routed experts' gating weights"),
    ),
    "MTP": (Hyper("num_nextn_predict_layers", "$D$", "multi-token prediction depth", 1),),
    "RoPE / YaRN": (
        Hyper("rope_theta", "", "RoPE base"),
        Hyper("rope_scaling.original_max_position_embeddings", "", "pre-training context (tokens)", 4096),
        Hyper("rope_scaling.factor", "$s$", "YaRN context scale", 40),
        Hyper("rope_scaling.beta_slow", r"$\alpha$", "YaRN ramp start (rotations per context)", 1),
        Hyper("rope_scaling.beta_fast", r"$\beta$", "YaRN ramp end (rotations per context)", 32),
        Hyper("yarn_mscale", r"$\sqrt{t}$", "attention temperature $0.1 \\ln s + 1$", round(0.1 * math.log(40) + 1, 4)),
        Hyper("max_position_embeddings", "", "longest position the config allows"),
    ),
}


def config_value(config: ModelConfig, name: str) -> Any:
    """A hyper-parameter by table name: a field, ``rope_scaling.<key>`` or ``yarn_mscale`` (sqrt(t) of YaRN)."""
    if name == "yarn_mscale":
        rs = config.rope_scaling
        return round(yarn_mscale(rs["factor"], rs.get("mscale_all_dim") or 1.0), 4) if rs else 1.0
    if name.startswith("rope_scaling."):
        rs = config.rope_scaling or {}
        return rs.get(name.split(".", 1)[1])
    return getattr(config, name)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:,.4g}" if value != int(value) else f"{int(value):,}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def paper_mismatches(config: ModelConfig) -> list[str]:
    """The hyper-parameters whose value in ``config`` differs from the value the report states (empty for V3)."""
    bad = []
    for rows in HYPERPARAMETERS.values():
        for h in rows:
            if h.paper is not None and config_value(config, h.field) != h.paper:
                bad.append(f"{h.field}: config {config_value(config, h.field)!r}, paper {h.paper!r}")
    return bad


def hyperparameter_table(configs: dict[str, ModelConfig], paper: bool = False, ratio: bool = False) -> str:
    """Markdown table of the hyper-parameters, grouped; one value column per config (``{"V3": cfg, ...}``).

    ``paper=True`` adds the report's value before the configs'; ``ratio=True`` adds first config / second config.
    """
    names = list(configs)
    head = ["group", "hyper-parameter", "symbol"] + (["paper"] if paper else []) + names
    head += [f"{names[0]} / {names[1]}"] if ratio else []
    head += ["meaning"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group, rows in HYPERPARAMETERS.items():
        for i, h in enumerate(rows):
            values = [config_value(c, h.field) for c in configs.values()]
            cells = [f"**{group}**" if i == 0 else "", f"`{h.field}`", h.symbol or ""]
            cells += [_fmt(h.paper)] if paper else []
            cells += [_fmt(v) for v in values]
            if ratio:
                a, b = values[0], values[1]
                numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
                cells.append(f"{a / b:,.4g}" if numeric and b else "—")
            cells.append(h.meaning)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts: the headline numbers and where the parameters live
# ---------------------------------------------------------------------------------------------------------------

PAPER_TOTAL = 671e9  # "671B total parameters" (Abstract, Sec. 4.2)
PAPER_ACTIVATED = 37e9  # "37B activated for each token"


def headline_table(config: ModelConfig) -> str:
    """Markdown: the report's 671B / 37B next to ``count_parameters(config)``."""
    c = count_parameters(config)
    rows = [
        ("total parameters (main model)", "671B", f"{c['total'] / 1e9:,.2f}B"),
        ("activated per token (without the embedding lookup)", "37B", f"{c['activated'] / 1e9:,.2f}B"),
        ("activated per token (with the embedding row)", "", f"{c['activated_with_embedding'] / 1e9:,.2f}B"),
        ("MTP module (its own parameters)", "", f"{c['mtp'] / 1e9:,.2f}B"),
        ("activated / total", "", f"{c['activated'] / c['total']:.2%}"),
    ]
    lines = ["| quantity | paper | dsv3 |", "|---|---:|---:|"]
    lines += [f"| {q} | {p or '—'} | {d} |" for q, p, d in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class Part:
    """A node of the parameter tree: ``total`` parameters, and ``activated`` ones (used by one token)."""

    id: str
    label: str
    parent: str  # "" for the root
    total: int
    activated: int


_COMPONENT_LABELS = {
    "attention": "attention (MLA)",
    "norms": "RMSNorms",
    "dense_ffn": "dense FFN",
    "router": "router",
    "shared_experts": "shared expert(s)",
    "routed_experts": "routed experts",
}


def parameter_parts(config: ModelConfig, include_mtp: bool = False) -> list[Part]:
    """The model as a tree (root, stages, components) with total and per-token activated parameter counts.

    The embedding is a table lookup, so none of it counts as activated (as in ``count_parameters``); the MTP
    module, when included, counts its K_r routed experts as activated (it runs once per drafted token).
    """
    c = config
    root = "DeepSeek-V3"
    n_dense = sum(not c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    n_moe = c.num_hidden_layers - n_dense
    embed = c.vocab_size * c.hidden_size
    head = 0 if c.tie_word_embeddings else embed
    parts: list[Part] = [
        Part("embedding", "embedding", root, embed, 0),
        Part("output_head", "output head", root, head, head),
        Part("final_norm", "final norm", root, c.hidden_size, c.hidden_size),
    ]

    def stage(sid: str, label: str, n: int, moe: bool, extra: dict[str, int] | None = None) -> None:
        if n == 0:
            return
        total = block_params(c, moe, active=False)
        active = block_params(c, moe, active=True)
        children = [Part(f"{sid}/{k}", _COMPONENT_LABELS[k], sid, n * v, n * active[k]) for k, v in total.items()]
        for k, v in (extra or {}).items():
            children.append(Part(f"{sid}/{k}", k, sid, v, v))
        parts.append(Part(sid, label, root, sum(p.total for p in children), sum(p.activated for p in children)))
        parts.extend(children)

    stage("dense", f"{n_dense} dense block{'s' * (n_dense != 1)}", n_dense, moe=False)
    stage("moe", f"{n_moe} MoE block{'s' * (n_moe != 1)}", n_moe, moe=True)
    if include_mtp:
        for k in range(c.num_nextn_predict_layers):
            moe = c.is_moe_layer(c.num_hidden_layers + k)
            extra = {"eh_proj + 3 norms": 2 * c.hidden_size * c.hidden_size + 3 * c.hidden_size}
            stage(f"mtp{k + 1}", f"MTP module {k + 1}", 1, moe=moe, extra=extra)
    top = [p for p in parts if p.parent == root]
    return [Part(root, root, "", sum(p.total for p in top), sum(p.activated for p in top))] + parts


def _billions(n: float) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e8 else f"{n / 1e6:,.2f}M" if n >= 1e5 else f"{n:,.0f}"


def parameter_sunburst(config: ModelConfig, title: str = "Where the parameters live") -> go.Figure:
    """Sunburst of ``parameter_parts`` with buttons: all parameters, activated per token, with the MTP module."""
    views = [
        ("all parameters", False, "total"),
        ("activated per token", False, "activated"),
        ("with the MTP module", True, "total"),
    ]
    fig = figure(
        title=dict(text=title, y=0.98, yanchor="top"),
        height=580,
        margin=dict(l=10, r=10, t=110, b=10),
        sunburstcolorway=[COLORS[c] for c in ("slate", "green", "lime", "orange", "blue", "violet")],
        extendsunburstcolors=True,
    )
    for i, (name, mtp, kind) in enumerate(views):
        parts = parameter_parts(config, include_mtp=mtp)
        values = [getattr(p, kind) for p in parts]
        root = values[0]
        text = [f"{_billions(v)}<br>{v / root:.1%}" for v in values]
        fig.add_trace(
            go.Sunburst(
                ids=[p.id for p in parts],
                labels=[p.label for p in parts],
                parents=[p.parent for p in parts],
                values=values,
                branchvalues="total",
                text=text,
                textinfo="label+text",
                name=name,
                hovertemplate="%{label}: %{text}<extra></extra>",
                visible=i == 0,
                sort=False,
                insidetextorientation="radial",
            )
        )
    buttons = []
    for i, (name, mtp, kind) in enumerate(views):
        root = getattr(parameter_parts(config, include_mtp=mtp)[0], kind)
        buttons.append(
            dict(
                label=f"{name} ({_billions(root)})",
                method="update",
                args=[{"visible": [j == i for j in range(len(views))]}],
            )
        )
    fig.update_layout(
        updatemenus=[
            dict(
                type="buttons",
                direction="right",
                x=0.0,
                y=1.02,
                xanchor="left",
                yanchor="bottom",
                buttons=buttons,
                showactive=True,
            )
        ]
    )
    return fig


# ---------------------------------------------------------------------------------------------------------------
# FLOPs per token and the path of one token
# ---------------------------------------------------------------------------------------------------------------


def attention_flops_per_layer(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of the score and weighted-sum products for one token in one layer: 2 n_h (d_qk + d_v) x the
    average number of keys it sees under the causal mask (seq_len / 2); the term ``flops_per_token`` adds."""
    c = config
    return 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * seq_len / 2


@dataclass(frozen=True)
class Stage:
    """One step of a token's path: ``params`` stored, ``activated`` used, forward ``flops`` spent on it."""

    name: str
    kind: str  # "embedding" | "dense" | "moe" | "head" | "mtp"
    computes: str  # what happens to the token, with shapes
    params: int
    activated: int
    flops: float


def token_flow(config: ModelConfig, seq_len: int = 4096, include_mtp: bool = True) -> list[Stage]:
    """One token's path through the model, stage by stage (one stage per block), with forward FLOPs at context
    ``seq_len``. The main stages' FLOPs sum to ``flops_per_token(config, seq_len)["total"]``."""
    c = config
    d, V = c.hidden_size, c.vocab_size
    attn = attention_flops_per_layer(c, seq_len)
    K, Nr, Ns = c.num_experts_per_tok, c.n_routed_experts, c.n_shared_experts
    stages = [
        Stage("embedding", "embedding", f"token id -> row of a {V:,} x {d:,} table -> h (d={d:,})", V * d, 0, 0.0)
    ]
    for i in range(c.num_hidden_layers):
        moe = c.is_moe_layer(i)
        total = sum(block_params(c, moe, active=False).values())
        active = sum(block_params(c, moe, active=True).values())
        ffn = (
            f"MoE: {Ns} shared + {K} of {Nr} routed experts (width {c.moe_intermediate_size:,})"
            if moe
            else f"dense SwiGLU FFN (width {c.intermediate_size:,})"
        )
        stages.append(
            Stage(
                f"block {i}",
                "moe" if moe else "dense",
                f"MLA over {seq_len:,} positions (cache {c.kv_lora_rank}+{c.qk_rope_head_dim}), {ffn}",
                total,
                active,
                2 * active + attn,
            )
        )
    head = 0 if c.tie_word_embeddings else V * d
    stages.append(
        Stage("norm + head", "head", f"RMSNorm, then h (d={d:,}) -> {V:,} logits", head + d, head + d, 2 * (head + d))
    )
    if include_mtp:
        for k in range(c.num_nextn_predict_layers):
            moe = c.is_moe_layer(c.num_hidden_layers + k)
            own = sum(block_params(c, moe, active=False).values()) + 2 * d * d + 3 * d
            active = sum(block_params(c, moe, active=True).values()) + 2 * d * d + 3 * d
            stages.append(
                Stage(
                    f"MTP {k + 1}",
                    "mtp",
                    f"[enorm(Emb(t_(i+{k + 1}))); hnorm(h)] (2d={2 * d:,}) -> eh_proj -> block -> "
                    f"shared norm + head -> logits for t_(i+{k + 2})",
                    own,
                    active + head,
                    2 * (active + head) + attn,
                )
            )
    return stages


_KIND_COLORS = {
    "embedding": COLORS["slate"],
    "dense": COLORS["orange"],
    "moe": COLORS["blue"],
    "head": COLORS["green"],
    "mtp": COLORS["violet"],
}


def token_flow_table(config: ModelConfig, seq_len: int = 4096) -> str:
    """Markdown: the token's path with consecutive blocks of the same kind merged into one row."""
    rows: list[list] = []
    for s in token_flow(config, seq_len):
        if rows and s.kind in ("dense", "moe") and rows[-1][0].kind == s.kind:
            rows[-1].append(s)
        else:
            rows.append([s])
    lines = [
        "| stage | what one token goes through | parameters | activated | forward GFLOPs |",
        "|---|---|---:|---:|---:|",
    ]
    for group in rows:
        s = group[0]
        name = s.name if len(group) == 1 else f"blocks {group[0].name.split()[1]}–{group[-1].name.split()[1]}"
        count = f" ({len(group)} x)" if len(group) > 1 else ""
        lines.append(
            f"| {name}{count} | {s.computes} | {_billions(sum(g.params for g in group))} | "
            f"{_billions(sum(g.activated for g in group))} | {sum(g.flops for g in group) / 1e9:,.2f} |"
        )
    return "\n".join(lines)


def token_flow_figure(config: ModelConfig, seq_lens: Sequence[int] = (4096, 32768, 131072)) -> go.Figure:
    """Forward FLOPs per token, stage by stage: the weights (2 x activated, one trace per kind of stage) and
    attention on top, with a slider over the context length (it moves the attention bars)."""
    flows = [token_flow(config, T) for T in seq_lens]
    short = {"embedding": "emb", "norm + head": "head"}
    names = [short.get(s.name, s.name.replace("block ", "").replace("MTP ", "MTP")) for s in flows[0]]
    fig = figure(
        height=460,
        barmode="stack",
        xaxis=dict(title="stage: embedding, blocks 0..L-1, head, MTP", type="category", tickangle=0, nticks=20),
        yaxis=dict(title="GFLOPs per token"),
        margin=dict(l=60, r=20, t=100, b=110),
    )
    labels = {
        "embedding": "embedding (a lookup: 0)",
        "dense": "dense blocks: weights",
        "moe": "MoE blocks: weights",
        "head": "norm + output head",
        "mtp": "MTP module: weights",
    }
    for kind, label in labels.items():
        idx = [i for i, s in enumerate(flows[0]) if s.kind == kind]
        if not idx:
            continue
        fig.add_trace(
            go.Bar(
                x=[names[i] for i in idx],
                y=[2 * flows[0][i].activated / 1e9 for i in idx],
                name=label,
                marker_color=_KIND_COLORS[kind],
                customdata=[flows[0][i].computes for i in idx],
                hovertemplate="%{customdata}<br>weights: %{y:.3f} GFLOPs<extra></extra>",
            )
        )
    fig.add_trace(
        go.Bar(
            x=names,
            y=[(s.flops - 2 * s.activated) / 1e9 for s in flows[0]],
            name="attention scores + weighted sums",
            marker_color=COLORS["red"],
            opacity=0.75,
            hovertemplate="attention: %{y:.3f} GFLOPs<extra></extra>",
        )
    )
    attn = len(fig.data) - 1
    steps = []
    for T, flow in zip(seq_lens, flows):
        total = sum(s.flops for s in flow if s.kind != "mtp") / 1e9
        steps.append(
            dict(
                label=f"{T // 1024}K",
                method="update",
                args=[
                    {"y": [[(s.flops - 2 * s.activated) / 1e9 for s in flow]]},
                    {
                        "title.text": f"One token's forward FLOPs at {T // 1024}K context: "
                        f"{total:,.1f} GFLOPs (main model)"
                    },
                    [attn],
                ],
            )
        )
    fig.update_layout(
        title=dict(text=steps[0]["args"][1]["title.text"], y=0.98, yanchor="top"),
        sliders=[dict(active=0, steps=steps, currentvalue=dict(prefix="context: "), y=-0.18, pad=dict(t=10))],
        legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0.0, xanchor="left", traceorder="normal"),
    )
    return fig


def flops_figure(config: ModelConfig, seq_lens: Sequence[int] | None = None) -> go.Figure:
    """FLOPs per token vs context length, split into the weight term (2 x activated) and the attention term, with
    buttons for inference (forward) and training (forward + backward = 3 x forward)."""
    if seq_lens is None:
        seq_lens = [2**k for k in range(7, 18)] + [163840]
    seq_lens = list(seq_lens)
    fig = figure(
        title="FLOPs per token vs context length",
        height=420,
        xaxis=dict(title="context length (tokens)", type="log"),
        yaxis=dict(title="GFLOPs per token"),
    )
    modes = [("inference (forward)", False), ("training (forward + backward)", True)]
    for m, (_, training) in enumerate(modes):
        f = [flops_per_token(config, T, training=training) for T in seq_lens]
        mult = 3 if training else 1
        fig.add_trace(
            go.Scatter(
                x=seq_lens,
                y=[mult * r["matmul"] / 1e9 for r in f],
                stackgroup=f"s{m}",
                name="weights: 2 x activated",
                line=dict(color=COLORS["blue"]),
                visible=m == 0,
                hovertemplate="%{x:,} tokens: %{y:,.1f} GFLOPs<extra>weights</extra>",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=seq_lens,
                y=[mult * r["attention"] / 1e9 for r in f],
                stackgroup=f"s{m}",
                name="attention over the context",
                line=dict(color=COLORS["red"]),
                visible=m == 0,
                customdata=[r["attention"] * mult / r["total"] for r in f],
                hovertemplate="%{x:,} tokens: +%{y:,.1f} GFLOPs (%{customdata:.0%} of the total)"
                "<extra>attention</extra>",
            )
        )
    buttons = [
        dict(label=mode, method="update", args=[{"visible": [j // 2 == m for j in range(4)]}])
        for m, (mode, _) in enumerate(modes)
    ]
    fig.update_layout(
        updatemenus=[
            dict(type="buttons", direction="right", x=0.0, y=1.02, xanchor="left", yanchor="bottom", buttons=buttons)
        ],
        legend=dict(x=0.02, y=0.9),
        margin=dict(l=60, r=20, t=90, b=50),
    )
    return fig


# ---------------------------------------------------------------------------------------------------------------
# The tiny model's forward pass
# ---------------------------------------------------------------------------------------------------------------


def expert_counts_figure(counts, layer_ids: Sequence[int], title: str = "Tokens per routed expert") -> go.Figure:
    """Heatmap of ``ModelOutput.expert_counts`` (n_moe_layers, N_r): how many tokens each expert received."""
    z = [[int(v) for v in row] for row in counts.tolist()]
    fig = figure(
        title=title,
        height=120 + 60 * len(z),
        xaxis=dict(title="routed expert", dtick=1),
        yaxis=dict(title="MoE layer", type="category"),
    )
    fig.add_trace(
        go.Heatmap(
            z=z,
            x=list(range(len(z[0]))),
            y=[f"layer {i}" for i in layer_ids],
            colorscale="Viridis",
            text=z,
            texttemplate="%{text}",
            hovertemplate="%{y}, expert %{x}: %{z} tokens<extra></extra>",
            colorbar=dict(title="tokens"),
        )
    )
    return fig
