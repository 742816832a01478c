"""Expert parallelism for DeepSeekMoE, applied to a built model from outside (paper Sec. 2.1.2 "Node-Limited
Routing" and Sec. 3.2.2 "Efficient Implementation of Cross-Node All-to-All Communication").

``apply_expert_parallel(model, topology, stats)`` swaps every ``DeepSeekMoE.experts`` for an
``ExpertParallelExperts`` that keeps only this rank's E / ep experts (so the optimizer only ever sees those). The
router, the shared expert and everything else stay local and unchanged. For a micro-batch of N local tokens with
routed experts ids (N, K) and gating weights (N, K), one forward is:

1. inter-node hop: each token is sent ONCE to every node that holds at least one of its experts, to the rank with the
   same in-node position as the sender (V3: "each token is dispatched via IB to the GPU with the same in-node index
   on its target nodes"), with the ids and weights of the experts it picked on that node. Own node = self: free.
2. intra-node hop: that gateway forwards the token ONCE to every rank of its node holding one of those experts
   (V3: NVLink).
3. each rank runs its experts on what it received with ``dsv3.kernels.moe_experts``, the same kernel as one process,
   the gating weight applied there; a token's experts on one rank are summed there.
4. combine: the outputs go back along the same two hops in reverse, each hop summing what it receives, so a token's
   output crosses every link at most once too.

No token is dropped and there is no capacity. All-to-alls go through ``CommStats`` (bytes per hop), and are
autograd-aware, so gradients flow back to the router (through the weights), to the tokens and to the local experts.
``expected_bytes`` is the same count derived from the routing alone, the analytic check of the counters.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..layers.moe import DeepSeekMoE, Experts
from .comm import CommStats
from .topology import Topology


def _copies(dest: torch.Tensor, n_dest: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One copy per distinct destination of each row: dest (R, K) int64, -1 = none -> (row, dest) of every copy
    sorted by destination (stable), and the rows sent to each destination (n_dest,)."""
    R = dest.shape[0]
    hit = torch.zeros(R, n_dest + 1, dtype=torch.bool, device=dest.device)  # column n_dest collects the -1s
    hit.scatter_(1, torch.where(dest >= 0, dest, n_dest), True)
    hit = hit[:, :n_dest].t()  # (n_dest, R): nonzero walks destination-major, rows ascending inside
    d, row = hit.nonzero(as_tuple=True)
    return row, d, torch.bincount(d, minlength=n_dest)


class ExpertParallelExperts(nn.Module):
    """This rank's slice of a DeepSeekMoE's routed experts; ``forward`` has the signature of ``Experts.forward``
    (x (N, D), weights (N, K), global expert ids (N, K) -> (N, D)) and performs the two-hop dispatch and combine."""

    def __init__(self, experts: Experts, topology: Topology, stats: CommStats):
        super().__init__()
        lo, hi = topology.expert_range()
        self.topology, self.stats, self.first = topology, stats, lo
        self.n_experts = experts.gate_proj.shape[0]
        self.gate_proj = nn.Parameter(experts.gate_proj.detach()[lo:hi].clone())  # (E/ep, I, D)
        self.up_proj = nn.Parameter(experts.up_proj.detach()[lo:hi].clone())  # (E/ep, I, D)
        self.down_proj = nn.Parameter(experts.down_proj.detach()[lo:hi].clone())  # (E/ep, D, I)

    def extra_repr(self) -> str:
        lo = self.first
        return f"experts [{lo}, {lo + self.gate_proj.shape[0]}) of {self.n_experts} on ep rank {self.topology.ep_rank}"

    def _send(self, x, weights, ids, dest):
        """Route the copies (row, dest) of (x, weights, ids) through one all-to-all hop."""
        row, d, send = _copies(dest, self.topology.expert_parallel)
        on = dest[row] == d[:, None]  # (C, K) slots served at that destination
        w = weights[row] * on  # zero where another destination serves the slot
        i = torch.where(on, ids[row], -1)
        send_l = send.tolist()
        recv_l = self.stats.exchange_splits(send).tolist()
        rx = self.stats.all_to_all(x[row], send_l, recv_l, "hidden")
        rw = self.stats.all_to_all(w, send_l, recv_l, "routing")
        ri = self.stats.all_to_all(i, send_l, recv_l, "routing")
        return rx, rw, ri, (row, send_l, recv_l)

    def _back(self, y, n_rows, plan):
        """Reverse of ``_send``: return each received row's result to its sender, summed per original row."""
        row, send_l, recv_l = plan
        back = self.stats.all_to_all(y, recv_l, send_l, "hidden")  # (C, D) in the order we sent
        return y.new_zeros(n_rows, y.shape[1]).index_add(0, row, back)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        topo = self.topology
        me, rpn = topo.ep_rank, topo.ranks_per_node
        N = x.shape[0]
        node = topo.node_of_expert(ids)  # (N, K) node of each chosen expert
        hit = torch.zeros(N, topo.n_nodes, dtype=torch.bool, device=ids.device).scatter_(1, node, True)
        self.stats.record_nodes(hit.sum(1))
        # hop 1 (inter-node): to the rank at my in-node position on each target node; expressed per slot
        gateway = node * rpn + topo.local_index(me)  # (N, K)
        x1, w1, i1, plan1 = self._send(x, weights, ids, gateway)
        # hop 2 (intra-node): from the gateway to each rank of its node holding one of the token's experts there
        rank2 = torch.where(i1 >= 0, topo.rank_of_expert(i1.clamp_min(0)), -1)  # (R1, K)
        x2, w2, i2, plan2 = self._send(x1, w1, i1, rank2)
        # the experts: one (row, slot) pair per local expert a received token picked
        row, slot = (i2 >= 0).nonzero(as_tuple=True)
        local = (i2[row, slot] - self.first)[:, None]  # (P, 1)
        y = kernels.moe_experts(
            x2[row], self.gate_proj, self.up_proj, self.down_proj, w2[row, slot][:, None], local
        )  # (P, D), gating weight applied
        if row.numel() == 0 and torch.is_grad_enabled():
            # nothing to compute here, yet every rank must run the same backward all-to-alls (and give FSDP a
            # gradient for its expert shards): keep the inputs and the parameters in the graph with an exact zero
            y = y + 0.0 * (x2.sum() + w2.sum() + self.gate_proj.sum() + self.up_proj.sum() + self.down_proj.sum())
        y2 = y.new_zeros(x2.shape[0], y.shape[1]).index_add(0, row, y)  # (R2, D) summed per received token
        y1 = self._back(y2, x1.shape[0], plan2)  # (R1, D) summed per node at the gateway
        return self._back(y1, N, plan1).to(x.dtype)  # (N, D)


def apply_expert_parallel(model: nn.Module, topology: Topology, stats: CommStats) -> nn.Module:
    """Replace the routed experts of every DeepSeekMoE (main blocks and MTP modules) with this rank's slice."""
    for module in model.modules():
        if isinstance(module, DeepSeekMoE):
            if module.n_routed_experts != topology.n_routed_experts:
                raise ValueError(
                    f"the model has {module.n_routed_experts} routed experts, the topology {topology.n_routed_experts}"
                )
            if isinstance(module.experts, Experts):
                module.experts = ExpertParallelExperts(module.experts, topology, stats)
    return model


def expected_bytes(
    topk_ids: torch.Tensor, topology: Topology, src_ep_rank: int, hidden_bytes: int, backward: bool = True
) -> dict:
    """The bytes the two-hop dispatch + combine must move for one MoE layer's routing ``topk_ids`` (N, K) of the
    tokens of ep rank ``src_ep_rank``, derived from the routing alone: {"internode": ..., "intranode": ...} for
    hidden states (``hidden_bytes`` per row) and routing metadata (K fp32 weights + K int64 ids per copy; weight
    gradients come back in the backward). Counts copies, not splits: control traffic is excluded."""
    topo = topology
    K = topk_ids.shape[1]
    my_node = topo.node_of(src_ep_rank)
    node = topo.node_of_expert(topk_ids)  # (N, K)
    rank = topo.rank_of_expert(topk_ids)  # (N, K)
    inter = intra = 0
    for n in range(topk_ids.shape[0]):
        for m in set(node[n].tolist()):
            gateway = m * topo.ranks_per_node + topo.local_index(src_ep_rank)
            inter += m != my_node
            intra += len(set(rank[n][node[n] == m].tolist()) - {gateway})
    hidden_per_copy = hidden_bytes * (4 if backward else 2)  # dispatch + combine, each with its gradient
    routing_per_copy = K * (4 + 8) + (K * 4 if backward else 0)
    return {
        "internode_hidden": inter * hidden_per_copy,
        "intranode_hidden": intra * hidden_per_copy,
        "internode_routing": inter * routing_per_copy,
        "intranode_routing": intra * routing_per_copy,
        "internode_copies": inter,
        "intranode_copies": intra,
    }


def copies_per_token(topk_ids: torch.Tensor, topology: Topology, src_node: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per token (N,), for routing ``topk_ids`` (N, K) of tokens living on nodes ``src_node`` (N,): the distinct nodes
    its experts lie on (``nodes``), the inter-node copies with deduplication (one per distinct remote node, the
    lower bound a node-level dispatch can reach) and without (one per routed expert on a remote node), for the
    cost model of Sec. 3.2.2 (``benchmarks/bench_parallel.py``, Chapter 9)."""
    node = topology.node_of_expert(topk_ids)  # (N, K)
    hit = torch.zeros(topk_ids.shape[0], topology.n_nodes, dtype=torch.bool).scatter_(1, node, True)  # (N, nodes)
    remote = hit.clone()
    remote[torch.arange(len(src_node)), src_node] = False
    return {"nodes": hit.sum(1), "dedup": remote.sum(1), "no_dedup": (node != src_node[:, None]).sum(1)}
