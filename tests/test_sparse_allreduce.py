"""The sparse allreduce on real Gloo ranks at p = 2, 3, 4 and 8: nothing lost over all ranks
(what was applied plus every residual is the sum of the momentum-corrected gradients),
ranks identical, resume bitwise, SGD at density 1; and its bytes at the collectives."""
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import dgc
from dgc.transport.sparse_allreduce import _owner_sums, capacities, cut
from tests.dgc_helpers import (WIRE_DENSITY, WIRE_K, WIRE_NUMEL, nothing_lost, one_tensor_dgc,
                               resumed)
from tests.distributed import run_ranks
from tests.test_dgc_distributed import MLP, _flat, _sgd, _train

SPARSE = dict(min_numel=100, warmup_epochs=0)


def _conservation_rank(rank, world_size, capacity, value_dtype, exchange="sparse_allreduce",
                       per_node=None, slices=False, latency_us=0.0):
    torch.manual_seed(0)
    model = MLP(wide=True)
    ddp = DDP(model, bucket_cap_mb=0.5)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    compressed = sorted(n for n, s in shapes.items() if len(s) > 1 and s.numel() >= 100)
    state = dgc.DGCState(model=ddp, momentum=0.9, density=0.05, momentum_masking=False,
                         sparse_capacity=capacity, value_dtype=value_dtype,
                         exchange=exchange, ranks_per_node=per_node, gtopk_slices=slices,
                         exchange_latency_us=latency_us, **SPARSE)
    errors, agree, _ = nothing_lost(model, ddp, state, rank, 12, compressed)
    return errors, agree, state.stats.sparse_buckets


def _all_rank(rank, world_size, capacity, dtype, exchange="sparse_allreduce", per_node=None,
              slices=False, latency_us=0.0):
    """``per_node``: ranks per node (default: all on one); ``slices``: gtopk_slices;
    ``latency_us``: the exchange link's latency, which decides whether gtopk carries the
    dense slots in its swaps."""
    return (_conservation_rank(rank, world_size, capacity, dtype, exchange, per_node, slices,
                               latency_us),
            _equivalence_and_resume_rank(rank, world_size, exchange, per_node, slices,
                                         latency_us))


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_nothing_is_lost_ranks_agree_sgd_at_density_one_and_resume_is_bitwise(world_size):
    # tight capacities at p = 2 and 3 make pairs overflow and sums lose, to be given back
    capacity = [1.0, 0.5] if world_size < 4 else [2.0, 1.0]
    dtype = "fp16" if world_size in (3, 8) else "fp32"
    for (errors, agree, sparse), (worst, same, resumed_sparse) in run_ranks(
            _all_rank, world_size, capacity, dtype, timeout=600):
        assert agree and sparse > 0
        assert max(errors.values()) < 1e-6, errors
        assert worst < 1e-6
        assert same and resumed_sparse > 0


def test_an_owner_publishes_at_most_what_it_can_receive():
    # [2, 8] at p = 2: C2 = 4k would exceed the 2 C1 = 2k pairs an owner receives
    assert capacities(1000, 2, (2.0, 8.0)) == (1000, 2000)
    assert capacities(1000, 4, (2.0, 8.0)) == (500, 2000)
    assert capacities(1000, 8, (2.0, 1.0)) == (250, 125)


def test_a_publish_capacity_above_what_an_owner_receives_runs_and_loses_nothing():
    for errors, agree, sparse in run_ranks(_conservation_rank, 2, [2.0, 8.0], "fp32",
                                           timeout=300):
        assert agree and sparse > 0
        assert max(errors.values()) < 1e-6, errors


def _equivalence_and_resume_rank(rank, world_size, exchange="sparse_allreduce", per_node=None,
                                 slices=False, latency_us=0.0):
    ref = MLP()
    ref_ddp = DDP(ref, bucket_cap_mb=0.001)
    ref_opt = _sgd(ref, momentum=0.9, weight_decay=1e-3)
    _train(ref_ddp, ref_opt, 10, rank)
    got = MLP()
    ddp = DDP(got, bucket_cap_mb=0.001)
    opt = _sgd(got, momentum=0.9, weight_decay=1e-3)
    dgc.attach(ddp, opt, density=1.0, exchange=exchange, ranks_per_node=per_node,
               gtopk_slices=slices, exchange_latency_us=latency_us, **SPARSE)
    _train(ddp, opt, 10, rank)
    worst = max(((a - b).norm() / b.norm()).item()
                for a, b in zip(got.parameters(), ref.parameters()))

    def fresh(seed):
        # One bucket: a restored DDP model's first iteration then has the same composition
        # (the route, dense or pairs, is chosen per bucket; see dgc/transport/__init__.py).
        model = MLP(seed, wide=True)
        ddp = DDP(model, bucket_cap_mb=100)
        opt = _sgd(model, momentum=0.9, weight_decay=1e-3)
        return model, ddp, opt, dgc.attach(ddp, opt, density=0.03, exchange=exchange,
                                           ranks_per_node=per_node, gtopk_slices=slices,
                                           exchange_latency_us=latency_us, **SPARSE)

    uninterrupted, model, state = resumed(fresh, rank, steps=12, at=5)
    return worst, torch.equal(_flat(model), uninterrupted), state.stats.sparse_buckets


def _bytes_rank(rank, world_size, numel, density):
    ddp, state = one_tensor_dgc(numel, density, "sparse_allreduce", **SPARSE)
    sizes = []
    real = dist.all_to_all_single, dist.all_gather_single, dist.all_reduce

    def a2a(out, t, *args, **kwargs):
        sizes.append(("all_to_all", t.nbytes))
        return real[0](out, t, *args, **kwargs)

    def gather(out, t, *args, **kwargs):
        sizes.append(("allgather", t.nbytes))
        return real[1](out, t, *args, **kwargs)

    def reduce(t, *args, **kwargs):
        sizes.append(("allreduce", t.nbytes))  # the regions' histogram (a fixed header)
        return real[2](t, *args, **kwargs)
    dist.all_to_all_single, dist.all_gather_single, dist.all_reduce = a2a, gather, reduce
    try:
        x = torch.randn(4, numel // 1000, generator=torch.Generator().manual_seed(rank))
        ddp(x).square().sum().backward()
    finally:
        dist.all_to_all_single, dist.all_gather_single, dist.all_reduce = real
    return sizes, state.stats.bytes_sent


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_wire_bytes_per_rank_stay_within_6k_pairs_of_a_tensor(world_size):
    """One tensor, k = 25,000 pairs of 6 bytes (``dgc_helpers.WIRE_NUMEL``): counted at the
    collectives, each rank sends (p-1)/p of its all-to-all buffer and (p-1) times its
    published pairs; at most 6k(p-1)/p pairs plus the capacities' rounding."""
    k = WIRE_K
    for sizes, counted in run_ranks(_bytes_rank, world_size, WIRE_NUMEL, WIRE_DENSITY,
                                    timeout=300):
        kinds = dict(sizes)
        c1, c2 = capacities(k, world_size, (2.0, 1.0))
        row = -(-c1 * 6 // 8) * 8  # C1 pairs, padded to 8 bytes (dgc.codec)
        assert kinds["all_to_all"] == world_size * row  # one row per destination
        wire = ((world_size - 1) / world_size * kinds["all_to_all"]
                + (world_size - 1) * kinds["allgather"])
        header = 2 * (world_size - 1) / world_size * kinds["allreduce"]
        assert kinds["allreduce"] == 8 * 32 * world_size  # int64 bins, every 64 steps
        assert wire + header == pytest.approx(counted)
        pairs = wire / 6
        assert pairs <= 6 * k * (world_size - 1) / world_size + 2 * world_size
        print(f"p={world_size}: {pairs:.0f} pairs per rank; allgather would send "
              f"{(world_size - 1) * k}")


@pytest.mark.parametrize("seed", range(20))
def test_an_owner_publishes_the_largest_sums_of_what_it_received(seed):
    g = torch.Generator().manual_seed(seed)
    p, c1, c2, n = 4, 12, 9, 300
    bounds, mine = [0, 70, 160, 230, 300], seed % 4
    lo, hi = bounds[mine], bounds[mine + 1]
    local = torch.full((p, c1), n)  # n: an empty slot
    for r in range(p):  # within a rank the positions are distinct
        m = int(torch.randint(0, c1 + 1, (1,), generator=g))
        local[r, :m] = lo + torch.randperm(hi - lo, generator=g)[:m]
    val = torch.where(local == n, 0.0, torch.randn(p, c1, generator=g)).half()
    sums = {}
    for r in range(p):  # in rank order, in float32
        for i, v in zip(local[r].tolist(), val[r].float().tolist()):
            if i != n:
                sums[i] = float(torch.tensor(sums.get(i, 0.0)) + torch.tensor(v))
    want = sorted(sums, key=lambda i: (-abs(sums[i]), i))[:c2]
    pub, value, rounding = _owner_sums(local, val, bounds, mine, c2, n)
    assert pub.tolist() == want + [n] * (c2 - len(want))
    exact = torch.tensor([sums[i] for i in want] + [0.0] * (c2 - len(want)))
    assert torch.equal(value.float() + rounding, exact)  # nothing lost to the fp16 wire


@pytest.mark.parametrize("seed", range(10))
def test_regions_are_ordered_and_cover_the_tensor(seed):
    g = torch.Generator().manual_seed(seed)
    p = 2 + seed % 7
    n = int(torch.randint(p, 5000, (1,), generator=g))
    hist = torch.randint(0, 50, (32 * p,), generator=g)
    hist[torch.rand(32 * p, generator=g) < 0.7] = 0  # mostly empty bins
    edges = cut(hist.tolist(), n, p)
    assert len(edges) == p + 1 and edges[0] == 0 and edges[-1] == n
    assert all(a <= b for a, b in zip(edges, edges[1:]))
    assert cut([0] * (32 * p), n, p) == [j * n // p + (j * n % p > 0) for j in range(p + 1)]


def test_a_handful_of_picks_keeps_the_regions_near_equal():
    """p = 8 ranks each selecting one entry of a 1,000-entry tensor: cut at the eight picks'
    quantiles, the regions would be a bin wide on one side and 900 entries on the other."""
    p, n = 8, 1000
    hist = [0] * (32 * p)
    for b in range(8):  # eight picks, in eight neighbouring bins
        hist[b] = 1
    edges = cut(hist, n, p)
    widths = [b - a for a, b in zip(edges, edges[1:])]
    assert min(widths) >= n / (2 * p) and max(widths) <= 2 * n / p


def test_many_picks_still_place_the_cuts():
    p, n = 8, 235_200  # LeNet-300-100's first layer, 8 ranks of k = 1,000 in its first half
    hist = [1000 * p // (16 * p)] * (16 * p) + [0] * (16 * p)
    edges = cut(hist, n, p)
    assert edges[p - 1] <= n // 2 + n // (32 * p)  # seven regions in the first half


@pytest.mark.parametrize("p", [2, 3, 4, 5, 8, 16])
def test_the_tuned_capacities_stay_within_6k_pairs(p):
    """configs/mnist_lenet300_dgc_sar.yaml's [2, 4]: a rank sends (p - 1)(C1 + C2) pairs a
    tensor (the collective-level count is the wire-byte test's), within 6k(p-1)/p plus the
    two capacities' rounding."""
    for k in [1, 2, 3, 7, 30, 235, 1000, 25_000]:
        c1, c2 = capacities(k, p, (2.0, 4.0))
        assert (p - 1) * (c1 + c2) <= 6 * k * (p - 1) / p + 2 * (p - 1)
