"""Scale-out on PyTorch's own distributed stack (paper Sec. 3.2; Chapter 9): a (dp x ep) DeviceMesh from torchrun's
world, expert parallelism with node-limited, deduplicated two-hop all-to-all, FSDP2 for the dense part; or pipeline
parallelism (``pipeline``: 1F1B and DualPipeV from ``torch.distributed.pipelining``, with data and expert
parallelism inside); all applied to a built single-device model from outside (``parallelize``), and the training
loop of ``dsv3.train`` reused (``training.train_distributed``)."""

from .comm import CommStats
from .expert import ExpertParallelExperts, apply_expert_parallel, expected_bytes
from .pipeline import Pipeline, schedule_timeline, split_stages
from .topology import Topology, build_mesh, init_distributed, plan_topology

__all__ = [
    "CommStats",
    "ExpertParallelExperts",
    "Pipeline",
    "Topology",
    "apply_expert_parallel",
    "build_mesh",
    "expected_bytes",
    "init_distributed",
    "plan_topology",
    "schedule_timeline",
    "split_stages",
]
