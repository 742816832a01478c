"""Fused kernels of DeepSeek-V3, each beside its pure-torch reference, behind one switch.

    dsv3.kernels.set_backend("auto" | "torch" | "triton")     # auto: Triton on CUDA tensors, torch elsewhere
    with dsv3.kernels.use_backend("torch"): ...               # temporarily

Ops (each `op` dispatches to `op_torch`, the readable reference that runs anywhere and is differentiable,
or `op_triton`, the fused kernel; file `x.py` holds the dispatch, `x_triton.py` the kernels; the references of
the model's own math (RMSNorm, RoPE, router, experts, latent attention) live in `dsv3.layers.reference` and are
re-exported here, the others (FP8, cross-entropy, SDPA) sit beside their dispatch):

| op                        | paper            | kernel                                                        |
|---------------------------|------------------|---------------------------------------------------------------|
| rms_norm                  | Sec. 2           | RMSNorm fused with the residual add; forward + backward       |
| apply_rope                | Sec. 2.1.1       | interleaved RoPE on the rope slice; forward + backward        |
| router_topk               | Sec. 2.1.2       | sigmoid + bias + group-limited top-k + normalize, one kernel  |
| moe_experts, expert_counts| Sec. 2.1.2       | grouped GEMMs over sorted, padded tokens; forward + backward  |
| mla_decode                | Sec. 2.1.1       | absorbed attention over a (paged) latent cache, split-KV      |
| attention_prefill         | Sec. 2.1.1       | flash-attention forward (training uses SDPA)                  |
| act_quant, weight_dequant, weight_quant, fp8_gemm, fp8_linear | Sec. 3.3 | 1x128 / 128x128 block-scaled FP8 |
| fp8_gemm_tiles, fp8_training_linear | Sec. 3.3 | FP8 training: Fprop, Dgrad, Wgrad (1x128 tiles on both operands) |
| linear_cross_entropy      | Sec. 2, 2.2      | vocabulary-chunked LM head + CE, no (N, V) logits             |

Triton is optional: this package imports without it, and the kernel modules load on first use.
`benchmarks/bench_kernels.py` times every pair on a GPU; `tests/test_kernels*.py` checks every pair on the CPU
through Triton's interpreter (TRITON_INTERPRET=1).
"""

from .backend import BACKENDS, get_backend, interpret_mode, set_backend, triton_available, use_backend
from .cross_entropy import linear_cross_entropy, linear_cross_entropy_torch, linear_cross_entropy_triton
from .fp8 import (
    act_quant,
    act_quant_torch,
    act_quant_triton,
    fp8_gemm,
    fp8_gemm_tiles,
    fp8_gemm_tiles_torch,
    fp8_gemm_tiles_triton,
    fp8_gemm_torch,
    fp8_gemm_triton,
    fp8_linear,
    fp8_training_linear,
    weight_dequant,
    weight_dequant_torch,
    weight_dequant_triton,
    weight_quant,
)
from .mla import (
    attention_prefill,
    attention_prefill_torch,
    attention_prefill_triton,
    mla_decode,
    mla_decode_torch,
    mla_decode_triton,
)
from .moe import expert_counts, moe_experts, moe_experts_torch, moe_experts_triton
from .norm import rms_norm, rms_norm_torch, rms_norm_triton
from .rope import apply_rope, apply_rope_torch, apply_rope_triton
from .router import router_topk, router_topk_torch, router_topk_triton

__all__ = [
    "BACKENDS",
    "set_backend",
    "get_backend",
    "use_backend",
    "triton_available",
    "interpret_mode",
    "rms_norm",
    "rms_norm_torch",
    "rms_norm_triton",
    "apply_rope",
    "apply_rope_torch",
    "apply_rope_triton",
    "router_topk",
    "router_topk_torch",
    "router_topk_triton",
    "moe_experts",
    "moe_experts_torch",
    "moe_experts_triton",
    "expert_counts",
    "mla_decode",
    "mla_decode_torch",
    "mla_decode_triton",
    "attention_prefill",
    "attention_prefill_torch",
    "attention_prefill_triton",
    "act_quant",
    "act_quant_torch",
    "act_quant_triton",
    "weight_quant",
    "weight_dequant",
    "weight_dequant_torch",
    "weight_dequant_triton",
    "fp8_gemm",
    "fp8_gemm_torch",
    "fp8_gemm_triton",
    "fp8_linear",
    "fp8_gemm_tiles",
    "fp8_gemm_tiles_torch",
    "fp8_gemm_tiles_triton",
    "fp8_training_linear",
    "linear_cross_entropy",
    "linear_cross_entropy_torch",
    "linear_cross_entropy_triton",
]
