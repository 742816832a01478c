"""Distributed training that reuses the one-process loop of ``dsv3.train`` (its oracle: same seed, same global batch).

Two strategies: ``Distributed`` below (expert and data parallelism with FSDP2) and, with ``pipeline_parallel``,
``dsv3.parallel.pipeline.Pipeline`` (1F1B or DualPipeV stages, with data and expert parallelism inside). The rest of
this docstring describes ``Distributed``; the pipeline's module describes its own.

``train_distributed(model_config, train_config, expert_parallel=4, ranks_per_node=2)`` runs in every process that
torchrun starts. Each rank builds the same model from the same seed, then ``Distributed.parallelize`` applies, from
outside the model: expert parallelism (``dsv3.parallel.expert``) over the "ep" dimension, FSDP2 ``fully_shard`` of
each rank's experts over "dp" (they are replicated across data-parallel replicas) and of everything else over the
whole world (every rank is data parallel for the dense part). ``dsv3.train.train`` then drives the steps and asks
the ``Distributed`` object at the few places where a distributed step differs:

- each rank takes its slice of every global micro-batch (``local_batch``); its loss is the mean over its tokens, so
  the mean of the ranks' losses is the global batch's loss and FSDP's averaging gives the global gradient (expert
  gradients, which already sum every rank's tokens through the all-to-all, are divided by ep);
- the expert loads of the bias update are summed over the whole global batch (``reduce_step``), so every rank moves
  its biases identically; the sequence-wise balance loss stays per sequence; logged losses are global means;
- the gradient norm is the global one (``clip_grad_norm_``) and checkpoints gather the full model and optimizer
  into the one-process layout (``gather_state``), which ``load_optimizer`` shards again on resume;
- every step's history entry gains the all-to-all counters (``step_stats``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import distribute_tensor

from ..atomic import atomic_write_text
from ..config import ModelConfig
from ..model import DeepSeekV3
from ..train import TrainConfig, TrainResult, train
from .comm import CommStats
from .expert import ExpertParallelExperts, apply_expert_parallel
from .pipeline import PIPELINE_TRACE, Pipeline, split_stages, stages_per_rank
from .state import gather_expert_slices, is_expert_entry, load_optimizer_entries, one_process_copy
from .topology import DEFAULT_TIMEOUT_S, Topology, build_mesh, init_distributed, plan_topology


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Distributed:
    """The strategy object ``dsv3.train.train(..., parallel=...)`` consults; one per process."""

    def __init__(self, topology: Topology, mesh, world_mesh, device: torch.device, fsdp: bool = True):
        self.topology, self.mesh, self.world_mesh, self.device, self.fsdp = topology, mesh, world_mesh, device, fsdp
        self.ep_group = mesh.get_group("ep")
        self.stats = CommStats(topology, self.ep_group)
        self.model_config: ModelConfig | None = None
        self._experts: list[ExpertParallelExperts] = []
        self._model: nn.Module | None = None

    @property
    def rank(self) -> int:
        return self.topology.rank

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    # ------------------------------------------------------------------ the model
    def expert_modules(self, model: nn.Module) -> list[ExpertParallelExperts]:
        return [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]

    def parallelize(self, model: DeepSeekV3) -> nn.Module:
        """Expert parallelism, then FSDP2: experts sharded over dp, the rest over the whole world."""
        self.model_config = model.config
        apply_expert_parallel(model, self.topology, self.stats)
        self._experts = self.expert_modules(model)
        self._model = model
        if self.fsdp:
            for m in self.expert_modules(model):
                fully_shard(m, mesh=self.mesh["dp"])
            fully_shard(model, mesh=self.world_mesh)
        return model

    # ------------------------------------------------------------------ the step
    def local_batch(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of a global (micro-)batch."""
        B, W = input_ids.shape[0], self.world_size
        if B % W:
            raise ValueError(
                f"a global micro-batch of {B} sequences does not split over {W} ranks; choose "
                f"batch_size / grad_accum divisible by the world size"
            )
        b = B // W
        return input_ids[self.rank * b : (self.rank + 1) * b], labels[self.rank * b : (self.rank + 1) * b]

    def reduce_step(self, micro: list[torch.Tensor], loads: torch.Tensor, groups: torch.Tensor):
        """Global means of the per-micro-batch losses (a list of (5,) fp64 tensors) and of the groups per token
        (L,); loads (L, N_r) summed over the whole global batch."""
        t = torch.cat([torch.stack(micro).reshape(-1), groups.double()])
        dist.all_reduce(t)
        t /= self.world_size
        loads = loads.clone()
        dist.all_reduce(loads)
        n = len(micro) * micro[0].numel()
        return list(t[:n].view(len(micro), -1).unbind(0)), loads, t[n:].to(groups.dtype)

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> float:
        """Finish the gradients (expert gradients / ep) and clip by the global norm; returns the norm before
        clipping, as ``torch.nn.utils.clip_grad_norm_`` does for one process."""
        ep = self.topology.expert_parallel
        for m in self._experts:
            for p in m.parameters():
                if p.grad is not None:
                    p.grad.div_(ep)
        grads = [_local(p.grad) for p in params if p.grad is not None]
        # every element of every parameter lives on exactly one rank (FSDP shards, expert slices)
        sq = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum().double()
        dist.all_reduce(sq)
        norm = sq.sqrt()
        if max_norm > 0:
            coef = min(max_norm / (float(norm) + 1e-6), 1.0)
            for g in grads:
                g.mul_(coef)
        return norm  # () fp64, like torch.nn.utils.clip_grad_norm_ returns a tensor

    def step_stats(self) -> dict:
        """The all-to-all counters of the step, summed over every rank (max for the node count); resets them."""
        return self.stats.reduce_step()

    def reduce_eval(self, losses: list[torch.Tensor], loads: torch.Tensor):
        """Validation: each batch's (main, MTP) losses averaged over the ranks, loads summed (the global MaxVio);
        evaluation traffic is not a step's, so the counters restart."""
        t = torch.stack(losses).double()
        dist.all_reduce(t)
        t /= self.world_size
        loads = loads.clone()
        dist.all_reduce(loads)
        self.stats.reset()
        self.reshard()
        return list(t.unbind(0)), loads

    def reshard(self) -> None:
        """Back to the sharded parameters the optimizer holds: FSDP2 keeps the root unsharded after a forward
        without backward (evaluation)."""
        for m in self._model.modules() if self._model is not None else ():
            if isinstance(m, FSDPModule):
                m.reshard()

    # ------------------------------------------------------------------ checkpoints
    def _full_state(self, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full tensors from sharded ones: FSDP shards gathered (``full_tensor``), expert slices gathered over ep."""
        out = {}
        for name, t in named.items():
            full = _full(t).detach()
            if is_expert_entry(name, full):
                full = gather_expert_slices(full, self.ep_group, self.topology.expert_parallel)
            out[name] = full.cpu()
        return out

    def gather_state(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """(a one-process DeepSeekV3, an AdamW holding the full optimizer state) on rank 0, (None, None) elsewhere.
        Every rank must call it (it gathers)."""
        self.reshard()
        names = {id(p): n for n, p in model.named_parameters()}
        weights = self._full_state(dict(model.state_dict()))
        opt = {}
        for p, st in optimizer.state.items():
            for key, value in st.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    opt[f"{names[id(p)]}.{key}"] = value
        opt_full = self._full_state(opt)
        if self.rank != 0:
            return None, None
        return one_process_copy(self.model_config, weights, model, optimizer, opt_full)

    def load_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict) -> None:
        """Shard a checkpoint's full optimizer state (``optimizer.<param>.<key>`` tensors) like the parameters."""
        lo, hi = self.topology.expert_range()

        def shard(name, p, v):  # v on the host: slice first, then place
            v = (v[lo:hi] if is_expert_entry(name, v) else v).to(self.device)
            return distribute_tensor(v, p.device_mesh, p.placements) if hasattr(p, "device_mesh") else v

        load_optimizer_entries(model, optimizer, tensors, self.device, shard)

    def barrier(self) -> None:
        dist.barrier()


def setup(
    model_config: ModelConfig,
    expert_parallel: int,
    data_parallel: int | None = None,
    ranks_per_node: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    fsdp: bool = True,
) -> Distributed:
    """Join torchrun's world and lay it out; checks every count before any model exists."""
    rank, world, device = init_distributed(timeout_s)
    topo = plan_topology(
        world,
        expert_parallel,
        model_config.n_routed_experts,
        model_config.n_group,
        data_parallel=data_parallel,
        ranks_per_node=ranks_per_node,
        rank=rank,
    )
    mesh, world_mesh = build_mesh(topo, device)
    return Distributed(topo, mesh, world_mesh, device, fsdp=fsdp)


def train_distributed(
    model_config: ModelConfig,
    train_config: TrainConfig,
    expert_parallel: int | None = None,
    data_parallel: int | None = None,
    ranks_per_node: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    resume: bool = False,
    callback=None,
    pipeline_parallel: int | None = None,
    schedule: str = "1f1b",
    microbatches: int | None = None,
) -> TrainResult:
    """``dsv3.train.train`` in every torchrun process, with the model parallelized from outside: expert and data
    parallel (``expert_parallel``, ``data_parallel``, ``ranks_per_node``; ``Distributed``), or pipelines of
    ``pipeline_parallel`` ranks (``schedule`` "1f1b" or "dualpipev", each step's micro-batch cut into
    ``microbatches`` pieces, default the number of stages; ``dsv3.parallel.pipeline.Pipeline``) with, optionally,
    ``expert_parallel`` ranks sharing each position's experts and ``data_parallel`` copies. Returns the
    ``TrainResult`` (identical history on every rank); a pipeline run with an ``out_dir`` also writes
    ``pipeline.json`` there. The process group stays up; the caller ends it."""
    for bad, why in (
        (train_config.balance == "aux", "balance='aux' (its batch-wise loss needs the global batch)"),
        (train_config.capacity_factor is not None, "a capacity factor (token dropping)"),
    ):
        if bad:
            raise ValueError(f"distributed training does not support {why}; V3 uses balance='bias' without dropping")
    if pipeline_parallel is not None:
        par = setup_pipeline(
            model_config,
            pipeline_parallel,
            schedule,
            microbatches,
            timeout_s,
            expert_parallel,
            data_parallel,
            ranks_per_node,
        )
        micro = train_config.batch_size // train_config.grad_accum
        copies = par.dp * par.ep
        if micro % (copies * par.microbatches):
            raise ValueError(
                f"batch_size / grad_accum = {micro} sequences do not split into {copies} pipelines (data_parallel x "
                f"expert_parallel) of {par.microbatches} pipeline micro-batches"
                if copies > 1
                else f"batch_size / grad_accum = {micro} sequences do not split into {par.microbatches} pipeline "
                f"micro-batches"
            )
    else:
        if expert_parallel is None:
            raise ValueError("give expert_parallel (and data_parallel) or pipeline_parallel")
        par = setup(model_config, expert_parallel, data_parallel, ranks_per_node, timeout_s)
        micro = train_config.batch_size // train_config.grad_accum
        if micro % par.world_size:
            raise ValueError(
                f"batch_size / grad_accum = {micro} sequences do not split over the world of {par.world_size} ranks"
            )
    cfg = train_config.replace(device=str(par.device), progress=train_config.progress and par.rank == 0)
    result = train(model_config, cfg, resume=resume, callback=callback, parallel=par)
    if pipeline_parallel is not None and cfg.out_dir is not None and par.executed_any():
        trace = par.trace()  # every rank gathers; rank 0 writes what the schedule ran beside the checkpoints
        if trace is not None:
            atomic_write_text(Path(cfg.out_dir) / PIPELINE_TRACE, json.dumps(trace, indent=1) + "\n")
        par.barrier()
    return result


def setup_pipeline(
    model_config: ModelConfig,
    pipeline_parallel: int,
    schedule: str,
    microbatches: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    expert_parallel: int | None = None,
    data_parallel: int | None = None,
    ranks_per_node: int | None = None,
) -> Pipeline:
    """Join torchrun's world as data_parallel x expert_parallel pipelines of ``pipeline_parallel`` ranks, the
    ``expert_parallel`` ranks at each pipeline position sharing their stages' experts (default: no expert
    parallelism, data_parallel = what the world leaves); every count is checked before any model exists."""
    for name, v in (
        ("pipeline_parallel", pipeline_parallel),
        ("microbatches", microbatches),
        ("data_parallel", data_parallel),
        ("expert_parallel", expert_parallel),
    ):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    stages_per_rank(schedule)  # a bad schedule name fails here
    n_stages = pipeline_parallel * stages_per_rank(schedule)
    split_stages(model_config.num_hidden_layers, model_config.num_nextn_predict_layers, n_stages)
    n = microbatches if microbatches is not None else n_stages
    if n < n_stages:
        raise ValueError(
            f"the {'DualPipeV' if schedule == 'dualpipev' else '1F1B'} schedule needs at least as many micro-batches "
            f"(--microbatches) as its {n_stages} stages, got {n}"
        )
    rank, world, device = init_distributed(timeout_s)
    ep = expert_parallel or 1
    if world % (pipeline_parallel * ep):
        raise ValueError(
            f"world size {world} is not a multiple of pipeline_parallel x expert_parallel = {pipeline_parallel} x {ep}"
        )
    dp = data_parallel if data_parallel is not None else world // (pipeline_parallel * ep)
    if dp * pipeline_parallel * ep != world:
        raise ValueError(
            f"world size {world} is not data_parallel x pipeline_parallel x expert_parallel = "
            f"{dp} x {pipeline_parallel} x {ep}"
        )
    topology = None
    if ep > 1:  # the experts of each stage over its ep ranks; dp x pp copies of that layout
        topology = plan_topology(
            world,
            ep,
            model_config.n_routed_experts,
            model_config.n_group,
            data_parallel=dp * pipeline_parallel,
            ranks_per_node=ranks_per_node,
            rank=rank,
        )
    elif ranks_per_node is not None:
        raise ValueError("ranks_per_node groups expert-parallel ranks into nodes: give expert_parallel too")
    return Pipeline(pipeline_parallel, schedule, n, device, data_parallel=dp, topology=topology)
