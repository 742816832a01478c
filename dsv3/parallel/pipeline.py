"""Pipeline parallelism on ``torch.distributed.pipelining`` (paper Sec. 3.2.1 "DualPipe and Computation-Communication
Overlap"; Chapter 9).

The model's units -- the main blocks, then the MTP modules -- are cut into contiguous stages
(``split_stages``): stage 0 also holds the embedding, the last stage the final norm, the output head and every MTP
module (which need the embedding too, so the last stage holds a replica of it when another rank holds stage 0; the
two copies' gradients are summed before the optimizer step, so they stay equal). Two schedules:

- ``"1f1b"``: ``Schedule1F1B``, one stage per rank (rank r holds stage r): after a warm-up of forwards, each rank
  alternates one forward and one backward, so at most P micro-batches are alive on a rank.
- ``"dualpipev"``: ``ScheduleDualPipeV``, DeepSeek's DualPipe folded into a V: 2P stages, rank r holds stages r and
  2P - 1 - r, so the embedding and the head live on rank 0 and the micro-batches flow down the ranks and back up.
  The backward is split into the input gradient (I) and the weight gradient (W), which fills the bubbles, and in
  the steady state the schedule pairs the forward of one stage with the backward of the other (its OVERLAP_F_B
  actions: the pairs in which V3 hides the all-to-alls of one micro-batch behind the compute of another). torch
  runs the two halves of a pair one after the other unless it is given an overlapped implementation, which dsv3
  does not provide: the schedule's order and bubbles are DualPipeV's, the overlap is not.

Each micro-batch's loss is the one-process loss of its rows, so the step's gradient is the one-process gradient of
the whole batch (``TrainConfig.grad_accum`` is kept). The sequence-wise balance loss of the MoE layers on the
earlier stages rides on the hidden state they send on (``_CarryLoss``: identity forward, the loss's gradient in the
backward), so it enters the gradient exactly as in one process without crossing ranks. The layers a rank does not
hold are moved to the meta device (no memory, not in the optimizer); the router biases stay on every rank and move
identically from the step's loads, which every rank receives summed over the stages.

``Pipeline`` is the strategy object ``dsv3.train.train(..., parallel=...)`` consults (as ``Distributed`` is for
expert and data parallelism without a pipeline). Its world may hold several pipelines: ``data_parallel`` copies,
and ``expert_parallel`` ranks at each pipeline position that share their stages' routed experts through the
two-hop all-to-all of ``dsv3.parallel.expert`` (V3's 16-way pipeline with 64-way expert parallelism inside). A run
writes ``pipeline.json`` beside its checkpoints: the actions each rank executed in the last step, which
``schedule_timeline`` lays out in time for the chapter's drawings, bubbles included.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

from .. import balance as bal
from ..config import ModelConfig
from ..model import DeepSeekV3
from .comm import CommStats
from .expert import ExpertParallelExperts, apply_expert_parallel
from .state import gather_expert_slices, is_expert_entry, load_optimizer_entries, one_process_copy
from .topology import Topology

SCHEDULES = ("1f1b", "dualpipev")
BUCKET_ELEMENTS = 2**25  # gradients all-reduced together over a stage's copies (128 MiB of fp32)
PIPELINE_TRACE = "pipeline.json"  # written beside the checkpoints of a pipeline run: what its schedule ran


# ---------------------------------------------------------------------- where every layer goes
def stages_per_rank(schedule: str) -> int:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return 2 if schedule == "dualpipev" else 1


def stage_ranks(schedule: str, pipeline_parallel: int) -> list[int]:
    """The pipeline rank that holds each stage: 1F1B stage s on rank s; DualPipeV (2P stages) stage s on rank s for
    s < P and on rank 2P - 1 - s after (the V: down the ranks, then back up)."""
    P = pipeline_parallel
    if stages_per_rank(schedule) == 1:
        return list(range(P))
    return [s if s < P else 2 * P - 1 - s for s in range(2 * P)]


def split_stages(num_layers: int, num_mtp: int, n_stages: int) -> list[tuple[int, int]]:
    """[first, last) main blocks of each stage: the L blocks and D MTP modules (one unit each) cut as evenly as
    possible, with every MTP module on the last stage; every stage but the last holds at least one block, the last
    at least one block or MTP module. One ``ValueError`` naming the numbers when they do not go round."""
    if isinstance(n_stages, bool) or not isinstance(n_stages, int) or n_stages < 1:
        raise ValueError(f"the number of pipeline stages must be a positive integer, got {n_stages!r}")
    units = num_layers + num_mtp
    need = n_stages - (1 if num_mtp else 0)
    if num_layers < need:
        raise ValueError(
            f"the model has num_hidden_layers={num_layers} blocks (+{num_mtp} MTP modules), too few for "
            f"{n_stages} pipeline stages: every stage but the last needs a block of its own"
        )
    cuts = [min(round(s * units / n_stages), num_layers) for s in range(n_stages)] + [num_layers]
    for s in range(1, n_stages):  # every stage but the last gets at least one block
        cuts[s] = max(cuts[s], cuts[s - 1] + 1)
    for s in range(n_stages - 1, 0, -1):  # ... without pushing the later stages past the end
        cuts[s] = min(cuts[s], cuts[s + 1] - (1 if s < n_stages - 1 or not num_mtp else 0))
    return [(cuts[s], cuts[s + 1]) for s in range(n_stages)]


# ---------------------------------------------------------------------- one stage
class _CarryLoss(torch.autograd.Function):
    """Identity on the hidden state x that gives ``loss`` the gradient ``scale`` when x's gradient comes back: a
    stage's own loss term (the balance loss of its MoE layers) joins the backward without being sent anywhere."""

    @staticmethod
    def forward(ctx, x, loss, scale: float):
        ctx.scale = scale
        ctx.loss_shape = loss.shape
        return x.clone()  # a new tensor, not a view: the schedule detaches stage outputs in place

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_full(ctx.loss_shape, ctx.scale), None


@dataclass
class _Tally:
    """What the stages of this rank measured over the chunks of one ``schedule.step``: sums over chunks (the
    loss parts as (5,) fp64: total, loss, main, MTP, balance), loads (L, N_r) and groups per token (L,)."""

    parts: torch.Tensor
    loads: torch.Tensor
    groups: torch.Tensor
    chunks: int = 0


class PipelineStageModule(nn.Module):
    """Stage ``index`` of ``n_stages``: blocks [lo, hi) of ``model`` (plus the embedding on stage 0; the final norm,
    the head and the MTP modules on the last, with the embedding too when there are MTP modules).
    ``forward(x, tokens, labels)``: x is the token ids on stage 0, the residual stream (b, T, D) fp32 elsewhere; the
    last stage returns the micro-batch's loss (one element, already scaled for the step), the others the residual
    stream. The modules are the model's own."""

    def __init__(self, model: DeepSeekV3, index: int, n_stages: int, lo: int, hi: int, rows: dict):
        super().__init__()
        self.index, self.n_stages, self.lo, self.hi = index, n_stages, lo, hi
        self.first, self.last = index == 0, index == n_stages - 1
        object.__setattr__(self, "model", model)  # not a submodule: the stage registers only what it runs
        self.blocks = nn.ModuleList(model.layers[lo:hi])
        if self.first or (self.last and len(model.mtp)):
            self.embed_tokens = model.embed_tokens
        if self.last:
            self.norm, self.lm_head, self.mtp = model.norm, model.lm_head, model.mtp
        self.rotary = model.rotary
        self.rows = rows  # block layer index (main) or ("mtp", k) -> row of the step's per-layer tensors
        self.tally: _Tally | None = None
        self.options: dict = {}

    def extra_repr(self) -> str:
        parts = ["embedding"] if self.first else []
        parts += [f"blocks [{self.lo}, {self.hi})"] if self.hi > self.lo else []
        parts += ["norm, head, MTP"] if self.last else []
        return f"stage {self.index} of {self.n_stages}: {', '.join(parts)}"

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        opt = self.options
        B, T = tokens.shape
        position_ids = torch.arange(T, device=tokens.device).expand(B, T)  # (b, T): training has no padding
        cos, sin = self.rotary(position_ids)
        if self.first:
            x = self.embed_tokens(x)  # (b, T, D)
        routing, rows = [], []
        for block in self.blocks:
            x, r = block(x, cos, sin, None, None, 0, False)  # (b, T, D)
            if r is not None:
                routing.append(r)
                rows.append(self.rows[block.layer_idx])
        if self.last:
            out = self.model.head_outputs(x, routing, tokens, labels, position_ids, None, False, opt["mtp_weight"])
            mtp_routing = out.mtp_routing
            routing = routing + mtp_routing
            rows += [self.rows[("mtp", k)] for k in range(len(mtp_routing))]
        balance = bal.balance_loss(routing, opt["balance"], opt["seq_aux_alpha"], opt["aux_alpha"]).to(x.device)
        self._count(routing, rows, out if self.last else None, balance)
        if self.last:
            total = out.loss + balance
            return (total * opt["scale"]).reshape(1)
        if balance.requires_grad:
            x = _CarryLoss.apply(x, balance, opt["scale"])
        return x.float()

    @torch.no_grad()
    def _count(self, routing, rows, out, balance) -> None:
        t = self.tally
        if t is None:
            return
        t.chunks += 1
        b = balance.detach().double()
        if out is not None:
            mtp = out.mtp_loss.detach().double() if out.mtp_loss is not None else torch.zeros_like(b)
            loss = out.loss.detach().double()
            t.parts += torch.stack([loss + b, loss, out.main_loss.detach().double(), mtp, b])
        else:
            t.parts += torch.stack([b, torch.zeros_like(b), torch.zeros_like(b), torch.zeros_like(b), b])
        if routing:
            idx = torch.tensor(rows, device=t.loads.device)
            t.loads.index_add_(0, idx, bal.expert_loads(routing).to(t.loads.device))
            n_group = self.model.config.n_group
            t.groups.index_add_(0, idx, bal.mean_groups_per_token(routing, n_group).to(t.groups.device))


# ---------------------------------------------------------------------- the schedule's timeline
@dataclass(frozen=True)
class Action:
    """One compute action of a pipeline schedule: ``kind`` F (forward), B (whole backward), I (input gradient),
    W (weight gradient) of micro-batch ``microbatch`` on stage ``stage``; actions sharing ``slot`` run as one
    overlapped F;B pair."""

    stage: int
    kind: str
    microbatch: int
    slot: int


def schedule_actions(order: dict[int, list]) -> dict[int, list[Action]]:
    """The compute actions of a torch schedule's ``pipeline_order`` (rank -> actions, None = idle slot), per rank
    in order; overlapped pairs keep their shared slot, communication and gradient-reduction actions are dropped."""
    kinds = ("F", "B", "I", "W")  # torch's _ComputationType values of the compute actions
    out = {}
    for rank, actions in order.items():
        rows = []
        for slot, a in enumerate(actions):
            if a is None:
                continue
            parts = list(a.sub_actions) if getattr(a, "sub_actions", None) else [a]
            for p in parts:
                kind = p.computation_type.value
                if kind in kinds:
                    rows.append(Action(int(p.stage_index), kind, int(p.microbatch_index), slot))
        out[int(rank)] = rows
    return out


def trace_actions(trace: dict) -> dict[int, list[Action]]:
    """The actions each rank ran, in order, from a run's ``pipeline.json`` (``Pipeline.trace``): one slot each."""
    return {
        int(rank): [Action(a["stage"], a["kind"], a["microbatch"], slot) for slot, a in enumerate(acts)]
        for rank, acts in trace["executed"].items()
    }


def schedule_timeline(
    actions: dict[int, list[Action]], n_stages: int, cost: dict[str, float] | None = None
) -> list[dict]:
    """Lay each rank's actions out in time, each starting when its rank is free and its inputs exist: F(s, m) after
    F(s - 1, m); a backward of (s, m) after F(s, m) and the input gradient of (s + 1, m); W after I. An overlapped
    pair runs as one piece (both must be ready). ``cost`` per kind (default F 1, B 2, I 1, W 1: a backward costs two
    forwards). Returns one dict per action: rank, stage, kind, microbatch, start, end. Gaps are the bubbles."""
    cost = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0, **(cost or {})}
    done: dict[tuple[str, int, int], float] = {}
    pos = {r: 0 for r in actions}
    free = {r: 0.0 for r in actions}
    rows: list[dict] = []

    def ready(a: Action):
        deps = []
        if a.kind == "F" and a.stage > 0:
            deps.append(("F", a.stage - 1, a.microbatch))
        if a.kind in ("B", "I"):
            deps.append(("F", a.stage, a.microbatch))
            if a.stage < n_stages - 1:
                deps.append(("G", a.stage + 1, a.microbatch))
        if a.kind == "W":
            deps.append(("G", a.stage, a.microbatch))
        times = [done.get(d) for d in deps]
        return None if any(t is None for t in times) else max(times, default=0.0)

    total = sum(len(v) for v in actions.values())
    while len(rows) < total:
        progressed = False
        for r, acts in actions.items():
            i = pos[r]
            if i >= len(acts):
                continue
            group = [a for a in acts[i:] if a.slot == acts[i].slot]
            starts = [ready(a) for a in group]
            if any(s is None for s in starts):
                continue
            t = max([free[r], *starts])
            for a in group:
                end = t + cost[a.kind]
                rows.append(
                    {"rank": r, "stage": a.stage, "kind": a.kind, "microbatch": a.microbatch, "start": t, "end": end}
                )
                done[("F" if a.kind == "F" else "G" if a.kind in ("B", "I") else "W", a.stage, a.microbatch)] = end
                t = end
            free[r] = t
            pos[r] = i + len(group)
            progressed = True
        if not progressed:
            raise ValueError("the schedule's actions wait on each other: no rank can go on")
    return rows


def idle_per_rank(timeline: list[dict]) -> dict[int, float]:
    """Each rank's idle time up to the end of the last action (the bubble, per rank)."""
    end = max(r["end"] for r in timeline)
    idle = {r["rank"]: end for r in timeline}
    for r in timeline:
        idle[r["rank"]] -= r["end"] - r["start"]
    return dict(sorted(idle.items()))


def bubble_fraction(timeline: list[dict]) -> float:
    """Share of the ranks' time, up to the end of the last action, spent idle."""
    idle = idle_per_rank(timeline)
    return sum(idle.values()) / (max(r["end"] for r in timeline) * len(idle))


# ---------------------------------------------------------------------- the strategy
class Pipeline:
    """The strategy object ``dsv3.train.train(..., parallel=...)`` consults for a pipeline-parallel run (one per
    process). The world is a (dp, pp, ep) DeviceMesh, global rank = (dp_rank * pp + pp_rank) * ep + ep_rank:
    ``data_parallel`` x ``expert_parallel`` pipelines of ``pipeline_parallel`` ranks, each on its rows of every
    global batch. The ``expert_parallel`` ranks at one pipeline position hold the same stages and share their
    routed experts (``dsv3.parallel.expert``: the ep ranks, consecutive, form nodes of ``topology.ranks_per_node``);
    they run the same schedule in step, so their all-to-alls meet. Before the optimizer step a stage's dense
    gradients are averaged over its dp x ep copies, its expert gradients (which already sum the ep ranks' tokens)
    divided by ep and averaged over dp."""

    def __init__(
        self,
        pipeline_parallel: int,
        schedule: str,
        microbatches: int | None,
        device: torch.device,
        data_parallel: int = 1,
        topology: Topology | None = None,
    ):
        from torch.distributed.device_mesh import init_device_mesh

        self.pp, self.dp, self.schedule_name, self.device = pipeline_parallel, data_parallel, schedule, device
        self.topology = topology
        self.ep = topology.expert_parallel if topology is not None else 1
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if self.world_size != pipeline_parallel * data_parallel * self.ep:
            raise ValueError(
                f"world size {self.world_size} is not data_parallel x pipeline_parallel x expert_parallel = "
                f"{data_parallel} x {pipeline_parallel} x {self.ep}"
            )
        self.mesh = init_device_mesh(
            device.type, (data_parallel, pipeline_parallel, self.ep), mesh_dim_names=("dp", "pp", "ep")
        )
        self.group, self.dp_group = self.mesh.get_group("pp"), self.mesh.get_group("dp")
        self.ep_group = self.mesh.get_group("ep")
        # the copies of this rank's stages: every rank at the same pipeline position
        self.ep_rank = self.rank % self.ep
        self.pp_rank = (self.rank // self.ep) % pipeline_parallel
        self.dp_rank = self.rank // (self.ep * pipeline_parallel)
        for p in range(pipeline_parallel):  # every rank creates every group, in the same order
            ranks = [(d * pipeline_parallel + p) * self.ep + e for d in range(data_parallel) for e in range(self.ep)]
            group = dist.new_group(ranks)
            if p == self.pp_rank:
                self.replica_group = group
        self.stats = CommStats(topology, self.ep_group) if topology is not None else None
        self._experts: list[ExpertParallelExperts] = []
        self.n_stages = pipeline_parallel * stages_per_rank(schedule)
        self.microbatches = microbatches if microbatches is not None else self.n_stages
        self.owner = stage_ranks(schedule, pipeline_parallel)  # pipeline rank of each stage
        self.my_stages = [s for s, r in enumerate(self.owner) if r == self.pp_rank]
        self.modules: list[PipelineStageModule] = []
        # the compute actions of the last schedule step (the step's last micro-batch with grad_accum > 1) on this
        # rank, in the order they ran: (stage, kind, microbatch, start, end), host perf_counter times
        self.executed: list[tuple[int, str, int, float, float]] = []
        self.ranges: list[tuple[int, int]] = []  # [first, last) blocks of each stage, set by parallelize
        self._shape: tuple[int, int] | None = None  # (sequences, tokens) of a micro-batch: the stages' buffers
        self.stages: list[PipelineStage] = []
        self._tied_group = None
        self._embed_replica = False
        self.model_config: ModelConfig | None = None
        self.boundary_bytes = 0

    # ------------------------------------------------------------------ the model
    def parallelize(self, model: DeepSeekV3) -> nn.Module:
        config = self.model_config = model.config
        if self.topology is not None:  # this rank's slice of every MoE layer's experts (the others' go to meta)
            apply_expert_parallel(model, self.topology, self.stats)
        ranges = split_stages(config.num_hidden_layers, len(model.mtp), self.n_stages)
        self.ranges = ranges
        moe = [b.layer_idx for b in model.layers if b.is_moe]
        rows: dict = {idx: i for i, idx in enumerate(moe)}
        rows.update({("mtp", k): len(moe) + k for k, m in enumerate(model.mtp) if m.is_moe})
        self.modules = [PipelineStageModule(model, s, self.n_stages, *ranges[s], rows) for s in self.my_stages]
        keep = set()
        for m in self.modules:
            keep |= {id(p) for p in m.parameters()}
        with torch.no_grad():
            for mod in model.modules():
                for name, p in list(mod.named_parameters(recurse=False)):
                    if id(p) not in keep:  # another rank's layer: shape only, no memory, not trained here
                        setattr(mod, name, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))
        self._experts = [e for m in self.modules for e in m.modules() if isinstance(e, ExpertParallelExperts)]
        # the embedding's second home: the last stage's MTP modules, on another rank under 1F1B (one pair of ranks
        # per pipeline; every rank creates every group, in the same order)
        holders = sorted({self.owner[0], self.owner[-1]}) if len(model.mtp) else [self.owner[0]]
        if len(holders) > 1:
            for d in range(self.dp):
                for e in range(self.ep):
                    group = dist.new_group([(d * self.pp + h) * self.ep + e for h in holders])
                    if (d, e) == (self.dp_rank, self.ep_rank):
                        self._tied_group = group
            self._embed_replica = self.pp_rank == holders[-1]
        self._embed = model.embed_tokens.weight
        return model

    def _stages(self, b: int, T: int) -> list[PipelineStage]:
        """torch's stages for micro-batches of b sequences of T tokens (its receive buffers take these shapes)."""
        if self._shape != (b, T):
            D = self.model_config.hidden_size
            self._shape, self.stages = (b, T), []
            for m in self.modules:
                # examples of what each stage receives and sends: the residual stream carries gradients back
                act = torch.empty(b, T, D, device=self.device, requires_grad=True)
                x = torch.empty(b, T, dtype=torch.long, device=self.device) if m.first else act
                y = torch.empty(1, device=self.device, requires_grad=True) if m.last else act
                self.stages.append(_RecordingStage(self, m, self.device, x, y))
        return self.stages

    def _schedule(self, n: int, b: int, T: int):
        stages = self._stages(b, T)
        if self.schedule_name == "1f1b":
            return Schedule1F1B(stages[0], n, loss_fn=_identity_loss, scale_grads=False)
        return ScheduleDualPipeV(stages, n, loss_fn=_identity_loss, scale_grads=False)

    def pipeline_order(self) -> dict[int, list]:
        """The schedule object's own plan (pipeline rank -> actions) for this run's micro-batches (after a step:
        the stages take their shapes from it)."""
        return self._schedule(self.microbatches, *self._shape).pipeline_order

    def local_batch(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This pipeline's rows of a global (micro-)batch (every rank of a pipeline feeds the same rows; the schedule
        cuts them into micro-batches)."""
        B, copies = input_ids.shape[0], self.dp * self.ep
        if B % copies:
            raise ValueError(
                f"a global micro-batch of {B} sequences does not split over {copies} pipelines (data_parallel x "
                f"expert_parallel); choose batch_size / grad_accum divisible by {copies}"
            )
        b = B // copies
        i = self.dp_rank * self.ep + self.ep_rank
        rows = slice(i * b, (i + 1) * b)
        return input_ids[rows], labels[rows]

    # ------------------------------------------------------------------ the step
    def _tally(self, n_layers: int) -> _Tally:
        z = torch.zeros
        return _Tally(
            z(5, dtype=torch.float64, device=self.device),
            z(n_layers, self.model_config.n_routed_experts, dtype=torch.long, device=self.device),
            z(n_layers, device=self.device),
        )

    def micro_step(self, model, ids, labels, lam: float, cfg, autocast) -> tuple:
        """One micro-batch of ``dsv3.train``'s step through the schedule: forward and backward of its ``microbatches``
        chunks. Returns what this rank's stages measured ((5,) loss parts, loads, groups, dropped), summed over
        the chunks' means; ``reduce_step`` adds the other ranks' parts."""
        B = ids.shape[0]
        n = self.microbatches
        if B % n:
            raise ValueError(
                f"a micro-batch of {B} sequences does not split into {n} pipeline micro-batches; choose "
                f"batch_size / grad_accum divisible by --microbatches"
            )
        layers = model.moe_layers()
        tally = self._tally(len(layers))
        options = {
            "mtp_weight": lam,
            "balance": cfg.balance,
            "seq_aux_alpha": cfg.seq_aux_alpha,
            "aux_alpha": cfg.aux_alpha,
            "scale": 1.0 / (n * cfg.grad_accum),
        }
        for m in self.modules:
            m.tally, m.options = tally, options
        schedule = self._schedule(n, B // n, ids.shape[1])
        self.executed.clear()
        args = (ids,) if self.owner[0] == self.pp_rank else ()
        with autocast:
            schedule.step(*args, target=labels, tokens=ids, labels=labels, return_outputs=False)
        for m in self.modules:
            m.tally = None
        if tally.chunks != n * len(self.modules):  # every stage of this rank ran every micro-batch once
            raise RuntimeError(f"the pipeline ran {tally.chunks} stage forwards, expected {n * len(self.modules)}")
        cross = sum(1 for s in range(self.n_stages - 1) if self.owner[s] != self.owner[s + 1] and s in self.my_stages)
        self.boundary_bytes += cross * 2 * ids.numel() * self.model_config.hidden_size * 4
        return tally.parts / n, tally.loads, tally.groups / n, torch.zeros(len(layers), device=self.device)

    def reduce_step(self, micro: list[torch.Tensor], loads: torch.Tensor, groups: torch.Tensor):
        """Every stage measured its own layers and loss terms on its pipeline's rows: summed over a pipeline's ranks
        and averaged over the pipelines they are the step's values; the loads are summed over the whole world."""
        t = torch.cat([torch.stack(micro).reshape(-1), groups.double()])
        dist.all_reduce(t)
        t /= self.dp * self.ep
        loads = loads.clone()
        dist.all_reduce(loads)
        n = len(micro) * micro[0].numel()
        return list(t[:n].view(len(micro), -1).unbind(0)), loads, t[n:].to(groups.dtype)

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float):
        """Sum the embedding's two copies' gradients, average every gradient over the pipelines, then clip by the
        global norm (each parameter counted once)."""
        if self._tied_group is not None:
            dist.all_reduce(self._embed.grad, group=self._tied_group)
        expert = {id(p) for e in self._experts for p in e.parameters()}
        dense = [p.grad for p in params if p.grad is not None and id(p) not in expert]
        experts = [p.grad for p in params if p.grad is not None and id(p) in expert]
        for grads, group, copies, scale in (
            (dense, self.replica_group, self.dp * self.ep, 1.0 / (self.dp * self.ep)),
            (experts, self.dp_group, self.dp, 1.0 / (self.dp * self.ep)),  # / ep: they sum the ep ranks' tokens
        ):
            for bucket in _buckets(grads, BUCKET_ELEMENTS):  # a few all-reduces, no second copy of every gradient
                flat = torch.cat([g.reshape(-1) for g in bucket])
                if copies > 1:
                    dist.all_reduce(flat, group=group)
                flat *= scale
                for g, piece in zip(bucket, flat.split([g.numel() for g in bucket])):
                    g.copy_(piece.view_as(g))
        # every element once: dense gradients (now equal on every copy) from ep rank 0, expert slices from each
        # ep rank, the embedding's replica left out; then summed over one data-parallel copy of the model
        own = list(experts)
        if self.ep_rank == 0:
            own += [
                p.grad
                for p in params
                if p.grad is not None and id(p) not in expert and not (self._embed_replica and p is self._embed)
            ]
        sq = torch.stack([g.detach().float().pow(2).sum() for g in own]).sum().double() if own else None
        sq = sq if sq is not None else torch.zeros((), dtype=torch.float64, device=self.device)
        dist.all_reduce(sq)
        sq /= self.dp  # the dp copies are equal after the averaging
        norm = sq.sqrt()
        if max_norm > 0:
            coef = min(max_norm / (float(norm) + 1e-6), 1.0)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm

    def step_stats(self) -> dict:
        """The step's counters: ``pipeline_bytes``, the activations and their gradients sent between stages on
        different ranks (fp32), and the all-to-all counters of expert parallelism inside the stages; without it
        every expert of a layer is on one rank: no all-to-all, each token's experts on one node."""
        t = torch.tensor([self.boundary_bytes], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        self.boundary_bytes = 0
        if self.stats is not None:  # expert parallelism inside the stages: the all-to-all counters
            return {**self.stats.reduce_step(), "pipeline_bytes": int(t[0])}
        return {
            "internode_bytes": 0,
            "intranode_bytes": 0,
            "control_bytes": 0,
            "nodes_per_token_max": 1,
            "nodes_per_token_mean": 1.0,
            "pipeline_bytes": int(t[0]),
        }

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def eval_batch(self, model, ids, labels, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole batch through the stages in order (point-to-point sends, no schedule): this rank's parts of
        (main loss, MTP loss) and of the loads; ``reduce_eval`` sums them."""
        tally = self._tally(len(model.moe_layers()))
        options = {"mtp_weight": lam, "balance": "none", "seq_aux_alpha": 0.0, "aux_alpha": 0.0, "scale": 1.0}
        x = None
        for m in self.modules:
            m.tally, m.options = tally, options
        for s, m in zip(self.my_stages, self.modules):
            if s == 0:
                x = ids
            elif self.owner[s - 1] != self.pp_rank:
                x = torch.empty(*ids.shape, self.model_config.hidden_size, device=self.device)
                dist.recv(x, group=self.group, group_src=self.owner[s - 1])
            x = m(x, ids, labels)
            if s < self.n_stages - 1 and self.owner[s + 1] != self.pp_rank:
                dist.send(x.contiguous(), group=self.group, group_dst=self.owner[s + 1])
        for m in self.modules:
            m.tally = None
        return tally.parts[[2, 3]], tally.loads

    def reduce_eval(self, losses: list[torch.Tensor], loads: torch.Tensor):
        t = torch.stack(losses).double()
        dist.all_reduce(t)
        t /= self.dp * self.ep
        if self.stats is not None:
            self.stats.reset()  # evaluation traffic is not a step's
        loads = loads.clone()
        dist.all_reduce(loads)
        return list(t.unbind(0)), loads

    # ------------------------------------------------------------------ what ran
    def executed_any(self) -> bool:
        """Whether any rank ran a schedule step in this process (a resumed run may have had none left)."""
        t = torch.tensor([len(self.executed)], device=self.device)
        dist.all_reduce(t)
        return bool(t)

    def trace(self) -> dict | None:
        """The layout and the last schedule step's compute actions of every rank, in the order each ran them, with
        their times in seconds from that rank's first action (each rank's own host clock: on a GPU, when the work
        was queued, not when it ran); on rank 0, None elsewhere. For a
        DualPipeV run also torch's plan (``planned``), which the runtime follows action by action. The first
        pipeline's ranks must call it (they gather); for the others it is None at once."""
        if self.dp_rank != 0 or self.ep_rank != 0:
            return None
        kinds = "FBIW"
        rows = torch.tensor(
            [[s, kinds.index(k), m, t0, t1] for s, k, m, t0, t1 in self.executed], dtype=torch.float64
        ).reshape(-1, 5)
        if len(rows):
            rows[:, 3:] -= rows[0, 3].item()
        n = torch.tensor([len(rows)], device=self.device)
        counts = [torch.empty_like(n) for _ in range(self.pp)]
        dist.all_gather(counts, n, group=self.group)
        longest = int(max(counts))
        padded = torch.zeros(longest, 5, dtype=torch.float64, device=self.device)
        padded[: len(rows)] = rows.to(self.device)
        every = [torch.empty_like(padded) for _ in range(self.pp)]
        dist.all_gather(every, padded, group=self.group)
        if self.pp_rank != 0:
            return None
        executed = {
            r: [
                {"stage": int(a[0]), "kind": kinds[int(a[1])], "microbatch": int(a[2]), "start": a[3], "end": a[4]}
                for a in every[r][: int(counts[r])].tolist()
            ]
            for r in range(self.pp)
        }
        planned = None
        if self.schedule_name == "dualpipev" and self._shape is not None:
            plan = schedule_actions(self.pipeline_order())
            planned = {r: [[a.stage, a.kind, a.microbatch] for a in acts] for r, acts in plan.items()}
        stages = [
            {
                "stage": s,
                "rank": self.owner[s],
                "blocks": list(self.ranges[s]),
                "embedding": s == 0,
                "head_and_mtp": s == self.n_stages - 1,
            }
            for s in range(self.n_stages)
        ]
        return {
            "schedule": self.schedule_name,
            "pipeline_parallel": self.pp,
            "data_parallel": self.dp,
            "expert_parallel": self.ep,
            "microbatches": self.microbatches,
            "stages": stages,
            "executed": executed,
            "planned": planned,
        }

    # ------------------------------------------------------------------ checkpoints
    def _owners(self, named: dict[str, torch.Tensor]) -> list[int]:
        """For each entry (same names on every rank), the lowest rank that holds it for real."""
        held = torch.tensor([0 if t.is_meta else 1 for t in named.values()], dtype=torch.long, device=self.device)
        every = [torch.empty_like(held) for _ in range(self.pp)]
        dist.all_gather(every, held, group=self.group)
        table = torch.stack(every)  # (world, entries)
        if not bool(table.any(0).all()):
            raise RuntimeError("a pipeline rank lost part of the model: an entry is held by no rank")
        return table.float().argmax(0).tolist()  # the first rank with a 1

    def _collect(self, named: dict[str, torch.Tensor], like: dict[str, tuple]) -> dict[str, torch.Tensor]:
        """Every entry's full tensor on the pipeline's rank 0 (sent by its owner), {} elsewhere. ``like``: name ->
        (shape, dtype)."""
        owners = self._owners(named)
        out = {}
        for (name, t), owner in zip(named.items(), owners):
            if owner == 0:
                if self.pp_rank == 0:
                    out[name] = t.detach().cpu()
                continue
            if self.pp_rank == owner:  # on the device: AdamW keeps its step counts on the host, and under NCCL a
                # host tensor would travel through gloo while rank 0 waits for it on NCCL
                dist.send(t.detach().to(self.device).contiguous(), group=self.group, group_dst=0)
            elif self.pp_rank == 0:
                shape, dtype = like[name]
                buf = torch.empty(shape, dtype=dtype, device=self.device)
                dist.recv(buf, group=self.group, group_src=owner)
                out[name] = buf.cpu()
        return out

    def gather_state(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """(a one-process DeepSeekV3, an AdamW with the full optimizer state) on rank 0, (None, None) elsewhere. The
        first pipeline gathers its stages (its ep ranks first gather their expert slices); the others hold the same
        values and return at once."""
        if self.dp_rank != 0:
            return None, None
        state = self._full_experts(dict(model.state_dict()))
        params = dict(model.named_parameters())
        keys = self._optimizer_keys(optimizer)
        named = {}
        for n, p in params.items():
            st = optimizer.state.get(p, {}) if p.requires_grad else {}
            for key, (dtype, scalar) in keys.items():
                shape = () if scalar else tuple(p.shape)
                named[f"{n}.{key}"] = st[key] if key in st else torch.empty(shape, dtype=dtype, device="meta")
        named = self._full_experts(named)
        if self.ep_rank != 0:
            return None, None
        weights = self._collect(state, {n: (t.shape, t.dtype) for n, t in state.items()})
        opt_full = self._collect(named, {n: (t.shape, t.dtype) for n, t in named.items()}) if keys else {}
        if self.rank != 0:
            return None, None
        return one_process_copy(self.model_config, weights, model, optimizer, opt_full)

    def _full_experts(self, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Expert slices gathered over the ep ranks into whole tensors (every ep rank calls it)."""
        if self.ep == 1:
            return named
        return {
            n: gather_expert_slices(t, self.ep_group, self.ep) if is_expert_entry(n, t) else t for n, t in named.items()
        }

    def _optimizer_keys(self, optimizer) -> dict[str, tuple[torch.dtype, bool]]:
        """The optimizer's state entries (dtype, is scalar), the same for every parameter; {} before the first step
        (agreed over the ranks: stage 0's embedding always has state once any step ran)."""
        keys = {}
        for st in optimizer.state.values():
            keys = {k: (v.dtype, v.dim() == 0) for k, v in sorted(st.items()) if isinstance(v, torch.Tensor)}
            break
        any_state = torch.tensor([1 if keys else 0], device=self.device)
        dist.all_reduce(any_state, op=dist.ReduceOp.MIN, group=self.group)
        return keys if int(any_state) else {}

    def load_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict) -> None:
        """This rank's parameters' entries of a checkpoint's full optimizer state (its slice of the experts')."""
        if self.topology is None:
            load_optimizer_entries(model, optimizer, tensors, self.device)
            return
        lo, hi = self.topology.expert_range()
        load_optimizer_entries(
            model,
            optimizer,
            tensors,
            self.device,
            lambda name, p, v: (v[lo:hi] if is_expert_entry(name, v) else v).to(self.device),  # slice on the host
        )

    def barrier(self) -> None:
        dist.barrier()


def _buckets(tensors: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive groups of ``tensors`` of at most ``limit`` elements each (a larger tensor is a group alone)."""
    out, size = [], limit
    for t in tensors:
        if size + t.numel() > limit:
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.numel()
    return out


def _identity_loss(output, target):
    return output.sum()


class _RecordingStage(PipelineStage):
    """torch's ``PipelineStage``, noting each compute action in the order this rank runs it (for the chapter's
    check that the drawn schedule is the one that ran)."""

    def __init__(self, owner: Pipeline, module: PipelineStageModule, device, x, y):
        super().__init__(module, module.index, module.n_stages, device, input_args=x, output_args=y, group=owner.group)
        self._log = owner.executed

    def _timed(self, kind: str, chunk: int, run):
        t0 = time.perf_counter()
        try:
            return run()
        finally:
            self._log.append((self.stage_index, kind, chunk, t0, time.perf_counter()))

    def forward_one_chunk(self, fwd_chunk_id, *args, **kwargs):
        return self._timed(
            "F", fwd_chunk_id, lambda: super(_RecordingStage, self).forward_one_chunk(fwd_chunk_id, *args, **kwargs)
        )

    def backward_one_chunk(self, bwd_chunk_id, *args, full_backward: bool = True, **kwargs):
        return self._timed(
            "B" if full_backward else "I",
            bwd_chunk_id,
            lambda: super(_RecordingStage, self).backward_one_chunk(
                bwd_chunk_id, *args, full_backward=full_backward, **kwargs
            ),
        )

    def backward_weight_one_chunk(self, bwd_chunk_id, *args, **kwargs):
        return self._timed(
            "W",
            bwd_chunk_id,
            lambda: super(_RecordingStage, self).backward_weight_one_chunk(bwd_chunk_id, *args, **kwargs),
        )
