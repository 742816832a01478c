"""Architecture diagrams of the book, drawn by code from a ``ModelConfig``: one style, light and dark, offline.

Every diagram is a plotly figure of boxes (shapes), arrows and labels (annotations) with a transparent background
and the book's mid-luminance colors at low opacity, so it reads on a white and on a dark page; its text is the
theme's grey, which the site's stylesheet lightens in dark mode. Each box also carries a hover text (an invisible
marker) with the numbers behind it. Sizes and counts in the labels come from the config, never typed:

- ``block_stack_diagram`` (Chapter 1): embedding, dense and MoE blocks, head, and the MTP module(s);
- ``mla_diagram`` (Chapter 2): MLA's projections, with the two cached tensors highlighted;
- ``mla_paths_diagram`` (Chapter 2): the naive and the absorbed decode paths and what each one reads;
- ``moe_diagram`` (Chapter 3): shared experts and routed experts in groups (nodes), one real routing highlighted;
- ``bias_loop_diagram`` (Chapter 4): the feedback loop of auxiliary-loss-free balancing;
- ``mtp_diagram`` (Chapter 5): the chain of MTP modules with the shared embedding and output head;
- ``speculative_round_diagram`` (Chapter 6): one draft-and-verify round, accepted and rejected;
- ``expert_placement_diagram`` (Chapter 9): routed experts placed on the GPUs of the nodes, one token's nodes;
- ``fp8_linear_diagram`` (Chapter 10): one FP8 linear layer in training, forward, backward and update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import plotly.graph_objects as go
import torch

from dsv3.config import ModelConfig
from dsv3.fp8 import BLOCK, cached_input_bytes
from dsv3.layers.moe import Router

from .display import COLORS, figure
from .mla import cache_elements_per_layer, decode_cost

CACHED = COLORS["orange"]  # the one meaning every diagram shares: what is cached (Chapter 2) or chosen
ARROW = "rgba(128, 128, 128, 0.85)"  # neutral on white and on black


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r}, {g}, {b}, {alpha})"


@dataclass
class Box:
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def cx(self) -> float:
        return (self.x0 + self.x1) / 2

    @property
    def cy(self) -> float:
        return (self.y0 + self.y1) / 2


@dataclass
class Diagram:
    """Boxes, frames, arrows and notes on a ``width`` x ``height`` canvas (abstract units, y up)."""

    width: float
    height: float
    shapes: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    hover: list = field(default_factory=list)  # (x, y, text)

    def box(
        self,
        x0,
        y0,
        x1,
        y1,
        text: str,
        color: str = COLORS["blue"],
        hover: str = "",
        *,
        highlight: bool = False,
        dashed: bool = False,
        size: int = 12,
    ) -> Box:
        """A rounded box with centered ``text``; ``highlight`` draws it in the shared "cached/chosen" style."""
        color = CACHED if highlight else color
        r = min(0.12, (x1 - x0) / 6, (y1 - y0) / 6)
        path = (
            f"M {x0 + r},{y0} L {x1 - r},{y0} Q {x1},{y0} {x1},{y0 + r} L {x1},{y1 - r} Q {x1},{y1} {x1 - r},{y1}"
            f" L {x0 + r},{y1} Q {x0},{y1} {x0},{y1 - r} L {x0},{y0 + r} Q {x0},{y0} {x0 + r},{y0} Z"
        )
        self.shapes.append(
            dict(
                type="path",
                path=path,
                fillcolor=_rgba(color, 0.32 if highlight else 0.16),
                line=dict(color=color, width=3 if highlight else 1.5, dash="dash" if dashed else "solid"),
                layer="below",
            )
        )
        b = Box(x0, y0, x1, y1)
        if text:
            self.note(b.cx, b.cy, text, size=size)
        if hover or text:
            self.hover.append((b.cx, b.cy, hover or text))
        return b

    def frame(self, x0, y0, x1, y1, label: str = "", color: str = "#64748b") -> Box:
        """A dashed outline around a group of boxes, ``label`` at its top left."""
        self.shapes.append(
            dict(
                type="rect",
                x0=x0,
                y0=y0,
                x1=x1,
                y1=y1,
                fillcolor="rgba(0, 0, 0, 0)",
                line=dict(color=_rgba(color, 0.8), width=1, dash="dot"),
                layer="below",
            )
        )
        if label:
            self.notes.append(
                dict(
                    x=x0 + 0.05,
                    y=y1 - 0.05,
                    text=label,
                    showarrow=False,
                    xanchor="left",
                    yanchor="top",
                    font=dict(size=11),
                )
            )
        return Box(x0, y0, x1, y1)

    def note(self, x, y, text: str, size: int = 12, anchor: str = "center") -> None:
        self.notes.append(
            dict(x=x, y=y, text=text, showarrow=False, xanchor=anchor, yanchor="middle", font=dict(size=size))
        )

    def arrow(self, x0, y0, x1, y1, text: str = "", color: str = ARROW, dashed: bool = False) -> None:
        """An arrow from (x0, y0) to (x1, y1), ``text`` beside its middle."""
        self.notes.append(
            dict(
                x=x1,
                y=y1,
                ax=x0,
                ay=y0,
                xref="x",
                yref="y",
                axref="x",
                ayref="y",
                text="",
                showarrow=True,
                arrowhead=2,
                arrowsize=1,
                arrowwidth=1.6 if not dashed else 1.2,
                arrowcolor=color,
                standoff=2,
                startstandoff=2,
            )
        )
        if text:
            self.note((x0 + x1) / 2, (y0 + y1) / 2 + 0.13, text, size=11)

    def link(self, a: Box, b: Box, text: str = "", dashed: bool = False) -> None:
        """An arrow between two boxes, from the side of ``a`` that faces ``b``."""
        dx, dy = b.cx - a.cx, b.cy - a.cy
        if abs(dx) >= abs(dy):
            start = (a.x1, a.cy) if dx > 0 else (a.x0, a.cy)
            end = (b.x0, b.cy) if dx > 0 else (b.x1, b.cy)
        else:
            start = (a.cx, a.y1) if dy > 0 else (a.cx, a.y0)
            end = (b.cx, b.y0) if dy > 0 else (b.cx, b.y1)
        self.arrow(*start, *end, text=text, dashed=dashed)

    def figure(self, title: str, height: int) -> go.Figure:
        fig = figure(title=title, height=height, margin=dict(l=10, r=10, t=50, b=10), showlegend=False)
        fig.update_layout(shapes=self.shapes, annotations=self.notes, hovermode="closest", dragmode=False)
        fig.update_xaxes(visible=False, range=[0, self.width], fixedrange=True)
        fig.update_yaxes(visible=False, range=[0, self.height], fixedrange=True)
        if self.hover:
            xs, ys, texts = zip(*self.hover)
            fig.add_scatter(
                x=list(xs),
                y=list(ys),
                mode="markers",
                hovertext=list(texts),
                hoverinfo="text",
                marker=dict(size=28, opacity=0),
                name="",
            )
        return fig


def _n(v: int | float) -> str:
    return f"{v:,}"


# ---------------------------------------------------------------------------------------------------------------
# Chapter 1: the whole model
# ---------------------------------------------------------------------------------------------------------------


def block_stack_diagram(config: ModelConfig) -> go.Figure:
    """The model from tokens to logits: embedding, ``first_k_dense_replace`` dense blocks, the MoE blocks, the final
    norm and head, the MTP module(s) sharing embedding and head; below, what one block holds."""
    c = config
    k, L, D = c.first_k_dense_replace, c.num_hidden_layers, c.num_nextn_predict_layers
    moe = c.num_moe_layers
    d = Diagram(12, 6.2)
    tok = d.box(0.1, 4.3, 1.3, 5.3, "tokens", COLORS["slate"])
    emb = d.box(
        1.7,
        4.3,
        3.3,
        5.3,
        f"embedding<br>{_n(c.vocab_size)} × {_n(c.hidden_size)}",
        COLORS["cyan"],
        "shared with the MTP modules",
    )
    dense = d.box(
        3.7,
        4.3,
        5.5,
        5.3,
        f"dense blocks<br>× {k}",
        COLORS["blue"],
        f"layers 0-{k - 1}: MLA + a dense SwiGLU FFN of width {_n(c.intermediate_size)}",
    )
    moe_b = d.box(
        5.9,
        4.3,
        7.9,
        5.3,
        f"MoE blocks<br>× {moe}",
        COLORS["violet"],
        f"layers {k}-{L - 1}: MLA + DeepSeekMoE ({c.n_shared_experts} shared + {c.n_routed_experts} "
        f"routed experts, {c.num_experts_per_tok} per token)",
    )
    norm = d.box(8.3, 4.3, 9.5, 5.3, "RMSNorm", COLORS["slate"])
    head = d.box(9.9, 4.3, 11.3, 5.3, "output head", COLORS["cyan"], "shared with the MTP modules")
    for a, b in ((tok, emb), (emb, dense), (dense, moe_b), (moe_b, norm), (norm, head)):
        d.link(a, b)
    d.note(11.75, 4.8, "t+1", size=11)
    d.box(
        5.9,
        2.9,
        9.5,
        3.8,
        f"MTP module{'s' if D != 1 else ''} × {D}: one more block each",
        COLORS["green"],
        "Sec. 2.2: each predicts one token further, from the previous depth's hidden state "
        "and the next token's embedding",
        dashed=True,
    )
    d.arrow(7.9, 4.3, 7.9, 3.8, dashed=True)
    d.arrow(2.5, 4.3, 5.9, 3.35, "shared embedding", dashed=True)
    d.arrow(9.5, 3.35, 10.6, 4.3, "shared head", dashed=True)
    d.note(10.9, 3.2, "t+2 … t+1+D", size=11)
    d.frame(0.1, 0.1, 11.9, 2.5, f"one block (× {L}), pre-norm residual")
    x = d.box(0.3, 0.6, 1.3, 1.6, "x", COLORS["slate"])
    n1 = d.box(1.7, 0.6, 3.0, 1.6, "RMSNorm", COLORS["slate"])
    attn = d.box(
        3.4,
        0.6,
        5.4,
        1.6,
        f"MLA<br>{c.num_attention_heads} heads",
        COLORS["blue"],
        f"cache per token and layer: {_n(cache_elements_per_layer(c, 'mla'))} numbers",
    )
    add1 = d.box(5.8, 0.8, 6.4, 1.4, "+", COLORS["slate"])
    n2 = d.box(6.8, 0.6, 8.1, 1.6, "RMSNorm", COLORS["slate"])
    ffn = d.box(8.5, 0.6, 10.6, 1.6, "dense FFN<br>or DeepSeekMoE", COLORS["violet"])
    add2 = d.box(11.0, 0.8, 11.6, 1.4, "+", COLORS["slate"])
    for a, b in ((x, n1), (n1, attn), (attn, add1), (add1, n2), (n2, ffn), (ffn, add2)):
        d.link(a, b)
    d.arrow(0.8, 1.6, 0.8, 2.0)
    d.arrow(0.8, 2.0, 6.1, 2.0)
    d.arrow(6.1, 2.0, 6.1, 1.4)
    d.arrow(6.1, 0.8, 6.1, 0.35)
    d.arrow(6.1, 0.35, 11.3, 0.35)
    d.arrow(11.3, 0.35, 11.3, 0.8)
    return d.figure(f"DeepSeek-V3 from tokens to logits: {L} blocks, {D} MTP module{'s' if D != 1 else ''}", 460)


# ---------------------------------------------------------------------------------------------------------------
# Chapter 2: Multi-head Latent Attention
# ---------------------------------------------------------------------------------------------------------------


def mla_diagram(config: ModelConfig) -> go.Figure:
    """MLA (Eq. 1-11): the query and key/value low-rank paths, the decoupled RoPE parts, and the two tensors that
    are cached (highlighted): the latent c^KV and the shared rotary key k^R."""
    c = config
    H, dc, R, dn, dv = c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim
    d = Diagram(12, 6.4)
    h = d.box(0.1, 2.7, 1.4, 3.7, f"h<sub>t</sub><br>d = {_n(c.hidden_size)}", COLORS["slate"])
    # keys and values
    ckv = d.box(
        2.6,
        3.9,
        4.6,
        4.9,
        f"c<sub>t</sub><sup>KV</sup><br>d<sub>c</sub> = {_n(dc)}",
        highlight=True,
        hover=f"cached: {dc} numbers per token and layer (Eq. 1)",
    )
    kr = d.box(
        2.6,
        5.2,
        4.6,
        6.2,
        f"k<sub>t</sub><sup>R</sup> (RoPE)<br>d<sub>h</sub><sup>R</sup> = {R}",
        highlight=True,
        hover=f"cached: {R} numbers per token and layer, shared by the {H} heads (Eq. 3)",
    )
    kc = d.box(
        5.8,
        3.9,
        8.2,
        4.9,
        f"k<sub>t</sub><sup>C</sup>: {H} × {dn}",
        COLORS["blue"],
        "keys, decompressed by W^UK (Eq. 2)",
    )
    v = d.box(
        5.8,
        2.6,
        8.2,
        3.6,
        f"v<sub>t</sub><sup>C</sup>: {H} × {dv}",
        COLORS["blue"],
        "values, decompressed by W^UV (Eq. 5)",
    )
    # queries
    if c.q_lora_rank is not None:
        cq = d.box(
            2.6,
            0.9,
            4.6,
            1.9,
            f"c<sub>t</sub><sup>Q</sup><br>d<sub>c</sub>' = {_n(c.q_lora_rank)}",
            COLORS["green"],
            "query latent (Eq. 6), not cached",
        )
        d.link(h, cq, "W<sup>DQ</sup>")
    else:
        cq = h
    qc = d.box(5.8, 1.3, 8.2, 2.3, f"q<sub>t</sub><sup>C</sup>: {H} × {dn}", COLORS["green"], "Eq. 7")
    qr = d.box(5.8, 0.1, 8.2, 1.1, f"q<sub>t</sub><sup>R</sup> (RoPE): {H} × {R}", COLORS["green"], "Eq. 8")
    attn = d.box(
        9.2,
        1.9,
        11.9,
        4.3,
        f"attention<br>{H} heads of<br>{dn} + {R} (keys), {dv} (values)",
        COLORS["violet"],
        "Eq. 10-11, then W^O",
    )
    d.link(h, ckv, "W<sup>DKV</sup>")
    d.link(h, kr, "W<sup>KR</sup>")
    d.link(ckv, kc, "W<sup>UK</sup>")
    d.arrow(4.6, 4.2, 5.8, 3.1, "W<sup>UV</sup>")
    d.link(cq, qc, "W<sup>UQ</sup>")
    d.arrow(4.6, 1.2, 5.8, 0.6, "W<sup>QR</sup>")
    for src in (kc, v, qc, qr):
        d.link(src, attn)
    d.arrow(4.6, 5.7, 9.6, 4.3)
    per_token = cache_elements_per_layer(c, "mla")
    d.note(9.2, 5.7, f"cached per token and layer:<br>{dc} + {R} = {per_token} numbers", size=12, anchor="left")
    return d.figure("MLA: only the latent and the rotary key are cached (highlighted)", 430)


def mla_paths_diagram(config: ModelConfig) -> go.Figure:
    """One decode step, naive vs absorbed: what the cache holds and each step reads per cached token and layer,
    and the multiply-adds per cached token (``dsv3.viz.mla.decode_cost``)."""
    c = config
    H, dc, R, dn, dv = c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim
    cost = decode_cost(c)
    d = Diagram(12, 5.2)
    d.frame(0.05, 2.75, 11.95, 5.15, f"naive: {_n(cost['naive']['macs'])} multiply-adds per cached token")
    new = d.box(
        0.3,
        3.1,
        1.9,
        4.3,
        "c<sup>KV</sup>, k<sup>R</sup><br>of a new token",
        COLORS["slate"],
        "decompressed once, when the token arrives",
    )
    keys = d.box(
        3.0,
        3.1,
        5.6,
        4.3,
        f"cache: keys {H} × ({dn} + {R}),<br>values {H} × {dv}",
        highlight=True,
        hover=f"read at every step: {_n(cost['naive']['read'])} numbers per cached token",
    )
    q1 = d.box(6.4, 3.1, 8.4, 4.3, f"q: {H} × ({dn} + {R})", COLORS["green"])
    a1 = d.box(9.2, 3.1, 11.7, 4.3, "scores, softmax,<br>sum of values, W<sup>O</sup>", COLORS["violet"])
    d.link(new, keys, "W<sup>UK</sup>, W<sup>UV</sup>")
    d.link(keys, q1)
    d.link(q1, a1)
    d.frame(0.05, 0.05, 11.95, 2.45, f"absorbed: {_n(cost['absorbed']['macs'])} multiply-adds per cached token")
    cache2 = d.box(
        0.3,
        0.4,
        2.2,
        1.6,
        "cache<br>c<sup>KV</sup>, k<sup>R</sup>",
        highlight=True,
        hover=f"read as is: {_n(cost['absorbed']['read'])} numbers per cached token",
    )
    q2 = d.box(
        3.0,
        0.4,
        5.6,
        1.6,
        f"q̃ = W<sup>UK</sup>ᵀ q: {H} × ({dc} + {R})",
        COLORS["green"],
        "W^UK absorbed into the query",
    )
    a2 = d.box(6.4, 0.4, 8.4, 1.6, f"scores on c<sup>KV</sup>,<br>sum of c<sup>KV</sup>: {H} × {dc}", COLORS["violet"])
    o2 = d.box(9.2, 0.4, 11.7, 1.6, "× W<sup>UV</sup> W<sup>O</sup>", COLORS["blue"], "W^UV absorbed into W^O")
    d.link(cache2, q2)
    d.link(q2, a2)
    d.link(a2, o2)
    return d.figure(
        f"Decoding: the naive path reads {_n(cost['naive']['read'])} numbers per cached token, "
        f"the absorbed one {_n(cost['absorbed']['read'])}",
        400,
    )


# ---------------------------------------------------------------------------------------------------------------
# Chapter 3: DeepSeekMoE
# ---------------------------------------------------------------------------------------------------------------


def example_routing(config: ModelConfig, seed: int = 0) -> tuple[list[int], list[int]]:
    """One token routed by ``dsv3``'s Router with seeded random centroids and zero bias: (kept groups, experts)."""
    g = torch.Generator().manual_seed(seed)
    router = Router(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g) * 0.02)
        _, ids, _ = router(torch.randn(1, config.hidden_size, generator=g))
    experts = sorted(int(e) for e in ids[0])
    per = config.experts_per_group
    return sorted({e // per for e in experts}), experts


def moe_diagram(config: ModelConfig, seed: int = 0) -> go.Figure:
    """DeepSeekMoE (Eq. 12-16): the shared expert(s) every token uses, the routed experts in ``n_group`` groups
    (one per node in training), and one token's routing by ``dsv3``'s Router highlighted: at most ``topk_group``
    groups, ``num_experts_per_tok`` experts."""
    c = config
    G, per, K, M = c.n_group, c.experts_per_group, c.num_experts_per_tok, c.topk_group
    groups, chosen = example_routing(c, seed)
    cols = min(per, 8)
    rows = -(-per // cols)
    d = Diagram(12, 6.0)
    u = d.box(0.1, 2.5, 1.2, 3.5, "u<sub>t</sub>", COLORS["slate"])
    router = d.box(
        1.6,
        2.3,
        3.4,
        3.7,
        f"router<br>top-{M} groups,<br>top-{K} experts",
        COLORS["pink"],
        "sigmoid affinities + bias choose; the unbiased affinities weigh (Eq. 13-16)",
    )
    d.link(u, router)
    d.box(
        4.0,
        4.8,
        7.2,
        5.8,
        f"shared expert{'s' if c.n_shared_experts != 1 else ''} × {c.n_shared_experts}: every token",
        COLORS["green"],
        f"SwiGLU of width {c.moe_intermediate_size * c.n_shared_experts}",
    )
    d.arrow(0.65, 3.5, 4.0, 5.3)
    gw = 7.8 / G
    gh = min(3.9, 0.55 + rows * 0.45)  # (the experts' rows, at most 0.45 high each)
    for gi in range(G):
        x0 = 3.9 + gi * gw
        kept = gi in groups
        d.frame(x0 + 0.03, 0.2, x0 + gw - 0.03, 0.2 + gh, f"g{gi}", CACHED if kept else "#64748b")
        cw, ch = (gw - 0.16) / cols, min(0.45, (gh - 0.45) / rows)
        for j in range(per):
            e = gi * per + j
            r, col = divmod(j, cols)
            ex0 = x0 + 0.08 + col * cw
            ey1 = 0.2 + gh - 0.4 - r * ch
            d.box(
                ex0 + 0.01,
                ey1 - ch + 0.02,
                ex0 + cw - 0.01,
                ey1 - 0.01,
                "",
                COLORS["violet"],
                f"expert {e} (group {gi})" + (" — chosen" if e in chosen else ""),
                highlight=e in chosen,
            )
    d.arrow(3.4, 3.0, 3.9, 2.2)
    ratio = c.n_routed_experts / K
    title = (
        f"DeepSeekMoE: {c.n_shared_experts} shared + {c.n_routed_experts} routed experts in {G} groups; "
        f"this token uses groups {', '.join(map(str, groups))} and {K} experts (1 in {ratio:g})"
    )
    return d.figure(title, 420)


# ---------------------------------------------------------------------------------------------------------------
# Chapter 4: the bias feedback loop
# ---------------------------------------------------------------------------------------------------------------


def bias_loop_diagram(config: ModelConfig, gamma: float) -> go.Figure:
    """Auxiliary-loss-free balancing (Sec. 2.1.2, Eq. 16): the bias only chooses, the load it causes moves it."""
    c = config
    d = Diagram(12, 5.0)
    s = d.box(0.2, 3.3, 2.4, 4.5, "affinities s<sub>i,t</sub><br>sigmoid(u<sub>t</sub>ᵀe<sub>i</sub>)", COLORS["blue"])
    plus = d.box(3.2, 3.3, 5.2, 4.5, "s<sub>i,t</sub> + b<sub>i</sub>", COLORS["pink"], "selection scores only")
    top = d.box(
        6.0,
        3.3,
        8.4,
        4.5,
        f"top-{c.num_experts_per_tok} of {c.n_routed_experts}<br>(in {c.topk_group} of {c.n_group} groups)",
        COLORS["violet"],
    )
    gate = d.box(
        9.2,
        3.3,
        11.8,
        4.5,
        "gating g<sub>i,t</sub> from s<br>(no bias): output",
        COLORS["green"],
        "the bias never enters the output, so it sends no gradient",
    )
    loads = d.box(6.0, 0.5, 8.4, 1.7, "expert loads c<sub>i</sub><br>over the batch", COLORS["slate"])
    rule = d.box(
        1.8,
        0.5,
        5.2,
        1.7,
        f"b<sub>i</sub> ← b<sub>i</sub> + γ·sign(c̄ − c<sub>i</sub>)<br>γ = {gamma:g}",
        highlight=True,
        hover="after every step: under-loaded experts up, over-loaded down",
    )
    d.link(s, plus)
    d.link(plus, top)
    d.link(top, gate, "chosen i")
    d.link(top, loads, "count")
    d.link(loads, rule)
    d.arrow(3.5, 1.7, 3.9, 3.3, "b<sub>i</sub>", color=CACHED)
    d.arrow(1.3, 3.3, 1.3, 2.6)
    d.note(1.3, 2.35, "gradient only from<br>the language-model loss", size=11)
    return d.figure("The bias loop: the bias chooses the experts, the load it causes moves the bias", 360)


# ---------------------------------------------------------------------------------------------------------------
# Chapter 5: Multi-Token Prediction
# ---------------------------------------------------------------------------------------------------------------


def mtp_diagram(config: ModelConfig) -> go.Figure:
    """The main model and ``num_nextn_predict_layers`` sequential MTP modules (Eq. 21-25): each combines the
    previous depth's hidden state with the embedding of the next token, runs one block, and predicts with the shared
    output head; the embedding is shared too."""
    c = config
    D = max(1, c.num_nextn_predict_layers)
    rows = D + 1
    d = Diagram(12, 1.6 * rows + 0.6)
    d.box(
        0.1,
        0.3,
        1.7,
        1.6 * rows + 0.1,
        "shared<br>embedding",
        COLORS["cyan"],
        f"{_n(c.vocab_size)} × {_n(c.hidden_size)}, one table for every depth",
    )
    d.box(10.3, 0.3, 11.9, 1.6 * rows + 0.1, "shared<br>output head", COLORS["cyan"])
    prev = None
    for k in range(rows):
        y0 = 1.6 * (rows - 1 - k) + 0.4
        if k == 0:
            blk = d.box(
                4.6,
                y0,
                8.6,
                y0 + 1.1,
                f"main model: {c.num_hidden_layers} blocks → h<sup>0</sup>",
                COLORS["blue"],
                "tokens t_1..t_T",
            )
            d.arrow(1.7, y0 + 0.55, 4.6, y0 + 0.55, "t<sub>i</sub>")
            target = "t<sub>i+1</sub>"
        else:
            comb = d.box(
                2.4,
                y0,
                4.2,
                y0 + 1.1,
                "RMSNorm both,<br>concat, M<sub>k</sub>",
                COLORS["green"],
                f"Eq. 21: [h^{k - 1}; Emb(t_(i+{k}))] (2d = {2 * c.hidden_size}) → d",
            )
            blk = d.box(
                4.6,
                y0,
                8.6,
                y0 + 1.1,
                f"MTP module {k}: one block → h<sup>{k}</sup>",
                COLORS["green"],
                "Eq. 22",
                dashed=True,
            )
            d.arrow(1.7, y0 + 0.55, 2.4, y0 + 0.55, f"t<sub>i+{k}</sub>")
            d.link(comb, blk)
            d.arrow(prev.cx - 0.8, prev.y0, comb.cx, comb.y1, f"h<sup>{k - 1}</sup>")
            target = f"t<sub>i+{k + 1}</sub>"
        d.arrow(8.6, y0 + 0.55, 10.3, y0 + 0.55, "predicts " + target)
        prev = blk
    return d.figure(
        f"Multi-token prediction: {c.num_nextn_predict_layers} sequential module"
        f"{'s' if c.num_nextn_predict_layers != 1 else ''}, embedding and head shared",
        140 + 95 * rows,
    )


# ---------------------------------------------------------------------------------------------------------------
# Chapter 6: one speculative round
# ---------------------------------------------------------------------------------------------------------------


def speculative_round_diagram(config: ModelConfig, num_draft: int | None = None) -> go.Figure:
    """One round of speculative decoding with the MTP module as drafter: draft ``num_draft`` tokens (default: the
    MTP depth), verify them with one forward of the main model over all of them, keep the accepted prefix plus one
    token from the main model; the two rows show all drafts accepted and the first one rejected."""
    k = num_draft or max(1, config.num_nextn_predict_layers)
    d = Diagram(12, 5.0)
    w = 0.9
    for row, (label, accept) in enumerate((("all accepted", k), ("first draft rejected", 0))):
        y0 = 2.9 - 2.5 * row
        d.note(
            0.1,
            y0 + 1.65,
            f"<b>{label}</b>: {accept + 1} token{'s' if accept else ''} this round",
            size=12,
            anchor="left",
        )
        x = 0.1
        for i in range(3):
            d.box(x, y0, x + w, y0 + w, f"t<sub>n-{2 - i}</sub>" if i < 2 else "t<sub>n</sub>", COLORS["slate"])
            x += w + 0.1
        x += 0.2
        drafts = []
        for j in range(k):
            ok = j < accept
            drafts.append(
                d.box(
                    x,
                    y0,
                    x + w,
                    y0 + w,
                    f"d<sub>{j + 1}</sub>",
                    COLORS["green"] if ok else COLORS["red"],
                    "drafted by the MTP module" + (", accepted" if ok else ", rejected"),
                    dashed=True,
                )
            )
            x += w + 0.1
        ver = d.box(
            x + 0.6,
            y0 - 0.1,
            x + 3.4,
            y0 + w + 0.1,
            f"main model: one forward<br>over {k + 1} positions",
            COLORS["blue"],
            "its logits give p at every draft position and one more",
        )
        d.arrow(x, y0 + w / 2, x + 0.6, y0 + w / 2)
        extra = d.box(
            x + 4.0,
            y0,
            x + 4.0 + 1.5,
            y0 + w,
            "next token" if accept == k else "correction",
            highlight=True,
            hover="sampled from p (all accepted) or from norm(max(0, p − q)) (rejected)",
        )
        d.link(ver, extra)
    return d.figure(
        f"A speculative round with {k} draft token{'s' if k != 1 else ''}: accept a prefix, "
        "then one token from the main model",
        380,
    )


# ---------------------------------------------------------------------------------------------------------------
# Chapter 9: expert placement
# ---------------------------------------------------------------------------------------------------------------


def expert_placement_diagram(
    config: ModelConfig, nodes: int | None = None, gpus_per_node: int = 8, seed: int = 0
) -> go.Figure:
    """Routed experts placed on ``nodes`` x ``gpus_per_node`` GPUs (default: one group per node, as in training),
    each GPU holding N_r / GPUs experts; one token's routing (``example_routing``) highlights the GPUs and nodes it
    reaches: at most ``topk_group`` nodes, so its all-to-all crosses at most that many node boundaries."""
    c = config
    nodes = nodes or c.n_group
    gpus = nodes * gpus_per_node
    if c.n_routed_experts % gpus:
        raise ValueError(
            f"expert_placement_diagram: {c.n_routed_experts} routed experts do not split evenly over "
            f"{nodes} nodes x {gpus_per_node} GPUs"
        )
    per_gpu = c.n_routed_experts // gpus
    groups, chosen = example_routing(c, seed)
    hit = {e // per_gpu for e in chosen}
    d = Diagram(12, 1.2 * nodes / 2 + 1.0 if nodes > 4 else 3.4)
    cols = 2 if nodes > 4 else 1
    per_col = -(-nodes // cols)
    nw, nh = 11.8 / cols, (d.height - 0.4) / per_col
    for n in range(nodes):
        col, r = divmod(n, per_col)
        x0, y1 = 0.1 + col * nw, d.height - 0.1 - r * nh
        reached = any(gpu // gpus_per_node == n for gpu in hit)
        d.frame(x0 + 0.05, y1 - nh + 0.1, x0 + nw - 0.05, y1, f"node {n}", CACHED if reached else "#64748b")
        gw = (nw - 1.0) / gpus_per_node
        for gi in range(gpus_per_node):
            gpu = n * gpus_per_node + gi
            first = gpu * per_gpu
            label = f"{first}" if per_gpu == 1 else f"{first}-{first + per_gpu - 1}"
            d.box(
                x0 + 0.9 + gi * gw,
                y1 - nh + 0.2,
                x0 + 0.9 + (gi + 1) * gw - 0.05,
                y1 - 0.15,
                label if gw > 0.55 else "",
                COLORS["violet"],
                f"GPU {gpu}: experts {label}" + (" — reached by this token" if gpu in hit else ""),
                highlight=gpu in hit,
                size=9,
            )
    return d.figure(
        f"{c.n_routed_experts} routed experts on {nodes} nodes × {gpus_per_node} GPUs ({per_gpu} per "
        f"GPU): one token reaches {len(hit)} GPUs on {len({g // gpus_per_node for g in hit})} nodes "
        f"(at most {c.topk_group})",
        120 + int(d.height * 60),
    )


# ---------------------------------------------------------------------------------------------------------------
# Chapter 10: FP8 training
# ---------------------------------------------------------------------------------------------------------------


def fp8_linear_diagram(config: ModelConfig, tokens: int = 4096) -> go.Figure:
    """One FP8 linear layer in training (Sec. 3.3, Fig. 6): an expert's ``up_proj`` (d -> d_e of the config) as
    ``dsv3.kernels.fp8_training_linear`` runs it. Forward: the input quantized per 1 x 128 tile, the fp32 master
    weight per 128 x 128 block, the Fprop GEMM accumulating in fp32. Backward: the output gradient quantized per tile
    for Dgrad and (transposed) for Wgrad, which reads the input from its FP8 copy (the one thing cached,
    highlighted); the weight gradient updates the fp32 master through AdamW with bf16 moments."""
    c = config
    d_in, d_out = c.hidden_size, c.moe_intermediate_size
    fp8_bytes, bf16_bytes = cached_input_bytes(tokens, d_in), cached_input_bytes(tokens, d_in, fp8=False)
    d = Diagram(14, 6.6)
    d.frame(0.1, 3.5, 13.9, 6.5, "forward (Fprop)")
    d.frame(0.1, 0.1, 13.9, 3.3, "backward (Dgrad, Wgrad) and update")
    x = d.box(0.3, 5.0, 2.5, 6.0, f"X  (M × {d_in})<br>bf16 input", COLORS["slate"])
    xq = d.box(
        3.3,
        5.0,
        6.1,
        6.0,
        f"X̂ e4m3 + scale per<br>1 × {BLOCK} tile",
        hover=f"cached for the backward: {fp8_bytes / tokens / d_in:.3f} bytes per element instead of 2 "
        f"({fp8_bytes / bf16_bytes:.0%} of bf16) for {tokens:,} tokens",
        highlight=True,
    )
    w = d.box(0.3, 3.7, 2.5, 4.7, f"W  ({d_out} × {d_in})<br>fp32 master", COLORS["green"])
    wq = d.box(3.3, 3.7, 6.1, 4.7, f"Ŵ e4m3 + scale per<br>{BLOCK} × {BLOCK} block", COLORS["blue"])
    fprop = d.box(
        7.0,
        4.3,
        10.0,
        5.5,
        f"Fprop  Y = X̂ Ŵᵀ<br>fp32 accumulation,<br>promoted every {BLOCK}",
        COLORS["violet"],
        "tensor cores multiply e4m3 tiles; every 128 products the partial sum is scaled and added in fp32",
    )
    y = d.box(11.0, 4.4, 13.7, 5.4, f"Y  (M × {d_out})<br>bf16 output", COLORS["slate"])
    d.link(x, xq, "act_quant")
    d.link(w, wq, "weight_quant")
    d.link(xq, fprop)
    d.link(wq, fprop)
    d.link(fprop, y)
    dy = d.box(11.0, 1.9, 13.7, 2.9, f"dY  (M × {d_out})<br>from the next layer", COLORS["slate"])
    dyq = d.box(7.6, 1.9, 10.2, 2.9, f"dŶ e4m3 per 1 × {BLOCK}<br>(along {d_out})", COLORS["blue"])
    dgrad = d.box(4.2, 1.9, 6.8, 2.9, "Dgrad  dX = dŶ Ŵ<br>→ previous layer", COLORS["violet"])
    dytq = d.box(7.6, 0.3, 10.2, 1.3, f"dŶᵀ, X̂ᵀ e4m3 per 1 × {BLOCK}<br>(along the M tokens)", COLORS["blue"])
    wgrad = d.box(4.2, 0.3, 6.8, 1.3, "Wgrad  dW = dŶᵀ X̂<br>fp32", COLORS["violet"])
    opt = d.box(0.3, 0.3, 3.4, 1.3, "AdamW: moments bf16,<br>update fp32 master W", COLORS["green"])
    d.link(dy, dyq, "act_quant")
    d.link(dyq, dgrad)
    d.arrow(12.35, 1.9, 10.2, 0.8)
    d.link(dytq, wgrad)
    d.link(wgrad, opt)
    d.arrow(wq.cx, wq.y0, dgrad.cx, dgrad.y1, "Ŵ reused", dashed=True)
    d.arrow(xq.x1, xq.y0, dytq.x0 + 0.15, dytq.y1, "X̂ from the cache", color=CACHED, dashed=True)
    d.arrow(1.4, 1.3, 1.4, 3.7, dashed=True)
    return d.figure(
        f"An FP8 linear layer in training (expert up_proj, {d_in} → {d_out}): every GEMM in e4m3, the input cached "
        "in FP8",
        470,
    )
