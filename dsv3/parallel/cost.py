"""The communication cost model of node-limited expert parallelism (paper Sec. 2.1.2 "Node-Limited Routing" and
Sec. 3.2.2; Chapter 9), and the analytic byte count of a training step that the measured counters must equal.

V3 places its 256 routed experts on 8 nodes of 8 GPUs, one router group per node, so the router's group limit
``topk_group`` = M is a node limit. A token's hidden state crosses InfiniBand (IB, 50 GB/s per GPU in V3's cluster)
once per distinct remote node it reaches, then NVLink (160 GB/s) inside the node. ``sampled_copies`` measures the
copies on routing drawn with the real router; ``expected_nodes_uniform`` is the closed form without a limit;
``ib_time_s`` / ``nvlink_time_s`` turn bytes into time, and ``NVLINK_GB_S / IB_GB_S`` = 3.2 is the number of
experts a token can use per node while the NVLink hop still hides behind the IB hop. ``step_bytes`` is what
``dsv3.parallel``'s counters must show for the routing a global batch actually took (``benchmarks/bench_parallel.py``
and Chapter 9 use all of these).
"""

from __future__ import annotations

import math

import torch

from ..config import ModelConfig
from ..kernels import router_topk_torch
from .expert import copies_per_token, expected_bytes
from .topology import Topology

IB_GB_S = 50.0  # InfiniBand bandwidth per GPU in V3's cluster (Sec. 3.2.2), GB/s
NVLINK_GB_S = 160.0  # NVLink bandwidth inside a node (Sec. 3.2.2), GB/s


def ib_time_s(n_bytes: float) -> float:
    """Seconds to move ``n_bytes`` over one GPU's IB link."""
    return n_bytes / (IB_GB_S * 1e9)


def nvlink_time_s(n_bytes: float) -> float:
    """Seconds to move ``n_bytes`` over NVLink."""
    return n_bytes / (NVLINK_GB_S * 1e9)


def experts_per_node_free() -> float:
    """Experts a token can reach per node while forwarding it over NVLink takes no longer than its one IB copy:
    k copies at 160 GB/s against 1 at 50 GB/s, k = 160 / 50 = 3.2 (the report's "3.2 experts per node")."""
    return NVLINK_GB_S / IB_GB_S


def sampled_routing(config: ModelConfig, topk_group: int, n_tokens: int = 16384, seed: int = 0):
    """Routing of ``n_tokens`` tokens by the real router (``router_topk_torch``) on standard normal logits, zero
    correction bias: (topk_ids (n_tokens, K), the generator, for drawing more with the same stream)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_tokens, config.n_routed_experts, generator=g)  # (N, N_r)
    _, ids = router_topk_torch(
        logits,
        None,
        config.num_experts_per_tok,
        config.n_group,
        topk_group,
        config.routed_scaling_factor,
        config.norm_topk_prob,
    )  # (N, K)
    return ids, g


def sampled_copies(
    config: ModelConfig, topology: Topology, topk_group: int, n_tokens: int = 16384, seed: int = 0
) -> dict:
    """Mean per token per MoE layer, for sampled routing with group limit ``topk_group`` and each token living on a
    uniformly drawn node: distinct nodes reached (``nodes``, and ``nodes_max``), inter-node copies with
    deduplication (``dedup``: one per distinct remote node, the lower bound) and without (``no_dedup``: one per
    routed expert on a remote node)."""
    ids, g = sampled_routing(config, topk_group, n_tokens, seed)
    src = torch.randint(0, topology.n_nodes, (n_tokens,), generator=g)  # (N,) node of each token
    c = copies_per_token(ids, topology, src)
    return {k: v.float().mean().item() for k, v in c.items()} | {"nodes_max": int(c["nodes"].max())}


def expected_nodes_uniform(n_experts: int, n_nodes: int, k: int) -> float:
    """Expected distinct nodes among k experts drawn without replacement from ``n_experts`` spread evenly over
    ``n_nodes`` (no node limit): n_nodes (1 - C(E - E/n_nodes, k) / C(E, k)); V3: 8 (1 - C(224, 8) / C(256, 8))."""
    per_node = n_experts // n_nodes
    return n_nodes * (1 - math.comb(n_experts - per_node, k) / math.comb(n_experts, k))


def cost_rows(config: ModelConfig, topology: Topology, hidden_bytes: int, limits=None, **sample) -> list[dict]:
    """The cost table of one MoE layer per token: for each node limit M in ``limits`` (default: the config's
    ``topk_group``, then none = ``n_group``) and each dispatch (deduplicated, per expert), the distinct nodes, the
    IB copies and bytes (``hidden_bytes`` per hidden-state copy), their ratio to the lower bound and the IB time of
    the dispatch in microseconds."""
    rows = []
    for limit in limits or (config.topk_group, config.n_group):
        s = sampled_copies(config, topology, limit, **sample)
        for dispatch, copies in (("deduplicated", s["dedup"]), ("per expert", s["no_dedup"])):
            rows.append(
                {
                    "M": limit,
                    "limited": limit < config.n_group,
                    "dispatch": dispatch,
                    "nodes": s["nodes"],
                    "nodes_max": s["nodes_max"],
                    "ib_copies": copies,
                    "ib_bytes": copies * hidden_bytes,
                    "vs_lower_bound": copies / s["dedup"],
                    "ib_us": ib_time_s(copies * hidden_bytes) * 1e6,
                }
            )
    return rows


def step_bytes(routings: list, topology: Topology, hidden_bytes: int) -> dict:
    """The analytic counters of one training step (forward and backward of every MoE layer), from the routing its
    global batch took: ``routings`` holds one ``Routing`` per MoE layer (main blocks and MTP modules) computed on
    the whole global batch by the one-process model; global rank r owns sequences [r b, (r + 1) b), b = B / world,
    as ``Distributed.local_batch`` splits them. Returns what ``Distributed.step_stats`` reports: inter- and
    intra-node bytes (hidden states and routing metadata, all ranks), the most and the mean distinct nodes per
    token."""
    topo = topology
    out = {"internode_bytes": 0, "intranode_bytes": 0}
    nodes_max, nodes_sum, tokens = 0, 0, 0
    for r in routings:
        B, T = r.batch_shape
        K = r.topk_ids.shape[-1]
        ids = r.topk_ids.reshape(B, T, K)  # (B, T', K)
        b = B // topo.world_size
        for rank in range(topo.world_size):
            mine = ids[rank * b : (rank + 1) * b].reshape(-1, K)  # (b T', K) the tokens of this rank
            e = expected_bytes(mine, topo, rank % topo.expert_parallel, hidden_bytes)
            out["internode_bytes"] += e["internode_hidden"] + e["internode_routing"]
            out["intranode_bytes"] += e["intranode_hidden"] + e["intranode_routing"]
            node = topo.node_of_expert(mine)  # (b T', K)
            hit = torch.zeros(mine.shape[0], topo.n_nodes, dtype=torch.bool).scatter_(1, node, True)
            n = hit.sum(1)  # (b T',) distinct nodes per token
            nodes_max = max(nodes_max, int(n.max()))
            nodes_sum += int(n.sum())
            tokens += n.numel()
    return out | {"nodes_per_token_max": nodes_max, "nodes_per_token_mean": nodes_sum / tokens}
