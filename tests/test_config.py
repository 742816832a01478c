import json

import pytest

from dsv3 import ModelConfig


def test_deepseek_v3_preset_is_the_release():
    c = ModelConfig.deepseek_v3()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size) == (7168, 61, 128, 129280)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group) == (256, 8, 8, 4)
    assert (c.kv_lora_rank, c.q_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim) == (
        512,
        1536,
        64,
        128,
        128,
    )
    assert c.rope_scaling == {
        "type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
    assert c.num_nextn_predict_layers == 1 and c.first_k_dense_replace == 3
    assert c.quantization_config["weight_block_size"] == [128, 128]


def test_tiny_preset_shape():
    c = ModelConfig.tiny()
    assert c.first_k_dense_replace == 1 and c.num_moe_layers >= 2
    assert c.n_routed_experts >= 8 and c.n_group >= 2 and c.num_nextn_predict_layers == 1


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("num_experts_per_tok", 17, "num_experts_per_tok=17 exceeds n_routed_experts=16"),
        ("n_group", 3, "not divisible by n_group=3"),
        ("topk_group", 5, "topk_group=5 exceeds n_group=4"),
        ("hidden_size", 0, "hidden_size must be a positive integer"),
        ("kv_lora_rank", -4, "kv_lora_rank must be a positive integer"),
        ("qk_rope_head_dim", 7, "qk_rope_head_dim must be even"),
        ("q_lora_rank", 0, "q_lora_rank must be a positive integer or None"),
        ("scoring_func", "softmax", "scoring_func must be 'sigmoid'"),
    ],
)
def test_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.tiny(**{field: value})


def test_experts_per_token_must_divide_into_the_kept_groups():
    with pytest.raises(ValueError, match=r"num_experts_per_tok=3 is not divisible by topk_group=2"):
        ModelConfig.tiny(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    ok = ModelConfig.tiny(n_routed_experts=24, n_group=4, topk_group=2, num_experts_per_tok=6)  # top 3 per group
    assert ok.num_experts_per_tok // ok.topk_group == 3


def test_too_few_experts_in_chosen_groups():
    with pytest.raises(ValueError, match="hold fewer than num_experts_per_tok=6"):
        ModelConfig.tiny(n_routed_experts=16, n_group=4, topk_group=1, num_experts_per_tok=6)


def test_from_hf_reads_released_rope_scaling_and_transformers_rope_parameters(tmp_path):
    released = ModelConfig.deepseek_v3().to_hf()
    assert "rope_scaling" in released and released["rope_theta"] == 10000.0
    (tmp_path / "config.json").write_text(json.dumps(released))
    assert ModelConfig.from_hf(tmp_path) == ModelConfig.deepseek_v3()

    from transformers import DeepseekV3Config

    hf = DeepseekV3Config(**{k: v for k, v in released.items() if k not in ("architectures", "model_type")})
    written = hf.to_dict()
    assert "rope_parameters" in written
    back = ModelConfig.from_hf(written)
    assert back.rope_scaling == ModelConfig.deepseek_v3().rope_scaling
    assert back.rope_theta == 10000.0 and back.kv_lora_rank == 512


def test_to_hf_loads_in_transformers():
    from transformers import DeepseekV3Config

    c = ModelConfig.tiny()
    hf = DeepseekV3Config(**{k: v for k, v in c.to_hf().items() if k not in ("architectures", "model_type")})
    assert hf.hidden_size == c.hidden_size and hf.n_routed_experts == c.n_routed_experts
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 4.0
    assert hf.num_mtp_layers == c.num_nextn_predict_layers


def test_from_hf_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    bad = ModelConfig.tiny().to_hf() | {"topk_group": 9}
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"config.json: ModelConfig.topk_group=9 exceeds n_group=4"):
        ModelConfig.from_hf(tmp_path)
