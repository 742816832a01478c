"""FP8 mixed precision (paper Sec. 3.3; taught in Chapter 10), applied to a built model from outside.

DeepSeek-V3 runs the GEMMs of its linear layers in e4m3 and keeps in high precision the parts that are sensitive
or cheap: the embedding, the output head, the MoE gating, the normalizations and the attention operators
(Sec. 3.3.1). This module does that to a ``DeepSeekV3`` without touching the model code:

    model = DeepSeekV3(config).float()        # fp32 master weights
    apply_fp8(model)                          # attention projections and every expert FFN now run in FP8
    opt = AdamW(model.parameters(), ...)      # moments kept in bf16 (Sec. 3.3.3)

- ``FP8Linear`` replaces an ``nn.Linear`` (same parameters, same state-dict names). Its forward dispatches on the
  weight's dtype, as DeepSeek's inference ``linear()`` does: a high-precision (master) weight trains through
  ``kernels.fp8_training_linear`` (Fprop, Dgrad and Wgrad in FP8 with 1 x 128 / 128 x 128 online scales, input
  cached in FP8); an e4m3 weight with its ``weight_scale_inv`` (a released checkpoint loaded with
  ``load_pretrained(..., keep_fp8=True)``) runs inference with ``act_quant`` + ``fp8_gemm``.
- ``FP8Experts`` does the same for the stacked routed experts (one FP8 GEMM per expert and projection).
- ``AdamW`` with ``moment_dtype=torch.bfloat16`` is the paper's low-precision optimizer state.
- ``TrainConfig(fp8=True)`` / ``python -m dsv3 train --fp8`` apply all of it (``dsv3.train``).

On a CPU every FP8 GEMM is an exact emulation (round to ``torch.float8_e4m3fn``, dequantize, fp32 matmul); on a
GPU the same calls reach the Triton block-scaled FP8 GEMM (``dsv3.kernels.fp8``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import kernels
from .kernels.fp8 import FP8_DTYPE
from .layers.moe import Experts

BLOCK = 128  # Sec. 3.3.2: 1 x 128 activation tiles, 128 x 128 weight blocks
EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")

# Sec. 3.3.1: "the embedding module, the output head, MoE gating modules, normalization operators, and attention
# operators" keep their precision; so does the MTP's eh_proj, which the release stores in bf16 (dsv3.checkpoint).
# The attention softmax is never an FP8 GEMM here: SDPA / the attention kernels run in the model's dtype.
HIGH_PRECISION = ("embed_tokens", "lm_head", "mlp.gate", "norm", "layernorm", "eh_proj")


def _scale_shape(rows: int, cols: int) -> tuple[int, int]:
    return (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))


class FP8Linear(nn.Linear):
    """An ``nn.Linear`` whose GEMMs run in FP8. Dispatch on the weight's dtype:

    - fp32/bf16 weight (training, master weights): ``kernels.fp8_training_linear``, differentiable;
    - e4m3 weight + ``weight_scale_inv`` buffer (inference on released FP8 weights): ``kernels.fp8_linear``.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        """A FP8Linear that shares ``linear``'s parameters (so optimizers and state dicts see the same tensors)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == FP8_DTYPE:
            return kernels.fp8_linear(x, self.weight, self.weight_scale_inv, self.bias)  # (..., out)
        if getattr(self, "weight_scale_inv", None) is not None:
            raise RuntimeError(
                f"FP8Linear({self.in_features}, {self.out_features}): the weight was cast from e4m3 to "
                f"{self.weight.dtype} without its weight_scale_inv; do not call .to(dtype) on a "
                f"model loaded with keep_fp8=True"
            )
        return kernels.fp8_training_linear(x, self.weight, self.bias)  # (..., out)

    def store_fp8(self) -> None:
        """Keep the weight as e4m3 + one fp32 scale per 128 x 128 block (inference only from now on)."""
        q, s = kernels.weight_quant(self.weight.detach().float(), BLOCK)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("weight_scale_inv", s)


class FP8Experts(Experts):
    """The stacked routed experts with FP8 GEMMs: each expert's three projections through the FP8 linear
    (training) or, for e4m3 weights with ``{gate,up,down}_proj_scale_inv`` (E, ceil(out/128), ceil(in/128)),
    through ``act_quant`` + ``fp8_gemm`` (inference)."""

    @classmethod
    def from_experts(cls, experts: Experts) -> FP8Experts:
        E, I, D = experts.gate_proj.shape
        with torch.device("meta"):
            new = cls(E, D, I)
        new.gate_proj, new.up_proj, new.down_proj = experts.gate_proj, experts.up_proj, experts.down_proj
        return new

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x (N, D), weights/ids (N, K) -> sum_k weights[n, k] * FFN_{ids[n, k]}(x_n) (N, D), GEMMs in FP8."""
        names = EXPERT_WEIGHTS
        # one view per expert, made once: indexing w[e] per call would give each expert a full-size gradient
        experts = {id(getattr(self, n)): (n, getattr(self, n).unbind(0)) for n in names}

        def linear(rows: torch.Tensor, w: torch.Tensor, e: int) -> torch.Tensor:  # rows (c, in) -> (c, out)
            name, views = experts[id(w)]
            if w.dtype == FP8_DTYPE:
                return kernels.fp8_linear(rows, views[e], getattr(self, name + "_scale_inv")[e])
            return kernels.fp8_training_linear(rows, views[e])

        return kernels.moe_experts_torch(x, self.gate_proj, self.up_proj, self.down_proj, weights, ids, linear=linear)

    def store_fp8(self) -> None:
        """Keep the three stacked weights as e4m3 with per-expert 128 x 128 block scales (inference only)."""
        for name in EXPERT_WEIGHTS:
            w = getattr(self, name).detach().float()
            pairs = [kernels.weight_quant(w[e], BLOCK) for e in range(w.shape[0])]
            setattr(self, name, nn.Parameter(torch.stack([q for q, _ in pairs]), requires_grad=False))
            self.register_buffer(name + "_scale_inv", torch.stack([s for _, s in pairs]))  # (E, out/128, in/128)


def fp8_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules the recipe runs in FP8, by qualified name: every linear layer of attention, of the dense FFNs
    and shared experts, and the routed experts, in the main blocks and the MTP modules."""
    found = {}
    for prefix, blocks in (("layers", model.layers), ("mtp", model.mtp)):
        for i, block in enumerate(blocks):
            for part in ("self_attn", "mlp"):
                for name, module in getattr(block, part).named_modules():
                    if isinstance(module, (nn.Linear, Experts)):
                        found[f"{prefix}.{i}.{part}.{name}"] = module
    return found


def apply_fp8(model: nn.Module) -> nn.Module:
    """Swap the FP8 modules of a built ``DeepSeekV3`` in place (parameters shared, not copied) and return it.
    Everything in ``HIGH_PRECISION`` is left as it is. Applying it twice changes nothing."""
    for name, module in fp8_modules(model).items():
        if isinstance(module, (FP8Linear, FP8Experts)):
            continue
        new = FP8Experts.from_experts(module) if isinstance(module, Experts) else FP8Linear.from_linear(module)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


def keep_fp8_storage(model: nn.Module, weight_names: set[str], device: torch.device | str = "cpu") -> None:
    """For loading released FP8 weights as they are: every FP8-able module whose weight is in ``weight_names``
    (our state-dict names: ``layers.0.self_attn.o_proj.weight``, ``layers.1.mlp.experts.up_proj``) becomes an
    FP8 module with uninitialised e4m3 storage and ``*_scale_inv`` buffers for the loader to fill; the others stay
    as they are. ``kv_b_proj`` stays high precision: absorbed attention reads it as per-head matrices (DeepSeek's
    inference dequantizes it too)."""
    for name, module in fp8_modules(model).items():
        if name.endswith("kv_b_proj"):
            continue
        parent, _, child = name.rpartition(".")
        if isinstance(module, nn.Linear) and name + ".weight" in weight_names:
            new = FP8Linear.from_linear(module)
            out_f, in_f = module.weight.shape
            new.weight = nn.Parameter(torch.empty(out_f, in_f, dtype=FP8_DTYPE, device=device), requires_grad=False)
            new.register_buffer("weight_scale_inv", torch.empty(_scale_shape(out_f, in_f), device=device))
            setattr(model.get_submodule(parent), child, new)
        elif isinstance(module, Experts) and any(f"{name}.{p}" in weight_names for p in EXPERT_WEIGHTS):
            new = FP8Experts.from_experts(module)
            for proj in EXPERT_WEIGHTS:
                if f"{name}.{proj}" not in weight_names:
                    continue
                E, out_f, in_f = getattr(new, proj).shape
                setattr(
                    new,
                    proj,
                    nn.Parameter(torch.empty(E, out_f, in_f, dtype=FP8_DTYPE, device=device), requires_grad=False),
                )
                new.register_buffer(proj + "_scale_inv", torch.empty(E, *_scale_shape(out_f, in_f), device=device))
            setattr(model.get_submodule(parent), child, new)


def cached_input_bytes(tokens: int, width: int, fp8: bool = True, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes a linear layer keeps for its backward: its input (tokens, width) in e4m3 plus one fp32 scale per
    1 x 128 tile (``fp8=True``), or the input itself in ``dtype``."""
    if fp8:
        return tokens * width + tokens * math.ceil(width / BLOCK) * 4
    return tokens * width * torch.finfo(dtype).bits // 8


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose moments are stored in ``moment_dtype``: bf16 is the paper's
    "low-precision optimizer states" (Sec. 3.3.3). Each step reads the moments, updates them in fp32, uses the fp32
    values for the parameter update and stores them back rounded to ``moment_dtype``. The arithmetic follows
    ``torch.optim.AdamW`` step by step, so ``moment_dtype=torch.float32`` reproduces it."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        moment_dtype: torch.dtype = torch.bfloat16,
    ):
        if not lr > 0 or not eps >= 0 or not weight_decay >= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW: invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        if not moment_dtype.is_floating_point:
            raise ValueError(f"AdamW: moment_dtype must be a floating-point dtype, got {moment_dtype}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.moment_dtype = moment_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                state["step"] += 1
                step = state["step"].item()
                p.mul_(1 - lr * wd)
                m = state["exp_avg"].float().lerp_(g, 1 - beta1)  # fp32 update of the stored moment
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                bias1, bias2 = 1 - beta1**step, 1 - beta2**step
                denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / bias1)
                state["exp_avg"] = m.to(self.moment_dtype)  # a new tensor: a resumed fp32 copy returns to bf16
                state["exp_avg_sq"] = v.to(self.moment_dtype)
        return loss
