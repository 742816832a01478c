"""Chapter 7's roofline (paper Sec. 3.4 and 2.1.1 for decoding): for each op of ``dsv3.kernels`` at DeepSeek-V3
sizes, the bytes it must move and the FLOPs it must do (``kernel_costs``), the device ceilings it runs against
(``H200_DATASHEET``, ``H200_MEASURED``, ``H800_DATASHEET``), log-log roofline figures with a batch-size slider, and
the reader of the measured tables that ``benchmarks/bench_kernels.py --out`` writes.

The byte counts follow the conventions of ``benchmarks/bench_kernels.py`` (each operand read once, each result
written once: the minimum traffic a fused kernel can reach), so measured points and predicted points are
comparable; MLA decoding uses FlashMLA's convention (cache bytes + query/output bytes).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go

from ..checkpoint import FP8_BLOCK
from ..config import ModelConfig
from ..kernels.backend import cdiv
from .display import COLORS, figure, significant

# ---------------------------------------------------------------------------------------------------------------
# Device ceilings
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """The two ceilings of a roofline: memory bandwidth (bytes/s) and dense matrix rates (FLOP/s)."""

    name: str
    bandwidth: float  # bytes per second (read + written)
    bf16: float  # dense bf16 tensor-core FLOP/s
    fp8: float  # dense fp8 tensor-core FLOP/s
    source: str

    def peak(self, precision: str = "bf16") -> float:
        if precision not in ("bf16", "fp8"):
            raise ValueError(f"precision must be 'bf16' or 'fp8', got {precision!r}")
        return self.bf16 if precision == "bf16" else self.fp8

    def ridge(self, precision: str = "bf16") -> float:
        """The arithmetic intensity (FLOP/byte) above which a kernel is compute-bound."""
        return self.peak(precision) / self.bandwidth


H200_DATASHEET = Device(
    "H200 datasheet",
    4.8e12,
    989e12,
    1979e12,
    "NVIDIA H200 SXM datasheet: 4.8 TB/s HBM3e; 989 TFLOP/s dense BF16 and 1,979 dense FP8 (the sheet's "
    "1,979 / 3,958 are with 2:4 sparsity)",
)
H200_MEASURED = Device(
    "H200 measured",
    4.3e12,
    790e12,
    1979e12 * 790 / 989,
    "this project's device notes: a torch device-to-device copy moved ~4.3 TB/s (read + write) and an "
    "8192^3 bf16 matmul ran at ~790 TFLOP/s on one H200; FP8 scaled by the same 80% (not measured)",
)
H800_DATASHEET = Device(
    "H800 datasheet",
    3.35e12,
    989e12,
    1979e12,
    "the report's GPU (Sec. 3.1): a Hopper with the H100 SXM's 80 GB of HBM3 at 3.35 TB/s and its tensor-core "
    "rates (989 TFLOP/s dense BF16)",
)
DEVICES = (H200_DATASHEET, H200_MEASURED, H800_DATASHEET)

BF16 = 2  # bytes per element


# ---------------------------------------------------------------------------------------------------------------
# Bytes and FLOPs of each kernel
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelCost:
    """What one call of a kernel must move and compute (per layer where the op is per layer)."""

    name: str  # label in tables and figures
    op: str  # the dsv3.kernels function
    shape: str
    bytes: float
    flops: float
    precision: str = "bf16"  # which compute ceiling applies ("fp8" for the FP8 GEMM)

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte moved."""
        return self.flops / self.bytes

    def time(self, device: Device) -> float:
        """Roofline time: the larger of the memory time and the compute time (seconds)."""
        return max(self.bytes / device.bandwidth, self.flops / device.peak(self.precision))

    def attainable(self, device: Device) -> float:
        """FLOP/s under the roof: min(peak, intensity x bandwidth)."""
        return min(device.peak(self.precision), self.intensity * device.bandwidth)

    def bound(self, device: Device) -> str:
        return "compute" if self.intensity >= device.ridge(self.precision) else "memory"


def rms_norm_cost(config: ModelConfig, tokens: int, residual: bool = True, width: int | None = None) -> KernelCost:
    """RMSNorm (+ residual add) over `tokens` rows of `width` (default hidden_size), bf16.
    Reads x (and the residual), writes y (and the new residual): 2 or 4 row passes. FLOPs: add, square, sum,
    scale by 1/rms, times the weight (5 per element with the residual, 4 without)."""
    D = width or config.hidden_size
    passes, ops = (4, 5) if residual else (2, 4)
    return KernelCost(
        "RMSNorm + residual" if residual else "RMSNorm",
        "rms_norm",
        f"{tokens} x {D}",
        passes * tokens * D * BF16 + D * BF16,
        ops * tokens * D,
    )


def rope_cost(config: ModelConfig, tokens: int) -> KernelCost:
    """Interleaved RoPE on the decoupled slices: q^R of every head and the shared k^R (Eq. 3, 8), bf16 in and out,
    fp32 cos/sin tables. Each pair takes 4 multiplies and 2 adds (3 FLOPs per element)."""
    H, R = config.num_attention_heads, config.qk_rope_head_dim
    elems = tokens * (H + 1) * R
    return KernelCost(
        "RoPE (q and k rope slices)",
        "apply_rope",
        f"{tokens} x ({H}+1) x {R}",
        2 * elems * BF16 + 2 * tokens * (R // 2) * 4,
        3 * elems,
    )


def router_cost(config: ModelConfig, tokens: int) -> KernelCost:
    """Biased group-limited top-k over fp32 logits: read N x E logits and the bias, write N x K weights (fp32) and
    ids (int64). Operations per logit: sigmoid (~4), bias add, two passes for the group top-2, one pass per chosen
    expert (comparisons counted as operations: the router has no matrix work)."""
    E, K = config.n_routed_experts, config.num_experts_per_tok
    return KernelCost(
        "router top-k",
        "router_topk",
        f"{tokens} x {E} experts, top-{K}",
        tokens * E * 4 + E * 4 + tokens * K * (4 + 8),
        tokens * E * (5 + 2 + K),
    )


def active_experts(n_experts: int, top_k: int, tokens: int) -> float:
    """Expected number of experts that receive at least one of `tokens` tokens, each choosing top_k distinct experts
    uniformly: E (1 - (1 - K/E)^N). With a balanced router this is what a decoding step reads."""
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** tokens)


def moe_cost(config: ModelConfig, tokens: int, weight_bytes: int = BF16) -> KernelCost:
    """One MoE layer's routed experts (Eq. 12), fused: the weights of every expert that got a token are read once
    (3 matrices of I x D), the tokens are read and written once. FLOPs: 2 x 3 matrices x N x K x I x D.
    When all experts are active the intensity is N K / E x (2 / weight_bytes): the tokens one expert sees."""
    E, K = config.n_routed_experts, config.num_experts_per_tok
    D, I = config.hidden_size, config.moe_intermediate_size
    active = active_experts(E, K, tokens)
    name = "MoE experts" + (" (FP8 weights)" if weight_bytes == 1 else "")
    return KernelCost(
        name,
        "moe_experts",
        f"{tokens} tok, {E} x (3 x {I} x {D}), top-{K}",
        active * 3 * I * D * weight_bytes + 2 * tokens * D * BF16,
        2 * 3 * tokens * K * I * D,
        precision="fp8" if weight_bytes == 1 else "bf16",
    )


def mla_decode_cost(
    config: ModelConfig, batch: int, mean_len: int, q_len: int = 1, heads: int | None = None
) -> KernelCost:
    """Absorbed MLA decoding over the latent cache, one layer, FlashMLA's convention (bf16):

        bytes = (B * mean_len * (r + dr) + B * Tq * H * (r + dr + r)) * 2      cache read + queries in + outputs out
        FLOPs = 2 * B * Tq * H * mean_len * (r + dr + r)                       scores (r + dr) and P @ c_KV (r)

    with r = kv_lora_rank, dr = qk_rope_head_dim. The cache is shared by all H heads and Tq query tokens, so the
    intensity is about Tq H (2r + dr) / (r + dr), independent of the batch size."""
    H = heads or config.num_attention_heads
    r, dr = config.kv_lora_rank, config.qk_rope_head_dim
    name = f"MLA decode (h={H}" + (f", s_q={q_len})" if q_len > 1 else ")")
    return KernelCost(
        name,
        "mla_decode",
        f"B={batch}, {mean_len} cached, Tq={q_len}, H={H}",
        (batch * mean_len * (r + dr) + batch * q_len * H * (r + dr + r)) * BF16,
        2 * batch * q_len * H * mean_len * (r + dr + r),
    )


def naive_decode_cost(config: ModelConfig, batch: int, mean_len: int, q_len: int = 1) -> KernelCost:
    """Decoding over a decompressed (MHA-style) cache for comparison: every head reads its own keys (qk_head_dim)
    and values (v_head_dim), so each cached byte feeds one head and the intensity stays near Tq."""
    H, dqk, dv = config.num_attention_heads, config.qk_head_dim, config.v_head_dim
    return KernelCost(
        "decode, decompressed cache",
        "attention (naive)",
        f"B={batch}, {mean_len} cached, H={H}",
        (batch * mean_len * H * (dqk + dv) + batch * q_len * H * (dqk + dv)) * BF16,
        2 * batch * q_len * H * mean_len * (dqk + dv),
    )


def prefill_cost(config: ModelConfig, seq_len: int, batch: int = 1) -> KernelCost:
    """Causal flash attention over full heads for prefill: half of the T x T scores, each a qk_head_dim dot product,
    and half of the P @ V products. Reads q, k, v and writes o once."""
    H, dqk, dv = config.num_attention_heads, config.qk_head_dim, config.v_head_dim
    return KernelCost(
        f"prefill attention (T={seq_len})",
        "attention_prefill",
        f"B={batch}, T={seq_len}, H={H}",
        batch * H * seq_len * (2 * dqk + 2 * dv) * BF16,
        2 * batch * H * seq_len * seq_len * (dqk + dv) / 2,
    )


def act_quant_cost(tokens: int, width: int) -> KernelCost:
    """1 x 128 activation quantization: read bf16, write e4m3 and one fp32 scale per tile (abs, max, divide)."""
    return KernelCost(
        "act_quant 1x128",
        "act_quant",
        f"{tokens} x {width}",
        tokens * width * (BF16 + 1) + tokens * cdiv(width, FP8_BLOCK) * 4,
        3 * tokens * width,
    )


def weight_dequant_cost(rows: int, cols: int) -> KernelCost:
    """128 x 128 block dequantization of an e4m3 weight to bf16 (one multiply per element)."""
    return KernelCost(
        "weight_dequant 128x128",
        "weight_dequant",
        f"{rows} x {cols}",
        rows * cols * (1 + BF16) + cdiv(rows, FP8_BLOCK) * cdiv(cols, FP8_BLOCK) * 4,
        rows * cols,
    )


def fp8_gemm_cost(tokens: int, n: int, k: int) -> KernelCost:
    """Block-scaled FP8 GEMM y = a w^T: a (M, K) e4m3 + 1x128 scales, w (N, K) e4m3 + 128x128 scales, y bf16."""
    nbytes = (
        tokens * k
        + tokens * cdiv(k, FP8_BLOCK) * 4
        + n * k
        + cdiv(n, FP8_BLOCK) * cdiv(k, FP8_BLOCK) * 4
        + tokens * n * BF16
    )
    return KernelCost(
        "FP8 GEMM (dense FFN down)", "fp8_gemm", f"{tokens} x {n} x {k}", nbytes, 2 * tokens * n * k, precision="fp8"
    )


def cross_entropy_cost(config: ModelConfig, tokens: int) -> KernelCost:
    """LM head + cross-entropy forward, vocabulary-chunked: the (V, D) head is read once, the hidden states once."""
    V, D = config.vocab_size, config.hidden_size
    return KernelCost(
        "LM head + cross-entropy",
        "linear_cross_entropy",
        f"{tokens} x {D} x {V}",
        V * D * BF16 + tokens * D * BF16 + tokens * 8,
        2 * tokens * D * V,
    )


def kernel_costs(
    config: ModelConfig, tokens: int = 64, context: int = 4096, heads: int | None = None
) -> list[KernelCost]:
    """Every kernel of ``dsv3.kernels`` at the sizes of one decoding step with `tokens` sequences in flight
    (`context` cached positions each), plus prefill attention over `context` tokens for contrast. Per layer."""
    D = config.hidden_size
    return [
        rms_norm_cost(config, tokens),
        rope_cost(config, tokens),
        router_cost(config, tokens),
        moe_cost(config, tokens),
        mla_decode_cost(config, tokens, context, heads=heads),
        naive_decode_cost(config, tokens, context),
        prefill_cost(config, context),
        act_quant_cost(tokens, D),
        weight_dequant_cost(config.intermediate_size, D),
        fp8_gemm_cost(tokens, D, config.intermediate_size),
        cross_entropy_cost(config, tokens),
    ]


def compute_bound_tokens(config: ModelConfig, device: Device, weight_bytes: int = BF16) -> int:
    """Smallest batch (tokens per MoE layer) at which the routed experts reach the ridge of `device`."""
    precision = "fp8" if weight_bytes == 1 else "bf16"
    lo, hi = 1, 1
    while moe_cost(config, hi, weight_bytes).intensity < device.ridge(precision):
        hi *= 2
        if hi > 1 << 30:
            raise ValueError("the MoE layer never becomes compute-bound")
    while lo < hi:  # intensity grows with the batch: bisect
        mid = (lo + hi) // 2
        if moe_cost(config, mid, weight_bytes).intensity < device.ridge(precision):
            lo = mid + 1
        else:
            hi = mid
    return lo


def cost_table(costs: Sequence[KernelCost], device: Device = H200_MEASURED) -> str:
    """Markdown: kernel, shape, bytes, FLOPs, intensity, bound and roofline time on `device`."""
    rows = [
        "| kernel | shape (per layer) | bytes | FLOPs | FLOP/byte | bound | roofline time |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for c in costs:
        rows.append(
            f"| {c.name} | {c.shape} | {_si(c.bytes, 'B')} | {_si(c.flops, '')} | {c.intensity:,.1f} | "
            f"{c.bound(device)} | {_time(c.time(device))} |"
        )
    return "\n".join(rows)


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.1f} {prefix}{unit}"
    return f"{x:.0f} {unit}".strip()


def _time(s: float) -> str:
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us" if s >= 1e-5 else f"{s * 1e6:.2f} us"


# ---------------------------------------------------------------------------------------------------------------
# Roofline figures
# ---------------------------------------------------------------------------------------------------------------

KERNEL_COLORS = {
    "rms_norm": COLORS["slate"],
    "apply_rope": COLORS["cyan"],
    "router_topk": COLORS["lime"],
    "moe_experts": COLORS["orange"],
    "mla_decode": COLORS["blue"],
    "attention (naive)": COLORS["red"],
    "attention_prefill": COLORS["violet"],
    "act_quant": COLORS["pink"],
    "weight_dequant": COLORS["pink"],
    "fp8_gemm": COLORS["green"],
    "linear_cross_entropy": COLORS["slate"],
}
MARKERS = {
    "weight_dequant": "diamond",
    "linear_cross_entropy": "square",
    "attention (naive)": "x",
    "attention_prefill": "star",
}
BATCHES = (1, 4, 16, 64, 256, 1024, 4096, 16384)
X_RANGE = (-1.3, 4.3)  # log10 FLOP/byte shown


def _roof(device: Device, precision: str, dash: str, color: str, name: str) -> go.Scatter:
    xs = [10 ** X_RANGE[0], device.ridge(precision), 10 ** X_RANGE[1]]
    ys = [min(device.peak(precision), x * device.bandwidth) / 1e12 for x in xs]
    return go.Scatter(
        x=xs,
        y=ys,
        mode="lines",
        name=name,
        line=dict(color=color, dash=dash, width=2),
        hovertemplate=f"{device.name} ({precision}): ridge at {device.ridge(precision):.0f} FLOP/B<extra></extra>",
    )


def _point(c: KernelCost, device: Device, **marker) -> dict:
    hover = (
        f"<b>{c.name}</b><br>{c.shape}<br>{_si(c.bytes, 'B')} moved, {_si(c.flops, 'FLOP')}<br>"
        f"{c.intensity:,.1f} FLOP/B: {c.bound(device)}-bound<br>{device.name}: {_time(c.time(device))}"
    )
    return dict(x=significant([c.intensity], 6), y=significant([c.attainable(device) / 1e12], 6), hovertext=[hover])


def roofline_figure(
    config: ModelConfig,
    batches: Sequence[int] = BATCHES,
    context: int = 4096,
    device: Device = H200_MEASURED,
    measured: BenchResults | None = None,
    start: int = 64,
) -> go.Figure:
    """Log-log roofline of the H200 with every kernel at V3 size; a slider moves the number of sequences decoded
    together (the batch), which slides the MoE and the GEMMs along the intensity axis while MLA decoding stays put.
    Points sit on `device`'s roof (the prediction); `measured` adds points from a benchmark table."""
    if start not in batches:
        raise ValueError(f"start batch {start} is not one of the slider's batches {tuple(batches)}")
    fig = figure(title=f"H200 roofline: V3 kernels, {context:,} cached tokens", height=720)
    roofs = [
        _roof(H200_DATASHEET, "bf16", "solid", COLORS["slate"], "H200 datasheet (bf16)"),
        _roof(H200_MEASURED, "bf16", "dash", COLORS["slate"], "H200 measured (bf16)"),
        _roof(H200_DATASHEET, "fp8", "dot", COLORS["green"], "H200 datasheet (fp8)"),
    ]
    for r in roofs:
        fig.add_trace(r)
    first = len(fig.data)
    by_batch = {b: kernel_costs(config, b, context) for b in batches}
    for c in by_batch[start]:
        fig.add_trace(
            go.Scatter(
                mode="markers",
                name=c.name,
                hoverinfo="text",
                marker=dict(
                    size=13,
                    color=KERNEL_COLORS.get(c.op, COLORS["slate"]),
                    symbol=MARKERS.get(c.op, "circle"),
                    line=dict(width=1, color="rgba(255,255,255,0.8)"),
                ),
                **_point(c, device),
            )
        )
    if measured is not None and measured.points():
        pts = measured.points()
        fig.add_trace(
            go.Scatter(
                x=[p[1] for p in pts],
                y=[p[2] / 1e12 for p in pts],
                mode="markers",
                name="measured (benchmark)",
                marker=dict(size=11, symbol="circle-open", color=COLORS["red"], line=dict(width=2)),
                hovertext=[f"{p[0]}: {p[2] / 1e12:.0f} TFLOP/s" for p in pts],
                hoverinfo="text",
            )
        )
    idx = list(range(first, first + len(by_batch[start])))
    fig.frames = [
        go.Frame(name=str(b), traces=idx, data=[go.Scatter(**_point(c, device)) for c in by_batch[b]]) for b in batches
    ]
    fig.update_layout(
        xaxis=dict(type="log", title="arithmetic intensity (FLOP per byte moved)", range=list(X_RANGE)),
        yaxis=dict(type="log", title="attainable TFLOP/s", range=[-3.2, 3.5]),
        legend=dict(font=dict(size=11), orientation="h", yanchor="top", y=-0.33, x=0),
        margin=dict(b=40),
        sliders=[
            dict(
                active=list(batches).index(start),
                currentvalue=dict(prefix="sequences decoded together: "),
                pad=dict(t=45),
                steps=[
                    dict(
                        label=str(b),
                        method="animate",
                        args=[
                            [str(b)],
                            dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0)),
                        ],
                    )
                    for b in batches
                ],
            )
        ],
    )
    return fig


def intensity_figure(config: ModelConfig, context: int = 4096, max_tokens: int = 1 << 16) -> go.Figure:
    """Intensity against batch size: the MoE experts and the FP8 GEMM grow with the batch, MLA decoding depends on
    heads and query tokens only, a decompressed cache stays near 1. Horizontal lines are ridges."""
    Ns = [2**i for i in range(int(math.log2(max_tokens)) + 1)]
    fig = figure(title="Intensity against batch size (V3, per layer)", height=560)
    lines = [
        ("MoE experts (bf16)", lambda n: moe_cost(config, n), COLORS["orange"], "solid"),
        ("MLA decode, 128 heads", lambda n: mla_decode_cost(config, n, context), COLORS["blue"], "solid"),
        (
            "MLA decode, 128 heads, s_q=2 (MTP)",
            lambda n: mla_decode_cost(config, n, context, 2),
            COLORS["blue"],
            "dash",
        ),
        (
            "MLA decode, 32 heads (one GPU of TP4)",
            lambda n: mla_decode_cost(config, n, context, heads=32),
            COLORS["cyan"],
            "dot",
        ),
        ("decode, decompressed cache", lambda n: naive_decode_cost(config, n, context), COLORS["red"], "solid"),
        ("RMSNorm + residual", lambda n: rms_norm_cost(config, n), COLORS["slate"], "solid"),
    ]
    for name, fn, color, dash in lines:
        fig.add_trace(
            go.Scatter(
                x=Ns,
                y=[fn(n).intensity for n in Ns],
                mode="lines",
                name=name,
                line=dict(color=color, dash=dash, width=2.5),
                hovertemplate="%{x} tokens: %{y:,.1f} FLOP/B<extra>" + name + "</extra>",
            )
        )
    ys = [t.y for t in fig.data]
    lo, hi = min(min(y) for y in ys) / 2, max(max(y) for y in ys) * 2
    for dev, dash in ((H200_DATASHEET, "solid"), (H200_MEASURED, "dash"), (H800_DATASHEET, "dot")):
        fig.add_trace(
            go.Scatter(
                x=[Ns[0], Ns[-1]],
                y=[dev.ridge()] * 2,
                mode="lines",
                name=f"ridge: {dev.name} ({dev.ridge():.0f})",
                line=dict(color=COLORS["slate"], dash=dash, width=1),
                hovertemplate=f"{dev.name} ridge: {dev.ridge():.0f} FLOP/B<extra></extra>",
            )
        )
    E, K = config.n_routed_experts, config.num_experts_per_tok
    fig.add_trace(
        go.Scatter(
            x=[256 * E / K] * 2,
            y=[lo, hi],
            mode="lines",
            name="256 tokens per expert",
            line=dict(color=COLORS["orange"], dash="dot", width=1),
            hovertemplate=f"{256 * E // K:,} tokens = 256 per expert<extra></extra>",
        )
    )
    fig.update_layout(
        xaxis=dict(type="log", title="tokens in the batch (sequences decoded together)"),
        yaxis=dict(type="log", title="FLOP per byte"),
        legend=dict(font=dict(size=11), orientation="h", yanchor="top", y=-0.18, x=0),
    )
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Measured benchmark tables (benchmarks/bench_kernels.py --out benchmarks/results/bench_kernels_<gpu>.txt)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class BenchResults:
    """One table written by ``benchmarks/bench_kernels.py``: the measured ceilings and one dict per row."""

    device: str
    bandwidth: float  # measured copy bandwidth, bytes/s
    peak: float  # measured matmul FLOP/s
    rows: list = field(default_factory=list)
    source: str = ""

    def points(self) -> list[tuple[str, float, float]]:
        """(label, FLOP/byte, FLOP/s) for rows that report both a bandwidth and a FLOP rate."""
        out = []
        for r in self.rows:
            if r["gbps"] > 0 and r["tflops"] > 0:
                out.append((f"{r['op']} {r['shape']}", r["tflops"] * 1e12 / (r["gbps"] * 1e9), r["tflops"] * 1e12))
        return out


def _seconds(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


def parse_bench_table(text: str, source: str = "") -> BenchResults:
    """Parse the markdown table printed by ``benchmarks/bench_kernels.py``."""
    head = re.search(r"^# dsv3 kernel benchmark: (.+)$", text, re.M)
    ceil = re.search(r"copy bandwidth ([\d.]+) GB/s.*?matmul ([\d.]+) TFLOP/s", text)
    if not head or not ceil:
        raise ValueError(f"{source or 'benchmark table'}: not a bench_kernels.py table (no header or ceilings line)")
    res = BenchResults(head.group(1).strip(), float(ceil.group(1)) * 1e9, float(ceil.group(2)) * 1e12, source=source)
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 11 or cells[0] in ("op", "---") or set(cells[0]) <= {"-"}:
            continue
        try:
            res.rows.append(
                dict(
                    op=cells[0],
                    shape=cells[1],
                    baseline=cells[2],
                    t_baseline=_seconds(cells[3]),
                    t_triton=_seconds(cells[4]),
                    speedup=float(cells[5].rstrip("x")),
                    gbps=float(cells[6]),
                    tflops=float(cells[7]),
                    target=cells[10],
                )
            )
        except ValueError as e:
            raise ValueError(f"{source or 'benchmark table'}: cannot read row {line.strip()!r}: {e}") from None
    if not res.rows:
        raise ValueError(f"{source or 'benchmark table'}: the table has no rows")
    return res


def results_dir() -> Path:
    """``benchmarks/results`` of the checkout this package was installed from (absent in a pip install)."""
    return Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def load_bench_results(directory: Path | str | None = None, gpu_only: bool = True) -> list[BenchResults]:
    """Every ``bench_kernels*.txt`` under `directory` (default ``results_dir()``), parsed; [] when there are none.
    `gpu_only` skips tables of the CPU smoke run (``--interpret-smoke``), whose times mean nothing."""
    d = Path(directory) if directory is not None else results_dir()
    if not d.is_dir():
        return []
    tables = [
        parse_bench_table(p.read_text(encoding="utf-8"), source=p.name) for p in sorted(d.glob("bench_kernels*.txt"))
    ]
    return [t for t in tables if not gpu_only or "interpreter" not in t.device.lower()]
