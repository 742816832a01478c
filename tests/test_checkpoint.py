"""Checkpoints in the released layout: round trips, shards, FP8 blocks, and one clear error per bad checkpoint."""

import json

import pytest
import torch
import transformers

from dsv3 import load_pretrained, save_pretrained
from dsv3.checkpoint import CheckpointError
from helpers import random_model, rel_err, small_config

transformers.logging.set_verbosity_error()


def same_weights(a, b, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k].float(), sb[k].float(), atol=atol), k


def test_released_names(tmp_path):
    from safetensors import safe_open

    cfg = small_config()
    save_pretrained(random_model(cfg), tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    L = cfg.num_hidden_layers
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert {
        f"model.layers.{L}.{n}"
        for n in (
            "enorm.weight",
            "hnorm.weight",
            "eh_proj.weight",
            "shared_head.norm.weight",
            "shared_head.head.weight",
            "embed_tokens.weight",
        )
    } <= keys
    assert "lm_head.weight" in keys and "model.norm.weight" in keys


def test_round_trip_single_and_sharded(tmp_path):
    model = random_model(small_config())
    save_pretrained(model, tmp_path / "one")
    save_pretrained(model, tmp_path / "many", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    for d in ("one", "many"):
        loaded = load_pretrained(tmp_path / d)
        same_weights(model, loaded)
        ids = torch.randint(0, 320, (1, 12))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_resharding_removes_stale_shards(tmp_path):
    model = random_model(small_config())
    save_pretrained(model, tmp_path, max_shard_bytes=100_000)
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == ["model.safetensors"]
    load_pretrained(tmp_path)


def test_transformers_loads_sharded_save(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    model = random_model(small_config())
    save_pretrained(model, tmp_path, max_shard_bytes=150_000)
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (1, 20))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, hf(ids).logits, atol=1e-5)


def test_bf16_dtype(tmp_path):
    model = random_model(small_config())
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    loaded = load_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    assert loaded.moe_layers()[0].gate.weight.dtype == torch.float32  # the router stays fp32
    same_weights(model, loaded, atol=2e-2)


def test_fp8_checkpoint_dequantizes_block_wise(tmp_path):
    """FP8 e4m3 weights with one fp32 scale per 128x128 block, partial edge blocks included (V3 layout)."""
    from safetensors import safe_open

    cfg = small_config(hidden_size=200, q_lora_rank=136)  # 200 = 128 + 72: every matrix has partial edge blocks
    model = random_model(cfg)
    save_pretrained(model, tmp_path, fp8=True)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.q_a_proj.weight")  # (136, 200)
        s = f.get_tensor("model.layers.0.self_attn.q_a_proj.weight_scale_inv")
        assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (2, 2)
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32  # embeddings stay high precision
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
    # oracle: expand each block's scale by hand
    scale = s.repeat_interleave(128, 0)[:136].repeat_interleave(128, 1)[:, :200]
    expect = w.float() * scale
    loaded = load_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(loaded.layers[0].self_attn.q_a_proj.weight, expect)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    # FP8 rounding stays small: relative error of a weight under 1/16 (e4m3 has 3 mantissa bits)
    assert rel_err(expect, model.layers[0].self_attn.q_a_proj.weight) < 0.0625


def _rewrite(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor(tmp_path):
    save_pretrained(random_model(small_config()), tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"tensor model.layers.2.mlp.experts.5.up_proj.weight is missing"):
        load_pretrained(tmp_path)


def test_unexpected_tensor(tmp_path):
    save_pretrained(random_model(small_config()), tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor model.layers.0.self_attn.extra"):
        load_pretrained(tmp_path)


def test_misshaped_tensor(tmp_path):
    save_pretrained(random_model(small_config()), tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    message = r"tensor model.norm.weight has shape \(63,\), the config expects \(64,\)"
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(tmp_path)


def test_config_contradicting_weights(tmp_path):
    save_pretrained(random_model(small_config()), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["kv_lora_rank"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    message = r"model.safetensors: tensor model.layers.0.self_attn.kv_a_\w+.weight has shape"
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(tmp_path)
    cfg["kv_lora_rank"], cfg["n_routed_experts"] = 32, 4
    cfg["n_group"], cfg["topk_group"], cfg["num_experts_per_tok"] = 2, 1, 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model.layers.1.mlp"):
        load_pretrained(tmp_path)


def test_truncated_file(tmp_path):
    save_pretrained(random_model(small_config()), tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors"):
        load_pretrained(tmp_path)


def test_index_naming_a_missing_shard(tmp_path):
    save_pretrained(random_model(small_config()), tmp_path, max_shard_bytes=150_000)
    next(iter(sorted(tmp_path.glob("model-*.safetensors")))).unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: lists shard model-00001-of"):
        load_pretrained(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path):
    save_pretrained(random_model(small_config()), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pickle files are never loaded"):
        load_pretrained(tmp_path)
