"""The paper's own evidence for its design choices, as data: the ablation tables of the DeepSeek-V3 report
(arXiv 2412.19437), copied value for value from the report's LaTeX source, each with its table or section.

- ``MTP_ABLATION``: Table 4, multi-token prediction on two MoE baselines (Sec. 4.5.1).
- ``AUX_FREE_ABLATION``: Table 5, auxiliary-loss-free balancing against purely auxiliary-loss-based balancing
  (Sec. 4.5.2).
- ``MLA_VS_MHA``: the DeepSeek-V2 report's (arXiv 2405.04434) comparison of MLA with MHA on MoE models, Appendix
  D.2, Table 9 of its first version (Table 7 in appendix C.2 of later versions).
- ``BALANCE_SCOPE``: Sec. 4.5.3, validation losses of 1B and 3B MoE models balanced sequence-wise, batch-wise
  (auxiliary loss) and by the auxiliary-loss-free method.

The chapters put these next to what the book's one-minute runs show (Chapters 4 and 5). The functions format them;
they compute nothing the paper did not print except differences and counts.
"""

from __future__ import annotations

from dataclasses import dataclass

_SUFFIX = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


def parse_count(text: str) -> float:
    """'2.4B' -> 2.4e9, '1.33T' -> 1.33e12, '110.6K' -> 110600.0 (the tables' own notation)."""
    if not text or text[-1] not in _SUFFIX:
        raise ValueError(f"expected a number with a K/M/B/T suffix, got {text!r}")
    return float(text[:-1]) * _SUFFIX[text[-1]]


@dataclass(frozen=True)
class Ablation:
    """A two-scale ablation table: for each benchmark, (small baseline, small variant, large baseline, large variant).

    ``lower_is_better`` names the metrics where a smaller number wins (bits per byte)."""

    source: str
    caption: str
    columns: tuple[str, str, str, str]
    setup: dict[str, tuple[str, str, str, str]]
    rows: dict[str, tuple[str, tuple[float, float, float, float]]]  # benchmark (metric) -> (shots, values)
    lower_is_better: tuple[str, ...] = ("Pile-test (BPB)",)

    def changes(self, scale: str) -> dict[str, float]:
        """Variant minus baseline per benchmark at ``scale`` ("small" or "large"), signed so that > 0 is better."""
        i = {"small": 0, "large": 2}[scale]
        out = {}
        for name, (_, v) in self.rows.items():
            delta = v[i + 1] - v[i]
            out[name] = round(-delta if name in self.lower_is_better else delta, 4)
        return out

    def tally(self, scale: str) -> tuple[int, int, int]:
        """(better, equal, worse) benchmark counts for the variant at ``scale``."""
        d = self.changes(scale).values()
        return sum(x > 0 for x in d), sum(x == 0 for x in d), sum(x < 0 for x in d)

    def training_flops(self, column: int) -> float:
        """Training compute of one column's model by the 6 x activated parameters x tokens rule (Chapter 1:
        C_train ~ 3 C_fwd ~ 6 N_act per token; attention left out), from the table's own setup rows."""
        active = next(v for k, v in self.setup.items() if k.startswith("# Activated Params"))[column]
        tokens = self.setup["# Training Tokens"][column]
        return 6 * parse_count(active) * parse_count(tokens)

    def markdown(self) -> str:
        head = "| Benchmark (metric) | shots | " + " | ".join(self.columns) + " |"
        lines = [head, "|" + "---|" * (2 + len(self.columns))]
        for name, values in self.setup.items():
            lines.append(f"| {name} | - | " + " | ".join(values) + " |")
        for name, (shots, v) in self.rows.items():
            lines.append(f"| {name} | {shots} | " + " | ".join(f"{x:g}" for x in v) + " |")
        return "\n".join(lines)


MTP_ABLATION = Ablation(
    source="DeepSeek-V3 report, Table 4 (Sec. 4.5.1)",
    caption="Ablation results for the MTP strategy. The MTP strategy consistently enhances the model performance on "
    "most of the evaluation benchmarks.",
    columns=("Small MoE baseline", "Small MoE w/ MTP", "Large MoE baseline", "Large MoE w/ MTP"),
    setup={
        "# Activated Params (Inference)": ("2.4B", "2.4B", "20.9B", "20.9B"),
        "# Total Params (Inference)": ("15.7B", "15.7B", "228.7B", "228.7B"),
        "# Training Tokens": ("1.33T", "1.33T", "540B", "540B"),
    },
    rows={
        "Pile-test (BPB)": ("-", (0.729, 0.729, 0.658, 0.657)),
        "BBH (EM)": ("3-shot", (39.0, 41.4, 70.0, 70.7)),
        "MMLU (EM)": ("5-shot", (50.0, 53.3, 67.5, 66.6)),
        "DROP (F1)": ("1-shot", (39.2, 41.3, 68.5, 70.6)),
        "TriviaQA (EM)": ("5-shot", (56.9, 57.7, 67.0, 67.3)),
        "NaturalQuestions (EM)": ("5-shot", (22.7, 22.3, 27.2, 28.5)),
        "HumanEval (Pass@1)": ("0-shot", (20.7, 26.8, 44.5, 53.7)),
        "MBPP (Pass@1)": ("3-shot", (35.8, 36.8, 61.6, 62.2)),
        "GSM8K (EM)": ("8-shot", (25.4, 31.4, 72.3, 74.0)),
        "MATH (EM)": ("4-shot", (10.7, 12.6, 38.6, 39.8)),
    },
)

AUX_FREE_ABLATION = Ablation(
    source="DeepSeek-V3 report, Table 5 (Sec. 4.5.2)",
    caption="Ablation results for the auxiliary-loss-free balancing strategy. Compared with the purely "
    "auxiliary-loss-based method, the auxiliary-loss-free strategy consistently achieves better model "
    "performance on most of the evaluation benchmarks.",
    columns=(
        "Small MoE aux-loss-based",
        "Small MoE aux-loss-free",
        "Large MoE aux-loss-based",
        "Large MoE aux-loss-free",
    ),
    setup={
        "# Activated Params": ("2.4B", "2.4B", "20.9B", "20.9B"),
        "# Total Params": ("15.7B", "15.7B", "228.7B", "228.7B"),
        "# Training Tokens": ("1.33T", "1.33T", "578B", "578B"),
    },
    rows={
        "Pile-test (BPB)": ("-", (0.727, 0.724, 0.656, 0.652)),
        "BBH (EM)": ("3-shot", (37.3, 39.3, 66.7, 67.9)),
        "MMLU (EM)": ("5-shot", (51.0, 51.8, 68.3, 67.2)),
        "DROP (F1)": ("1-shot", (38.1, 39.0, 67.1, 67.1)),
        "TriviaQA (EM)": ("5-shot", (58.3, 58.5, 66.7, 67.7)),
        "NaturalQuestions (EM)": ("5-shot", (23.2, 23.4, 27.1, 28.1)),
        "HumanEval (Pass@1)": ("0-shot", (22.0, 22.6, 40.2, 46.3)),
        "MBPP (Pass@1)": ("3-shot", (36.6, 35.8, 59.2, 61.2)),
        "GSM8K (EM)": ("8-shot", (27.1, 29.6, 70.7, 74.5)),
        "MATH (EM)": ("4-shot", (10.9, 11.1, 37.2, 39.6)),
    },
)

MLA_VS_MHA = Ablation(
    source="DeepSeek-V2 report (arXiv 2405.04434), Appendix D.2, Table 9",
    caption="Comparison between MLA and MHA on hard benchmarks. DeepSeek-V2 shows better performance than MHA, but "
    "requires a significantly smaller amount of KV cache.",
    columns=("Small MoE w/ MHA", "Small MoE w/ MLA", "Large MoE w/ MHA", "Large MoE w/ MLA"),
    setup={
        "# Activated Params": ("2.5B", "2.4B", "25.0B", "21.5B"),
        "# Total Params": ("15.8B", "15.7B", "250.8B", "247.4B"),
        "KV Cache per Token (# Element)": ("110.6K", "15.6K", "860.2K", "34.6K"),
    },
    rows={
        "BBH (EM)": ("3-shot", (37.9, 39.0, 46.6, 50.7)),
        "MMLU (Acc.)": ("5-shot", (48.7, 50.0, 57.5, 59.0)),
        "C-Eval (Acc.)": ("5-shot", (51.6, 50.9, 57.9, 59.2)),
        "CMMLU (Acc.)": ("5-shot", (52.3, 53.4, 60.7, 62.5)),
    },
)

# Sec. 4.5.3: "in our experiments with 1B MoE models, the validation losses are: 2.258 (using a sequence-wise
# auxiliary loss), 2.253 (using the auxiliary-loss-free method), and 2.253 (using a batch-wise auxiliary loss).
# [...] on 3B MoE models: [...] 2.085, and [...] the auxiliary-loss-free method or a batch-wise auxiliary loss
# achieve the same validation loss of 2.080."
BALANCE_SCOPE_SOURCE = "DeepSeek-V3 report, Sec. 4.5.3 (Batch-Wise Load Balance VS. Sequence-Wise Load Balance)"
BALANCE_SCOPE = {
    "1B MoE": {"sequence-wise aux loss": 2.258, "auxiliary-loss-free": 2.253, "batch-wise aux loss": 2.253},
    "3B MoE": {"sequence-wise aux loss": 2.085, "auxiliary-loss-free": 2.080, "batch-wise aux loss": 2.080},
}


def balance_scope_markdown() -> str:
    methods = list(next(iter(BALANCE_SCOPE.values())))
    lines = ["| model | " + " | ".join(methods) + " |", "|" + "---|" * (1 + len(methods))]
    for model, losses in BALANCE_SCOPE.items():
        lines.append(f"| {model} | " + " | ".join(f"{losses[m]:.3f}" for m in methods) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# A larger recipe: the smallest scale at which the papers measured the effects, priced on one GPU
# ---------------------------------------------------------------------------------------------------------------
RECIPE_SOURCE = (
    "DeepSeek-V3 report Sec. 4.5.3 (1B and 3B MoE models, BALANCE_SCOPE above); Loss-Free Balancing (Wang et al., "
    "2024), abstract: validated 'on MoE models with up to 3B parameters trained on up to 200B tokens'"
)


def recipe_config():
    """A DeepSeek-V3-shaped model of about 1B parameters (the size of the report's smallest Sec. 4.5.3 ablation):
    MLA, 1 shared + 64 routed experts in 8 groups, top-8 within 4 groups (K_r/M = 2, as V3), one MTP module."""
    from ..config import ModelConfig

    return ModelConfig.tiny(
        vocab_size=32768, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=384, num_hidden_layers=12,
        num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=256, q_lora_rank=512, qk_rope_head_dim=32,
        qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=64, n_group=8, topk_group=4, num_experts_per_tok=8,
        n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=4096, rope_scaling=None,
        torch_dtype="bfloat16",
    )  # fmt: skip


def larger_recipe(tokens: float = 100e9, seq_len: int = 4096, batch_size: int = 512,
                  utilization: float = 0.4) -> dict:  # fmt: skip
    """Size, steps and time on one H200 of training ``recipe_config()`` on ``tokens`` tokens: the scale at which the
    papers above report the balancing (and, at 3B, the MTP) effects, which the book's one-minute runs cannot reach.

    FLOPs are ``dsv3.accounting.flops_per_token(training=True)`` per token; time is those FLOPs at ``utilization``
    of the H200's measured bf16 matmul rate (``roofline.H200_MEASURED``), an assumption, not a measurement."""
    from ..accounting import count_parameters, flops_per_token
    from .roofline import H200_MEASURED

    config = recipe_config()
    counts = count_parameters(config)
    flops = flops_per_token(config, seq_len=seq_len, training=True)["total"] * tokens
    seconds = flops / (H200_MEASURED.bf16 * utilization)
    return {
        "config": config,
        "total": counts["total"],
        "activated": counts["activated"],
        "mtp": counts["mtp"],
        "tokens": tokens,
        "batch_tokens": batch_size * seq_len,
        "steps": round(tokens / (batch_size * seq_len)),
        "flops": flops,
        "utilization": utilization,
        "h200_days": seconds / 86400,
    }
