"""Alpha-beta time of the collectives a data-parallel step runs.

A message of n bytes over a link costs alpha + n / B. The per-algorithm forms follow
nccl-tests' performance notes (doc/PERFORMANCE.md), whose bus-bandwidth factors are the
fraction of the data each rank moves, and Thakur, Rabenseifner and Gropp, "Optimization of
collective communication operations in MPICH" (IJHPCA 2005), for the latency terms. With
p ranks, S the size of the reduced tensor and S_total the size of the gathered one:

  ring allreduce         2(p-1) alpha + 2(p-1)/p * S / B
  reduce-scatter         (p-1) alpha + (p-1)/p * S / B
  ring allgather         (p-1) alpha + (p-1)/p * S_total / B
  tree allreduce         2 ceil(log2 p) alpha + 2 S / B      (NCCL's pipelined double binary
                         tree, Jeaugey 2019: each rank sends and receives S per phase)
  hierarchical           intra-node reduce-scatter, inter-node ring allreduce of S/g between
                         the g ranks of equal local index (one rail each), intra allgather

Across nodes a flat collective runs at its slowest hop, with the inter-node latency. With
ranks placed node by node, a ring (or NCCL's tree) crosses between nodes at one hop per
node, so that hop has the node's NICs to itself (NCCL stripes its rings over them): the
bandwidth is the smaller of the intra-node link's and the node's NICs'. An all-to-all or a
pairwise swap sends across from every rank of a node at once: each gets its share of the
NICs. (The two-node link benchmark measured the first: a 4-rank Gloo allreduce over two
namespaces ran at the full shaped rate, BENCHMARKS.md "Two nodes".)

Every collective also costs a fixed ``Link.overhead_us`` whatever its size (LogP's o,
Culler et al. 1993): starting it and waking its caller when it is done. It is 0 on the
hardware presets, whose per-hop latency is taken as the whole fixed cost.

Links shaped by a token bucket (``Link.burst_kbytes``: tc's tbf on the emulated links of
benchmarks/linkbench.py) let a rank send the bucket's bytes at once after an idle spell.
``token_bucket_time`` follows the bucket hop by hop: it refills while a hop waits out its
latency (an exponential wait there) and carries over from one collective to the next.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

from .hardware import Cluster, Link

Kind = Literal["allreduce", "allgather", "reduce_scatter", "all_to_all", "sendrecv"]
Algorithm = Literal["auto", "ring", "tree", "hierarchical"]
# Which ranks a collective runs over: all of them, the ranks of one node, or one rank per
# node (the ranks of equal local index: the hierarchical DGC's inter-node stage).
GroupKind = Literal["world", "intra", "inter"]


def ring_allreduce(nbytes: float, p: int, alpha: float, bandwidth: float) -> float:
    if p <= 1:
        return 0.0
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * nbytes / bandwidth


def reduce_scatter(nbytes: float, p: int, alpha: float, bandwidth: float) -> float:
    if p <= 1:
        return 0.0
    return (p - 1) * alpha + (p - 1) / p * nbytes / bandwidth


def allgather(total_nbytes: float, p: int, alpha: float, bandwidth: float) -> float:
    """Ring allgather of a ``total_nbytes`` result (each rank contributes total / p)."""
    if p <= 1:
        return 0.0
    return (p - 1) * alpha + (p - 1) / p * total_nbytes / bandwidth


def tree_allreduce(nbytes: float, p: int, alpha: float, bandwidth: float) -> float:
    if p <= 1:
        return 0.0
    return 2 * math.ceil(math.log2(p)) * alpha + 2 * nbytes / bandwidth


def hierarchical_allreduce(nbytes: float, per_node: int, nodes: int, intra: tuple[float, float],
                           inter: tuple[float, float]) -> float:
    """``intra`` and ``inter`` are (alpha, bandwidth) of the two levels."""
    return (reduce_scatter(nbytes, per_node, *intra)
            + ring_allreduce(nbytes / per_node, nodes, *inter)
            + allgather(nbytes, per_node, *intra))


def hierarchical_allgather(nbytes_per_rank: float, per_node: int, nodes: int,
                           intra: tuple[float, float], inter: tuple[float, float]) -> float:
    """Gather across nodes between ranks of equal local index, then within each node."""
    return (allgather(nodes * nbytes_per_rank, nodes, *inter)
            + allgather(nodes * per_node * nbytes_per_rank, per_node, *intra))


def break_even_density(p: int, value_bytes: float, index_bytes: float,
                       dense_bytes: float | None = None) -> float:
    """Density above which a sparse allgather of (value, index) pairs moves more bytes per
    rank than a dense allreduce: (p-1) d n (b_v + b_i) = 2 (p-1)/p n b_d gives
    d = 2 b_d / (p (b_v + b_i)), with b_d the dense element width (default b_v)."""
    dense = value_bytes if dense_bytes is None else dense_bytes
    return 2 * dense / (p * (value_bytes + index_bytes))


def _expected_min(cap: float, mean: float) -> float:
    """E[min(cap, X)] for X exponential with this mean; 0 for a mean of 0."""
    return -mean * math.expm1(-cap / mean) if mean > 0 else 0.0


def token_bucket_time(collectives: Iterable[tuple[int, float]], alpha: float, bandwidth: float,
                      burst: float, overhead: float = 0.0, slowdown: float = 1.0) -> float:
    """Expected seconds for collectives run back to back on links shaped by a token bucket
    of ``burst`` bytes that refills at ``bandwidth``. ``collectives``: per collective, its
    hops and the bytes one rank sends at each hop (a ring allreduce: 2(p-1) hops of S/p; a
    ring allgather: p-1 hops of one rank's share).

    Each collective first costs ``overhead``. Each hop then waits for the previous hop's
    data, and sends its own: what the bucket holds at once, the rest at the rate. The link
    idles while a hop waits, so the bucket refills then, by the wait times the rate. The
    wait is taken as exponential with mean ``alpha``: on the emulated links it is a thread
    waking up, fast or after a timer tick (its spread is close to its mean in the link
    calibration, BENCHMARKS.md), and a chunk about the size of a mean wait's refill is
    late only after short waits, which a fixed wait of ``alpha`` would miss. The bucket
    starts full (the link was idle before) and carries its expected fill from hop to hop.
    With ``burst`` 0 this is the sum of the ring forms, plus an overhead per collective.
    The bytes that wait for the rate take ``slowdown`` times their time at the rate
    (``Link.swap_slowdown``: a swap's both ways at once)."""
    total, tokens = 0.0, burst
    refill = alpha * bandwidth  # bytes a mean wait adds to the bucket
    for hops, chunk in collectives:
        total += overhead
        tokens = min(burst, tokens + overhead * bandwidth)
        room = max(0.0, burst - chunk)  # the most a hop can leave in the bucket
        for hop in range(hops):
            short = chunk - tokens  # bytes the bucket lacks before the wait
            if short > 0:
                late = short - _expected_min(min(short, burst - tokens), refill)
                left = math.exp(-short / refill) * _expected_min(room, refill) if refill else 0.0
            else:
                late = 0.0
                left = -short + _expected_min(burst - tokens, refill)
            took = alpha + late * slowdown / bandwidth
            if abs(left - tokens) <= 1e-9 * burst:  # every hop left will be this one again
                total += took * (hops - hop)
                break
            total, tokens = total + took, left
    return total


RING_KINDS = ("allreduce", "allgather", "reduce_scatter")


def _flat_link(cluster: Cluster, p: int, kind: Kind = "allreduce") -> tuple[float, float]:
    """(alpha, bandwidth) of a flat collective of ``kind`` over ``p`` ranks: its slowest
    hop. Between nodes a ring's crossing hop has the node's NICs, an all-to-all's or a
    swap's a rank's share of them (module doc)."""
    if cluster.nodes(p) == 1:
        return cluster.intra.latency, cluster.intra.bandwidth
    crossing = (cluster.inter.bandwidth * cluster.nics_per_node if kind in RING_KINDS
                else cluster.inter_bandwidth_per_rank())
    return (max(cluster.intra.latency, cluster.inter.latency),
            min(cluster.intra.bandwidth, crossing))


def ring_hops(kind: Kind, nbytes: float, p: int) -> tuple[int, float]:
    """A ring collective's hops and the bytes one rank sends at each (``nbytes`` as in
    ``collective_time``): an allreduce 2(p-1) hops of S/p, a reduce-scatter p-1 hops of S/p,
    an allgather p-1 of one share."""
    if kind == "allreduce":
        return 2 * (p - 1), nbytes / p
    if kind in ("reduce_scatter", "all_to_all"):  # an all-to-all sends each peer 1/p
        return p - 1, nbytes / p
    if kind == "sendrecv":  # one swap with one peer
        return 1, nbytes
    return p - 1, nbytes


def group_shape(group: GroupKind, cluster: Cluster, p: int) -> tuple[int, int]:
    """(ranks in the group, ranks per node) of ``group`` on ``p`` ranks of ``cluster``."""
    per_node = min(p, cluster.per_node)
    if group == "intra":
        return per_node, per_node
    if group == "inter":
        return cluster.nodes(p), per_node
    return p, per_node


def _group_time(kind: Kind, nbytes: float, size: int, alpha: float, bandwidth: float) -> float:
    """A ring collective over a group of ``size`` ranks on one class of link."""
    if kind == "allreduce":
        return ring_allreduce(nbytes, size, alpha, bandwidth)
    if kind in ("reduce_scatter", "all_to_all"):  # the same (p-1) alpha + (p-1)/p S / B
        return reduce_scatter(nbytes, size, alpha, bandwidth)
    return allgather(size * nbytes, size, alpha, bandwidth)


def _subgroup_time(items: Sequence[tuple[Kind, float]], group: GroupKind, cluster: Cluster,
                   p: int, algorithm: Algorithm = "auto") -> float:
    """Collectives over the intra- or inter-node groups (all such groups run at once): on
    the intra-node link, or on each rank's share of its node's inter-node link. An
    allreduce runs as a ring or, with ``auto``, as a tree where that is faster (NCCL's
    choice for small messages); allgathers and reduce-scatters are rings."""
    size, _ = group_shape(group, cluster, p)
    if size <= 1 and group == "inter" and any(kind == "sendrecv" for kind, _ in items):
        size = 2  # a flat group's swap that crosses nodes
    if size <= 1 or not items:
        return 0.0
    if group == "intra":
        link, bandwidth = cluster.intra, cluster.intra.bandwidth
    else:
        link, bandwidth = cluster.inter, cluster.inter_bandwidth_per_rank()
    if link.burst:
        return _bucket_time(items, size, link, link.latency, bandwidth, link.overhead)
    total = 0.0
    for kind, nbytes in items:
        if kind == "sendrecv":  # both ways at once, at the link's swap constants
            total += _swap_time(link, nbytes, bandwidth)
            continue
        took = _group_time(kind, nbytes, size, link.latency, bandwidth)
        if kind == "allreduce" and algorithm in ("auto", "tree"):
            tree = tree_allreduce(nbytes, size, link.latency, bandwidth)
            took = tree if algorithm == "tree" else min(took, tree)
        total += link.overhead + took
    return total


def _swap_time(link: Link, nbytes: float, bandwidth: float) -> float:
    """One pairwise swap of ``nbytes`` each way on ``link`` without a bucket."""
    fixed, overhead, slowdown = link.swap
    return overhead + fixed + nbytes * slowdown / bandwidth


def _bucket_time(items: Sequence[tuple[Kind, float]], size: int, link: Link, alpha: float,
                 bandwidth: float, overhead: float) -> float:
    """``items`` back to back over ``size`` ranks on a link shaped by a token bucket. On a
    link with a calibration of its pairwise swaps (``Link.swap_us``) the swaps run on it,
    the bucket carried within the swaps and within the rest."""
    own = bool(link.swap_us)
    swaps = [ring_hops(k, n, size) for k, n in items if own and k == "sendrecv"]
    rest = [ring_hops(k, n, size) for k, n in items if not (own and k == "sendrecv")]
    fixed, swap_overhead, slowdown = link.swap
    return (token_bucket_time(rest, alpha, bandwidth, link.burst, overhead)
            + token_bucket_time(swaps, fixed, bandwidth, link.burst, swap_overhead, slowdown))


def _overhead(cluster: Cluster, p: int) -> float:
    """Seconds each collective costs whatever its size (``Link.overhead_us``)."""
    if cluster.nodes(p) == 1:
        return cluster.intra.overhead
    return max(cluster.intra.overhead, cluster.inter.overhead)


def sequence_time(collectives: Sequence[tuple], cluster: Cluster, p: int,
                  algorithm: Algorithm = "auto") -> float:
    """Seconds for ``collectives``, (kind, nbytes) as in ``collective_time`` or (kind,
    nbytes, group), one after another. On a link shaped by a token bucket they run as rings,
    which is what Gloo runs, and the bucket carries over from one to the next (within each
    class of group)."""
    if p <= 1:
        return 0.0
    grouped = {g: [(c[0], c[1]) for c in collectives if (c[2] if len(c) > 2 else "world") == g]
               for g in ("world", "intra", "inter")}
    return (_world_time(grouped["world"], cluster, p, algorithm)
            + _subgroup_time(grouped["intra"], "intra", cluster, p, algorithm)
            + _subgroup_time(grouped["inter"], "inter", cluster, p, algorithm))


def _world_time(collectives: Sequence[tuple[Kind, float]], cluster: Cluster, p: int,
                algorithm: Algorithm) -> float:
    if not collectives:
        return 0.0
    link = cluster.intra if cluster.nodes(p) == 1 else cluster.inter
    if not link.burst:
        return sum(collective_time(kind, nbytes, cluster, p, algorithm)
                   for kind, nbytes in collectives)
    total = 0.0  # rings and the rest on their own links, the bucket carried within each
    for ring in (True, False):
        items = [(kind, nbytes) for kind, nbytes in collectives if (kind in RING_KINDS) == ring]
        if items:
            alpha, bandwidth = _flat_link(cluster, p, "allreduce" if ring else "sendrecv")
            total += _bucket_time(items, p, link, alpha, bandwidth, _overhead(cluster, p))
    return total


def collective_time(kind: Kind, nbytes: float, cluster: Cluster, p: int,
                    algorithm: Algorithm = "auto") -> float:
    """Seconds for one collective on ``p`` ranks of ``cluster``. ``nbytes`` is the reduced
    tensor's size for an allreduce and one rank's contribution for an allgather."""
    if p <= 1:
        return 0.0
    nodes = cluster.nodes(p)
    per_node = min(p, cluster.per_node)
    intra = (cluster.intra.latency, cluster.intra.bandwidth)
    flat = _flat_link(cluster, p, kind)
    inter = (cluster.inter.latency, cluster.inter_bandwidth_per_rank())
    if kind == "allreduce":
        options = {"ring": ring_allreduce(nbytes, p, *flat),
                   "tree": tree_allreduce(nbytes, p, *flat),
                   "hierarchical": hierarchical_allreduce(nbytes, per_node, nodes, intra, inter)
                   if nodes > 1 else ring_allreduce(nbytes, p, *intra)}
    elif kind in ("reduce_scatter", "all_to_all"):
        ring = reduce_scatter(nbytes, p, *flat)
        options = {"ring": ring, "tree": ring, "hierarchical": ring}
    elif kind == "sendrecv":  # one swap, on the slowest hop
        link = cluster.intra if nodes == 1 else cluster.inter
        if link.swap_us:
            return _swap_time(link, nbytes, flat[1])
        swap = flat[0] + nbytes / flat[1]
        options = {"ring": swap, "tree": swap, "hierarchical": swap}
    else:
        assert kind == "allgather", kind
        ring = allgather(p * nbytes, p, *flat)
        options = {"ring": ring, "tree": ring,  # NCCL has no tree allgather
                   "hierarchical": hierarchical_allgather(nbytes, per_node, nodes, intra, inter)
                   if nodes > 1 else ring}
    took = min(options.values()) if algorithm == "auto" else options[algorithm]
    return _overhead(cluster, p) + took
