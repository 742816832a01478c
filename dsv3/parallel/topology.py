"""Where every rank and every routed expert lives (paper Sec. 3.2: 64-way expert parallelism over 8 nodes).

The world that ``torchrun`` starts is a 2-D ``DeviceMesh`` of shape (data_parallel, expert_parallel), named
("dp", "ep"): global rank = dp_rank * expert_parallel + ep_rank. Inside one data-parallel replica the
``expert_parallel`` ranks are grouped into nodes of ``ranks_per_node`` consecutive ranks (default: the local world
size torchrun reports, i.e. the processes on this machine). The routed experts are placed contiguously, E / ep per
rank, so that node m holds router groups [m * G / nodes, (m + 1) * G / nodes): with V3's numbers (256 experts, 8
groups, EP 64 on 8 nodes of 8 GPUs) one expert group of the router is exactly one node, and the router's group limit
(``topk_group`` = M) is a node limit. Counts that do not divide end the run with one error naming them.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Topology:
    """The layout of one rank in a (dp x ep) world; pure arithmetic, usable without a process group."""

    data_parallel: int
    expert_parallel: int
    ranks_per_node: int
    n_routed_experts: int
    n_group: int
    rank: int = 0

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.expert_parallel

    @property
    def dp_rank(self) -> int:
        return self.rank // self.expert_parallel

    @property
    def ep_rank(self) -> int:
        return self.rank % self.expert_parallel

    @property
    def n_nodes(self) -> int:
        """Nodes inside one expert-parallel group."""
        return self.expert_parallel // self.ranks_per_node

    @property
    def experts_per_rank(self) -> int:
        return self.n_routed_experts // self.expert_parallel

    @property
    def groups_per_node(self) -> int:
        return self.n_group // self.n_nodes

    def node_of(self, ep_rank: int) -> int:
        return ep_rank // self.ranks_per_node

    def local_index(self, ep_rank: int) -> int:
        """Position of an ep rank inside its node (V3 sends a token over IB to the same position on the target)."""
        return ep_rank % self.ranks_per_node

    def expert_range(self, ep_rank: int | None = None) -> tuple[int, int]:
        """[first, last) routed experts held by ``ep_rank`` (default: this rank)."""
        r = self.ep_rank if ep_rank is None else ep_rank
        return r * self.experts_per_rank, (r + 1) * self.experts_per_rank

    def rank_of_expert(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """ep rank holding each expert id (any shape)."""
        return expert_ids // self.experts_per_rank

    def node_of_expert(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Node holding each expert id (any shape)."""
        return expert_ids // (self.experts_per_rank * self.ranks_per_node)

    def placement(self) -> list[dict]:
        """One row per ep rank: its node, its experts and the router groups they belong to (for figures)."""
        per_group = self.n_routed_experts // self.n_group
        rows = []
        for r in range(self.expert_parallel):
            lo, hi = self.expert_range(r)
            rows.append(
                {
                    "ep_rank": r,
                    "node": self.node_of(r),
                    "experts": list(range(lo, hi)),
                    "groups": sorted({e // per_group for e in range(lo, hi)}),
                }
            )
        return rows


def plan_topology(
    world_size: int,
    expert_parallel: int,
    n_routed_experts: int,
    n_group: int,
    data_parallel: int | None = None,
    ranks_per_node: int | None = None,
    rank: int = 0,
) -> Topology:
    """Check the degrees against the world and the model; one ``ValueError`` naming the numbers that do not fit.

    ``data_parallel`` defaults to world_size / expert_parallel; ``ranks_per_node`` to min(local world size, ep)
    (torchrun's ``LOCAL_WORLD_SIZE``; one node when it is not set)."""

    def positive(name, v):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")

    positive("world size", world_size)
    positive("expert_parallel", expert_parallel)
    if data_parallel is None:
        if world_size % expert_parallel:
            raise ValueError(f"world size {world_size} is not a multiple of expert_parallel={expert_parallel}")
        data_parallel = world_size // expert_parallel
    positive("data_parallel", data_parallel)
    if data_parallel * expert_parallel != world_size:
        raise ValueError(
            f"world size {world_size} is not data_parallel x expert_parallel = "
            f"{data_parallel} x {expert_parallel} = {data_parallel * expert_parallel}"
        )
    if ranks_per_node is None:
        ranks_per_node = min(int(os.environ.get("LOCAL_WORLD_SIZE", str(expert_parallel))), expert_parallel)
    positive("ranks_per_node", ranks_per_node)
    if expert_parallel % ranks_per_node:
        raise ValueError(
            f"expert_parallel={expert_parallel} ranks do not split into nodes of ranks_per_node={ranks_per_node}"
        )
    if n_routed_experts % expert_parallel:
        raise ValueError(
            f"n_routed_experts={n_routed_experts} is not divisible by expert_parallel="
            f"{expert_parallel}: every rank must hold the same number of experts"
        )
    n_nodes = expert_parallel // ranks_per_node
    if n_group % n_nodes:
        raise ValueError(
            f"n_group={n_group} router groups cannot be placed on {n_nodes} nodes (expert_parallel="
            f"{expert_parallel} / ranks_per_node={ranks_per_node}): each node must hold whole groups, "
            f"so that the router's group limit (topk_group) is a node limit"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the world of {world_size}")
    return Topology(data_parallel, expert_parallel, ranks_per_node, n_routed_experts, n_group, rank)


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (gloo on a CPU, NCCL on GPUs with gloo beside it for host tensors),
    always with a timeout, so a dead rank ends the others with an error instead of a hang. Returns (rank,
    world_size, device)."""
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ and not dist.is_initialized():
            raise ValueError(
                f"environment variable {var} is not set: start distributed runs with torchrun "
                f"(torchrun --nproc-per-node N -m dsv3 train ...)"
            )
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo"  # NCCL for the tensors on the GPU, gloo for the few counters kept on the host
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device


def build_mesh(topo: Topology, device: torch.device):
    """The (dp, ep) DeviceMesh of the current process group, plus a flat 1-D mesh over the whole world."""
    from torch.distributed.device_mesh import init_device_mesh

    if dist.get_world_size() != topo.world_size:
        raise ValueError(f"the process group has {dist.get_world_size()} ranks, the topology {topo.world_size}")
    mesh = init_device_mesh(device.type, (topo.data_parallel, topo.expert_parallel), mesh_dim_names=("dp", "ep"))
    return mesh, mesh._flatten("world")
