"""Figures and helpers of Chapter 5, Multi-Token Prediction (paper Sec. 2.2, Eq. 21-25; Sec. 4.2 for lambda).

Everything here measures a real ``DeepSeekV3``: the causal chain (measured in Chapter 5's own cells by changing one
input token at a time, recorded in a ``Chain`` and drawn by ``chain_figure``), the sharing of embedding and output
head by hooks on the model's own modules (``shared_module_calls``), the loss weight from
``dsv3.train.mtp_weight_at``, and the MTP head's agreement with the main model from forward passes over validation
batches (``mtp_agreement``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..model import DeepSeekV3
from ..train import TrainConfig, mtp_weight_at
from .display import COLORS, figure

# Sec. 4.2 of the report: "the MTP loss weight lambda is set to 0.3 for the first 10T tokens, and to 0.1 for the
# remaining 4.8T tokens"; the MTP depth D is 1 (one extra token).
PAPER_TOKENS_T = 14.8  # pre-training tokens, trillions
PAPER_LAMBDA = ((0, 0.3), (10.0, 0.1))  # (from this many trillion tokens on, lambda)
PAPER_DEPTH = 1


# ---------------------------------------------------------------------------------------------------------------
# Token labels
# ---------------------------------------------------------------------------------------------------------------


def token_label(piece: str) -> str:
    """A token's text made visible in a figure cell: spaces as ␣, newlines as ⏎."""
    return piece.replace(" ", "␣").replace("\n", "⏎") or "∅"


def token_labels(tokenizer, ids: Sequence[int] | torch.Tensor) -> list[str]:
    """One visible label per token id (``token_label`` of its decoded text)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return [token_label(tokenizer.decode([i])) for i in ids]


# ---------------------------------------------------------------------------------------------------------------
# The causal chain, measured
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Chain:
    """What each depth of a real forward pass depends on (measured by Chapter 5's ``dependence`` probe).

    ``seen[k, i, j]`` is True when changing input token j changes the logits of depth k (0 = the main model) at
    position i; ``positions[k]`` is how many positions depth k predicts at (``T - k``, read off the logits'
    shapes). Depth k at position i predicts token i + k + 1 of the window (the label alignment of Eq. 24-25).
    ``min_changed`` / ``max_unchanged`` are the largest logit change among the outputs that did not depend on the
    changed token and the smallest among those that did: the gap between them is what makes ``seen`` exact.
    """

    seen: torch.Tensor  # (D + 1, T, T) bool
    positions: list[int]  # D + 1 entries
    min_changed: float
    max_unchanged: float

    @property
    def depths(self) -> int:
        return len(self.positions) - 1

    def target(self, depth: int, position: int) -> int:
        """Index in the window of the token depth ``depth`` predicts at ``position``."""
        return position + depth + 1

    def expected(self) -> torch.Tensor:
        """The chain of Sec. 2.2 as a mask: depth k at position i sees tokens 0 .. i + k (same shape as ``seen``)."""
        D1, T, _ = self.seen.shape
        i = torch.arange(T)[:, None]
        j = torch.arange(T)[None, :]
        out = torch.zeros(D1, T, T, dtype=torch.bool)
        for k in range(D1):
            out[k, : self.positions[k]] = (j <= i + k)[: self.positions[k]]
        return out


def dependence(model: DeepSeekV3, ids: torch.Tensor, tol: float = 1e-5) -> Chain:
    """Measure the causal chain on a real forward: replace one token at a time (T + 1 forwards of ``ids`` (T,) or
    (1, T)) and record which positions of the main model and of every MTP depth change their logits by more than
    ``tol`` (relative to the largest logit). ``model`` should be in eval mode."""
    ids = ids.reshape(1, -1).to(model.device)
    T, V = ids.shape[1], model.config.vocab_size

    def outputs(x: torch.Tensor) -> list[torch.Tensor]:
        out = model(x, return_mtp=True)
        return [out.logits[0]] + [lg[0] for lg in out.mtp_logits]  # (T - k, V) per depth k

    base = outputs(ids)
    scale = max(float(o.abs().max()) for o in base)
    positions = [o.shape[0] for o in base]
    seen = torch.zeros(len(base), T, T, dtype=torch.bool)
    changed_min, unchanged_max = math.inf, 0.0
    for j in range(T):
        other = ids.clone()
        other[0, j] = (int(ids[0, j]) + V // 2) % V  # a different token, far away in the vocabulary
        for k, (a, b) in enumerate(zip(base, outputs(other))):
            delta = ((a - b).abs().amax(dim=-1) / scale).cpu()  # (T - k,)
            hit = delta > tol
            seen[k, : positions[k], j] = hit
            if hit.any():
                changed_min = min(changed_min, float(delta[hit].min()))
            if (~hit).any():
                unchanged_max = max(unchanged_max, float(delta[~hit].max()))
    return Chain(seen, positions, changed_min, unchanged_max)


def chain_figure(chain: Chain, labels: Sequence[str], title: str = "The causal chain of MTP, measured") -> go.Figure:
    """Rows: the main model (depth 0) and each MTP depth; columns: the tokens of the window (``labels``: T + 1
    tokens, the last one only ever a target). A slider picks the position i: each row shows which tokens that
    depth's output at i depends on (measured), the token it reads through its own embedding input (t_{i+k}), and
    the token it is trained to predict (t_{i+k+1})."""
    D1, T, _ = chain.seen.shape
    if len(labels) != T + 1:
        raise ValueError(
            f"labels must name the T + 1 = {T + 1} tokens of the window (inputs and the last label), got {len(labels)}"
        )
    names = ["main model (k = 0)"] + [f"MTP module k = {k}" for k in range(1, D1)]
    # categories: 0 not seen, 1 seen through the hidden state / attention, 2 read by this depth's embedding, 3 target
    colors = ["rgba(128, 128, 128, 0.12)", "rgba(59, 130, 246, 0.45)", COLORS["orange"], COLORS["green"]]
    scale = [
        [0.0, colors[0]],
        [0.25, colors[0]],
        [0.25, colors[1]],
        [0.5, colors[1]],
        [0.5, colors[2]],
        [0.75, colors[2]],
        [0.75, colors[3]],
        [1.0, colors[3]],
    ]

    def grid(i: int) -> tuple[list[list[int]], list[list[str]], list[list[str]]]:
        z, text, hover = [], [], []
        for k in range(D1):
            row, row_hover = [], []
            for j in range(T + 1):
                if i >= chain.positions[k]:
                    c, what = 0, "no prediction at this position"
                elif j == chain.target(k, i):
                    c, what = 3, f"target: depth {k} at position {i} predicts t<sub>{j}</sub>"
                elif j < T and chain.seen[k, i, j] and j == i + k:
                    c, what = 2, ("input token" if k == 0 else f"read through Emb(t<sub>i+{k}</sub>)")
                elif j < T and chain.seen[k, i, j]:
                    c, what = 1, "seen (the output changes when this token changes)"
                else:
                    c, what = 0, "not seen"
                row.append(c)
                row_hover.append(f"{names[k]}, position {i}<br>t<sub>{j}</sub> = {labels[j]}<br>{what}")
            z.append(row)
            text.append(list(labels) if i < chain.positions[k] else [""] * (T + 1))
            hover.append(row_hover)
        return z, text, hover

    x = [f"{j}" for j in range(T + 1)]

    def heatmap(i: int) -> go.Heatmap:
        z, text, hover = grid(i)
        return go.Heatmap(
            z=z,
            x=x,
            y=names,
            text=text,
            texttemplate="%{text}",
            customdata=hover,
            hovertemplate="%{customdata}<extra></extra>",
            colorscale=scale,
            zmin=-0.5,
            zmax=3.5,
            showscale=False,
            xgap=2,
            ygap=2,
        )

    start = min(2, T - 1)
    fig = figure(title=title, height=230 + 60 * D1, margin=dict(l=60, r=20, t=80, b=90))
    fig.add_trace(heatmap(start))
    fig.frames = [go.Frame(data=[heatmap(i)], name=str(i)) for i in range(T)]
    fig.update_layout(
        xaxis=dict(title="token index j in the window", type="category", showgrid=False, zeroline=False),
        yaxis=dict(autorange="reversed", type="category", showgrid=False),
        sliders=[
            dict(
                active=start,
                currentvalue=dict(prefix="position i = "),
                pad=dict(t=60),
                steps=[
                    dict(
                        label=str(i),
                        method="animate",
                        args=[
                            [str(i)],
                            dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0)),
                        ],
                    )
                    for i in range(T)
                ],
            )
        ],
    )
    for name, color in zip(("seen", "embedding input", "target"), colors[1:]):  # a legend for the categories
        fig.add_trace(
            go.Scatter(
                x=[None], y=[None], mode="markers", name=name, marker=dict(size=12, symbol="square", color=color)
            )
        )
    fig.update_layout(legend=dict(orientation="h", y=1.02, x=1.0, xanchor="right", yanchor="bottom"))
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Shared embedding and output head
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def shared_module_calls(model: DeepSeekV3, ids: torch.Tensor) -> dict[str, list[tuple[int, ...]]]:
    """Run ``model(ids, return_mtp=True)`` with hooks on the model's one embedding and one output head, and return
    the input shapes each received: ``{"embed_tokens": [...], "lm_head": [...]}``. With D MTP modules each list has
    1 + D entries (the main pass, then depth k on T - k positions): the MTP modules use these very modules."""
    calls: dict[str, list[tuple[int, ...]]] = {"embed_tokens": [], "lm_head": []}
    handles = [
        getattr(model, name).register_forward_hook(
            lambda mod, inp, out, name=name: calls[name].append(tuple(inp[0].shape))
        )
        for name in calls
    ]
    try:
        model(ids.to(model.device), return_mtp=True)
    finally:
        for h in handles:
            h.remove()
    return calls


def vocab_sized_parameters(module: torch.nn.Module, vocab_size: int) -> list[str]:
    """Names of the parameters of ``module`` with a dimension of ``vocab_size`` (an own embedding or head)."""
    return [n for n, p in module.named_parameters() if vocab_size in p.shape]


def gradient_norms(model: DeepSeekV3, ids: torch.Tensor, labels: torch.Tensor) -> dict[str, dict[str, float]]:
    """Where each loss sends gradient: ``{loss: {part: gradient norm}}`` for ``L_Main`` and ``L_MTP`` backpropagated
    separately, over the parts "main blocks", "shared embedding", "shared output head" and "MTP modules".

    The main loss never reaches the MTP modules (norm 0: they run after the main model's output); the MTP loss
    reaches everything, the main blocks too, through h^0 (Eq. 21). Gradients are cleared afterwards."""
    parts = {
        "main blocks": list(model.layers.parameters()) + list(model.norm.parameters()),
        "shared embedding": [model.embed_tokens.weight],
        "shared output head": [model.lm_head.weight],
        "MTP modules": list(model.mtp.parameters()),
    }
    norms: dict[str, dict[str, float]] = {}
    ids, labels = ids.to(model.device), labels.to(model.device)
    for name in ("main_loss", "mtp_loss"):
        model.zero_grad(set_to_none=True)
        getattr(model(ids, labels=labels), name).backward()
        norms[name] = {
            part: math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in params if p.grad is not None))
            for part, params in parts.items()
        }
    model.zero_grad(set_to_none=True)
    return norms


# ---------------------------------------------------------------------------------------------------------------
# The loss weight lambda
# ---------------------------------------------------------------------------------------------------------------


def paper_lambda(fraction: float) -> float:
    """lambda at a fraction of the paper's 14.8T pre-training tokens (Sec. 4.2)."""
    tokens = fraction * PAPER_TOKENS_T
    value = PAPER_LAMBDA[0][1]
    for start, lam in PAPER_LAMBDA:
        if tokens >= start:
            value = lam
    return value


def lambda_schedule(cfg: TrainConfig) -> list[float]:
    """lambda of every optimizer step of a run (``dsv3.train.mtp_weight_at``)."""
    return [mtp_weight_at(s, cfg) for s in range(cfg.steps)]


def schedule_table(cfg: TrainConfig, depth: int) -> list[tuple[str, str, str]]:
    """``(quantity, paper, dsv3)`` rows: the MTP depth and the lambda schedule of the report next to a TrainConfig."""
    switch_paper = PAPER_LAMBDA[1][0] / PAPER_TOKENS_T
    first_low = next((s for s in range(cfg.steps) if mtp_weight_at(s, cfg) != cfg.mtp_weight), cfg.steps)
    return [
        ("MTP depth D", str(PAPER_DEPTH), str(depth)),
        ("lambda, first phase", f"{PAPER_LAMBDA[0][1]}", f"{cfg.mtp_weight}"),
        ("lambda, second phase", f"{PAPER_LAMBDA[1][1]}", f"{cfg.mtp_weight_final}"),
        (
            "switch after",
            f"10T of 14.8T tokens ({switch_paper:.1%})",
            f"step {first_low} of {cfg.steps} ({first_low / cfg.steps:.1%})",
        ),
    ]


def lambda_figure(cfg: TrainConfig, history: Sequence[dict] | None = None) -> go.Figure:
    """Left: the paper's lambda over its 14.8T pre-training tokens. Right: lambda over the optimizer steps of a
    TrainConfig (``mtp_weight_at``), and, when a training ``history`` is given, the lambda each step logged and the
    weighted MTP term lambda x L_MTP it added to the loss (second axis)."""
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.12,
        specs=[[{}, {"secondary_y": True}]],
        subplot_titles=("paper (Sec. 4.2)", f"dsv3 TrainConfig, {cfg.steps} steps"),
    )
    fig.update_layout(title="MTP loss weight λ over training", height=340, margin=dict(t=80))
    ends = [start for start, _ in PAPER_LAMBDA[1:]] + [PAPER_TOKENS_T]  # each phase runs until the next one
    xs = [x for (start, _), end in zip(PAPER_LAMBDA, ends) for x in (start, end)]
    ys = [lam for _, lam in PAPER_LAMBDA for _ in range(2)]
    fig.add_trace(
        go.Scatter(x=xs, y=ys, mode="lines", name="λ, paper", line=dict(color=COLORS["slate"], width=3)), row=1, col=1
    )
    lam = lambda_schedule(cfg)
    fig.add_trace(
        go.Scatter(
            x=list(range(1, cfg.steps + 1)),
            y=lam,
            mode="lines",
            name="λ, mtp_weight_at",
            line=dict(shape="hv", color=COLORS["blue"], width=3),
        ),
        row=1,
        col=2,
    )
    if history is not None:
        steps, logged = curves(history, "mtp_weight")
        fig.add_trace(
            go.Scatter(
                x=steps[::5],
                y=logged[::5],
                mode="markers",
                name="λ, logged by train()",
                marker=dict(color=COLORS["blue"], size=5, symbol="circle-open"),
            ),
            row=1,
            col=2,
        )
        steps, mtp = curves(history, "mtp_loss")
        term = [round(w * m, 4) for w, m in zip(logged, mtp)]
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=term,
                mode="lines",
                name="λ · L<sub>MTP</sub> (right axis)",
                line=dict(color=COLORS["orange"], width=1.5),
            ),
            row=1,
            col=2,
            secondary_y=True,
        )
        fig.update_yaxes(
            title_text="λ · L<sub>MTP</sub> (nats)",
            row=1,
            col=2,
            secondary_y=True,
            showgrid=False,
            rangemode="tozero",
            tickmode="auto",
        )
    fig.update_xaxes(title_text="tokens (trillions)", row=1, col=1)
    fig.update_xaxes(title_text="optimizer step", row=1, col=2)
    fig.update_yaxes(title_text="λ", range=[0, 0.35], row=1, col=1)
    fig.update_yaxes(title_text="λ", range=[0, 0.35], row=1, col=2, secondary_y=False)
    fig.update_layout(legend=dict(orientation="h", y=-0.25, x=0, yanchor="top"))
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Training with and without MTP
# ---------------------------------------------------------------------------------------------------------------


def smooth(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as training dashboards draw noisy losses)."""
    out, avg = [], 0.0
    for t, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**t))
    return out


def curves(history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the history entries that carry it."""
    rows = [(h["step"], h[key]) for h in history if key in h]
    return [s for s, _ in rows], [v for _, v in rows]


def runs_figure(histories: Mapping[str, Sequence[dict]], digits: int = 4) -> go.Figure:
    """Two panels. Left: the main next-token loss of each run (training, smoothed; validation, markers). Right: for
    each run that trained its MTP module (lambda > 0 at some step), the depth-1 loss next to its main loss, both on
    the validation batches. Values rounded to
    ``digits`` so that the figure is byte-stable."""
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.1,
        subplot_titles=(
            "main next-token loss L<sub>Main</sub>",
            "MTP run: L<sub>Main</sub> vs L<sub>MTP</sub> (validation)",
        ),
    )
    fig.update_layout(title="Training with and without MTP", height=400, margin=dict(t=90))
    palette = [COLORS["blue"], COLORS["orange"], COLORS["green"], COLORS["violet"]]
    r = lambda xs: [round(v, digits) for v in xs]  # noqa: E731
    for (name, hist), color in zip(histories.items(), palette):
        steps, train = curves(hist, "main_loss")
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=r(smooth(train)),
                mode="lines",
                name=f"{name}: train (smoothed)",
                line=dict(color=color, width=1.5),
                opacity=0.6,
                legendgroup=name,
            ),
            row=1,
            col=1,
        )
        vs, val = curves(hist, "val_loss")
        fig.add_trace(
            go.Scatter(
                x=vs,
                y=r(val),
                mode="lines+markers",
                name=f"{name}: validation",
                line=dict(color=color, width=2.5),
                legendgroup=name,
            ),
            row=1,
            col=1,
        )
        vs, vm = curves(hist, "val_mtp_loss")
        if any(h.get("mtp_weight", 0) > 0 for h in hist) and any(v > 0 for v in vm):  # runs that trained MTP
            fig.add_trace(
                go.Scatter(
                    x=vs,
                    y=r(val),
                    mode="lines+markers",
                    name=f"{name}: L<sub>Main</sub>",
                    line=dict(color=color, width=2.5),
                    showlegend=False,
                ),
                row=1,
                col=2,
            )
            fig.add_trace(
                go.Scatter(
                    x=vs,
                    y=r(vm),
                    mode="lines+markers",
                    name=f"{name}: L<sub>MTP</sub> (depth 1)",
                    line=dict(color=color, width=2.5, dash="dash"),
                ),
                row=1,
                col=2,
            )
    fig.update_xaxes(title_text="optimizer step")
    fig.update_yaxes(title_text="cross-entropy (nats)", col=1)
    fig.update_layout(legend=dict(orientation="h", y=-0.22, x=0, yanchor="top"))
    return fig


@torch.no_grad()
def mtp_agreement(model: DeepSeekV3, batches: Sequence) -> list[dict[str, float]]:
    """For each MTP depth k, over validation batches (objects with ``input_ids`` and ``labels``, teacher-forced):

    - ``main_acc``: the main model's top-1 at position i + k equals the true t_{i+k+1};
    - ``mtp_acc``: depth k's top-1 at position i equals t_{i+k+1} (the same token, predicted k steps earlier);
    - ``agree``: the two top-1 predictions are the same token, which is what greedy speculative decoding needs
      for depth k's draft to be accepted (a preview of Chapter 6);
    - ``positions``: how many predictions were compared.
    """
    model.eval()
    D = len(model.mtp)
    sums = [dict(main_acc=0, mtp_acc=0, agree=0, positions=0) for _ in range(D)]
    for b in batches:
        out = model(b.input_ids.to(model.device), return_mtp=True)
        main = out.logits.argmax(-1).cpu()  # (B, T): prediction of t_{i+1}
        for k, lg in enumerate(out.mtp_logits, 1):
            draft = lg.argmax(-1).cpu()  # (B, T - k): prediction of t_{i+k+1}
            later = main[:, k:]  # (B, T - k): the main model's prediction of the same token, at position i + k
            truth = b.labels[:, k:]  # (B, T - k): t_{i+k+1}
            s = sums[k - 1]
            s["main_acc"] += int((later == truth).sum())
            s["mtp_acc"] += int((draft == truth).sum())
            s["agree"] += int((draft == later).sum())
            s["positions"] += truth.numel()
    return [
        dict(
            main_acc=s["main_acc"] / s["positions"],
            mtp_acc=s["mtp_acc"] / s["positions"],
            agree=s["agree"] / s["positions"],
            positions=s["positions"],
        )
        for s in sums
    ]


def agreement_figure(stats: Mapping[str, dict[str, float]], digits: int = 3) -> go.Figure:
    """Grouped bars of ``mtp_agreement`` depth-1 statistics for named models (e.g. at initialization, trained)."""
    fig = figure(
        title="Depth-1 MTP head vs the main model (validation, top-1)",
        height=340,
        yaxis=dict(title="fraction of positions", range=[0, 1], tickformat=".0%"),
        barmode="group",
    )
    keys = (
        ("main_acc", "main model right about t<sub>i+2</sub> (at position i+1)"),
        ("mtp_acc", "MTP head right about t<sub>i+2</sub> (at position i)"),
        ("agree", "MTP head agrees with the main model"),
    )
    palette = [COLORS["blue"], COLORS["orange"], COLORS["green"]]
    for (key, label), color in zip(keys, palette):
        y = [round(s[key], digits) for s in stats.values()]
        fig.add_trace(
            go.Bar(
                x=list(stats), y=y, name=label, marker_color=color, text=[f"{v:.1%}" for v in y], textposition="outside"
            )
        )
    fig.update_layout(legend=dict(orientation="h", y=-0.15, x=0, yanchor="top"))
    return fig
