"""Command line: ``python -m dsv3 {info,train,sample,generate} ...`` (``python -m dsv3 --help`` lists them).

Each command lives beside the code it drives: ``info`` here, ``train``/``sample`` in ``dsv3.train``, ``generate`` in
``dsv3.generate``; each of those modules exposes ``add_cli(subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

PRESETS = ("deepseek_v3", "tiny")


def config_from_arg(name: str):
    """A ModelConfig from a preset name or a path to a config.json / checkpoint directory."""
    from .config import ModelConfig

    if name in PRESETS:
        return getattr(ModelConfig, name)()
    return ModelConfig.from_hf(name)


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:,.2f}{unit}"
    return f"{n:,.0f}"


def info_tables(config, seq_lens=(1, 4096, 32768, 131072)) -> str:
    """The parameter and KV-cache tables that ``python -m dsv3 info`` prints."""
    import torch

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
    lines += ["", "KV cache (bf16, batch 1, main-model layers)",
              f"  {'tokens':>8}" + "".join(f"{a:>14}" for a in ("MLA", "MHA", f"GQA-{groups}", "MQA"))]
    for T in seq_lens:
        row = [kv_cache_bytes(config, T, attention="mla"), kv_cache_bytes(config, T, attention="mha"),
               kv_cache_bytes(config, T, attention="gqa", groups=groups), kv_cache_bytes(config, T, attention="mqa")]
        lines.append(f"  {T:>8}" + "".join(f"{_fmt_bytes(b):>14}" for b in row))
    per_token = kv_cache_bytes(config, 1, dtype=torch.bfloat16)
    lines.append(f"  MLA: {per_token:,} bytes per token "
                 f"({config.kv_lora_rank} + {config.qk_rope_head_dim} values x {config.num_hidden_layers} layers x 2)")
    return "\n".join(lines)


def _fmt_bytes(b: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= div:
            return f"{b / div:,.1f} {unit}"
    return f"{b:,.0f} B"


def _cmd_info(args) -> int:
    print(info_tables(config_from_arg(args.config)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dsv3", description="DeepSeek-V3 in PyTorch + Triton")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameter and KV-cache tables for a config")
    info.add_argument("--config", default="deepseek_v3",
                      help=f"a preset ({', '.join(PRESETS)}) or a config.json / checkpoint directory")
    info.set_defaults(func=_cmd_info)
    for module in ("dsv3.train", "dsv3.generate"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
