"""The collectives DGC's transports start, over one process group, with their bytes counted.

A ``Group`` is a process group plus the class of link its traffic crosses, so that every
collective adds its per-rank ring wire bytes to the right counters (``wire.account``): all
of it to ``bytes_intra`` for a group inside one node, to ``bytes_inter`` for a group with
one rank per node, and for a group spanning whole nodes the share of the ring's hops that
cross nodes. This is the only module of ``dgc`` that calls
``torch.distributed``'s collectives; each call returns a future and does not wait (except
Gloo's reduce-scatter, which has no future to return, and the pairwise swap of a
recursive-doubling round, whose result the next round needs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from dgc import wire

Link = Literal["world", "intra", "inter"]


@dataclass
class Group:
    """``process_group`` (None: the default group) of ``size`` ranks, ``nodes`` of which are
    whole nodes for a ``"world"`` group. Counts go to ``owner.stats`` (looked up at each
    call: a restored state replaces its stats object)."""

    process_group: dist.ProcessGroup | None
    size: int
    link: Link
    owner: object
    nodes: int = 1
    intra: Group | None = None
    """For a ``"world"`` group over whole nodes: this rank's node, over which gtopk splits
    its swaps across nodes (``dgc.transport.gtopk``)."""

    @property
    def rank(self) -> int:
        return dist.get_rank(self.process_group)

    def _count(self, wire_bytes: float) -> None:
        wire.account(self.owner.stats, wire_bytes, self.size, self.nodes, self.link)

    def allreduce(self, t: Tensor, op=dist.ReduceOp.SUM) -> torch.futures.Future:
        self._count(wire.allreduce_bytes(t.nbytes, self.size))
        return dist.all_reduce(t, op=op, group=self.process_group, async_op=True).get_future()

    def allgather(self, out: Tensor, t: Tensor) -> torch.futures.Future:
        """``out`` (``size`` times ``t``'s length) receives every rank's ``t``, in rank order."""
        self._count(wire.allgather_bytes(t.nbytes, self.size))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return gather(out, t, group=self.process_group, async_op=True).get_future()

    def all_to_all(self, out: Tensor, t: Tensor) -> torch.futures.Future:
        """``t`` cut into ``size`` equal chunks, chunk j to rank j; ``out`` receives every
        rank's chunk for this one, in rank order. A rank keeps its own chunk: (p-1)/p of
        ``t`` goes on the wire."""
        self._count(wire.all_to_all_bytes(t.nbytes, self.size))
        return dist.all_to_all_single(out, t, group=self.process_group,
                                      async_op=True).get_future()

    def sendrecv(self, out: Tensor, t: Tensor, peer: int) -> None:
        """Swap ``t`` for ``peer``'s (a rank of this group) into ``out``, and wait: the
        next round of an exchange needs it. Its bytes cross a node's boundary when the
        peer is on another node (ranks placed node by node)."""
        if self.link == "world" and self.nodes > 1:
            per_node = self.size // self.nodes
            link = "intra" if self.rank // per_node == peer // per_node else "inter"
        else:
            link = "intra" if self.link == "world" else self.link
        wire.account(self.owner.stats, float(t.nbytes), self.size, self.nodes, link)
        to = peer if self.process_group is None else dist.get_global_rank(self.process_group,
                                                                         peer)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, t, to, self.process_group),
                                        dist.P2POp(dist.irecv, out, to, self.process_group)])
        for work in works:
            work.wait()

    def reduce_scatter(self, out: Tensor, t: Tensor) -> torch.futures.Future:
        """``out`` receives this rank's chunk (``t``'s ``rank``-th of ``size`` equal chunks)
        summed over the group."""
        self._count(wire.reduce_scatter_bytes(t.nbytes, self.size))
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        work = scatter(out, t, group=self.process_group, async_op=True)
        try:
            return work.get_future()
        except RuntimeError:  # Gloo's reduce-scatter has no future (torch 2.13): wait here
            work.wait()
            done = torch.futures.Future()
            done.set_result([out])
            return done


def node_groups(owner, ranks: int, nodes: int) -> tuple[Group, Group]:
    """The calling rank's intra-node group (its node's ``ranks`` ranks, placed node by
    node) and inter-node group (the ranks of the same local rank on every node), over the
    default group. Every rank creates every group, in one order, as torch requires."""
    intra, _ = dist.new_subgroups_by_enumeration(
        [list(range(n * ranks, (n + 1) * ranks)) for n in range(nodes)])
    inter, _ = dist.new_subgroups_by_enumeration(
        [list(range(j, nodes * ranks, ranks)) for j in range(ranks)])
    return Group(intra, ranks, "intra", owner), Group(inter, nodes, "inter", owner)
