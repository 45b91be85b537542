"""The hierarchical topology with a sparse intra-node stage (``intra_node: sparse``).

``transport.hierarchical`` follows issue 15's recipe: the node reduce-scatters the dense
fp32 gradient before compressing it. Inside a node that costs two passes of the whole
gradient over the intra-node link, more than flat DGC's whole exchange unless the nodes
have NVLink-class links (BENCHMARKS.md, "Two nodes"). Here only pairs travel, on every
link; on N nodes of r ranks each, per bucket:

1. every rank runs DGC on its own whole gradient, exactly as the flat topology does (its
   momentum, residual and selection of k entries per tensor);
2. the node allgathers its ranks' pairs ((r - 1) k per rank, inside the node) and each of
   its ranks merges the r sets the same way (``gtopk.merge_rows``): the k entries of
   largest summed magnitude, an index picked by several ranks summed, in index order. A
   rank's pairs that did not make the node's set go back into its own residual, momentum
   restored (``Compressor.give_back``), as gtopk's losers do;
3. every rank of the node now holds the same k sums per tensor. Local rank j allgathers
   the j-th of r slices of them over the world, in the wire dtype, and keeps the rounding
   of its slice in its own residual. Every rank receives all N nodes' sets and sums them in
   rank order: the same bits everywhere. That is (p - 1) k / r pairs per rank, r times
   fewer than flat DGC's allgather, on every link and so between nodes too.

The node's merge is the one collective the hook waits for; the allgather runs while the
backward pass goes on, as flat DGC's does. Small and 1-D tensors are allreduced over the
world beside the pairs, as in the flat topology. With one node, or one rank per node, there
is no node to merge over and this is the flat topology; so is a bucket whose plan is the
dense fallback (``dgc.plan``).

What changes against flat DGC: a node publishes k entries per tensor where flat DGC
publishes r k (one per rank), so the update sums N k entries, not p k, for r times fewer
pairs. Nothing is lost: every rank's pairs are applied or given back whole, and each
slice's rounding stays with its sender, so over all ranks what was applied plus the
residuals is the sum of the momentum-corrected gradients.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from dgc import codec
from dgc.transport import allgather, flat as flat_topology
from dgc.transport.gtopk import give_back_lost, merge_slots, slice_of


def run(state, bucket: dist.GradBucket, flat: Tensor, masks: Mapping[str, Tensor],
        fixed: bool) -> torch.futures.Future:
    intra, inter = state.intra, state.inter
    plan = state.bucket_plan(bucket, masks, fixed)
    if intra.size == 1 or inter.size == 1 or not plan.sparse:
        return flat_topology.run(state, bucket, flat, masks, fixed)
    r, n = intra.size, flat.numel()
    slots = plan.compressed
    sent = [state.compress(s.name, flat.narrow(0, s.offset, s.numel), s.k) for s in slots]
    positions = {s.name: state.masks.positions(s.name, masks[s.name])
                 for s in plan.slots if s.compact}
    state.count_bucket(plan)
    dense_slots, dense, futures = allgather.start_dense(state.world, plan, flat, positions)

    # 2. the node's r sets, merged alike on each of its ranks
    mine = torch.cat([i + s.offset for s, (i, _) in zip(slots, sent)])
    packed = codec.pack(mine, torch.cat([v for _, v in sent]), plan.layout)
    node = packed.new_empty(r * packed.numel())
    intra.allgather(node, packed).wait()
    rows_idx, rows_val = codec.unpack(node, plan.layout, r)
    ks = [s.k for s in slots]
    merged_idx, merged_val, place = merge_slots(rows_idx.long(), rows_val, ks, n,
                                                by_magnitude=False)
    give_back_lost(state, slots, sent, place[intra.rank] >= 0)
    merged = zip(merged_idx.split(ks), merged_val.split(ks))

    # 3. this rank's slice of the node's set, to every rank: all N nodes' sets everywhere
    q = intra.rank
    slice_idx, slice_val = [], []
    for s, (idx, val) in zip(slots, merged):
        idx, val = slice_of(idx, val, r, q, n)
        wire_val = codec.to_wire(val, plan.layout.value_dtype)
        idx = torch.where(idx == n, s.offset, idx)  # an empty slot adds 0 to the slot's start
        if wire_val.dtype != val.dtype:  # the rounding stays here
            state.add_to_residual(s.name, idx - s.offset, val - wire_val.to(val.dtype))
        slice_idx.append(idx)
        slice_val.append(wire_val)
    layout = codec.Layout(sum(i.numel() for i in slice_idx), plan.layout.value_dtype,
                          plan.layout.index_dtype)
    outgoing = codec.pack(torch.cat(slice_idx), torch.cat(slice_val), layout)
    everything = outgoing.new_empty(state.world.size * outgoing.numel())
    futures.append(state.world.allgather(everything, outgoing))

    def unpack(_) -> Tensor:
        flat.zero_()
        codec.scatter_sum_(flat, *codec.unpack(everything, layout, state.world.size))
        if dense_slots:
            allgather.put_back_(flat, dense_slots, positions, dense)
        return flat_topology.average_(state, plan, flat, state.world_size)

    return torch.futures.collect_all(futures).then(unpack)
