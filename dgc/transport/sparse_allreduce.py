"""Sum selected pairs over a group with per-rank traffic that does not grow with the group.

Allgathering every rank's k pairs sends (p - 1) k of them per rank. Here, after Ok-Topk's
split-and-reduce (Li and Hoefler, PPoPP 2022, Sec. 3.1), the buffer's index space is cut
into p regions, one per rank, balanced on where the selected entries fall; every rank
sends each owner the pairs of its region, the owner sums them and keeps the largest sums,
and the owners' survivors are allgathered. With capacities ``C1 = ceil(c1 k / p)`` pairs
per destination and ``C2 = ceil(c2 k / p)`` survivors per owner (``sparse_capacity``, 2 and
1 by default; C2 at most p C1, all an owner receives) a rank sends ``(p - 1) (C1 + C2) ≈
(c1 + c2) k (p - 1) / p`` pairs: 3k(p-1)/p, Ok-Topk's bound in pairs, against the
allgather's (p - 1) k; it wins from p = 4 on.

Every size is fixed by (k, p, capacities), so no step waits on the device and no message
shape depends on data (an empty slot carries the index ``n``, one past the buffer). What
is not applied is not lost: a pair that did not fit its destination's ``C1``, or whose sum
lost at its owner, goes back into the sending rank's residual with its momentum restored
(``Compressor.give_back``), and the owner keeps the rounding of each published sum to the
value dtype in its own residual. A pair is applied only if it reached its owner and its
index was published, so every contribution to a published index was summed into it (the
trap in gTop-k's code, which clears a residual when the index wins elsewhere, does not
arise). Every rank scatters the same gathered bytes: the result is bit for bit the same on
all of them, for any p.

Regions and capacities are per tensor, so that what a tensor sends does not depend on which
tensors DDP put in its bucket (its first iteration after a restart groups them otherwise):
each compressed tensor's index range is cut into p regions and gets ``ceil(c1 k / p)`` send
slots and ``ceil(c2 k / p)`` published sums per region; the bucket's messages are these,
tensor after tensor. A tensor's regions are set at its first step and again every
``REBALANCE_STEPS`` steps: each rank histograms its selected indices of it into
``BINS_PER_RANK * p`` bins, one integer allreduce per bucket sums the histograms, and every
rank cuts them at the same quantiles, each bin counted one more than it holds (``cut``: a
tensor with a handful of picks keeps near-equal regions). Boundaries are saved with the
state, so a resume repeats them.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from dgc import codec
from dgc.collectives import Group
from dgc.plan import Plan
from dgc.transport import allgather

REBALANCE_STEPS = 64
BINS_PER_RANK = 32
PRIOR_PER_BIN = 1


def capacities(k: int, p: int, factors: tuple[float, float]) -> tuple[int, int]:
    """(C1, C2) of a tensor sending k pairs: slots per destination region, and sums each
    owner publishes. An owner receives p C1 pairs, so it has at most that many sums: C2 is
    capped there."""
    c1 = math.ceil(factors[0] * k / p)
    return c1, min(math.ceil(factors[1] * k / p), p * c1)


def exchange(group: Group, plan: Plan, flat: Tensor, sent: allgather.Pairs,
             positions: Mapping[str, Tensor], state, key: tuple) -> torch.futures.Future:
    """As ``allgather.exchange``, with the pairs summed by split-and-reduce. ``state`` (a
    ``DGCState``) keeps each tensor's regions and takes back what is not applied."""
    if not plan.sparse:
        return allgather.exchange(group, plan, flat, sent, positions)
    dense_slots, dense, futures = allgather.start_dense(group, plan, flat, positions)
    n, p, mine = flat.numel(), group.size, group.rank
    slots = plan.compressed
    bounds = state.regions(group, slots, [i for i, _ in sent])
    caps = [capacities(i.numel(), p, state.options.sparse_capacity) for i, _ in sent]
    fits, rows_idx, rows_val = [], [], []
    for s, (i, v), b, (c1, _) in zip(slots, sent, bounds, caps):
        fit, idx, val = _by_region(i, v, torch.tensor(b, device=i.device), p, c1, s.numel)
        fits.append(fit)
        rows_idx.append(torch.where(idx == s.numel, n, idx + s.offset))
        rows_val.append(val)
    c1_total = sum(c1 for c1, _ in caps)
    sizes = codec.Layout(c1_total, plan.layout.value_dtype, plan.layout.index_dtype)
    outgoing = codec.pack_rows(torch.cat(rows_idx, 1), torch.cat(rows_val, 1), sizes)
    incoming = torch.empty_like(outgoing)
    group.all_to_all(incoming, outgoing).wait()  # the owner needs its regions to go on
    got_idx, got_val = codec.unpack(incoming, sizes, p)
    pub_idx, pub_val, column = [], [], 0
    for s, b, (c1, c2) in zip(slots, bounds, caps):
        part_idx = got_idx[:, column:column + c1].long()
        local = torch.where(part_idx == n, s.numel, part_idx - s.offset)
        idx, val, rounding = _owner_sums(local, got_val[:, column:column + c1], b, mine, c2,
                                         s.numel)
        if rounding.any():  # the owner keeps the rounding to the wire dtype
            real = idx < s.numel
            state.add_to_residual(s.name, idx[real], rounding[real])
        pub_idx.append(torch.where(idx == s.numel, n, idx + s.offset))
        pub_val.append(val)
        column += c1
    published = codec.Layout(sum(c2 for _, c2 in caps), plan.layout.value_dtype,
                             plan.layout.index_dtype)
    packed = codec.pack(torch.cat(pub_idx), torch.cat(pub_val), published)
    gathered = packed.new_empty(p * packed.numel())
    futures.append(group.allgather(gathered, packed))

    def unpack(_) -> Tensor:
        all_idx, all_val = codec.unpack(gathered, published, p)
        all_idx = all_idx.reshape(1, -1).long()  # the owners' regions do not overlap
        codec.scatter_sum_(flat.zero_(), all_idx, all_val.reshape(1, -1), empty=n)
        mine = torch.cat([i + s.offset for s, (i, _) in zip(slots, sent)])
        published_mine = torch.isin(mine, all_idx).split([i.numel() for i, _ in sent])
        for s, (i, v), fit, won in zip(slots, sent, fits, published_mine):
            state.give_back(s.name, i, v, (fit & won).logical_not())
        if dense_slots:
            allgather.put_back_(flat, dense_slots, positions, dense)
        return flat

    return torch.futures.collect_all(futures).then(unpack)


def _by_region(indices: Tensor, values: Tensor, bounds: Tensor, p: int, c1: int, n: int
               ) -> tuple[Tensor, Tensor, Tensor]:
    """One tensor's pairs sorted into its p regions, each region's c1 largest by magnitude
    (ties by index) kept: (which pairs fit, [p, c1] indices with ``n`` in empty slots,
    [p, c1] values)."""
    k = indices.numel()
    region = torch.bucketize(indices, bounds[1:-1], right=True)
    order = torch.argsort(indices, stable=True)
    order = order[torch.argsort(values.abs().float()[order], descending=True, stable=True)]
    order = order[torch.argsort(region[order], stable=True)]
    counts = torch.bincount(region, minlength=p)
    first = torch.cumsum(counts, 0) - counts
    rank_in_region = torch.arange(k, device=indices.device) - first[region[order]]
    fits_sorted = rank_in_region < c1
    slot = region[order] * c1 + rank_in_region
    send_idx = torch.full((p * c1,), n, dtype=torch.long, device=indices.device)
    send_val = values.new_zeros(p * c1)
    send_idx[slot[fits_sorted]] = indices[order][fits_sorted]
    send_val[slot[fits_sorted]] = values[order][fits_sorted]
    fit = torch.zeros(k, dtype=torch.bool, device=indices.device)
    fit[order] = fits_sorted
    return fit, send_idx.view(p, c1), send_val.view(p, c1)


def _owner_sums(local: Tensor, val: Tensor, bounds: list[int], mine: int, c2: int, n: int
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Sum what the ranks sent this owner for one tensor (``local``: [p, c1] positions in
    the tensor, ``n`` for empty slots), row by row in rank order so the sum is the same on
    any device, and keep the c2 largest sums, ties by position: positions (``n`` where
    empty), values in the value dtype, and each value's rounding."""
    lo = bounds[mine]
    width = bounds[mine + 1] - lo
    rel = torch.where(local == n, width, local - lo)  # width marks the empty slots
    flat_rel = rel.reshape(-1)
    # each position's place: its first slot in sorted order (p * c1 places, not the region's
    # width, so nothing here grows with the tensor)
    sorted_rel, order = torch.sort(flat_rel, stable=True)
    place = torch.searchsorted(sorted_rel, rel)
    scratch = torch.zeros(flat_rel.numel(), dtype=torch.float32, device=val.device)
    for row_place, row_val in zip(place, val):
        scratch.index_add_(0, row_place, row_val.float())
    flat_place = place.reshape(-1)
    sums = scratch[flat_place]
    slot = torch.arange(flat_rel.numel(), device=val.device)
    # the stable sort keeps equal positions in slot order: a place's first slot is order[place]
    real = (order[flat_place] == slot) & (flat_rel != width)
    score = torch.where(real, sums.abs(), torch.full_like(sums, -1.0))
    order = order[torch.argsort(score[order], descending=True, stable=True)][:c2]
    chosen = real[order]
    pub = torch.where(chosen, flat_rel[order] + lo, torch.full_like(order, n))
    exact = torch.where(chosen, sums[order], torch.zeros_like(sums[order]))
    value = codec.to_wire(exact, val.dtype)
    return pub, value, exact - value.float()


def rebalanced(index_lists: list[Tensor], sizes: list[int], p: int, group: Group
               ) -> list[list[int]]:
    """Region boundaries (p + 1 positions) for each tensor, at the quantiles of where every
    rank's selected positions of it fall: one integer allreduce of all the tensors'
    histograms, so every rank cuts the same."""
    bins = BINS_PER_RANK * p
    hists = [torch.bincount(torch.div(i * bins, n, rounding_mode="floor"), minlength=bins)
             for i, n in zip(index_lists, sizes)]
    hist = torch.stack(hists).to(torch.int64)
    group.allreduce(hist).wait()
    # a host read, every REBALANCE_STEPS steps
    return [cut(h, n, p) for h, n in zip(hist.tolist(), sizes)]


def cut(hist: list[int], n: int, p: int) -> list[int]:
    """Boundaries (p + 1 positions in [0, n]) splitting ``hist``, counts of selected
    positions in equal bins of a tensor of n entries, into p regions of equal mass.

    Every bin counts ``PRIOR_PER_BIN`` more than it holds. A tensor that selects a few
    entries per rank (LeNet-300-100's 1,000-entry output layer selects one at density
    0.001) gives a histogram of a handful of picks, and cutting at their quantiles makes
    regions of chance widths; an owner of a wide one then publishes a fraction of what
    landed there. The prior keeps such a tensor's regions near equal, while a large
    tensor's thousands of picks still place its cuts."""
    bins = len(hist)
    counts = [count + PRIOR_PER_BIN for count in hist]
    total, cum, edges, j = sum(counts), 0, [0], 1
    for b, count in enumerate(counts):
        cum += count
        while j < p and cum * p >= j * total:
            edges.append(max(edges[-1], min(n, -(-(b + 1) * n // bins))))
            j += 1
    return edges + [n]
