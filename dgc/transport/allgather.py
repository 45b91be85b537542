"""Sum selected pairs over a group by allgathering them (the paper's exchange).

Every rank packs its compressed slots' (index, value) pairs into one buffer
(``codec.pack``) and allgathers it; the slots that go dense are allreduced beside it, in the
value dtype, like torch's fp16 hook. Or, when the plan says the dense fallback moves fewer
bytes, everything goes in one allreduce of the buffer in the value dtype, the compressed
slots reduced to their selected entries. Under fixed sparsity masks dense transport carries
the live entries only, without indices. Per rank the allgather sends (p - 1) k pairs: it
grows with the group, which is what the sparse allreduce and the hierarchical topology are
for.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from dgc import codec
from dgc.collectives import Group
from dgc.plan import Plan, Slot
from sparse_train.live import gather_live, scatter_live_

Pairs = list[tuple[Tensor, Tensor]]  # per compressed slot: (positions in the slot, values)


def exchange(group: Group, plan: Plan, flat: Tensor, sent: Pairs,
             positions: Mapping[str, Tensor]) -> torch.futures.Future:
    """Start the collectives; the future resolves to ``flat`` holding the sum over the
    group of every rank's pairs and dense slots."""
    if plan.sparse:
        return _pairs(group, plan, flat, sent, positions)
    return _dense(group, plan, flat, sent, positions)


def dense_in_name_order(plan: Plan) -> list[Slot]:
    """The plan's dense slots by name: a ring allreduce sums each entry in an order set by
    its place in the buffer (for 3 or more ranks), so a buffer laid out by name sums the
    same whichever order DDP put the tensors in its bucket."""
    return sorted(plan.dense, key=lambda s: s.name)


def live_entries(flat: Tensor, slots: Iterable[Slot], positions: Mapping[str, Tensor],
                 dtype: torch.dtype) -> Tensor:
    """The entries of ``slots`` that travel, one after another, in ``dtype``."""
    return codec.to_wire(torch.cat([gather_live(flat.narrow(0, s.offset, s.numel),
                                                positions.get(s.name)) for s in slots]), dtype)


def start_dense(group: Group, plan: Plan, flat: Tensor, positions: Mapping[str, Tensor]
                ) -> tuple[list[Slot], Tensor | None, list[torch.futures.Future]]:
    """Start the allreduce of the plan's dense slots beside a sparse exchange: (the slots in
    name order, the buffer being summed, its future), or ([], None, []) if there are none.
    Small and 1-D tensors travel in the value dtype too (as torch's fp16 hook does): at
    0.1% density their fp32 bytes would otherwise dominate the message."""
    slots = dense_in_name_order(plan)
    if not slots:
        return [], None, []
    dense = live_entries(flat, slots, positions, plan.layout.value_dtype)
    stats = group.owner.stats
    before = stats.bytes_sent
    future = group.allreduce(dense)
    stats.bytes_dense_tensors += stats.bytes_sent - before  # what the group just counted
    return slots, dense, [future]


def put_back_(flat: Tensor, slots: Iterable[Slot], positions: Mapping[str, Tensor],
              received: Tensor) -> None:
    offset = 0
    for s in slots:
        scatter_live_(flat.narrow(0, s.offset, s.numel), positions.get(s.name),
                      received.narrow(0, offset, s.live))
        offset += s.live


def _pairs(group: Group, plan: Plan, flat: Tensor, sent: Pairs,
           positions: Mapping[str, Tensor]) -> torch.futures.Future:
    dense_slots, dense, futures = start_dense(group, plan, flat, positions)
    # Indices count positions in the buffer, so one scatter covers every slot.
    indices = torch.cat([i + s.offset for s, (i, _) in zip(plan.compressed, sent)])
    packed = codec.pack(indices, torch.cat([v for _, v in sent]), plan.layout)
    gathered = packed.new_empty(group.size * packed.numel())
    futures.append(group.allgather(gathered, packed))

    def unpack(_) -> Tensor:
        flat.zero_()
        codec.scatter_sum_(flat, *codec.unpack(gathered, plan.layout, group.size))
        if dense_slots:
            put_back_(flat, dense_slots, positions, dense)
        return flat

    return torch.futures.collect_all(futures).then(unpack)


def _dense(group: Group, plan: Plan, flat: Tensor, sent: Pairs,
           positions: Mapping[str, Tensor]) -> torch.futures.Future:
    """The same sum by one allreduce in the value dtype, the compressed slots reduced to
    their selected entries (cheaper when the density is high)."""
    for s, (indices, values) in zip(plan.compressed, sent):
        flat.narrow(0, s.offset, s.numel).zero_().index_copy_(0, indices, values.to(flat.dtype))
    wire_dtype = plan.layout.value_dtype
    if not positions and wire_dtype == flat.dtype:
        return group.allreduce(flat).then(lambda _: flat)
    live = live_entries(flat, plan.slots, positions, wire_dtype)
    return group.allreduce(live).then(lambda _: put_back_(flat, plan.slots, positions, live)
                                      or flat)
