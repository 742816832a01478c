"""dsv3.parallel.cost: the communication cost model of Chapter 9 and benchmarks/bench_parallel.py (no processes)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from dsv3 import ModelConfig
from dsv3.parallel import Topology, plan_topology
from dsv3.parallel.cost import (
    cost_rows,
    expected_nodes_uniform,
    experts_per_node_free,
    ib_time_s,
    nvlink_time_s,
    sampled_copies,
    step_bytes,
)


def test_link_arithmetic_gives_the_reports_3_2_experts_per_node():
    assert experts_per_node_free() == pytest.approx(3.2)
    copy = 7168 * 2  # one BF16 hidden state of V3
    assert nvlink_time_s(experts_per_node_free() * copy) == pytest.approx(ib_time_s(copy))
    assert ib_time_s(50e9) == pytest.approx(1.0)


def test_expected_nodes_uniform_equals_enumeration():
    E, nodes, k = 8, 4, 3
    combos = list(itertools.combinations(range(E), k))
    brute = sum(len({e // (E // nodes) for e in c}) for c in combos) / len(combos)
    assert expected_nodes_uniform(E, nodes, k) == pytest.approx(brute)


def test_sampled_v3_routing_obeys_the_node_limit_and_matches_the_closed_form():
    v3 = ModelConfig.deepseek_v3()
    topo = plan_topology(64, 64, v3.n_routed_experts, v3.n_group, ranks_per_node=8)
    limited = sampled_copies(v3, topo, v3.topk_group, n_tokens=4096)
    free = sampled_copies(v3, topo, v3.n_group, n_tokens=4096)
    assert limited["nodes_max"] == 4 and free["nodes_max"] > 4
    assert free["nodes"] == pytest.approx(expected_nodes_uniform(256, 8, 8), abs=0.05)
    rows = cost_rows(v3, topo, 14336, n_tokens=4096)
    assert [(r["M"], r["dispatch"]) for r in rows] == [
        (4, "deduplicated"),
        (4, "per expert"),
        (8, "deduplicated"),
        (8, "per expert"),
    ]
    dedup_m4, naive_m4, dedup_free, _ = rows
    assert dedup_m4["vs_lower_bound"] == 1.0 and naive_m4["vs_lower_bound"] > 1.9
    assert dedup_m4["ib_bytes"] < dedup_free["ib_bytes"] < naive_m4["ib_bytes"]
    assert dedup_m4["ib_us"] == pytest.approx(ib_time_s(dedup_m4["ib_bytes"]) * 1e6)


def test_step_bytes_splits_the_global_batch_by_rank():
    topo = Topology(1, 4, 2, 8, 2)  # 2 nodes x 2 ranks, 2 experts per rank
    ids = torch.tensor([[2, 4], [2, 3], [4, 5], [6, 7]])  # sequence r (one token) lives on rank r
    # rank 0 (node 0): expert 2 on rank 1 -> 1 intra-node copy; expert 4 on rank 2 = its gateway on node 1 -> 1
    # inter-node copy. Every other rank picks its own experts only: no copy. (On rank 1 the same routing would
    # cost 1 inter-node + 1 intra-node copy: the gateway would be rank 3.)
    s = step_bytes([SimpleNamespace(topk_ids=ids, batch_shape=(4, 1))], topo, hidden_bytes=10)
    per_copy = 4 * 10 + 2 * (4 + 8) + 2 * 4  # hidden out, back and their gradients; K weights + ids, weight grads
    assert s == {
        "internode_bytes": per_copy,
        "intranode_bytes": per_copy,
        "nodes_per_token_max": 2,
        "nodes_per_token_mean": 5 / 4,
    }
