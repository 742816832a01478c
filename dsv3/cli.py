"""Command line: ``python -m dsv3 {info,train,sample,generate} ...`` (``python -m dsv3 --help`` lists them).

Every subcommand lives here, at the top of the package's imports (it calls ``dsv3.train``, ``dsv3.generate``,
``dsv3.checkpoint`` and ``dsv3.rundir``; none of them imports this module). Every expected error -- a bad flag
value, a config or checkpoint that cannot be used, a locked or unwritable run directory -- ends the command with one
line ``error: ...`` on stderr and exit status 2, never a traceback; a diverged training run exits with 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

import torch

PRESETS = ("deepseek_v3", "tiny")


# ---------------------------------------------------------------------- shared argument types
class _Help(argparse.HelpFormatter):
    """Help that shows every flag's default (unless its text already speaks of it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            not action.option_strings
            or "default" in text
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)".strip()


def default_threads() -> int:
    """CPU threads for sampling and generation when --threads is not given: half the cores, at most 8.

    Decoding a small model is a stream of tiny ops; on a busy machine torch's default (every core) makes them wait
    on each other (a 2-core machine with one other busy process ran ``generate`` 100x slower)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def _int_at_least(lo: int, kind: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lo:
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}")
        return value

    parse.__name__ = kind  # argparse names the type in its messages
    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")
MAX_THREADS = 1024  # torch.set_num_threads(100000) crashes the process (segmentation fault)


def thread_count(text: str) -> int:
    value = positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_THREADS}, got {text!r}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def unit_interval(text: str) -> float:
    value = finite_float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def utf8_text(flag: str, text: str) -> str:
    """``text`` from the command line, refused when it is not valid UTF-8 (Python keeps such bytes as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{flag} is not valid UTF-8 text") from None
    return text


def config_from_arg(name: str):
    """A ModelConfig from a preset name or a path to a config.json / checkpoint directory."""
    from .config import ModelConfig

    if name in PRESETS:
        return getattr(ModelConfig, name)()
    return ModelConfig.from_hf(name)


def _set_threads(n: int | None) -> None:
    if n is not None:
        torch.set_num_threads(n)


def _device(name: str | None) -> torch.device:
    from .train import resolve_device

    return resolve_device("auto" if name is None else name, what="--device")


# ---------------------------------------------------------------------- info
def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:,.2f}{unit}"
    return f"{n:,.0f}"


def _fmt_bytes(b: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= div:
            return f"{b / div:,.1f} {unit}"
    return f"{b:,.0f} B"


def info_tables(config, seq_lens=(1, 4096, 32768, 131072)) -> str:
    """The parameter and KV-cache tables that ``python -m dsv3 info`` prints."""
    from .accounting import count_parameters, flops_per_token, kv_cache_bytes

    counts = count_parameters(config)
    lines = ["Parameters", f"  {'component':<26}{'count':>14}"]
    for name, n in counts["breakdown"].items():
        lines.append(f"  {name:<26}{_fmt_count(n):>14}")
    for key in ("total", "activated", "activated_with_embedding", "mtp", "total_with_mtp"):
        lines.append(f"  {key:<26}{_fmt_count(counts[key]):>14}")
    fl = flops_per_token(config, seq_len=4096)
    lines.append(f"  forward FLOPs per token at 4K context: {_fmt_count(fl['total'])}")
    groups = 8 if config.num_attention_heads % 8 == 0 else config.num_attention_heads // 2 or 1
    lines += [
        "",
        "KV cache (bf16, batch 1, main-model layers)",
        f"  {'tokens':>8}" + "".join(f"{a:>14}" for a in ("MLA", "MHA", f"GQA-{groups}", "MQA")),
    ]
    for T in seq_lens:
        row = [
            kv_cache_bytes(config, T, attention="mla"),
            kv_cache_bytes(config, T, attention="mha"),
            kv_cache_bytes(config, T, attention="gqa", groups=groups),
            kv_cache_bytes(config, T, attention="mqa"),
        ]
        lines.append(f"  {T:>8}" + "".join(f"{_fmt_bytes(b):>14}" for b in row))
    per_token = kv_cache_bytes(config, 1, dtype=torch.bfloat16)
    lines.append(
        f"  MLA: {per_token:,} bytes per token "
        f"({config.kv_lora_rank} + {config.qk_rope_head_dim} values x {config.num_hidden_layers} layers x 2)"
    )
    return "\n".join(lines)


def _cmd_info(args) -> int:
    print(info_tables(config_from_arg(args.config)))
    return 0


# ---------------------------------------------------------------------- train
def _parse_domains(text: str) -> tuple[str, ...] | dict[str, float]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not any("=" in p for p in parts):
        return tuple(parts)
    weights = {}
    for p in parts:
        name, _, w = p.partition("=")
        if name.strip() in weights:
            raise ValueError(f"--domains names {name.strip()!r} twice")
        try:
            weights[name.strip()] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"--domains: weight of {name!r} is not a number: {w!r}") from None
    return weights


def _add_train(sub) -> None:
    from . import balance as bal
    from .train import DTYPES, TrainConfig

    p = sub.add_parser(
        "train",
        help="train a model on the bundled corpus (resumable)",
        formatter_class=_Help,
        description="Train DeepSeek-V3 (tiny by default) with a progress bar; checkpoints go to --out "
        "and --resume continues from the latest one. One run at a time per --out.",
    )
    p.add_argument(
        "--config",
        default=None,
        help="tiny, deepseek_v3, or a config.json / checkpoint dir (default: tiny, or the resumed run's)",
    )
    p.add_argument("--out", required=True, help="run directory for checkpoints")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    d = TrainConfig()
    flags = [
        ("--steps", "steps", positive_int),
        ("--batch-size", "batch_size", positive_int),
        ("--seq-len", "seq_len", positive_int),
        ("--grad-accum", "grad_accum", positive_int),
        ("--lr", "lr", finite_float),
        ("--min-lr-ratio", "min_lr_ratio", finite_float),
        ("--warmup-steps", "warmup_steps", non_negative_int),
        ("--weight-decay", "weight_decay", finite_float),
        ("--grad-clip", "grad_clip", finite_float),
        ("--bias-update-speed", "bias_update_speed", finite_float),
        ("--bias-update-until", "bias_update_until", finite_float),
        ("--seq-aux-alpha", "seq_aux_alpha", finite_float),
        ("--aux-alpha", "aux_alpha", finite_float),
        ("--mtp-weight", "mtp_weight", finite_float),
        ("--mtp-weight-final", "mtp_weight_final", finite_float),
        ("--mtp-weight-switch", "mtp_weight_switch", finite_float),
        ("--capacity-factor", "capacity_factor", finite_float),
        ("--eval-every", "eval_every", non_negative_int),
        ("--eval-batches", "eval_batches", positive_int),
        ("--save-every", "save_every", non_negative_int),
        ("--keep-checkpoints", "keep_checkpoints", positive_int),
        ("--seed", "seed", non_negative_int),
        ("--data-dir", "data_dir", str),
        ("--device", "device", str),
    ]
    for flag, name, typ in flags:
        p.add_argument(
            flag,
            dest=name,
            type=typ,
            default=None,
            help=f"TrainConfig.{name} (default {getattr(d, name)!r}, or the resumed run's)",
        )
    p.add_argument(
        "--gamma", dest="bias_update_speed", type=finite_float, default=None, help="alias of --bias-update-speed"
    )
    p.add_argument("--balance", choices=bal.BALANCE_MODES, default=None, help=f"default {d.balance!r}")
    p.add_argument("--dtype", choices=DTYPES, default=None, help=f"default {d.dtype!r}")
    p.add_argument("--fp8", action="store_true", default=None, help="the paper's FP8 recipe (Sec. 3.3)")
    p.add_argument(
        "--domains",
        default=None,
        help="comma-separated domains, optionally weighted: shakespeare=2,arithmetic=1,code=1 "
        f"(default {','.join(d.domains)})",
    )
    p.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        help=f"torch CPU threads (default: torch's choice, {torch.get_num_threads()} here)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("distributed (start with torchrun --nproc-per-node N -m dsv3 train ...)")
    g.add_argument(
        "--expert-parallel",
        type=positive_int,
        default=None,
        help="ranks that share the routed experts (default: world size / --data-parallel)",
    )
    g.add_argument(
        "--data-parallel",
        type=positive_int,
        default=None,
        help="replicas of the experts; the dense part is sharded (FSDP2) over every rank "
        "(default: world size / --expert-parallel); with --pipeline-parallel: copies of the whole pipeline",
    )
    g.add_argument(
        "--ranks-per-node",
        type=positive_int,
        default=None,
        help="expert-parallel ranks per node: one node holds whole router groups "
        "(default: the processes torchrun started on this machine)",
    )
    g.add_argument(
        "--pipeline-parallel",
        type=positive_int,
        default=None,
        help="ranks of one pipeline: the blocks cut into stages, trained with --schedule; with --expert-parallel E "
        "the E ranks at each pipeline position share their stages' experts, and the world is D x E pipelines "
        "(--data-parallel D, default: what the world leaves)",
    )
    g.add_argument(
        "--schedule",
        choices=("1f1b", "dualpipev"),
        default=None,
        help="pipeline schedule (default 1f1b): 1f1b (one stage per rank) or dualpipev (DeepSeek's DualPipe "
        "folded into a V: two stages per rank, backward split into input and weight gradients)",
    )
    g.add_argument(
        "--microbatches",
        type=positive_int,
        default=None,
        help="pipeline micro-batches per step's micro-batch (default: the number of stages, also the least); "
        "must divide a pipeline's rows, --batch-size / --grad-accum / (data x expert parallel)",
    )
    g.add_argument(
        "--dist-timeout",
        type=positive_float,
        default=None,
        help="seconds a collective may wait before the run fails (a dead rank; default 120)",
    )
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from pathlib import Path

    from .config import ModelConfig
    from .rundir import find_checkpoint, read_state
    from .train import TrainConfig, TrainingDivergedError, train

    _set_threads(args.threads)
    if args.device is not None:
        _device(args.device)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.domains is not None:
        given["domains"] = _parse_domains(args.domains)
    given["out_dir"] = args.out
    if args.no_progress:
        given["progress"] = False
    ckpt = find_checkpoint(args.out) if args.resume and Path(args.out).is_dir() else None
    if ckpt is not None:  # the saved settings, with the flags given now on top
        saved = dict(read_state(ckpt)["train_config"])
        saved.pop("progress", None)
        cfg = TrainConfig.from_dict({**saved, **given})
        model_config = config_from_arg(args.config) if args.config else ModelConfig.from_hf(ckpt)
    else:
        cfg = TrainConfig(**given)
        model_config = config_from_arg(args.config or "tiny")
    distributed = any(v is not None for v in (args.expert_parallel, args.data_parallel, args.pipeline_parallel))
    if not distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            f"torchrun started {os.environ['WORLD_SIZE']} processes: say how to split the work with "
            f"--expert-parallel and/or --data-parallel, or --pipeline-parallel"
        )
    if args.pipeline_parallel is None and (args.microbatches is not None or args.schedule is not None):
        raise ValueError("--schedule and --microbatches describe a pipeline: give --pipeline-parallel too")
    try:
        if distributed:
            result = _train_distributed(args, model_config, cfg)
        else:
            result = train(model_config, cfg, resume=args.resume)
    except TrainingDivergedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if distributed and int(os.environ["RANK"]) != 0:  # rank 0 speaks for the run
        return 0
    h = result.history[-1] if result.history else {}
    print(
        f"steps {h.get('step', 0)}/{cfg.steps}  tokens {h.get('tokens', 0):,}  "
        f"throughput {result.tokens_per_s:,.0f} tokens/s  loss {h.get('main_loss', float('nan')):.3f}  "
        f"MaxVio {h.get('max_vio', float('nan')):.3f}"
    )
    if result.last("val_loss") is not None:
        print(f"validation: loss {result.last('val_loss'):.3f}  MaxVio (global) {result.last('val_max_vio'):.3f}")
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
    return 0


def _train_distributed(args, model_config, cfg):
    """One rank of ``torchrun ... -m dsv3 train --expert-parallel E [--data-parallel D] [--ranks-per-node R]`` or
    ``... --pipeline-parallel P [--schedule 1f1b|dualpipev] [--microbatches M]``."""
    import torch.distributed as dist

    from .parallel.topology import DEFAULT_TIMEOUT_S
    from .parallel.training import train_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    ep, dp, pp = args.expert_parallel, args.data_parallel, args.pipeline_parallel
    if pp is not None:
        layout = dict(
            pipeline_parallel=pp,
            data_parallel=dp,
            expert_parallel=ep,
            ranks_per_node=args.ranks_per_node,
            schedule=args.schedule or "1f1b",
            microbatches=args.microbatches,
        )
    else:
        if ep is None:
            if world % dp:
                raise ValueError(f"world size {world} is not a multiple of --data-parallel {dp}")
            ep = world // dp
        layout = dict(expert_parallel=ep, data_parallel=dp, ranks_per_node=args.ranks_per_node)
    try:
        return train_distributed(
            model_config,
            cfg,
            timeout_s=args.dist_timeout or DEFAULT_TIMEOUT_S,
            resume=args.resume,
            **layout,
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------- sample and generate
def _add_decoding_flags(p, temperature: float) -> None:
    p.add_argument("--temperature", type=non_negative_float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=unit_interval, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    p.add_argument(
        "--threads",
        type=thread_count,
        default=default_threads(),
        help="torch CPU threads (default: half the cores, at most 8: torch's default of every core "
        "slows decoding badly on a busy machine)",
    )


def _add_sample(sub) -> None:
    s = sub.add_parser(
        "sample",
        help="sample text from a trained checkpoint",
        formatter_class=_Help,
        description="Greedy (--temperature 0) or sampled continuation of a prompt.",
    )
    s.add_argument("--checkpoint", required=True, help="a run directory (its latest checkpoint) or a model directory")
    s.add_argument("--prompt", default="\n", help="prompt text (bundled tokenizer; default: a newline)")
    s.add_argument("--max-new-tokens", type=positive_int, default=200, help="tokens to generate")
    s.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed")
    _add_decoding_flags(s, temperature=0.8)
    s.set_defaults(func=_cmd_sample)


def _load_for_decoding(args):
    from .checkpoint import load_pretrained
    from .rundir import model_dir

    _set_threads(args.threads)
    device = _device(args.device)
    path = model_dir(args.checkpoint)  # a training run directory names its latest checkpoint
    return path, load_pretrained(path, device=device)


def _cmd_sample(args) -> int:
    from .data import load_tokenizer
    from .generate import generate

    prompt = utf8_text("--prompt", args.prompt)
    path, model = _load_for_decoding(args)
    tokenizer = load_tokenizer()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"{path}: the model's vocab_size={model.config.vocab_size} is smaller than the bundled "
            f"tokenizer's {tokenizer.vocab_size}"
        )
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("--prompt encodes to no tokens")
    room = model.config.max_position_embeddings - len(ids)
    if room <= 0:
        raise ValueError(
            f"--prompt has {len(ids)} tokens, the model's context is {model.config.max_position_embeddings}"
        )
    gen = generate(
        model,
        ids,
        min(args.max_new_tokens, room),
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    print(prompt + tokenizer.decode(gen.sequences()[0]))
    return 0


def _add_generate(sub) -> None:
    from .layers.mla import CACHE_KINDS

    p = sub.add_parser(
        "generate",
        help="generate text from a checkpoint (optionally speculative with MTP)",
        formatter_class=_Help,
        description="Stream tokens from a checkpoint in the released layout, then print the generation stats.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="directory with config.json and model.safetensors, or a training run directory",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (encoded with the bundled tokenizer)")
    src.add_argument("--prompt-ids", help="prompt as token ids separated by spaces or commas")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate")
    p.add_argument("--seed", type=non_negative_int, default=None, help="sampling seed (default: random)")
    p.add_argument("--speculative", action="store_true", help="draft with the MTP modules and verify")
    p.add_argument(
        "--num-draft",
        type=positive_int,
        default=1,
        help="tokens drafted per round (with --speculative; at most --max-new-tokens are drafted)",
    )
    p.add_argument(
        "--cache",
        choices=CACHE_KINDS,
        default="latent",
        help="latent = absorbed MLA over c_KV + k^R; naive = decompressed K/V",
    )
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-sequence token")
    _add_decoding_flags(p, temperature=0.0)
    p.set_defaults(func=_cmd_generate)


def _prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--prompt-ids must be integers separated by spaces, got {text!r}") from None
    negative = [t for t in ids if t < 0]
    if negative:
        raise ValueError(f"--prompt-ids holds token id {negative[0]}; token ids are >= 0")
    if not ids:
        raise ValueError("--prompt-ids holds no token id")
    return ids


def _cmd_generate(args) -> int:
    from .data import load_tokenizer
    from .generate import generate

    prompt = utf8_text("--prompt", args.prompt) if args.prompt is not None else None
    ids = _prompt_ids(args.prompt_ids) if args.prompt_ids is not None else None
    _, model = _load_for_decoding(args)
    tokenizer = None
    try:
        tok = load_tokenizer()
        if len(tok) == model.config.vocab_size:
            tokenizer = tok
    except (FileNotFoundError, ValueError):
        pass
    if prompt is not None:
        if tokenizer is None:
            raise ValueError(
                f"the checkpoint's vocab_size={model.config.vocab_size} does not match the bundled "
                f"tokenizer; pass the prompt as --prompt-ids"
            )
        ids = tokenizer.encode(prompt)
        if not ids:
            raise ValueError("--prompt encodes to no tokens")
    outside = [t for t in ids if t >= model.config.vocab_size]
    if outside:
        raise ValueError(
            f"--prompt-ids holds token id {outside[0]}, outside the vocabulary [0, {model.config.vocab_size})"
        )

    emitted: list[int] = []
    shown = [""]

    def stream(row: int, new: list[int]) -> None:
        emitted.extend(new)
        if tokenizer is None:
            sys.stdout.write("".join(f" {t}" for t in new))
        else:
            text = tokenizer.decode(emitted)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[len(shown[0]) :])
                shown[0] = text
        sys.stdout.flush()

    if tokenizer is not None:
        sys.stdout.write(prompt if prompt is not None else tokenizer.decode(ids))
    else:
        sys.stdout.write(" ".join(str(t) for t in ids))
    stop = None if args.no_stop else [model.config.eos_token_id]
    gen = generate(
        model,
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_tokens=stop,
        cache_kind=args.cache,
        speculative=args.speculative,
        num_draft=args.num_draft,
        callback=stream,
    )
    if tokenizer is not None and shown[0] != tokenizer.decode(emitted):
        sys.stdout.write(tokenizer.decode(emitted)[len(shown[0]) :])
    sys.stdout.write("\n")
    print(gen.stats)
    return 0


# ---------------------------------------------------------------------- the parser
class UsageError(ValueError):
    """A command line argparse cannot parse: reported like every other expected error (one line, exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m dsv3", description="DeepSeek-V3 in PyTorch + Triton")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameter and KV-cache tables for a config", formatter_class=_Help)
    info.add_argument(
        "--config",
        default="deepseek_v3",
        help=f"a preset ({', '.join(PRESETS)}) or a config.json / checkpoint directory",
    )
    info.set_defaults(func=_cmd_info)
    _add_train(sub)
    _add_sample(sub)
    _add_generate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args) or 0
    except (ValueError, OSError) as e:  # CheckpointError and RunDirectoryError are ValueErrors
        message = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror or e}"
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
