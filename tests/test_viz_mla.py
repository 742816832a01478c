"""Chapter 2's figures and helpers (dsv3.viz.mla) against dsv3's own computations and the papers' numbers."""

from __future__ import annotations

import math

import pytest
import torch

from dsv3 import DeepSeekV3, ModelConfig, kv_cache_bytes
from dsv3.layers.rope import RotaryEmbedding, yarn_inv_freq
from dsv3.viz import mla as vm
from helpers import random_model, small_config

V3, TINY = ModelConfig.deepseek_v3(), ModelConfig.tiny()


# --- what each attention kind caches ---------------------------------------------------------------------------


def test_variants_and_elements_per_layer():
    assert [v[0] for v in vm.attention_variants(V3)] == ["MHA", "GQA-8", "MQA", "MLA"]
    assert [v[0] for v in vm.attention_variants(TINY)] == ["MHA", "GQA-2", "MQA", "MLA"]
    assert vm.cache_elements_per_layer(V3, "mla") == 512 + 64
    assert vm.cache_elements_per_layer(V3, "mha") == 128 * (192 + 128)
    assert vm.cache_elements_per_layer(V3, "gqa", 8) == 8 * (192 + 128)
    assert vm.cache_elements_per_layer(TINY, "mla") == 64 + 16


def test_cache_table_rows_equal_kv_cache_bytes():
    table = vm.cache_table({"V3": V3, "tiny": TINY})
    lines = table.splitlines()
    assert len(lines) == 2 + 4
    mla_row = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert mla_row[0] == "MLA" and mla_row[2:5] == ["576", "70,272", "1.00"]
    mha_row = [c.strip() for c in lines[2].strip("|").split("|")]
    assert mha_row[3] == f"{kv_cache_bytes(V3, 1, attention='mha'):,}"
    assert mha_row[6] == f"{kv_cache_bytes(TINY, 1, attention='mha'):,}"


def test_paper_table_1_of_the_insights_paper_is_reproduced():
    rows = vm.paper_kv_comparison()
    assert [r[0] for r in rows] == list(vm.PAPER_KV_PER_TOKEN_KB)
    for _, kb, ours in rows:
        assert ours == round(kb * 1000)  # the paper's KB are 1000 bytes: 70.272 KB = 70,272 bytes


def test_gqa_model_config_has_the_requested_attention_shape():
    cfg = vm.gqa_model_config(80, 64, 128)
    assert cfg.qk_head_dim == cfg.v_head_dim == 128 and cfg.num_hidden_layers == 80
    assert kv_cache_bytes(cfg, 1, attention="gqa", groups=8) == 80 * 8 * 2 * 128 * 2


def test_human_bytes():
    assert vm.human_bytes(480) == "480 B"
    assert vm.human_bytes(1536) == "1.5 KiB"
    assert vm.human_bytes(9_210_691_584) == "8.58 GiB"


def test_cache_per_token_figure_bars_are_kv_cache_bytes():
    fig = vm.cache_per_token_figure({"V3": V3, "tiny": TINY})
    for trace, cfg in zip(fig.data, (V3, TINY)):
        expected = [kv_cache_bytes(cfg, 1, attention=k, groups=g) for _, k, g in vm.attention_variants(cfg)]
        assert list(trace.y) == expected


# --- the calculator --------------------------------------------------------------------------------------------


def _trace_key(trace):
    """(label, dtype) from the hover text "GQA-8 (bf16)<br>..."."""
    label, rest = trace.hovertemplate.split(" (", 1)
    return label, rest.split(")")[0]


def test_calculator_frames_hold_kv_cache_bytes_for_every_batch_dtype_and_kind():
    batches = (1, 4, 32)
    fig = vm.kv_cache_calculator(batches=batches)
    configs = {"DeepSeek-V3": V3, "tiny": TINY}
    data = [t for t in fig.data if t.name != "one H800 (80 GB)"]
    assert {t.name for t in data} == {"MHA", "GQA", "MQA", "MLA"}
    assert len(data) == 2 * 3 * 4
    assert [f.name for f in fig.frames] == [f"batch {b}" for b in batches]
    steps = fig.layout.sliders[0].steps
    assert [s.args[0][0] for s in steps] == [f.name for f in fig.frames]
    for frame, batch in zip(fig.frames, batches):
        assert list(frame.traces) == list(range(len(data)))
        for trace, update in zip(data, frame.data):
            name = trace.hovertemplate.split("<extra>")[1].split("</extra>")[0]
            label, dtype = _trace_key(trace)
            kind, groups = {v[0]: v[1:] for v in vm.attention_variants(configs[name])}[label]
            expected = [
                kv_cache_bytes(configs[name], s, batch=batch, dtype=vm.DTYPES[dtype], attention=kind, groups=groups)
                for s in trace.x
            ]
            assert list(update.y) == expected
            if batch == 1:
                assert list(trace.y) == expected  # the figure opens on the active frame
    assert max(data[0].x) == V3.max_position_embeddings


def test_calculator_dropdown_shows_one_dtype_at_a_time_and_keeps_the_h800_line():
    fig = vm.kv_cache_calculator(batches=(1,))
    menu = fig.layout.updatemenus[0]
    assert [b.label for b in menu.buttons] == ["dtype: bf16", "dtype: fp8", "dtype: fp32"]
    for button, dtype in zip(menu.buttons, ("bf16", "fp8", "fp32")):
        visible = button.args[0]["visible"]
        assert len(visible) == len(fig.data) and visible[-1] is True
        for trace, v in zip(fig.data[:-1], visible[:-1]):
            assert v == (_trace_key(trace)[1] == dtype)
    assert [bool(t.visible) for t in fig.data[:-1]] == menu.buttons[0].args[0]["visible"][:-1]
    assert list(fig.data[-1].y) == [vm.H800_BYTES] * 2


def test_kv_cache_report_numbers_and_errors():
    text = vm.kv_cache_report(131072, 2, "fp8", "gqa", 8)
    assert f"{kv_cache_bytes(V3, 131072, batch=2, dtype=torch.float8_e4m3fn, attention='gqa', groups=8):,}" in text
    assert "n/a (8 groups do not divide 4 heads)" in text
    marked = [line for line in text.splitlines() if line.endswith("<-")]
    assert len(marked) == 2 and all("GQA-8" in line for line in marked)  # the chosen kind, once per model
    assert "tiny (3 layers, 4 heads, beyond its context of 1,024 tokens)" in text
    assert "beyond" not in vm.kv_cache_report(1024)
    with pytest.raises(ValueError, match="attention"):
        vm.kv_cache_report(attention="sparse")
    with pytest.raises(ValueError, match="dtype"):
        vm.kv_cache_report(dtype="int4")


def test_kv_cache_widget_recomputes_on_every_change():
    box = vm.kv_cache_widget(seq_len=4096, batch=2)
    (seq_len, batch), (dtype, attention, groups) = (b.children for b in box.children[:2])
    out = box.children[2]
    assert out.value == "<pre>" + vm.kv_cache_report(4096, 2, "bf16", "mla", 8).replace("<", "&lt;") + "</pre>"
    batch.value, dtype.value, attention.value = 16, "fp32", "mha"
    assert f"{kv_cache_bytes(V3, 4096, batch=16, dtype=torch.float32, attention='mha'):,}" in out.value
    assert out.value == "<pre>" + vm.kv_cache_report(4096, 16, "fp32", "mha", 8).replace("<", "&lt;") + "</pre>"


# --- RoPE and YaRN -----------------------------------------------------------------------------------------------


def test_rope_matrix_is_dsv3_rope_and_relative():
    inv, af = yarn_inv_freq(16, 10000.0, TINY.rope_scaling)
    x = torch.randn(1, 1, 3, 16, dtype=torch.float64)
    for t in (0, 5, 300):
        R = vm.rope_matrix(inv, t, af)
        angles = t * inv.double()
        cos, sin = (angles.cos() * af).view(1, 1, 8), (angles.sin() * af).view(1, 1, 8)
        # RoPE rotates in fp32 and rounds once to x.dtype (dsv3.layers.reference.apply_rope_torch): fp32 tolerances
        torch.testing.assert_close(x @ R.T, RotaryEmbedding.apply(x, cos, sin), rtol=1e-5, atol=1e-6)
    R = lambda t: vm.rope_matrix(inv, t)  # noqa: E731
    torch.testing.assert_close(R(7).T @ R(7), torch.eye(16, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(R(3).T @ R(10), R(7), atol=1e-6, rtol=0)
    assert not torch.allclose(R(3), R(10), atol=1e-3)
    many = vm.rope_matrix(inv, [0, 5, 300], af)
    assert many.shape == (3, 16, 16)
    for m, t in zip(many, (0, 5, 300)):
        torch.testing.assert_close(m, vm.rope_matrix(inv, t, af))


def test_yarn_regimes_follow_the_turn_counts_of_the_original_context():
    w = vm.yarn_wavelengths(V3)
    rs = V3.rope_scaling
    assert w["factor"] == 40 and w["original_context"] == 4096 and len(w["pair"]) == 32
    for trained, yarn, regime in zip(w["trained"], w["yarn"], w["regime"]):
        turns = rs["original_max_position_embeddings"] / trained  # full turns within the original context
        if regime == "extrapolated":
            assert turns >= rs["beta_fast"] and yarn == pytest.approx(trained, rel=1e-6)
        elif regime == "interpolated":
            assert turns <= rs["beta_slow"] and yarn == pytest.approx(trained * 40, rel=1e-5)
        else:
            assert rs["beta_slow"] < turns < rs["beta_fast"] and trained < yarn < trained * 40
    assert w["regime"].count("extrapolated") == 11 and w["regime"].count("interpolated") == 9
    same = vm.yarn_wavelengths(V3, factor=1)
    assert same["yarn"] == pytest.approx(same["trained"]) and same["regime"] == w["regime"]
    with pytest.raises(ValueError, match="rope_scaling"):
        vm.yarn_wavelengths(V3.replace(rope_scaling=None))


def test_yarn_figure_frames_are_the_wavelengths_per_factor():
    fig = vm.yarn_figure(V3, factors=(1, 4, 40))
    assert [f.name for f in fig.frames] == ["s=1", "s=4", "s=40"]
    assert fig.layout.sliders[0].active == 2
    for frame, s in zip(fig.frames, (1, 4, 40)):
        w = vm.yarn_wavelengths(V3, s)
        assert list(frame.traces) == [1, 3]
        assert list(frame.data[0].y) == pytest.approx(w["yarn"], rel=1e-5)
        assert list(frame.data[1].y) == [4096 * s] * 2
    assert list(fig.data[1].y) == list(fig.frames[2].data[0].y)
    bands = sorted((s.x0, s.x1) for s in fig.layout.shapes)
    assert bands == [(-0.5, 10.5), (10.5, 22.5), (22.5, 31.5)]


# --- a real forward pass ---------------------------------------------------------------------------------------


@torch.no_grad()
def test_capture_mla_tensors_satisfy_eq_1_to_9():
    cfg = small_config()
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    cap = vm.capture_mla(model, ids, layer=1)
    attn = model.layers[1].self_attn
    H, d = cfg.num_attention_heads, cfg.qk_nope_head_dim
    assert cap.c_kv.shape == (2, 9, cfg.kv_lora_rank) and cap.k_rope.shape == (2, 9, cfg.qk_rope_head_dim)
    torch.testing.assert_close(cap.keys[..., :d], torch.einsum("hdr,btr->bthd", attn.w_uk(), cap.c_kv))
    torch.testing.assert_close(cap.values, torch.einsum("hdr,btr->bthd", attn.w_uv(), cap.c_kv))
    torch.testing.assert_close(cap.keys[..., d:], cap.k_rope[:, :, None].expand(2, 9, H, cfg.qk_rope_head_dim))
    w_uq = attn.q_b_proj.weight.view(H, cfg.qk_head_dim, cfg.q_lora_rank)[:, :d]
    torch.testing.assert_close(cap.q_nope, torch.einsum("hdq,btq->bthd", w_uq, cap.c_q))
    # the absorbed score equals the naive one
    naive = torch.einsum("bthd,bshd->bhts", torch.cat([cap.q_nope, cap.q_rope], -1), cap.keys)
    absorbed = torch.einsum(
        "btq,hqr,bsr->bhts", cap.c_q, torch.einsum("hdq,hdr->hqr", w_uq, attn.w_uk()), cap.c_kv
    ) + torch.einsum("bthd,bsd->bhts", cap.q_rope, cap.k_rope)
    torch.testing.assert_close(absorbed, naive, atol=1e-5, rtol=1e-4)
    assert not any(m._forward_hooks for m in attn.modules())  # hooks removed


def test_capture_mla_needs_query_compression():
    model = DeepSeekV3(small_config(q_lora_rank=None))
    with pytest.raises(ValueError, match="q_lora_rank"):
        vm.capture_mla(model, torch.zeros(1, 3, dtype=torch.long))


def test_decode_cost_for_v3():
    cost = vm.decode_cost(V3)
    assert cost["naive"] == {"read": 40960, "macs": 40960}
    assert cost["absorbed"] == {"read": 576, "macs": 128 * (512 + 64) + 128 * 512}


@torch.no_grad()
def test_time_decode_runs_both_caches_and_reports_their_bytes():
    cfg = small_config()
    model = random_model(cfg)
    threads = torch.get_num_threads()
    rows = vm.time_decode(model, [5, 12], steps=2, repeats=1)
    assert torch.get_num_threads() == threads  # restored
    assert [(r["context"], r["kind"]) for r in rows] == [(5, "latent"), (5, "naive"), (12, "latent"), (12, "naive")]
    for r in rows:
        attention = "mla" if r["kind"] == "latent" else "mha"
        assert r["max_len"] == r["context"] + 2 and r["ms"] > 0
        assert r["cache_bytes"] == kv_cache_bytes(cfg, r["max_len"], dtype=torch.float32, attention=attention)
    assert math.isfinite(sum(r["ms"] for r in rows))
