"""The preface's map of the book: which chapter teaches which paper section with which ``dsv3`` module.

``CHAPTERS`` is the plan of the book (data). ``package_map()`` reads the installed package itself (module files
and the first sentence of each docstring, without importing anything), so the preface's module table lists only
modules that exist and says what their authors say they do. ``chapter_map()`` joins the two into a Sankey figure.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go

from .display import COLORS, figure


@dataclass(frozen=True)
class Chapter:
    file: str  # notebook name under book/
    title: str
    short: str  # label in the chapter map
    sections: tuple[str, ...]  # sections of the DeepSeek-V3 technical report (arXiv 2412.19437)
    modules: tuple[str, ...]  # dsv3 modules it teaches, as listed by package_map() ("layers/mla.py", "kernels/")


CHAPTERS = (
    Chapter(
        "01_overview",
        "The model at a glance",
        "overview",
        ("2 Architecture", "4.2 Hyper-parameters"),
        ("config.py", "model.py", "accounting.py", "layers/block.py"),
    ),
    Chapter(
        "02_mla",
        "Multi-head Latent Attention",
        "MLA",
        ("2.1.1 MLA",),
        ("layers/norm.py", "layers/rope.py", "layers/mla.py"),
    ),
    Chapter("03_moe", "DeepSeekMoE", "MoE", ("2.1.2 DeepSeekMoE",), ("layers/moe.py", "layers/reference.py")),
    Chapter(
        "04_load_balancing",
        "Auxiliary-loss-free load balancing",
        "load balancing",
        ("2.1.2 DeepSeekMoE",),
        ("balance.py", "train.py", "rundir.py", "data.py"),
    ),
    Chapter("05_mtp", "Multi-Token Prediction", "MTP", ("2.2 MTP",), ("layers/mtp.py", "train.py")),
    Chapter(
        "06_speculative",
        "Speculative decoding with MTP",
        "speculative decoding",
        ("2.2 MTP", "5.4.3 MTP evaluation"),
        ("generate.py",),
    ),
    Chapter(
        "07_kernels",
        "Triton kernels",
        "kernels",
        ("3 Infrastructures",),
        ("kernels/", "layers/reference.py", "timing.py"),
    ),
    Chapter(
        "08_checkpoints",
        "Loading the released weights",
        "checkpoints",
        ("3.3 FP8 training",),
        ("checkpoint.py", "atomic.py", "fp8.py"),
    ),
    Chapter(
        "09_parallel",
        "Training across nodes",
        "expert and pipeline parallelism",
        ("2.1.2 DeepSeekMoE", "3.2 Training framework"),
        ("parallel/",),
    ),
    Chapter(
        "10_fp8_training",
        "Training in FP8",
        "FP8 training",
        ("3.3 FP8 training",),
        ("fp8.py",),
    ),
)

# Reading order of the package (STYLE.md): rows of the module table follow it; unknown modules go last.
READING_ORDER = (
    "config.py",
    "layers/norm.py",
    "layers/rope.py",
    "layers/mla.py",
    "layers/moe.py",
    "layers/block.py",
    "layers/mtp.py",
    "layers/reference.py",
    "model.py",
    "accounting.py",
    "balance.py",
    "atomic.py",
    "checkpoint.py",
    "fp8.py",
    "generate.py",
    "train.py",
    "rundir.py",
    "data.py",
    "parallel/",
    "kernels/",
    "timing.py",
    "viz/",
    "cli.py",
    "__main__.py",
)
EXPANDED = ("layers",)  # subpackages listed module by module; the others get one row


def _package_root() -> Path:
    import dsv3

    return Path(dsv3.__file__).parent


def first_sentence(path: Path) -> str:
    """The first sentence of a module's docstring, as Markdown (``code`` -> `code`); "" when it has none."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    if not doc:
        return ""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    # A sentence ends at ". " before a capital letter ("Sec. 2.1" and "Eq. 12" do not end one).
    end = re.search(r"\.\s+(?=[A-Z])", paragraph)
    sentence = paragraph[: end.start() + 1] if end else paragraph
    return sentence.replace("``", "`")


def package_map() -> list[tuple[str, str]]:
    """``(module, first docstring sentence)`` for every module of the installed ``dsv3``, in reading order."""
    root = _package_root()
    rows: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if "__pycache__" in rel.parts or rel.name == "__init__.py" and len(rel.parts) == 1:
            continue
        if len(rel.parts) == 1:
            rows[rel.name] = first_sentence(path)
        elif rel.parts[0] in EXPANDED:
            if rel.name != "__init__.py":
                rows[rel.as_posix()] = first_sentence(path)
        else:
            name = rel.parts[0] + "/"
            if name not in rows:
                init = root / rel.parts[0] / "__init__.py"
                modules = sorted(p.stem for p in (root / rel.parts[0]).glob("*.py") if p.name != "__init__.py")
                summary = first_sentence(init) if init.exists() else ""
                rows[name] = summary or "Modules: " + ", ".join(f"`{m}`" for m in modules) + "."
    rank = {name: i for i, name in enumerate(READING_ORDER)}
    return sorted(rows.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))


def module_table() -> str:
    """The module table of the preface as Markdown: module, what it is (its docstring), chapters teaching it."""
    taught: dict[str, list[str]] = {}
    for ch in CHAPTERS:
        for module in ch.modules:
            taught.setdefault(module, []).append(ch.file[:2])
    lines = ["| module | what it is | chapters |", "| --- | --- | --- |"]
    for name, doc in package_map():
        chapters = ", ".join(taught.get(name, [])) or ("all" if name == "viz/" else "")
        cell = doc.replace("|", r"\|")
        lines.append(f"| `dsv3/{name}` | {cell} | {chapters} |")
    return "\n".join(lines)


def chapter_map() -> go.Figure:
    """Sankey figure: paper section -> chapter -> dsv3 module, for the modules that exist in the installed package."""
    existing = {name for name, _ in package_map()}
    sections = sorted(
        {s for ch in CHAPTERS for s in ch.sections}, key=lambda s: [int(x) for x in s.split()[0].split(".")]
    )
    chapters = [f"ch. {ch.file[:2]} {ch.short}" for ch in CHAPTERS]
    modules = [m for m in READING_ORDER if m in existing and any(m in ch.modules for ch in CHAPTERS)]
    labels = sections + chapters + [f"dsv3/{m}" for m in modules]
    index = {label: i for i, label in enumerate(labels)}
    source, target, colors = [], [], []
    for ch, name in zip(CHAPTERS, chapters):
        for s in ch.sections:
            source.append(index[s]), target.append(index[name])
            colors.append("rgba(59, 130, 246, 0.35)")
        for m in ch.modules:
            if m in existing:
                source.append(index[name]), target.append(index[f"dsv3/{m}"])
                colors.append("rgba(16, 185, 129, 0.35)")
    node_colors = (
        [COLORS["blue"]] * len(sections) + [COLORS["orange"]] * len(chapters) + [COLORS["green"]] * len(modules)
    )
    fig = figure(title="Paper section → chapter → dsv3 module", height=520, margin=dict(l=10, r=10, t=50, b=10))
    fig.add_trace(
        go.Sankey(
            arrangement="fixed",
            node=dict(label=labels, color=node_colors, pad=12, thickness=14, line=dict(width=0)),
            link=dict(source=source, target=target, value=[1] * len(source), color=colors),
            hoverinfo="none",
        )
    )
    return fig
