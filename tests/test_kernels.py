"""dsv3.kernels: the backend switch, and every torch reference against an oracle we did not write
(transformers' DeepSeek-V3 modules, F.cross_entropy, SDPA, torch's own fp8 cast) or against a hand-made case.

The Triton kernels are compared with these references in tests/test_kernels_triton.py.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (see test_kernels_triton.py)

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dsv3.kernels as K
from dsv3.kernels import backend, fp8
from helpers import rel_err

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------- backend switch


def test_set_backend_validates_and_context_restores():
    start = K.get_backend()
    assert start in K.BACKENDS
    with pytest.raises(ValueError, match="kernel backend 'cuda'"):
        K.set_backend("cuda")
    with K.use_backend("torch"):
        assert K.get_backend() == "torch"
        with pytest.raises(RuntimeError):  # restored even when the block raises
            with K.use_backend("auto"):
                raise RuntimeError
        assert K.get_backend() == "torch"
    assert K.get_backend() == start


def test_backend_belongs_to_the_thread_or_context():
    import contextvars
    import threading

    start = K.get_backend()
    seen = {}
    with K.use_backend("torch"):
        worker = threading.Thread(target=lambda: seen.update(thread=K.get_backend()))
        worker.start()
        worker.join()

        def set_inside():
            K.set_backend("auto")
            return K.get_backend()

        seen["copied context"] = contextvars.copy_context().run(set_inside)
        assert K.get_backend() == "torch"  # neither the thread nor the copied context changed ours
    assert seen == {"thread": backend._default, "copied context": "auto"}
    assert K.get_backend() == start


def test_auto_runs_torch_on_cpu_tensors():
    x = torch.randn(3, 8)
    assert not backend.use_triton(x)
    with K.use_backend("torch"):
        assert not backend.use_triton(x)


def test_triton_backend_on_cpu_without_interpreter_raises(monkeypatch):
    if not K.triton_available():
        pytest.skip("triton not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with K.use_backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            backend.use_triton(torch.randn(2, 2))


def test_import_and_torch_path_without_triton():
    """A CPU-only install without triton: the package imports, auto runs torch, "triton" fails clearly."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, dsv3.kernels as K\n"
        "assert not K.triton_available()\n"
        "y = K.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)\n"
        "w, i = K.router_topk(torch.randn(3, 8), torch.zeros(8), 2, 2, 1, 1.0)\n"
        "try:\n"
        "    K.set_backend('triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton package' in str(e), e\n"
        "    print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ------------------------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm_reference_matches_transformers(dtype):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    torch.manual_seed(0)
    ref = DeepseekV3RMSNorm(37, eps=1e-6).to(dtype)
    with torch.no_grad():
        ref.weight.normal_(1.0, 0.1)
    x = torch.randn(2, 5, 37, dtype=dtype)
    assert torch.equal(K.rms_norm_torch(x, ref.weight, 1e-6), ref(x))
    r = torch.randn_like(x)
    y, s = K.rms_norm_torch(x, ref.weight, 1e-6, residual=r)
    assert torch.equal(s, x + r) and torch.equal(y, ref(x + r))


# ------------------------------------------------------------------------------------------- RoPE


def test_rope_reference_matches_transformers_interleave():
    """transformers rotates the same pairs but writes evens then odds (a fixed permutation of ours)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    torch.manual_seed(0)
    B, T, H, R = 2, 6, 3, 16
    q = torch.randn(B, T, H, R)
    k = torch.randn(B, T, 1, R)
    ang = torch.randn(B, T, R // 2)
    cos, sin = ang.cos(), ang.sin()
    hf_q, hf_k = apply_rotary_pos_emb_interleave(
        q, k, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1), unsqueeze_dim=2
    )
    for ours, theirs in ((K.apply_rope_torch(q, cos, sin), hf_q), (K.apply_rope_torch(k, cos, sin), hf_k)):
        torch.testing.assert_close(ours[..., 0::2], theirs[..., : R // 2])
        torch.testing.assert_close(ours[..., 1::2], theirs[..., R // 2 :])


def test_rope_rejects_bad_shapes():
    with pytest.raises(ValueError, match="cos must be"):
        K.apply_rope(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3), torch.randn(1, 2, 4))


# ------------------------------------------------------------------------------------------- router


def test_router_reference_matches_transformers():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    torch.manual_seed(0)
    cfg = DeepseekV3Config(
        hidden_size=16,
        n_routed_experts=32,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    router = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.normal_(0, 0.3)
    h = torch.randn(11, 16)
    logits, w_hf, i_hf = router(h)
    w, i = K.router_topk_torch(logits, router.e_score_correction_bias, 4, 4, 2, 2.5)
    ours, theirs = i.sort(dim=1), i_hf.sort(dim=1)  # transformers returns the top-k unsorted
    assert torch.equal(ours.values, theirs.values)
    torch.testing.assert_close(w.gather(1, ours.indices), w_hf.gather(1, theirs.indices))


def test_router_group_score_sums_the_top_k_over_m_affinities():
    """K_r = 3 experts from M = 1 of 2 groups: the group score is the sum of a group's top 3 (not the top 2 that
    transformers and DeepSeek's code hard-code for V3's K_r / M = 2). Group 0 = [0.9, 0.85, 0.1, 0.1] leads on the
    top 2 (1.75 vs 1.55) but group 1 = [0.8, 0.75, 0.7, 0.05] wins on the top 3 (2.25 vs 1.85)."""
    s = torch.tensor([[0.9, 0.85, 0.1, 0.1, 0.8, 0.75, 0.7, 0.05]])
    logits = torch.log(s / (1 - s))
    steps = K.router_topk_torch(logits, None, 3, 2, 1, 1.0, return_steps=True)
    assert steps["per_group"] == 3
    torch.testing.assert_close(steps["group_scores"], torch.tensor([[1.85, 2.25]]))
    assert steps["kept_groups"].tolist() == [[False, True]]
    assert steps["ids"].tolist() == [[4, 5, 6]]
    torch.testing.assert_close(steps["weights"], torch.tensor([[0.8, 0.75, 0.7]]) / 2.25)


def test_router_reference_matches_a_by_hand_loop_for_k_over_m_3():
    """Random tokens, 24 experts in 4 groups, keep 2 groups, pick 6 (top 3 per group), against plain Python."""
    torch.manual_seed(3)
    N, E, G, M, K_r = 7, 24, 4, 2, 6
    logits, bias = torch.randn(N, E, dtype=torch.float64), torch.randn(E, dtype=torch.float64) * 0.3
    w, ids = K.router_topk_torch(logits, bias, K_r, G, M, 2.5)
    for n in range(N):
        s = [1 / (1 + math.exp(-u)) for u in logits[n].tolist()]
        c = [si + bi for si, bi in zip(s, bias.tolist())]
        group_score = [sum(sorted(c[g * 6 : (g + 1) * 6], reverse=True)[: K_r // M]) for g in range(G)]
        kept = sorted(range(G), key=lambda g: -group_score[g])[:M]
        candidates = [e for e in range(E) if e // 6 in kept]
        chosen = sorted(candidates, key=lambda e: -c[e])[:K_r]
        g = [s[e] for e in chosen]
        assert ids[n].tolist() == chosen
        torch.testing.assert_close(w[n].double(), torch.tensor([2.5 * x / sum(g) for x in g], dtype=torch.float64))


def test_router_refuses_k_not_divisible_by_m():
    with pytest.raises(ValueError, match="top_k=3 is not divisible by topk_group=2"):
        K.router_topk(torch.randn(2, 8), None, 3, 4, 2, 1.0)


def test_router_hand_made_negative_bias_masks_groups_with_minus_inf():
    """4 experts in 2 groups, keep 1 group, pick 2. Group 1 wins the group vote, but its second expert has a
    negative biased score (-0.2): with -inf masking it is still chosen over group 0's experts; masking with 0
    (the old transformers bug) would choose a group-0 expert instead."""
    s = torch.tensor([[0.5, 0.5, 0.9, 0.3]])  # affinities
    logits = torch.log(s / (1 - s))
    bias = torch.tensor([0.0, 0.0, 0.6, -0.5])  # biased: [0.5, 0.5, 1.5, -0.2]; groups: 1.0 vs 1.3
    w, i = K.router_topk_torch(logits, bias, top_k=2, n_group=2, topk_group=1, routed_scaling_factor=2.0)
    assert i.tolist() == [[2, 3]]
    torch.testing.assert_close(w, torch.tensor([[0.9, 0.3]]) / 1.2 * 2.0)
    w2, _ = K.router_topk_torch(logits, bias, 2, 2, 1, 2.0, norm_topk_prob=False)
    torch.testing.assert_close(w2, torch.tensor([[1.8, 0.6]]))


def test_router_reference_is_differentiable_and_validates():
    logits = torch.randn(5, 16, requires_grad=True)
    w, _ = K.router_topk(logits, torch.zeros(16), 4, 4, 2, 1.0)
    w.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="not divisible by n_group"):
        K.router_topk(torch.randn(2, 10), None, 2, 3, 1, 1.0)
    with pytest.raises(ValueError, match="top_k=9"):
        K.router_topk(torch.randn(2, 16), None, 9, 4, 2, 1.0)


# ------------------------------------------------------------------------------------------- MoE


def _moe_inputs(N, D, I, E, K_, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).to(dtype)
    wg = (torch.randn(E, I, D, generator=g) / D**0.5).to(dtype)
    wu = (torch.randn(E, I, D, generator=g) / D**0.5).to(dtype)
    wd = (torch.randn(E, D, I, generator=g) / I**0.5).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K_] for _ in range(N)])
    tw = torch.rand(N, K_, generator=g)
    return x, wg, wu, wd, tw, ids


def test_moe_reference_matches_dense_per_token_loop():
    x, wg, wu, wd, tw, ids = _moe_inputs(9, 24, 16, 6, 3)
    out = K.moe_experts_torch(x, wg, wu, wd, tw, ids)
    dense = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = ids[n, k]
            dense[n] += tw[n, k] * (wd[e] @ (F.silu(wg[e] @ x[n]) * (wu[e] @ x[n])))
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_moe_reference_matches_transformers_experts():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    x, wg, wu, wd, tw, ids = _moe_inputs(7, 16, 8, 5, 2, seed=1)
    cfg = DeepseekV3Config(hidden_size=16, moe_intermediate_size=8, n_routed_experts=5, num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    experts = DeepseekV3Experts(cfg)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.cat([wg, wu], dim=1))
        experts.down_proj.copy_(wd)
    torch.testing.assert_close(K.moe_experts_torch(x, wg, wu, wd, tw, ids), experts(x, ids, tw))


def test_moe_reference_gradients_match_dense():
    x, wg, wu, wd, tw, ids = _moe_inputs(5, 12, 8, 4, 2, dtype=torch.float64)
    params = [t.requires_grad_() for t in (x, wg, wu, wd, tw)]

    def dense(x, wg, wu, wd, tw):
        h = F.silu(torch.einsum("eid,nd->nei", wg, x)) * torch.einsum("eid,nd->nei", wu, x)  # (N, E, I)
        y = torch.einsum("edi,nei->ned", wd, h)  # (N, E, D)
        return (y.gather(1, ids[:, :, None].expand(-1, -1, x.shape[1])) * tw[:, :, None]).sum(1)

    go = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g1 = torch.autograd.grad((K.moe_experts_torch(x, wg, wu, wd, tw, ids) * go).sum(), params)
    g2 = torch.autograd.grad((dense(*params) * go).sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_reference_inference_path_has_the_training_bits(dtype):
    """Without autograd the reference gathers once and writes in place: bit for bit the autograd path's result, so
    inference and the (chaotic) training runs see the same numbers. Expert 7 receives no token."""
    x, wg, wu, wd, tw, ids = _moe_inputs(300, 64, 48, 8, 3, dtype=dtype, seed=2)
    ids = ids % 7  # expert 7 idle
    with torch.no_grad():
        fast = K.moe_experts_torch(x, wg, wu, wd, tw, ids)
    traced = K.moe_experts_torch(x.clone().requires_grad_(), wg, wu, wd, tw, ids)
    assert traced.requires_grad and fast.dtype == traced.dtype == dtype
    assert torch.equal(fast, traced.detach())


def test_mlp_inference_path_has_the_training_bits():
    from dsv3.layers.moe import MLP

    torch.manual_seed(0)
    mlp, x = MLP(64, 96), torch.randn(3, 10, 64)
    with torch.no_grad():
        fast = mlp(x)
    assert torch.equal(fast, mlp(x).detach())


def test_expert_counts():
    ids = torch.tensor([[0, 3], [3, 1], [3, 0]])
    assert K.expert_counts(ids, 5).tolist() == [2, 1, 0, 3, 0]


# ------------------------------------------------------------------------------------------- MLA decode


def _mla_oracle(q_latent, q_rope, ckv, kr, seq_lens, scale):
    """Absorbed MLA is multi-query attention with k = [c^KV, k^R] and v = c^KV: ask SDPA."""
    B, Tq, H, r = q_latent.shape
    S = ckv.shape[1]
    q = torch.cat([q_latent, q_rope], -1).transpose(1, 2).double()  # (B, H, Tq, r + dr)
    k = torch.cat([ckv, kr], -1)[:, None].expand(B, H, S, -1).double()  # (B, H, S, r + dr)
    v = ckv[:, None].expand(B, H, S, r).double()
    limit = seq_lens[:, None] - Tq + torch.arange(Tq)[None, :] + 1  # (B, Tq)
    mask = torch.arange(S)[None, None, :] < limit[:, :, None]  # (B, Tq, S)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)
    return o.transpose(1, 2).to(q_latent.dtype)  # (B, Tq, H, r)


@pytest.mark.parametrize("Tq", [1, 2])
def test_mla_decode_reference_matches_sdpa_and_paging(Tq):
    torch.manual_seed(0)
    B, H, r, dr, S, page = 3, 4, 32, 8, 100, 16
    seq_lens = torch.tensor([100, 7, 45], dtype=torch.int32)
    q, qr = torch.randn(B, Tq, H, r), torch.randn(B, Tq, H, dr)
    ckv, kr = torch.randn(B, S, r), torch.randn(B, S, dr)
    out = K.mla_decode_torch(q, qr, ckv, kr, seq_lens, 0.2)
    torch.testing.assert_close(out, _mla_oracle(q, qr, ckv, kr, seq_lens.long(), 0.2), rtol=1e-5, atol=1e-5)
    # the same cache scattered into a shuffled page pool
    nb = -(-S // page)
    table = torch.randperm(B * nb + 2)[: B * nb].view(B, nb).int()
    pool_c, pool_k = torch.randn(B * nb + 2, page, r), torch.randn(B * nb + 2, page, dr)
    padded_c = F.pad(ckv, (0, 0, 0, nb * page - S)).view(B, nb, page, r)
    padded_k = F.pad(kr, (0, 0, 0, nb * page - S)).view(B, nb, page, dr)
    pool_c[table.long()] = padded_c
    pool_k[table.long()] = padded_k
    torch.testing.assert_close(K.mla_decode_torch(q, qr, pool_c, pool_k, seq_lens, 0.2, block_table=table), out)


@pytest.mark.parametrize("Tq", [1, 3])
def test_mla_decode_reference_start_offsets_equal_unpadded_rows(Tq):
    """Left padding as per-row start offsets: row b's real positions [starts[b], seq_len) give what the same row
    gives unpadded (its real positions shifted to 0), whatever the padding slots hold."""
    torch.manual_seed(1)
    B, H, r, dr, S = 3, 4, 16, 8, 30
    starts, seq_lens = torch.tensor([0, 9, 20]), torch.tensor([30, 30, 30], dtype=torch.int32)
    q, qr = torch.randn(B, Tq, H, r), torch.randn(B, Tq, H, dr)
    ckv, kr = torch.randn(B, S, r), torch.randn(B, S, dr)
    for b, s0 in enumerate(starts.tolist()):
        ckv[b, :s0], kr[b, :s0] = 1e3, -1e3  # garbage that would dominate any softmax it entered
    out = K.mla_decode_torch(q, qr, ckv, kr, seq_lens, 0.2, starts=starts)
    for b, s0 in enumerate(starts.tolist()):
        alone = K.mla_decode_torch(
            q[b : b + 1], qr[b : b + 1], ckv[b : b + 1, s0:], kr[b : b + 1, s0:], seq_lens[b : b + 1] - s0, 0.2
        )
        torch.testing.assert_close(out[b : b + 1], alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            alone,
            _mla_oracle(
                q[b : b + 1],
                qr[b : b + 1],
                ckv[b : b + 1, s0:],
                kr[b : b + 1, s0:],
                seq_lens[b : b + 1].long() - s0,
                0.2,
            ),
            rtol=1e-5,
            atol=1e-5,
        )


def test_mla_decode_reference_reads_only_the_filled_positions():
    """One sequence, one query (the unmasked path): positions past seq_len may hold anything, even NaN."""
    torch.manual_seed(0)
    H, r, dr, S, n = 4, 32, 8, 64, 37
    q, qr = torch.randn(1, 1, H, r), torch.randn(1, 1, H, dr)
    ckv, kr = torch.randn(1, S, r), torch.randn(1, S, dr)
    seq_lens = torch.tensor([n], dtype=torch.int32)
    expect = _mla_oracle(q, qr, ckv, kr, seq_lens.long(), 0.2)
    ckv[:, n:], kr[:, n:] = float("nan"), float("nan")
    torch.testing.assert_close(K.mla_decode_torch(q, qr, ckv, kr, seq_lens, 0.2), expect, rtol=1e-5, atol=1e-5)


def test_attention_prefill_reference_is_causal_sdpa():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 4)
    out = K.attention_prefill_torch(q, k, v, 0.3)
    s = (q @ k.transpose(-1, -2)) * 0.3
    s = s.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(out, s.softmax(-1) @ v)


# ------------------------------------------------------------------------------------------- FP8


def test_weight_dequant_hand_made_blocks_with_partial_edges():
    """A 5x6 weight in 4x4 blocks: block (i, j) has scale 10*i + j + 1 and every fp8 value is 1.5."""
    w = torch.full((5, 6), 1.5).to(fp8.FP8_DTYPE)
    scale = torch.tensor([[1.0, 2.0], [11.0, 12.0]])
    out = fp8.weight_dequant_torch(w, scale, block=4, dtype=torch.float32)
    expect = torch.tensor([[1.5] * 4 + [3.0] * 2] * 4 + [[16.5] * 4 + [18.0] * 2])
    assert torch.equal(out, expect)
    assert fp8.weight_dequant(w, scale, block=4).dtype == torch.get_default_dtype()
    with pytest.raises(ValueError, match="weight_scale_inv"):
        fp8.weight_dequant(w, torch.ones(1, 2), block=4)


def test_weight_quant_roundtrip_and_zero_blocks():
    torch.manual_seed(0)
    w = torch.randn(300, 200) * 0.02
    w[128:256, :128] = 0.0  # an all-zero block gets scale 1
    q, s = fp8.weight_quant(w)
    assert q.dtype == fp8.FP8_DTYPE and s.shape == (3, 2) and s[1, 0] == 1.0
    back = fp8.weight_dequant(q, s, dtype=torch.float32)
    assert ((back - w).abs() <= 2**-4 * w.abs() + 1e-12).all()  # e4m3 keeps 3 mantissa bits
    # the largest element of each block maps exactly to +-448
    assert torch.equal(q.float().abs().amax(), torch.tensor(448.0))


def test_act_quant_reference_tiles_match_torch_cast():
    torch.manual_seed(0)
    x = torch.randn(3, 300) * torch.logspace(-3, 2, 300)
    q, s = fp8.act_quant_torch(x)
    assert q.shape == x.shape and s.shape == (3, 3)
    for t in range(3):
        tile = x[:, t * 128 : (t + 1) * 128]
        scale = tile.abs().amax(1) / 448.0
        torch.testing.assert_close(s[:, t], scale, rtol=0, atol=0)
        assert torch.equal(q[:, t * 128 : (t + 1) * 128].float(), (tile / scale[:, None]).to(fp8.FP8_DTYPE).float())


def test_fp8_gemm_reference_matches_dequantized_matmul():
    torch.manual_seed(0)
    x, w = torch.randn(5, 200), torch.randn(130, 200) * 0.05
    a, sa = fp8.act_quant_torch(x)
    wq, sw = fp8.weight_quant(w)
    y = fp8.fp8_gemm_torch(a, sa, wq, sw, out_dtype=torch.float32)
    torch.testing.assert_close(y, fp8.act_dequant_torch(a, sa) @ fp8.weight_dequant(wq, sw, dtype=torch.float32).T)
    assert rel_err(fp8.fp8_linear(x, wq, sw), x @ w.T) < 0.05  # FP8 error stays small


# ------------------------------------------------------------------------------------------- linear + CE


@pytest.mark.parametrize("chunk", [None, 7, 64])
def test_linear_cross_entropy_reference_matches_f_cross_entropy(chunk):
    torch.manual_seed(0)
    h = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (10,))
    labels[3] = -100
    loss = K.linear_cross_entropy_torch(h, w, labels, chunk_size=chunk)
    ref = F.cross_entropy(h @ w.T, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref)
    g1 = torch.autograd.grad(loss, (h, w))
    g2 = torch.autograd.grad(ref, (h, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_linear_cross_entropy_validates_labels():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        K.linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 5]))
