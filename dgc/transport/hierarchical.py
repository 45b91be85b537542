"""The hierarchical topology: dense inside a node, compressed across nodes.

Flat DGC's allgather sends (p - 1) k pairs per rank, so its advantage shrinks as the job
grows. Here, on N nodes of r ranks each (placed node by node), for each bucket:

1. every tensor is cut into r contiguous pieces, piece j of every tensor making up shard j;
   the node's ranks reduce-scatter the bucket (copied into shard-major order first), so
   local rank j holds shard j summed over its node;
2. local rank j runs DGC on its shard only (momentum correction, accumulation, selection,
   momentum masking, warm-up), its memory u, v covering its pieces: 1/r of flat DGC's, and
   1/r of the selection's reads;
3. the exchange (allgather) sums the shard's pairs and dense pieces over the N ranks that
   hold shard j, one per node: each rank sends (N - 1) k / r pairs across nodes, where flat
   DGC sends (p - 1) k over a ring that crosses nodes;
4. the shard is averaged (dense pieces get their momentum) and the node allgathers it, so
   every rank holds the whole averaged update.

Pieces are cut per tensor, not per bucket, so which rank owns what depends on the tensor
alone: DDP's rebuilt buckets and a restored checkpoint find each piece's memory where they
left it.

**What clipping and momentum mean here.** Clipping is applied as in the flat topology, to
each rank's own gradient, per tensor, at ``clip_norm / sqrt(p)``, before anything is
summed, so it means one thing whatever the topology. The owner of a piece then treats its
node's sum ``S_n = sum_i g_i`` (over the node's ranks i) as the local gradient of one rank of
an N-rank flat DGC: ``u_n <- m u_n + S_n``, ``v_n <- v_n + u_n``, send ``top-k(v_n)``, and
the update is ``(1/p) sum_n sent_n``. Momentum correction and accumulation are linear, so
with nothing dropped (density 1.0) the update is ``(1/p) sum_n u_n``, the momentum of the
mean gradient: SGD with momentum. Nothing is lost: per shard, what was applied plus what the
owners keep in their residuals is the sum over steps of the momentum-corrected node sums.
With one rank per node ``S_n`` is the rank's own gradient, the shard is the whole bucket, the
inter-node group is the world, and every operation is the flat topology's in the same
order: the same bits.

The reduce-scatter and the inter-node exchange are waited for in the hook body (the shard's
sum is needed to compress it, and the exchange's result to allgather it); on CUDA a wait
makes the stream wait and does not block the host. Under fixed sparsity masks, masked
gradients stay out of the memory and k counts live entries as in the flat topology, but
the collectives carry whole tensors: no live-entries compaction.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from dgc.transport.exchange import exchange
from dgc.transport.flat import average_


@dataclass(frozen=True)
class MyPiece:
    name: str
    start: int      # first entry of the piece in its (flattened) tensor
    numel: int
    offset: int     # where the piece sits in this rank's shard


@dataclass(frozen=True)
class Shards:
    """How a bucket is cut for a node's ``ranks`` ranks, seen from local rank ``mine``."""

    pieces: tuple[MyPiece, ...]
    dest: Tensor        # for each bucket entry, its position in the shard-major buffer
    shard_numel: int    # entries per shard (the largest shard; shorter ones padded)
    _buffers: dict = field(default_factory=dict, compare=False, repr=False)

    def buffer(self, like: Tensor, ranks: int) -> Tensor:
        """The shard-major buffer, kept from step to step: no bucket-sized allocation and
        zero fill per step. Its padding stays 0: the reduce-scatter sums zeros there and
        the allgather writes them back."""
        key = (like.dtype, like.device)
        if key not in self._buffers:
            self._buffers[key] = like.new_zeros(ranks * self.shard_numel)
        return self._buffers[key]


def piece_bounds(numel: int, ranks: int) -> list[int]:
    """Where a tensor of ``numel`` entries is cut: piece j is ``[b[j], b[j + 1])``."""
    return [j * numel // ranks for j in range(ranks + 1)]


def cut(names: Sequence[str], numels: Sequence[int], ranks: int, mine: int,
        device: torch.device) -> Shards:
    bounds = [piece_bounds(n, ranks) for n in numels]
    sizes = [sum(b[j + 1] - b[j] for b in bounds) for j in range(ranks)]
    shard = max(sizes)
    filled = [0] * ranks
    dest, pieces = [], []
    for name, b in zip(names, bounds):
        for j in range(ranks):
            length = b[j + 1] - b[j]
            dest.append(torch.arange(j * shard + filled[j], j * shard + filled[j] + length))
            if j == mine:
                pieces.append(MyPiece(name, b[j], length, filled[j]))
            filled[j] += length
    return Shards(tuple(pieces), torch.cat(dest).to(device), shard)


def run(state, bucket: dist.GradBucket, flat: Tensor, masks: Mapping[str, Tensor],
        fixed: bool) -> torch.futures.Future:
    shards = state.shards_of(bucket, flat.device)
    ranks = state.ranks_per_node
    order = shards.buffer(flat, ranks)
    order.index_copy_(0, shards.dest, flat)
    shard = flat.new_empty(shards.shard_numel)
    state.intra.reduce_scatter(shard, order).wait()
    plan = state.shard_plan(bucket, shards, masks)
    sent = [state.compress(s.name, shard.narrow(0, s.offset, s.numel), s.k)
            for s in plan.compressed]
    state.count_bucket(plan)
    key = ("inter", tuple(s.name for s in plan.slots))
    exchange(state.inter, plan, shard, sent, {}, state, key).wait()
    average_(state, plan, shard, state.world_size)
    gathered = state.intra.allgather(order, shard)
    return gathered.then(lambda _: torch.index_select(order, 0, shards.dest, out=flat))
