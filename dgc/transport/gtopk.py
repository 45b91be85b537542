"""Sum selected pairs over a group in log2(p) rounds: recursive doubling with a top-k merge.

The allgather sends (p - 1) k pairs per rank and the sparse allreduce's all-to-all waits on
p - 1 messages; on a large group both pay for p. Global top-k (Shi et al., ICDCS 2019)
pairs the ranks up as recursive doubling does (round j: rank r with r XOR 2^j): the two
swap their k pairs of each tensor, add the two sets (an index in both is summed) and both
keep the same k largest sums. After log2(p) rounds every rank holds one set, the top k of
(nearly) the global sum. A rank sends k pairs per round, k log2(p) in all, in log2(p)
messages; sizes are fixed by k, so nothing waits on the device for a count (an empty slot
carries the index ``n``, one past the buffer).

What a round drops is not lost. Each rank follows its own pairs: once a merge its set was
part of drops an index, that rank's contribution to it can never reach the result (the
partner's group of ranks knows the same, since both sides compute the same merge), so it
goes back into the rank's residual with its momentum restored (``Compressor.give_back``).
An index dropped in one branch and kept in another is published with the contributions of
the branch that kept it only, and every rank of the other branch gives its own back: every
contribution is applied or returned exactly once, the trap of gTop-k's code (a residual
cleared because its index won elsewhere) does not arise.

Both partners add the same two sets in the same order (the lower rank's first), choose by
(|sum| descending, index ascending) and so hold bit-identical sets; the first round sends
the pairs in the value dtype, as they were selected; from the second on the sums travel in
float32, so no rounding needs a keeper. The group's size must be a power of two.

Where the plan says so (``Plan.dense_in_swaps``: the few kilobytes of biases on a group
large enough that an allreduce's latencies cost more than log2(p) copies of their bytes),
the dense slots ride in the same swaps, after the pairs in one buffer: recursive doubling
sums them as an allreduce would (round one in the value dtype, later rounds in float32),
and both partners add the same two vectors, so every rank ends with the same bits.
Otherwise they are allreduced beside the swaps.

Across nodes, when the group knows its node (``group.intra``), the rounds inside each node
come first, so every rank of a node then holds the same set. By default each swap across
nodes is split over the node's ranks (``_swap``): local rank q sends the q-th of r slices
and the node allgathers the slices it received, the same bits as the whole swap for 1/r of
the bytes between nodes, at one allgather inside the node per round. With
``gtopk_slices`` (``_across_nodes``) local rank q keeps only its slice and runs the rounds
across nodes on it with its counterparts (ceil(k / r) per tensor), and the node allgathers
the final slices once at the end: no per-round allgather, but the result sums r per-slice
selections rather than one top k, which cost accuracy in the one run that measured it
(README, "Exchanges"). What a slice drops is given back as above: the node allgathers which
entries of its own set survived every round.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from dgc import codec
from dgc.collectives import Group
from dgc.plan import Plan
from dgc.transport import allgather


def is_power_of_two(p: int) -> bool:
    return p >= 1 and p & (p - 1) == 0


def rounds(p: int) -> int:
    return p.bit_length() - 1


def merge(idx_lo: Tensor, val_lo: Tensor, idx_hi: Tensor, val_hi: Tensor, k: int, empty: int
          ) -> tuple[Tensor, Tensor]:
    """The k largest sums of two sets of distinct indices (``empty`` marks an empty slot):
    an index in both is summed, the lower rank's value first; ties go to the lower index;
    slots beyond the live sums are empty. The same inputs give the same bits anywhere."""
    idx, val, _ = merge_rows(torch.stack([idx_lo, idx_hi]), torch.stack([val_lo, val_hi]), k,
                             empty)
    return idx, val


def merge_rows(idx: Tensor, val: Tensor, k: int, empty: int, by_magnitude: bool = True
               ) -> tuple[Tensor, Tensor, Tensor]:
    """``merge`` of the sets in the rows of ``idx`` and ``val`` (``[sets, count]``, indices
    distinct within a row): an index in several rows is summed in row order, in float32.
    The k sums come by descending magnitude (ties by index), or, with ``by_magnitude``
    False, by ascending index; either way the empty slots last. The third result gives, for
    every entry of the rows, the place of its index among the k, or -1 where it is not
    there (an empty slot is never there).

    The k are found by selection (the k-th largest magnitude, ties at it to the lower
    index), not by a sort of all the sums; only the k are sorted, and only by magnitude."""
    sidx, sums, live, order, first = _summed(idx, val, empty)
    score = torch.where(live, sums.abs(), torch.full_like(sums, -1.0))
    chosen = _k_largest(score, k) & live
    count = chosen.numel()
    if chosen.is_cuda:
        at = torch.nonzero_static(chosen, size=k, fill_value=count).view(-1)
    else:  # a sync costs nothing on the host; nonzero_static is the slower kernel there
        at = chosen.nonzero().view(-1)
        at = torch.cat([at, at.new_full((k - at.numel(),), count)])
    # the chosen, in index order, are places 0.. of ``at``; an entry's run starts at ``head``
    slot = torch.cumsum(chosen, 0) - 1  # each sorted entry's place among the chosen
    if by_magnitude:  # a padded place scores -1 and stays last
        by = torch.argsort(torch.cat([score, score.new_full((1,), -1.0)])[at], descending=True,
                           stable=True)
        at = at[by]
        slot = torch.empty_like(by).index_copy_(0, by, torch.arange(k, device=by.device))[
            slot.clamp(min=0)]
    merged_idx = torch.cat([sidx, sidx.new_full((1,), empty)])[at]
    merged_val = torch.cat([sums, sums.new_zeros(1)])[at]
    head = torch.where(first, torch.arange(count, device=sidx.device), 0).cummax(0).values
    place = torch.empty_like(head)
    place[order] = torch.where(chosen[head], slot[head], -1)
    return merged_idx, merged_val, place.view(idx.shape)


def _summed(idx: Tensor, val: Tensor, empty: int
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The rows' entries sorted by index (stable, so an index's run is in row order); each
    run's sum in its first entry; which entries are live run heads (not empty); the sort's
    order; which entries head a run."""
    rows = idx.shape[0]
    idx, val = idx.reshape(-1), val.reshape(-1).float()
    order = torch.argsort(idx, stable=True)
    idx, val = idx[order], val[order]
    first = torch.ones_like(idx, dtype=torch.bool)
    first[1:] = idx[1:] != idx[:-1]
    # an index occurs at most once per row, so its run is at most ``rows`` long and sorted
    # by row: its first slot sums the run left to right, the same bits on every rank
    sums = val.clone()
    for d in range(1, rows):
        same = torch.zeros_like(first)
        same[:-d] = idx[d:] == idx[:-d]
        shifted = torch.zeros_like(val)
        shifted[:-d] = val[d:]
        sums = sums + torch.where(same, shifted, torch.zeros_like(val))
    return idx, sums, first & (idx != empty), order, first


def _k_largest(score: Tensor, k: int) -> Tensor:
    """Where the k largest entries of ``score`` are, ties to the lower position: what the
    first k of a stable descending sort hold, found by selection (no host sync)."""
    if k >= score.numel():
        return torch.ones_like(score, dtype=torch.bool)
    kth = torch.kthvalue(score, score.numel() - k + 1).values
    above = score > kth
    ties = score == kth
    return above | (ties & (torch.cumsum(ties, 0) <= k - above.sum()))


def exchange(group: Group, plan: Plan, flat: Tensor, sent: allgather.Pairs,
             positions: Mapping[str, Tensor], state) -> torch.futures.Future:
    """As ``allgather.exchange``, with the pairs, and the dense slots beside them, summed by
    recursive doubling. ``state`` (a ``DGCState``) takes back the pairs whose contribution
    did not reach the result."""
    if not plan.sparse:
        return allgather.exchange(group, plan, flat, sent, positions)
    n, p, mine = flat.numel(), group.size, group.rank
    if plan.dense_in_swaps:  # ``dense`` rides in the swaps
        dense_slots, beside, futures = allgather.dense_in_name_order(plan), None, []
        dense = allgather.live_entries(flat, dense_slots, positions, plan.layout.value_dtype)
    else:  # allreduced beside them; nothing rides
        dense_slots, beside, futures = allgather.start_dense(group, plan, flat, positions)
        dense = flat.new_zeros(0, dtype=plan.layout.value_dtype)
    slots = plan.compressed
    ks = [i.numel() for i, _ in sent]
    cur_idx = torch.cat([i + s.offset for s, (i, _) in zip(slots, sent)])
    cur_val = torch.cat([v for _, v in sent])
    where = torch.arange(cur_idx.numel(), device=cur_idx.device)  # my pairs in the set
    mine_idx = cur_idx  # the merges make new tensors: this stays my own pairs
    intra = group.intra
    r = intra.size if intra is not None else 1
    sliced = r > 1 and state.options.gtopk_slices
    across = rounds(p)  # the first round in slices (none without gtopk_slices)
    for j in range(rounds(p)):
        peer = mine ^ (1 << j)
        if sliced and mine_node(group, mine) != mine_node(group, peer):
            across = j  # the rounds inside the node are done: the node holds one set
            break
        cur_idx, cur_val, dense, where = _round(group, peer, cur_idx, cur_val, dense, where,
                                                ks, plan.layout.index_dtype, n)
    alive = where >= 0  # my own pairs, slot after slot
    rows = None
    if across < rounds(p):  # each of the node's ranks follows its slice of the set
        rows, published, dense = _across_nodes(group, cur_idx, cur_val, dense, ks, across,
                                               plan, n)
        alive &= torch.isin(mine_idx, published)
    give_back_lost(state, slots, sent, alive)
    # an index may be in several slices: summed slice by slice, in one order
    summands = rows if rows is not None else (cur_idx[None], cur_val[None])

    def unpack(_) -> Tensor:
        codec.scatter_sum_(flat.zero_(), *summands, empty=n)
        if dense_slots:
            allgather.put_back_(flat, dense_slots, positions,
                                beside if beside is not None else dense.to(flat.dtype))
        return flat

    if not futures:  # every swap waited for its partner
        done = torch.futures.Future()
        done.set_result(None)
        futures.append(done)
    return torch.futures.collect_all(futures).then(unpack)


def slice_of(idx: Tensor, val: Tensor, r: int, q: int, empty: int) -> tuple[Tensor, Tensor]:
    """The q-th of r equal slices of a set of pairs, padded with empty slots (index
    ``empty``, value 0) to ceil(count / r) pairs each."""
    return _part(idx, r, q, empty), _part(val, r, q)


def _part(t: Tensor, r: int, q: int, fill: int = 0) -> Tensor:
    """The q-th of r equal slices of ``t``, padded with ``fill`` to ceil(len / r) each."""
    part = -(-t.numel() // r)
    t = torch.cat([t, t.new_full((part * r - t.numel(),), fill)])
    return t[q * part:(q + 1) * part]


def _message(idx: Tensor, val: Tensor, dense: Tensor, index_dtype: torch.dtype
             ) -> tuple[Tensor, codec.Layout]:
    """One buffer for a swap: the pairs as ``codec.pack`` lays them out, then the dense
    entries' bytes, padded to 8; and the pairs' layout."""
    layout = codec.Layout(idx.numel(), val.dtype, index_dtype)
    if not dense.numel():
        return codec.pack(idx, val, layout), layout
    out = torch.zeros(layout.nbytes + codec.aligned(dense.nbytes), dtype=torch.uint8,
                      device=val.device)
    out[:layout.nbytes] = codec.pack(idx, val, layout)
    out[layout.nbytes:layout.nbytes + dense.nbytes].view(dense.dtype).copy_(dense)
    return out, layout


def _read(buffer: Tensor, layout: codec.Layout, rows: int, like: Tensor
          ) -> tuple[Tensor, Tensor, Tensor]:
    """Views (indices, values, dense entries shaped as ``like``), one row per ``_message``
    in ``buffer``."""
    row_nbytes = buffer.numel() // rows
    idx, val = codec.unpack(buffer, layout, rows, row_nbytes)
    tail = buffer.view(rows, row_nbytes)[:, layout.nbytes:layout.nbytes + like.nbytes]
    return idx, val, tail.view(like.dtype)


def _count_dense(group: Group, nbytes: float) -> None:
    """The dense entries' share of what a swap or allgather just counted."""
    group.owner.stats.bytes_dense_tensors += nbytes


def merge_slots(idx: Tensor, val: Tensor, ks: list[int], empty: int, by_magnitude: bool = True
                ) -> tuple[Tensor, Tensor, Tensor]:
    """``merge_rows`` slot by slot: the rows of ``idx`` and ``val`` (``[sets, sum(ks)]``)
    hold each slot's ``ks`` entries one slot after another; each slot keeps its k, and the
    merged slots follow one another in the result. The places are in the whole result."""
    new_idx, new_val, places, column = [], [], [], 0
    for k in ks:
        i, v, place = merge_rows(idx[:, column:column + k], val[:, column:column + k], k,
                                 empty, by_magnitude)
        new_idx.append(i)
        new_val.append(v)
        places.append(torch.where(place >= 0, place + column, place))
        column += k
    return torch.cat(new_idx), torch.cat(new_val), torch.cat(places, dim=1)


def give_back_lost(state, slots, sent, kept: Tensor) -> None:
    """Give back to ``state`` (a ``DGCState``) every pair of ``sent`` (per compressed slot,
    one after another) whose place in ``kept`` is False: its contribution did not reach
    the result."""
    column = 0
    for s, (i, v) in zip(slots, sent):
        state.give_back(s.name, i, v, ~kept[column:column + i.numel()])
        column += i.numel()


def _round(group: Group, peer: int, idx: Tensor, val: Tensor, dense: Tensor, where: Tensor,
           ks: list[int], index_dtype: torch.dtype, empty: int, whole: bool = False
           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One round of recursive doubling with ``peer``: swap the sets (and dense entries),
    merge them slot by slot, sum the dense entries in float32, and follow this rank's own
    entries (``where``, -1: gone) into the merged set. The same bits on both ranks."""
    got_idx, got_val, got_dense = _swap(group, idx, val, dense, peer, index_dtype, empty,
                                        whole=whole)
    idx, val, place = _merge_pair(idx, val, got_idx, got_val, ks, group.rank < peer, empty)
    return idx, val, dense.float() + got_dense.float(), _follow(where, place)


def _merge_pair(idx: Tensor, val: Tensor, got_idx: Tensor, got_val: Tensor, ks: list[int],
                lower: bool, empty: int) -> tuple[Tensor, Tensor, Tensor]:
    """Merge this rank's set with its partner's slot by slot, the lower rank's first; and
    where each entry of this rank's set went in the merged one (-1: dropped)."""
    rows = ((idx, val), (got_idx, got_val)) if lower else ((got_idx, got_val), (idx, val))
    new_idx, new_val, places = merge_slots(torch.stack([rows[0][0], rows[1][0]]),
                                           torch.stack([rows[0][1], rows[1][1]]), ks, empty)
    return new_idx, new_val, places[0 if lower else 1]


def _follow(where: Tensor, place: Tensor) -> Tensor:
    """Where entries that were at ``where`` in a set (-1: gone) are after a merge that moved
    that set's entry i to ``place[i]``."""
    return torch.where(where >= 0, place[where.clamp(min=0)], where)


def _swap(group: Group, idx: Tensor, val: Tensor, dense: Tensor, peer: int,
          index_dtype: torch.dtype, empty: int, whole: bool = False
          ) -> tuple[Tensor, Tensor, Tensor]:
    """``peer``'s set and dense entries for this rank's. Across nodes, when the group knows
    its node (``group.intra``) and not ``whole``, every rank of the node holds the same set
    (the rounds inside the node came first), so local rank q sends only the q-th of r
    slices of it (and of the dense entries) to its counterpart on the peer's node, and the
    node allgathers the slices it received: the peer node's set arrives whole, but a node's
    link carries it once instead of r times."""
    intra = group.intra
    r = intra.size if intra is not None else 1
    if whole or r == 1 or mine_node(group, group.rank) == mine_node(group, peer):
        outgoing, layout = _message(idx, val, dense, index_dtype)
        incoming = torch.empty_like(outgoing)
        group.sendrecv(incoming, outgoing, peer)
        _count_dense(group, codec.aligned(dense.nbytes))
        got_idx, got_val, got_dense = _read(incoming, layout, 1, dense)
        return got_idx[0].long(), got_val[0], got_dense[0]
    count, q = idx.numel(), intra.rank
    mine_dense = _part(dense, r, q)
    outgoing, layout = _message(*slice_of(idx, val, r, q, empty), mine_dense, index_dtype)
    incoming = torch.empty_like(outgoing)
    group.sendrecv(incoming, outgoing, peer)
    gathered = incoming.new_empty(r * incoming.numel())
    intra.allgather(gathered, incoming).wait()
    _count_dense(group, r * codec.aligned(mine_dense.nbytes))
    got_idx, got_val, got_dense = _read(gathered, layout, r, mine_dense)
    return (got_idx.reshape(-1)[:count].long(), got_val.reshape(-1)[:count],
            got_dense.reshape(-1)[:dense.numel()])


def _across_nodes(group: Group, idx: Tensor, val: Tensor, dense: Tensor, ks: list[int],
                  first: int, plan: Plan, empty: int
                  ) -> tuple[tuple[Tensor, Tensor], Tensor, Tensor]:
    """The rounds from ``first`` on, which cross nodes. Every rank of the node holds the same
    set (``idx``, ``val``); local rank q keeps only the q-th of r slices of each slot's set
    and runs the remaining rounds on it with its counterparts on the other nodes (same q),
    keeping ceil(k / r) per slot: a node's link carries its set once per round instead of r
    times, and no round waits for the node. The dense entries (``dense``, the same on every
    rank of the node) are sliced and summed alike. Then the node allgathers its r final
    slices and, beside them, the entries of its own set that survived every round.

    Returns the rows of (index, value) to sum (r slices, the same on every rank of the
    world), the indices of this node's set that reached them (a rank's pair that is not
    among those was dropped on the way), and the dense entries summed over the world."""
    intra = group.intra
    r, q, mine = intra.size, intra.rank, group.rank
    parts = [-(-k // r) for k in ks]
    held, column = [], 0
    for k in ks:
        held.append(slice_of(idx[column:column + k], val[column:column + k].float(), r, q,
                             empty))
        column += k
    cur_idx, cur_val = torch.cat([i for i, _ in held]), torch.cat([v for _, v in held])
    cur_dense = _part(dense.float(), r, q)
    own = cur_idx  # this slice of the node's set (the merges make new tensors), and where
    where = torch.arange(own.numel(), device=own.device)  # it is now
    for j in range(first, rounds(group.size)):
        cur_idx, cur_val, cur_dense, where = _round(
            group, mine ^ (1 << j), cur_idx, cur_val, cur_dense, where, parts,
            plan.layout.index_dtype, empty, whole=True)
    alive = where >= 0
    # one allgather in the node: the final slice's pairs, the surviving own entries, the
    # dense slice
    count = cur_idx.numel()
    survived = torch.where(alive, own, torch.full_like(own, empty))
    packed, layout = _message(torch.cat([cur_idx, survived]),
                              torch.cat([cur_val, torch.zeros_like(cur_val)]), cur_dense,
                              plan.layout.index_dtype)
    gathered = packed.new_empty(r * packed.numel())
    intra.allgather(gathered, packed).wait()
    _count_dense(group, (r - 1) * codec.aligned(cur_dense.nbytes))
    got_idx, got_val, got_dense = _read(gathered, layout, r, cur_dense)
    published = got_idx[:, count:].reshape(-1).long()
    dense = got_dense.reshape(-1)[:dense.numel()]
    return (got_idx[:, :count].long(), got_val[:, :count]), published, dense  # empties match none


def mine_node(group: Group, rank: int) -> int:
    """The node of ``rank`` in a group placed node by node."""
    return rank // (group.size // max(group.nodes, 1))
