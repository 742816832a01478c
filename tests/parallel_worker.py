"""Worker that tests/test_parallel.py starts under torchrun (one process per rank, gloo on the CPU).

    python -m torch.distributed.run --nproc-per-node 4 tests/parallel_worker.py SCENARIO OUT_DIR [options]

Every rank writes OUT_DIR/rank{r}.json; the test compares them with the one-process oracle it computes itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dsv3.parallel import (
    CommStats,
    apply_expert_parallel,
    build_mesh,
    expected_bytes,
    init_distributed,
    plan_topology,
)
from helpers import random_model, small_config


def config_from(args):
    return small_config(n_group=args.n_group, topk_group=args.topk_group, num_nextn_predict_layers=1)


def grads(args, out: Path) -> dict:
    """EP forward + backward on each rank's slice of one global batch, against the one-process model."""
    config = config_from(args)
    rank, world, device = init_distributed(timeout_s=args.timeout)
    topo = plan_topology(
        world, args.ep or 2, config.n_routed_experts, config.n_group, ranks_per_node=args.rpn, rank=rank
    )
    mesh, _ = build_mesh(topo, device)
    torch.manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))  # the global batch, same on every rank
    labels = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    ref = random_model(config, seed=0).train()
    ref_out = ref(ids, labels=labels)
    ref_out.loss.backward()

    model = random_model(config, seed=0).train()
    stats = CommStats(topo, mesh.get_group("ep"))
    apply_expert_parallel(model, topo, stats)
    b = args.batch // world
    sl = slice(rank * b, (rank + 1) * b)
    out_ = model(ids[sl], labels=labels[sl])
    out_.loss.backward()
    lo, hi = topo.expert_range()
    worst_logit = ((out_.logits - ref_out.logits[sl]).abs().max() / ref_out.logits.abs().max()).item()
    worst_grad, names = 0.0, []
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g) if "experts." not in name or "shared" in name else None
        g /= world
        r = ref_params[name].grad
        if "experts." in name and "shared" not in name:
            r = r[lo:hi]
        err = ((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
        worst_grad = max(worst_grad, err)
        names.append(name)
    # measured bytes of this forward + backward against the count derived from the routing
    measured = stats.totals()
    expect = {"internode_hidden": 0, "intranode_hidden": 0, "internode_routing": 0, "intranode_routing": 0}
    for r in out_.routing + out_.mtp_routing:
        e = expected_bytes(r.topk_ids, topo, topo.ep_rank, config.hidden_size * 4)
        for k in expect:
            expect[k] += e[k]
    return {
        "rank": rank,
        "logit_err": worst_logit,
        "grad_err": worst_grad,
        "n_params": len(names),
        "measured": measured,
        "expected": expect,
        "topk_group": config.topk_group,
    }


def train_config(args):
    from dsv3.train import TrainConfig

    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        seq_len=args.seq,
        warmup_steps=2,
        eval_every=args.val,
        eval_batches=2,
        save_every=args.save_every,
        progress=False,
        out_dir=args.run_dir,
        grad_accum=args.grad_accum,
        fp8=args.fp8,
    )


def train_cfg_model(args):
    return small_config(vocab_size=2048, n_group=args.n_group, topk_group=args.topk_group, num_nextn_predict_layers=1)


def train(args, out: Path) -> dict:
    """``train_distributed`` for a few steps; the history goes back to the test, which trains the one-process
    oracle itself. ``--die-at`` kills rank 1 (SIGKILL, no goodbye) at that step."""
    from dsv3.parallel.training import train_distributed

    def callback(entry, model):
        if args.die_at and entry["step"] == args.die_at and dist.get_rank() == 1:
            os.kill(os.getpid(), 9)

    if args.bucket_elements:  # many small all-reduce buckets instead of one
        import dsv3.parallel.pipeline as pipeline

        pipeline.BUCKET_ELEMENTS = args.bucket_elements
    if args.pp:
        layout = dict(pipeline_parallel=args.pp, data_parallel=args.dp, schedule=args.schedule)
        layout.update(microbatches=args.microbatches, expert_parallel=args.ep, ranks_per_node=args.rpn)
    else:
        layout = dict(expert_parallel=args.ep or 2, data_parallel=args.dp, ranks_per_node=args.rpn)
    result = train_distributed(
        train_cfg_model(args),
        train_config(args),
        timeout_s=args.timeout,
        resume=args.resume,
        callback=callback,
        **layout,
    )
    keys = (
        "loss",
        "main_loss",
        "mtp_loss",
        "balance_loss",
        "val_loss",
        "val_mtp_loss",
        "grad_norm",
        "biases",
        "loads",
        "internode_bytes",
        "intranode_bytes",
        "control_bytes",
        "nodes_per_token_max",
        "nodes_per_token_mean",
    )
    out = {"rank": dist.get_rank(), "history": [{k: h[k] for k in keys if k in h} for h in result.history]}
    if args.pp:  # what the schedule planned and what this rank ran in the last step
        from dsv3.parallel.pipeline import schedule_actions

        par = result.parallel
        planned = schedule_actions(par.pipeline_order())[par.pp_rank]
        out["planned"] = [[a.stage, a.kind, a.microbatch] for a in planned]
        out["executed"] = [[s, k, m] for s, k, m, *_ in par.executed]
        out["pipeline_bytes"] = [h["pipeline_bytes"] for h in result.history]
        out["pp_rank"] = par.pp_rank
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("scenario")
    p.add_argument("out")
    p.add_argument("--ep", type=int, default=None)  # expert parallel degree (2 unless --pp)
    p.add_argument("--rpn", type=int, default=None)
    p.add_argument("--n-group", type=int, default=4)
    p.add_argument("--topk-group", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--dp", type=int, default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--run-dir", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--die-at", type=int, default=0)
    p.add_argument("--pp", type=int, default=0)
    p.add_argument("--schedule", default="1f1b")
    p.add_argument("--microbatches", type=int, default=None)
    p.add_argument("--val", type=int, default=0)
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--bucket-elements", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    result = {"grads": grads, "train": train}[args.scenario](args, Path(args.out))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
