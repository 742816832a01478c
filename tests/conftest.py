"""Shared fixtures: tiny random DeepSeek-V3 models (no downloads), transformers as the numerical oracle."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRITON_INTERPRET", "1")  # before any import of triton: kernels run on the CPU in tests

import pytest
import torch

from dsv3 import DeepSeekV3, ModelConfig


def small_config(**overrides) -> ModelConfig:
    """A config smaller than tiny() so oracle tests run in seconds, with YaRN over a short original context."""
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8,
                qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8, n_group=4, topk_group=2,
                num_experts_per_tok=4, first_k_dense_replace=1, max_position_embeddings=512,
                rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                              "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    base.update(overrides)
    return ModelConfig.tiny(**base)


def random_model(config: ModelConfig, seed: int = 0, bias_scale: float = 0.3) -> DeepSeekV3:
    """A model with random weights, non-unit norms and a nonzero correction bias (so routing bugs show)."""
    torch.manual_seed(seed)
    model = DeepSeekV3(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        for layer in model.moe_layers():
            layer.gate.e_score_correction_bias.uniform_(-bias_scale, bias_scale)
    return model.eval()


@pytest.fixture
def tiny_model():
    return random_model(small_config())


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many small ops on a tiny model (decoding, MTP): one thread is faster there, and immune to a
    busy machine. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
