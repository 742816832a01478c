"""Expert-parallel communication and throughput (paper Sec. 2.1.2 "Node-Limited Routing", Sec. 3.2.2), and the
pipeline schedules (Sec. 3.2.1).

    PYTHONPATH=. python benchmarks/bench_parallel.py            # writes benchmarks/results/bench_parallel.md

Part 1 -- inter-node (IB) copies of a token's hidden state per MoE layer, from routing decisions made by
``dsv3.kernels.router_topk`` on sampled router logits (standard normal; zero correction bias), each token living
on a uniformly drawn node: with and without the node limit (topk_group = M vs n_group), with deduplication (one copy
per distinct remote node, what ``dsv3.parallel`` sends) and without (one copy per routed expert on a remote node),
against the lower bound (one copy per distinct remote node: ratio 1.00). For the unlimited V3 router the expected
number of distinct nodes is also computed in closed form, 8 (1 - C(224, 8) / C(256, 8)), as a check on the sampling.
Bytes per token assume a BF16 hidden state (V3 dispatches in FP8 with 1x128 scales: about half).

Part 2 -- real runs of ``torchrun -m dsv3 train`` with the tiny model on this machine's CPU (gloo): tokens/s for 1, 2
and 4 processes and the measured per-step byte counters. Honest label: this machine has 2 shared CPU cores, so 4
processes time-share 2 cores; these numbers show the protocol works and what it costs here, not a scaling curve.

Part 3 -- the same for pipeline parallelism (1F1B and DualPipeV on 2 ranks, 2 data-parallel pipelines, and a
pipeline with expert parallelism inside): tokens/s against the one-process run of part 2, the activation bytes
sent between stages per step, and the bubble of the schedule each run executed (``pipeline.json``), laid out with
unit costs (forward 1, backward 2 per rank's share).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dsv3 import ModelConfig
from dsv3.parallel import plan_topology
from dsv3.parallel.cost import cost_rows, expected_nodes_uniform, sampled_copies
from dsv3.parallel.pipeline import PIPELINE_TRACE, bubble_fraction, schedule_timeline, trace_actions

ROOT = Path(__file__).resolve().parents[1]
N_TOKENS = 16384


def routing_table(name: str, config: ModelConfig, topo, hidden_bytes: int) -> list[str]:
    lines = [
        f"### {name}: {config.n_routed_experts} experts in {config.n_group} groups, "
        f"top-{config.num_experts_per_tok}"
        f", EP {topo.expert_parallel} on {topo.n_nodes} nodes of {topo.ranks_per_node} "
        f"({hidden_bytes:,} bytes per hidden-state copy)",
        "",
        "| node limit | dispatch | distinct nodes / token (max) | IB copies / token | IB bytes / token | "
        "vs lower bound |",
        "|---|---|---|---|---|---|",
    ]
    for r in cost_rows(config, topo, hidden_bytes, n_tokens=N_TOKENS):
        label = f"M = {r['M']}" if r["limited"] else f"none (M = {r['M']} = n_group)"
        kind = "deduplicated (one per node)" if r["dispatch"] == "deduplicated" else r["dispatch"]
        lines.append(
            f"| {label} | {kind} | {r['nodes']:.2f} ({r['nodes_max']}) | {r['ib_copies']:.2f} | "
            f"{r['ib_bytes']:,.0f} | {r['vs_lower_bound']:.2f} |"
        )
    return lines + [""]


def run(nproc: int, out: Path, extra: list[str]) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "PYTHONWARNINGS": "ignore::FutureWarning",
        "TOKENIZERS_PARALLELISM": "false",
    }
    flags = [
        "train",
        "--steps",
        "6",
        "--batch-size",
        "8",
        "--seq-len",
        "64",
        "--eval-every",
        "0",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]
    cmd = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            "-m",
            "dsv3",
            *flags,
        ]
        if nproc > 1
        else [sys.executable, "-m", "dsv3", *flags]
    )
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    tps = float(re.search(r"throughput ([\d,]+) tokens/s", proc.stdout).group(1).replace(",", ""))
    history = json.loads((out / "checkpoint-000006" / "trainer.json").read_text())["history"]
    trace = json.loads((out / PIPELINE_TRACE).read_text()) if (out / PIPELINE_TRACE).exists() else None
    return {"tokens_per_s": tps, "wall_s": time.perf_counter() - t0, "history": history, "trace": trace}


def main() -> None:
    lines = [
        "# Expert-parallel communication (dsv3.parallel)",
        "",
        "Written by `benchmarks/bench_parallel.py`. Part 1 counts inter-node copies from routing sampled with the "
        "real router; part 2 runs `torchrun -m dsv3 train` on this CPU.",
        "",
        "## 1. Inter-node copies per token per MoE layer (sampled routing, 16,384 tokens)",
        "",
    ]
    v3 = ModelConfig.deepseek_v3()
    v3_topo = plan_topology(64, 64, v3.n_routed_experts, v3.n_group, ranks_per_node=8)
    lines += routing_table("DeepSeek-V3", v3, v3_topo, v3.hidden_size * 2)
    unl = sampled_copies(v3, v3_topo, v3.n_group, n_tokens=N_TOKENS)
    closed = expected_nodes_uniform(v3.n_routed_experts, v3_topo.n_nodes, v3.num_experts_per_tok)
    lines += [
        f"Check: without the node limit a V3 token reaches {unl['nodes']:.3f} distinct nodes in the sample, "
        f"{closed:.3f} in closed form (8 (1 - C(224,8)/C(256,8))).",
        "",
    ]
    tiny = ModelConfig.tiny()
    tiny_topo = plan_topology(4, 4, tiny.n_routed_experts, tiny.n_group, ranks_per_node=1)
    lines += routing_table("tiny", tiny, tiny_topo, tiny.hidden_size * 4)

    lines += [
        "## 2. Measured on this machine: `torchrun -m dsv3 train`, tiny model, 6 steps of 8 x 64 tokens",
        "",
        "2 shared CPU cores, gloo, 1 thread per process: more processes time-share the same 2 cores.",
        "",
        "| processes | layout | tokens/s | inter-node bytes / step | intra-node bytes / step | "
        "nodes / token (mean, max) | IB copies / token / layer |",
        "|---|---|---|---|---|---|---|",
    ]
    # what one inter-node copy costs in a training step (dsv3.parallel.expected_bytes): the fp32 hidden state out and
    # back, forward and backward, plus K fp32 weights + K int64 ids out and the K weight gradients back
    per_copy = 4 * tiny.hidden_size * 4 + tiny.num_experts_per_tok * (4 + 8 + 4)
    token_layers = 8 * 64 * tiny.num_moe_layers + 8 * 63 * tiny.num_nextn_predict_layers  # MTP sees T - 1 tokens
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        unlimited = tmp / "unlimited.json"
        unlimited.write_text(json.dumps(ModelConfig.tiny(topk_group=tiny.n_group).to_hf()))
        layouts = [
            (1, "one process", []),
            (2, "EP 2, 1 node", ["--expert-parallel", "2"]),
            (4, "EP 4, 4 nodes x 1, M = 2", ["--expert-parallel", "4", "--ranks-per-node", "1"]),
            (
                4,
                "EP 4, 4 nodes x 1, no limit",
                ["--expert-parallel", "4", "--ranks-per-node", "1", "--config", str(unlimited)],
            ),
            (4, "EP 4, 2 nodes x 2, M = 2", ["--expert-parallel", "4", "--ranks-per-node", "2"]),
            (
                4,
                "DP 2 x EP 2, 2 nodes x 1",
                ["--data-parallel", "2", "--expert-parallel", "2", "--ranks-per-node", "1"],
            ),
        ]
        for i, (n, label, extra) in enumerate(layouts):
            r = run(n, tmp / f"run{i}", extra)
            h = r["history"]
            if n == 1:
                one_process = r["tokens_per_s"]
                lines.append(f"| 1 | {label} | {r['tokens_per_s']:,.0f} | - | - | - | - |")
                continue

            def mean(key: str, h=h) -> float:
                return sum(e[key] for e in h) / len(h)

            lines.append(
                f"| {n} | {label} | {r['tokens_per_s']:,.0f} | {mean('internode_bytes'):,.0f} | "
                f"{mean('intranode_bytes'):,.0f} | {mean('nodes_per_token_mean'):.2f}, "
                f"{max(e['nodes_per_token_max'] for e in h)} | "
                f"{mean('internode_bytes') / per_copy / token_layers:.2f} |"
            )
        lines += [
            "",
            "Bytes per step count forward and backward, hidden states and routing metadata, over the 3 MoE "
            "layers (2 main + 1 MTP) and all ranks; control traffic (split sizes) is not included. The last column "
            f"divides the inter-node bytes by what one copy costs in a step ({per_copy:,} bytes) and by the "
            f"{token_layers:,} token-layers of a step: compare it with the sampled 'deduplicated' rows of part 1 "
            "(4 nodes x 1). Which rank a token lives on changes its copies, so layouts with the same routing can "
            "differ (DP 2 x EP 2 vs EP 4 on 2 nodes x 2).",
            "",
            "## 3. Pipelines on this machine: `torchrun -m dsv3 train --pipeline-parallel 2`, same model and steps",
            "",
            "| processes | layout | tokens/s | vs 1 process | pipeline bytes / step | inter-node bytes / step | "
            "bubble (unit costs) |",
            "|---|---|---|---|---|---|---|",
        ]
        pipelines = [
            (2, "PP 2, 1F1B, 4 micro-batches", ["--pipeline-parallel", "2", "--microbatches", "4"], None),
            (
                2,
                "PP 2, DualPipeV, 4 micro-batches",
                ["--pipeline-parallel", "2", "--schedule", "dualpipev", "--microbatches", "4"],
                {"F": 0.5, "B": 1.0, "I": 0.5, "W": 0.5},  # two stages of half the blocks per rank
            ),
            (
                4,
                "DP 2 x PP 2, 1F1B, 4 micro-batches",
                ["--pipeline-parallel", "2", "--data-parallel", "2", "--microbatches", "4"],
                None,
            ),
            (
                4,
                "PP 2 x EP 2 (nodes of 1), 1F1B, 4 micro-batches",
                ["--pipeline-parallel", "2", "--expert-parallel", "2", "--ranks-per-node", "1", "--microbatches", "4"],
                None,
            ),
        ]
        for i, (n, label, extra, cost) in enumerate(pipelines):
            r = run(n, tmp / f"pipe{i}", extra)
            t = r["trace"]
            bubble = bubble_fraction(schedule_timeline(trace_actions(t), len(t["stages"]), cost))
            step_bytes = sum(e["pipeline_bytes"] for e in r["history"]) / len(r["history"])
            lines.append(
                f"| {n} | {label} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / one_process:.2f}x | "
                f"{step_bytes:,.0f} | {sum(e['internode_bytes'] for e in r['history']) / len(r['history']):,.0f} | "
                f"{bubble:.1%} |"
            )
    lines += [
        "",
        "Pipeline bytes: fp32 activations and their gradients crossing a rank boundary, summed over the pipelines. "
        "The bubble is the idle share of the ranks' time when the actions each rank executed are laid out with a "
        "forward costing 1 and a backward 2 (its input and weight halves 1 each) per rank's share of the blocks; "
        "1F1B's is (P - 1) / (m + P - 1) = 20% for P = 2, m = 4. On 2 shared cores the measured tokens/s also pay "
        "for the processes' time-sharing, so they are no pipeline speed-up.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "benchmarks" / "results" / "bench_parallel.md").write_text(text)


if __name__ == "__main__":
    main()
