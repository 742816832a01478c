"""Helpers the tests import (``from helpers import ...``): tiny random models and one measure of numerical error.
Fixtures stay in conftest.py; pytest puts tests/ on sys.path, so this module is importable from every test."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from dsv3 import DeepSeekV3, ModelConfig


def small_config(**overrides) -> ModelConfig:
    """A config smaller than tiny() so oracle tests run in seconds, with YaRN over a short original context."""
    base = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        n_routed_experts=8,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=4,
        first_k_dense_replace=1,
        max_position_embeddings=512,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    )
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


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error of ``actual`` against the reference ``expected``: max |actual - expected| / max |expected|,
    in float64. The worst element counts (a norm ratio would let one wrong entry hide among many right ones), and
    the scale is the reference's largest magnitude, so entries near zero do not blow it up."""
    if actual.shape != expected.shape:
        raise ValueError(f"rel_err: shapes differ, {tuple(actual.shape)} vs the reference's {tuple(expected.shape)}")
    diff = (actual.double() - expected.double()).abs().max()
    scale = expected.double().abs().max()
    if scale == 0:
        raise ValueError("rel_err: the reference is all zeros; compare with an absolute tolerance instead")
    return (diff / scale).item()


ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str, relpath: str):
    """A book tool that is not a package module (``book/_tools/run_notebook.py``, ``book/_ext/dsv3_site.py``),
    imported from its file under the name ``name``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look a module up by name while it loads
    spec.loader.exec_module(module)
    return module
