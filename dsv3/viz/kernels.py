"""Figures and cost models of Chapter 7, "Fused kernels" (paper Sec. 3.3 for FP8; Sec. 3.4 and 2.1.1 for decoding).

Three kinds of things live here:

* a **roofline model**: for each op of ``dsv3.kernels`` at DeepSeek-V3 sizes, the bytes it must move and the FLOPs
  it must do (``kernel_costs``), the device ceilings it runs against (``H200_DATASHEET``, ``H200_MEASURED``,
  ``H800_DATASHEET``), and log-log roofline figures with a batch-size slider;
* **pictures of the kernels' data layouts**: the padded, expert-sorted rows of the fused MoE (drawn from the
  kernel's own ``moe_align``), the paged, split latent cache of MLA decoding, the FP8 scale grids;
* the **benchmark table** reader (``benchmarks/bench_kernels.py --out``) and a small timing helper for GPU cells.

The byte counts follow the conventions of ``benchmarks/bench_kernels.py`` (each operand read once, each result
written once: the minimum traffic a fused kernel can reach), so measured points and predicted points are
comparable; MLA decoding uses FlashMLA's convention (cache bytes + query/output bytes).
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..config import ModelConfig
from .display import COLORS, figure

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
    "H200 datasheet", 4.8e12, 989e12, 1979e12,
    "NVIDIA H200 SXM datasheet: 4.8 TB/s HBM3e; 989 TFLOP/s dense BF16 and 1,979 dense FP8 (the sheet's "
    "1,979 / 3,958 are with 2:4 sparsity)")
H200_MEASURED = Device(
    "H200 measured", 4.3e12, 790e12, 1979e12 * 790 / 989,
    "this project's device notes: a torch device-to-device copy moved ~4.3 TB/s (read + write) and an "
    "8192^3 bf16 matmul ran at ~790 TFLOP/s on one H200; FP8 scaled by the same 80% (not measured)")
H800_DATASHEET = Device(
    "H800 datasheet", 3.35e12, 989e12, 1979e12,
    "the report's GPU (Sec. 3.1): a Hopper with the H100 SXM's 80 GB of HBM3 at 3.35 TB/s and its tensor-core "
    "rates (989 TFLOP/s dense BF16)")
DEVICES = (H200_DATASHEET, H200_MEASURED, H800_DATASHEET)

BF16 = 2  # bytes per element
FP8_BLOCK = 128  # Sec. 3.3.2: 1 x 128 activation tiles, 128 x 128 weight blocks


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _r(values, digits: int = 4) -> list[float]:
    """Round to `digits` significant digits: figure data stays small and insensitive to the last bits."""
    return [float(f"{v:.{digits}g}") for v in values]


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
    return KernelCost("RMSNorm + residual" if residual else "RMSNorm", "rms_norm", f"{tokens} x {D}",
                      passes * tokens * D * BF16 + D * BF16, ops * tokens * D)


def rope_cost(config: ModelConfig, tokens: int) -> KernelCost:
    """Interleaved RoPE on the decoupled slices: q^R of every head and the shared k^R (Eq. 3, 8), bf16 in and out,
    fp32 cos/sin tables. Each pair takes 4 multiplies and 2 adds (3 FLOPs per element)."""
    H, R = config.num_attention_heads, config.qk_rope_head_dim
    elems = tokens * (H + 1) * R
    return KernelCost("RoPE (q and k rope slices)", "apply_rope", f"{tokens} x ({H}+1) x {R}",
                      2 * elems * BF16 + 2 * tokens * (R // 2) * 4, 3 * elems)


def router_cost(config: ModelConfig, tokens: int) -> KernelCost:
    """Biased group-limited top-k over fp32 logits: read N x E logits and the bias, write N x K weights (fp32) and
    ids (int64). Operations per logit: sigmoid (~4), bias add, two passes for the group top-2, one pass per chosen
    expert (comparisons counted as operations: the router has no matrix work)."""
    E, K = config.n_routed_experts, config.num_experts_per_tok
    return KernelCost("router top-k", "router_topk", f"{tokens} x {E} experts, top-{K}",
                      tokens * E * 4 + E * 4 + tokens * K * (4 + 8), tokens * E * (5 + 2 + K))


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
    return KernelCost(name, "moe_experts", f"{tokens} tok, {E} x (3 x {I} x {D}), top-{K}",
                      active * 3 * I * D * weight_bytes + 2 * tokens * D * BF16, 2 * 3 * tokens * K * I * D,
                      precision="fp8" if weight_bytes == 1 else "bf16")


def mla_decode_cost(config: ModelConfig, batch: int, mean_len: int, q_len: int = 1,
                    heads: int | None = None) -> KernelCost:
    """Absorbed MLA decoding over the latent cache, one layer, FlashMLA's convention (bf16):

        bytes = (B * mean_len * (r + dr) + B * Tq * H * (r + dr + r)) * 2      cache read + queries in + outputs out
        FLOPs = 2 * B * Tq * H * mean_len * (r + dr + r)                       scores (r + dr) and P @ c_KV (r)

    with r = kv_lora_rank, dr = qk_rope_head_dim. The cache is shared by all H heads and Tq query tokens, so the
    intensity is about Tq H (2r + dr) / (r + dr), independent of the batch size."""
    H = heads or config.num_attention_heads
    r, dr = config.kv_lora_rank, config.qk_rope_head_dim
    name = f"MLA decode (h={H}" + (f", s_q={q_len})" if q_len > 1 else ")")
    return KernelCost(name, "mla_decode", f"B={batch}, {mean_len} cached, Tq={q_len}, H={H}",
                      (batch * mean_len * (r + dr) + batch * q_len * H * (r + dr + r)) * BF16,
                      2 * batch * q_len * H * mean_len * (r + dr + r))


def naive_decode_cost(config: ModelConfig, batch: int, mean_len: int, q_len: int = 1) -> KernelCost:
    """Decoding over a decompressed (MHA-style) cache for comparison: every head reads its own keys (qk_head_dim)
    and values (v_head_dim), so each cached byte feeds one head and the intensity stays near Tq."""
    H, dqk, dv = config.num_attention_heads, config.qk_head_dim, config.v_head_dim
    return KernelCost("decode, decompressed cache", "attention (naive)", f"B={batch}, {mean_len} cached, H={H}",
                      (batch * mean_len * H * (dqk + dv) + batch * q_len * H * (dqk + dv)) * BF16,
                      2 * batch * q_len * H * mean_len * (dqk + dv))


def prefill_cost(config: ModelConfig, seq_len: int, batch: int = 1) -> KernelCost:
    """Causal flash attention over full heads for prefill: half of the T x T scores, each a qk_head_dim dot product,
    and half of the P @ V products. Reads q, k, v and writes o once."""
    H, dqk, dv = config.num_attention_heads, config.qk_head_dim, config.v_head_dim
    return KernelCost(f"prefill attention (T={seq_len})", "attention_prefill", f"B={batch}, T={seq_len}, H={H}",
                      batch * H * seq_len * (2 * dqk + 2 * dv) * BF16,
                      2 * batch * H * seq_len * seq_len * (dqk + dv) / 2)


def act_quant_cost(tokens: int, width: int) -> KernelCost:
    """1 x 128 activation quantization: read bf16, write e4m3 and one fp32 scale per tile (abs, max, divide)."""
    return KernelCost("act_quant 1x128", "act_quant", f"{tokens} x {width}",
                      tokens * width * (BF16 + 1) + tokens * _cdiv(width, FP8_BLOCK) * 4, 3 * tokens * width)


def weight_dequant_cost(rows: int, cols: int) -> KernelCost:
    """128 x 128 block dequantization of an e4m3 weight to bf16 (one multiply per element)."""
    return KernelCost("weight_dequant 128x128", "weight_dequant", f"{rows} x {cols}",
                      rows * cols * (1 + BF16) + _cdiv(rows, FP8_BLOCK) * _cdiv(cols, FP8_BLOCK) * 4, rows * cols)


def fp8_gemm_cost(tokens: int, n: int, k: int) -> KernelCost:
    """Block-scaled FP8 GEMM y = a w^T: a (M, K) e4m3 + 1x128 scales, w (N, K) e4m3 + 128x128 scales, y bf16."""
    nbytes = (tokens * k + tokens * _cdiv(k, FP8_BLOCK) * 4 + n * k + _cdiv(n, FP8_BLOCK) * _cdiv(k, FP8_BLOCK) * 4
              + tokens * n * BF16)
    return KernelCost("FP8 GEMM (dense FFN down)", "fp8_gemm", f"{tokens} x {n} x {k}", nbytes, 2 * tokens * n * k,
                      precision="fp8")


def cross_entropy_cost(config: ModelConfig, tokens: int) -> KernelCost:
    """LM head + cross-entropy forward, vocabulary-chunked: the (V, D) head is read once, the hidden states once."""
    V, D = config.vocab_size, config.hidden_size
    return KernelCost("LM head + cross-entropy", "linear_cross_entropy", f"{tokens} x {D} x {V}",
                      V * D * BF16 + tokens * D * BF16 + tokens * 8, 2 * tokens * D * V)


def kernel_costs(config: ModelConfig, tokens: int = 64, context: int = 4096,
                 heads: int | None = None) -> list[KernelCost]:
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
    rows = ["| kernel | shape (per layer) | bytes | FLOPs | FLOP/byte | bound | roofline time |",
            "|---|---|---:|---:|---:|---|---:|"]
    for c in costs:
        rows.append(f"| {c.name} | {c.shape} | {_si(c.bytes, 'B')} | {_si(c.flops, '')} | {c.intensity:,.1f} | "
                    f"{c.bound(device)} | {_time(c.time(device))} |")
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
    "rms_norm": COLORS["slate"], "apply_rope": COLORS["cyan"], "router_topk": COLORS["lime"],
    "moe_experts": COLORS["orange"], "mla_decode": COLORS["blue"], "attention (naive)": COLORS["red"],
    "attention_prefill": COLORS["violet"], "act_quant": COLORS["pink"], "weight_dequant": COLORS["pink"],
    "fp8_gemm": COLORS["green"], "linear_cross_entropy": COLORS["slate"],
}
MARKERS = {"weight_dequant": "diamond", "linear_cross_entropy": "square", "attention (naive)": "x",
           "attention_prefill": "star"}
BATCHES = (1, 4, 16, 64, 256, 1024, 4096, 16384)
X_RANGE = (-1.3, 4.3)  # log10 FLOP/byte shown


def _roof(device: Device, precision: str, dash: str, color: str, name: str) -> go.Scatter:
    xs = [10 ** X_RANGE[0], device.ridge(precision), 10 ** X_RANGE[1]]
    ys = [min(device.peak(precision), x * device.bandwidth) / 1e12 for x in xs]
    return go.Scatter(x=xs, y=ys, mode="lines", name=name, line=dict(color=color, dash=dash, width=2),
                      hovertemplate=f"{device.name} ({precision}): ridge at {device.ridge(precision):.0f} FLOP/B"
                                    "<extra></extra>")


def _point(c: KernelCost, device: Device, **marker) -> dict:
    hover = (f"<b>{c.name}</b><br>{c.shape}<br>{_si(c.bytes, 'B')} moved, {_si(c.flops, 'FLOP')}<br>"
             f"{c.intensity:,.1f} FLOP/B: {c.bound(device)}-bound<br>{device.name}: {_time(c.time(device))}")
    return dict(x=_r([c.intensity], 6), y=_r([c.attainable(device) / 1e12], 6), hovertext=[hover])


def roofline_figure(config: ModelConfig, batches: Sequence[int] = BATCHES, context: int = 4096,
                    device: Device = H200_MEASURED, measured: "BenchResults | None" = None,
                    start: int = 64) -> go.Figure:
    """Log-log roofline of the H200 with every kernel at V3 size; a slider moves the number of sequences decoded
    together (the batch), which slides the MoE and the GEMMs along the intensity axis while MLA decoding stays put.
    Points sit on `device`'s roof (the prediction); `measured` adds points from a benchmark table."""
    if start not in batches:
        raise ValueError(f"start batch {start} is not one of the slider's batches {tuple(batches)}")
    fig = figure(title=f"H200 roofline: V3 kernels, {context:,} cached tokens", height=720)
    roofs = [_roof(H200_DATASHEET, "bf16", "solid", COLORS["slate"], "H200 datasheet (bf16)"),
             _roof(H200_MEASURED, "bf16", "dash", COLORS["slate"], "H200 measured (bf16)"),
             _roof(H200_DATASHEET, "fp8", "dot", COLORS["green"], "H200 datasheet (fp8)")]
    for r in roofs:
        fig.add_trace(r)
    first = len(fig.data)
    by_batch = {b: kernel_costs(config, b, context) for b in batches}
    for c in by_batch[start]:
        fig.add_trace(go.Scatter(
            mode="markers", name=c.name, hoverinfo="text",
            marker=dict(size=13, color=KERNEL_COLORS.get(c.op, COLORS["slate"]), symbol=MARKERS.get(c.op, "circle"),
                        line=dict(width=1, color="rgba(255,255,255,0.8)")),
            **_point(c, device)))
    if measured is not None and measured.points():
        pts = measured.points()
        fig.add_trace(go.Scatter(
            x=[p[1] for p in pts], y=[p[2] / 1e12 for p in pts], mode="markers", name="measured (benchmark)",
            marker=dict(size=11, symbol="circle-open", color=COLORS["red"], line=dict(width=2)),
            hovertext=[f"{p[0]}: {p[2] / 1e12:.0f} TFLOP/s" for p in pts], hoverinfo="text"))
    idx = list(range(first, first + len(by_batch[start])))
    fig.frames = [go.Frame(name=str(b), traces=idx, data=[go.Scatter(**_point(c, device)) for c in by_batch[b]])
                  for b in batches]
    fig.update_layout(
        xaxis=dict(type="log", title="arithmetic intensity (FLOP per byte moved)", range=list(X_RANGE)),
        yaxis=dict(type="log", title="attainable TFLOP/s", range=[-3.2, 3.5]),
        legend=dict(font=dict(size=11), orientation="h", yanchor="top", y=-0.33, x=0),
        margin=dict(b=40),
        sliders=[dict(active=list(batches).index(start), currentvalue=dict(prefix="sequences decoded together: "),
                      pad=dict(t=45), steps=[dict(label=str(b), method="animate",
                                                  args=[[str(b)], dict(mode="immediate", frame=dict(duration=0,
                                                                       redraw=True), transition=dict(duration=0))])
                                             for b in batches])])
    return fig


def intensity_figure(config: ModelConfig, context: int = 4096, max_tokens: int = 1 << 16) -> go.Figure:
    """Intensity against batch size: the MoE experts and the FP8 GEMM grow with the batch, MLA decoding depends on
    heads and query tokens only, a decompressed cache stays near 1. Horizontal lines are ridges."""
    Ns = [2 ** i for i in range(int(math.log2(max_tokens)) + 1)]
    fig = figure(title="Intensity against batch size (V3, per layer)", height=560)
    lines = [
        ("MoE experts (bf16)", lambda n: moe_cost(config, n), COLORS["orange"], "solid"),
        ("MLA decode, 128 heads", lambda n: mla_decode_cost(config, n, context), COLORS["blue"], "solid"),
        ("MLA decode, 128 heads, s_q=2 (MTP)", lambda n: mla_decode_cost(config, n, context, 2), COLORS["blue"],
         "dash"),
        ("MLA decode, 32 heads (one GPU of TP4)", lambda n: mla_decode_cost(config, n, context, heads=32),
         COLORS["cyan"], "dot"),
        ("decode, decompressed cache", lambda n: naive_decode_cost(config, n, context), COLORS["red"], "solid"),
        ("RMSNorm + residual", lambda n: rms_norm_cost(config, n), COLORS["slate"], "solid"),
    ]
    for name, fn, color, dash in lines:
        fig.add_trace(go.Scatter(x=Ns, y=[fn(n).intensity for n in Ns], mode="lines", name=name,
                                 line=dict(color=color, dash=dash, width=2.5),
                                 hovertemplate="%{x} tokens: %{y:,.1f} FLOP/B<extra>" + name + "</extra>"))
    ys = [t.y for t in fig.data]
    lo, hi = min(min(y) for y in ys) / 2, max(max(y) for y in ys) * 2
    for dev, dash in ((H200_DATASHEET, "solid"), (H200_MEASURED, "dash"), (H800_DATASHEET, "dot")):
        fig.add_trace(go.Scatter(x=[Ns[0], Ns[-1]], y=[dev.ridge()] * 2, mode="lines",
                                 name=f"ridge: {dev.name} ({dev.ridge():.0f})",
                                 line=dict(color=COLORS["slate"], dash=dash, width=1),
                                 hovertemplate=f"{dev.name} ridge: {dev.ridge():.0f} FLOP/B<extra></extra>"))
    E, K = config.n_routed_experts, config.num_experts_per_tok
    fig.add_trace(go.Scatter(x=[256 * E / K] * 2, y=[lo, hi], mode="lines", name="256 tokens per expert",
                             line=dict(color=COLORS["orange"], dash="dot", width=1),
                             hovertemplate=f"{256 * E // K:,} tokens = 256 per expert<extra></extra>"))
    fig.update_layout(xaxis=dict(type="log", title="tokens in the batch (sequences decoded together)"),
                      yaxis=dict(type="log", title="FLOP per byte"),
                      legend=dict(font=dict(size=11), orientation="h", yanchor="top", y=-0.18, x=0))
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
            res.rows.append(dict(op=cells[0], shape=cells[1], baseline=cells[2], t_baseline=_seconds(cells[3]),
                                 t_triton=_seconds(cells[4]), speedup=float(cells[5].rstrip("x")),
                                 gbps=float(cells[6]), tflops=float(cells[7]), target=cells[10]))
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
    tables = [parse_bench_table(p.read_text(encoding="utf-8"), source=p.name)
              for p in sorted(d.glob("bench_kernels*.txt"))]
    return [t for t in tables if not gpu_only or "interpreter" not in t.device.lower()]


# ---------------------------------------------------------------------------------------------------------------
# Layout pictures: fused MoE rows, paged and split latent cache
# ---------------------------------------------------------------------------------------------------------------


def moe_layout(topk_ids: torch.Tensor, n_experts: int, block_m: int) -> dict:
    """The fused MoE kernel's row layout, from the kernel's own ``moe_align``: for every row block, its expert and,
    for every row, the (token, slot) pair it holds (None for padding). Unused tail blocks are dropped."""
    from ..kernels.backend import load

    sorted_pair, block_expert, _, _ = load("moe_triton").moe_align(topk_ids, n_experts, block_m)
    K = topk_ids.shape[1]
    NK = topk_ids.numel()
    blocks = []
    for b, e in enumerate(block_expert.tolist()):
        if e >= n_experts:
            continue
        rows = sorted_pair[b * block_m:(b + 1) * block_m].tolist()
        blocks.append(dict(expert=e, pairs=[(p // K, p % K) if p < NK else None for p in rows]))
    return dict(blocks=blocks, block_m=block_m, n_experts=n_experts, tokens=topk_ids.shape[0], top_k=K)


def moe_layout_figure(topk_ids: torch.Tensor, n_experts: int, block_m: int) -> go.Figure:
    """Each row of the heatmap is one tile of `block_m` rows handed to one program of the grouped GEMM: the pairs
    routed to one expert, padded to a multiple of the tile height."""
    lay = moe_layout(topk_ids, n_experts, block_m)
    E = n_experts
    z, text = [], []
    for blk in lay["blocks"]:
        z.append([blk["expert"] if p is not None else E for p in blk["pairs"]])  # E: padding
        text.append([f"t{p[0]}" if p is not None else "pad" for p in blk["pairs"]])
    palette = [COLORS[c] for c in ("blue", "orange", "green", "violet", "cyan", "pink", "lime", "red")]
    colors = [palette[e % len(palette)] for e in range(E)] + ["rgba(128, 128, 128, 0.25)"]
    scale = []
    for i, c in enumerate(colors):  # one flat band per category: experts 0..E-1, then padding
        scale += [[i / len(colors), c], [(i + 1) / len(colors), c]]
    labels = [f"tile {i}: expert {b['expert']}" for i, b in enumerate(lay["blocks"])]
    fig = figure(title=f"Fused MoE: {lay['tokens']} tokens x top-{lay['top_k']}, sorted by expert, tiles of "
                       f"{block_m} rows", height=80 + 34 * len(labels))
    fig.add_trace(go.Heatmap(z=z, text=text, texttemplate="%{text}", y=labels, x=[f"row {i}" for i in range(block_m)],
                             colorscale=scale, zmin=-0.5, zmax=E + 0.5, showscale=False, xgap=2, ygap=2,
                             hovertemplate="%{y}, %{x}: %{text}<extra></extra>"))
    fig.update_layout(yaxis=dict(autorange="reversed", showgrid=False), xaxis=dict(showgrid=False, side="top"),
                      margin=dict(t=90))
    return fig


def split_ranges(seq_len: int, num_splits: int, block_n: int) -> list[tuple[int, int]]:
    """The [start, end) slice of a sequence each split-KV program takes: splits of equal length rounded up to whole
    tiles of `block_n` positions (the partition of ``_mla_decode_kernel``); trailing splits may be empty."""
    split_len = _cdiv(_cdiv(seq_len, num_splits), block_n) * block_n
    return [(s * split_len, min((s + 1) * split_len, seq_len)) for s in range(num_splits)]


def paged_cache_figure(seq_lens: Sequence[int], page: int = 64, num_splits: int = 4, block_n: int = 32,
                       seed: int = 0) -> go.Figure:
    """A batch of sequences in a paged latent cache: each bar is one page of `page` positions, labeled with the pool
    block the block table maps it to (shuffled, as a serving engine's allocator leaves them) and colored by the
    split-KV program that reads it."""
    g = torch.Generator().manual_seed(seed)
    n_pages = [_cdiv(s, page) for s in seq_lens]
    pool = torch.randperm(sum(n_pages) + 3, generator=g).tolist()
    palette = [COLORS[c] for c in ("blue", "orange", "green", "violet", "cyan", "pink")]
    fig = figure(title=f"Paged latent cache: pages of {page}, {num_splits} splits per sequence",
                 height=140 + 48 * len(seq_lens))
    at = 0
    shown = set()
    for b, L in enumerate(seq_lens):
        ranges = split_ranges(L, num_splits, block_n)
        for p in range(n_pages[b]):
            lo, hi = p * page, min((p + 1) * page, L)
            for s, (a, z) in enumerate(ranges):  # a page may be shared by two splits (tiles are smaller)
                a2, z2 = max(a, lo), min(z, hi)
                if a2 >= z2:
                    continue
                name = f"split {s}"
                fig.add_trace(go.Bar(
                    y=[f"seq {b} ({L})"], x=[z2 - a2], base=[a2], orientation="h", name=name,
                    legendgroup=name, showlegend=name not in shown, marker=dict(color=palette[s % len(palette)],
                                                                                line=dict(width=1, color="white")),
                    text=[f"#{pool[at + p]}"] if a2 == lo else [""], textposition="inside", insidetextanchor="start",
                    hovertemplate=f"seq {b}, positions {a2}-{z2 - 1}<br>page {p} -> pool block {pool[at + p]}"
                                  f"<br>split {s}<extra></extra>"))
                shown.add(name)
        at += n_pages[b]
    fig.update_layout(barmode="overlay", xaxis=dict(title="cached position"), yaxis=dict(autorange="reversed"),
                      legend=dict(orientation="h", y=-0.25))
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


def fp8_example_activation(width: int = 1024, seed: int = 0, outliers: Sequence[int] = (37, 300, 301),
                           outlier_scale: float = 1000.0) -> torch.Tensor:
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
    from ..kernels import fp8

    q, s = fp8.weight_quant(w)
    q1, s1 = fp8.weight_quant(w, block=max(w.shape))
    return {"bf16": relative_error(w.bfloat16(), w),
            "fp8, 128x128 blocks": relative_error(fp8.weight_dequant(q, s, dtype=torch.float32), w),
            "fp8, one scale per tensor": relative_error(fp8.weight_dequant(q1, s1, block=max(w.shape),
                                                                           dtype=torch.float32), w)}


def fp8_scale_figure(w: torch.Tensor, block: int = FP8_BLOCK) -> go.Figure:
    """The `weight_scale_inv` grid of a weight: one fp32 scale per block x block block (log10 color, value text)."""
    from ..kernels import fp8

    _, s = fp8.weight_quant(w, block)
    z = [_r(row) for row in torch.log10(s).tolist()]
    text = [[f"{v:.1e}" for v in row] for row in s.tolist()]
    fig = figure(title=f"weight_scale_inv: one scale per {block} x {block} block", height=110 + 40 * s.shape[0])
    fig.add_trace(go.Heatmap(z=z, text=text, texttemplate="%{text}", colorscale="Viridis", xgap=2, ygap=2,
                             x=[f"cols {j * block}-{min((j + 1) * block, w.shape[1]) - 1}" for j in range(s.shape[1])],
                             y=[f"rows {i * block}-{min((i + 1) * block, w.shape[0]) - 1}" for i in range(s.shape[0])],
                             colorbar=dict(title="log10 scale"),
                             hovertemplate="%{y}, %{x}<br>scale %{text}<extra></extra>"))
    fig.update_layout(yaxis=dict(autorange="reversed", showgrid=False), xaxis=dict(showgrid=False, tickangle=-30))
    return fig


def error_histogram_figure(errors: dict[str, torch.Tensor], lo: float = -7.0, hi: float = 0.5,
                           bins: int = 75) -> go.Figure:
    """Histograms of log10 relative error (counts precomputed, so the figure stays small). Errors below 10^lo
    (exact values included) fall into the first bin, errors of 10^hi or more (flushed to zero) into the last."""
    fig = figure(title="Relative error of each weight after rounding", height=460)
    width = (hi - lo) / bins
    centers = [round(lo + (i + 0.5) * width, 6) for i in range(bins)]
    colors = [COLORS["blue"], COLORS["green"], COLORS["red"]]
    for (name, err), color in zip(errors.items(), colors):
        logs = torch.log10(err.clamp_min(10 ** lo)).clamp(max=hi - 1e-9)
        counts = torch.histc(logs.float(), bins=bins, min=lo, max=hi)
        share = [round(v, 4) for v in (counts / err.numel() * 100).tolist()]
        fig.add_trace(go.Bar(x=centers, y=share, name=name, marker_color=color, opacity=0.65, width=width,
                             hovertemplate="log10 error %{x:.2f}: %{y:.2f}% of weights<extra>" + name + "</extra>"))
    ticks = list(range(math.ceil(lo), math.floor(hi) + 1))
    fig.update_layout(barmode="overlay", bargap=0,
                      xaxis=dict(title="relative error |w<sub>q</sub> − w| / |w| (below 1e-7: first bar)",
                                 tickvals=ticks, ticktext=[f"1e{t}" if t else "1" for t in ticks]),
                      yaxis=dict(title="% of weights"), legend=dict(orientation="h", yanchor="top", y=-0.25, x=0))
    return fig


def act_errors(x: torch.Tensor, block: int = FP8_BLOCK) -> dict[str, torch.Tensor]:
    """Per-channel relative error of one activation row x (K,) after the e4m3 round trip, with 1 x `block` tiles
    (``act_quant``) and with one scale for the whole row. Also returns the tile scales."""
    from ..kernels import fp8

    K = x.shape[-1]
    q, s = fp8.act_quant(x[None], block)  # (1, K), (1, K/block)
    q1, s1 = fp8.act_quant(x[None], K)  # one scale for the row
    tiled = fp8.act_dequant_torch(q, s, block)[0]  # (K,)
    whole = fp8.act_dequant_torch(q1, s1, K)[0]  # (K,)
    exact = x.double().abs()
    return {"1x128 tiles": (tiled.double() - x.double()).abs() / exact,
            "one scale per row": (whole.double() - x.double()).abs() / exact,
            "tile scales": s[0], "row scale": s1[0]}


def act_tiles_figure(x: torch.Tensor, block: int = FP8_BLOCK) -> go.Figure:
    """Top: |x| per channel and each 1 x `block` tile's amax (= scale x 448), against one amax for the row.
    Bottom: each channel's relative error after the e4m3 round trip against its magnitude relative to the scale
    it was divided by, for tile scales and for one scale per row: below 2^-6 (e4m3's smallest normal number)
    precision falls off."""
    from ..kernels import fp8

    K = x.shape[-1]
    errs = act_errors(x, block)
    fig = make_subplots(rows=2, cols=1, vertical_spacing=0.16,
                        subplot_titles=("|x| per channel, and the amax of each tile and of the row",
                                        "relative error against |x| / scale"))
    fig.update_layout(height=680, title=f"act_quant: one token, {K} channels, {K // block} tiles",
                      legend=dict(orientation="h", yanchor="top", y=-0.1, x=0))
    fig.add_trace(go.Scatter(x0=0, dx=1, y=_r(x.abs().tolist(), 3), mode="markers", name="|x|",
                             marker=dict(size=3, color=COLORS["slate"])), row=1, col=1)
    amax = _r((errs["tile scales"] * fp8.FP8_MAX).tolist(), 4)  # one per tile
    fig.add_trace(go.Scatter(x=[t * block for t in range(len(amax))] + [K - 1], y=amax + amax[-1:], mode="lines",
                             line=dict(color=COLORS["blue"], shape="hv"), name="tile amax (scale x 448)"), row=1, col=1)
    fig.add_trace(go.Scatter(x=[0, K - 1], y=_r([float(errs["row scale"][0]) * fp8.FP8_MAX] * 2), mode="lines",
                             line=dict(color=COLORS["red"], dash="dash"), name="row amax (one scale)"), row=1, col=1)
    tile_scale = errs["tile scales"].repeat_interleave(block)[:K]  # (K,) the scale each channel was divided by
    floor = 1e-5
    for name, scale, color in (("1x128 tiles", tile_scale, COLORS["blue"]),
                               ("one scale per row", errs["row scale"].expand(K), COLORS["red"])):
        fig.add_trace(go.Scatter(x=_r((x.abs() / scale).tolist(), 3), y=_r(errs[name].clamp_min(floor).tolist(), 3),
                                 mode="markers", marker=dict(size=4, color=color, opacity=0.6),
                                 name=f"error, {name}"), row=2, col=1)
    fig.add_trace(go.Scatter(x=[2 ** -6] * 2, y=[floor, 1.0], mode="lines", name="2<sup>-6</sup>: smallest normal",
                             line=dict(color=COLORS["slate"], dash="dot", width=1)), row=2, col=1)
    fig.update_yaxes(type="log", row=1, col=1, title="|x|")
    fig.update_xaxes(title="channel", row=1, col=1)
    fig.update_yaxes(type="log", row=2, col=1, title="relative error")
    fig.update_xaxes(type="log", row=2, col=1, title="|x| / scale (the value e4m3 stores; at most 448)")
    return fig


def gemm_errors(m: int = 16, n: int = 128, k: int = 256, seed: int = 0, x_scale: float = 1.0,
                device: str = "cpu") -> dict:
    """Relative (Frobenius) error of y = x w^T against the exact (fp64) product, for: the FP8 block GEMM through
    the dispatcher (act_quant + fp8_gemm, on `device`), its torch reference (on the CPU), and a bf16 matmul."""
    from ..kernels import fp8

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

    return {"fp8_gemm": rel(fused), "fp8_gemm_torch": rel(ref), "bf16 matmul": rel(bf16),
            "fp8_gemm vs its reference": float((fused.double() - ref.double()).abs().max() / ref.abs().max())}


# ---------------------------------------------------------------------------------------------------------------
# Agreement and timing helpers for the chapter's cells
# ---------------------------------------------------------------------------------------------------------------


def max_abs_diff(actual, expected) -> float:
    """Largest |actual - expected| over a tensor or a tuple of tensors (compared in float64)."""
    if isinstance(actual, (tuple, list)):
        return max(max_abs_diff(a, e) for a, e in zip(actual, expected, strict=True))
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if not actual.numel():
        return 0.0
    return float((actual.detach().double() - expected.detach().double()).abs().max())


def max_rel_diff(actual, expected) -> float:
    """max |actual - expected| / max(1, max |expected|): the test suite's measure, blind to the scale of the values."""
    if isinstance(actual, (tuple, list)):
        return max(max_rel_diff(a, e) for a, e in zip(actual, expected, strict=True))
    return max_abs_diff(actual, expected) / max(1.0, float(expected.detach().abs().max()) if expected.numel() else 0.0)


def timing_cases(device: str, big: bool = True, dtype: torch.dtype | None = None) -> list[tuple]:
    """(name, shape, torch_fn, triton_fn) pairs at moderate sizes (big=True, for a GPU) or tiny ones (for a test)."""
    from .. import kernels as K
    from ..kernels import fp8

    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" and torch.cuda.get_device_capability()[0] >= 8 else (
            torch.float16 if device == "cuda" else torch.float32)
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    N, D = (4096, 7168) if big else (8, 64)
    x, r, w = rnd(N, D), rnd(N, D), rnd(D)
    cases = [("rms_norm + residual", f"{N} x {D}", lambda: K.rms_norm_torch(x, w, 1e-6, r),
              lambda: K.rms_norm_triton(x, w, 1e-6, r))]
    T, H = (4096, 128) if big else (4, 3)
    q = rnd(1, T, H, 192 if big else 24)[..., -64 if big else -8:]
    ang = rnd(1, T, 32 if big else 4, dt=torch.float32)
    cases.append(("apply_rope (q rope slice)", f"{T} x {H} x {q.shape[-1]}",
                  lambda: K.apply_rope_torch(q, ang.cos(), ang.sin()),
                  lambda: K.apply_rope_triton(q, ang.cos(), ang.sin())))
    Nr, E = (4096, 256) if big else (4, 16)
    logits, bias = rnd(Nr, E, dt=torch.float32), rnd(E, scale=0.1, dt=torch.float32)
    topk = (8, 8, 4) if big else (2, 4, 2)
    cases.append(("router_topk", f"{Nr} x {E}", lambda: K.router_topk_torch(logits, bias, *topk, 2.5),
                  lambda: K.router_topk_triton(logits, bias, *topk, 2.5)))
    Nm, Em, Dm, Im, Km = (128, 64, 7168, 2048, 8) if big else (5, 4, 32, 16, 2)
    wg, wu, wd = rnd(Em, Im, Dm, scale=Dm ** -0.5), rnd(Em, Im, Dm, scale=Dm ** -0.5), rnd(Em, Dm, Im, scale=Im ** -0.5)
    xm = rnd(Nm, Dm)
    ids = torch.stack([torch.randperm(Em, generator=g, device=device)[:Km] for _ in range(Nm)])
    tw = torch.rand(Nm, Km, generator=g, device=device)
    cases.append(("moe_experts", f"N={Nm}, {Em} experts of {Im} x {Dm}, top-{Km}",
                  lambda: K.moe_experts_torch(xm, wg, wu, wd, tw, ids),
                  lambda: K.moe_experts_triton(xm, wg, wu, wd, tw, ids)))
    B, S, Hd, rk, dr = (32, 4096, 128, 512, 64) if big else (2, 40, 4, 32, 8)
    ql, qr = rnd(B, 1, Hd, rk), rnd(B, 1, Hd, dr)
    ckv, kr = rnd(B, S, rk), rnd(B, S, dr)
    lens = torch.full((B,), S, dtype=torch.int32, device=device)
    cases.append(("mla_decode", f"B={B}, {S} cached, H={Hd}",
                  lambda: K.mla_decode_torch(ql, qr, ckv, kr, lens, 0.07),
                  lambda: K.mla_decode_triton(ql, qr, ckv, kr, lens, 0.07)))
    Mf, Nf, Kf = (4096, 7168, 18432) if big else (8, 128, 256)
    a, sa = fp8.act_quant_torch(rnd(Mf, Kf, dt=torch.float32))
    wq, ws = fp8.weight_quant(rnd(Nf, Kf, scale=0.02, dt=torch.float32))
    out_dt = dtype if dtype != torch.float32 else torch.float32
    cases.append(("fp8_gemm", f"{Mf} x {Nf} x {Kf}", lambda: fp8.fp8_gemm_torch(a, sa, wq, ws, out_dt),
                  lambda: fp8.fp8_gemm_triton(a, sa, wq, ws, out_dt)))
    return cases


def time_call(fn: Callable[[], object], device: str, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds per call (CUDA events on a GPU, the wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
