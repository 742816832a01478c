"""ModelConfig: every field of DeepSeek-V3's released ``config.json``, presets, validation and Hugging Face I/O.

Field names are the released names, so ``ModelConfig.from_hf("config.json")`` and ``.to_hf()`` are plain
renames-free copies. Chapter 1 of the book prints the V3 preset; every other chapter builds ``ModelConfig.tiny()``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text

# Fields of the released config.json that carry bookkeeping, not architecture: written by to_hf, ignored by from_hf.
_HF_ONLY = (
    "architectures",
    "auto_map",
    "model_type",
    "transformers_version",
    "dtype",
    "num_mtp_layers",
    "output_router_logits",
    "qk_head_dim",
    "head_dim",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "_name_or_path",
    "use_return_dict",
    "return_dict",
)
# Fields a config.json must hold (the release's and transformers' both do): they fix every tensor's shape and the
# routing. The rest default to the release's values.
REQUIRED_HF_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "n_shared_experts",
    "n_routed_experts",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "v_head_dim",
    "qk_nope_head_dim",
    "n_group",
    "topk_group",
    "num_experts_per_tok",
    "first_k_dense_replace",
)
# Float fields that must be finite numbers (NaN/Inf here would poison every forward silently)
_FLOAT_FIELDS = (
    "routed_scaling_factor",
    "aux_loss_alpha",
    "initializer_range",
    "rms_norm_eps",
    "rope_theta",
    "attention_dropout",
)
_YARN_FLOATS = ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
# Keys a rope_scaling / rope_parameters dict may hold (the release's YaRN keys and transformers' spellings)
_ROPE_KEYS = (
    "type",
    "rope_type",
    "rope_theta",
    "original_max_position_embeddings",
    "attention_factor",
    "truncate",
    "partial_rotary_factor",
) + _YARN_FLOATS
# Weight dtypes a checkpoint's torch_dtype may name (the model computes in floating point)
TORCH_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """DeepSeek-V3 hyper-parameters, named as in the released ``config.json`` (paper Sec. 4.2 for the values)."""

    vocab_size: int = 129280
    hidden_size: int = 7168  # d, the model width
    intermediate_size: int = 18432  # width of the dense SwiGLU FFN in the first layers
    moe_intermediate_size: int = 2048  # width of one (fine-grained) expert
    num_hidden_layers: int = 61  # main-model transformer blocks (MTP modules come after)
    num_nextn_predict_layers: int = 1  # D, the number of sequential MTP modules (Sec. 2.2)
    num_attention_heads: int = 128  # n_h
    num_key_value_heads: int = 128  # MLA has per-head keys after decompression, so equal to n_h
    n_shared_experts: int = 1  # N_s, always-on experts per MoE layer
    n_routed_experts: int = 256  # N_r
    routed_scaling_factor: float = 2.5  # multiplies normalized gating weights
    kv_lora_rank: int = 512  # d_c, the latent KV width that is cached
    q_lora_rank: int | None = 1536  # d_c', query compression; None = plain q_proj
    qk_rope_head_dim: int = 64  # d_h^R, the decoupled RoPE part of each query/key head
    v_head_dim: int = 128  # d_h for values
    qk_nope_head_dim: int = 128  # d_h for the position-free part of query/key heads
    topk_method: str = "noaux_tc"  # auxiliary-loss-free selection with the correction bias
    n_group: int = 8  # expert groups (one per node in training)
    topk_group: int = 4  # M, groups (nodes) a token may be routed to
    num_experts_per_tok: int = 8  # K_r, routed experts per token
    moe_layer_freq: int = 1  # every layer after first_k_dense_replace is MoE
    first_k_dense_replace: int = 3  # the first k layers use the dense FFN
    norm_topk_prob: bool = True  # normalize the selected sigmoid affinities (Eq. 13)
    scoring_func: str = "sigmoid"  # affinity s_{i,t} = sigmoid(u_t^T e_i) (Eq. 15)
    aux_loss_alpha: float = 0.001  # weight of the complementary sequence-wise loss in the release
    seq_aux: bool = True  # the balance loss is sequence-wise (Eq. 17-20)
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840  # after YaRN extension (original 4096 x factor 40)
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int = 0
    eos_token_id: int = 1
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        }
    )
    rope_interleave: bool = True  # released weights rotate interleaved pairs (x0, x1), (x2, x3), ...
    attention_bias: bool = False
    attention_dropout: float = 0.0
    ep_size: int = 1
    quantization_config: dict | None = None  # {"quant_method": "fp8", "weight_block_size": [128, 128], ...}
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(
                f"ModelConfig.rope_scaling must be an object of YaRN settings or null, got {self.rope_scaling!r}"
            )
        if self.rope_scaling is not None:
            self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)
        self.validate()

    # ---------------------------------------------------------------- presets
    @classmethod
    def deepseek_v3(cls) -> ModelConfig:
        """The released DeepSeek-V3 (671B) configuration, FP8 block-quantized as published."""
        return cls(
            quantization_config={
                "activation_scheme": "dynamic",
                "fmt": "e4m3",
                "quant_method": "fp8",
                "weight_block_size": [128, 128],
            }
        )

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelConfig:
        """The book's CPU teaching size: ~7M parameters, 1 dense + 2 MoE layers, 16 experts in 4 groups, 1 MTP module.

        Every V3 mechanism is present (MLA with both low-rank paths, decoupled RoPE with YaRN, shared + routed experts,
        group-limited routing, MTP); only the widths shrink. ``vocab_size`` matches the bundled tokenizer.
        """
        base = dict(
            vocab_size=2048,
            hidden_size=256,
            intermediate_size=768,
            moe_intermediate_size=128,
            num_hidden_layers=3,
            num_nextn_predict_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_shared_experts=1,
            n_routed_experts=16,
            routed_scaling_factor=2.5,
            kv_lora_rank=64,
            q_lora_rank=96,
            qk_rope_head_dim=16,
            v_head_dim=32,
            qk_nope_head_dim=32,
            n_group=4,
            topk_group=2,
            num_experts_per_tok=4,
            first_k_dense_replace=1,
            max_position_embeddings=1024,
            rope_scaling={
                "type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 256,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
            torch_dtype="float32",
        )
        base.update(overrides)
        return cls(**base)

    # ---------------------------------------------------------------- derived fields
    @property
    def qk_head_dim(self) -> int:
        """Query/key head width: the position-free part plus the decoupled RoPE part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block ``layer_idx`` uses DeepSeekMoE (MTP blocks, indexed after the main ones, are MoE too)."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def softmax_scale(self) -> float:
        """Attention scale 1/sqrt(d_h + d_h^R), times YaRN's mscale squared (folded into the softmax, Sec. 4.3)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale = scale * m * m
        return scale

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field whose value cannot describe a DeepSeek-V3 model."""
        positive = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
        ]
        if self.n_routed_experts > 0:
            positive += ["moe_intermediate_size", "num_experts_per_tok", "n_group", "topk_group", "moe_layer_freq"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in (
            "n_routed_experts",
            "n_shared_experts",
            "num_nextn_predict_layers",
            "first_k_dense_replace",
            "qk_nope_head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be a non-negative integer, got {value!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ValueError(f"ModelConfig.q_lora_rank must be a positive integer or None, got {self.q_lora_rank!r}")
        if self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(
                f"ModelConfig.num_key_value_heads={self.num_key_value_heads} must equal "
                f"num_attention_heads={self.num_attention_heads} (MLA decompresses a key and value per "
                f"head; transformers groups heads by their ratio)"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"ModelConfig.qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}"
            )
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"ModelConfig.{name} must be a finite number, got {value!r}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"ModelConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if self.initializer_range < 0:
            raise ValueError(f"ModelConfig.initializer_range must be >= 0, got {self.initializer_range!r}")
        if self.aux_loss_alpha < 0:
            raise ValueError(f"ModelConfig.aux_loss_alpha must be >= 0, got {self.aux_loss_alpha!r}")
        if self.rope_theta <= 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if not 0 <= self.attention_dropout < 1:
            raise ValueError(f"ModelConfig.attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is None and name != "eos_token_id":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"ModelConfig.{name}={value!r} is not a token id of the vocabulary "
                    f"[0, vocab_size={self.vocab_size})"
                )
        for name in (
            "norm_topk_prob",
            "tie_word_embeddings",
            "rope_interleave",
            "attention_bias",
            "seq_aux",
            "use_cache",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"ModelConfig.hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        if self.topk_method != "noaux_tc":
            raise ValueError(
                f"ModelConfig.topk_method must be 'noaux_tc' (DeepSeek-V3's bias-corrected group-limited "
                f"routing), got {self.topk_method!r}"
            )
        if self.torch_dtype not in TORCH_DTYPES:
            raise ValueError(f"ModelConfig.torch_dtype must be one of {TORCH_DTYPES}, got {self.torch_dtype!r}")
        _check_quantization(self.quantization_config)
        if self.scoring_func != "sigmoid":
            raise ValueError(f"ModelConfig.scoring_func must be 'sigmoid' (DeepSeek-V3), got {self.scoring_func!r}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(
                f"ModelConfig.first_k_dense_replace={self.first_k_dense_replace} exceeds "
                f"num_hidden_layers={self.num_hidden_layers}"
            )
        if self.n_routed_experts > 0:
            if self.num_experts_per_tok > self.n_routed_experts:
                raise ValueError(
                    f"ModelConfig.num_experts_per_tok={self.num_experts_per_tok} exceeds "
                    f"n_routed_experts={self.n_routed_experts}"
                )
            if self.n_routed_experts % self.n_group:
                raise ValueError(
                    f"ModelConfig.n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}"
                )
            if self.topk_group > self.n_group:
                raise ValueError(f"ModelConfig.topk_group={self.topk_group} exceeds n_group={self.n_group}")
            if self.num_experts_per_tok % self.topk_group:
                raise ValueError(
                    f"ModelConfig.num_experts_per_tok={self.num_experts_per_tok} is not divisible by "
                    f"topk_group={self.topk_group} (a group's score is the sum of its top "
                    f"num_experts_per_tok/topk_group affinities)"
                )
            if self.topk_group * self.experts_per_group < self.num_experts_per_tok:  # a group holds < K_r/M experts
                raise ValueError(
                    f"ModelConfig: topk_group={self.topk_group} groups of {self.experts_per_group} experts "
                    f"hold fewer than num_experts_per_tok={self.num_experts_per_tok} experts (each group "
                    f"must hold at least num_experts_per_tok/topk_group = "
                    f"{self.num_experts_per_tok // self.topk_group})"
                )
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"ModelConfig.routed_scaling_factor must be > 0, got {self.routed_scaling_factor!r}")
        rs = self.rope_scaling
        if rs is not None:
            typos = {k: difflib.get_close_matches(k, _ROPE_KEYS, n=1, cutoff=0.8) for k in rs if k not in _ROPE_KEYS}
            typos = {k: m[0] for k, m in typos.items() if m}
            if typos:
                raise ValueError(
                    "ModelConfig.rope_scaling has unknown keys "
                    + ", ".join(f"{k!r} (did you mean {v!r}?)" for k, v in typos.items())
                )
            if rs["type"] not in ("yarn", "default"):
                raise ValueError(f"ModelConfig.rope_scaling.type must be 'yarn' (or 'default'), got {rs['type']!r}")
            if rs["type"] == "yarn":
                for key in _YARN_FLOATS + ("original_max_position_embeddings",):
                    value = rs.get(key)
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                        raise ValueError(f"ModelConfig.rope_scaling.{key} must be a finite number, got {value!r}")
                for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
                    if rs[key] <= 0:
                        raise ValueError(f"ModelConfig.rope_scaling.{key} must be > 0, got {rs[key]!r}")
                if not float(rs["original_max_position_embeddings"]).is_integer():
                    raise ValueError(
                        f"ModelConfig.rope_scaling.original_max_position_embeddings must be an integer, "
                        f"got {rs['original_max_position_embeddings']!r}"
                    )
                for key in ("mscale", "mscale_all_dim"):
                    if rs[key] < 0:
                        raise ValueError(f"ModelConfig.rope_scaling.{key} must be >= 0, got {rs[key]!r}")

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- Hugging Face I/O
    @classmethod
    def from_hf(cls, path_or_dict: str | Path | dict) -> ModelConfig:
        """Read a released or transformers-written ``config.json`` (file, directory or dict).

        Both spellings of the RoPE settings are accepted: the release's ``rope_theta`` + ``rope_scaling`` and
        transformers' ``rope_parameters`` (which holds ``rope_theta`` and ``rope_type``).
        """
        if isinstance(path_or_dict, dict):
            raw, where = dict(path_or_dict), "config dict"
        elif not isinstance(path_or_dict, (str, Path)):
            raw, where = path_or_dict, "config"
        else:
            p = Path(path_or_dict)
            if p.is_dir():
                p = p / "config.json"
            if not p.is_file():
                raise FileNotFoundError(f"no config.json at {p}")
            try:
                raw = json.loads(p.read_text(encoding="utf-8-sig"), object_pairs_hook=_unique_keys)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                raise ValueError(f"{p}: not valid JSON ({type(e).__name__}: {e})") from None
            except _DuplicateKey as e:
                raise ValueError(f"{p}: key {e.args[0]!r} appears more than once") from None
            where = str(p)
        if not isinstance(raw, dict):
            raise ValueError(
                f"{where}: a config must be a JSON object of field: value, got "
                f"{type(raw).__name__ if raw is not None else 'null'}"
            )
        if raw.get("model_type", "deepseek_v3") not in ("deepseek_v3",):
            raise ValueError(f"{where}: model_type is {raw.get('model_type')!r}, expected 'deepseek_v3'")
        _check_keys(raw, where, {f.name for f in dataclasses.fields(cls)})
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names and k not in ("rope_scaling", "rope_theta")}
        if "num_mtp_layers" in raw and "num_nextn_predict_layers" not in raw:
            kwargs["num_nextn_predict_layers"] = raw["num_mtp_layers"]
        if isinstance(kwargs.get("eos_token_id"), list):  # transformers allows several; we stop at the first
            eos = kwargs["eos_token_id"]
            vocab = raw.get("vocab_size")
            bad = [
                t
                for t in eos
                if isinstance(t, bool) or not isinstance(t, int) or not isinstance(vocab, int) or not 0 <= t < vocab
            ]
            if not eos or bad:
                raise ValueError(
                    f"{where}: eos_token_id={eos!r} must list token ids of the vocabulary [0, vocab_size={vocab})"
                )
            kwargs["eos_token_id"] = eos[0]
        if "dtype" in raw and "torch_dtype" not in raw:
            kwargs["torch_dtype"] = str(raw["dtype"]).replace("torch.", "")
        for key in ("rope_parameters", "rope_scaling"):
            if raw.get(key) is not None and not isinstance(raw[key], dict):
                raise ValueError(f"{where}: {key} must be an object or null, got {raw[key]!r}")
        rope = raw.get("rope_parameters") or None
        scaling = raw.get("rope_scaling") or None
        theta = raw.get("rope_theta")
        if rope is not None:
            theta = rope.get("rope_theta", theta)
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                scaling = rope
        if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float))):
            raise ValueError(f"{where}: rope_theta must be a number, got {theta!r}")
        kwargs["rope_theta"] = float(theta if theta is not None else 10000.0)
        kwargs["rope_scaling"] = scaling
        try:
            return cls(**kwargs)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{where}: {e}") from None

    def to_hf(self) -> dict:
        """A ``config.json`` dict in the released layout that transformers' ``DeepseekV3Config`` also reads."""
        out: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "quantization_config" and value is None:
                continue
            out[f.name] = value
        if self.rope_scaling is not None:
            out["rope_scaling"] = dict(self.rope_scaling)
        return out

    def save(self, path: str | Path) -> None:
        """Write ``config.json`` (atomically) to ``path`` (a directory or a file name)."""
        p = Path(path)
        if p.is_dir() or p.suffix != ".json":
            p.mkdir(parents=True, exist_ok=True)
            p = p / "config.json"
        atomic_write_text(p, json.dumps(self.to_hf(), indent=2) + "\n")


def _check_keys(raw: dict, where: str, fields: set[str]) -> None:
    """Missing required keys, or keys that look like a misspelt field, end the read with one error naming them."""
    known = fields | set(_HF_ONLY)
    unknown = sorted(k for k in raw if k not in known)
    typos = {k: difflib.get_close_matches(k, sorted(fields), n=1, cutoff=0.85) for k in unknown}
    typos = {k: m[0] for k, m in typos.items() if m}
    missing = [k for k in REQUIRED_HF_KEYS if k not in raw]
    if not missing and not typos:
        return  # other unknown keys (transformers' generic bookkeeping) are ignored
    parts = []
    if missing:
        parts.append(f"missing required keys {missing}")
    if typos:
        parts.append("unknown keys " + ", ".join(f"{k!r} (did you mean {v!r}?)" for k, v in typos.items()))
    elif unknown and missing:
        parts.append(f"unknown keys {unknown}")
    raise ValueError(f"{where}: " + "; ".join(parts))


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    """``json.loads`` hook: a key given twice is an error (JSON keeps the last silently)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _check_quantization(q: Any) -> None:
    """``quantization_config`` is null or the release's FP8 block scheme (the only one the loader dequantizes)."""
    if q is None:
        return
    if not isinstance(q, dict):
        raise ValueError(f"ModelConfig.quantization_config must be an object or null, got {q!r}")
    if q.get("quant_method") != "fp8":
        raise ValueError(
            f"ModelConfig.quantization_config.quant_method must be 'fp8' (128x128 block scales), got "
            f"{q.get('quant_method')!r}"
        )
    block = q.get("weight_block_size", [128, 128])
    if not isinstance(block, (list, tuple)) or list(block) != [128, 128]:
        raise ValueError(f"ModelConfig.quantization_config.weight_block_size must be [128, 128], got {block!r}")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction 0.1 * mscale * ln(s) + 1 (1 when the context is not extended)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _normalize_rope_scaling(rs: dict) -> dict | None:
    rs = dict(rs)
    kind = rs.pop("rope_type", None) or rs.get("type", "default")
    rs.pop("rope_theta", None)
    rs["type"] = kind
    if kind == "default":
        return None
    if kind == "yarn":
        if rs.get("factor") is None:
            rs["factor"] = 1.0
        elif isinstance(rs["factor"], (int, float)) and not isinstance(rs["factor"], bool):
            rs["factor"] = float(rs["factor"])
        rs.setdefault("beta_fast", 32)
        rs.setdefault("beta_slow", 1)
        rs.setdefault("mscale", 1.0)
        rs.setdefault("mscale_all_dim", 0.0)
    return rs
