"""Load balancing on the tiny config: auxiliary-loss-free bias vs auxiliary loss vs nothing (Chapter 4).

Reproduces the direction of Table 2 of Wang et al. 2024 ("Auxiliary-Loss-Free Load Balancing Strategy for
Mixture-of-Experts", arXiv 2408.15664), which DeepSeek-V3 adopts (Sec. 2.1.2): the bias-based strategy reaches
better balance than an auxiliary loss without paying for it in validation loss. All runs share the seed, the
initial weights and the batches (Shakespeare, arithmetic and code in equal parts, so that routed experts have
something to specialize on); only ``TrainConfig.balance`` and its knob differ. The auxiliary loss runs twice, with
a small and a large alpha: the dilemma the aux-loss-free paper starts from (a small alpha barely balances, a large
one pushes interfering gradients into the model). The bias rule runs at three update speeds: gamma has to suit the
length of training (Chapter 4), and a short run shows both a gamma that overshoots and one that is too slow.

    python benchmarks/bench_balance.py                     # the committed table (benchmarks/results/)
    python benchmarks/bench_balance.py --steps 40          # a quick look

Columns: validation loss (next-token cross-entropy), MaxVio_global (loads summed over the whole validation set,
max / mean - 1, averaged over the MoE layers of the main model), MaxVio_batch (the same on each training batch,
averaged over the last quarter of the steps), and the mean number of expert groups a token is routed to.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv3 import ModelConfig  # noqa: E402
from dsv3.train import TrainConfig, train  # noqa: E402


def parse_domains(text: str):
    parts = [p for p in text.split(",") if p]
    return {p.split("=")[0]: float(p.split("=")[1]) for p in parts} if "=" in text else tuple(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--gamma", type=float, default=TrainConfig.bias_update_speed, help="bias update speed")
    p.add_argument("--seq-aux-alpha", type=float, default=TrainConfig.seq_aux_alpha)
    p.add_argument("--aux-alpha", type=float, default=TrainConfig.aux_alpha)
    p.add_argument(
        "--domains",
        default="shakespeare=1,arithmetic=1,code=1",
        help="equal weights: training batches mix the domains like the validation batches do",
    )
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument(
        "--modes",
        default="bias:0.01,bias:0.003,bias:0.001,aux:0.01,aux:0.001,none",
        help="runs: bias[:gamma], aux[:alpha], none (defaults from --gamma / --aux-alpha)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model_config = ModelConfig.tiny()
    domains = parse_domains(args.domains)
    rows = []
    for spec in args.modes.split(","):
        mode, _, value = spec.partition(":")
        gamma = float(value) if mode == "bias" and value else args.gamma
        alpha = float(value) if mode == "aux" and value else args.aux_alpha
        setting = {"bias": f"gamma={gamma:g}, seq alpha={args.seq_aux_alpha:g}", "aux": f"alpha={alpha:g}"}.get(
            mode, "-"
        )
        cfg = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            lr=args.lr,
            balance=mode,
            bias_update_speed=gamma,
            seq_aux_alpha=args.seq_aux_alpha,
            aux_alpha=alpha,
            domains=domains,
            seed=args.seed,
            eval_every=args.steps,
            eval_batches=args.eval_batches,
            progress=False,
            device="cpu",
        )
        t0 = time.perf_counter()
        result = train(model_config, cfg)
        seconds = time.perf_counter() - t0
        h = result.history
        tail = h[len(h) - max(len(h) // 4, 1) :]
        n_main = model_config.num_moe_layers
        rows.append(
            {
                "mode": mode,
                "setting": setting,
                "val_loss": h[-1]["val_loss"],
                "global": h[-1]["val_max_vio"],
                "batch": sum(e["max_vio"] for e in tail) / len(tail),
                "groups": sum(sum(e["groups_per_token"][:n_main]) for e in tail) / (len(tail) * n_main),
                "bias_range": max(max(b) - min(b) for b in h[-1]["biases"]),
                "tok_s": result.tokens_per_s,
                "seconds": seconds,
            }
        )
        print(f"  {spec}: {seconds:.0f} s", file=sys.stderr, flush=True)

    print(
        f"tiny config, {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, domains {args.domains}, "
        f"seed {args.seed}, {args.threads} threads"
    )
    print(
        f"{'balance':<8}{'setting':<30}{'val loss':>10}{'MaxVio_global':>15}{'MaxVio_batch':>14}"
        f"{'groups/token':>14}{'bias range':>12}{'tokens/s':>10}"
    )
    for r in rows:
        print(
            f"{r['mode']:<8}{r['setting']:<30}{r['val_loss']:>10.4f}{r['global']:>15.3f}{r['batch']:>14.3f}"
            f"{r['groups']:>14.2f}{r['bias_range']:>12.3f}{r['tok_s']:>10,.0f}"
        )
    bias = [r for r in rows if r["mode"] == "bias"]
    aux = [r for r in rows if r["mode"] == "aux"]
    if bias and aux:
        best = min(rows, key=lambda r: r["global"])
        print(f"lowest MaxVio_global: {best['mode']} ({best['setting']})")
        for b in bias:
            print(
                f"{b['setting']}: val loss minus each aux run's "
                + ", ".join(f"{b['val_loss'] - r['val_loss']:+.4f} ({r['setting']})" for r in aux)
                + "; MaxVio_global below every aux run's: "
                + str(all(b["global"] < r["global"] for r in aux))
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
