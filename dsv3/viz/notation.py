"""The book's notation: each symbol of the report, what it means, and the config field that holds it.

One table for the whole book (``book/notation.md`` renders ``notation_markdown()``); the values come from
``ModelConfig.deepseek_v3()``, ``ModelConfig.tiny()`` and ``TrainConfig()``, never typed.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv3.config import ModelConfig
from dsv3.train import TrainConfig


@dataclass(frozen=True)
class Symbol:
    tex: str  # the report's symbol, LaTeX (rendered by MathJax on the notation page)
    meaning: str
    field: str | None  # "ModelConfig.<field>" or "TrainConfig.<field>" (a property is fine); None: no field
    where: str  # where the report defines it


NOTATION: tuple[Symbol, ...] = (
    Symbol("d", "model width (hidden size)", "ModelConfig.hidden_size", "Sec. 2.1.1"),
    Symbol("L", "transformer blocks of the main model", "ModelConfig.num_hidden_layers", "Sec. 4.2"),
    Symbol("n_h", "attention heads", "ModelConfig.num_attention_heads", "Sec. 2.1.1"),
    Symbol(
        "d_h", "per-head dimension of the position-free query/key part", "ModelConfig.qk_nope_head_dim", "Sec. 2.1.1"
    ),
    Symbol(
        "d_h^v",
        "per-head dimension of the values (the report writes $d_h$ for both)",
        "ModelConfig.v_head_dim",
        "Sec. 2.1.1",
    ),
    Symbol("d_h^R", "per-head dimension of the decoupled RoPE query/key", "ModelConfig.qk_rope_head_dim", "Eq. 3-4"),
    Symbol("d_c", "KV compression dimension: the latent that is cached", "ModelConfig.kv_lora_rank", "Eq. 1"),
    Symbol("d_c'", "query compression dimension", "ModelConfig.q_lora_rank", "Eq. 6"),
    Symbol("N_s", "shared experts per MoE layer", "ModelConfig.n_shared_experts", "Eq. 12"),
    Symbol("N_r", "routed experts per MoE layer", "ModelConfig.n_routed_experts", "Eq. 12"),
    Symbol("K_r", "routed experts activated per token", "ModelConfig.num_experts_per_tok", "Eq. 13"),
    Symbol("M", "nodes (expert groups) a token may be sent to", "ModelConfig.topk_group", "Sec. 2.1.2"),
    Symbol(
        r"\text{groups}",
        "expert groups, one per node in training (no symbol in the report)",
        "ModelConfig.n_group",
        "Sec. 2.1.2",
    ),
    Symbol(
        "d_{ff}",
        "hidden width of one routed or shared expert (no symbol in the report)",
        "ModelConfig.moe_intermediate_size",
        "Sec. 4.2",
    ),
    Symbol(
        r"\gamma", "bias update speed of auxiliary-loss-free balancing", "TrainConfig.bias_update_speed", "Sec. 2.1.2"
    ),
    Symbol(r"\alpha", "balance factor of the sequence-wise auxiliary loss", "TrainConfig.seq_aux_alpha", "Eq. 17"),
    Symbol(r"\lambda", "weight of the MTP loss", "TrainConfig.mtp_weight", "Eq. 25"),
    Symbol(
        "D",
        "MTP depth: sequential modules predicting further tokens",
        "ModelConfig.num_nextn_predict_layers",
        "Sec. 2.2",
    ),
    Symbol("b_i", "correction bias of routed expert $i$, used only for the top-$K_r$ choice", None, "Eq. 16"),
    Symbol(
        "s_{i,t}", "affinity of token $t$ to expert $i$: sigmoid of $u_t^T e_i$", "ModelConfig.scoring_func", "Eq. 15"
    ),
    Symbol(
        "g_{i,t}",
        "gating value: the selected affinities normalized (the release then multiplies them by this)",
        "ModelConfig.routed_scaling_factor",
        "Eq. 13",
    ),
    Symbol(r"\lvert V \rvert", "vocabulary size", "ModelConfig.vocab_size", "Sec. 4.2"),
    Symbol("T", "tokens in a sequence", "TrainConfig.seq_len", "Sec. 2.1.2"),
    Symbol("s", "YaRN context-extension factor", "ModelConfig.rope_scaling", "Sec. 4.3"),
)


def field_value(field: str, model: ModelConfig, train: TrainConfig):
    """The value of ``"ModelConfig.x"`` in ``model`` or ``"TrainConfig.x"`` in ``train``."""
    owner, name = field.split(".", 1)
    if owner not in ("ModelConfig", "TrainConfig"):
        raise ValueError(f"notation field {field!r}: must start with ModelConfig. or TrainConfig.")
    value = getattr(model if owner == "ModelConfig" else train, name)
    if name == "rope_scaling":
        return None if value is None else value.get("factor")
    return value


def _cell(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"`{value}`"


def notation_markdown() -> str:
    """The notation table as MyST markdown: symbol, meaning (where the report defines it), config field (of
    ``ModelConfig`` unless it names ``TrainConfig``), its value in DeepSeek-V3
    (``ModelConfig.deepseek_v3()``) and in the book (``ModelConfig.tiny()``, ``TrainConfig()``).

    Training hyper-parameters are not part of the released config: their DeepSeek-V3 cell stays empty (the report's
    values are given where the chapters use them)."""
    v3, tiny, train = ModelConfig.deepseek_v3(), ModelConfig.tiny(), TrainConfig()
    rows = ["| Symbol | Meaning | Field of `ModelConfig` | DeepSeek-V3 | The book |", "|:--|:--|:--|--:|--:|"]
    for sym in NOTATION:
        if sym.field is None:
            field, big, small = "(learned state)", "", ""
        else:
            field = f"`{sym.field.removeprefix('ModelConfig.')}`"
            small = _cell(field_value(sym.field, tiny, train))
            big = "" if sym.field.startswith("TrainConfig.") else _cell(field_value(sym.field, v3, train))
        rows.append(f"| ${sym.tex}$ | {sym.meaning} ({sym.where}) | {field} | {big} | {small} |")
    return "\n".join(rows)
