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
