"""Decoding on a CPU: the latent cache vs the naive cache vs transformers, and MTP speculative decoding (Chapter 6).

One run prints two tables.

1. Decode speed (tokens per second after the prefill, batch 1, greedy) at 256 and 2K tokens of context, on one
   tiny checkpoint with random weights: ``dsv3.generate`` with the latent cache (absorbed MLA over c_KV + k^R),
   with the naive cache (decompressed per-head K and V), and transformers' ``DeepseekV3ForCausalLM.generate``
   (eager attention, its dynamic cache) loaded from our ``save_pretrained`` output. The three must produce the same
   tokens (checked). The tiny config's max_position_embeddings is 1024, so this table uses
   ``ModelConfig.tiny(max_position_embeddings=4096)`` with YaRN factor 16 over the original 256 positions.
   Target: absorbed >= 2x transformers at 2K.
2. Speculative decoding with the MTP module on ``ModelConfig.tiny()`` trained by ``dsv3.train`` on the bundled
   corpus (Shakespeare, arithmetic, code): greedy plain vs greedy speculative with 1-3 drafted tokens (drafts
   beyond the one MTP module reuse it on its own output), prompts cut from each domain's validation split.
   Speculative output must equal plain output (checked). Target: >= 1.5 tokens per main-model forward.

Timings are medians over ``--repeats`` runs with ``torch.set_num_threads(--threads)`` (default 2) of the wall clock,
or, with ``--clock thread`` (needs ``--threads 1``), of the CPU time of the one thread doing the work, which a busy
machine disturbs far less. Each repeat runs the three decoders back to back; a ratio column is the median of the
per-repeat ratios, so a machine whose speed drifts over the run (a shared virtual machine does) disturbs it less.

    python benchmarks/bench_decode_cpu.py                          # trains the model first (a few minutes)
    python benchmarks/bench_decode_cpu.py --model-dir runs/spec    # keep the trained model / reuse it
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpu_bench import add_clock_args, apply_clock_args, load_note, now, random_model, yarn_tiny  # noqa: E402

from dsv3 import ModelConfig, load_pretrained, save_pretrained  # noqa: E402
from dsv3.generate import generate  # noqa: E402

DOMAINS = ("shakespeare", "arithmetic", "code")


def hf_decode(hf, prompt: torch.Tensor, n_new: int) -> tuple[float, torch.Tensor]:
    """transformers' greedy generate; decode tokens/s measured between the first and the last generated token."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):  # called once per generated token, right after it is chosen
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(now())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    stamps = Clock()
    with torch.no_grad():
        out = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([stamps]),
            pad_token_id=0,
        )
    return (n_new - 1) / (stamps.times[-1] - stamps.times[0]), out[0, prompt.shape[1] :]


def decode_table(args) -> list[str]:
    import transformers
    from transformers import DeepseekV3ForCausalLM

    transformers.logging.set_verbosity_error()
    config = yarn_tiny(4096)
    model = random_model(config)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager").eval()
    lines = [
        f"Decode speed, batch 1, greedy, {args.new_tokens} new tokens, tokens/s after the prefill; "
        f"ModelConfig.tiny(max_position_embeddings=4096, YaRN factor 16 over 256) fp32, random weights",
        f"  {'context':>8}{'dsv3 absorbed':>15}{'dsv3 naive':>12}{'transformers':>14}"
        f"{'absorbed/naive':>16}{'absorbed/HF':>13}  same tokens",
    ]
    vs_hf_at = {}  # context -> absorbed / transformers
    for context in args.contexts:
        prompt = torch.randint(0, config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
        rates = {"latent": [], "naive": [], "hf": []}
        tokens = {}
        for _ in range(args.repeats):
            for kind in ("latent", "naive"):
                times = []  # the same measurement as for transformers: one stamp per generated token
                gen = generate(
                    model, prompt, args.new_tokens, cache_kind=kind, callback=lambda row, ids: times.append(now())
                )
                rates[kind].append((args.new_tokens - 1) / (times[-1] - times[0]))
                tokens[kind] = gen.tokens[0]
            rate, tokens["hf"] = hf_decode(hf, prompt, args.new_tokens)
            rates["hf"].append(rate)
        med = {k: statistics.median(v) for k, v in rates.items()}
        # ratios within each repeat (runs seconds apart), then their median: a machine whose speed drifts during
        # the run moves both sides of a ratio together
        vs_naive = statistics.median(a / b for a, b in zip(rates["latent"], rates["naive"]))
        vs_hf = vs_hf_at[context] = statistics.median(a / b for a, b in zip(rates["latent"], rates["hf"]))
        same = torch.equal(tokens["latent"], tokens["naive"]) and torch.equal(tokens["latent"], tokens["hf"])
        lines.append(
            f"  {context:>8}{med['latent']:>15.1f}{med['naive']:>12.1f}{med['hf']:>14.1f}"
            f"{vs_naive:>15.2f}x{vs_hf:>12.2f}x  {'yes' if same else 'NO'}"
        )
    if 2048 in vs_hf_at:
        ratio = vs_hf_at[2048]
        lines.append(
            f"  target: absorbed >= 2x transformers at 2K -> {'met' if ratio >= 2 else 'NOT met'} ({ratio:.2f}x)"
        )
    return lines


def trained_model(args):
    """The speculative-decoding model: loaded from --model-dir when it holds a run, else trained with dsv3.train."""
    from dsv3.rundir import find_checkpoint, load_history, model_dir
    from dsv3.train import TrainConfig, train

    run = Path(args.model_dir) if args.model_dir else Path(tempfile.mkdtemp(prefix="dsv3_bench_decode_"))
    note = f"loaded from {run}"
    if not (run.is_dir() and find_checkpoint(run) is not None):
        cfg = TrainConfig(
            steps=args.train_steps,
            batch_size=16,
            seq_len=128,
            domains=DOMAINS,
            progress=False,
            device="cpu",
            eval_every=100,
            save_every=100,
            out_dir=str(run),
        )
        t0 = time.perf_counter()
        result = train(ModelConfig.tiny(), cfg)
        note = (
            f"trained here by dsv3.train: {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens on "
            f"{'+'.join(DOMAINS)} in {time.perf_counter() - t0:.0f}s, final train loss "
            f"{result.last('main_loss'):.3f}"
        )
    model = load_pretrained(model_dir(run), dtype=torch.float32).eval()

    history = load_history(run)
    if history:
        last = history[-1]
        note += f" (step {last['step']}, train main loss {last['main_loss']:.3f}, MTP loss {last['mtp_loss']:.3f}"
        val = [h for h in history if "val_loss" in h]
        note += f", val loss {val[-1]['val_loss']:.3f})" if val else ")"
    return model, note


def speculative_table(args) -> list[str]:
    from dsv3.data import load_corpus

    model, note = trained_model(args)
    corpus = load_corpus(DOMAINS)
    g = torch.Generator().manual_seed(0)
    prompts = []  # (domain, ids)
    for domain in DOMAINS:
        val = corpus.tokens("val", domain)
        for start in torch.randint(0, val.numel() - args.prompt_len, (args.prompts,), generator=g).tolist():
            prompts.append((domain, val[start : start + args.prompt_len]))

    def run(k: int | None):
        """All prompts, one at a time: (tokens, totals, wall seconds)."""
        outs, totals = [], {"new": 0, "fwd": 0, "drafted": [0] * 3, "accepted": [0] * 3, "by_domain": {}}
        t0 = now()
        for domain, ids in prompts:
            gen = generate(model, ids, args.new_tokens, speculative=k is not None, num_draft=k or 1)
            s = gen.stats
            outs.append(gen.tokens[0])
            totals["new"] += s.new_tokens
            totals["fwd"] += s.row_forwards
            d = totals["by_domain"].setdefault(domain, [0, 0])
            d[0] += s.new_tokens
            d[1] += s.row_forwards
            for j, (dr, ac) in enumerate(zip(s.drafted_per_position, s.accepted_per_position)):
                totals["drafted"][j] += dr
                totals["accepted"][j] += ac
        return outs, totals, now() - t0

    runs = {k: [] for k in (None, 1, 2, 3)}
    for _ in range(args.repeats):  # interleaved, so a change in machine load hits every mode alike
        for k in runs:
            runs[k].append(run(k))
    results = {k: (r[-1][0], r[-1][1], statistics.median(x[2] for x in r)) for k, r in runs.items()}
    plain_outs, _, plain_wall = results[None]
    lines = [
        f"Speculative decoding with MTP, greedy, batch 1, {len(prompts)} prompts ({args.prompts} per domain, "
        f"{args.prompt_len} tokens from the validation split) x {args.new_tokens} new tokens; "
        f"ModelConfig.tiny() {note}",
        f"  {'decoding':<22}{'tokens/forward':>15}{'accepted per draft position':>30}{'mean accepted':>15}"
        f"{'tokens/s':>10}{'speedup':>9}  same as plain",
    ]
    for k in (None, 1, 2, 3):
        outs, totals, wall = results[k]
        tpf = totals["new"] / totals["fwd"]
        rate = totals["new"] / wall
        if k is None:
            lines.append(f"  {'plain':<22}{tpf:>15.2f}{'-':>30}{'-':>15}{rate:>10.1f}{1.0:>8.2f}x  -")
            continue
        per_pos = [a / d for a, d in zip(totals["accepted"][:k], totals["drafted"][:k])]
        mean_acc = sum(totals["accepted"][:k]) / totals["drafted"][0]
        same = all(torch.equal(a, b) for a, b in zip(outs, plain_outs))
        lines.append(
            f"  {f'speculative, {k} draft' + ('s' if k > 1 else ''):<22}{tpf:>15.2f}"
            f"{'  '.join(f'{x:.2f}' for x in per_pos):>30}{mean_acc:>15.2f}{rate:>10.1f}"
            f"{plain_wall / wall:>8.2f}x  {'yes' if same else 'NO'}"
        )
    lines.append(
        "  tokens per main-model forward by domain: "
        + "; ".join(
            f"{domain} "
            + "/".join(
                f"{results[k][1]['by_domain'][domain][0] / results[k][1]['by_domain'][domain][1]:.2f}"
                for k in (1, 2, 3)
            )
            for domain in DOMAINS
        )
        + " (1/2/3 drafts)"
    )
    best = max(results[k][1]["new"] / results[k][1]["fwd"] for k in (1, 2, 3))
    lines.append(
        f"  target: >= 1.5 tokens per main-model forward -> {'met' if best >= 1.5 else 'NOT met'} (best {best:.2f})"
    )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 2048])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model-dir", default=None, help="training run to reuse, or where to keep the one trained here")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--prompts", type=int, default=4, help="prompts per domain")
    p.add_argument("--prompt-len", type=int, default=48)
    add_clock_args(p)
    p.add_argument("--skip", choices=("decode", "speculative"), default=None)
    args = p.parse_args(argv)
    header = apply_clock_args(p, args)
    print(f"{header}, medians of {args.repeats} runs; ratios are medians of the per-run ratios ({load_note()})")
    if args.skip != "decode":
        print()
        print("\n".join(decode_table(args)))
    if args.skip != "speculative":
        print()
        print("\n".join(speculative_table(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
