"""FP8 with fine-grained block scaling (paper Sec. 3.3.2 "Fine-Grained Quantization", Fig. 7).

DeepSeek-V3 trains and ships its linear weights in e4m3 (largest finite value 448) with one scale per tile:
- activations: one scale per 1 x 128 tile (a row segment of 128 channels), computed on the fly;
- weights: one scale per 128 x 128 block; the released checkpoint stores it as `weight_scale_inv` (fp32),
  shaped (ceil(M/128), ceil(N/128)), edge blocks partial, and dequantized weight = fp8 value x scale.
A block-scaled GEMM multiplies fp8 tiles and applies the two scales to each 128-wide partial sum while
accumulating in fp32 (Sec. 3.3.2 "Increasing Accumulation Precision" promotes partial sums to fp32 for
the same reason), so a released FP8 model runs without dequantizing its weights first.

Scale convention, both here and in the checkpoint: scale = amax(|tile|) / 448 (1 for an all-zero tile),
fp8 = round_to_nearest_even(value / scale), value ~= fp8 * scale.

Training (Sec. 3.3.1-3.3.3): `fp8_training_linear` runs the three GEMMs of a linear layer in e4m3 -- Fprop
(X per 1 x 128, W per 128 x 128), Dgrad (dY per 1 x 128, the same quantized W transposed) and Wgrad (dY^T and
X^T per 1 x 128 along the tokens, `fp8_gemm_tiles`) -- and caches its input for the backward in e4m3 with its
tile scales: 1 + 4/128 bytes per element instead of 2 (bf16: 48% saved) or 4 (fp32: 74% saved).

The torch references run on the CPU (torch has float8_e4m3fn tensors there), which is what checkpoint
loading uses. The Triton kernels decode and encode e4m3 with integer bit operations, so they run on any GPU
(and in the interpreter); the GEMM uses the tensor cores' native fp8 on compute capability >= 8.9 and
fp16 tensor cores (which hold every e4m3 value exactly) elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def _nblocks(n: int, block: int) -> int:
    return (n + block - 1) // block


def _check_weight(w, scale_inv, block):
    if w.dim() != 2:
        raise ValueError(f"fp8 weight must be 2-D (M, N), got {tuple(w.shape)}")
    want = (_nblocks(w.shape[0], block), _nblocks(w.shape[1], block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"weight_scale_inv for a {tuple(w.shape)} weight must be {want} "
            f"(one per {block}x{block} block), got {tuple(scale_inv.shape)}"
        )


# ---------------------------------------------------------------------------------------------- references


def weight_quant_torch(w: torch.Tensor, block: int = 128):
    """Quantize a (M, N) weight to e4m3 with one fp32 scale per block x block tile (used to write FP8
    checkpoints). Returns (w_fp8 (M, N), scale_inv (ceil(M/block), ceil(N/block)))."""
    if w.dim() != 2:
        raise ValueError(f"weight_quant: weight must be 2-D, got {tuple(w.shape)}")
    M, N = w.shape
    Mb, Nb = _nblocks(M, block), _nblocks(N, block)
    wp = w.float()
    if (M, N) != (Mb * block, Nb * block):
        wp = F.pad(wp, (0, Nb * block - N, 0, Mb * block - M))  # (Mb*block, Nb*block) zero-padded
    tiles = wp.view(Mb, block, Nb, block)
    amax = tiles.abs().amax(dim=3).amax(dim=1)  # (Mb, Nb), the contiguous axis first (same values, faster)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # (Mb, Nb)
    q = (tiles / scale[:, None, :, None]).view(Mb * block, Nb * block)[:M, :N]  # (M, N) within +-448
    return q.to(FP8_DTYPE), scale


def weight_dequant_torch(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = 128, dtype=None):
    """(M, N) e4m3 weight x per-block scale -> (M, N) in `dtype` (default: torch's default dtype)."""
    _check_weight(w_fp8, scale_inv, block)
    M, N = w_fp8.shape
    dtype = dtype or torch.get_default_dtype()
    out = w_fp8.to(torch.float32)  # (M, N)
    s = scale_inv.float().repeat_interleave(block, dim=1)[:, :N]  # (Mb, N) one row per block row
    Mf = (M // block) * block
    out[:Mf].view(M // block, block, N).mul_(s[: M // block, None, :])  # full block rows
    if Mf < M:
        out[Mf:].mul_(s[-1])  # the partial last block row
    return out.to(dtype)


def act_quant_torch(x: torch.Tensor, block: int = 128):
    """Quantize x (..., K) per 1 x block tile. Returns (x_fp8 (..., K), scales (..., ceil(K/block)) fp32)."""
    K = x.shape[-1]
    Kb = _nblocks(K, block)
    xp = x.float()
    if Kb * block != K:
        xp = F.pad(xp, (0, Kb * block - K))
    xp = xp.reshape(*x.shape[:-1], Kb, block)  # (..., Kb, block)
    amax = xp.abs().amax(dim=-1)  # (..., Kb)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # (..., Kb)
    q = (xp / scale[..., None]).view(*x.shape[:-1], Kb * block)[..., :K]  # (..., K)
    return q.to(FP8_DTYPE), scale


def act_dequant_torch(x_fp8: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Inverse of `act_quant`: (..., K) e4m3 and (..., ceil(K/block)) scales -> (..., K) fp32."""
    K = x_fp8.shape[-1]
    if K % block == 0:  # whole tiles: broadcast each scale over its tile
        tiles = x_fp8.float().reshape(*x_fp8.shape[:-1], K // block, block)  # (..., Kb, block)
        return (tiles * scale.float()[..., None]).reshape(x_fp8.shape)
    s = scale.float().repeat_interleave(block, dim=-1)[..., :K]  # (..., K)
    return x_fp8.float() * s


def fp8_gemm_torch(a_fp8, a_scale, w_fp8, w_scale_inv, out_dtype=torch.bfloat16, block: int = 128):
    """Reference block-scaled GEMM: dequantize both operands to fp32 and multiply.
    Equal to the kernel's sum over K blocks of s_a s_w (a_blk . w_blk), since scales are constant per block."""
    a = act_dequant_torch(a_fp8, a_scale, block)  # (..., K)
    w = weight_dequant_torch(w_fp8, w_scale_inv, block, torch.float32)  # (N, K)
    return (a @ w.t()).to(out_dtype)  # (..., N)


def fp8_gemm_tiles_torch(a_fp8, a_scale, b_fp8, b_scale, out_dtype=torch.float32, block: int = 128):
    """Reference GEMM a @ b^T where BOTH operands are quantized per 1 x block tile along the inner dimension K:
    a (M, K) with scales (M, ceil(K/block)), b (N, K) with scales (N, ceil(K/block)). Training's Wgrad
    (dW = dY^T X, inner dimension = tokens) has this shape: neither operand is a weight."""
    a = act_dequant_torch(a_fp8, a_scale, block)  # (M, K)
    b = act_dequant_torch(b_fp8, b_scale, block)  # (N, K)
    return (a @ b.t()).to(out_dtype)  # (M, N)


# ---------------------------------------------------------------------------------------------- dispatch


def _triton():
    return backend.load("fp8_triton")


def weight_dequant_triton(w_fp8, scale_inv, block: int = 128, dtype=None):
    _check_weight(w_fp8, scale_inv, block)
    return _triton().weight_dequant(w_fp8, scale_inv, block, dtype or torch.get_default_dtype())


def act_quant_triton(x, block: int = 128):
    return _triton().act_quant(x, block)


def fp8_gemm_triton(a_fp8, a_scale, w_fp8, w_scale_inv, out_dtype=torch.bfloat16, block: int = 128, native=None):
    _check_weight(w_fp8, w_scale_inv, block)
    return _triton().fp8_gemm(a_fp8, a_scale, w_fp8, w_scale_inv, out_dtype, block, native)


def fp8_gemm_tiles_triton(a_fp8, a_scale, b_fp8, b_scale, out_dtype=torch.float32, block: int = 128, native=None):
    K = a_fp8.shape[-1]
    if b_fp8.dim() != 2 or tuple(b_scale.shape) != (b_fp8.shape[0], _nblocks(K, block)):
        raise ValueError(
            f"fp8_gemm_tiles: b must be (N, K={K}) with scales (N, {_nblocks(K, block)}), got "
            f"{tuple(b_fp8.shape)} and {tuple(b_scale.shape)}"
        )
    return _triton().fp8_gemm(a_fp8, a_scale, b_fp8, b_scale, out_dtype, block, native, w_row_scale=True)


def weight_quant(w: torch.Tensor, block: int = 128):
    """Quantize a weight to e4m3 + per-block scale_inv (torch; used when writing FP8 checkpoints)."""
    return weight_quant_torch(w, block)


def weight_dequant(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = 128, dtype=None) -> torch.Tensor:
    """Dequantize a (M, N) e4m3 weight with its (ceil(M/128), ceil(N/128)) fp32 `weight_scale_inv`."""
    dtype = dtype or torch.get_default_dtype()
    if backend.use_triton(w_fp8, scale_inv, torch.empty(0, device=w_fp8.device, dtype=dtype)):
        return weight_dequant_triton(w_fp8, scale_inv, block, dtype)
    return weight_dequant_torch(w_fp8, scale_inv, block, dtype)


def act_quant(x: torch.Tensor, block: int = 128):
    """Per-(1 x block)-tile e4m3 quantization of activations: (x_fp8 (..., K), scales (..., ceil(K/block)))."""
    if backend.use_triton(x):
        return act_quant_triton(x, block)
    return act_quant_torch(x, block)


def fp8_gemm(a_fp8, a_scale, w_fp8, w_scale_inv, out_dtype=torch.bfloat16, block: int = 128) -> torch.Tensor:
    """a (..., K) e4m3 with per-tile scales (..., ceil(K/block)), w (N, K) e4m3 with per-block scales:
    returns a @ w^T (..., N) accumulated in fp32, in out_dtype."""
    if a_fp8.shape[-1] != w_fp8.shape[-1]:
        raise ValueError(f"fp8_gemm: a has K={a_fp8.shape[-1]} but w is {tuple(w_fp8.shape)}")
    out_probe = torch.empty(0, device=a_fp8.device, dtype=out_dtype)
    if backend.use_triton(a_fp8, a_scale, w_fp8, w_scale_inv, out_probe):
        return fp8_gemm_triton(a_fp8, a_scale, w_fp8, w_scale_inv, out_dtype, block)
    return fp8_gemm_torch(a_fp8, a_scale, w_fp8, w_scale_inv, out_dtype, block)


def fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, scale_inv: torch.Tensor, bias=None, block: int = 128):
    """y = x @ W^T for an FP8 weight, the way the released model runs: quantize x per 1 x 128 tile, then the
    block-scaled FP8 GEMM; y in x.dtype. (Inference only: no autograd through the quantization.)"""
    a, s = act_quant(x, block)
    y = fp8_gemm(a, s, w_fp8, scale_inv, out_dtype=x.dtype, block=block)
    return y + bias if bias is not None else y


def fp8_gemm_tiles(a_fp8, a_scale, b_fp8, b_scale, out_dtype=torch.float32, block: int = 128) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T with both operands in e4m3 per 1 x block tile along K, accumulated in fp32."""
    if a_fp8.shape[-1] != b_fp8.shape[-1]:
        raise ValueError(f"fp8_gemm_tiles: a has K={a_fp8.shape[-1]} but b is {tuple(b_fp8.shape)}")
    out_probe = torch.empty(0, device=a_fp8.device, dtype=out_dtype)
    if backend.use_triton(a_fp8, a_scale, b_fp8, b_scale, out_probe):
        return fp8_gemm_tiles_triton(a_fp8, a_scale, b_fp8, b_scale, out_dtype, block)
    return fp8_gemm_tiles_torch(a_fp8, a_scale, b_fp8, b_scale, out_dtype, block)


# ---------------------------------------------------------------------------------------------- training


class _FP8TrainingLinear(torch.autograd.Function):
    """y = x W^T (+ b) with all three GEMMs of a linear layer in e4m3 (paper Sec. 3.3, Fig. 6 and 7):

    Fprop  y  = X W^T     X per 1 x 128 tile along K (the in-features), W per 128 x 128 block;
    Dgrad  dX = dY W      dY per 1 x 128 tile along N (the out-features), the same quantized W, transposed;
    Wgrad  dW = dY^T X    dY^T and X^T per 1 x 128 tile along M (the tokens): the 128 x 1 tiles of Sec. 3.3.4.
                          X^T comes from the FP8 copy cached by the forward (dequantized, transposed,
                          re-quantized), so the layer's input is stored in FP8 (Sec. 3.3.3).

    Scales are online: amax(|tile|) / 448 of the current tensor, no history (Sec. 3.3.2). Each GEMM accumulates
    in fp32 and applies the two scales to every 128-element partial sum (the promotion of Sec. 3.3.2): on a GPU
    the Triton kernel does exactly that; on a CPU the torch reference multiplies the dequantized operands in fp32,
    which is the same math with one rounding order. The bias, when there is one, stays in high precision.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, block):
        K = x.shape[-1]
        N = weight.shape[0]
        x2 = x.reshape(-1, K)  # (M, K)
        with torch.autocast(x.device.type, enabled=False):
            xq, xs = act_quant(x2, block)  # (M, K) e4m3, (M, ceil(K/128)) fp32
            wq, ws = weight_quant(weight.detach(), block)  # (N, K) e4m3, (ceil(N/128), ceil(K/128)) fp32
            y = fp8_gemm(xq, xs, wq, ws, out_dtype=torch.float32, block=block)  # (M, N) fp32 accumulation
            if bias is not None:
                y = y + bias.float()
        ctx.save_for_backward(xq, xs, wq, ws)  # the input kept in FP8: ~(1 + 4/128) bytes per element
        ctx.block, ctx.x_dtype, ctx.has_bias = block, x.dtype, bias is not None
        return y.to(x.dtype).view(*x.shape[:-1], N)  # (..., N)

    @staticmethod
    def backward(ctx, grad_out):
        xq, xs, wq, ws = ctx.saved_tensors
        block = ctx.block
        N = grad_out.shape[-1]
        g = grad_out.reshape(-1, N)  # (M, N)
        grad_x = grad_w = grad_b = None
        with torch.autocast(g.device.type, enabled=False):
            if ctx.needs_input_grad[0]:  # Dgrad: inner dimension N
                gq, gs = act_quant(g, block)  # (M, N), (M, ceil(N/128))
                grad_x = fp8_gemm(
                    gq, gs, wq.t().contiguous(), ws.t().contiguous(), out_dtype=torch.float32, block=block
                )  # (M, K)
                grad_x = grad_x.to(ctx.x_dtype).view(*grad_out.shape[:-1], -1)
            if ctx.needs_input_grad[1]:  # Wgrad: inner dimension M (tokens)
                gtq, gts = act_quant(g.t(), block)  # (N, M), (N, ceil(M/128))
                xtq, xts = act_quant(act_dequant_torch(xq, xs, block).t(), block)  # (K, M), (K, ceil(M/128))
                grad_w = fp8_gemm_tiles(gtq, gts, xtq, xts, out_dtype=torch.float32, block=block)  # (N, K)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = g.float().sum(0)  # (N,)
        return grad_x, grad_w, grad_b, None


def fp8_training_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, block: int = 128
) -> torch.Tensor:
    """F.linear(x, weight, bias) for training with the paper's FP8 recipe (Fprop, Dgrad and Wgrad in e4m3 with
    1 x 128 / 128 x 128 online scales, fp32 accumulation; see ``_FP8TrainingLinear``). ``weight`` is the
    high-precision master weight (fp32); gradients come back in its dtype and in x's. Differentiable."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_training_linear: x (..., {x.shape[-1]}) does not match weight {tuple(weight.shape)}")
    return _FP8TrainingLinear.apply(x, weight, bias, block)


def quantize_dequantize(t: torch.Tensor, tile: tuple[int, int] | None = (1, 128)) -> torch.Tensor:
    """t (M, K) after the e4m3 round trip with one scale per `tile` (rows x cols; None: one scale for the
    whole tensor): the value an FP8 GEMM really multiplies. Used by the emulation tests and the numerics."""
    if t.dim() != 2:
        raise ValueError(f"quantize_dequantize: expects a 2-D tensor, got {tuple(t.shape)}")
    M, K = t.shape
    tr, tc = (M, K) if tile is None else tile
    Mb, Kb = _nblocks(M, tr), _nblocks(K, tc)
    tp = F.pad(t.float(), (0, Kb * tc - K, 0, Mb * tr - M)).view(Mb, tr, Kb, tc)  # zero-padded tiles
    amax = tp.abs().amax(dim=(1, 3), keepdim=True)  # (Mb, 1, Kb, 1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tp / scale).to(FP8_DTYPE).float() * scale  # (Mb, tr, Kb, tc)
    return q.view(Mb * tr, Kb * tc)[:M, :K]
