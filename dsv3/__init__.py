"""dsv3: DeepSeek-V3 (arXiv 2412.19437) in PyTorch + Triton, the package behind the DeepSeek-V3 book.

Reading order: config -> layers (norm, rope, mla, moe, block, mtp) -> model -> checkpoint -> accounting.
"""

from .accounting import count_parameters, flops_per_token, kv_cache_bytes
from .checkpoint import load_pretrained, save_pretrained
from .config import ModelConfig
from .generate import Generation, GenerationStats, generate
from .layers.mla import KVCache
from .model import DeepSeekV3, ModelOutput

__version__ = "0.1.0"

__all__ = [
    "ModelConfig",
    "DeepSeekV3",
    "ModelOutput",
    "KVCache",
    "load_pretrained",
    "save_pretrained",
    "count_parameters",
    "kv_cache_bytes",
    "flops_per_token",
    "generate",
    "Generation",
    "GenerationStats",
]
