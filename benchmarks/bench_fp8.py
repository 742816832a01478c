"""The numerics of DeepSeek-V3's FP8 recipe (paper Sec. 3.3.2), measured on a CPU (Chapter 10).

1. Scaling granularity. The inputs of every FP8 linear layer of the tiny model after a short training run, each
   quantized to e4m3 with one scale for the whole tensor and with one scale per 1 x 128 tile (``act_quant``),
   then again after injecting a few outlier channels (x100 .. x1e5, the kind LLM activations grow). Columns: the
   relative Frobenius error ||q - x|| / ||x||, the median elementwise relative error and the share of nonzero
   entries that underflow to 0. The same for the trained weights: per tensor vs 128 x 128 blocks.
2. Accumulation precision. Dot products of e4m3 operands summed one product at a time in an accumulator that keeps
   14 significant bits (the paper: the H800's FP8 GEMM keeps "around 14 bits"), alone ("limited") and with the
   paper's promotion of the partial sum to fp32 every N_C = 128 products ("promoted"), against the exact sum, for K
   up to V3's 7168 (hidden size) and 18432 (dense FFN width). Two roundings of the narrow accumulator:
   toward zero (the bits shifted out while aligning addends are dropped) and to nearest.

    python benchmarks/bench_fp8.py              # the committed table (benchmarks/results/bench_fp8.txt)
    python benchmarks/bench_fp8.py --steps 5    # a quick look
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv3 import ModelConfig  # noqa: E402
from dsv3.fp8 import fp8_modules  # noqa: E402
from dsv3.train import TrainConfig, train  # noqa: E402
from dsv3.viz import fp8 as numerics  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="training steps before taking the activations")
    ap.add_argument("--outliers", type=int, default=4, help="outlier channels injected per tensor")
    ap.add_argument(
        "--factors",
        type=float,
        nargs="+",
        default=[1.0, 1e2, 1e3, 1e4, 1e5],
        help="outlier magnitudes (x the channel's values; 1: none)",
    )
    ap.add_argument("--bits", type=int, default=14, help="significant bits of the emulated accumulator")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    config = ModelConfig.tiny()
    result = train(config, TrainConfig(steps=args.steps, batch_size=8, seq_len=64, eval_every=0, progress=False))
    model = result.model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (4, 64), generator=g)  # 256 tokens
    acts = numerics.linear_inputs(model, ids)
    print(
        f"# FP8 numerics (paper Sec. 3.3.2); tiny config trained {args.steps} steps on the bundled corpus, "
        f"activations of 256 tokens; torch {torch.__version__}"
    )
    cols = [
        "tensor",
        "shape",
        "amax/rms",
        "tensor rel_error",
        "tile rel_error",
        "tensor median_rel",
        "tile median_rel",
        "tensor underflow",
        "tile underflow",
    ]
    rows = [{k: r[k] for k in cols} for r in numerics.granularity_table(acts)]
    print("\n## Activations as trained: one scale per tensor vs per 1 x 128 tile\n")
    print(numerics.format_table(rows))
    summary = []
    for factor in args.factors:
        tensors = {
            n: numerics.inject_outliers(t, args.outliers, factor, seed=i) if factor != 1 else t
            for i, (n, t) in enumerate(acts.items())
        }
        rows = numerics.granularity_table(tensors)
        summary.append({"outlier factor": factor, **{k: sum(r[k] for r in rows) / len(rows) for k in cols[3:]}})
    print(
        f"\n## The same tensors with {args.outliers} channels each multiplied by a factor (mean over the "
        f"{len(acts)} tensors)\n"
    )
    print(numerics.format_table(summary))
    weights = {name: m.weight.detach() for name, m in fp8_modules(model).items() if isinstance(m, torch.nn.Linear)}
    rows = [{k: r[k] for k in cols} for r in numerics.granularity_table(weights, numerics.WEIGHT_TILE)]
    print("\n## Trained weights: one scale per tensor vs per 128 x 128 block\n")
    print(numerics.format_table(rows))

    for mode in ("truncate", "nearest"):
        print(
            f"\n## Accumulation of e4m3 products: {args.bits}-bit accumulator (rounding: {mode}) vs promotion to "
            f"fp32 every 128 (norm-wise relative error of 8 x 8 dot products)\n"
        )
        print(numerics.format_table(numerics.accumulation_errors(bits=args.bits, mode=mode)))
    print(f"\n# {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
