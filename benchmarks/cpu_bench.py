"""What the CPU benchmark scripts share: the clock they time with, the header line, and their tiny test models.

Imported by ``bench_model_cpu.py`` and ``bench_decode_cpu.py`` (their folder is on ``sys.path`` when they run).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from dsv3 import DeepSeekV3, ModelConfig, timing

CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
_clock = time.perf_counter


def now() -> float:
    """The clock chosen with ``--clock``: wall time, or the CPU time of the calling thread."""
    return _clock()


def add_clock_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall clock, or the CPU time of the working thread (with --threads 1)",
    )


def apply_clock_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """Set torch's threads and the clock from the parsed arguments; returns the start of the header line."""
    global _clock
    if args.clock == "thread" and args.threads != 1:
        p.error("--clock thread measures one thread: use it with --threads 1")
    _clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    return f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} clock"


def load_note() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"load average at start {load:.1f} on {os.cpu_count()} CPUs"


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `repeats` calls on the clock chosen with ``--clock`` (``dsv3.timing.median_time``)."""
    return timing.median_time(fn, reps=repeats, warmup=warmup, clock=now)


def yarn_tiny(max_position_embeddings: int) -> ModelConfig:
    """The tiny config stretched by YaRN from its original 256 positions to ``max_position_embeddings``."""
    return ModelConfig.tiny(
        max_position_embeddings=max_position_embeddings,
        rope_scaling={
            "type": "yarn",
            "factor": max_position_embeddings / 256,
            "original_max_position_embeddings": 256,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    )


def random_model(config: ModelConfig, seed: int = 0) -> DeepSeekV3:
    torch.manual_seed(seed)
    model = DeepSeekV3(config)
    with torch.no_grad():
        for layer in model.moe_layers():  # a nonzero correction bias, as a trained model has
            layer.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    return model.eval()
