"""Chapter 8's tables and figures (dsv3.viz.checkpoints) against checkpoints written by save_pretrained, the
safetensors library, and the public header listing of the released DeepSeek-V3 checkpoint."""

import json

import pytest
import torch
from safetensors import safe_open

from dsv3 import ModelConfig, count_parameters, kv_cache_bytes, load_pretrained, save_pretrained
from dsv3.kernels.fp8 import weight_quant
from dsv3.viz import checkpoints as ck
from helpers import random_model, small_config


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8")
    save_pretrained(random_model(small_config()), path, fp8=True, max_shard_bytes=60_000)
    return path


def test_release_tensors_equal_a_written_fp8_checkpoint(fp8_dir):
    cfg = ModelConfig.from_hf(fp8_dir)
    written = ck.checkpoint_tensors(fp8_dir)
    assert len({f for _, f in written.values()}) > 2  # really sharded
    expected = {t.name: t for t in ck.release_tensors(cfg, high="F32")}
    assert {name: t for name, (t, _) in written.items()} == expected
    roles = ck.summarize(list(expected.values()))["by_role"]
    assert roles["fp8 weight"]["tensors"] == roles["block scales"]["tensors"] > 0
    assert roles["MTP copy"]["tensors"] == 2 and roles["correction bias"]["tensors"] == cfg.num_moe_layers + 1


def test_release_tensors_without_fp8(tmp_path):
    cfg = small_config()
    save_pretrained(random_model(cfg), tmp_path)
    written = {name: t for name, (t, _) in ck.checkpoint_tensors(tmp_path).items()}
    assert written == {t.name: t for t in ck.release_tensors(cfg, fp8=False, high="F32")}


@pytest.mark.slow
def test_v3_inventory_matches_the_release_and_count_parameters():
    v3 = ModelConfig.deepseek_v3()
    tensors = ck.release_tensors(v3)
    s = ck.summarize(tensors)
    # the released headers (deepseek-ai/DeepSeek-V3, as listed by github.com/simpx/model-inspect):
    # 91,991 tensors, 688,574,839,360 bytes
    assert s["tensors"] == 91_991 and s["bytes"] == 688_574_839_360
    counts = count_parameters(v3)
    copies = 2 * v3.vocab_size * v3.hidden_size  # the MTP layer's copies of embedding and head
    scales = s["by_role"]["block scales"]["numel"]
    biases = s["by_role"]["correction bias"]["numel"]  # buffers, not parameters
    assert biases == (58 + 1) * 256
    assert s["numel"] - scales - biases == counts["total_with_mtp"] + copies
    high = {t.name for t in tensors if t.dtype == "BF16"}
    assert {
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.3.mlp.gate.weight",
        "model.layers.61.eh_proj.weight",
        "model.norm.weight",
    } <= high
    by_name = {t.name: t for t in tensors}
    assert by_name["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 56)
    assert by_name["model.layers.3.mlp.gate.e_score_correction_bias"].dtype == "F32"
    assert by_name["model.layers.60.mlp.experts.255.down_proj.weight"].dtype == "F8_E4M3"


def test_read_header_agrees_with_safetensors(fp8_dir):
    file = sorted(fp8_dir.glob("model-*.safetensors"))[0]
    header = ck.read_header(file)
    with safe_open(file, "pt") as f:
        assert sorted(f.keys()) == sorted(header)
        for k in f.keys():
            sl = f.get_slice(k)
            assert list(sl.get_shape()) == header[k]["shape"] and sl.get_dtype() == header[k]["dtype"]
    assert ck.cut_tensors(file) == []


def test_cut_tensors_names_what_a_truncation_lost(tmp_path):
    save_pretrained(random_model(small_config()), tmp_path)
    file = tmp_path / "model.safetensors"
    header = ck.read_header(file)
    last = max(header, key=lambda k: header[k]["data_offsets"][1])
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size - 10)
    assert ck.cut_tensors(file) == [last]


def test_tensor_table_folds_experts(fp8_dir):
    table = ck.tensor_table(fp8_dir, "model.layers.1.", experts=1)
    assert "`model.layers.1.mlp.experts.0.gate_proj.weight` | (32, 64) | F8_E4M3 | 2,048" in table
    assert "model.layers.1.mlp.experts.7.up_proj.weight_scale_inv" in table
    assert "experts.3." not in table and "... 36 tensors of experts 1..6 (6 experts)" in table
    assert "`model.layers.1.mlp.gate.e_score_correction_bias` | (8,) | F32" in table


def test_block_rounding_error():
    torch.manual_seed(0)
    w = torch.randn(300, 200)
    q, s = weight_quant(w)
    err = ck.block_rounding_error(w, q, s)
    assert err.shape == (3, 2)
    deq = q.float() * s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :200]
    blk = (w[256:, 128:] - deq[256:, 128:]).norm() / w[256:, 128:].norm()
    assert err[2, 1].item() == pytest.approx(blk.item(), rel=1e-5)
    assert float(err.max()) < 2**-4  # e4m3 keeps 3 mantissa bits: relative rounding error below 1/16
    # an outlier block 1e5 x larger: with one scale for the whole tensor the other blocks fall below e4m3's normal
    # range (2^-6 .. 448) and lose their precision; with one scale per block they keep it
    w[:128, :128] *= 1e5
    q1, s1 = weight_quant(w, block=300)
    qb, sb = weight_quant(w)
    assert ck.block_rounding_error(w, q1, s1, block=300).item() > 0
    per_tensor = (w[128:] - q1.float()[128:] * s1[0, 0]).norm() / w[128:].norm()
    per_block = ck.block_rounding_error(w, qb, sb)[1:].max()
    assert per_tensor > 10 * per_block


def test_block_grid_figure_draws_partial_blocks():
    values = torch.rand(3, 2)
    fig = ck.block_grid_figure({"a": (values, (300, 200)), "b": (torch.rand(1, 1), (10, 20))}, "t", "scale")
    assert list(fig.data[0].x) == [0, 128, 200] and list(fig.data[0].y) == [0, 128, 256, 300]
    assert [t.visible for t in fig.data] == [True, False]
    assert len(fig.layout.updatemenus[0].buttons) == 2
    with pytest.raises(ValueError, match="blocks"):
        ck.block_grid_figure({"bad": (values, (100, 100))}, "t", "scale")


def test_loaded_bytes_equal_the_loaded_model(fp8_dir):
    cfg = ModelConfig.from_hf(fp8_dir)
    model = load_pretrained(fp8_dir, dtype=torch.bfloat16)
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert ck.loaded_bytes(cfg) == held


@pytest.mark.slow
def test_memory_figure_and_table():
    v3 = ModelConfig.deepseek_v3()
    fig = ck.memory_figure(v3, gpu_counts=(8, 16), sequences=(1, 4))
    steps = fig.layout.sliders[0].steps
    kv4 = kv_cache_bytes(v3, 131072, batch=4)
    assert steps[1].args[0]["y"][0] == pytest.approx([kv4 / 8 / 1e9, kv4 / 16 / 1e9])
    assert fig.data[0].y[0] * 8e9 == pytest.approx(688_574_839_360)
    per = ck.memory_per_gpu(v3, gpus=8, sequences=4)
    assert per["kv"] * 8 == kv4 and per["fp8"] * 8 == 688_574_839_360
    table = ck.memory_table(v3)
    assert "**91,991**" in table and "**688.6 GB**" in table
    assert json.dumps(ck.st_dtype(torch.float8_e4m3fn)) == '"F8_E4M3"'
