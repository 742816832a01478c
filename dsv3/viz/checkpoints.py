"""Tables and figures of Chapter 8 ("Loading the real weights"): the released checkpoint's tensors, FP8 block
scales, and the memory the 671B model needs.

``release_tensors(config)`` lists every tensor of a checkpoint in the released layout (name, shape, dtype) from the
config alone: the model is built on the ``meta`` device (no memory), its state dict is renamed with
``dsv3.checkpoint.hf_names`` and split by the same FP8 rule ``save_pretrained`` applies. For the V3 config it gives
the release's 91,991 tensors and 688,574,839,360 bytes; ``tests/test_viz_checkpoints.py`` checks it tensor by
tensor against a checkpoint written by ``save_pretrained``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go
import torch

from ..accounting import count_parameters, kv_cache_bytes
from ..checkpoint import EXPERT_PARAM, FP8_BLOCK, INDEX_NAME, MTP_SHARED, NEVER_FP8, SINGLE_NAME, hf_names
from ..config import ModelConfig
from .display import COLORS, figure

# safetensors dtype names and their sizes in bytes
DTYPE_BYTES = {"F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "BOOL": 1}
_TORCH_TO_ST = {
    torch.float8_e4m3fn: "F8_E4M3",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
}


@dataclass(frozen=True)
class ReleasedTensor:
    """One tensor of a checkpoint in the released layout."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors name: "F8_E4M3", "BF16", "F32"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    @property
    def role(self) -> str:
        """What the tensor is: "fp8 weight", "block scales", "MTP copy", "correction bias", or "high precision"."""
        if self.name.endswith("_scale_inv"):
            return "block scales"
        if self.dtype == "F8_E4M3":
            return "fp8 weight"
        if self.name.endswith("e_score_correction_bias"):
            return "correction bias"
        if any(self.name.endswith(k) for k in MTP_SHARED) and ".layers." in self.name:
            return "MTP copy"
        return "high precision"


def is_fp8_weight(name: str, shape: Sequence[int]) -> bool:
    """Whether the release stores this tensor in FP8: every 2-D ``.weight`` except the embedding, the heads, the
    norms, the router and the MTP's ``eh_proj`` (the rule ``dsv3.save_pretrained(fp8=True)`` applies)."""
    return len(shape) == 2 and name.endswith(".weight") and not NEVER_FP8.search(name)


def release_tensors(config: ModelConfig, fp8: bool = True, high: str = "BF16") -> list[ReleasedTensor]:
    """Every tensor a checkpoint of ``config`` holds in the released layout, in state-dict order.

    ``fp8``: projection weights as ``F8_E4M3`` plus an ``F32`` ``weight_scale_inv`` of shape
    (ceil(M/128), ceil(N/128)); ``high``: the dtype of everything else (``"BF16"`` in the release; the correction
    biases are always ``F32``). Built from a model on the meta device, so the 671B config costs no memory.
    """
    from ..model import DeepSeekV3

    with torch.device("meta"):
        model = DeepSeekV3(config)
    out: list[ReleasedTensor] = []

    def add(name: str, shape: tuple[int, ...]) -> None:
        if name.endswith("e_score_correction_bias"):
            out.append(ReleasedTensor(name, shape, "F32"))
        elif fp8 and is_fp8_weight(name, shape):
            out.append(ReleasedTensor(name, shape, "F8_E4M3"))
            blocks = (-(-shape[0] // FP8_BLOCK), -(-shape[1] // FP8_BLOCK))
            out.append(ReleasedTensor(name + "_scale_inv", blocks, "F32"))
        else:
            out.append(ReleasedTensor(name, shape, high))

    state = model.state_dict()
    for name, t in state.items():
        shape = tuple(t.shape)
        if EXPERT_PARAM.match(name):
            for n in hf_names(name, config, shape[0]):
                add(n, shape[1:])
        else:
            for n in hf_names(name, config):
                add(n, shape)
    L = config.num_hidden_layers
    for k in range(config.num_nextn_predict_layers):
        for released, ours in MTP_SHARED.items():
            add(f"model.layers.{L + k}.{released}", tuple(state[ours].shape))
    return out


def summarize(tensors: Sequence[ReleasedTensor]) -> dict:
    """Counts and bytes of a tensor list: ``tensors``, ``numel``, ``bytes``, and ``by_role``/``by_dtype`` dicts of
    ``{"tensors", "numel", "bytes"}``."""

    def empty():
        return {"tensors": 0, "numel": 0, "bytes": 0}

    out = {
        "tensors": len(tensors),
        "numel": sum(t.numel for t in tensors),
        "bytes": sum(t.nbytes for t in tensors),
        "by_role": {},
        "by_dtype": {},
    }
    for t in tensors:
        for key, group in (("by_role", t.role), ("by_dtype", t.dtype)):
            row = out[key].setdefault(group, empty())
            row["tensors"] += 1
            row["numel"] += t.numel
            row["bytes"] += t.nbytes
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reading a checkpoint directory: headers only
# ---------------------------------------------------------------------------------------------------------------


def read_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file, parsed by hand: 8 bytes (little-endian u64) give its length, then the
    header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` within the data that
    follows. Reading it loads no tensor data (and never unpickles anything)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def cut_tensors(path: str | Path) -> list[str]:
    """The tensors of a safetensors file whose bytes run past the end of the file (a truncated download)."""
    path = Path(path)
    header = read_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    available = path.stat().st_size - 8 - n
    return sorted(name for name, info in header.items() if info["data_offsets"][1] > available)


def checkpoint_tensors(path: str | Path) -> dict[str, tuple[ReleasedTensor, str]]:
    """name -> (tensor description, file name) for every tensor of a checkpoint directory, from headers only."""
    path = Path(path)
    index = path / INDEX_NAME
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [SINGLE_NAME]
    out = {}
    for file in files:
        for name, info in read_header(path / file).items():
            out[name] = (ReleasedTensor(name, tuple(info["shape"]), info["dtype"]), file)
    return out


def _layer_key(name: str) -> tuple:
    """Sort key: layer, then the released order of parts, experts by number."""
    parts = name.split(".")
    return tuple(int(p) if p.isdigit() else p for p in parts)


_BLOCK_PARTS = ("self_attn.", "mlp.", "input_layernorm.", "post_attention_layernorm.")


def tensor_table(path: str | Path, prefix: str, experts: int = 2, block_parts: bool = True) -> str:
    """Markdown table of the tensors under ``prefix`` (e.g. ``"model.layers.1."``) in a checkpoint directory;
    per-expert tensors are shown for the first ``experts`` experts and the last one, the rest folded into one row.
    ``block_parts=False`` folds the ordinary transformer-block tensors (attention, FFN, block norms) into one row,
    leaving what is special to the layer (the MTP module's own tensors)."""
    tensors = {k: v for k, v in checkpoint_tensors(path).items() if k.startswith(prefix)}
    lines = ["| tensor | shape | dtype | bytes | file |", "|---|---|---|---:|---|"]
    if not block_parts:
        block = [k for k in tensors if k[len(prefix) :].startswith(_BLOCK_PARTS)]
        lines.append(
            f"| ... {len(block)} tensors of the transformer block (`self_attn`, `mlp`, norms) | | | "
            f"{sum(tensors[k][0].nbytes for k in block):,} | |"
        )
        tensors = {k: v for k, v in tensors.items() if k not in block}
    expert_ids = sorted(
        {int(k[len(prefix) :].split(".")[2]) for k in tensors if k[len(prefix) :].startswith("mlp.experts.")}
    )
    keep = set(expert_ids[:experts] + expert_ids[-1:])
    folded = None
    for name in sorted(tensors, key=_layer_key):
        t, file = tensors[name]
        rest = name[len(prefix) :]
        if rest.startswith("mlp.experts."):
            e = int(rest.split(".")[2])
            if e not in keep:
                if folded is None:
                    folded = [0, 0, len(lines)]
                folded[0] += 1
                folded[1] += t.nbytes
                continue
        lines.append(f"| `{name}` | {tuple(t.shape)} | {t.dtype} | {t.nbytes:,} | {file} |")
    if folded is not None:
        n_hidden = len(expert_ids) - len(keep)
        lines.insert(
            folded[2],
            f"| ... {folded[0]} tensors of experts {experts}..{expert_ids[-2]} "
            f"({n_hidden} experts) | | | {folded[1]:,} | |",
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# FP8 block scales
# ---------------------------------------------------------------------------------------------------------------


def block_edges(n: int, block: int = FP8_BLOCK) -> list[int]:
    """Block boundaries along a dimension of length n: 0, 128, 256, ..., n (the last block may be partial)."""
    return list(range(0, n, block)) + [n]


def block_rounding_error(
    w: torch.Tensor, w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK
) -> torch.Tensor:
    """(Mb, Nb) relative RMS error of each block: ||W - dequant(W_fp8)|| / ||W|| over the block's elements."""
    from ..kernels.fp8 import weight_dequant_torch

    err = (w.float() - weight_dequant_torch(w_fp8, scale_inv, block, torch.float32)) ** 2  # (M, N)
    ref = w.float() ** 2  # (M, N)
    M, N = w.shape
    Mb, Nb = scale_inv.shape
    pad = (0, Nb * block - N, 0, Mb * block - M)
    err = torch.nn.functional.pad(err, pad).view(Mb, block, Nb, block).sum(dim=(1, 3))  # (Mb, Nb)
    ref = torch.nn.functional.pad(ref, pad).view(Mb, block, Nb, block).sum(dim=(1, 3))  # (Mb, Nb)
    return (err / ref.clamp_min(1e-30)).sqrt()


def block_grid_figure(
    grids: dict[str, tuple[torch.Tensor, tuple[int, int]]],
    title: str,
    colorbar: str,
    fmt: str = ".3g",
    block: int = FP8_BLOCK,
) -> go.Figure:
    """Heatmaps of per-block values (``{label: (values (Mb, Nb), weight shape (M, N))}``), one per label behind a
    dropdown. Cells are drawn at their true extent in the weight (edge blocks narrower), rows downward as in a
    matrix; hover names the block's row and column ranges."""
    fig = figure(
        title=title,
        height=460,
        margin=dict(l=70, r=20, t=90, b=50),
        xaxis=dict(title="input channel (column)"),
        yaxis=dict(title="output channel (row)", autorange="reversed"),
    )
    labels = list(grids)
    for i, label in enumerate(labels):
        values, (M, N) = grids[label]
        if tuple(values.shape) != (-(-M // block), -(-N // block)):
            raise ValueError(
                f"block_grid_figure: {label} has {tuple(values.shape)} blocks, a {M}x{N} weight "
                f"has {(-(-M // block), -(-N // block))}"
            )
        x, y = block_edges(N, block), block_edges(M, block)
        z = values.float().tolist()
        hover = [
            [
                f"rows {y[r]}..{y[r + 1] - 1}, cols {x[c]}..{x[c + 1] - 1} "
                f"({(y[r + 1] - y[r]) * (x[c + 1] - x[c]):,} elements)"
                for c in range(len(x) - 1)
            ]
            for r in range(len(y) - 1)
        ]
        small = len(x) * len(y) <= 200
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=x,
                y=y,
                customdata=hover,
                name=label,
                visible=i == 0,
                colorscale="Viridis",
                colorbar=dict(title=colorbar, tickformat=fmt),
                text=[[format(v, fmt) for v in row] for row in z] if small else None,
                texttemplate="%{text}" if small else None,
                xgap=1,
                ygap=1,
                hovertemplate=f"%{{customdata}}<br>{colorbar}: %{{z:{fmt}}}<extra>{label}</extra>",
            )
        )
    if len(labels) > 1:
        buttons = [
            dict(
                label=label,
                method="update",
                args=[
                    {"visible": [j == i for j in range(len(labels))]},
                    {"xaxis.range": [0, grids[label][1][1]], "yaxis.range": [grids[label][1][0], 0]},
                ],
            )
            for i, label in enumerate(labels)
        ]
        fig.update_layout(
            updatemenus=[
                dict(
                    buttons=buttons, direction="down", x=0.0, y=1.02, xanchor="left", yanchor="bottom", showactive=True
                )
            ]
        )
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Memory of the 671B model
# ---------------------------------------------------------------------------------------------------------------


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


_SUMMARIES: dict[str, dict] = {}


def release_summary(config: ModelConfig) -> dict:
    """``summarize(release_tensors(config))``, computed once per config (the V3 inventory takes seconds)."""
    key = json.dumps(config.to_hf(), sort_keys=True, default=str)
    if key not in _SUMMARIES:
        _SUMMARIES[key] = summarize(release_tensors(config))
    return _SUMMARIES[key]


def loaded_bytes(config: ModelConfig, dtype: torch.dtype = torch.bfloat16, include_mtp: bool = True) -> int:
    """Bytes of the model ``dsv3.load_pretrained(path, dtype=dtype)`` allocates: every parameter in ``dtype``
    (FP8 weights are dequantized on load) except the routers, which stay fp32, plus the fp32 correction biases."""
    c = count_parameters(config)
    n_moe = config.num_moe_layers + (
        sum(config.is_moe_layer(config.num_hidden_layers + k) for k in range(config.num_nextn_predict_layers))
        if include_mtp
        else 0
    )
    router = n_moe * config.n_routed_experts * config.hidden_size
    params = c["total_with_mtp"] if include_mtp else c["total"]
    element = torch.empty((), dtype=dtype).element_size()
    return (params - router) * element + router * 4 + n_moe * config.n_routed_experts * 4


def memory_table(config: ModelConfig, context: int = 131072) -> str:
    """Markdown: the released checkpoint's bytes by role and dtype, the bf16 model load_pretrained builds, the
    KV cache for one sequence of ``context`` tokens."""
    s = release_summary(config)
    role_names = {
        "fp8 weight": "FP8 e4m3 projection weights (1 byte)",
        "block scales": "weight_scale_inv, fp32",
        "high precision": "embedding, head, norms, router, eh_proj (bf16)",
        "MTP copy": "MTP copies of embedding + head (bf16)",
        "correction bias": "e_score_correction_bias, fp32",
    }
    lines = ["| what | tensors | numbers | bytes |", "|---|---:|---:|---:|"]
    for role in ("fp8 weight", "block scales", "high precision", "MTP copy", "correction bias"):
        r = s["by_role"].get(role)
        if r:
            lines.append(f"| {role_names[role]} | {r['tensors']:,} | {r['numel'] / 1e9:,.3f}B | {_gb(r['bytes'])} |")
    lines.append(
        f"| **released checkpoint** | **{s['tensors']:,}** | **{s['numel'] / 1e9:,.3f}B** | **{_gb(s['bytes'])}** |"
    )
    lines.append(
        f"| `load_pretrained(dtype=torch.bfloat16)`: dequantized model, MTP included | | | "
        f"{_gb(loaded_bytes(config))} |"
    )
    kv = kv_cache_bytes(config, context)
    lines.append(f"| MLA KV cache, one sequence of {context:,} tokens (bf16) | | | {_gb(kv)} |")
    return "\n".join(lines)


def memory_per_gpu(config: ModelConfig, gpus: int, sequences: int, context: int = 131072) -> dict[str, float]:
    """Bytes per GPU when the model is spread evenly over ``gpus`` GPUs and serves ``sequences`` sequences of
    ``context`` tokens: ``fp8`` (the released weights), ``bf16`` (dequantized), ``kv`` (MLA cache)."""
    fp8 = release_summary(config)["bytes"]
    return {
        "fp8": fp8 / gpus,
        "bf16": loaded_bytes(config) / gpus,
        "kv": kv_cache_bytes(config, context, batch=sequences) / gpus if sequences else 0.0,
    }


def memory_figure(
    config: ModelConfig,
    gpu_counts: Sequence[int] = (8, 16, 32, 64),
    sequences: Sequence[int] = (1, 8, 32, 128),
    context: int = 131072,
    gpu_memory: float = 80e9,
) -> go.Figure:
    """Memory per GPU for the weights (FP8 as released, or dequantized to bf16) plus the KV cache of ``sequences``
    sequences at ``context`` tokens, for each GPU count; a slider picks the number of sequences."""
    fp8_bytes = release_summary(config)["bytes"]
    bf16_bytes = loaded_bytes(config)
    x = [f"{g} GPUs" for g in gpu_counts]
    fig = figure(
        title=dict(text=f"Memory per GPU at {context // 1024}K context", y=0.98, yanchor="top"),
        height=460,
        barmode="group",
        yaxis=dict(title="GB per GPU"),
        xaxis=dict(title="weights spread evenly over"),
        margin=dict(l=60, r=20, t=100, b=110),
    )
    for label, nbytes, color, group in (
        ("weights, FP8 as released", fp8_bytes, COLORS["blue"], "fp8"),
        ("weights, dequantized to bf16", bf16_bytes, COLORS["orange"], "bf16"),
    ):
        fig.add_trace(
            go.Bar(
                x=x,
                y=[nbytes / g / 1e9 for g in gpu_counts],
                name=label,
                marker_color=color,
                offsetgroup=group,
                hovertemplate="%{x}: %{y:,.1f} GB<extra>" + label + "</extra>",
            )
        )
        fig.add_trace(
            go.Bar(
                x=x,
                y=[kv_cache_bytes(config, context, batch=sequences[0]) / g / 1e9 for g in gpu_counts],
                base=[nbytes / g / 1e9 for g in gpu_counts],
                name=f"KV cache ({group} weights)",
                marker_color=COLORS["red"],
                opacity=0.7 if group == "fp8" else 0.45,
                offsetgroup=group,
                showlegend=group == "fp8",
                hovertemplate="%{x}: +%{y:,.1f} GB<extra>KV cache</extra>",
            )
        )
    fig.add_hline(
        y=gpu_memory / 1e9,
        line=dict(color=COLORS["slate"], dash="dash"),
        annotation_text=f"{gpu_memory / 1e9:.0f} GB per GPU",
        annotation_position="top left",
    )
    steps = []
    for n in sequences:
        kv = [kv_cache_bytes(config, context, batch=n) / g / 1e9 for g in gpu_counts]
        steps.append(dict(label=str(n), method="restyle", args=[{"y": [kv, kv]}, [1, 3]]))
    fig.update_layout(
        sliders=[
            dict(
                active=0,
                steps=steps,
                y=-0.2,
                pad=dict(t=10),
                currentvalue=dict(prefix=f"sequences of {context // 1024}K tokens: "),
            )
        ],
        legend=dict(orientation="h", y=1.02, yanchor="bottom", x=0.0, xanchor="left"),
    )
    return fig


def st_dtype(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float8_e4m3fn`` -> ``"F8_E4M3"``)."""
    return _TORCH_TO_ST[dtype]
