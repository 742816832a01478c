"""The building blocks of DeepSeek-V3, one concept per module, in reading order:
norm (RMSNorm) -> rope (RoPE + YaRN) -> mla (Multi-head Latent Attention) -> moe (router, experts, DeepSeekMoE)
-> block (the transformer block) -> mtp (Multi-Token Prediction modules).

``reference`` writes the paper's math of these layers out in plain torch (RMSNorm, RoPE, the router, the routed
experts, latent attention); the modules call it through ``dsv3.kernels``, which runs it or a fused Triton kernel
tested against it."""
