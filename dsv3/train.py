"""Training: AdamW with warmup + cosine, the MTP loss weight schedule, load balancing, and checkpoints with exact
resume (paper Sec. 4.2 for the recipe, Sec. 2.1.2 and 2.2 for balancing and MTP; used in Chapters 4 and 5).

    result = train(ModelConfig.tiny(), TrainConfig(steps=300, out_dir="runs/tiny"))
    result.model, result.history   # the trained model; one JSON-ready dict per optimizer step

One optimizer step draws ``grad_accum`` micro-batches from ``dsv3.data`` (``batch_size`` sequences in all), adds
the balance term of ``TrainConfig.balance`` to L_main + lambda * L_MTP, clips the gradient norm, steps AdamW, and
then -- outside the gradient -- moves every router's correction bias by gamma toward balance using the loads of the
whole step (``dsv3.balance``). On a GPU the forward runs under bf16 autocast with fp32 master weights and the
kernels' "auto" backend picks the Triton kernels; on a CPU everything is fp32 and torch.

A checkpoint is a directory ``out_dir/checkpoint-NNNNNN`` holding the model in the released layout
(``config.json`` + ``model.safetensors``, router biases included: ``dsv3.load_pretrained`` reads it), and
``trainer.safetensors`` (AdamW moments and step, RNG states) + ``trainer.json`` (step, configs, data position,
history); ``dsv3.rundir`` writes and reads them (atomically, with ``out_dir/latest`` moved last, so a crash or a
diverged run always leaves the last good checkpoint) and locks ``out_dir`` for the one run that writes into it.
Resuming restores every piece of state: N steps + resume + N steps equals 2N steps bit for bit (weights, biases,
optimizer, history).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import balance as bal
from . import fp8, rundir
from .accounting import count_parameters
from .checkpoint import load_pretrained
from .config import ModelConfig
from .model import DeepSeekV3
from .rundir import CHECKPOINT_PREFIX, RunLock, find_checkpoint

DTYPES = ("auto", "float32", "bfloat16")
# TrainConfig fields a resumed run may change; every other field must equal the checkpoint's
RESUMABLE_CHANGES = (
    "steps",
    "eval_every",
    "eval_batches",
    "save_every",
    "keep_checkpoints",
    "progress",
    "out_dir",
    "data_dir",
    "device",
)


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient norm stopped being finite; the message names the step and the last good checkpoint."""


# ---------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """Everything a training run needs besides the model's ``ModelConfig``. Paper values (Sec. 4.2) in comments;
    the defaults are the tiny config's, chosen by measurement on 2 CPU cores."""

    steps: int = 400  # optimizer steps
    batch_size: int = 16  # sequences per optimizer step (all micro-batches together)
    seq_len: int = 128  # tokens per sequence (paper: 4K)
    grad_accum: int = 1  # micro-batches per step; batch_size must be divisible by it
    lr: float = 2e-3  # peak learning rate (paper: 2.2e-4 at 671B)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio (paper: 2.2e-5 / 2.2e-4)
    warmup_steps: int = 30  # linear warmup (paper: 2K steps)
    weight_decay: float = 0.1  # AdamW, decoupled (paper: 0.1)
    beta1: float = 0.9  # paper: 0.9
    beta2: float = 0.95  # paper: 0.95
    grad_clip: float = 1.0  # max global gradient norm (paper: 1.0); 0 disables clipping
    balance: str = "bias"  # "bias" (aux-loss-free + sequence-wise loss), "aux" (batch-wise aux loss), "none"
    bias_update_speed: float = 0.01  # gamma (paper: 0.001, too slow to matter in a few hundred steps)
    bias_update_until: float = 1.0  # fraction of the steps during which gamma > 0 (paper: 14.3T / 14.8T tokens)
    seq_aux_alpha: float = 1e-4  # alpha of the sequence-wise balance loss with balance="bias" (paper: 0.0001)
    aux_alpha: float = 1e-2  # alpha of the batch-wise auxiliary loss with balance="aux"
    mtp_weight: float = 0.3  # lambda (paper: 0.3 for the first 10T tokens ...)
    mtp_weight_final: float = 0.1  # ... then 0.1 for the remaining 4.8T
    mtp_weight_switch: float = 10.0 / 14.8  # fraction of the steps after which lambda = mtp_weight_final
    capacity_factor: float | None = None  # None: no token dropping (V3); a number: GShard-style dropping
    domains: Any = ("shakespeare",)  # domain names, or {name: mixing weight} (see dsv3.data.DOMAINS)
    data_dir: str | None = None  # folder with the corpus and tokenizer (default: the bundled data)
    eval_every: int = 100  # validate every this many steps and at the end (0: never)
    eval_batches: int = 8  # validation batches (of batch_size sequences) per evaluation
    save_every: int = 100  # checkpoint every this many steps and at the end (needs out_dir; 0: only at the end)
    keep_checkpoints: int = 1  # how many checkpoint directories to keep in out_dir
    seed: int = 0  # model initialization and data order
    out_dir: str | None = None  # run directory for checkpoints (None: keep nothing on disk)
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"  # autocast: "auto" = bf16 on cuda / fp32 on cpu, "float32", "bfloat16"
    progress: bool = True  # tqdm progress bar (tqdm.auto: a widget in notebooks)
    fp8: bool = False  # the paper's FP8 recipe (Sec. 3.3, dsv3.fp8): attention and expert GEMMs in e4m3
    moment_dtype: str = "auto"  # AdamW moments: "auto" = bfloat16 with fp8 (Sec. 3.3.3), else float32

    def __post_init__(self) -> None:
        if isinstance(self.domains, str):
            self.domains = (self.domains,)
        elif isinstance(self.domains, Mapping):
            self.domains = {str(k): v for k, v in self.domains.items()}
        elif isinstance(self.domains, (list, tuple)):
            self.domains = tuple(self.domains)
        if self.out_dir is not None:
            self.out_dir = str(self.out_dir)
        if self.data_dir is not None:
            self.data_dir = str(self.data_dir)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field whose value cannot drive a training run."""

        def integer(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                kind = "a positive integer" if lo == 1 else "an integer >= 0"
                raise ValueError(f"TrainConfig.{name} must be {kind}, got {v!r}")

        def number(name: str, lo: float, strict: bool = False, hi: float | None = None) -> None:
            v = getattr(self, name)
            ok = (
                isinstance(v, (int, float))
                and not isinstance(v, bool)
                and math.isfinite(v)
                and (v > lo if strict else v >= lo)
                and (hi is None or v <= hi)
            )
            if not ok:
                bound = f"> {lo}" if strict else f">= {lo}"
                bound += f" and <= {hi}" if hi is not None else ""
                raise ValueError(f"TrainConfig.{name} must be a finite number {bound}, got {v!r}")

        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep_checkpoints"):
            integer(name, 1)
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            integer(name, 0)
        if self.seed >= 2**63:
            raise ValueError(f"TrainConfig.seed must be below 2**63 (torch's seed range), got {self.seed!r}")
        for name in ("out_dir", "data_dir"):
            if getattr(self, name) == "":
                raise ValueError(f"TrainConfig.{name} is an empty path; give a directory (or None for the default)")
        if not isinstance(self.progress, bool):
            raise ValueError(f"TrainConfig.progress must be true or false, got {self.progress!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"TrainConfig.batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}"
            )
        number("lr", 0.0, strict=True)
        number("min_lr_ratio", 0.0, hi=1.0)
        number("weight_decay", 0.0)
        number("beta1", 0.0, hi=0.999999)
        number("beta2", 0.0, hi=0.999999)
        number("grad_clip", 0.0)
        if self.balance not in bal.BALANCE_MODES:
            raise ValueError(f"TrainConfig.balance must be one of {bal.BALANCE_MODES}, got {self.balance!r}")
        number("bias_update_speed", 0.0)  # gamma < 0 would push load *toward* the busiest experts
        number("bias_update_until", 0.0, hi=1.0)
        number("seq_aux_alpha", 0.0)
        number("aux_alpha", 0.0)
        number("mtp_weight", 0.0)
        number("mtp_weight_final", 0.0)
        number("mtp_weight_switch", 0.0, hi=1.0)
        if self.capacity_factor is not None:
            number("capacity_factor", 0.0, strict=True)
        if not isinstance(self.fp8, bool):
            raise ValueError(f"TrainConfig.fp8 must be True or False, got {self.fp8!r}")
        if self.moment_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(
                f"TrainConfig.moment_dtype must be 'auto', 'float32' or 'bfloat16', got {self.moment_dtype!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"TrainConfig.device must be a device string such as 'auto' or 'cpu', got {self.device!r}")
        _domain_weights(self.domains)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["domains"] = dict(self.domains) if isinstance(self.domains, Mapping) else list(self.domains)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _domain_weights(domains: Any) -> tuple[tuple[str, ...], dict[str, float] | None]:
    """(domain names, mixing weights or None) from ``TrainConfig.domains``; one error for anything else."""
    from .data import DOMAINS

    if isinstance(domains, Mapping):
        names, weights = tuple(domains), dict(domains)
        for k, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"TrainConfig.domains weight of {k!r} must be a finite number >= 0, got {w!r}")
        if sum(weights.values()) <= 0:
            raise ValueError(f"TrainConfig.domains weights are all zero: {weights}")
    elif isinstance(domains, tuple) and all(isinstance(d, str) for d in domains):
        names, weights = domains, None
    else:
        raise ValueError(f"TrainConfig.domains must be domain names or {{name: weight}}, got {domains!r}")
    if not names:
        raise ValueError(f"TrainConfig.domains is empty; choose from {', '.join(DOMAINS)}")
    for d in names:
        if d not in DOMAINS:
            raise ValueError(f"TrainConfig.domains names unknown domain {d!r}; known domains: {', '.join(DOMAINS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"TrainConfig.domains has duplicates: {list(names)}")
    return names, weights


# ---------------------------------------------------------------------- schedules
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``lr``, then cosine to lr*min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(cfg.steps - cfg.warmup_steps - 1, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def mtp_weight_at(step: int, cfg: TrainConfig) -> float:
    """lambda of step ``step``: ``mtp_weight`` before ``mtp_weight_switch * steps``, ``mtp_weight_final`` after
    (paper Sec. 4.2: 0.3 for the first 10T tokens, 0.1 for the remaining 4.8T)."""
    return cfg.mtp_weight if step < cfg.mtp_weight_switch * cfg.steps else cfg.mtp_weight_final


def bias_update_speed_at(step: int, cfg: TrainConfig) -> float:
    """gamma of step ``step``: ``bias_update_speed`` before ``bias_update_until * steps``, then 0 (paper Sec. 4.2:
    0.001 for the first 14.3T tokens, 0 for the last 500B). Zero unless ``balance == "bias"``."""
    if cfg.balance != "bias":
        return 0.0
    return cfg.bias_update_speed if step < cfg.bias_update_until * cfg.steps else 0.0


# ---------------------------------------------------------------------- pieces a notebook can reuse
def init_model(model_config: ModelConfig, seed: int = 0) -> DeepSeekV3:
    """A freshly initialized model (fp32 master weights), the same for the same seed."""
    torch.manual_seed(seed)
    return DeepSeekV3(model_config).float()


def make_data(cfg: TrainConfig, model_config: ModelConfig | None = None):
    """(corpus, training BatchIterator of micro-batches, validation batches) for a TrainConfig.

    The corpus is tokenized before any model exists, so an empty or too-short corpus fails first."""
    from .data import load_corpus

    names, weights = _domain_weights(cfg.domains)
    corpus = load_corpus(names, directory=cfg.data_dir)
    if model_config is not None and corpus.tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {corpus.tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size={model_config.vocab_size}"
        )
    iterator = corpus.batches(cfg.batch_size // cfg.grad_accum, cfg.seq_len, seed=cfg.seed, weights=weights)
    val = corpus.val_batches(cfg.batch_size, cfg.seq_len, max_batches=cfg.eval_batches) if cfg.eval_every else []
    return corpus, iterator, val


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices, embeddings and stacked experts, none on norms and biases; its moments
    in bf16 (``dsv3.fp8.AdamW``) when ``cfg.moment_dtype`` says so ("auto": with fp8, as the paper does)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay, no_decay)[optimizer_group(p)].append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    moments = cfg.moment_dtype if cfg.moment_dtype != "auto" else ("bfloat16" if cfg.fp8 else "float32")
    if moments == "bfloat16":
        return fp8.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, moment_dtype=torch.bfloat16)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def optimizer_group(p: torch.Tensor) -> int:
    """The group ``make_optimizer`` puts a parameter in: 0 (weight decay) for matrices, embeddings and stacked
    experts, 1 (none) for norms and biases."""
    return 0 if p.dim() >= 2 else 1


def resolve_device(name: str, what: str = "TrainConfig.device") -> torch.device:
    """The device a name asks for ("auto": cuda when available); ``what`` names the setting in the error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{what} {name!r} is not a device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} is {name!r}, but CUDA is not available")
    return device


def _autocast(device: torch.device, dtype: str):
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def moe_layer_names(model: DeepSeekV3) -> list[str]:
    """Names of the MoE layers in the order of ``model.moe_layers()`` (main blocks, then MTP modules)."""
    names = [f"layers.{b.layer_idx}" for b in model.layers if b.is_moe]
    return names + [f"mtp.{m.depth - 1}" for m in model.mtp if m.is_moe]


# ---------------------------------------------------------------------- checkpoints
def _check_compatible(ckpt: Path, state: dict, model_config: ModelConfig, cfg: TrainConfig) -> None:
    """One error naming the first field where the checkpoint's run differs from the requested one."""
    saved_model = ModelConfig.from_hf(ckpt)
    a, b = saved_model.to_hf(), model_config.to_hf()
    for key in sorted(set(a) | set(b)):
        if key not in ("torch_dtype", "quantization_config") and a.get(key) != b.get(key):
            raise ValueError(
                f"{ckpt} holds another run: its model has {key}={a.get(key)!r}, this run asks for "
                f"{key}={b.get(key)!r}; choose another out_dir"
            )
    saved = state["train_config"]
    mine = cfg.to_dict()
    for key in mine:
        if key in RESUMABLE_CHANGES:
            continue
        if saved.get(key, getattr(TrainConfig, key, None)) != mine[key]:  # a field newer than the run: its default
            raise ValueError(
                f"{ckpt} holds another run: it was trained with TrainConfig.{key}={saved.get(key)!r}, "
                f"this run asks for {key}={mine[key]!r}; choose another out_dir"
            )


# ---------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    """What ``train`` returns. ``history`` has one JSON-serializable dict per optimizer step:

    ``step``, ``tokens`` (seen so far), ``loss`` (L_main + lambda * L_MTP), ``main_loss``, ``mtp_loss`` (mean over
    depths), ``balance_loss`` (the term of ``balance``, not in ``loss``), ``lr``, ``mtp_weight`` (lambda),
    ``bias_update_speed`` (gamma used), ``grad_norm`` (before clipping), ``max_vio`` (batch MaxVio averaged over
    the main model's MoE layers), and per MoE layer (rows named by ``moe_layers``): ``max_vio_layers``, ``loads``
    (N_r counts over the step's whole batch), ``biases`` (after the update), ``groups_per_token``, ``dropped``
    (only with a capacity factor). Steps that validated add ``val_loss``, ``val_mtp_loss``, ``val_max_vio``
    (global: loads summed over the validation set), ``val_max_vio_layers`` and ``val_loads``. No wall-clock
    values, so a resumed run's history equals an uninterrupted one's; timing is in ``tokens_per_s``."""

    model: DeepSeekV3
    history: list[dict]
    config: TrainConfig
    model_config: ModelConfig
    moe_layers: list[str]  # names of the rows of every per-layer list in history (main layers, then MTP)
    out_dir: Path | None = None
    checkpoint: Path | None = None  # the last checkpoint written or loaded
    tokens_per_s: float = 0.0  # training throughput of this call (excluding validation and checkpoints)
    elapsed_s: float = 0.0
    stopped_early: bool = False
    tokenizer: Any = None
    parallel: Any = None  # the distributed strategy of this rank (dsv3.parallel), None in one process

    @property
    def val_history(self) -> list[dict]:
        return [h for h in self.history if "val_loss" in h]

    def last(self, key: str):
        """The latest value of ``key`` in the history (e.g. ``"val_loss"``), or None."""
        for h in reversed(self.history):
            if key in h:
                return h[key]
        return None


def train(
    model_config: ModelConfig,
    train_config: TrainConfig | None = None,
    *,
    resume: bool = False,
    callback: Callable[[dict, DeepSeekV3], bool | None] | None = None,
    parallel: Any = None,
) -> TrainResult:
    """Train a DeepSeek-V3 model (see the module docstring).

    Every setting is checked before any compute: the configs, the corpus, the model's context length, and -- when
    ``train_config.out_dir`` holds a checkpoint -- that ``resume=True`` was asked for and the checkpoint belongs
    to the same run. ``callback(entry, model)`` runs after every step (and its checkpoint); returning True stops
    training there (a checkpoint is written first when there is an out_dir). A non-finite loss or gradient norm
    raises ``TrainingDivergedError`` before the optimizer touches the weights; the last good checkpoint stays.
    ``parallel`` (a ``dsv3.parallel.training.Distributed`` or ``dsv3.parallel.pipeline.Pipeline``, given by
    ``train_distributed``) makes this process one rank of a distributed run: it parallelizes the model and reduces
    what a step measures over the ranks; a strategy with ``micro_step`` / ``eval_batch`` methods (a pipeline) runs
    the micro-batches itself in place of ``_micro_step`` / ``_eval_batch``.
    """
    cfg = train_config if train_config is not None else TrainConfig()
    if not isinstance(model_config, ModelConfig):
        raise ValueError(f"model_config must be a dsv3.ModelConfig, got {type(model_config).__name__}")
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"train_config must be a dsv3.TrainConfig, got {type(cfg).__name__}")
    cfg.validate()
    if model_config.n_routed_experts == 0:
        raise ValueError(
            "ModelConfig.n_routed_experts=0: dsv3.train trains DeepSeekMoE models (its history, balancing "
            "and checkpoints are per MoE layer); give the config routed experts"
        )
    if cfg.seq_len > model_config.max_position_embeddings:
        raise ValueError(
            f"TrainConfig.seq_len={cfg.seq_len} exceeds the model's max_position_embeddings="
            f"{model_config.max_position_embeddings}"
        )
    if cfg.seq_len <= model_config.num_nextn_predict_layers:
        raise ValueError(
            f"TrainConfig.seq_len={cfg.seq_len} leaves no positions for "
            f"{model_config.num_nextn_predict_layers} MTP depths; use seq_len > "
            f"{model_config.num_nextn_predict_layers}"
        )
    device = resolve_device(cfg.device)
    _check_fits(model_config, device)

    run_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
    if run_dir is None:
        return _train(model_config, cfg, device, None, resume, callback, parallel)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"TrainConfig.out_dir {str(run_dir)!r} is a file, not a directory")
    # one run per directory; taking it also proves the directory writable before compute (distributed: rank 0,
    # the only writer, holds it)
    lock = RunLock(run_dir) if parallel is None or parallel.rank == 0 else contextlib.nullcontext()
    with lock:
        return _train(model_config, cfg, device, run_dir, resume, callback, parallel)


def _check_fits(model_config: ModelConfig, device: torch.device) -> None:
    """Refuse a model whose fp32 training state (weights, gradients, two AdamW moments: 16 bytes a parameter) exceeds
    the device's whole memory, before allocating it (``--config deepseek_v3`` on a laptop)."""
    need = 16 * count_parameters(model_config)["total_with_mtp"]
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    else:
        try:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not on this platform: let the allocator decide
            return
    if need > have:
        raise ValueError(
            f"the model has {count_parameters(model_config)['total_with_mtp']:,} parameters: training "
            f"it needs about {need / 2**30:,.0f} GiB (fp32 weights, gradients and AdamW moments), "
            f"more than the {have / 2**30:,.0f} GiB of {device}"
        )


def _train(
    model_config: ModelConfig,
    cfg: TrainConfig,
    device: torch.device,
    run_dir: Path | None,
    resume: bool,
    callback,
    parallel: Any = None,
) -> TrainResult:
    ckpt = find_checkpoint(run_dir) if run_dir is not None else None
    if ckpt is not None and not resume:
        raise ValueError(
            f"out_dir {str(run_dir)!r} already holds a training run ({ckpt.name}); resume it "
            f"(resume=True / --resume) or choose another out_dir"
        )
    if resume and ckpt is None:
        raise ValueError(f"nothing to resume: out_dir {cfg.out_dir!r} holds no checkpoint")
    state = tensors = None
    if ckpt is not None:
        state, tensors = rundir.read_checkpoint(ckpt)
        _check_compatible(ckpt, state, model_config, cfg)
        if state["step"] > cfg.steps:
            raise ValueError(f"{ckpt} is at step {state['step']}, beyond TrainConfig.steps={cfg.steps}")

    corpus, batches, val = make_data(cfg, model_config)  # a bad corpus fails here, before any model exists

    # ---- model, optimizer and state
    if ckpt is not None:
        model = load_pretrained(ckpt, dtype=torch.float32)
        step = int(state["step"])
        history = list(state["history"])
        try:
            batches.load_state_dict(state["data"])
        except (ValueError, KeyError, TypeError) as e:
            raise rundir.RunDirectoryError(
                f"{ckpt / rundir.TRAINER_JSON}: entry 'data' (the data position) is damaged: {e}"
            ) from None
    else:
        model = init_model(model_config, cfg.seed)
        step, history = 0, []
    model.to(device).train()
    if cfg.fp8:
        fp8.apply_fp8(model)  # the FP8 GEMMs; master weights stay fp32
    layers = model.moe_layers()
    for layer in layers:
        layer.set_capacity(cfg.capacity_factor)
    if parallel is not None:
        model = parallel.parallelize(model)
    optimizer = make_optimizer(model, cfg)
    if ckpt is not None:
        if parallel is None:
            rundir.load_optimizer(model, optimizer, tensors, state["optimizer"], ckpt)
        else:
            parallel.load_optimizer(model, optimizer, tensors)
        torch.set_rng_state(tensors["rng.torch"])
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    names = moe_layer_names(model)
    n_main = sum(1 for n in names if n.startswith("layers."))
    result = TrainResult(
        model, history, cfg, model_config, names, run_dir, ckpt, tokenizer=corpus.tokenizer, parallel=parallel
    )
    if step >= cfg.steps:
        return result

    params = [p for p in model.parameters() if p.requires_grad]
    # a pipeline runs each micro-batch through its schedule; everything else runs the model here
    micro_step = getattr(parallel, "micro_step", None) or _micro_step
    micro_tokens = (cfg.batch_size // cfg.grad_accum) * cfg.seq_len
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress, desc="train", unit="step", dynamic_ncols=True)
    train_time, t_start = 0.0, time.perf_counter()
    tokens_this_call = 0
    last_saved = step if ckpt is not None else None

    def save(at: int) -> int:
        m, opt = (model, optimizer) if parallel is None else parallel.gather_state(model, optimizer)
        if m is not None:  # in a distributed run, rank 0 writes the gathered one-process state
            result.checkpoint = rundir.save_checkpoint(
                run_dir, at, m, opt, batches.state_dict(), history, cfg.to_dict(), names, cfg.keep_checkpoints
            )
        if parallel is not None:
            parallel.barrier()
            result.checkpoint = run_dir / f"{CHECKPOINT_PREFIX}{at:06d}"
        return at

    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            lr, lam, gamma = lr_at(step, cfg), mtp_weight_at(step, cfg), bias_update_speed_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            # the step's metrics stay on the device and are read back once, before the optimizer step
            loads = torch.zeros(len(layers), model_config.n_routed_experts, dtype=torch.long, device=device)  # (L, N_r)
            groups = torch.zeros(len(layers), device=device)  # (L,) fp32
            dropped = torch.zeros(len(layers), device=device)  # (L,) fp32
            micro = []  # per micro-batch: () total, loss, main_loss, mtp_loss, balance_loss, as fp64 on the device
            for _ in range(cfg.grad_accum):
                batch = next(batches)
                ids, labels = batch.input_ids.to(device), batch.labels.to(device)  # (b, T) each
                if parallel is not None:
                    ids, labels = parallel.local_batch(ids, labels)  # this rank's rows of the global batch
                parts, step_loads, step_groups, step_dropped = micro_step(
                    model, ids, labels, lam, cfg, _autocast(device, cfg.dtype)
                )
                micro.append(parts)
                loads += step_loads
                groups += step_groups / cfg.grad_accum
                dropped += step_dropped / cfg.grad_accum
            if parallel is not None:  # over the ranks: global means, loads of the global batch, the global norm
                micro, loads, groups = parallel.reduce_step(micro, loads, groups)
                grad_norm = parallel.clip_grad_norm_(params, cfg.grad_clip)
            elif cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            vio = bal.max_vio(loads)  # (L,)
            read = _read_once(
                micro=torch.stack(micro),
                grad_norm=grad_norm,
                max_vio=vio[:n_main].mean() if n_main else torch.zeros(()),
                max_vio_layers=vio,
                loads=loads,
                groups_per_token=groups,
                dropped=dropped,
            )
            grad_norm = read["grad_norm"]
            sums = {"loss": 0.0, "main_loss": 0.0, "mtp_loss": 0.0, "balance_loss": 0.0}
            for value, *parts in read["micro"]:
                if not math.isfinite(value):
                    raise TrainingDivergedError(_diverged_message("loss", value, step + 1, run_dir, last_saved))
                for key, v in zip(sums, parts):
                    sums[key] += v / cfg.grad_accum
            if not math.isfinite(grad_norm):
                raise TrainingDivergedError(
                    _diverged_message("gradient norm", grad_norm, step + 1, run_dir, last_saved)
                )
            optimizer.step()
            if gamma > 0:  # aux-loss-free balancing: after the step, outside the gradient, on the step's loads
                bal.update_biases(layers, loads, gamma)
            step += 1
            train_time += time.perf_counter() - t0
            tokens_this_call += micro_tokens * cfg.grad_accum

            entry = {
                "step": step,
                "tokens": step * cfg.batch_size * cfg.seq_len,
                **sums,
                "lr": lr,
                "mtp_weight": lam,
                "bias_update_speed": gamma,
                "grad_norm": grad_norm,
                "max_vio": read["max_vio"],
                "max_vio_layers": read["max_vio_layers"],
                "loads": read["loads"],
                # after the bias update: the step's second read
                "biases": torch.stack([layer.gate.e_score_correction_bias.detach() for layer in layers]).tolist(),
                "groups_per_token": read["groups_per_token"],
            }
            if cfg.capacity_factor is not None:
                entry["dropped"] = read["dropped"]
            if parallel is not None:
                entry.update(parallel.step_stats())
            if val and (step % cfg.eval_every == 0 or step == cfg.steps):
                entry.update(evaluate(model, val, device, cfg.dtype, lam, n_main, parallel))
            history.append(entry)

            if run_dir is not None and (step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0)):
                last_saved = save(step)
            stop = bool(callback(entry, model)) if callback is not None else False  # sees the step after its save
            if stop and run_dir is not None and last_saved != step:
                last_saved = save(step)
            bar.update(1)
            post = {
                "loss": f"{entry['main_loss']:.3f}",
                "maxvio": f"{entry['max_vio']:.2f}",
                "tok/s": f"{tokens_this_call / max(train_time, 1e-9):,.0f}",
            }
            last_val = result.last("val_loss")
            if last_val is not None:
                post["val"] = f"{last_val:.3f}"
            bar.set_postfix(post, refresh=False)
            if stop:
                result.stopped_early = True
                break
    finally:
        bar.close()
    result.tokens_per_s = tokens_this_call / max(train_time, 1e-9)
    result.elapsed_s = time.perf_counter() - t_start
    return result


def _micro_step(model, ids, labels, lam: float, cfg: TrainConfig, autocast) -> tuple:
    """Forward and backward of one micro-batch, its gradient scaled by 1 / grad_accum. Returns, on the device:
    the (5,) fp64 loss parts (total, loss, main, MTP, balance), the (L, N_r) expert loads, the (L,) mean groups
    per token and the (L,) dropped fractions of its MoE layers."""
    with autocast:
        # make_data checked the tokenizer against the vocabulary once: no per-forward id check
        out = model(ids, labels=labels, mtp_weight=lam, check_ids=False)
        routings = out.routing + out.mtp_routing
        balance_term = bal.balance_loss(routings, cfg.balance, cfg.seq_aux_alpha, cfg.aux_alpha).to(out.loss.device)
        total = out.loss + balance_term
    (total / cfg.grad_accum).backward()
    mtp = out.mtp_loss if out.mtp_loss is not None else torch.zeros((), device=out.loss.device)
    parts = torch.stack([t.detach().double() for t in (total, out.loss, out.main_loss, mtp, balance_term)])
    device = out.loss.device
    dropped = torch.stack([torch.as_tensor(r.dropped, dtype=torch.float64, device=device) for r in routings])
    return (
        parts,
        bal.expert_loads(routings),
        bal.mean_groups_per_token(routings, model.config.n_group),
        dropped.float(),
    )


def _read_once(**tensors: torch.Tensor) -> dict:
    """Read device tensors back to the host in one transfer (one synchronization instead of one per value): each
    comes back as ``tolist()`` returns it (a number for a 0-dim tensor, nested lists otherwise, ints for integer
    tensors). Values travel as fp64, which holds fp32/bf16 values and integers below 2**53 exactly."""
    flat = torch.cat(
        [t.detach().reshape(-1).double().to(next(iter(tensors.values())).device) for t in tensors.values()]
    ).tolist()
    out, i = {}, 0
    for name, t in tensors.items():
        values = flat[i : i + t.numel()]
        i += t.numel()
        if not (t.is_floating_point() or t.is_complex()):
            values = [int(v) for v in values]
        for size in reversed(t.shape[1:]):
            values = [values[j : j + size] for j in range(0, len(values), size)]
        out[name] = values[0] if t.dim() == 0 else values
    return out


def _diverged_message(what: str, value: float, step: int, run_dir: Path | None, last_saved: int | None) -> str:
    msg = f"training stopped: the {what} is {value} at step {step}"
    if run_dir is not None and last_saved is not None:
        msg += f"; the last good checkpoint is {run_dir / f'{CHECKPOINT_PREFIX}{last_saved:06d}'} (step {last_saved})"
    elif run_dir is not None:
        msg += "; no checkpoint had been written yet"
    return msg


@torch.no_grad()
def evaluate(
    model: DeepSeekV3,
    batches,
    device: torch.device | str = "cpu",
    dtype: str = "auto",
    mtp_weight: float = 0.3,
    n_main: int | None = None,
    parallel: Any = None,
) -> dict:
    """Validation: mean next-token loss and MTP loss over fixed batches, and the global MaxVio -- loads summed over
    the whole validation set, per MoE layer (``val_max_vio`` averages the ``n_main`` main-model layers).

    ``batches`` come from the corpus the trainer checked against the vocabulary (``make_data``): their ids are not
    checked again, and the results are read back to the host once."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    losses, loads = [], None  # per batch: () main and MTP loss on the device; (L, N_r) loads summed on the device
    eval_batch = getattr(parallel, "eval_batch", None) or _eval_batch
    for b in batches:
        ids, labels = b.input_ids.to(device), b.labels.to(device)
        if parallel is not None:
            ids, labels = parallel.local_batch(ids, labels)
        with _autocast(device, dtype):
            batch_losses, step_loads = eval_batch(model, ids, labels, mtp_weight)  # (2,) fp64, (L, N_r)
        losses.append(batch_losses)
        loads = step_loads if loads is None else loads + step_loads
    model.train(was_training)
    if parallel is not None:  # global means and loads over the ranks
        losses, loads = parallel.reduce_eval(losses, loads)
    vio = bal.max_vio(loads)  # (L,)
    n_main = len(model.moe_layers(include_mtp=False)) if n_main is None else n_main
    read = _read_once(
        losses=torch.stack(losses),
        max_vio=vio[:n_main].mean() if n_main else torch.zeros(()),
        max_vio_layers=vio,
        loads=loads,
    )  # one host synchronization for the whole validation
    main = mtp = 0.0
    for main_b, mtp_b in read["losses"]:  # the same float arithmetic, in the same order, as one read per batch
        main += main_b / len(batches)
        mtp += mtp_b / len(batches)
    return {
        "val_loss": main,
        "val_mtp_loss": mtp,
        "val_max_vio": read["max_vio"],
        "val_max_vio_layers": read["max_vio_layers"],
        "val_loads": read["loads"],
    }


def _eval_batch(model, ids, labels, mtp_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One validation batch: (main loss, MTP loss) as (2,) fp64 and the (L, N_r) expert loads, on the device."""
    # make_data checked the tokenizer against the vocabulary once: no per-forward id check
    out = model(ids, labels=labels, mtp_weight=mtp_weight, check_ids=False)
    mtp = out.mtp_loss if out.mtp_loss is not None else torch.zeros((), device=out.main_loss.device)
    return torch.stack([out.main_loss.double(), mtp.double()]), bal.expert_loads(out.routing + out.mtp_routing)
