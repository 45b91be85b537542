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

Across nodes the swap is split over the node's ranks (``_swap``): the result is the same
bits, the inter-node bytes per rank 1/r of the set, plus an allgather inside the node.
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
    return merge_rows(torch.stack([idx_lo, idx_hi]), torch.stack([val_lo, val_hi]), k, empty)


def merge_rows(idx: Tensor, val: Tensor, k: int, empty: int) -> tuple[Tensor, Tensor]:
    """``merge`` of the sets in the rows of ``idx`` and ``val`` (``[sets, count]``, indices
    distinct within a row): an index in several rows is summed in row order, in float32."""
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
    live = first & (idx != empty)
    score = torch.where(live, sums.abs(), torch.full_like(sums, -1.0))
    keep = torch.argsort(score, descending=True, stable=True)[:k]  # idx is sorted: ties by index
    kept = live[keep]
    return (torch.where(kept, idx[keep], torch.full_like(idx[keep], empty)),
            torch.where(kept, sums[keep], torch.zeros_like(sums[keep])))


def exchange(group: Group, plan: Plan, flat: Tensor, sent: allgather.Pairs,
             positions: Mapping[str, Tensor], state) -> torch.futures.Future:
    """As ``allgather.exchange``, with the pairs summed by recursive doubling. ``state``
    (a ``DGCState``) takes back the pairs whose contribution did not reach the result."""
    if not plan.sparse:
        return allgather.exchange(group, plan, flat, sent, positions)
    dense_slots, dense, futures = allgather.start_dense(group, plan, flat, positions)
    n, p, mine = flat.numel(), group.size, group.rank
    slots = plan.compressed
    ks = [i.numel() for i, _ in sent]
    cur_idx = torch.cat([i + s.offset for s, (i, _) in zip(slots, sent)])
    cur_val = torch.cat([v for _, v in sent])
    alive = torch.ones_like(cur_idx, dtype=torch.bool)  # my own pairs, slot after slot
    mine_idx = cur_idx.clone()
    for j in range(rounds(p)):
        peer = mine ^ (1 << j)
        got_idx, got_val = _swap(group, cur_idx, cur_val, peer, plan.layout.index_dtype, n)
        new_idx, new_val, column = [], [], 0
        for k in ks:
            a = (cur_idx[column:column + k], cur_val[column:column + k])
            b = (got_idx[column:column + k], got_val[column:column + k])
            lo, hi = (a, b) if mine < peer else (b, a)
            idx, val = merge(*lo, *hi, k, n)
            new_idx.append(idx)
            new_val.append(val)
            column += k
        cur_idx, cur_val = torch.cat(new_idx), torch.cat(new_val)
        alive &= torch.isin(mine_idx, cur_idx)
    column = 0
    for s, (i, v), k in zip(slots, sent, ks):
        lost = ~alive[column:column + k]
        state.give_back(s.name, i, v, lost)
        column += k

    def unpack(_) -> Tensor:
        summed = flat.new_zeros(n + 1)  # the last entry takes the empty slots
        summed.index_copy_(0, cur_idx, cur_val.to(flat.dtype))
        flat.copy_(summed[:n])
        if dense_slots:
            allgather.put_back_(flat, dense_slots, positions, dense)
        return flat

    if not futures:
        done = torch.futures.Future()
        done.set_result(None)
        futures.append(done)
    return torch.futures.collect_all(futures).then(unpack)


def _swap(group: Group, idx: Tensor, val: Tensor, peer: int, index_dtype: torch.dtype,
          empty: int) -> tuple[Tensor, Tensor]:
    """``peer``'s set for this rank's. Across nodes, when the group knows its node
    (``group.intra``), every rank of the node holds the same set (the rounds inside the
    node came first), so local rank q sends only the q-th of r slices of it to its
    counterpart on the peer's node, and the node allgathers the slices it received: the
    peer node's set arrives whole, but a node's link carries it once instead of r times."""
    intra = group.intra
    r = intra.size if intra is not None else 1
    if r == 1 or mine_node(group, group.rank) == mine_node(group, peer):
        layout = codec.Layout(idx.numel(), val.dtype, index_dtype)
        outgoing = codec.pack(idx, val, layout)
        incoming = torch.empty_like(outgoing)
        group.sendrecv(incoming, outgoing, peer)
        got_idx, got_val = codec.unpack(incoming, layout, 1)
        return got_idx[0].long(), got_val[0]
    count = idx.numel()
    part = -(-count // r)
    padded_idx = torch.full((part * r,), empty, dtype=idx.dtype, device=idx.device)
    padded_val = val.new_zeros(part * r)
    padded_idx[:count], padded_val[:count] = idx, val
    q = intra.rank
    layout = codec.Layout(part, val.dtype, index_dtype)
    outgoing = codec.pack(padded_idx[q * part:(q + 1) * part],
                          padded_val[q * part:(q + 1) * part], layout)
    incoming = torch.empty_like(outgoing)
    group.sendrecv(incoming, outgoing, peer)
    gathered = incoming.new_empty(r * incoming.numel())
    intra.allgather(gathered, incoming).wait()
    got_idx, got_val = codec.unpack(gathered, layout, r)
    return got_idx.reshape(-1)[:count].long(), got_val.reshape(-1)[:count]


def mine_node(group: Group, rank: int) -> int:
    """The node of ``rank`` in a group placed node by node."""
    return rank // (group.size // max(group.nodes, 1))
