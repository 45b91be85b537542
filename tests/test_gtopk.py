"""The recursive-doubling exchange (``exchange: gtopk``): its merge on hand-made sets, and on
real Gloo ranks at p = 2, 4 and 8: nothing lost over all ranks, ranks identical, SGD at
density 1, resume bitwise, with the dense slots allreduced beside the swaps and carried in
them; log2(p) messages of fixed size; one line for a group that is not a power of two.

``LATENCY``: an exchange link slow enough to start (50 us) makes the plan carry the dense
slots in the swaps (``dgc.plan.dense_rides_swaps``); with none (the library's default) an
allreduce beside them costs fewer bytes."""
import hashlib

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import dgc
from dgc.transport.gtopk import merge, merge_rows
from sparse_comm.schema import ConfigError
from tests.dgc_helpers import WIRE_DENSITY, WIRE_K, WIRE_NUMEL, one_tensor_dgc
from tests.distributed import run_ranks
from tests.test_sparse_allreduce import SPARSE, _all_rank

EMPTY = 100
LATENCY = 50.0


def test_merge_sums_shared_indices_keeps_the_k_largest_and_breaks_ties_by_index():
    idx_lo, val_lo = torch.tensor([3, 7, 9, EMPTY]), torch.tensor([1.0, -4.0, 2.0, 0.0])
    idx_hi, val_hi = torch.tensor([9, 5, 3, 1]), torch.tensor([-2.0, 2.0, 2.5, 0.5])
    idx, val = merge(idx_lo, val_lo, idx_hi, val_hi, 4, EMPTY)
    # sums: 3 -> 3.5, 7 -> -4, 9 -> 0, 5 -> 2, 1 -> 0.5; the largest four by magnitude
    assert idx.tolist() == [7, 3, 5, 1]
    assert val.tolist() == [-4.0, 3.5, 2.0, 0.5]
    # ties: equal magnitudes go to the lower index
    idx, _ = merge(torch.tensor([8, 2]), torch.tensor([1.0, -1.0]),
                   torch.tensor([4, EMPTY]), torch.tensor([1.0, 0.0]), 2, EMPTY)
    assert idx.tolist() == [2, 4]


def test_merge_pads_with_empty_slots_when_fewer_sums_are_live():
    idx, val = merge(torch.tensor([5, EMPTY]), torch.tensor([1.0, 0.0]),
                     torch.tensor([5, EMPTY]), torch.tensor([-1.0, 0.0]), 2, EMPTY)
    assert idx.tolist() == [5, EMPTY] and val.tolist() == [0.0, 0.0]
    idx, val = merge(torch.tensor([EMPTY, EMPTY]), torch.zeros(2),
                     torch.tensor([EMPTY, EMPTY]), torch.zeros(2), 2, EMPTY)
    assert idx.tolist() == [EMPTY, EMPTY]


def test_merge_is_the_same_bits_from_either_side_in_fp16_sums():
    g = torch.Generator().manual_seed(0)
    a_idx, b_idx = torch.randperm(1000, generator=g)[:50], torch.randperm(1000, generator=g)[:50]
    a_val = torch.randn(50, generator=g).half()
    b_val = torch.randn(50, generator=g).half()
    one = merge(a_idx, a_val, b_idx, b_val, 50, 1000)
    two = merge(a_idx.clone(), a_val.clone(), b_idx.clone(), b_val.clone(), 50, 1000)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def _merge_by_sorting(idx, val, k, empty):
    """The merge written plainly: sum each index's values in row order, sort every sum by
    magnitude (stable, so ties go to the lower index), keep the first k."""
    flat_idx, flat_val = idx.reshape(-1), val.reshape(-1).float()
    sums: dict[int, torch.Tensor] = {}
    for i, v in zip(flat_idx.tolist(), flat_val):
        if i != empty:
            sums[i] = sums[i] + v if i in sums else v.clone()
    keys = sorted(sums)
    order = sorted(range(len(keys)), key=lambda j: -float(sums[keys[j]].abs()))[:k]
    chosen = [keys[j] for j in order]
    values = [sums[i] for i in chosen]
    pad = k - len(chosen)
    return (torch.tensor(chosen + [empty] * pad),
            torch.stack(values + [torch.tensor(0.0)] * pad) if k else torch.zeros(0))


@pytest.mark.parametrize("rows,k", [(2, 50), (3, 50), (2, 7), (4, 120), (2, 200)])
def test_merge_rows_selects_what_a_full_sort_keeps_and_places_every_entry(rows, k):
    g = torch.Generator().manual_seed(rows * 1000 + k)
    n = 400
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(rows)])
    idx[1, :5] = n  # a few empty slots
    # coarse values: equal magnitudes tie at the k-th place, where the lower index wins
    val = torch.randint(-4, 5, (rows, k), generator=g).half()
    val[1, :5] = 0
    ref_idx, ref_val = _merge_by_sorting(idx, val, k, n)
    got_idx, got_val, place = merge_rows(idx, val, k, n)
    assert torch.equal(got_idx, ref_idx) and torch.equal(got_val, ref_val)  # the same bits
    by_index, by_index_val, index_place = merge_rows(idx, val, k, n, by_magnitude=False)
    live = ref_idx != n
    count = int(live.sum())
    order = torch.argsort(ref_idx[live])
    assert torch.equal(by_index[:count], ref_idx[live][order])
    assert torch.equal(by_index_val[:count], ref_val[live][order])
    assert (by_index[count:] == n).all() and (by_index_val[count:] == 0).all()
    for merged, at in ((got_idx, place), (by_index, index_place)):
        held = at >= 0
        assert torch.equal(held, torch.isin(idx, ref_idx[live]))  # who is in the result
        assert torch.equal(merged[at[held]], idx[held])  # and where


@pytest.mark.parametrize("world_size,latency_us", [(2, 0.0), (4, 0.0), (4, LATENCY),
                                                  (8, LATENCY)])
def test_nothing_is_lost_ranks_agree_sgd_at_density_one_and_resume_is_bitwise(world_size,
                                                                              latency_us):
    dtype = "fp16" if world_size == 8 else "fp32"
    for (errors, agree, sparse), (worst, same, resumed_sparse) in run_ranks(
            _all_rank, world_size, [2.0, 1.0], dtype, "gtopk", None, False, latency_us,
            timeout=600):
        assert agree and sparse > 0
        assert max(errors.values()) < 1e-6, errors
        assert worst < 1e-6
        assert same and resumed_sparse > 0


def _bytes_rank(rank, world_size, numel, density):
    ddp, state = one_tensor_dgc(numel, density, "gtopk", **SPARSE)
    sizes = []
    real = dist.batch_isend_irecv

    def swap(ops):
        sizes.extend(op.tensor.nbytes for op in ops if op.op == dist.isend)
        return real(ops)
    dist.batch_isend_irecv = swap
    try:
        x = torch.randn(4, numel // 1000, generator=torch.Generator().manual_seed(rank))
        ddp(x).square().sum().backward()
    finally:
        dist.batch_isend_irecv = real
    return sizes, state.stats.bytes_sent


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_wire_bytes_are_log2_p_rounds_of_k_pairs_within_6k_pairs(world_size):
    """One tensor, k = 25,000 (``dgc_helpers.WIRE_NUMEL``): round one sends the k pairs as
    selected (int32 + fp16, 6 bytes), each later round k sums (int32 + fp32, 8 bytes); in
    6-byte pairs that stays under the issue's 6k(p-1)/p at p = 2, 4, 8."""
    k = WIRE_K
    rounds = world_size.bit_length() - 1
    for sizes, counted in run_ranks(_bytes_rank, world_size, WIRE_NUMEL, WIRE_DENSITY,
                                    timeout=300):
        assert sizes == [k * 6] + [k * 8] * (rounds - 1)
        assert counted == sum(sizes)
        pairs = counted / 6
        assert pairs <= 6 * k * (world_size - 1) / world_size
        print(f"p={world_size}: {counted} bytes ({pairs:.0f} 6-byte pairs) per rank; "
              f"allgather would send {(world_size - 1) * k} pairs")


def _carried_rank(rank, world_size, latency_us):
    """One step of a Linear(100, 50) with its bias (50 dense entries) under gtopk at
    density 0.1 (k = 500): the sizes of the swaps' sends and of the allreduces."""
    model = torch.nn.Linear(100, 50)
    ddp = DDP(model)
    state = dgc.attach(ddp, torch.optim.SGD(model.parameters(), lr=0.0), density=0.1,
                       value_dtype="fp16", index_dtype="int32", exchange="gtopk",
                       exchange_latency_us=latency_us, **SPARSE)
    sends, reduces = [], []
    real = dist.batch_isend_irecv, dist.all_reduce

    def swap(ops):
        sends.extend(op.tensor.nbytes for op in ops if op.op == dist.isend)
        return real[0](ops)

    def reduce(t, *args, **kwargs):
        reduces.append(t.nbytes)
        return real[1](t, *args, **kwargs)
    dist.batch_isend_irecv, dist.all_reduce = swap, reduce
    try:
        ddp(torch.randn(8, 100, generator=torch.Generator().manual_seed(rank))).sum().backward()
    finally:
        dist.batch_isend_irecv, dist.all_reduce = real
    return sends, reduces, state.stats.bytes_dense_tensors, state.stats.bytes_sent


def test_dense_slots_ride_in_the_swaps_when_the_link_has_latency_and_go_beside_without():
    """Round one: 500 pairs of 6 bytes and the bias in fp16 (100 bytes, padded to 104);
    round two: 500 float32 sums (8 bytes a pair) and the bias summed in float32 (200)."""
    for sends, reduces, dense, total in run_ranks(_carried_rank, 4, LATENCY, timeout=120):
        assert sends == [3000 + 104, 4000 + 200] and reduces == []
        assert dense == 104 + 200 and total == sum(sends)
    for sends, reduces, dense, _ in run_ranks(_carried_rank, 4, 0.0, timeout=120):
        assert sends == [3000, 4000] and reduces == [100]
        assert dense == 1.5 * 100  # a ring allreduce's 2(p-1)/p


def _three_rank(rank, world_size):
    model = torch.nn.Linear(20, 20)
    ddp = DDP(model)
    try:
        dgc.attach(ddp, torch.optim.SGD(model.parameters(), lr=0.1), exchange="gtopk")
    except ConfigError as err:
        return str(err)
    return None


def test_gtopk_on_a_group_that_is_not_a_power_of_two_is_refused_in_one_line():
    for message in run_ranks(_three_rank, 3, timeout=120):
        assert message is not None and "power of two" in message and "\n" not in message


@pytest.mark.parametrize("world_size,latency_us", [(4, 0.0), (8, LATENCY)])
def test_rounds_across_nodes_in_slices_lose_nothing_agree_and_resume(world_size, latency_us):
    """gtopk_slices with 2 ranks per node: at p = 4 one round crosses nodes, at p = 8 two
    (slices merge with slices, the dense slots' slices with them), in fp16 at p = 8."""
    dtype = "fp16" if world_size == 8 else "fp32"
    for (errors, agree, sparse), (worst, same, resumed_sparse) in run_ranks(
            _all_rank, world_size, [2.0, 1.0], dtype, "gtopk", 2, True, latency_us,
            timeout=600):
        assert agree and sparse > 0
        assert max(errors.values()) < 1e-6, errors
        assert worst < 1e-6
        assert same and resumed_sparse > 0


def _split_rank(rank, world_size, latency_us):
    """The same steps with the swaps across nodes split over each node's two ranks, whole,
    and in slices (gtopk_slices); the dense slots ride in the swaps on a link with
    ``latency_us``."""
    from tests.test_dgc_distributed import MLP, _flat, _sgd, _train
    out = {}
    for per_node, slices in ((2, False), (1, False), (2, True)):
        model = MLP(0, wide=True)
        ddp = DDP(model, bucket_cap_mb=100)
        opt = _sgd(model, momentum=0.9, weight_decay=1e-3)
        state = dgc.attach(ddp, opt, density=0.03, exchange="gtopk", ranks_per_node=per_node,
                           gtopk_slices=slices, exchange_latency_us=latency_us, **SPARSE)
        _train(ddp, opt, 6, rank)
        digest = hashlib.sha256(_flat(model).numpy().tobytes()).hexdigest()
        out[per_node, slices] = (digest, state.stats.bytes_inter, state.world.intra is not None)
    return out  # digests, not tensors: run_ranks carries plain values back


@pytest.mark.parametrize("latency_us", [0.0, LATENCY])
def test_swaps_across_nodes_split_over_the_node_give_the_same_bits_for_fewer_node_bytes(
        latency_us):
    for out in run_ranks(_split_rank, 4, latency_us, timeout=300):
        (split, split_inter, has_node), (whole, whole_inter, no_node) = out[2, False], out[1, False]
        sliced, sliced_inter, _ = out[2, True]
        assert has_node and not no_node
        assert split == whole and sliced != whole
        # 2 x 2: round 0 inside the node (no inter bytes), round 1 across: half the set
        assert 0 < split_inter < 0.6 * whole_inter
        assert sliced_inter == split_inter
