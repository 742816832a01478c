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
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from .atomic import atomic_directory, atomic_save_file, atomic_write_text, remove_stale_temporaries
from .config import ModelConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FP8_BLOCK = 128
EXPERT_PARAM = re.compile(r"^(layers|mtp)\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)$")
# released copies under each MTP layer of tensors the model shares with the main model
MTP_SHARED = {"embed_tokens.weight": "embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
# weights the release keeps in high precision when the rest is FP8
NEVER_FP8 = re.compile(
    r"(embed_tokens|lm_head|shared_head\.head|norm|layernorm|mlp\.gate\.weight|"
    r"e_score_correction_bias|eh_proj)"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: the message names the file and the tensor."""


# dtypes a model can be loaded or saved in (the model computes in floating point; FP8 is save_pretrained(fp8=True))
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_dtype(dtype, what: str) -> None:
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise ValueError(f"{what} must be None or one of {', '.join(map(str, WEIGHT_DTYPES))}, got {dtype!r}")


def _check_path(path, what: str) -> Path:
    if not isinstance(path, (str, Path)) or not str(path):
        raise ValueError(f"{what} must be a directory path, got {path!r}")
    return Path(path)


# ---------------------------------------------------------------------- names
def hf_names(name: str, config: ModelConfig, n_experts: int | None = None) -> list[str]:
    """The released tensor name(s) for one of our state-dict entries (stacked experts -> one name per expert)."""
    L = config.num_hidden_layers
    m = EXPERT_PARAM.match(name)
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
        if layer >= L and rest in MTP_SHARED:
            return None
        e = re.match(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", rest)
        if e:
            return f"{prefix}.mlp.experts.{e.group(2)}", int(e.group(1))
        return f"{prefix}.{rest}", None
    if hf_name.startswith("model."):
        return hf_name[len("model.") :], None
    return hf_name, None


# ---------------------------------------------------------------------- FP8 blocks
def _fp8_ops():
    from .kernels import fp8

    return fp8


def hf_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (released name, tensor) for every tensor of ``model``: experts split, MTP copies of shared tensors
    added."""
    config: ModelConfig = model.config
    L = config.num_hidden_layers
    state = model.state_dict()
    for name, t in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the embedding itself (transformers writes no lm_head for tied embeddings either)
        if (
            dtype is not None
            and t.is_floating_point()
            and not name.endswith(("gate.weight", "e_score_correction_bias"))
        ):
            t = t.to(dtype)
        names = hf_names(name, config, t.shape[0] if EXPERT_PARAM.match(name) else None)
        if len(names) == 1:
            yield names[0], t
        else:
            for e, n in enumerate(names):
                yield n, t[e].clone()  # its own storage: safetensors refuses tensors that share memory
    for k in range(config.num_nextn_predict_layers):
        for released, ours in MTP_SHARED.items():
            t = state[ours] if dtype is None else state[ours].to(dtype)
            yield f"model.layers.{L + k}.{released}", t.clone()


def _is_model_file(name: str) -> bool:
    """Files that ``save_pretrained`` owns in a checkpoint directory (everything else there is carried over)."""
    return name == "config.json" or name == INDEX_NAME or (name.startswith("model") and name.endswith(".safetensors"))


def save_pretrained(
    model: torch.nn.Module,
    path: str | Path,
    max_shard_bytes: int | None = None,
    fp8: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` in the released layout: config.json + model.safetensors, or shards of at most
    ``max_shard_bytes`` with an index. ``fp8=True`` stores the projection weights as e4m3 with 128x128 block scales
    (``weight_scale_inv``), like the release.

    The checkpoint is written into a new directory beside ``path`` and swapped in whole (``dsv3.atomic``), so a
    reader of ``path`` sees the old model or the new one, never a mix, and an interrupted save leaves the old one.
    Other files already in ``path`` (a tokenizer, a README, a trainer state) are carried over. A weight that is not
    finite (NaN or Inf) is refused before anything is written.
    """
    path = _check_path(path, "save_pretrained: path")
    if not isinstance(getattr(model, "config", None), ModelConfig):
        raise ValueError(f"save_pretrained needs a dsv3.DeepSeekV3 model (with a .config), got {type(model).__name__}")
    _check_dtype(dtype, "save_pretrained: dtype")
    if max_shard_bytes is not None and (
        isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0
    ):
        raise ValueError(
            f"save_pretrained: max_shard_bytes must be a positive integer (bytes) or None, got {max_shard_bytes!r}"
        )
    config: ModelConfig = model.config
    tensors: dict[str, torch.Tensor] = {}
    for name, t in hf_state_dict(model, dtype):
        t = t.detach().cpu()
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(
                f"{path}: tensor {name} holds {bad} non-finite values (NaN or Inf); refusing to "
                f"save a model that cannot be loaded back"
            )
        if fp8 and t.dim() == 2 and name.endswith(".weight") and not NEVER_FP8.search(name):
            q, scale_inv = _fp8_ops().weight_quant(t.float(), FP8_BLOCK)
            tensors[name] = q
            tensors[name + "_scale_inv"] = scale_inv
        else:
            tensors[name] = t.contiguous()
    shards = _split_shards(tensors, max_shard_bytes)
    out_config = config.to_hf()
    if fp8:
        out_config["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        }
    else:
        out_config.pop("quantization_config", None)
    if dtype is not None:
        out_config["torch_dtype"] = str(dtype).replace("torch.", "")
    metadata = {"format": "pt"}
    remove_stale_temporaries(path.parent, path.name)  # what a killed save of this directory left beside it
    with atomic_directory(path, keep=lambda name: not _is_model_file(name)) as tmp:
        if len(shards) == 1:
            atomic_save_file(shards[0], tmp / SINGLE_NAME, metadata)
        else:
            n = len(shards)
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{n:05d}.safetensors"
                atomic_save_file(shard, tmp / fname, metadata)
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            atomic_write_text(
                tmp / INDEX_NAME,
                json.dumps(
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2
                ),
            )
        atomic_write_text(tmp / "config.json", json.dumps(out_config, indent=2) + "\n")
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
    """The safetensors files of a checkpoint directory and, when sharded, the index's name -> file map.

    Every file the index names must be a plain file name inside ``path`` (no ``..``, no absolute path)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: weight_map must be a non-empty object of tensor name -> file name")
        for key, fname in weight_map.items():
            if not isinstance(fname, str) or not fname or Path(fname).name != fname or fname in (".", ".."):
                raise CheckpointError(
                    f"{index}: tensor {key} is mapped to {fname!r}, which is not a file name inside "
                    f"the checkpoint directory"
                )
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: lists shard {f.name}, which does not exist")
        return files, weight_map
    single = path / SINGLE_NAME
    if single.is_file():
        return [single], None
    pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    hint = (
        f" (found {', '.join(pickles)}: pickle files are never loaded, convert them to safetensors)" if pickles else ""
    )
    raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")


# dtypes a ``weight_scale_inv`` may scale: the release's e4m3 and the other FP8 format torch has
FP8_WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _check_finite(t: torch.Tensor, file: Path, key: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{file}: tensor {key} holds {bad} non-finite values (NaN or Inf)")


def _read_scaled(f, file: Path, key: str, keys: set[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One tensor of an open safetensors file as stored, with its ``weight_scale_inv`` (or None), both checked: an
    FP8 weight needs a positive, finite scale, a scale needs an FP8 weight, no value is NaN or Inf."""
    try:
        tensor = f.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{file}: tensor {key} cannot be read ({e}); is the file truncated?") from None
    scale_key = key + "_scale_inv"
    if scale_key not in keys:
        if tensor.dtype in FP8_WEIGHT_DTYPES:
            raise CheckpointError(f"{file}: FP8 tensor {key} has no {scale_key} in the same file")
        _check_finite(tensor, file, key)
        return tensor, None
    if tensor.dtype not in FP8_WEIGHT_DTYPES:
        raise CheckpointError(
            f"{file}: tensor {key} has a {scale_key} but dtype {tensor.dtype}; block scales are "
            f"only defined for FP8 weights ({', '.join(str(d) for d in FP8_WEIGHT_DTYPES)})"
        )
    scale = f.get_tensor(scale_key)
    if not scale.is_floating_point():
        raise CheckpointError(f"{file}: {scale_key} has dtype {scale.dtype}, expected a float scale")
    _check_finite(scale, file, scale_key)
    if not bool((scale > 0).all()):
        raise CheckpointError(
            f"{file}: {scale_key} holds {int((scale <= 0).sum())} scales <= 0; block scales "
            f"are positive (a zero scale erases its block, a negative one flips its sign)"
        )
    return tensor, scale


def _read_tensor(f, file: Path, key: str, keys: set[str]) -> torch.Tensor:
    """One tensor of an open safetensors file, dequantized when it carries a ``weight_scale_inv``, checked finite."""
    tensor, scale = _read_scaled(f, file, key, keys)
    if scale is not None:
        tensor = _dequant(tensor, scale, file, key)
        _check_finite(tensor, file, key)  # NaN codes of the FP8 weight, or a product that overflows
    return tensor


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    strict: bool = True,
    keep_fp8: bool = False,
):
    """A ``DeepSeekV3`` from a directory in the released layout (FP8 weights are dequantized on load, unless
    ``keep_fp8=True``: then the e4m3 weights and their ``weight_scale_inv`` stay as they are, in ``dsv3.fp8``
    modules that run ``act_quant`` + ``fp8_gemm``; inference only, and never ``.to(dtype)`` such a model).

    ``dtype`` defaults to the config's ``torch_dtype`` (bfloat16 for the release); routers stay fp32. Tensors are
    read one at a time from memory-mapped shards straight into the allocated model. Every tensor is checked: name,
    shape, FP8 scales, finiteness; any problem stops the load with a ``CheckpointError`` naming the file and tensor.
    A checkpoint whose config declares MTP modules but whose files hold none of their tensors (what transformers'
    ``save_pretrained`` writes) loads as the main model without MTP, with one warning. ``strict=False`` skips
    tensors the model has no place for (and scales without a weight).
    """
    from safetensors import safe_open

    from .model import DeepSeekV3

    path = _check_path(path, "load_pretrained: path")
    _check_dtype(dtype, "load_pretrained: dtype")
    device = _check_device(device)
    config = ModelConfig.from_hf(path)
    files, weight_map = checkpoint_files(path)
    if config.num_nextn_predict_layers and not _holds_mtp(files, weight_map, config):
        warnings.warn(
            f"{path}: config.json declares {config.num_nextn_predict_layers} MTP module(s) "
            f"(num_nextn_predict_layers) but the checkpoint holds no MTP tensors (as transformers' "
            f"save_pretrained writes it); loading the main model without MTP",
            stacklevel=2,
        )
        config = config.replace(num_nextn_predict_layers=0)
    dtype = dtype or getattr(torch, config.torch_dtype)
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
    if config.tie_word_embeddings:
        params.pop("lm_head.weight")  # the embedding; a copy in the file must equal it
    filled: dict[str, set] = {name: set() for name in params}
    shared_copies = []
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise CheckpointError(f"{file}: cannot be read as safetensors ({e})") from None
        with handle as f:
            keys = set(f.keys())
            if weight_map is not None:
                listed = {k for k, v in weight_map.items() if v == file.name}
                unlisted = sorted(keys - listed - {k for k in keys if k.endswith("_scale_inv")})
                if unlisted and strict:
                    raise CheckpointError(f"{file}: tensor {unlisted[0]} is not listed in {INDEX_NAME}")
                absent = sorted(listed - keys)
                if absent and strict:
                    raise CheckpointError(f"{INDEX_NAME} maps tensor {absent[0]} to {file}, which does not hold it")
            orphans = sorted(k for k in keys if k.endswith("_scale_inv") and k[: -len("_scale_inv")] not in keys)
            if orphans and strict:
                raise CheckpointError(
                    f"{file}: scale {orphans[0]} has no weight {orphans[0][: -len('_scale_inv')]} in the same file"
                )
            for key in sorted(keys):
                if key.endswith("_scale_inv"):
                    continue
                target = our_name(key, config)
                if target is None:
                    shared_copies.append((file, key, _read_tensor(f, file, key, keys)))
                    continue
                name, expert = target
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    shared_copies.append((file, key, _read_tensor(f, file, key, keys)))
                    continue
                if name not in params:
                    if strict:
                        raise CheckpointError(
                            f"{file}: unexpected tensor {key} (the config has "
                            f"{config.num_hidden_layers} layers, "
                            f"{config.num_nextn_predict_layers} MTP modules, "
                            f"{config.n_routed_experts} routed experts)"
                        )
                    continue
                dest = params[name]
                if expert is not None:
                    if expert >= dest.shape[0]:
                        raise CheckpointError(
                            f"{file}: unexpected tensor {key} (expert {expert} of "
                            f"n_routed_experts={config.n_routed_experts})"
                        )
                    dest = dest[expert]
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(dest.shape):
                    raise CheckpointError(
                        f"{file}: tensor {key} has shape {shape}, the config expects {tuple(dest.shape)}"
                    )
                if dest.dtype == torch.float8_e4m3fn:  # keep_fp8: the e4m3 bits and their scale go in as they are
                    tensor, scale = _read_scaled(f, file, key, keys)
                    _check_finite(tensor.float(), file, key)  # e4m3 has NaN codes (and no Inf)
                    scale_dest = params[name + "_scale_inv"]
                    with torch.no_grad():
                        (scale_dest if expert is None else scale_dest[expert]).copy_(scale)
                    filled[name + "_scale_inv"].add(expert)
                else:
                    tensor = _read_tensor(f, file, key, keys)  # checked, and dequantized when it is FP8
                if dest.is_floating_point() and not tensor.is_floating_point():
                    raise CheckpointError(
                        f"{file}: tensor {key} has dtype {tensor.dtype}; a floating-point weight "
                        f"is expected (converting it would change its values)"
                    )
                with torch.no_grad():
                    dest.copy_(tensor)
                if dest.dtype != tensor.dtype and dest.is_floating_point() and not bool(torch.isfinite(dest).all()):
                    raise CheckpointError(
                        f"{file}: tensor {key} holds values too large for {dest.dtype} (they "
                        f"overflow to Inf); load it with a wider dtype= such as torch.float32"
                    )
                filled[name].add(expert)
    for name, got in filled.items():
        need = set(range(params[name].shape[0])) if EXPERT_PARAM.match(name.removesuffix("_scale_inv")) else {None}
        missing = need - got
        if missing:
            first = hf_names(name, config)[min(missing)] if EXPERT_PARAM.match(name) else hf_names(name, config)[0]
            raise CheckpointError(f"{path}: tensor {first} is missing from the checkpoint")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
        params["lm_head.weight"] = model.lm_head.weight
    for file, key, tensor in shared_copies:
        ours = "embed_tokens.weight" if key.endswith("embed_tokens.weight") else "lm_head.weight"
        if tuple(tensor.shape) != tuple(params[ours].shape):
            raise CheckpointError(
                f"{file}: tensor {key} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(params[ours].shape)} (a copy of the shared {ours})"
            )
        if key == "lm_head.weight" and not torch.equal(tensor.to(params[ours].dtype), params[ours].detach()):
            raise CheckpointError(
                f"{file}: config.json ties the word embeddings (tie_word_embeddings=true), but "
                f"tensor lm_head.weight differs from model.embed_tokens.weight"
            )
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
        except Exception:  # noqa: S112 -- the load names the unreadable file
            continue
        names |= {target[0] for k in keys if k + "_scale_inv" in keys and (target := our_name(k, config)) is not None}
    keep_fp8_storage(model, names, device)


def _check_device(device) -> torch.device:
    """The device to load onto: a real one that is present (``meta`` holds no weights)."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"load_pretrained: device {device!r} is not a device (cpu, cuda, cuda:N)") from None
    if dev.type == "meta":
        raise ValueError("load_pretrained: device 'meta' holds no weights; load onto cpu or cuda")
    if dev.type == "cuda" and (
        not torch.cuda.is_available() or (dev.index is not None and dev.index >= torch.cuda.device_count())
    ):
        raise ValueError(
            f"load_pretrained: device {device!r} is not available (CUDA devices here: "
            f"{torch.cuda.device_count() if torch.cuda.is_available() else 0})"
        )
    return dev


def _holds_mtp(files: list[Path], weight_map: dict[str, str] | None, config: ModelConfig) -> bool:
    """Whether any tensor of the checkpoint belongs to an MTP module (a layer index >= num_hidden_layers)."""
    from safetensors import safe_open

    prefixes = tuple(f"model.layers.{config.num_hidden_layers + k}." for k in range(config.num_nextn_predict_layers))
    if weight_map is not None:
        return any(k.startswith(prefixes) for k in weight_map)
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                if any(k.startswith(prefixes) for k in f.keys()):
                    return True
        except Exception as e:
            raise CheckpointError(f"{file}: cannot be read as safetensors ({e})") from None
    return False


def _dequant(w: torch.Tensor, scale_inv: torch.Tensor, file: Path, key: str) -> torch.Tensor:
    if w.dim() != 2:
        raise CheckpointError(f"{file}: FP8 tensor {key} has shape {tuple(w.shape)}; block scales need a 2-D weight")
    rows, cols = w.shape
    expect = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
    if tuple(scale_inv.shape) != expect:
        raise CheckpointError(
            f"{file}: {key}_scale_inv has shape {tuple(scale_inv.shape)}, expected {expect} "
            f"for a {rows}x{cols} weight in {FP8_BLOCK}x{FP8_BLOCK} blocks"
        )
    return _fp8_ops().weight_dequant(w, scale_inv, FP8_BLOCK, dtype=torch.float32)
