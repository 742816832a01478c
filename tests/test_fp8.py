"""FP8 training and inference (paper Sec. 3.3): the FP8 linear against a quantise-dequantise reference written here
with torch's own e4m3 cast (exact) and against fp32 (within what the scaling predicts); the recipe applied to a
model; the low-precision AdamW; FP8 training runs; released FP8 weights kept in FP8."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import dsv3.kernels as K
from dsv3 import DeepSeekV3, ModelConfig, load_pretrained, save_pretrained
from dsv3.fp8 import AdamW, FP8Experts, FP8Linear, apply_fp8, cached_input_bytes, fp8_modules
from dsv3.kernels import fp8
from helpers import random_model, small_config

U = 2.0**-4  # e4m3 keeps 3 mantissa bits: a rounding moves a normal value by at most 1/16 of itself


def qdq(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """t (M, K) after e4m3 with one scale per rows x cols tile, tile by tile: scale = amax / 448."""
    out = torch.empty_like(t, dtype=torch.float32)
    for i in range(0, t.shape[0], rows):
        for j in range(0, t.shape[1], cols):
            tile = t[i : i + rows, j : j + cols].float()
            amax = tile.abs().max()
            scale = amax / 448.0 if amax > 0 else torch.tensor(1.0)
            out[i : i + rows, j : j + cols] = (tile / scale).to(torch.float8_e4m3fn).float() * scale
    return out


def operands(M=37, K_=300, N=200, seed=0):
    """Partial tiles everywhere (300 = 2 x 128 + 44 in-features, 200 out-features, 37 tokens), a few outlier
    channels, an all-zero tile."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K_, generator=g)
    x[:, 5] *= 50.0
    x[:3, :128] = 0.0
    w = torch.randn(N, K_, generator=g) * 0.05
    dy = torch.randn(M, N, generator=g)
    return x, w, dy


def fp8_grads(x, w, dy, bias=None):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    b = bias.clone().requires_grad_() if bias is not None else None
    y = K.fp8_training_linear(x, w, b)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, (b.grad if b is not None else None)


def test_fp8_linear_is_the_quantise_dequantise_reference_exactly():
    x, w, dy = operands()
    with K.use_backend("torch"):
        y, dx, dw, _ = fp8_grads(x, w, dy)
    xq, wq = qdq(x, 1, 128), qdq(w, 128, 128)
    assert torch.equal(y, xq @ wq.t())  # Fprop: X per 1 x 128 along K, W per 128 x 128
    torch.testing.assert_close(dx, qdq(dy, 1, 128) @ wq, rtol=1e-6, atol=1e-6)  # Dgrad: dY per 1 x 128 along N
    # Wgrad: dY^T and the cached FP8 X, both re-tiled 1 x 128 along the tokens (the paper's 128 x 1 tiles)
    expect_dw = qdq(dy.t().contiguous(), 1, 128) @ qdq(xq.t().contiguous(), 1, 128).t()
    torch.testing.assert_close(dw, expect_dw, rtol=1e-6, atol=1e-6)


def test_fp8_linear_error_against_fp32_is_what_the_scaling_predicts():
    """Each operand of each GEMM is rounded once (X^T of Wgrad twice), so ||C_fp8 - C|| <= (2u + u^2) ||A|| ||B||
    per GEMM (3u + 3u^2 + u^3 for Wgrad), u = 2^-4, Frobenius norms, ignoring subnormals (none here); in practice
    rounding errors are random and the error relative to ||C|| is a few percent. And it is not a no-op."""
    x, w, dy = operands()
    x[:3, :128] = torch.randn(3, 128)  # no zero tile: relative errors need nonzero entries
    bias = torch.randn(w.shape[0])
    y, dx, dw, db = fp8_grads(x, w, dy, bias)
    x32, w32 = x.clone().requires_grad_(), w.clone().requires_grad_()
    y32 = x32 @ w32.t() + bias
    y32.backward(dy)
    n = torch.linalg.norm
    assert n(y - y32) <= (2 * U + U * U) * n(x) * n(w)
    assert n(dx - x32.grad) <= (2 * U + U * U) * n(dy) * n(w)
    assert n(dw - w32.grad) <= (3 * U + 3 * U * U + U**3) * n(dy) * n(x)
    torch.testing.assert_close(db, dy.sum(0))  # the bias gradient stays in high precision
    for got, exact in ((y, y32), (dx, x32.grad), (dw, w32.grad)):
        rel = (n(got - exact) / n(exact)).item()
        assert 1e-3 < rel < 0.1, rel


def test_fp8_linear_caches_its_input_in_fp8():
    x, w, _ = operands(M=256, K_=256)
    y = K.fp8_training_linear(x, w.requires_grad_())
    saved = y.grad_fn.saved_tensors
    assert saved[0].dtype == torch.float8_e4m3fn and saved[0].shape == x.shape  # the input, 1 byte per element
    assert saved[1].shape == (256, 2)  # one fp32 scale per 1 x 128 tile
    assert sum(t.numel() * t.element_size() for t in saved[:2]) == cached_input_bytes(256, 256)
    # against bf16 activations: 1 + 4/128 bytes instead of 2 per element
    assert cached_input_bytes(4096, 7168) / cached_input_bytes(4096, 7168, fp8=False) == pytest.approx(0.515625)


def test_fp8_linear_triton_matches_emulation():
    pytest.importorskip("triton")
    x, w, dy = operands(M=20, K_=200, N=150)
    with K.use_backend("torch"):
        ref = fp8_grads(x, w, dy)
    with K.use_backend("triton"):
        got = fp8_grads(x, w, dy)
    for a, b in zip(got[:3], ref[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_fp8_gemm_tiles_triton_matches_reference():
    pytest.importorskip("triton")
    torch.manual_seed(0)
    a, sa = fp8.act_quant_torch(torch.randn(24, 200))
    b, sb = fp8.act_quant_torch(torch.randn(40, 200) * torch.logspace(-2, 2, 40)[:, None])  # row scales apart
    ref = fp8.fp8_gemm_tiles_torch(a, sa, b, sb)
    for native in (False, True):
        got = fp8.fp8_gemm_tiles_triton(a, sa, b, sb, native=native)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    with pytest.raises(ValueError, match="scales"):
        fp8.fp8_gemm_tiles_triton(a, sa, b, sb[:, :1])


def test_quantize_dequantize_tiles():
    x, w, _ = operands()
    assert torch.equal(fp8.quantize_dequantize(x, (1, 128)), qdq(x, 1, 128))
    assert torch.equal(fp8.quantize_dequantize(w, (128, 128)), qdq(w, 128, 128))
    assert torch.equal(fp8.quantize_dequantize(w, None), qdq(w, *w.shape))
    with pytest.raises(ValueError, match="2-D"):
        fp8.quantize_dequantize(torch.ones(3))


# ------------------------------------------------------------------------------------------- the recipe


def test_apply_fp8_swaps_linears_and_experts_and_keeps_the_rest():
    model = random_model(small_config(hidden_size=128, num_hidden_layers=2, num_nextn_predict_layers=1))
    before = dict(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    ids = torch.randint(0, 320, (2, 24))
    ref = model(ids, labels=ids).loss
    apply_fp8(model)
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())  # shared, not copied
    assert model.state_dict().keys() == before.keys()
    swapped = fp8_modules(model)
    assert all(isinstance(m, (FP8Linear, FP8Experts)) for m in swapped.values())
    assert "layers.1.mlp.experts" in swapped and "layers.0.self_attn.o_proj" in swapped
    assert "mtp.0.self_attn.kv_b_proj" in swapped and "layers.1.mlp.shared_experts.down_proj" in swapped
    # the high-precision parts: embedding, head, MoE gating, norms, the MTP projection
    assert type(model.lm_head) is torch.nn.Linear and type(model.mtp[0].eh_proj) is torch.nn.Linear
    assert not any(n.endswith(("gate", "lm_head", "eh_proj", "norm", "layernorm")) for n in swapped)
    loss = model(ids, labels=ids).loss
    assert loss != ref and abs(loss - ref) < 0.01 * ref  # FP8 changes the numbers, a little
    loss.backward()
    assert model.layers[1].mlp.experts.up_proj.grad is not None and model.lm_head.weight.grad is not None
    assert apply_fp8(model) is model and fp8_modules(model) == swapped  # idempotent


def test_fp8_experts_match_per_expert_fp8_linears():
    torch.manual_seed(0)
    E, D, I, N, topk = 4, 130, 70, 11, 2
    from dsv3.layers.moe import Experts

    base = Experts(E, D, I)
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ex = FP8Experts.from_experts(base)
    x = torch.randn(N, D)
    ids = torch.stack([torch.randperm(E)[:topk] for _ in range(N)])
    weights = torch.rand(N, topk)
    out = ex(x, weights, ids)
    expect = torch.zeros(N, D)
    for n in range(N):
        for k in range(topk):
            e = ids[n, k].item()
            h = torch.nn.functional.silu(
                K.fp8_training_linear(x[n : n + 1], base.gate_proj[e])
            ) * K.fp8_training_linear(x[n : n + 1], base.up_proj[e])
            expect[n] += weights[n, k] * K.fp8_training_linear(h, base.down_proj[e])[0]
    # per-token vs per-expert tiles: the 1 x 128 tiles are per row, so each row quantizes the same way
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)


def test_adamw_moments_in_bf16():
    torch.manual_seed(0)
    w0 = torch.randn(64, 32)
    grads = [torch.randn(64, 32) for _ in range(5)]

    def run(opt_cls, **kw):
        p = torch.nn.Parameter(w0.clone())
        opt = opt_cls([p], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kw)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach(), opt.state[p]

    ref, _ = run(torch.optim.AdamW)
    fp32, st32 = run(AdamW, moment_dtype=torch.float32)
    torch.testing.assert_close(fp32, ref, rtol=0, atol=1e-6)  # the same algorithm as torch's
    bf16, st16 = run(AdamW)
    assert st16["exp_avg"].dtype == torch.bfloat16 and st16["exp_avg_sq"].dtype == torch.bfloat16
    assert st32["exp_avg"].dtype == torch.float32
    diff = (bf16 - ref).abs().max().item()
    assert 0 < diff < 1e-3  # bf16 moments change the update a little (paper: no observable degradation)
    with pytest.raises(ValueError, match="moment_dtype"):
        AdamW([torch.nn.Parameter(w0)], moment_dtype=torch.int8)


# ------------------------------------------------------------------------------------------- released FP8 weights


def test_keep_fp8_runs_released_fp8_weights_in_fp8(tmp_path):
    cfg = small_config(hidden_size=200, q_lora_rank=136)  # partial 128 x 128 blocks in every matrix
    model = random_model(cfg)
    save_pretrained(model, tmp_path, fp8=True)
    deq = load_pretrained(tmp_path, dtype=torch.float32)
    kept = load_pretrained(tmp_path, dtype=torch.float32, keep_fp8=True)
    attn = kept.layers[0].self_attn
    assert attn.q_a_proj.weight.dtype == torch.float8_e4m3fn and attn.q_a_proj.weight_scale_inv.shape == (2, 2)
    assert attn.kv_b_proj.weight.dtype == torch.float32  # absorbed attention reads it per head
    ex = kept.layers[1].mlp.experts
    assert ex.up_proj.dtype == torch.float8_e4m3fn and ex.up_proj_scale_inv.shape == (cfg.n_routed_experts, 1, 2)
    assert kept.lm_head.weight.dtype == torch.float32 and kept.layers[1].mlp.gate.weight.dtype == torch.float32
    assert torch.equal(
        fp8.weight_dequant(attn.q_a_proj.weight, attn.q_a_proj.weight_scale_inv, dtype=torch.float32),
        deq.layers[0].self_attn.q_a_proj.weight,
    )
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    a, b = kept(ids).logits, deq(ids).logits
    rel = ((a - b).norm() / b.norm()).item()
    assert 0 < rel < 0.1  # only the activations' 1 x 128 quantization differs
    # each FP8 linear is act_quant + fp8_gemm on the stored weight
    x = torch.randn(3, 200)
    lin = attn.q_a_proj
    xq, xs = fp8.act_quant_torch(x)
    assert torch.equal(lin(x), fp8.fp8_gemm_torch(xq, xs, lin.weight, lin.weight_scale_inv, out_dtype=x.dtype))
    kept.float()  # casting the e4m3 weights without their scales must not pass silently
    with pytest.raises(RuntimeError, match="weight_scale_inv"):
        kept(ids)


def test_store_fp8_in_memory_matches_a_saved_fp8_checkpoint(tmp_path):
    cfg = small_config(hidden_size=200, q_lora_rank=136)
    model = random_model(cfg)
    save_pretrained(model, tmp_path, fp8=True)
    kept = fp8_modules(load_pretrained(tmp_path, dtype=torch.float32, keep_fp8=True))
    n = 0
    for name, m in fp8_modules(apply_fp8(model)).items():
        m.store_fp8()
        if isinstance(kept[name], FP8Linear):
            assert torch.equal(m.weight.view(torch.uint8), kept[name].weight.view(torch.uint8))
            assert torch.equal(m.weight_scale_inv, kept[name].weight_scale_inv)
            n += 1
        elif isinstance(kept[name], FP8Experts):
            assert torch.equal(m.down_proj.view(torch.uint8), kept[name].down_proj.view(torch.uint8))
            assert torch.equal(m.down_proj_scale_inv, kept[name].down_proj_scale_inv)
            n += 1
    assert n == len(kept) - cfg.num_hidden_layers - cfg.num_nextn_predict_layers  # all but the kv_b_proj


# ------------------------------------------------------------------------------------------- training


def fp8_run_config(**kw) -> ModelConfig:
    """Small enough for 150 CPU steps in seconds, wide enough (hidden 128) for whole 1 x 128 tiles."""
    return ModelConfig.tiny(
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=4,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=2,
        kv_lora_rank=32,
        q_lora_rank=64,
        num_nextn_predict_layers=0,
        **kw,
    )


@pytest.mark.slow
def test_fp8_training_tracks_fp32():
    """Sec. 3.3: FP8 training's loss stays within 0.25% of BF16's at scale; here: within 1% after 150 steps,
    and not a no-op (its losses differ from fp32's)."""
    from dsv3.train import TrainConfig, train

    common = dict(steps=150, batch_size=8, seq_len=32, eval_every=150, eval_batches=4, warmup_steps=10, progress=False)
    torch.set_num_threads(2)
    ref = train(fp8_run_config(), TrainConfig(**common))
    run = train(fp8_run_config(), TrainConfig(fp8=True, **common))
    assert isinstance(run.model.layers[0].self_attn.o_proj, FP8Linear)
    assert [h["loss"] for h in run.history] != [h["loss"] for h in ref.history]
    v32, v8 = ref.last("val_loss"), run.last("val_loss")
    assert v8 < ref.history[0]["loss"] - 1.0  # it learned
    assert abs(v8 - v32) / v32 < 0.01, (v8, v32)


def test_train_config_fp8_and_moments():
    from dsv3.train import TrainConfig, make_optimizer

    model = DeepSeekV3(fp8_run_config())
    assert isinstance(make_optimizer(model, TrainConfig()), torch.optim.AdamW)
    opt = make_optimizer(model, TrainConfig(fp8=True))
    assert isinstance(opt, AdamW) and opt.moment_dtype == torch.bfloat16  # the paper's choice with FP8
    assert make_optimizer(model, TrainConfig(fp8=True, moment_dtype="float32")).__class__ is torch.optim.AdamW
    assert make_optimizer(model, TrainConfig(moment_dtype="bfloat16")).moment_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="moment_dtype"):
        TrainConfig(moment_dtype="fp16")
    with pytest.raises(ValueError, match="fp8"):
        TrainConfig(fp8=1)


def test_cli_train_fp8(tmp_path):
    import json

    from dsv3.cli import main
    from dsv3.rundir import TRAINER_JSON, find_checkpoint

    (tmp_path / "config.json").write_text(json.dumps(fp8_run_config().to_hf()))
    out = str(tmp_path / "run")
    assert (
        main(
            [
                "train",
                "--config",
                str(tmp_path / "config.json"),
                "--fp8",
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--seq-len",
                "16",
                "--eval-every",
                "0",
                "--no-progress",
                "--out",
                out,
            ]
        )
        == 0
    )
    state = json.loads((find_checkpoint(out) / TRAINER_JSON).read_text())
    assert state["train_config"]["fp8"] is True
    assert state["optimizer"]["type"] == "AdamW"  # dsv3.fp8.AdamW, bf16 moments
    # resumed from its checkpoint: FP8 again (the saved settings), moments back in bf16
    assert main(["train", "--out", out, "--resume", "--steps", "2", "--no-progress"]) == 0
    state = json.loads((find_checkpoint(out) / TRAINER_JSON).read_text())
    assert state["step"] == 2 and state["train_config"]["fp8"] is True
