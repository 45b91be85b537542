"""The cost model's formulas against hand-computed values, presets, and estimate_run."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch._C._distributed_c10d import _compute_bucket_assignment_by_size

from benchmarks import netns
from dgc.options import DGCOptions
from launch.config import load_config
from launch.costmodel import collectives as col
from launch.costmodel import traffic as tr
from launch.costmodel.compute import (ComputeTimes, LayerFlops, ModelFlops, compute_times,
                                      count_flops, realistic_factor, sparse_skip_reason)
from launch.costmodel.hardware import (Accelerator, Cluster, HardwareConfig, Link, Rates,
                                       load_cluster, preset_names)
from launch.costmodel.run import estimate_run, step_estimate
from launch.costmodel.storage import (csc_bytes, dia_bytes, dns_density, expected_masks,
                                      layer_storage, model_weight_sharing_rate,
                                      nm_pattern, weight_sharing_rate)
from launch.models import MLP
from sparse_comm.schema import ConfigError, build
from sparse_train.masks import nm_compliant
from sparse_train.options import SparsityOptions
from tests.launch_helpers import REPO

US, GB = 1e-6, 1e9


# --- collectives --------------------------------------------------------------------------

def test_ring_allreduce_is_2_p_minus_1_alphas_plus_2_p_minus_1_over_p_of_s_over_b():
    assert col.ring_allreduce(1e6, 4, 1 * US, 1 * GB) == pytest.approx(6e-6 + 1.5e-3)


def test_allgather_and_reduce_scatter_move_p_minus_1_over_p_of_their_data():
    assert col.allgather(4e6, 4, 1 * US, 1 * GB) == pytest.approx(3e-6 + 3e-3)
    assert col.reduce_scatter(1e6, 4, 1 * US, 1 * GB) == pytest.approx(3e-6 + 0.75e-3)


def test_tree_allreduce_pays_log2_latency_and_2_s_over_b():
    assert col.tree_allreduce(1e6, 5, 1 * US, 1 * GB) == pytest.approx(6e-6 + 2e-3)


def test_hierarchical_allreduce_is_intra_reduce_scatter_inter_ring_intra_allgather():
    intra, inter = (1 * US, 100 * GB), (5 * US, 10 * GB)
    expected = ((7e-6 + 7 / 8 * 8e6 / 100e9) * 2  # reduce-scatter and allgather of 8 MB
                + 2 * 3 * 5e-6 + 2 * 3 / 4 * 1e6 / 10e9)  # ring of 1 MB over 4 nodes
    assert col.hierarchical_allreduce(8e6, 8, 4, intra, inter) == pytest.approx(expected)


def test_hierarchical_allgather_gathers_across_nodes_then_within():
    intra, inter = (1 * US, 100 * GB), (5 * US, 10 * GB)
    expected = (3 * 5e-6 + 3 / 4 * 4e3 / 10e9) + (7 * 1e-6 + 7 / 8 * 32e3 / 100e9)
    assert col.hierarchical_allgather(1e3, 8, 4, intra, inter) == pytest.approx(expected)


def test_one_rank_communicates_nothing():
    cluster = load_cluster("dgx-a100-hdr")
    for fn in (col.ring_allreduce, col.allgather, col.reduce_scatter, col.tree_allreduce):
        assert fn(1e6, 1, 1 * US, 1 * GB) == 0.0
    assert col.collective_time("allreduce", 1e9, cluster, 1) == 0.0
    assert col.collective_time("allgather", 1e9, cluster, 1) == 0.0


def test_break_even_density_is_2_bv_over_p_times_bv_plus_bi():
    assert col.break_even_density(8, 4, 4) == pytest.approx(0.125)
    assert col.break_even_density(8, 2, 4, dense_bytes=4) == pytest.approx(1 / 6)
    assert col.break_even_density(1, 4, 4) == pytest.approx(1.0)


def test_a_flat_ring_crosses_nodes_on_all_the_nodes_nics_an_all_to_all_on_a_share():
    cluster = load_cluster("dgx-a100-hdr")  # 8 per node, 8 HDR NICs of 25 GB/s, 2.7 us
    single = col.collective_time("allreduce", 1e8, cluster, 8, "ring")
    assert single == pytest.approx(col.ring_allreduce(1e8, 8, 0.6 * US, 300 * GB))
    multi = col.collective_time("allreduce", 1e8, cluster, 16, "ring")  # 8 x 25 < 300 GB/s
    assert multi == pytest.approx(col.ring_allreduce(1e8, 16, 2.7 * US, 200 * GB))
    spread = col.collective_time("all_to_all", 1e8, cluster, 16)  # every rank crosses at once
    assert spread == pytest.approx(col.reduce_scatter(1e8, 16, 2.7 * US, 25 * GB))
    pcie = load_cluster("a100-pcie-25gbe")  # 8 per node behind one NIC
    ring = col.collective_time("allgather", 1e6, pcie, 16, "ring")
    assert ring == pytest.approx(col.allgather(16e6, 16, pcie.inter.latency,
                                               min(pcie.intra.bandwidth, pcie.inter.bandwidth)))
    auto = col.collective_time("allreduce", 1e8, cluster, 16)
    assert auto == min(col.collective_time("allreduce", 1e8, cluster, 16, a)
                       for a in ("ring", "tree", "hierarchical"))


def test_without_a_burst_back_to_back_collectives_cost_the_ring_forms_plus_overheads():
    steps = [(2, 5e5), (1, 4e6)]  # an allreduce of 1 MB and an allgather of 2 x 4 MB at p = 2
    expected = col.ring_allreduce(1e6, 2, 5 * US, 1 * GB) + col.allgather(8e6, 2, 5 * US, 1 * GB)
    assert col.token_bucket_time(steps, 5 * US, 1 * GB, 0.0) == pytest.approx(expected)
    assert col.token_bucket_time(steps, 5 * US, 1 * GB, 0.0, overhead=7 * US) == \
        pytest.approx(expected + 2 * 7 * US)


def test_a_token_bucket_sends_its_burst_at_once_then_refills_while_hops_wait():
    alpha, rate, burst = 100 * US, 1e6, 10e3  # 1 MB/s, 10 kB bucket: a mean wait adds 100 B
    # 8 kB fit the full bucket: the first collective costs its hop's wait only. 2 kB are
    # left and about 100 B come back during the next wait, so the next 8 kB wait for
    # 5.9 kB at the rate.
    first = col.token_bucket_time([(1, 8e3)], alpha, rate, burst)
    both = col.token_bucket_time([(1, 8e3), (1, 8e3)], alpha, rate, burst)
    assert first == pytest.approx(alpha)
    assert both - first == pytest.approx(alpha + 5.9e3 / rate)


def test_a_chunk_the_size_of_a_mean_waits_refill_is_late_by_the_short_waits():
    # A mean wait of 1 ms refills 1 kB. A fixed wait would send a 1 kB chunk on time; with
    # exponential waits it is late by E[max(0, 1 kB - refill)] = 1 kB / e.
    alpha, rate, burst = 1e-3, 1e6, 2e3
    drain = col.token_bucket_time([(1, 2e3)], alpha, rate, burst)  # empties the full bucket
    both = col.token_bucket_time([(1, 2e3), (1, 1e3)], alpha, rate, burst)
    assert both - drain == pytest.approx(alpha + 1e3 / math.e / rate)
    waits = torch.distributions.Exponential(1 / alpha).sample((400_000,)).double()
    late = (1e3 - (waits * rate).clamp(max=burst)).clamp(min=0) / rate
    assert both - drain == pytest.approx(alpha + late.mean().item(), rel=0.01)


def test_sequence_time_uses_the_shaped_links_bucket_and_sums_collectives_elsewhere():
    calls = [("allreduce", 1e6), ("allgather", 2e4)]
    plain = load_cluster("cpu-1gbe")
    assert col.sequence_time(calls, plain, 4) == pytest.approx(
        sum(col.collective_time(k, n, plain, 4) for k, n in calls))
    shaped = load_cluster("netns-1gbit")
    link = shaped.inter
    hops = [(6, 1e6 / 4), (3, 2e4)]
    assert link.overhead > 0
    assert col.sequence_time(calls, shaped, 4) == pytest.approx(
        col.token_bucket_time(hops, link.latency, link.bandwidth, link.burst, link.overhead))
    assert col.sequence_time(calls, shaped, 1) == 0.0


def test_a_links_overhead_is_paid_once_per_collective():
    link = Link(bandwidth_gbytes=1.0, latency_us=2.0, overhead_us=30.0)
    cluster = Cluster("flat", Accelerator(), 8, link, link, 8)
    bare = dataclasses.replace(cluster, intra=dataclasses.replace(link, overhead_us=0.0))
    for kind in ("allreduce", "allgather"):
        assert col.collective_time(kind, 1e6, cluster, 8, "ring") == pytest.approx(
            col.collective_time(kind, 1e6, bare, 8, "ring") + 30 * US)


def test_a_link_calibrated_for_swaps_prices_them_by_its_own_constants():
    link = Link(bandwidth_gbytes=1.0, latency_us=2.0, overhead_us=30.0)
    swapping = dataclasses.replace(link, swap_us=50.0, swap_slowdown=1.5)
    for a_link, fixed, slowdown in ((link, 32 * US, 1.0), (swapping, 50 * US, 1.5)):
        cluster = Cluster("flat", Accelerator(), 1, a_link, a_link, 1)  # one rank per node
        want = fixed + 1e6 * slowdown / GB
        assert col.collective_time("sendrecv", 1e6, cluster, 8) == pytest.approx(want)
        assert col.sequence_time([("sendrecv", 1e6, "inter")], cluster, 8) == pytest.approx(want)
        # the other collectives keep the link's overhead and latency
        assert col.collective_time("allgather", 1e6, cluster, 8, "ring") == pytest.approx(
            30 * US + col.allgather(8e6, 8, 2 * US, GB))


def test_on_a_shaped_link_a_swaps_slowdown_stretches_only_the_bytes_past_the_bucket():
    alpha, rate, burst = 100 * US, 1e6, 10e3
    assert col.token_bucket_time([(1, 8e3)], alpha, rate, burst, slowdown=2.0) == \
        pytest.approx(alpha)  # the bucket holds them all
    plain = col.token_bucket_time([(1, 8e3), (1, 8e3)], alpha, rate, burst)
    slowed = col.token_bucket_time([(1, 8e3), (1, 8e3)], alpha, rate, burst, slowdown=2.0)
    assert slowed - plain == pytest.approx(5.9e3 / rate)  # the 5.9 kB late, twice as long
    shaped = load_cluster("netns-1gbit")
    swaps = [("sendrecv", 2e5, "inter"), ("sendrecv", 2e5, "inter")]
    link = shaped.inter
    assert link.swap_us > 0 and link.swap_slowdown >= 1
    assert col.sequence_time(swaps, shaped, 4) == pytest.approx(col.token_bucket_time(
        [(1, 2e5), (1, 2e5)], link.swap_us * US, link.bandwidth, link.burst, 0.0,
        link.swap_slowdown))


@pytest.mark.parametrize("field, value", [("swap_us", -1.0), ("swap_slowdown", 0.5)])
def test_a_links_swap_constants_are_checked(field, value):
    with pytest.raises(ConfigError, match=field):
        build(Link, {"bandwidth_gbytes": 1.0, field: value}, "links.yaml: tbf")


# --- traffic ------------------------------------------------------------------------------

@pytest.mark.parametrize("model", [MLP(784, [300, 100], 10), MLP(784, [5000, 5000], 10),
                                   MLP(64, [512, 512, 512], 10)])
def test_buckets_are_the_ones_ddp_forms(model):
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    ours = tr.ddp_buckets(params, 25.0, first_bytes=1 << 20)
    tensors = list(reversed(list(model.parameters())))
    theirs, _ = _compute_bucket_assignment_by_size(tensors, [1 << 20, 25 << 20],
                                                   [False] * len(tensors))
    names = [n for n, _ in reversed(params)]
    assert [[n for n, _ in b] for b in ours] == [[names[i] for i in b] for b in theirs]


def _bucket_sizes(rank: int, world_size: int, hidden: list[int], cap_mb: float) -> list[int]:
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(MLP(64, hidden, 10), bucket_cap_mb=cap_mb)
    sizes = []

    def note(_, bucket):
        sizes.append(bucket.buffer().numel())
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    model.register_comm_hook(None, note)
    for _ in range(2):  # DDP rebuilds its buckets after the first backward
        sizes.clear()
        model(torch.randn(4, 64)).sum().backward()
    return sizes


@pytest.mark.parametrize("cap_mb", [0.5, 25.0])
def test_buckets_match_what_ddp_sends_when_given_a_cap(cap_mb):
    from tests.distributed import run_ranks
    hidden = [512, 512, 512]  # 2.25 MB: one bucket at 25 MB unless the first is capped small
    sent = run_ranks(_bucket_sizes, 1, hidden, cap_mb)[0]
    params = [(n, tuple(p.shape)) for n, p in MLP(64, hidden, 10).named_parameters()]
    assert [sum(tr.numel(s) for _, s in b) for b in tr.ddp_buckets(params, cap_mb)] == sent


def test_dense_and_fp16_allreduce_every_bucket_at_their_width():
    buckets = [[("w", (100, 10)), ("b", (100,))], [("v", (50, 2))]]
    assert tr.dense(buckets).wire_bytes(4) == pytest.approx(1.5 * 4 * 1200)
    assert tr.dense(buckets, 2, "fp16").wire_bytes(4) == pytest.approx(1.5 * 2 * 1200)
    assert [c.nbytes for c in tr.dense(buckets).collectives] == [4400, 400]


def test_powersgd_sends_p_and_q_and_leaves_small_and_1d_tensors_plain():
    buckets = [[("w", (100, 50)), ("b", (100,)), ("tiny", (4, 3))]]
    t = tr.powersgd(buckets, rank=4, passes=0)
    # P is 100 x 4, Q is 50 x 4; 4 x 3 would not shrink 2x at rank 3, so it stays plain.
    assert [c.nbytes for c in t.collectives] == [(100 + 12) * 4, 400 * 4, 200 * 4]
    assert t.flops == 4 * 100 * 50 * 4


def test_dgc_gathers_k_pairs_at_the_configured_widths_and_sends_small_tensors_dense():
    options = DGCOptions(density=0.01, value_dtype="fp16", index_dtype="int32", min_numel=1024,
                         exchange="allgather")
    buckets = [[("w", (2000, 10)), ("b", (2000,)), ("small", (10, 50))]]
    t = tr.dgc(buckets, options, 4, passes=0)
    # k = 200 of w's 20,000; b (1-D) and small (500 < min_numel) go dense in fp16.
    assert [(c.kind, c.nbytes) for c in t.collectives] == [
        ("allreduce", 2500 * 2), ("allgather", 200 * (2 + 4))]
    assert t.wire_bytes(4) == pytest.approx(1.5 * 5000 + 3 * 1200)


def test_the_sparse_allreduce_sends_capacities_and_auto_takes_it_when_it_is_cheaper():
    """The same bucket by split-and-reduce at p = 4: C1 = ceil(2 * 200 / 4) = 100 pairs
    (600 bytes) to each of 4 regions, C2 = 50 published (300 bytes, padded to 304);
    counted by hand it is 1800 + 912 bytes against the allgather's 3600, so ``auto``
    (with no latency: bytes) takes it."""
    options = DGCOptions(density=0.01, value_dtype="fp16", index_dtype="int32", min_numel=1024)
    buckets = [[("w", (2000, 10)), ("b", (2000,)), ("small", (10, 50))]]
    t = tr.dgc(buckets, options, 4, passes=0)
    assert [(c.kind, c.nbytes) for c in t.collectives] == [
        ("allreduce", 2500 * 2), ("all_to_all", 4 * 600), ("allgather", 304)]
    assert t.wire_bytes(4) == pytest.approx(1.5 * 5000 + 0.75 * 2400 + 3 * 304)
    assert tr.dgc(buckets, options, 2, passes=0).collectives[-1].kind == "allgather"
    # gtopk would send 1200 + 1600 bytes in two swaps: more than 2712, so not it either
    assert "sendrecv" not in {c.kind for c in t.collectives}


def test_gtopk_swaps_log2_p_times_and_splits_the_swaps_across_nodes_over_the_node():
    """The same bucket by recursive doubling at p = 8: k = 200 pairs, 6 bytes in the first
    round, 8 (float32 sums) after. With 4 ranks per node rounds 0 and 1 stay inside the
    node and round 2 crosses: a slice of 50 pairs per rank, allgathered in the node; with
    gtopk_slices each rank swaps its slice and the node allgathers once at the end the
    final slices and the surviving entries (2 x 50 x 8 bytes)."""
    options = DGCOptions(density=0.01, value_dtype="fp16", index_dtype="int32", min_numel=1024,
                         exchange="gtopk")
    buckets = [[("w", (2000, 10)), ("b", (2000,)), ("small", (10, 50))]]
    flat = tr.dgc(buckets, options, 8, passes=0)
    assert [(c.kind, c.nbytes, c.group) for c in flat.collectives] == [
        ("allreduce", 2500 * 2, "world"), ("sendrecv", 1200, "intra"),
        ("sendrecv", 1600, "intra"), ("sendrecv", 1600, "intra")]
    nodes = tr.dgc(buckets, options, 8, passes=0, per_node=4)
    assert [(c.kind, c.nbytes, c.group) for c in nodes.collectives[1:]] == [
        ("sendrecv", 1200, "intra"), ("sendrecv", 1600, "intra"),
        ("sendrecv", 400, "inter"), ("allgather", 400, "intra")]
    assert sum(c.link_bytes(8, 4)[1] for c in nodes.collectives[1:]) == 400  # the slice only
    sliced = tr.dgc(buckets, dataclasses.replace(options, gtopk_slices=True), 8, passes=0,
                    per_node=4)
    assert [(c.kind, c.nbytes, c.group) for c in sliced.collectives[1:]] == [
        ("sendrecv", 1200, "intra"), ("sendrecv", 1600, "intra"),
        ("sendrecv", 400, "inter"), ("allgather", 800, "intra")]
    assert route_costs_gtopk_is_infinite_off_powers_of_two(options)


def test_gtopk_carries_the_dense_slots_in_its_swaps_on_a_link_with_latency():
    """The bucket above on a 50 us link: an allreduce of the 2500 dense entries would cost
    2(p - 1) latencies, so they ride in the swaps (fp16 in round one, float32 after); across
    nodes each rank sends a quarter of them with its slice."""
    options = DGCOptions(density=0.01, value_dtype="fp16", index_dtype="int32", min_numel=1024,
                         exchange="gtopk", exchange_latency_us=50.0)
    buckets = [[("w", (2000, 10)), ("b", (2000,)), ("small", (10, 50))]]
    flat = tr.dgc(buckets, options, 8, passes=0)
    assert [(c.kind, c.nbytes, c.group) for c in flat.collectives] == [
        ("sendrecv", 1200 + 5000, "intra"), ("sendrecv", 1600 + 10000, "intra"),
        ("sendrecv", 1600 + 10000, "intra")]
    nodes = tr.dgc(buckets, options, 8, passes=0, per_node=4)
    assert [(c.kind, c.nbytes, c.group) for c in nodes.collectives] == [
        ("sendrecv", 6200, "intra"), ("sendrecv", 11600, "intra"),
        ("sendrecv", 400 + 2500, "inter"), ("allgather", 400 + 2500, "intra")]
    sliced = tr.dgc(buckets, dataclasses.replace(options, gtopk_slices=True), 8, passes=0,
                    per_node=4)
    assert [(c.kind, c.nbytes) for c in sliced.collectives[2:]] == [
        ("sendrecv", 400 + 2500), ("allgather", 800 + 2500)]


def route_costs_gtopk_is_infinite_off_powers_of_two(options) -> bool:
    from dgc.plan import make_plan
    plan = make_plan(["w"], [torch.Size([2000, 10])], 0.01, 6, options)
    return plan.route == "dense"  # gtopk cannot run on 6 ranks; the fallback takes it


def test_dgc_sends_at_least_one_entry_per_tensor_at_vanishing_density():
    options = DGCOptions(density=1e-9, min_numel=1)
    t = tr.dgc([[("a", (30, 40)), ("c", (7, 7))]], options, 2, passes=0)
    assert t.collectives == [tr.Collective("allgather", 2 * 8)]


def test_masked_allreduces_live_entries_only_and_an_empty_bucket_sends_nothing():
    buckets = [[("w", (8, 8)), ("b", (8,))], [("v", (4, 4))]]
    t = tr.masked(buckets, {"w": 32, "v": 0})  # w is 2:4 (half), v fully pruned
    assert [c.nbytes for c in t.collectives] == [(32 + 8) * 4]


# --- compute ------------------------------------------------------------------------------

def test_flop_counter_gives_each_layers_forward_and_backward():
    with torch.device("meta"):
        model = MLP(8, [16], 4)
    flops = count_flops(model, (1, 2, 4), batch_size=3)
    fc1, fc2 = flops.layers
    assert (fc1.forward, fc1.backward) == (2 * 3 * 8 * 16, 2 * 3 * 8 * 16)  # no input grad
    assert (fc2.forward, fc2.backward) == (2 * 3 * 16 * 4, 2 * 2 * 3 * 16 * 4)
    assert fc2.rows == 3 and fc2.dgrad == fc2.wgrad == fc2.forward
    assert flops.forward == fc1.forward + fc2.forward


def layer(out: int, k: int, rows: int = 64, first: bool = False, groups: int = 1) -> LayerFlops:
    f = 2.0 * rows * out * k
    return LayerFlops("w", (out, k), groups, f, f if first else 2 * f)


def test_2_4_needs_sparse_kernel_shapes_and_too_small_layers_stay_dense():
    assert sparse_skip_reason(layer(64, 128), "bf16") is None
    assert "multiple of (32, 64)" in sparse_skip_reason(layer(64, 96), "bf16")
    assert sparse_skip_reason(layer(64, 96), "tf32") is None
    assert sparse_skip_reason(layer(300, 784), "bf16") is not None  # LeNet-300's fc1
    assert "grouped" in sparse_skip_reason(layer(64, 128, groups=2), "bf16")
    assert "multiple of m = 4" in sparse_skip_reason(layer(64, 126), "bf16")


A100 = Accelerator("bf16", 2000.0, Rates(bf16=312.0, fp32=19.5), Rates(bf16=624.0))


def test_2_4_halves_forward_and_input_gradient_but_not_the_weight_gradient():
    inner = layer(1024, 1024, rows=4096)
    times = compute_times(ModelFlops((inner,), inner.forward, inner.backward), A100, "bf16", 1.0)
    assert times.dense / times.sparse_theoretical == pytest.approx(3 / 2)
    first = layer(1024, 1024, rows=4096, first=True)
    times = compute_times(ModelFlops((first,), first.forward, first.backward), A100, "bf16", 1.0)
    assert times.dense / times.sparse_theoretical == pytest.approx(2 / 1.5)
    assert times.dense / times.sparse_realistic == pytest.approx(1.25)
    assert times.sparse_flops_fraction == 1.0


def test_realistic_factor_is_below_one_on_small_gemms_unless_configured():
    assert realistic_factor(layer(4096, 4096, rows=64)) == 0.9
    assert realistic_factor(layer(4096, 4096, rows=8192)) == 1.25
    assert realistic_factor(layer(64, 64), configured=1.1) == 1.1


def test_no_sparse_rate_or_no_eligible_layer_leaves_compute_dense():
    small = layer(300, 784)
    times = compute_times(ModelFlops((small,), small.forward, small.backward), A100, "bf16", 0.5)
    assert times.sparse_theoretical == times.sparse_realistic == times.dense
    assert times.dense == pytest.approx(3 * small.forward / (312e12 * 0.5))


# --- storage ------------------------------------------------------------------------------

def test_csc_and_dia_bytes_of_a_small_matrix():
    m = torch.eye(4, dtype=torch.bool)
    m[0, 3] = True  # 5 nonzeros on 2 diagonals
    assert csc_bytes(m, 4, 4) == 5 * 8 + 5 * 4
    assert dia_bytes(m, 4, 4) == 2 * (4 * 4 + 4)  # last nonzero column 3: 4 values each


def test_layer_storage_reports_every_format_and_2_4_as_half_plus_metadata():
    sizes = layer_storage((4, 8))
    assert sizes["dense"] == 128 and sizes["coo"] == 32 * 12
    assert sizes["nm24"] == 16 * 4 + 16 * 2 // 8  # 16 kept values, 2 bits each
    assert layer_storage((3, 6))["nm24"] == layer_storage((3, 6))["dense"]  # 6 % 4 != 0


def test_weight_sharing_rate_follows_han_et_al():
    assert weight_sharing_rate(1000, 32, 32) == pytest.approx(32000 / (1000 * 5 + 32 * 32))


def test_model_weight_sharing_uses_one_codebook_per_layer_8_bit_conv_5_bit_fc():
    # LeNet-5 pruned as in the paper's Table 3 (weights kept: conv1 66%, conv2 12%, fc1 8%,
    # fc2 19%): a 256-entry codebook per conv, 32 per fc, biases not shared.
    layers = {"conv1": (330, 4), "conv2": (3000, 4), "fc1": (32_000, 2), "fc2": (950, 2)}
    dense_bits = 32 * (330 + 3000 + 32_000 + 950)
    shared_bits = (330 * 8 + 256 * 32) + (3000 * 8 + 256 * 32) + (32_000 * 5 + 32 * 32) \
        + (950 * 5 + 32 * 32)
    assert model_weight_sharing_rate(layers) == pytest.approx(dense_bits / shared_bits)
    # a layer with fewer weights than codebook entries needs one entry per weight
    assert model_weight_sharing_rate({"w": (10, 2)}) == pytest.approx(
        10 * 32 / (10 * math.log2(10) + 10 * 32))


def test_dia_bytes_equal_what_scipy_stores():
    """scipy's coo.todia() keeps, per occupied diagonal, max(col) + 1 values (not the
    column count) and an int32 offset."""
    m = torch.zeros(4, 6, dtype=torch.bool)
    m[0, 1] = m[2, 3] = m[3, 0] = True  # 2 diagonals (+1, -3), last nonzero column 3
    assert dia_bytes(m, 4, 4) == 2 * (4 * 4 + 4)
    scipy_sparse = pytest.importorskip("scipy.sparse")
    pattern = nm_pattern((64, 256)).reshape(64, -1)
    dia = scipy_sparse.coo_matrix(pattern.numpy().astype("float32")).todia()
    assert dia_bytes(pattern, 4, 4) == dia.data.nbytes + dia.offsets.nbytes


def test_dgc_traffic_of_the_shipped_lenet300_config_counted_by_hand():
    """Independent of dgc.plan.make_plan: configs/mnist_lenet300_dgc.yaml at p = 4 puts
    one bucket of LeNet-300-100 on the wire as k = ceil(0.001 n) pairs of (int32, fp16):
    fc1 236, fc2 30, fc3 1 = 267 pairs, 1602 bytes padded to 1608, allgathered (each rank
    sends its 1608 bytes 3 times), and the 410 biases in fp16, allreduced (2 * 3/4 of 820
    bytes)."""
    cfg = load_config(REPO / "configs/mnist_lenet300_dgc.yaml")
    from launch.costmodel.run import scheme_traffic, workload
    traffic = scheme_traffic(workload(cfg), "dgc", 4, cfg.hardware)
    assert traffic.wire_bytes(4) == pytest.approx(3 * 1608 + 1.5 * 820)


def test_dns_density_of_gaussian_weights():
    assert dns_density(0.0) == pytest.approx(0.42494, abs=1e-4)
    assert dns_density(1.0) == pytest.approx(0.16131, abs=1e-4)


def test_expected_masks_have_the_configured_density_and_structure():
    with torch.device("meta"):
        model = MLP(64, [128], 10)
    nm = expected_masks(model, SparsityOptions(method="nm"))
    assert all(nm_compliant(m, 2, 4) and m.float().mean() == 0.5 for m in nm.values())
    gmp = expected_masks(model, SparsityOptions(method="gmp", target=0.9))
    assert gmp["fc1.weight"].float().mean() == pytest.approx(0.1, abs=0.01)


# --- presets ------------------------------------------------------------------------------

def test_every_preset_loads_and_datasheet_rates_are_as_published():
    for name in preset_names():
        assert load_cluster(name).name == name
    a100, h100 = load_cluster("dgx-a100-hdr"), load_cluster("dgx-h100-ndr")
    assert (a100.accelerator.flops("fp16"), a100.accelerator.flops("fp16", sparse=True)) \
        == (312e12, 624e12)
    assert (h100.accelerator.flops("bf16"), h100.accelerator.flops("bf16", sparse=True)) \
        == (989e12, 1979e12)
    assert a100.inter.bandwidth == 25e9 and h100.inter.bandwidth == 50e9


@pytest.mark.parametrize("section,key", [
    ({"preset": "no-such-cluster"}, "hardware.preset"),
    ({"world_size": 0}, "hardware.world_size"),
    ({"overlap": 1.5}, "hardware.overlap"),
    ({"compute_dtype": "fp8", "preset": "dgx-a100-hdr"}, "hardware.compute_dtype"),
])
def test_bad_hardware_section_names_the_key(section, key):
    with pytest.raises(ConfigError) as info:
        build(HardwareConfig, section, "hardware")
    assert info.value.key == key and "\n" not in str(info.value)


def test_the_emulated_links_carry_tcp_payload_at_1448_of_1514_frame_bytes():
    for preset, bits in (("netns-100mbit", 100e6), ("netns-1gbit", 1e9)):
        link = load_cluster(preset).inter
        assert link.bandwidth == pytest.approx(bits / 8 * 1448 / 1514, rel=1e-4)
        assert link.burst == pytest.approx(netns.burst_bytes(bits))  # what tc is given


@pytest.mark.parametrize("link,error", [
    ("{bandwidth_gbytes: 0, latency_us: 2}", "bandwidth_gbytes.*must be > 0"),
    ("{bandwidth_gbytes: 1, burst_kbytes: -1}", "burst_kbytes.*must be >= 0"),
    ("{bandwidth_gbytes: 1, overhead_us: -1}", "overhead_us.*must be >= 0"),
])
def test_a_bad_link_in_a_preset_file_is_a_config_error(tmp_path, link, error):
    preset = tmp_path / "bad.yaml"
    preset.write_text(f"accelerator: a100-sxm4-80gb\nintra_node_link: nvlink3\n"
                      f"inter_node_link: {link}\n")
    with pytest.raises(ConfigError, match=error):
        load_cluster(str(preset))


# --- step time and estimate_run -----------------------------------------------------------

def simple_cluster() -> Cluster:
    link = Link(bandwidth_gbytes=1.0, latency_us=0.0)
    return Cluster("test", A100, 64, link, link, 1)


def test_step_time_hides_communication_behind_the_overlapped_backward():
    times = ComputeTimes(1e-3, 2e-3, 3e-3, 3e-3, 0.0)
    hw = HardwareConfig(overlap=0.5)
    hidden = tr.Traffic("t", [tr.Collective("allreduce", 0.5e6)])  # 0.5 ms at p = 2
    assert step_estimate(hidden, times, simple_cluster(), 2, hw).step_s == pytest.approx(3e-3)
    exposed = tr.Traffic("t", [tr.Collective("allreduce", 3e6)])  # 3 ms, 1 ms hidden
    assert step_estimate(exposed, times, simple_cluster(), 2, hw).step_s == pytest.approx(5e-3)


def test_estimate_run_reports_the_launchers_figures():
    cfg = load_config(REPO / "configs/mnist_lenet300_dgc.yaml")
    out = estimate_run(cfg, MLP(784, [300, 100], 10), world_size=8)
    for key in ("est/comm_time_dense_s", "est/comm_time_s", "est/step_speedup",
                "est/sparse_tc_speedup_theoretical", "est/sparse_tc_speedup_realistic",
                "est/weight_bytes/csr", "est/weight_bytes/nm24", "est/weight_bytes/dia"):
        assert math.isfinite(out[key]), key
    assert out["est/comm_time_s"] < out["est/comm_time_dense_s"]
    assert out["est/sparse_tc_speedup_theoretical"] == 1.0  # LeNet-300 is too small for 2:4
    assert out["est/weight_bytes/dense"] == 266_610 * 4


@pytest.mark.parametrize("hook", ["allreduce", "fp16", "bf16", "powersgd", "hierarchical"])
def test_estimate_run_prices_every_ddp_comm_hook(hook):
    """Every value of ``ddp.comm_hook`` the config takes has a scheme in the cost model (the
    end of a hierarchical run used to fail on it, with no summary written)."""
    cfg = load_config(REPO / "configs/mnist_lenet300_dense.yaml", [f"ddp.comm_hook={hook}"])
    out = estimate_run(cfg, MLP(784, [300, 100], 10), world_size=8)
    assert math.isfinite(out["est/comm_time_s"]) and out["est/comm_time_s"] > 0


def test_estimate_run_at_one_rank_costs_no_communication():
    cfg = load_config(REPO / "configs/mnist_lenet300_dense.yaml")
    out = estimate_run(cfg, MLP(784, [300, 100], 10), world_size=1)
    assert out["est/comm_time_s"] == 0.0 and out["est/step_speedup"] == 1.0


def test_estimate_run_scales_the_runs_traffic_to_its_measured_bytes():
    cfg = load_config(REPO / "configs/mnist_lenet300_dense.yaml")
    model = MLP(784, [300, 100], 10)
    exact = estimate_run(cfg, model, world_size=2, comm_bytes_per_step=266_610 * 4.0)
    assert exact["est/comm_bytes_measured_over_model"] == pytest.approx(1.0)
    double = estimate_run(cfg, model, world_size=2, comm_bytes_per_step=266_610 * 8.0)
    assert double["est/comm_bytes_per_step"] == pytest.approx(2 * exact["est/comm_bytes_per_step"])


def test_estimate_run_uses_2_4_masks_where_sparse_kernels_apply():
    cfg = load_config(None, ["model.name=wide_mlp", "model.width=128", "data.name=synthetic",
                             "data.synthetic_shape=[1,8,8]", "sparsity.method=nm"])
    model = MLP(64, [128, 128], 10)
    masks = expected_masks(model, cfg.sparsity)
    out = estimate_run(cfg, model, world_size=8, masks=masks)
    assert out["est/sparse_tc_speedup_theoretical"] > 1.0  # fc1 and fc2 qualify, fc3 does not
    assert out["est/sparse_tc_speedup_realistic"] < 1.0  # batch 64: small GEMMs lose
    dense = estimate_run(load_config(None, ["model.name=wide_mlp", "model.width=128",
                                            "data.name=synthetic", "data.synthetic_shape=[1,8,8]"]),
                         model, world_size=8)
    assert out["est/comm_bytes_per_step"] < dense["est/comm_bytes_per_step"]
    assert out["est/weight_bytes/nm24"] < out["est/weight_bytes/dense"]


def test_hierarchical_dgc_reduces_inside_the_node_and_gathers_a_shard_across_nodes():
    """Counted by hand for one bucket (w: 400x10, b: 400) on 2 nodes of 2 ranks: pieces of
    2000 and 200 entries per rank, k = ceil(0.01 * 2000) = 20 pairs (int32 + fp16, 120 B
    padded to 120), the bias piece dense in fp16 (400 B)."""
    options = DGCOptions(density=0.01, value_dtype="fp16", index_dtype="int32")
    t = tr.hierarchical_dgc([[("w", (400, 10)), ("b", (400,))]], options, 4, 2, passes=0)
    assert [(c.kind, c.nbytes, c.group) for c in t.collectives] == [
        ("reduce_scatter", 2 * 2200 * 4, "intra"), ("allreduce", 200 * 2, "inter"),
        ("allgather", 120, "inter"), ("allgather", 2200 * 4, "intra")]
    intra, inter = t.link_bytes(4, 2)
    assert intra == pytest.approx(0.5 * 2 * 2200 * 4 + 2200 * 4)
    assert inter == pytest.approx(400 + 120)  # p_inter = 2: each collective's size once
    dense = tr.hierarchical_dense([[("w", (400, 10)), ("b", (400,))]], 2)
    assert [(c.kind, c.nbytes, c.group) for c in dense.collectives] == [
        ("reduce_scatter", 4400 * 4, "intra"), ("allreduce", 2200 * 4, "inter"),
        ("allgather", 2200 * 4, "intra")]


def test_hierarchical_sparse_dgc_merges_pairs_in_the_node_and_allgathers_a_slice():
    """The same bucket on 2 nodes of 2 ranks with a sparse intra-node stage: the bucket
    planned whole (k = 40 pairs of w, 240 B), the node's pairs allgathered, then a slice of
    20 pairs (120 B) allgathered over the world; the bias allreduced over the world."""
    options = DGCOptions(density=0.01, value_dtype="fp16", index_dtype="int32",
                         dense_fallback=False)
    bucket = [[("w", (400, 10)), ("b", (400,))]]
    t = tr.hierarchical_sparse_dgc(bucket, options, 4, 2, passes=0)
    assert [(c.kind, c.nbytes, c.group) for c in t.collectives] == [
        ("allreduce", 400 * 2, "world"), ("allgather", 240, "intra"),
        ("allgather", 120, "world")]
    flat = tr.dgc(bucket, dataclasses.replace(options, exchange="allgather"), 4, passes=0,
                  per_node=2)
    # the pairs cross between nodes at half flat DGC's bytes (the bias's allreduce alike)
    assert t.link_bytes(4, 2)[1] - 600 == pytest.approx((flat.link_bytes(4, 2)[1] - 600) / 2)
    # one node, or one rank per node: flat DGC
    for p, per_node in ((2, 2), (4, 1)):
        one = tr.hierarchical_sparse_dgc(bucket, options, p, per_node, passes=0)
        same = tr.dgc(bucket, options, p, passes=0, per_node=per_node)
        assert one.collectives == same.collectives


def test_a_flat_ring_over_two_nodes_crosses_them_on_two_of_its_hops():
    t = tr.Traffic("t", [tr.Collective("allgather", 1000)])
    assert t.link_bytes(4, 2) == pytest.approx((1500, 1500))  # 3000 B, 2 of 4 hops cross
    assert t.link_bytes(4, 4) == pytest.approx((3000, 0))  # one node


def test_subgroup_collectives_run_on_their_own_link_class():
    cluster = simple_cluster()
    t = col.sequence_time([("reduce_scatter", 8e6, "intra")], cluster, 8)
    per_node = min(8, cluster.per_node)
    assert t == pytest.approx(col.reduce_scatter(8e6, per_node, cluster.intra.latency,
                                                 cluster.intra.bandwidth)
                              + cluster.intra.overhead)
