"""Every Triton kernel of dsv3.kernels against its torch reference, on the CPU through Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton defines a kernel; dsv3.kernels imports its kernel modules lazily,
so setting it at the top of this module is enough. The interpreter is ~1000x slower than eager torch: shapes are
tiny but ragged (not multiples of any block), in fp32 and fp16 (the interpreter's bf16 dot is not reliable).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import dsv3.kernels as K  # noqa: E402
from dsv3.kernels import fp8  # noqa: E402

DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


def assert_close(actual, expected, tol):
    """max |a - e| <= tol * max(1, max |e|): a relative bound that ignores the sign of tiny entries."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.float() - expected.float()).abs().max().item()
    scale = max(1.0, expected.float().abs().max().item())
    assert err <= tol * scale, f"max error {err:.3g} > {tol:.1g} x {scale:.3g}"


def grads(fn, inputs, grad_out_seed=0):
    """Run fn, backprop a fixed random cotangent, return (outputs, grads of the inputs that require grad)."""
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(grad_out_seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return outs, torch.autograd.grad(loss, leaves)


def leaf(t):
    return t.detach().clone().requires_grad_()


# ------------------------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(dtype, residual):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 67, dtype=dtype)  # D = 67: not a power of two
    w = (1 + 0.1 * torch.randn(67)).to(dtype)
    r = torch.randn_like(x) if residual else None
    inputs = [leaf(x), leaf(w), leaf(r) if residual else None]

    def run(fn):
        return lambda x, w, r: fn(x, w, 1e-6, residual=r)

    out_t, g_t = grads(run(K.rms_norm_triton), inputs)
    out_r, g_r = grads(run(K.rms_norm_torch), inputs)
    for a, b in zip(out_t, out_r):
        assert a.dtype == b.dtype
        assert_close(a, b, TOL[dtype])
    for a, b in zip(g_t, g_r):
        assert_close(a, b, TOL[dtype] * 4)


def test_rms_norm_dispatch_under_triton_backend():
    x, w = torch.randn(4, 40), torch.randn(40)
    with K.use_backend("triton"):
        y = K.rms_norm(x, w, 1e-5)
    assert_close(y, K.rms_norm_torch(x, w, 1e-5), 1e-5)


# ------------------------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_on_a_strided_slice(dtype):
    """The rope slice q[..., nope:] of a larger tensor (non-contiguous), forward and backward."""
    torch.manual_seed(0)
    B, T, H, nope, R = 2, 5, 3, 12, 10
    q = torch.randn(B, T, H, nope + R, dtype=dtype)
    ang = torch.randn(B, T, R // 2)
    cos, sin = ang.cos(), ang.sin()
    q_t, q_r = leaf(q), leaf(q)
    out_t, (g_t,) = grads(lambda q: K.apply_rope_triton(q[..., nope:], cos, sin), [q_t])
    out_r, (g_r,) = grads(lambda q: K.apply_rope_torch(q[..., nope:], cos, sin), [q_r])
    assert_close(out_t[0], out_r[0], TOL[dtype])
    assert_close(g_t, g_r, TOL[dtype])


def test_rope_inplace_and_dispatch():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 2, 8)
    ang = torch.randn(1, 3, 4)
    expect = K.apply_rope_torch(x, ang.cos(), ang.sin())
    with K.use_backend("triton"):
        assert_close(K.apply_rope(x, ang.cos(), ang.sin()), expect, 1e-5)
    y = x.clone()
    assert K.apply_rope_triton(y, ang.cos(), ang.sin(), inplace=True) is y
    assert_close(y, expect, 1e-5)


# ------------------------------------------------------------------------------------------- router


@pytest.mark.parametrize(
    "N,E,top_k,n_group,topk_group",
    [
        (6, 256, 8, 8, 4),  # DeepSeek-V3 routing
        (5, 24, 4, 3, 2),  # groups of 8
        (5, 24, 6, 3, 2),  # groups of 8, group score = sum of the top 3 (K_r / M = 3)
        (4, 20, 8, 4, 2),  # groups of 5 (not a power of two), group score = sum of the top 4
        (4, 20, 4, 4, 4),  # groups of 5, no group masking
        (3, 16, 4, 1, 1),  # a single group
    ],
)
def test_router(N, E, top_k, n_group, topk_group):
    torch.manual_seed(E)
    logits = torch.randn(N, E) * 2
    bias = torch.randn(E) * 0.5  # negative biases included: masked groups must be -inf, not 0
    w_t, i_t = K.router_topk_triton(logits, bias, top_k, n_group, topk_group, 2.5)
    w_r, i_r = K.router_topk_torch(logits, bias, top_k, n_group, topk_group, 2.5)
    assert i_t.dtype == torch.int64 and w_t.dtype == torch.float32
    assert torch.equal(i_t, i_r)
    assert_close(w_t, w_r, 1e-6)
    w_t, _ = K.router_topk_triton(logits, None, top_k, n_group, topk_group, 1.0, norm_topk_prob=False)
    w_r, _ = K.router_topk_torch(logits, None, top_k, n_group, topk_group, 1.0, norm_topk_prob=False)
    assert_close(w_t, w_r, 1e-6)


def test_router_falls_back_to_torch_for_autograd():
    logits = torch.randn(3, 16, requires_grad=True)
    with K.use_backend("triton"):
        w, _ = K.router_topk(logits, torch.zeros(16), 2, 4, 2, 1.0)
    w.sum().backward()
    assert logits.grad is not None


# ------------------------------------------------------------------------------------------- MoE


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D,I,E,top_k", [(7, 40, 24, 5, 2), (37, 24, 40, 8, 3)])
def test_moe_experts_forward_backward(dtype, N, D, I, E, top_k):
    torch.manual_seed(N)
    x = torch.randn(N, D).to(dtype)
    wg = (torch.randn(E, I, D) / D**0.5).to(dtype)
    wu = (torch.randn(E, I, D) / D**0.5).to(dtype)
    wd = (torch.randn(E, D, I) / I**0.5).to(dtype)
    ids = torch.stack([torch.randperm(E)[:top_k] for _ in range(N)])
    ids[: N // 2, 0] = 1  # one crowded expert (more rows than a tile), some experts left empty
    ids[: N // 2, 1:] = torch.arange(2, 1 + top_k).clamp(max=E - 1)[: top_k - 1]
    tw = torch.rand(N, top_k)
    inputs = [leaf(t) for t in (x, wg, wu, wd, tw)]
    out_t, g_t = grads(lambda *a: K.moe_experts_triton(*a, ids), inputs)
    out_r, g_r = grads(lambda *a: K.moe_experts_torch(*a, ids), inputs)
    assert out_t[0].dtype == dtype
    assert_close(out_t[0], out_r[0], TOL[dtype])
    for name, a, b in zip(["x", "w_gate", "w_up", "w_down", "topk_weights"], g_t, g_r):
        assert a.dtype == b.dtype, name
        assert_close(a, b, TOL[dtype] * 4)


def test_moe_align_pads_each_expert_to_the_tile():
    from dsv3.kernels.moe_triton import moe_align

    ids = torch.tensor([[2, 0], [2, 3], [2, 0]])
    sorted_pair, block_expert, start, end = moe_align(ids, n_experts=5, block_m=4)
    NK = ids.numel()
    assert start.tolist() == [0, 4, 4, 8, 12] and end.tolist() == [4, 4, 8, 12, 12]
    assert block_expert[:3].tolist() == [0, 2, 3] and (block_expert[3:] == 5).all()
    real = sorted_pair[sorted_pair < NK]
    assert sorted(real.tolist()) == list(range(NK))
    assert (ids.view(-1)[real.long()].diff() >= 0).all()  # grouped by expert


# ------------------------------------------------------------------------------------------- MLA


def _paged(ckv, kr, page, extra=3):
    """Scatter a contiguous (B, S, d) cache into a shuffled pool of pages + block table."""
    B, S, r = ckv.shape
    nb = -(-S // page)
    table = torch.randperm(B * nb + extra)[: B * nb].view(B, nb).int()
    pool_c = torch.randn(B * nb + extra, page, r, dtype=ckv.dtype)
    pool_k = torch.randn(B * nb + extra, page, kr.shape[-1], dtype=kr.dtype)
    pool_c[table.long()] = F.pad(ckv, (0, 0, 0, nb * page - S)).view(B, nb, page, r)
    pool_k[table.long()] = F.pad(kr, (0, 0, 0, nb * page - S)).view(B, nb, page, -1)
    return pool_c, pool_k, table


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "Tq,splits,paged,padded",
    [
        (1, None, False, False),
        (2, 3, True, False),
        (1, 1, True, False),
        (2, 1, False, False),
        (2, 3, True, True),
        (3, 1, False, True),
    ],
)
def test_mla_decode(dtype, Tq, splits, paged, padded):
    torch.manual_seed(Tq)
    B, H, r, dr, S = 3, 5, 40, 8, 90  # r = 40: not a power of two; lengths ragged
    seq_lens = torch.tensor([90, 3, 37], dtype=torch.int32)
    starts = torch.tensor([50, 1, 0]) if padded else None  # left padding: per-row first real position
    q, qr = torch.randn(B, Tq, H, r, dtype=dtype), torch.randn(B, Tq, H, dr, dtype=dtype)
    ckv, kr = torch.randn(B, S, r, dtype=dtype), torch.randn(B, S, dr, dtype=dtype)
    expect = K.mla_decode_torch(q, qr, ckv, kr, seq_lens, 0.25, starts=starts)
    if paged:
        pool_c, pool_k, table = _paged(ckv, kr, page=16)
        out = K.mla_decode_triton(q, qr, pool_c, pool_k, seq_lens, 0.25, table, starts=starts, num_splits=splits)
    else:
        out = K.mla_decode_triton(q, qr, ckv, kr, seq_lens, 0.25, starts=starts, num_splits=splits)
    assert out.dtype == dtype
    assert_close(out, expect, TOL[dtype])


@pytest.mark.parametrize("causal", [True, False])
def test_attention_prefill(causal):
    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 37, 24), torch.randn(2, 2, 37, 24)  # Dqk = 24 and Dv = 20: padded tiles
    v = torch.randn(2, 2, 37, 20)
    out = K.attention_prefill_triton(q, k, v, 0.2, causal)
    assert_close(out, K.attention_prefill_torch(q, k, v, 0.2, causal), 1e-5)
    h = [t.half() for t in (q, k, v)]
    assert_close(K.attention_prefill_triton(*h, 0.2, causal), K.attention_prefill_torch(*h, 0.2, causal), 1e-2)


# ------------------------------------------------------------------------------------------- FP8


@pytest.mark.parametrize("dtype", DTYPES)
def test_act_quant_bit_exact(dtype):
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 300) * torch.logspace(-5, 2, 300)).to(dtype)  # K = 300: a partial last tile
    x[0, 0, :128] = 0  # an all-zero tile
    q_t, s_t = fp8.act_quant_triton(x)
    q_r, s_r = fp8.act_quant_torch(x)
    assert q_t.dtype == fp8.FP8_DTYPE and s_t.shape == (2, 3, 3)
    assert torch.equal(s_t, s_r)
    assert torch.equal(q_t.view(torch.uint8), q_r.view(torch.uint8))


def test_weight_dequant_every_e4m3_value_and_partial_blocks():
    bits = torch.arange(256, dtype=torch.uint8)
    bits = bits[(bits & 0x7F) != 0x7F]  # drop the two NaN encodings
    w = bits[:252].view(12, 21).view(fp8.FP8_DTYPE)
    scale = torch.tensor([[1.0, 2.0, 4.0], [0.5, 3.0, 8.0]])  # 8x8 blocks over a 12x21 weight
    for dtype in (torch.float32, torch.float16):
        out = fp8.weight_dequant_triton(w, scale, block=8, dtype=dtype)
        assert out.dtype == dtype
        assert torch.equal(out, fp8.weight_dequant_torch(w, scale, block=8, dtype=dtype))
    torch.manual_seed(0)
    wq, ws = fp8.weight_quant(torch.randn(200, 150))
    assert torch.equal(
        fp8.weight_dequant_triton(wq, ws, dtype=torch.float32), fp8.weight_dequant_torch(wq, ws, dtype=torch.float32)
    )


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("K_", [200, 256])
def test_fp8_gemm(native, K_):
    """native=True: fp8 operands straight into tl.dot (needs K % 128 == 0; else the decoding path runs)."""
    torch.manual_seed(K_)
    a, sa = fp8.act_quant_torch(torch.randn(2, 9, K_))
    wq, sw = fp8.weight_quant(torch.randn(150, K_) * 0.05)
    for out_dtype in (torch.float32, torch.float16):
        out = fp8.fp8_gemm_triton(a, sa, wq, sw, out_dtype=out_dtype, native=native)
        assert out.shape == (2, 9, 150) and out.dtype == out_dtype
        assert_close(out, fp8.fp8_gemm_torch(a, sa, wq, sw, out_dtype=torch.float32), TOL[out_dtype])


def test_fp8_linear_dispatch_under_triton_backend():
    torch.manual_seed(0)
    x = torch.randn(3, 128)
    wq, sw = fp8.weight_quant(torch.randn(64, 128) * 0.1)
    with K.use_backend("torch"):
        expect = fp8.fp8_linear(x, wq, sw)
    with K.use_backend("triton"):
        assert_close(fp8.fp8_linear(x, wq, sw), expect, 1e-5)
        assert torch.equal(
            fp8.weight_dequant(wq, sw, dtype=torch.float32), fp8.weight_dequant_torch(wq, sw, dtype=torch.float32)
        )


# ------------------------------------------------------------------------------------------- linear + CE


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cross_entropy(dtype):
    torch.manual_seed(0)
    N, D, V = 9, 24, 203  # V = 203 in chunks of 64: a partial last chunk
    h = torch.randn(N, D).to(dtype)
    w = (torch.randn(V, D) / 3).to(dtype)
    labels = torch.randint(0, V, (N,))
    labels[2] = -100
    inputs = [leaf(h), leaf(w)]
    (l_t,), g_t = grads(lambda h, w: K.linear_cross_entropy_triton(h, w, labels, chunk_size=64), inputs)
    (l_r,), g_r = grads(lambda h, w: F.cross_entropy(h.float() @ w.float().T, labels), inputs)
    assert l_t.dtype == torch.float32
    assert_close(l_t, l_r, TOL[dtype])
    for a, b in zip(g_t, g_r):
        assert a.dtype == dtype
        assert_close(a, b, TOL[dtype])
    with K.use_backend("triton"):
        assert_close(K.linear_cross_entropy(h, w, labels, chunk_size=100), l_r, TOL[dtype])


# ------------------------------------------------------------------------------------------- benchmark


@pytest.mark.slow
def test_bench_kernels_interpret_smoke():
    """benchmarks/bench_kernels.py --interpret-smoke runs every case at tiny sizes and exits 0 (paths agree)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "bench_kernels.py"), "--interpret-smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| mla_decode (paged 64) |" in out.stdout and "| fp8_gemm vs bf16 matmul |" in out.stdout
