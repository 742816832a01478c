"""The model on a CPU: dsv3 vs transformers' DeepseekV3ForCausalLM, and absorbed vs naive MLA decoding (Chapter 2).

One run prints two tables, both on the same tiny checkpoint (``ModelConfig.tiny`` with random weights, fp32,
written by ``dsv3.save_pretrained`` and read back by transformers):

1. Forward time of a batch (default 4 x 256 tokens, no gradient): dsv3 vs transformers with eager attention.
   Logits are compared, so the two models are known to compute the same function. Target: dsv3 >= 1.5x faster.
2. One decode step (one new token per sequence) at 256, 1K and 4K cached tokens, with the latent cache (absorbed
   MLA: c_KV + k^R) vs the naive cache (decompressed per-head K and V), and the bytes each cache holds.
   Target: absorbed faster from 1K on; bytes in the ratio (kv_lora_rank + qk_rope_head_dim) :
   n_heads x (qk_head_dim + v_head_dim). The tiny config's max_position_embeddings is 1024, so this run uses
   ``ModelConfig.tiny(max_position_embeddings=8192)`` with YaRN factor 32 over the original 256 positions (the
   same weights shapes; only the RoPE frequencies differ).

The forward speedup is the median of the per-repeat ratios (each repeat runs both forwards back to back). Times are
medians over ``--repeats`` runs with ``torch.set_num_threads(--threads)`` (default 2) of the wall clock,
or, with ``--clock thread`` (needs ``--threads 1``), of the CPU time of the one thread doing the work, which a busy
machine disturbs far less.

    python benchmarks/bench_model_cpu.py          # the committed table (benchmarks/results/bench_model_cpu.txt)
    python benchmarks/bench_model_cpu.py --profile   # add a torch.profiler breakdown of both forwards
    python benchmarks/bench_model_cpu.py --floor     # add each forward's GEMM + attention time alone
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpu_bench import add_clock_args, apply_clock_args, load_note, median_time, now, random_model, yarn_tiny  # noqa: E402

from dsv3 import KVCache, ModelConfig, kv_cache_bytes, save_pretrained  # noqa: E402


def forward_table(args) -> list[str]:
    import transformers
    from transformers import DeepseekV3ForCausalLM

    transformers.logging.set_verbosity_error()
    config = ModelConfig.tiny()
    model = random_model(config)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager").eval()
    B, T = args.batch, args.seq_len
    ids = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits, hf_logits = model(ids).logits, hf(ids, use_cache=False).logits
        err = ((ours_logits - hf_logits).norm() / hf_logits.norm()).item()
        # the two forwards back to back in each repeat; the speedup is the median of the per-repeat ratios, so a
        # machine whose speed drifts during the run (a shared virtual machine does) moves both sides together
        model(ids), hf(ids, use_cache=False)  # warm up
        runs = [
            (median_time(lambda: hf(ids, use_cache=False), 1, warmup=0), median_time(lambda: model(ids), 1, warmup=0))
            for _ in range(args.repeats)
        ]
        t_hf, t_ours = (statistics.median(r[i] for r in runs) for i in (0, 1))
        speedup = statistics.median(hf_t / ours_t for hf_t, ours_t in runs)
    lines = [
        f"Forward, batch {B} x {T} tokens, ModelConfig.tiny() fp32, no grad (logits agree: relative error {err:.1e})",
        f"  {'implementation':<40}{'time (ms)':>12}{'tokens/s':>12}{'speedup':>10}",
        f"  {'transformers DeepseekV3ForCausalLM eager':<40}{t_hf * 1e3:>12.1f}{B * T / t_hf:>12,.0f}{1.0:>9.2f}x",
        f"  {'dsv3.DeepSeekV3':<40}{t_ours * 1e3:>12.1f}{B * T / t_ours:>12,.0f}{speedup:>9.2f}x",
        f"  speedup: median of the {args.repeats} per-repeat ratios (the two forwards back to back in each)",
        f"  target: dsv3 >= 1.5x transformers eager -> {'met' if speedup >= 1.5 else 'NOT met'}",
    ]
    if args.floor:
        lines += [
            "",
            "The compute floor: each forward's GEMM and attention ops replayed alone (same shapes and "
            "kernels), medians of the repeats:",
        ]
        floors = {}
        for name, fn in (("transformers", lambda: hf(ids, use_cache=False)), ("dsv3", lambda: model(ids))):
            whole, floor, n_ops, n_heavy = gemm_floor(fn, args.repeats)
            floors[name] = (whole, floor)
            lines.append(
                f"  {name:<13}forward {whole * 1e3:6.1f} ms = GEMM + attention {floor * 1e3:6.1f} ms "
                f"({floor / whole:.0%}) + the rest {(whole - floor) * 1e3:5.1f} ms "
                f"({n_ops} aten ops, {n_heavy} of them GEMM/attention)"
            )
        lines.append(
            f"  transformers forward / dsv3 GEMM + attention alone = "
            f"{floors['transformers'][0] / floors['dsv3'][1]:.2f}x: the speedup dsv3 would show if "
            f"everything but its GEMMs and attention took no time"
        )
    if args.profile:
        ours_parts = component_times(
            lambda: model(ids),
            {
                "attention (MLA)": [b.self_attn for b in model.layers],
                "MoE layers": [b.mlp for b in model.layers if b.is_moe],
                "dense FFN layer": [b.mlp for b in model.layers if not b.is_moe],
                "output head": [model.lm_head],
            },
            args.repeats,
        )
        hf_parts = component_times(
            lambda: hf(ids, use_cache=False),
            {
                "attention (MLA)": [b.self_attn for b in hf.model.layers],
                "MoE layers": [b.mlp for b in hf.model.layers if hasattr(b.mlp, "gate")],
                "dense FFN layer": [b.mlp for b in hf.model.layers if not hasattr(b.mlp, "gate")],
                "output head": [hf.lm_head],
            },
            args.repeats,
        )
        lines += [
            "",
            "Where the forward time goes (ms, median of per-component sums over the runs):",
            f"  {'component':<24}{'transformers':>14}{'dsv3':>10}",
        ]
        for name in ours_parts:
            lines.append(f"  {name:<24}{hf_parts[name] * 1e3:>14.1f}{ours_parts[name] * 1e3:>10.1f}")
        lines += [
            "",
            *profile_lines("dsv3", lambda: model(ids)),
            "",
            *profile_lines("transformers", lambda: hf(ids, use_cache=False)),
        ]
    return lines


def component_times(fn, groups: dict[str, list[torch.nn.Module]], repeats: int) -> dict[str, float]:
    """Median over runs of the time spent inside each group of modules (forward hooks), plus the remainder."""
    totals = {name: [] for name in (*groups, "everything else")}
    current = {name: 0.0 for name in groups}
    handles = []
    for name, modules in groups.items():
        for module in modules:

            def pre(mod, inputs, name=name):
                mod._bench_t0 = now()

            def post(mod, inputs, output, name=name):
                current[name] += now() - mod._bench_t0

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with torch.no_grad():
            fn()
            for _ in range(repeats):
                for name in current:
                    current[name] = 0.0
                t0 = now()
                fn()
                total = now() - t0
                for name in groups:
                    totals[name].append(current[name])
                totals["everything else"].append(total - sum(current.values()))
    finally:
        for h in handles:
            h.remove()
    return {name: statistics.median(v) for name, v in totals.items()}


GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "_scaled_dot_product_flash_attention_for_cpu"}


def gemm_floor(fn, repeats: int) -> tuple[float, float, int, int]:
    """(forward time, time of its GEMM and attention ops replayed alone, aten ops, of which GEMM/attention), no grad:
    the ops are recorded once (a TorchDispatchMode, inputs cloned) and replayed back to back with the forward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls, self.n_ops = [], 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            self.n_ops += 1
            if func.overloadpacket.__name__ in GEMM_OPS:
                keep = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
                self.calls.append((func, keep, kwargs))
            return func(*args, **kwargs)

    with torch.no_grad():
        rec = Record()
        with rec:
            fn()

        def replay():
            for func, args, kwargs in rec.calls:
                func(*args, **kwargs)

        fn(), replay()  # warm up
        runs = [(median_time(fn, 1, warmup=0), median_time(replay, 1, warmup=0)) for _ in range(repeats)]
    return (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), rec.n_ops, len(rec.calls))


def profile_lines(name: str, fn, rows: int = 10) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return [f"torch.profiler, {name} forward (self CPU time):", *table.splitlines()]


def decode_table(args) -> list[str]:
    config = yarn_tiny(8192)
    model = random_model(config)
    lines = [
        "One decode step (batch 1, one new token) over a filled cache; "
        "ModelConfig.tiny(max_position_embeddings=8192, YaRN factor 32 over 256) fp32",
        f"  {'context':>8}{'absorbed (ms)':>15}{'naive (ms)':>12}{'naive/absorbed':>16}"
        f"{'latent bytes':>14}{'naive bytes':>13}{'ratio':>8}",
    ]
    step_tokens = torch.randint(0, config.vocab_size, (1, 1))
    for context in args.contexts:
        prompt = torch.randint(0, config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
        times, sizes = {}, {}
        for kind in ("latent", "naive"):
            cache = KVCache(config, 1, context + 1, kind, num_layers=config.num_hidden_layers)
            with torch.no_grad():
                model(prompt, cache=cache)  # prefill: positions [0, context)

                def step():
                    model(step_tokens, cache=cache)
                    cache.truncate(context)  # the same step again: attention over exactly `context` + 1 keys

                times[kind] = median_time(step, args.decode_repeats, warmup=2)
            sizes[kind] = cache.nbytes * context // cache.max_len  # bytes for `context` tokens
            attention = "mla" if kind == "latent" else "mha"
            assert sizes[kind] == kv_cache_bytes(config, context, dtype=torch.float32, attention=attention)
        lines.append(
            f"  {context:>8}{times['latent'] * 1e3:>15.2f}{times['naive'] * 1e3:>12.2f}"
            f"{times['naive'] / times['latent']:>15.2f}x{sizes['latent']:>14,}{sizes['naive']:>13,}"
            f"{sizes['naive'] / sizes['latent']:>7.1f}x"
        )
    expect = (
        config.num_attention_heads
        * (config.qk_head_dim + config.v_head_dim)
        / (config.kv_lora_rank + config.qk_rope_head_dim)
    )
    lines.append(
        f"  expected byte ratio n_heads x (qk_head_dim + v_head_dim) / (kv_lora_rank + qk_rope_head_dim) = "
        f"{config.num_attention_heads} x ({config.qk_head_dim} + {config.v_head_dim}) / "
        f"({config.kv_lora_rank} + {config.qk_rope_head_dim}) = {expect:.1f}x; "
        f"bytes equal dsv3.kv_cache_bytes (checked)"
    )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--decode-repeats", type=int, default=30)
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of both forwards")
    p.add_argument(
        "--floor",
        action="store_true",
        help="time each forward's GEMM and attention ops alone: the floor the rest of the forward sits on",
    )
    add_clock_args(p)
    args = p.parse_args(argv)
    header = apply_clock_args(p, args)
    print(f"{header}, medians of {args.repeats} (forward) / {args.decode_repeats} (decode step) runs ({load_note()})")
    print()
    print("\n".join(forward_table(args)))
    print()
    print("\n".join(decode_table(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
