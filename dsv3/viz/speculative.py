"""Figures and helpers of Chapter 6, speculative decoding with the MTP modules (paper Sec. 2.2 and 5.4.3).

``trace`` runs the real ``dsv3.generate`` and records every verification forward of the main model, so a round
(the committed token and the drafts going in, the main model's argmax coming out, the accepted prefix, the
correction or bonus token) is read off the computation itself, never re-enacted. ``acceptance_sweep`` measures
acceptance and tokens per forward over prompts and draft lengths; ``accept_resample`` and ``monte_carlo`` show on a
hand-made pair of distributions that the accept/resample rule of ``dsv3.generate.speculative_verify`` samples the
target exactly; ``first_tokens`` compares plain and speculative sampling of a real model with the exact target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..generate import Generation, generate, greedy_verify, residual_distribution, sampling_probs, speculative_verify
from ..model import DeepSeekV3
from .display import COLORS, figure
from .mtp import token_label

# Sec. 5.4.3 of the report: "the acceptance rate of the second token prediction ranges between 85% and 90%",
# which "enables DeepSeek-V3 to achieve a significantly improved decoding speed, delivering 1.8 times TPS".
PAPER_ACCEPTANCE = (0.85, 0.90)
PAPER_TPS_SPEEDUP = 1.8


# ---------------------------------------------------------------------------------------------------------------
# One round, traced from the real generate
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Round:
    """One verification forward of greedy speculative decoding (batch of one).

    ``inputs`` = [newest committed token, draft 1, ..., draft k] went into the main model; ``verified[j]`` is its
    argmax after inputs[j], i.e. its own choice for the token that draft j + 1 guessed (the last one, after all the
    drafts, is the bonus). The first ``accepted`` drafts equal the main model's choices; ``next`` is the token that
    follows them (the correction of the first rejected draft, or the bonus when all were accepted)."""

    start: int  # how many new tokens were committed before this round
    inputs: list[int]
    verified: list[int]
    accepted: int = 0
    next: int = 0

    @property
    def committed(self) -> int:
        return self.inputs[0]

    @property
    def drafts(self) -> list[int]:
        return self.inputs[1:]

    @property
    def emitted(self) -> list[int]:
        """The tokens this round adds: the accepted drafts and the next token."""
        return self.drafts[: self.accepted] + [self.next]


@dataclass
class Trace:
    generation: Generation
    prompt: list[int]
    first: int  # the token chosen by the prefill (before any round)
    rounds: list[Round] = field(default_factory=list)

    def tokens(self) -> list[int]:
        """The new tokens as the rounds emitted them (truncated to the generation's length)."""
        out = [self.first]
        for r in self.rounds:
            out += r.emitted
        return out[: int(self.generation.lengths[0])]


@torch.no_grad()
def trace(
    model: DeepSeekV3, prompt: Sequence[int] | torch.Tensor, max_new_tokens: int, num_draft: int = 1, **kwargs
) -> Trace:
    """Greedy speculative ``generate`` on one prompt, recording the main model's forwards (the prefill, then one
    verification per round) through a temporary wrapper of ``model.forward``; the rounds come from what those
    forwards saw and returned. Extra ``kwargs`` go to ``generate`` (``temperature`` must stay 0)."""
    if kwargs.get("temperature", 0) != 0:
        raise ValueError("trace shows greedy rounds: temperature must be 0")
    prompt = torch.as_tensor(prompt).reshape(-1).tolist()
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input ids (1, T), logits (1, T, V)) per main forward
    original = model.forward

    def recording_forward(input_ids, *args, **kw):
        out = original(input_ids, *args, **kw)
        calls.append((input_ids.clone(), out.logits))  # a view of generate's token buffer, which moves on
        return out

    model.forward = recording_forward  # nn.Module.__call__ looks the instance attribute up first
    try:
        gen = generate(model, prompt, max_new_tokens, speculative=True, num_draft=num_draft, **kwargs)
    finally:
        del model.forward
    (_, prefill_logits), verifications = calls[0], calls[1:]
    result = Trace(generation=gen, prompt=prompt, first=int(prefill_logits[0, -1].argmax()))
    done = 1
    for inputs, logits in verifications:
        n_acc, nxt = greedy_verify(logits, inputs[:, 1:])  # the rule generate applied to this forward
        r = Round(
            start=done,
            inputs=inputs[0].tolist(),
            verified=logits[0].argmax(-1).tolist(),
            accepted=int(n_acc),
            next=int(nxt),
        )
        result.rounds.append(r)
        done += len(r.emitted)
    return result


def describe_round(r: Round, tokenizer) -> str:
    """One line: what went in, what the main model wanted, what was kept."""
    q = lambda ids: "[" + ", ".join(repr(tokenizer.decode([i])) for i in ids) + "]"  # noqa: E731
    kept = "all accepted" if r.accepted == len(r.drafts) else f"{r.accepted} accepted"
    extra = "bonus" if r.accepted == len(r.drafts) else "correction"
    plural = "s" if len(r.emitted) > 1 else ""
    return (
        f"after {tokenizer.decode([r.committed])!r}: drafts {q(r.drafts)}, main model {q(r.verified)} -> "
        f"{kept}, {extra} {tokenizer.decode([r.next])!r}, +{len(r.emitted)} token{plural}"
    )


def rounds_text(tr: Trace, tokenizer, sep: str = "|") -> str:
    """The generated text with ``sep`` between what each main-model forward produced: the prefill's token, then each
    round's accepted drafts and correction or bonus token."""
    pieces = [tokenizer.decode([tr.first])] + [tokenizer.decode(r.emitted) for r in tr.rounds]
    return sep.join(pieces)


def round_figure(
    tr: Trace,
    tokenizer,
    rounds: Sequence[int] | None = None,
    active: int | None = None,
    title: str = "One round of speculative decoding, traced",
) -> go.Figure:
    """A grid per round (slider): the inputs of the verification forward (newest committed token, then the MTP
    drafts), the main model's argmax after each input, shifted one column right so it sits under the draft it
    checks, and the outcome: accepted, rejected, correction, bonus, or unused (after a rejection). The slider
    starts at round ``active`` (default: the first round that accepted a draft)."""
    rounds = list(range(len(tr.rounds))) if rounds is None else list(rounds)
    if not rounds:
        raise ValueError("the trace has no rounds to show")
    if active is None:
        active = next((i for i in rounds if tr.rounds[i].accepted > 0), rounds[0])
    if active not in rounds:
        raise ValueError(f"active round {active} is not among the rounds shown")
    k = max(len(tr.rounds[i].drafts) for i in rounds)
    cols = ["committed"] + [f"draft {j}" for j in range(1, k + 1)] + ["after the drafts"]
    rows = ["input to the main model", "main model's argmax", "outcome"]
    # categories: 0 empty, 1 neutral, 2 accepted, 3 rejected, 4 correction / bonus, 5 not checked
    palette = [
        "rgba(0, 0, 0, 0)",
        "rgba(128, 128, 128, 0.18)",
        COLORS["green"],
        COLORS["red"],
        COLORS["orange"],
        "rgba(128, 128, 128, 0.08)",
    ]
    scale = []
    for c, color in enumerate(palette):
        scale += [[c / len(palette), color], [(c + 1) / len(palette), color]]

    def grid(i: int):
        r = tr.rounds[i]
        n = len(r.drafts)
        z = [[0] * (k + 2) for _ in rows]
        text = [[""] * (k + 2) for _ in rows]
        z[0][0], text[0][0] = 1, token_label(tokenizer.decode([r.committed]))
        for j, d in enumerate(r.drafts, 1):
            z[0][j] = 2 if j <= r.accepted else 3 if j == r.accepted + 1 else 5
            text[0][j] = token_label(tokenizer.decode([d]))
        for j, v in enumerate(r.verified, 1):
            col = j if j <= n else k + 1
            z[1][col] = 4 if j == r.accepted + 1 else 2 if j <= r.accepted else 5
            text[1][col] = token_label(tokenizer.decode([v]))
            z[2][col] = z[1][col]
            text[2][col] = (
                "accepted"
                if j <= r.accepted
                else "bonus"
                if j == n + 1 and r.accepted == n
                else "correction"
                if j == r.accepted + 1
                else "unused"
            )
        n_new = len(r.emitted)
        z[2][0], text[2][0] = 1, f"+{n_new} token" + ("s" if n_new > 1 else "")
        return z, text

    def heatmap(i: int) -> go.Heatmap:
        z, text = grid(i)
        return go.Heatmap(
            z=z,
            x=cols,
            y=rows,
            text=text,
            texttemplate="%{text}",
            colorscale=scale,
            zmin=-0.5,
            zmax=len(palette) - 0.5,
            showscale=False,
            xgap=3,
            ygap=3,
            hovertemplate="%{y}<br>%{x}: %{text}<extra></extra>",
        )

    fig = figure(title=title, height=330, margin=dict(l=60, r=20, t=60, b=80))
    fig.add_trace(heatmap(active))
    fig.frames = [go.Frame(data=[heatmap(i)], name=str(i)) for i in rounds]
    fig.update_layout(
        xaxis=dict(type="category", side="top", showgrid=False),
        yaxis=dict(type="category", autorange="reversed", showgrid=False),
        sliders=[
            dict(
                active=rounds.index(active),
                currentvalue=dict(prefix="round "),
                pad=dict(t=20),
                steps=[
                    dict(
                        label=str(i + 1),
                        method="animate",
                        args=[
                            [str(i)],
                            dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0)),
                        ],
                    )
                    for i in rounds
                ],
            )
        ],
    )
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Acceptance and tokens per forward, measured
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Sweep:
    """Totals over prompts for each ``num_draft`` (0 = plain greedy decoding)."""

    num_draft: int
    new_tokens: int = 0
    main_forwards: int = 0  # prefill included
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    equal_to_greedy: bool = True  # every prompt gave the plain greedy tokens

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / max(self.main_forwards, 1)

    @property
    def acceptance_per_position(self) -> list[float]:
        """Fraction of rounds in which drafts 1..j were all accepted, for each draft position j."""
        return [a / d if d else float("nan") for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else float("nan")


@torch.no_grad()
def acceptance_sweep(
    model: DeepSeekV3,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    drafts: Sequence[int] = (1, 2, 3),
    repeats: int = 1,
) -> dict[int, Sweep]:
    """Greedy decoding of each prompt (batch of one, as one user's request) plainly and with speculative decoding
    for each ``num_draft`` in ``drafts``; totals per setting, with ``equal_to_greedy`` checking losslessness. Wall
    times are the best of ``repeats`` runs (the counts do not change between runs)."""
    out = {k: Sweep(k, drafted_per_position=[0] * k, accepted_per_position=[0] * k) for k in (0, *drafts)}
    for ids in prompts:
        plain = None
        for k, s in out.items():
            best = None
            for _ in range(repeats):
                gen = generate(model, list(ids), max_new_tokens, speculative=k > 0, num_draft=max(k, 1))
                best = gen if best is None or gen.stats.wall_s < best.stats.wall_s else best
            st = best.stats
            if k == 0:
                plain = best.tokens
            else:
                s.equal_to_greedy &= torch.equal(best.tokens, plain)
                for j, (d, a) in enumerate(zip(st.drafted_per_position, st.accepted_per_position)):
                    s.drafted_per_position[j] += d
                    s.accepted_per_position[j] += a
            s.new_tokens += st.new_tokens
            s.main_forwards += st.main_forwards
            s.wall_s += st.wall_s
    return out


def sweep_figure(
    sweeps: Mapping[int, Sweep], paper: tuple[float, float] = PAPER_ACCEPTANCE, digits: int = 3
) -> go.Figure:
    """Left: acceptance per draft position for each num_draft. Right: new tokens per main-model forward against
    num_draft, with the ceiling num_draft + 1 and the paper's second-token acceptance turned into tokens/forward."""
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.12,
        subplot_titles=("acceptance per draft position", "new tokens per main-model forward"),
    )
    fig.update_layout(
        title="Speculative decoding with the MTP module, measured", height=400, barmode="group", margin=dict(t=90)
    )
    palette = [COLORS["blue"], COLORS["orange"], COLORS["green"], COLORS["violet"], COLORS["cyan"]]
    spec = [k for k in sorted(sweeps) if k > 0]
    for k, color in zip(spec, palette):
        acc = [round(a, digits) for a in sweeps[k].acceptance_per_position]
        fig.add_trace(
            go.Bar(
                x=[f"draft {j}" for j in range(1, len(acc) + 1)],
                y=acc,
                name=f"num_draft = {k}",
                marker_color=color,
                text=[f"{a:.0%}" for a in acc],
                textposition="outside",
            ),
            row=1,
            col=1,
        )
    fig.add_shape(
        type="rect",
        x0=-0.45,
        x1=0.45,
        y0=paper[0],
        y1=paper[1],
        fillcolor=COLORS["slate"],
        opacity=0.4,
        line_width=0,
        row=1,
        col=1,
    )  # over "draft 1": the paper's number is the second token's
    fig.add_trace(
        go.Scatter(
            x=[None],
            y=[None],
            mode="markers",
            name="paper: 85-90% (second token)",
            marker=dict(symbol="square", size=12, color=COLORS["slate"], opacity=0.5),
        )
    )
    ks = sorted(sweeps)
    fig.add_trace(
        go.Scatter(
            x=ks,
            y=[k + 1 for k in ks],
            mode="lines",
            line=dict(color=COLORS["slate"], dash="dot"),
            name="ceiling: num_draft + 1",
        ),
        row=1,
        col=2,
    )
    fig.add_shape(
        type="rect",
        x0=0.85,
        x1=1.15,
        y0=1 + paper[0],
        y1=1 + paper[1],
        fillcolor=COLORS["slate"],
        opacity=0.4,
        line_width=0,
        row=1,
        col=2,
    )
    fig.add_trace(
        go.Scatter(
            x=ks,
            y=[round(sweeps[k].tokens_per_forward, digits) for k in ks],
            mode="lines+markers",
            line=dict(color=COLORS["red"], width=3),
            marker=dict(size=9),
            name="measured",
        ),
        row=1,
        col=2,
    )
    fig.update_yaxes(range=[0, 1.12], tickformat=".0%", row=1, col=1)
    fig.update_xaxes(title_text="num_draft", dtick=1, row=1, col=2)
    fig.update_yaxes(title_text="tokens / forward", row=1, col=2)
    fig.update_layout(legend=dict(orientation="h", y=-0.18, x=0, yanchor="top"))
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Sampling is preserved: the accept / resample rule
# ---------------------------------------------------------------------------------------------------------------


def accept_resample(p: torch.Tensor, q: torch.Tensor) -> dict[str, torch.Tensor]:
    """The exact output distribution of one speculative step with target p and draft q (both (V,)):

    a draft x ~ q is kept with probability min(1, p(x)/q(x)); otherwise the token is drawn from
    ``residual_distribution(p, q)`` = max(0, p - q) / sum. Returns the pieces: ``kept`` (P(draft = x and kept)
    = min(p, q)), ``rejected`` (total rejection probability), ``residual``, ``output`` = kept + rejected x residual,
    and ``acceptance`` (the total probability of keeping the draft, sum of min(p, q))."""
    p, q = p.double(), q.double()
    kept = torch.minimum(p, q)  # q(x) min(1, p(x)/q(x))
    rejected = 1.0 - kept.sum()
    residual = residual_distribution(p, q)
    return {
        "kept": kept,
        "rejected": rejected,
        "residual": residual,
        "output": kept + rejected * residual,
        "acceptance": kept.sum(),
    }


def monte_carlo(p: torch.Tensor, q: torch.Tensor, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` seeded speculative steps with one draft each: drafts drawn from q, judged by ``speculative_verify`` (the
    rule ``generate`` uses); returns the empirical ``output`` distribution, the acceptance rate and the share of the
    output made of kept drafts."""
    V = p.numel()
    g = torch.Generator().manual_seed(seed)
    drafts = torch.multinomial(q.float().expand(n, V), 1, replacement=True, generator=g)  # (n, 1)
    target = p.float().expand(n, 2, V)  # (n, 2, V): the target at the draft position and after it (unused here)
    n_acc, nxt = speculative_verify(target, q.float().expand(n, 1, V), drafts, generator=g)
    tokens = torch.where(n_acc == 1, drafts[:, 0], nxt)  # (n,)
    kept = torch.bincount(drafts[n_acc == 1, 0], minlength=V).double() / n  # P(draft = x and kept)
    return {"output": frequencies(tokens, V), "kept": kept, "acceptance": (n_acc == 1).double().mean()}


def accept_resample_figure(
    p: torch.Tensor, q: torch.Tensor, labels: Sequence[str], mc: dict | None = None, digits: int = 4
) -> go.Figure:
    """Bars per token: the draft q, the output split into kept drafts (min(p, q)) and resampled tokens (rejection
    probability x residual), and the target p; with a Monte Carlo estimate of the output as markers."""
    ex = accept_resample(p, q)
    r = lambda t: [round(float(v), digits) for v in t]  # noqa: E731
    fig = figure(
        title="Accept or resample: the output distribution is the target",
        height=360,
        barmode="group",
        yaxis=dict(title="probability"),
    )
    fig.add_trace(go.Bar(x=list(labels), y=r(q), name="draft q", marker_color=COLORS["orange"], offsetgroup="q"))
    fig.add_trace(
        go.Bar(
            x=list(labels),
            y=r(ex["kept"]),
            name="kept drafts: min(p, q)",
            marker_color=COLORS["green"],
            offsetgroup="out",
        )
    )
    fig.add_trace(
        go.Bar(
            x=list(labels),
            y=r(ex["rejected"] * ex["residual"]),
            base=r(ex["kept"]),
            name="resampled: P(reject) · residual",
            marker_color=COLORS["cyan"],
            offsetgroup="out",
        )
    )
    fig.add_trace(go.Bar(x=list(labels), y=r(p), name="target p", marker_color=COLORS["blue"], offsetgroup="p"))
    if mc is not None:
        fig.add_trace(
            go.Scatter(
                x=list(labels),
                y=r(mc["output"]),
                mode="markers",
                name="Monte Carlo output",
                marker=dict(symbol="diamond", size=11, color=COLORS["red"]),
            )
        )
    fig.update_layout(legend=dict(orientation="h", y=-0.15, x=0, yanchor="top"))
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Sampling a real model: plain vs speculative
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def exact_first_tokens(
    model: DeepSeekV3, prompt: Sequence[int], temperature: float = 1.0, top_k: int = 0
) -> list[torch.Tensor]:
    """The exact distributions (V,) of the first and the second sampled token after ``prompt``: p1 from one
    forward, p2 = sum over x1 of p1(x1) p(x2 | prompt, x1), enumerating the x1 that have probability > 0 (keep
    ``top_k`` small)."""
    ids = torch.tensor([list(prompt)], device=model.device)  # (1, P)
    p1 = sampling_probs(model(ids).logits[0, -1], temperature, top_k).double()  # (V,)
    support = p1.nonzero()[:, 0]  # (S,)
    seqs = torch.cat([ids.expand(len(support), -1), support[:, None]], dim=1)  # (S, P + 1)
    p2_given = sampling_probs(model(seqs).logits[:, -1], temperature, top_k).double()  # (S, V)
    return [p1.cpu(), (p1[support] @ p2_given).cpu()]


@torch.no_grad()
def first_tokens(
    model: DeepSeekV3,
    prompt: Sequence[int],
    n: int,
    num_tokens: int = 2,
    temperature: float = 1.0,
    top_k: int = 0,
    num_draft: int = 1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """``n`` seeded samples of the first ``num_tokens`` tokens after ``prompt``, plain and speculative (one batch of
    n copies each): ``{"plain": (n, num_tokens), "speculative": (n, num_tokens)}``, plus the speculative run's
    acceptance rate. Both runs generate one token more than kept, because ``generate`` never drafts past its token
    budget: so every kept token after the first (which comes from the prefill) went through draft and verification
    or was the correction of a rejected draft."""
    batch = torch.tensor([list(prompt)]).expand(n, -1)
    plain = generate(model, batch, num_tokens + 1, temperature=temperature, top_k=top_k, seed=seed)
    spec = generate(
        model,
        batch,
        num_tokens + 1,
        temperature=temperature,
        top_k=top_k,
        seed=seed + 1,
        speculative=True,
        num_draft=num_draft,
    )
    return {
        "plain": plain.tokens[:, :num_tokens].cpu(),
        "speculative": spec.tokens[:, :num_tokens].cpu(),
        "acceptance": torch.tensor(spec.stats.acceptance_rate),
    }


def frequencies(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The empirical distribution (vocab_size,) fp64 of a 1-D tensor of token ids."""
    return torch.bincount(tokens, minlength=vocab_size).double() / max(tokens.numel(), 1)


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a.double() - b.double()).abs().sum())


def sampling_noise(p: torch.Tensor, n: int, repeats: int = 20, seed: int = 0) -> tuple[float, float]:
    """How far ``n`` draws from p itself land from p: (mean, max) total variation over ``repeats`` seeded rounds.
    The yardstick for an empirical distribution of n samples: an exact sampler is this far off by chance."""
    g = torch.Generator().manual_seed(seed)
    tvs = [
        total_variation(frequencies(torch.multinomial(p.double(), n, replacement=True, generator=g), p.numel()), p)
        for _ in range(repeats)
    ]
    return sum(tvs) / repeats, max(tvs)


def first_tokens_figure(
    samples: Mapping[str, torch.Tensor], exact: Sequence[torch.Tensor], tokenizer, top: int = 10, digits: int = 4
) -> go.Figure:
    """For each generated position (dropdown), the frequencies of the ``top`` most likely tokens (by the exact
    distribution) under plain and speculative sampling, and the exact probabilities as markers."""
    positions = len(exact)
    fig = figure(
        title="First sampled tokens: plain vs speculative sampling",
        height=380,
        barmode="group",
        yaxis=dict(title="frequency / probability"),
    )
    buttons = []
    palette = {"plain": COLORS["blue"], "speculative": COLORS["orange"]}
    for t in range(positions):
        order = exact[t].argsort(descending=True)[:top]
        labels = [f"{token_label(tokenizer.decode([int(i)]))} ({int(i)})" for i in order]
        for name in ("plain", "speculative"):
            V = exact[t].numel()
            freq = frequencies(samples[name][:, t], V)
            fig.add_trace(
                go.Bar(
                    x=labels,
                    y=[round(float(freq[i]), digits) for i in order],
                    visible=t == 0,
                    name=f"{name} sampling",
                    marker_color=palette[name],
                )
            )
        fig.add_trace(
            go.Scatter(
                x=labels,
                y=[round(float(exact[t][i]), digits) for i in order],
                mode="markers",
                visible=t == 0,
                name="exact target",
                marker=dict(symbol="line-ew-open", size=26, color=COLORS["red"], line=dict(width=3)),
            )
        )
        visible = [False] * (3 * positions)
        visible[3 * t : 3 * t + 3] = [True] * 3
        buttons.append(dict(label=f"token {t + 1}", method="update", args=[dict(visible=visible)]))
    fig.update_layout(
        updatemenus=[
            dict(
                type="buttons",
                direction="right",
                buttons=buttons,
                x=1.0,
                y=1.02,
                xanchor="right",
                yanchor="bottom",
                showactive=True,
            )
        ],
        legend=dict(orientation="h", y=-0.25, x=0, yanchor="top"),
        margin=dict(t=90),
    )
    return fig
