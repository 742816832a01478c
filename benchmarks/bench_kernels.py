"""Benchmark every dsv3 kernel against its torch reference at DeepSeek-V3 sizes.

    python benchmarks/bench_kernels.py                      # on a CUDA GPU: the full table
    python benchmarks/bench_kernels.py --ops mla,moe        # a subset
    python benchmarks/bench_kernels.py --interpret-smoke    # on a CPU: tiny sizes through Triton's interpreter

For each case it prints the median time of the torch path and of the Triton path (same process, same inputs),
the Triton path's achieved bandwidth (GB/s) and arithmetic rate (TFLOP/s), and its fraction of the roofline:
    roofline time = max(bytes / copy bandwidth, flops / bf16 matmul rate),
where both device limits are MEASURED at the start of the run (a large device-to-device copy, an 8192^3 bf16
matmul). It also checks that the two paths agree (max error relative to the largest reference value).

MLA decode uses FlashMLA's benchmark shapes and formulas: batch 128, mean cache length 4096 / 8192 with lengths
drawn from N(mean, mean/2) (at least s_q), 16..128 query heads, s_q = 1 or 2 (MTP), paged cache (block 64),
    FLOPs = 2 s_q sum(seqlens) h_q (d + dv),   bytes = (sum(seqlens) d + b s_q h_q (d + dv)) x element size,
with d = 576 (512 latent + 64 rope) and dv = 512.

Baselines: the torch reference of each op, except FP8 GEMM (torch's bf16 matmul of the same shape), attention
prefill (torch SDPA) and linear + cross-entropy (F.cross_entropy over materialized logits; TFLOP/s counts
6 N D V, while the fused path does 8 N D V because it recomputes the logits in the backward pass).
--train adds backward passes (MoE on a 64-expert slice of a V3 layer, so gradients fit); --tune sweeps tiles.

Targets from the project issue (checked in the last column): MLA decode >= 3.0 TB/s where memory-bound; norms
and RoPE >= 80% of copy bandwidth; router < 10 us for 256 tokens (GPU time, CUDA graph); fused MoE >= 3x the
torch per-expert loop at decode batch sizes; FP8 GEMM >= 1.5x the bf16 cuBLAS matmul of the same shape.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default="all", help="comma list of: norm,rope,router,moe,mla,prefill,fp8,ce (default all)")
    p.add_argument(
        "--interpret-smoke",
        action="store_true",
        help="CPU: run tiny sizes through the Triton interpreter (checks nothing crashes)",
    )
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per measurement (median reported)")
    p.add_argument("--train", action="store_true", help="also time MoE / norm / RoPE backward passes")
    p.add_argument("--tune", action="store_true", help="sweep MLA decode and FP8 GEMM tile configs")
    p.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.interpret_smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first kernel definition

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import dsv3.kernels as K  # noqa: E402
from dsv3.kernels import fp8  # noqa: E402
from dsv3.timing import median_time  # noqa: E402

SMOKE = ARGS.interpret_smoke
DEV = torch.device("cpu" if SMOKE else "cuda")
DT = torch.float32 if SMOKE else torch.bfloat16  # the interpreter's bf16 dot is unreliable


# ------------------------------------------------------------------------------------------------ timing


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, reps=None, warmup=3, graph=False) -> float:
    """Median seconds per call (``dsv3.timing.median_time``). graph=True captures 20 calls in a CUDA graph (pure GPU
    time, no launch overhead); otherwise each call is bracketed by CUDA events (includes any host-side gaps)."""
    if SMOKE:
        return median_time(fn, reps=1, warmup=0, device=DEV)
    return median_time(fn, reps=reps or ARGS.reps, warmup=warmup, device=DEV, graph=graph)


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# ------------------------------------------------------------------------------------------------ roofline


def measure_roofline():
    """Copy bandwidth (bytes read + written per second) and bf16 matmul rate (FLOP/s) of this device."""
    n = (1 << 16) if SMOKE else (1 << 30)  # 2 GiB of bf16 on a GPU
    src = torch.empty(n, device=DEV, dtype=DT).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src))
    bw = 2 * src.numel() * src.element_size() / t
    m = 128 if SMOKE else 8192
    a = torch.randn(m, m, device=DEV, dtype=DT)
    b = torch.randn(m, m, device=DEV, dtype=DT)
    t = time_fn(lambda: a @ b)
    return bw, 2 * m**3 / t


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class Row:
    op: str
    shape: str
    t_torch: float
    t_triton: float
    bytes: float = 0.0
    flops: float = 0.0
    err: float = float("nan")
    target: str = ""
    torch_label: str = "torch ref"
    notes: list = field(default_factory=list)


def pair(op, shape, torch_fn, triton_fn, bytes_=0.0, flops=0.0, target="", graph=False, torch_label="torch ref"):
    """Time both paths on the same inputs and compare their outputs."""
    out_r = torch_fn()
    out_t = triton_fn()
    first = lambda o: o[0] if isinstance(o, tuple) else o
    err = rel_err(first(out_t), first(out_r))
    del out_r, out_t
    t_r = time_fn(torch_fn, graph=False)
    t_t = time_fn(triton_fn, graph=graph)
    return Row(op, shape, t_r, t_t, bytes_, flops, err, target, torch_label)


def esize(dtype):
    return torch.finfo(dtype).bits // 8


def case_norm():
    rows = []
    M = 64 if SMOKE else 16384
    for D in [40] if SMOKE else [7168, 1536, 512]:
        x = torch.randn(M, D, device=DEV, dtype=DT)
        r = torch.randn_like(x)
        w = torch.randn(D, device=DEV, dtype=DT)
        rows.append(
            pair(
                "rms_norm",
                f"{M}x{D}",
                lambda: K.rms_norm_torch(x, w, 1e-6),
                lambda: K.rms_norm_triton(x, w, 1e-6),
                bytes_=2 * x.numel() * esize(DT),
                target="bw80",
            )
        )
        rows.append(
            pair(
                "rms_norm+residual",
                f"{M}x{D}",
                lambda: K.rms_norm_torch(x, w, 1e-6, r),
                lambda: K.rms_norm_triton(x, w, 1e-6, r),
                bytes_=4 * x.numel() * esize(DT),
                target="bw80",
            )
        )
        if ARGS.train:
            xg, rg, wg = (t.clone().requires_grad_() for t in (x, r, w))
            dy = torch.randn_like(x)

            def fwd_bwd(fn):
                return lambda: torch.autograd.grad(fn(xg, wg, 1e-6, rg)[0], (xg, rg, wg), dy)

            rows.append(
                pair(
                    "rms_norm+res fwd+bwd",
                    f"{M}x{D}",
                    fwd_bwd(K.rms_norm_torch),
                    fwd_bwd(K.rms_norm_triton),
                    bytes_=(4 + 5) * x.numel() * esize(DT),
                )
            )
    return rows


def case_rope():
    B, T, H = (2, 8, 3) if SMOKE else (4, 4096, 128)
    q = torch.randn(B, T, H, 192, device=DEV, dtype=DT)  # (B, T, H, nope + rope): rotate the strided rope slice
    ang = torch.randn(B, T, 32, device=DEV)
    cos, sin = ang.cos(), ang.sin()
    x = q[..., 128:]
    n = x.numel() * esize(DT)
    rows = [
        pair(
            "rope (q rope slice)",
            f"{B}x{T}x{H}x64",
            lambda: K.apply_rope_torch(x, cos, sin),
            lambda: K.apply_rope_triton(x, cos, sin),
            bytes_=2 * n + 2 * cos.numel() * 4,
            target="bw80",
        )
    ]
    y = x.clone()
    rows.append(
        pair(
            "rope in place",
            f"{B}x{T}x{H}x64",
            lambda: K.apply_rope_torch(y, cos, sin),
            lambda: K.apply_rope_triton(y, cos, sin, inplace=True),
            bytes_=2 * n + 2 * cos.numel() * 4,
            target="bw80",
        )
    )
    return rows


def case_router():
    rows = []
    for N in [5] if SMOKE else [256, 4096]:
        logits = torch.randn(N, 256, device=DEV)
        bias = torch.randn(256, device=DEV) * 0.1
        args = (logits, bias, 8, 8, 4, 2.5)
        rows.append(
            pair(
                "router (graph)",
                f"{N} tok, 256 exp, top-8",
                lambda: K.router_topk_torch(*args),
                lambda: K.router_topk_triton(*args),
                bytes_=logits.numel() * 4,
                target="router10us" if N == 256 else "",
                graph=not SMOKE,
            )
        )
        rows[-1].t_torch = time_fn(lambda: K.router_topk_torch(*args), graph=not SMOKE)  # both as graphs
        if not SMOKE:
            rows.append(
                pair(
                    "router (eager)",
                    f"{N} tok",
                    lambda: K.router_topk_torch(*args),
                    lambda: K.router_topk_triton(*args),
                    bytes_=logits.numel() * 4,
                )
            )
    return rows


def case_moe():
    rows = []
    E, D, I, Kt = (8, 48, 32, 2) if SMOKE else (256, 7168, 2048, 8)
    g = torch.Generator(device=DEV).manual_seed(0)
    wg = torch.randn(E, I, D, device=DEV, dtype=DT, generator=g) * D**-0.5
    wu = torch.randn(E, I, D, device=DEV, dtype=DT, generator=g) * D**-0.5
    wd = torch.randn(E, D, I, device=DEV, dtype=DT, generator=g) * I**-0.5
    for N in [3] if SMOKE else [1, 8, 32, 128, 4096]:
        x = torch.randn(N, D, device=DEV, dtype=DT)
        ids = torch.stack([torch.randperm(E, device=DEV)[:Kt] for _ in range(N)])
        tw = torch.rand(N, Kt, device=DEV)
        active = int(torch.unique(ids).numel())
        flops = 2 * 3 * N * Kt * I * D
        bytes_ = active * 3 * I * D * esize(DT) + 2 * N * D * esize(DT)
        rows.append(
            pair(
                "moe_experts",
                f"N={N} E={E} top-{Kt} ({active} active)",
                lambda: K.moe_experts_torch(x, wg, wu, wd, tw, ids),
                lambda: K.moe_experts_triton(x, wg, wu, wd, tw, ids),
                bytes_,
                flops,
                target="moe3x" if N <= 128 else "",
                torch_label="torch expert loop",
            )
        )
    if ARGS.train or SMOKE:
        Et = 8 if SMOKE else 64  # a 64-expert slice of a V3 layer keeps gradients in memory
        N = 6 if SMOKE else 4096
        params = [t[:Et].clone().requires_grad_() for t in (wg, wu, wd)]
        x = torch.randn(N, D, device=DEV, dtype=DT, requires_grad=True)
        ids = torch.stack([torch.randperm(Et, device=DEV)[:Kt] for _ in range(N)])
        tw = torch.rand(N, Kt, device=DEV, requires_grad=True)
        dy = torch.randn(N, D, device=DEV, dtype=DT)

        def fwd_bwd(fn):
            return lambda: torch.autograd.grad(fn(x, *params, tw, ids), (x, *params, tw), dy)

        rows.append(
            pair(
                "moe_experts fwd+bwd",
                f"N={N} E={Et} top-{Kt}",
                fwd_bwd(K.moe_experts_torch),
                fwd_bwd(K.moe_experts_triton),
                flops=3 * 2 * 3 * N * Kt * I * D,
                torch_label="torch expert loop",
            )
        )
    return rows


def _paged_cache(seqlens, r, dr, page):
    blocks = [math.ceil(s / page) for s in seqlens]
    B, nb = len(seqlens), max(blocks)
    total = sum(blocks)
    perm = torch.randperm(total, device=DEV).int()
    table = torch.zeros(B, nb, dtype=torch.int32, device=DEV)
    at = 0
    for b, n in enumerate(blocks):
        table[b, :n] = perm[at : at + n]
        at += n
    pool_c = torch.randn(total, page, r, device=DEV, dtype=DT)
    pool_k = torch.randn(total, page, dr, device=DEV, dtype=DT)
    return pool_c, pool_k, table


def case_mla():
    rows = []
    r, dr, page = (64, 16, 64) if SMOKE else (512, 64, 64)
    b = 2 if SMOKE else 128
    rng = random.Random(0)
    for mean_sk in [100] if SMOKE else [4096, 8192]:
        for h_q in [4] if SMOKE else [16, 32, 64, 128]:
            for s_q in (1, 2):
                seqlens = [max(int(rng.normalvariate(mean_sk, mean_sk / 2)), s_q) for _ in range(b)]
                pool_c, pool_k, table = _paged_cache(seqlens, r, dr, page)
                lens = torch.tensor(seqlens, dtype=torch.int32, device=DEV)
                q = torch.randn(b, s_q, h_q, r, device=DEV, dtype=DT)
                qr = torch.randn(b, s_q, h_q, dr, device=DEV, dtype=DT)
                scale = (128 + 64) ** -0.5
                total = sum(seqlens)
                flops = 2 * s_q * total * h_q * (r + dr + r)
                bytes_ = (total * (r + dr) + b * s_q * h_q * (r + dr + r)) * esize(DT)
                memory_bound = bytes_ / BW > flops / PEAK
                rows.append(
                    pair(
                        "mla_decode (paged 64)",
                        f"b={b} sk~{mean_sk} h={h_q} s_q={s_q}",
                        lambda: K.mla_decode_torch(q, qr, pool_c, pool_k, lens, scale, table),
                        lambda: K.mla_decode_triton(q, qr, pool_c, pool_k, lens, scale, table),
                        bytes_,
                        flops,
                        target="mla3tb" if memory_bound else "",
                    )
                )
                if ARGS.tune and not SMOKE:
                    from dsv3.kernels import mla_triton

                    for cfg in (
                        dict(BLOCK_H=16, BLOCK_N=32, num_warps=4),
                        dict(BLOCK_H=16, BLOCK_N=64, num_warps=4),
                        dict(BLOCK_H=32, BLOCK_N=32, num_warps=8),
                        dict(BLOCK_H=64, BLOCK_N=32, num_warps=8),
                        dict(BLOCK_H=64, BLOCK_N=16, num_warps=8),
                    ):
                        fn = lambda cfg=cfg: mla_triton.mla_decode(
                            q, qr, pool_c, pool_k, lens, scale, table, config=cfg
                        )
                        try:
                            t = time_fn(fn, reps=5)
                            rows[-1].notes.append(
                                f"H{cfg['BLOCK_H']}/N{cfg['BLOCK_N']}/w{cfg['num_warps']}: {bytes_ / t / 1e12:.2f} TB/s"
                            )
                        except Exception as e:  # a config that does not fit the GPU
                            rows[-1].notes.append(f"{cfg}: {type(e).__name__}")
                pool_c = pool_k = None  # free the pool before the next, larger one is allocated
    return rows


def case_prefill():
    B, H, T = (1, 2, 40) if SMOKE else (1, 128, 4096)
    q = torch.randn(B, H, T, 192, device=DEV, dtype=DT)
    k = torch.randn(B, H, T, 192, device=DEV, dtype=DT)
    v = torch.randn(B, H, T, 128, device=DEV, dtype=DT)
    flops = 2 * B * H * T * T * (192 + 128) / 2  # causal: half the score matrix
    return [
        pair(
            "attention_prefill (causal)",
            f"B={B} H={H} T={T} d=192/128",
            lambda: K.attention_prefill_torch(q, k, v, 192**-0.5),
            lambda: K.attention_prefill_triton(q, k, v, 192**-0.5),
            flops=flops,
            torch_label="torch SDPA",
        )
    ]


def case_fp8():
    rows = []
    M, Kd = (8, 200) if SMOKE else (8192, 7168)
    x = torch.randn(M, Kd, device=DEV, dtype=DT)
    rows.append(
        pair(
            "act_quant 1x128",
            f"{M}x{Kd}",
            lambda: fp8.act_quant_torch(x)[0].view(torch.uint8).float(),
            lambda: fp8.act_quant_triton(x)[0].view(torch.uint8).float(),
            bytes_=x.numel() * (esize(DT) + 1),
            target="bw80",
        )
    )
    Wm, Wn = (150, 200) if SMOKE else (18432, 7168)
    wq, ws = fp8.weight_quant(torch.randn(Wm, Wn, device=DEV) * 0.02)
    rows.append(
        pair(
            "weight_dequant 128x128",
            f"{Wm}x{Wn}",
            lambda: fp8.weight_dequant_torch(wq, ws, dtype=DT),
            lambda: fp8.weight_dequant_triton(wq, ws, dtype=DT),
            bytes_=wq.numel() * (1 + esize(DT)),
            target="bw80",
        )
    )
    out = torch.float32 if SMOKE else torch.bfloat16
    shapes = (
        [(8, 150, 256)] if SMOKE else [(8192, 8192, 8192), (8192, 7168, 18432), (8192, 24576, 1536), (128, 7168, 18432)]
    )
    for m, n, k in shapes:
        a, sa = fp8.act_quant(torch.randn(m, k, device=DEV, dtype=DT))
        w, sw = fp8.weight_quant(torch.randn(n, k, device=DEV) * 0.02)
        a_bf, w_bf = torch.randn(m, k, device=DEV, dtype=DT), torch.randn(n, k, device=DEV, dtype=DT)
        row = pair(
            "fp8_gemm vs bf16 matmul",
            f"{m}x{n}x{k}",
            lambda: a_bf @ w_bf.T,
            lambda: fp8.fp8_gemm_triton(a, sa, w, sw, out),
            flops=2 * m * n * k,
            target="fp8x1.5" if m >= 4096 else "",
            torch_label="torch bf16 mm",
        )
        row.err = rel_err(
            fp8.fp8_gemm_triton(a, sa, w, sw, torch.float32), fp8.fp8_gemm_torch(a, sa, w, sw, torch.float32)
        )
        rows.append(row)
        if ARGS.tune and not SMOKE:
            from dsv3.kernels import fp8_triton

            for cfg in ((128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4)):
                t = time_fn(lambda cfg=cfg: fp8_triton.fp8_gemm(a, sa, w, sw, out, config=cfg), reps=5)
                row.notes.append(f"{cfg}: {2 * m * n * k / t / 1e12:.0f} TFLOP/s")
    return rows


def case_ce():
    N, D, V = (12, 32, 300) if SMOKE else (8192, 7168, 129280)
    h = (torch.randn(N, D, device=DEV, dtype=DT) * 0.5).requires_grad_()
    w = (torch.randn(V, D, device=DEV, dtype=DT) * D**-0.5).requires_grad_()
    labels = torch.randint(0, V, (N,), device=DEV)
    chunk = 64 if SMOKE else None

    def full():
        loss = F.cross_entropy((h @ w.T).float(), labels)
        return (loss, *torch.autograd.grad(loss, (h, w)))

    def fused():
        loss = K.linear_cross_entropy_triton(h, w, labels, chunk_size=chunk)
        return (loss, *torch.autograd.grad(loss, (h, w)))

    rows = []
    for label, fn in (("F.cross_entropy(h @ W.T)", full), ("fused triton", fused)):
        if DEV.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            sync()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        else:
            peak = float("nan")
        rows.append(f"{label}: peak extra memory {peak:.2f} GiB")
    row = pair(
        "linear_cross_entropy fwd+bwd",
        f"N={N} D={D} V={V}",
        full,
        fused,
        flops=6 * N * D * V,
        torch_label="F.cross_entropy",
    )
    row.notes = rows
    return [row]


CASES = dict(
    norm=case_norm,
    rope=case_rope,
    router=case_router,
    moe=case_moe,
    mla=case_mla,
    prefill=case_prefill,
    fp8=case_fp8,
    ce=case_ce,
)


# ------------------------------------------------------------------------------------------------ report


def verdict(row: Row) -> str:
    t = row.t_triton
    if row.target == "bw80":
        f = row.bytes / t / BW
        return f"{'PASS' if f >= 0.8 else 'MISS'} (>= 80% copy bw)"
    if row.target == "mla3tb":
        return f"{'PASS' if row.bytes / t >= 3e12 else 'MISS'} (>= 3.0 TB/s)"
    if row.target == "router10us":
        return f"{'PASS' if t < 10e-6 else 'MISS'} (< 10 us)"
    if row.target == "moe3x":
        return f"{'PASS' if row.t_torch / t >= 3 else 'MISS'} (>= 3x loop)"
    if row.target == "fp8x1.5":
        return f"{'PASS' if row.t_torch / t >= 1.5 else 'MISS'} (>= 1.5x bf16)"
    return ""


def fmt_time(s):
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def table(rows, bw, peak, device_name):
    lines = [
        f"# dsv3 kernel benchmark: {device_name}",
        "",
        f"Measured in this run: copy bandwidth {bw / 1e9:.0f} GB/s (read + write), "
        f"{str(DT).replace('torch.', '')} matmul {peak / 1e12:.0f} TFLOP/s. "
        f"torch {torch.__version__}{', TRITON_INTERPRET=1 (times are meaningless)' if SMOKE else ''}.",
        "",
        "| op | shape | baseline | baseline time | triton time | speedup | GB/s | TFLOP/s | roofline "
        "| max rel err | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r.t_triton
        roof = max(r.bytes / bw, r.flops / peak) / t if (r.bytes or r.flops) else float("nan")
        lines.append(
            f"| {r.op} | {r.shape} | {r.torch_label} | {fmt_time(r.t_torch)} | {fmt_time(t)} | "
            f"{r.t_torch / t:.2f}x | {r.bytes / t / 1e9:.0f} | {r.flops / t / 1e12:.1f} | "
            f"{roof:.0%} | {r.err:.1e} | {verdict(r)} |"
        )
    notes = [f"- {r.op} {r.shape}: {n}" for r in rows for n in r.notes]
    if notes:
        lines += ["", "Notes:"] + notes
    return "\n".join(lines)


def main():
    global BW, PEAK
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (or --interpret-smoke on a CPU)")
    if not K.triton_available():
        sys.exit("bench_kernels.py needs triton")
    torch.manual_seed(0)
    K.set_backend("triton")
    BW, PEAK = measure_roofline()
    ops = list(CASES) if ARGS.ops == "all" else ARGS.ops.split(",")
    unknown = [o for o in ops if o not in CASES]
    if unknown:
        sys.exit(f"unknown --ops {unknown}; choose from {list(CASES)}")
    rows = []
    for op in ops:
        t0 = time.time()
        rows += CASES[op]()
        print(f"[{op}: {time.time() - t0:.1f} s]", file=sys.stderr, flush=True)
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if DEV.type == "cuda" else "CPU (Triton interpreter)"
    text = table(rows, BW, PEAK, name)
    print(text)
    bad = [r for r in rows if r.err == r.err and r.err > (0.05 if DT == torch.bfloat16 else 1e-3)]
    if ARGS.out:
        d = os.path.dirname(os.path.abspath(ARGS.out))
        os.makedirs(d, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=d, delete=False, suffix=".tmp") as f:
            f.write(text + "\n")
        os.replace(f.name, ARGS.out)  # atomic
    if bad:
        sys.exit(f"torch and triton disagree: {[(r.op, r.shape, r.err) for r in bad]}")


BW = PEAK = float("nan")

if __name__ == "__main__":
    main()
