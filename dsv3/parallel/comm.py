"""The one place where expert-parallel tokens cross ranks: every all-to-all goes through ``CommStats.all_to_all``,
which knows its bytes and its hop.

A transfer from rank a to rank b is *inter-node* when a and b sit on different nodes (InfiniBand in V3's cluster,
50 GB/s), *intra-node* when they share a node (NVLink, 160 GB/s), and free when a == b (a local copy). The counter
adds the bytes a rank sends, forward and backward (the gradient of an all-to-all is the reverse all-to-all), for
three kinds of traffic: ``hidden`` (token hidden states, expert outputs and their gradients), ``routing`` (per-copy
expert ids and gating weights) and ``control`` (the split sizes every all-to-all exchanges first).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from .topology import Topology

LINKS = ("internode", "intranode")
KINDS = ("hidden", "routing", "control")


class CommStats:
    """Counts the bytes this rank sends, by (kind, link); also the node-limit statistics of dispatched tokens."""

    def __init__(self, topology: Topology, group=None):
        self.topology, self.group = topology, group
        me = topology.ep_rank
        node = [topology.node_of(r) for r in range(topology.expert_parallel)]
        # link class of each destination: 0 self, 1 intra-node, 2 inter-node
        self._link = torch.tensor(
            [0 if r == me else (1 if node[r] == node[me] else 2) for r in range(topology.expert_parallel)]
        )
        self.reset()

    def reset(self) -> None:
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.calls = 0
        self.nodes_max, self.nodes_sum, self.tokens = 0, 0, 0

    def _count(self, kind: str, rows_to: torch.Tensor, row_bytes: int) -> None:
        rows = rows_to.cpu()
        self.bytes[(kind, "intranode")] += int(rows[self._link == 1].sum()) * row_bytes
        self.bytes[(kind, "internode")] += int(rows[self._link == 2].sum()) * row_bytes
        self.calls += 1

    def exchange_splits(self, send_rows: torch.Tensor) -> torch.Tensor:
        """Tell every rank how many rows it will receive from us: (ep,) int64 sent -> (ep,) int64 received."""
        send = send_rows.to(torch.int64)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        self._count("control", torch.ones_like(send), send.element_size())
        return recv

    def all_to_all(self, x: torch.Tensor, send_rows: list[int], recv_rows: list[int], kind: str) -> torch.Tensor:
        """Rows ``x[sum(send_rows[:r]) : ...]`` go to ep rank r; returns the received rows (sum(recv_rows), ...).
        Differentiable (torch's autograd-aware functional all-to-all) when x requires grad; the backward
        all-to-all sends the gradient rows back along the same links and is counted too."""
        x = x.contiguous()
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        self._count(kind, torch.tensor(send_rows), row_bytes)
        out_shape = (sum(recv_rows), *x.shape[1:])
        if x.requires_grad and torch.is_grad_enabled():
            out = funcol.all_to_all_single(x, recv_rows, send_rows, self.group)
            if isinstance(out, funcol.AsyncCollectiveTensor):
                out = out.wait()
            out.register_hook(lambda g: self._count(kind, torch.tensor(recv_rows), row_bytes))
            return out
        out = x.new_empty(out_shape)
        dist.all_to_all_single(out, x, recv_rows, send_rows, group=self.group)
        return out

    def record_nodes(self, nodes_per_token: torch.Tensor) -> None:
        """Distinct nodes each dispatched token reached, (N,) int64."""
        if nodes_per_token.numel():
            self.nodes_max = max(self.nodes_max, int(nodes_per_token.max()))
            self.nodes_sum += int(nodes_per_token.sum())
            self.tokens += nodes_per_token.numel()

    def totals(self) -> dict:
        """This rank's counters: bytes by link for each kind, and the node statistics (not reduced)."""
        out = {f"{link}_{kind}_bytes": self.bytes.get((kind, link), 0) for kind in KINDS for link in LINKS}
        out.update(nodes_max=self.nodes_max, nodes_sum=self.nodes_sum, tokens=self.tokens)
        return out

    def reduce_step(self) -> dict:
        """The step's counters summed over every rank of the world (max for the node count), as a history entry's
        fields; resets them. Every rank must call it (it all-reduces)."""
        c = self.totals()
        kinds = ("hidden", "routing")
        t = torch.tensor(
            [
                sum(c[f"internode_{k}_bytes"] for k in kinds),
                sum(c[f"intranode_{k}_bytes"] for k in kinds),
                c["internode_control_bytes"] + c["intranode_control_bytes"],
                c["nodes_sum"],
                c["tokens"],
            ],
            dtype=torch.float64,
        )
        dist.all_reduce(t)
        mx = torch.tensor([c["nodes_max"]], dtype=torch.int64)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        self.reset()
        return {
            "internode_bytes": int(t[0]),
            "intranode_bytes": int(t[1]),
            "control_bytes": int(t[2]),
            "nodes_per_token_max": int(mx),
            "nodes_per_token_mean": float(t[3] / t[4]) if t[4] else 0.0,
        }
