"""Checkpoints in the released Hugging Face layout (taught in Chapter 8).

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Names are the release's: ``model.layers.{i}.mlp.experts.{e}.gate_proj.weight`` per
expert, the MTP module k at ``model.layers.{num_hidden_layers + k - 1}`` (with copies of the embedding and head under
it), FP8 e4m3 weights with one fp32 ``weight_scale_inv`` per 128x128 block. Loading is shard by shard through
memory maps into a model allocated once, so peak memory stays near the model's size; any missing, unexpected or
mis-shaped tensor stops the load with one error naming the file and the tensor. Safetensors only.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import ModelConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FP8_BLOCK = 128
_EXPERT_PARAM = re.compile(r"^(layers|mtp)\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)$")
# released copies under each MTP layer of tensors the model shares with the main model
_MTP_SHARED = {"embed_tokens.weight": "embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
# weights the release keeps in high precision when the rest is FP8
_NEVER_FP8 = re.compile(r"(embed_tokens|lm_head|shared_head\.head|norm|layernorm|mlp\.gate\.weight|"
                        r"e_score_correction_bias|eh_proj)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: the message names the file and the tensor."""


# ---------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` through a temporary file and an atomic rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------- names
def hf_names(name: str, config: ModelConfig, n_experts: int | None = None) -> list[str]:
    """The released tensor name(s) for one of our state-dict entries (stacked experts -> one name per expert)."""
    L = config.num_hidden_layers
    m = _EXPERT_PARAM.match(name)
    if m:
        kind, idx, proj = m.groups()
        layer = int(idx) if kind == "layers" else L + int(idx)
        n = config.n_routed_experts if n_experts is None else n_experts
        return [f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" for e in range(n)]
    if name.startswith("layers."):
        return ["model." + name]
    if name.startswith("mtp."):
        _, idx, rest = name.split(".", 2)
        return [f"model.layers.{L + int(idx)}.{rest}"]
    if name in ("embed_tokens.weight", "norm.weight"):
        return ["model." + name]
    return [name]


def our_name(hf_name: str, config: ModelConfig) -> tuple[str, int | None] | None:
    """Our state-dict name (and the expert index for per-expert tensors) for a released tensor name; None for the
    MTP copies of shared tensors."""
    L = config.num_hidden_layers
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", hf_name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        prefix = f"layers.{layer}" if layer < L else f"mtp.{layer - L}"
        if layer >= L and rest in _MTP_SHARED:
            return None
        e = re.match(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", rest)
        if e:
            return f"{prefix}.mlp.experts.{e.group(2)}", int(e.group(1))
        return f"{prefix}.{rest}", None
    if hf_name.startswith("model."):
        return hf_name[len("model."):], None
    return hf_name, None


# ---------------------------------------------------------------------- FP8 blocks
def _fp8_ops():
    from .kernels import fp8

    return fp8


def hf_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (released name, tensor) for every tensor of ``model``, experts split, MTP copies of shared tensors added."""
    config: ModelConfig = model.config
    L = config.num_hidden_layers
    state = model.state_dict()
    for name, t in state.items():
        if dtype is not None and t.is_floating_point() and not name.endswith(("gate.weight",
                                                                                "e_score_correction_bias")):
            t = t.to(dtype)
        names = hf_names(name, config, t.shape[0] if _EXPERT_PARAM.match(name) else None)
        if len(names) == 1:
            yield names[0], t
        else:
            for e, n in enumerate(names):
                yield n, t[e].clone()  # its own storage: safetensors refuses tensors that share memory
    for k in range(config.num_nextn_predict_layers):
        for released, ours in _MTP_SHARED.items():
            t = state[ours] if dtype is None else state[ours].to(dtype)
            yield f"model.layers.{L + k}.{released}", t.clone()


def save_pretrained(model: torch.nn.Module, path: str | Path, max_shard_bytes: int | None = None,
                    fp8: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` in the released layout: config.json + model.safetensors, or shards of at most
    ``max_shard_bytes`` with an index. ``fp8=True`` stores the projection weights as e4m3 with 128x128 block scales
    (``weight_scale_inv``), like the release. Every file is written atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config: ModelConfig = model.config
    tensors: dict[str, torch.Tensor] = {}
    for name, t in hf_state_dict(model, dtype):
        t = t.detach().cpu()
        if fp8 and t.dim() == 2 and name.endswith(".weight") and not _NEVER_FP8.search(name):
            q, scale_inv = _fp8_ops().weight_quant(t.float(), FP8_BLOCK)
            tensors[name] = q
            tensors[name + "_scale_inv"] = scale_inv
        else:
            tensors[name] = t.contiguous()
    shards = _split_shards(tensors, max_shard_bytes)
    out_config = config.to_hf()
    if fp8:
        out_config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    else:
        out_config.pop("quantization_config", None)
    if dtype is not None:
        out_config["torch_dtype"] = str(dtype).replace("torch.", "")
    metadata = {"format": "pt"}
    old = set(path.glob("model*.safetensors")) | {path / INDEX_NAME}
    if len(shards) == 1:
        atomic_save_file(shards[0], path / SINGLE_NAME, metadata)
        written = {path / SINGLE_NAME}
    else:
        n = len(shards)
        weight_map, written = {}, set()
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            atomic_save_file(shard, path / fname, metadata)
            written.add(path / fname)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_text(path / INDEX_NAME, json.dumps({"metadata": {"total_size": total},
                                                         "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        written.add(path / INDEX_NAME)
    for stale in old - written:  # files of a previous checkpoint in this directory that no longer belong
        stale.unlink(missing_ok=True)
    atomic_write_text(path / "config.json", json.dumps(out_config, indent=2) + "\n")
    return path


def _split_shards(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [tensors]
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    return shards


# ---------------------------------------------------------------------- loading
def checkpoint_files(path: str | Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint directory and, when sharded, the index's name -> file map."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: lists shard {f.name}, which does not exist")
        return files, weight_map
    single = path / SINGLE_NAME
    if single.is_file():
        return [single], None
    pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    hint = f" (found {', '.join(pickles)}: pickle files are never loaded, convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, strict: bool = True, keep_fp8: bool = False):
    """A ``DeepSeekV3`` from a directory in the released layout (FP8 weights are dequantized on load).

    ``dtype`` defaults to the config's ``torch_dtype`` (bfloat16 for the release); routers stay fp32. Tensors are
    read one at a time from memory-mapped shards straight into the allocated model. ``keep_fp8=True`` keeps the
    released e4m3 weights and their ``weight_scale_inv`` as they are (``dsv3.fp8.keep_fp8_storage``): their linear
    layers then run ``act_quant`` + ``fp8_gemm`` (inference only; do not ``.to(dtype)`` such a model).
    """
    from safetensors import safe_open

    from .model import DeepSeekV3

    path = Path(path)
    config = ModelConfig.from_hf(path)
    files, weight_map = checkpoint_files(path)
    dtype = dtype or getattr(torch, config.torch_dtype, torch.bfloat16)
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device("meta"):
        model = DeepSeekV3(config)
    model.to(dtype)
    for layer in model.moe_layers():
        layer.gate.float()
    model.to_empty(device=device)
    model.rotary = type(model.rotary)(config).to(device)  # non-persistent buffers are recomputed, not loaded
    if keep_fp8:
        _keep_fp8_storage(model, files, config, device)
    params = dict(model.state_dict(keep_vars=True))
    filled: dict[str, set] = {name: set() for name in params}
    shared_copies = []
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise CheckpointError(f"{file}: cannot be read as safetensors ({e})") from None
        with handle as f:
            keys = list(f.keys())
            if weight_map is not None:
                listed = {k for k, v in weight_map.items() if v == file.name}
                unlisted = sorted(set(keys) - listed - {k for k in keys if k.endswith("_scale_inv")})
                if unlisted and strict:
                    raise CheckpointError(f"{file}: tensor {unlisted[0]} is not listed in {INDEX_NAME}")
            for key in keys:
                if key.endswith("_scale_inv"):
                    continue
                target = our_name(key, config)
                try:
                    tensor = f.get_tensor(key)
                except Exception as e:
                    raise CheckpointError(f"{file}: tensor {key} cannot be read ({e}); is the file truncated?") from None
                scale_inv = None
                if tensor.dtype == torch.float8_e4m3fn:
                    scale_key = key + "_scale_inv"
                    if scale_key not in keys:
                        raise CheckpointError(f"{file}: FP8 tensor {key} has no {scale_key} in the same file")
                    scale_inv = f.get_tensor(scale_key)
                    kept = target is not None and params.get(target[0], tensor).dtype == torch.float8_e4m3fn
                    if not kept:
                        tensor = _dequant(tensor, scale_inv, file, key)
                    else:  # keep_fp8: the e4m3 bits go in as they are, the scale beside them
                        _check_scale(tensor, scale_inv, file, key)
                if target is None:
                    shared_copies.append((file, key, tensor))
                    continue
                name, expert = target
                if name not in params:
                    if strict:
                        raise CheckpointError(f"{file}: unexpected tensor {key} (the config has "
                                              f"{config.num_hidden_layers} layers, "
                                              f"{config.num_nextn_predict_layers} MTP modules, "
                                              f"{config.n_routed_experts} routed experts)")
                    continue
                dest = params[name]
                if expert is not None:
                    if expert >= dest.shape[0]:
                        raise CheckpointError(f"{file}: unexpected tensor {key} (expert {expert} of "
                                              f"n_routed_experts={config.n_routed_experts})")
                    dest = dest[expert]
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise CheckpointError(f"{file}: tensor {key} has shape {tuple(tensor.shape)}, the config "
                                          f"expects {tuple(dest.shape)}")
                with torch.no_grad():
                    dest.copy_(tensor)
                    if dest.dtype == torch.float8_e4m3fn:
                        scale_dest = params[name + "_scale_inv"]
                        (scale_dest if expert is None else scale_dest[expert]).copy_(scale_inv)
                        filled[name + "_scale_inv"].add(expert)
                filled[name].add(expert)
    for name, got in filled.items():
        need = set(range(params[name].shape[0])) if _EXPERT_PARAM.match(name.removesuffix("_scale_inv")) else {None}
        missing = need - got
        if missing:
            first = hf_names(name, config)[min(missing)] if _EXPERT_PARAM.match(name) else hf_names(name, config)[0]
            raise CheckpointError(f"{path}: tensor {first} is missing from the checkpoint")
    for file, key, tensor in shared_copies:
        ours = "embed_tokens.weight" if key.endswith("embed_tokens.weight") else "lm_head.weight"
        if tuple(tensor.shape) != tuple(params[ours].shape):
            raise CheckpointError(f"{file}: tensor {key} has shape {tuple(tensor.shape)}, expected "
                                  f"{tuple(params[ours].shape)} (a copy of the shared {ours})")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def _keep_fp8_storage(model, files: list[Path], config: ModelConfig, device) -> None:
    """keep_fp8: e4m3 storage for every FP8 module whose weight the checkpoint holds in e4m3 (headers only)."""
    from safetensors import safe_open

    from .fp8 import keep_fp8_storage

    names = set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                keys = set(f.keys())
                names |= {target[0] for k in keys if k + "_scale_inv" in keys
                          and (target := our_name(k, config)) is not None}
        except Exception:  # noqa: S112 -- the load below names the unreadable file
            continue
    keep_fp8_storage(model, names, device)


def _check_scale(w: torch.Tensor, scale_inv: torch.Tensor, file: Path, key: str) -> None:
    rows, cols = w.shape
    expect = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
    if tuple(scale_inv.shape) != expect:
        raise CheckpointError(f"{file}: {key}_scale_inv has shape {tuple(scale_inv.shape)}, expected {expect} "
                              f"for a {rows}x{cols} weight in {FP8_BLOCK}x{FP8_BLOCK} blocks")


def _dequant(w: torch.Tensor, scale_inv: torch.Tensor, file: Path, key: str) -> torch.Tensor:
    _check_scale(w, scale_inv, file, key)
    return _fp8_ops().weight_dequant(w, scale_inv, FP8_BLOCK, dtype=torch.float32)
