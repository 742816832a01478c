"""Chapter 7's checks: how far a kernel's output is from its reference (``max_abs_diff``, ``max_rel_diff``), and the
(torch reference, Triton kernel) pairs the chapter times with ``dsv3.timing.median_time``."""

from __future__ import annotations

import torch

from .. import kernels as K
from ..kernels import fp8

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
    if dtype is None:
        dtype = (
            torch.bfloat16
            if device == "cuda" and torch.cuda.get_device_capability()[0] >= 8
            else (torch.float16 if device == "cuda" else torch.float32)
        )
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    N, D = (4096, 7168) if big else (8, 64)
    x, r, w = rnd(N, D), rnd(N, D), rnd(D)
    cases = [
        (
            "rms_norm + residual",
            f"{N} x {D}",
            lambda: K.rms_norm_torch(x, w, 1e-6, r),
            lambda: K.rms_norm_triton(x, w, 1e-6, r),
        )
    ]
    T, H = (4096, 128) if big else (4, 3)
    q = rnd(1, T, H, 192 if big else 24)[..., -64 if big else -8 :]
    ang = rnd(1, T, 32 if big else 4, dt=torch.float32)
    cases.append(
        (
            "apply_rope (q rope slice)",
            f"{T} x {H} x {q.shape[-1]}",
            lambda: K.apply_rope_torch(q, ang.cos(), ang.sin()),
            lambda: K.apply_rope_triton(q, ang.cos(), ang.sin()),
        )
    )
    Nr, E = (4096, 256) if big else (4, 16)
    logits, bias = rnd(Nr, E, dt=torch.float32), rnd(E, scale=0.1, dt=torch.float32)
    topk = (8, 8, 4) if big else (2, 4, 2)
    cases.append(
        (
            "router_topk",
            f"{Nr} x {E}",
            lambda: K.router_topk_torch(logits, bias, *topk, 2.5),
            lambda: K.router_topk_triton(logits, bias, *topk, 2.5),
        )
    )
    Nm, Em, Dm, Im, Km = (128, 64, 7168, 2048, 8) if big else (5, 4, 32, 16, 2)
    wg, wu, wd = rnd(Em, Im, Dm, scale=Dm**-0.5), rnd(Em, Im, Dm, scale=Dm**-0.5), rnd(Em, Dm, Im, scale=Im**-0.5)
    xm = rnd(Nm, Dm)
    ids = torch.stack([torch.randperm(Em, generator=g, device=device)[:Km] for _ in range(Nm)])
    tw = torch.rand(Nm, Km, generator=g, device=device)
    cases.append(
        (
            "moe_experts",
            f"N={Nm}, {Em} experts of {Im} x {Dm}, top-{Km}",
            lambda: K.moe_experts_torch(xm, wg, wu, wd, tw, ids),
            lambda: K.moe_experts_triton(xm, wg, wu, wd, tw, ids),
        )
    )
    B, S, Hd, rk, dr = (32, 4096, 128, 512, 64) if big else (2, 40, 4, 32, 8)
    ql, qr = rnd(B, 1, Hd, rk), rnd(B, 1, Hd, dr)
    ckv, kr = rnd(B, S, rk), rnd(B, S, dr)
    lens = torch.full((B,), S, dtype=torch.int32, device=device)
    cases.append(
        (
            "mla_decode",
            f"B={B}, {S} cached, H={Hd}",
            lambda: K.mla_decode_torch(ql, qr, ckv, kr, lens, 0.07),
            lambda: K.mla_decode_triton(ql, qr, ckv, kr, lens, 0.07),
        )
    )
    Mf, Nf, Kf = (4096, 7168, 18432) if big else (8, 128, 256)
    a, sa = fp8.act_quant_torch(rnd(Mf, Kf, dt=torch.float32))
    wq, ws = fp8.weight_quant(rnd(Nf, Kf, scale=0.02, dt=torch.float32))
    out_dt = dtype if dtype != torch.float32 else torch.float32
    cases.append(
        (
            "fp8_gemm",
            f"{Mf} x {Nf} x {Kf}",
            lambda: fp8.fp8_gemm_torch(a, sa, wq, ws, out_dt),
            lambda: fp8.fp8_gemm_triton(a, sa, wq, ws, out_dt),
        )
    )
    return cases
