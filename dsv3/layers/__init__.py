"""The building blocks of DeepSeek-V3, one concept per module, in reading order:
norm (RMSNorm) -> rope (RoPE + YaRN) -> mla (Multi-head Latent Attention) -> moe (router, experts, DeepSeekMoE)
-> block (the transformer block) -> mtp (Multi-Token Prediction modules)."""
