"""Facts the book quotes, computed from configs and checked against the paper and the instantiated model."""

import pytest
import torch

from dsv3 import DeepSeekV3, ModelConfig, count_parameters, kv_cache_bytes
from helpers import small_config


def test_v3_parameter_counts_match_the_paper():
    counts = count_parameters(ModelConfig.deepseek_v3())
    assert round(counts["total"] / 1e9) == 671  # "671B total parameters"
    assert round(counts["activated"] / 1e9) == 37  # "37B activated for each token"
    # one MTP module of 11.6B own parameters (the release also stores copies of the shared embedding and head)
    assert round(counts["mtp"] / 1e8) == 116


def test_counts_equal_the_instantiated_model():
    for cfg in (ModelConfig.tiny(), small_config(q_lora_rank=None, n_shared_experts=2)):
        model = DeepSeekV3(cfg)
        counts = count_parameters(cfg)
        assert counts["total"] == model.num_parameters(include_mtp=False)
        assert counts["total_with_mtp"] == model.num_parameters()
        assert sum(counts["breakdown"].values()) == counts["total"]


def test_v3_mla_cache_is_70272_bytes_per_token():
    cfg = ModelConfig.deepseek_v3()
    assert kv_cache_bytes(cfg, 1) == 70_272 == (512 + 64) * 61 * 2
    assert kv_cache_bytes(cfg, 1, attention="mha") == 128 * (192 + 128) * 61 * 2
    assert kv_cache_bytes(cfg, 1, attention="gqa", groups=8) == 8 * (192 + 128) * 61 * 2
    assert kv_cache_bytes(cfg, 1, attention="mqa") == (192 + 128) * 61 * 2
    assert kv_cache_bytes(cfg, 1000, batch=3, dtype=torch.float32) == 70_272 * 2 * 3000


@pytest.mark.parametrize("kind,attention", [("latent", "mla"), ("naive", "mha")])
def test_cache_bytes_equal_the_formula(kind, attention):
    cfg = small_config()
    model = DeepSeekV3(cfg)
    cache = model.new_cache(batch_size=2, max_len=100, kind=kind)
    assert cache.nbytes == kv_cache_bytes(cfg, 100, batch=2, dtype=torch.float32, attention=attention)


def test_bad_arguments():
    cfg = ModelConfig.tiny()
    with pytest.raises(ValueError, match="attention must be one of"):
        kv_cache_bytes(cfg, 10, attention="gqq")
    with pytest.raises(ValueError, match="gqa needs groups dividing num_attention_heads=4"):
        kv_cache_bytes(cfg, 10, attention="gqa", groups=3)
