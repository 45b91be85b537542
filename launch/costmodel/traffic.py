"""What each communication scheme hands to collectives in one step, bucket by bucket.

Gradients travel in DDP's buckets, so each scheme is a list of collectives per bucket:

* dense: one allreduce of the bucket (fp32, or fp16/bf16 with a compression hook);
* PowerSGD at rank r (Vogels et al. 2019, torch's ``powerSGD_hook``): a tensor viewed as an
  n x m matrix sends P (n x r) and Q (m x r), each allreduced; 1-D tensors, and matrices
  that would not shrink by torch's ``min_compression_rate`` (2), go in one plain allreduce;
* DGC: exactly ``dgc.plan.make_plan``'s decision, the one the hook takes: an allgather of
  (index, value) pairs plus an allreduce of the tensors that stay dense, or one allreduce of
  the bucket where that moves fewer bytes;
* masked: a fixed weight mask known to every rank, so only the live gradient entries are
  allreduced and no indices travel (a 2:4 model sends half of each masked weight).

Per-rank wire bytes follow ``dgc.wire``, as the run's own counters do.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from dgc import codec, wire
from dgc.plan import make_plan
from dgc.options import DGCOptions

from .collectives import GroupKind, Kind

Param = tuple[str, tuple[int, ...]]  # a parameter's name and shape
FP32 = 4
# DDP may give its first bucket a small cap so that communication starts early in the
# backward (torch.distributed's _DEFAULT_FIRST_BUCKET_BYTES; see first_bucket_bytes).
FIRST_BUCKET_BYTES = 1024 * 1024
# torch's PowerSGDState(min_compression_rate=2): compress a matrix only if it shrinks 2x.
POWERSGD_MIN_COMPRESSION_RATE = 2


@dataclass(frozen=True)
class Collective:
    kind: Kind
    nbytes: float  # allreduce, reduce-scatter: the tensor's bytes; allgather: one rank's
    group: GroupKind = "world"  # all ranks, one node's, or one rank per node

    def size(self, p: int, per_node: int) -> int:
        """Ranks in this collective's group on ``p`` ranks of ``per_node`` per node."""
        return {"world": p, "intra": min(p, per_node),
                "inter": max(1, p // max(1, min(p, per_node)))}[self.group]

    def wire_bytes(self, p: int, per_node: int | None = None) -> float:
        size = self.size(p, per_node or p)
        if self.kind == "allreduce":
            return wire.allreduce_bytes(self.nbytes, size)
        if self.kind == "reduce_scatter":
            return wire.reduce_scatter_bytes(self.nbytes, size)
        if self.kind == "all_to_all":
            return wire.all_to_all_bytes(self.nbytes, size)
        if self.kind == "sendrecv":  # one swap with one peer, on the group's link
            return float(self.nbytes)
        return wire.allgather_bytes(self.nbytes, size)

    def link_bytes(self, p: int, per_node: int) -> tuple[float, float]:
        """(intra-node, inter-node) shares of this collective's per-rank wire bytes."""
        total = self.wire_bytes(p, per_node)
        if self.group == "intra" or (self.kind == "sendrecv" and p <= per_node):
            return total, 0.0
        if self.group == "inter":
            return 0.0, total
        return wire.ring_link_split(total, p, max(1, p // max(1, min(p, per_node))))


@dataclass
class Traffic:
    """One step of a scheme: its collectives and the local work of compressing."""

    scheme: str
    collectives: list[Collective] = field(default_factory=list)
    memory_bytes: float = 0.0  # bytes read and written to compress and decompress
    flops: float = 0.0  # fp32 arithmetic to compress (PowerSGD's products)

    def wire_bytes(self, p: int, per_node: int | None = None) -> float:
        return sum(c.wire_bytes(p, per_node) for c in self.collectives)

    def link_bytes(self, p: int, per_node: int) -> tuple[float, float]:
        shares = [c.link_bytes(p, per_node) for c in self.collectives]
        return sum(a for a, _ in shares), sum(b for _, b in shares)

    def scaled(self, factor: float) -> Traffic:
        return Traffic(self.scheme, [Collective(c.kind, c.nbytes * factor, c.group)
                                     for c in self.collectives], self.memory_bytes, self.flops)


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def first_bucket_bytes(bucket_cap_mb: float) -> float:
    """The first bucket's cap when DDP is given ``bucket_cap_mb``, as the launcher does.

    torch releases with ``_BucketCapacityConfig`` (2.13 here) keep the small first bucket
    for the default cap only and give an explicit cap to every bucket: measured on 2.13, a
    563,722-parameter MLP went in one bucket at ``bucket_cap_mb=25`` and in two at the
    default. Older releases cap the first bucket at 1 MiB always."""
    from torch.nn.parallel import distributed
    if hasattr(distributed, "_BucketCapacityConfig"):
        return bucket_cap_mb * 1024 * 1024
    return FIRST_BUCKET_BYTES


def ddp_buckets(params: Sequence[Param], bucket_cap_mb: float, itemsize: int = FP32,
                first_bytes: float | None = None) -> list[list[Param]]:
    """Buckets as DDP forms them: parameters in reverse order, a bucket closed once it
    reaches its cap (``first_bytes`` for the first, default ``first_bucket_bytes``;
    ``bucket_cap_mb`` MiB after), so it may overflow. Mirrors torch's reducer
    ``compute_bucket_assignment_by_size`` for one dtype."""
    first = first_bucket_bytes(bucket_cap_mb) if first_bytes is None else first_bytes
    buckets, current, size = [], [], 0
    for param in reversed(params):
        current.append(param)
        size += numel(param[1]) * itemsize
        if size >= (first if not buckets else bucket_cap_mb * 1024 * 1024):
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


def dense(buckets: Sequence[Sequence[Param]], itemsize: int = FP32, scheme: str = "dense"
          ) -> Traffic:
    """Plain DDP (fp32) or a cast-to-``itemsize`` compression hook (fp16, bf16)."""
    total = sum(numel(s) for bucket in buckets for _, s in bucket)
    # A cast hook reads fp32 and writes the narrow copy, then the reverse after the reduce.
    cast = 2 * total * (FP32 + itemsize) if itemsize != FP32 else 0.0
    return Traffic(scheme, [Collective("allreduce", sum(numel(s) for _, s in b) * itemsize)
                            for b in buckets], memory_bytes=cast)


def powersgd(buckets: Sequence[Sequence[Param]], rank: int, passes: float) -> Traffic:
    traffic = Traffic(f"powersgd-r{rank}")
    for bucket in buckets:
        plain = p_elems = q_elems = 0
        for _, shape in bucket:
            n, m = shape[0], numel(shape[1:]) if len(shape) > 1 else 1
            r = min(n, m, rank)
            if len(shape) > 1 and n * m >= POWERSGD_MIN_COMPRESSION_RATE * (n + m) * r:
                p_elems, q_elems = p_elems + n * r, q_elems + m * r
                traffic.flops += 4 * n * m * r  # P = M Q and Q = M^T P
                traffic.memory_bytes += passes * n * m * FP32
            else:
                plain += numel(shape)
        traffic.collectives += [Collective("allreduce", e * FP32)
                                for e in (plain, p_elems, q_elems) if e]
    return traffic


def dgc(buckets: Sequence[Sequence[Param]], options: DGCOptions, p: int, passes: float,
        density: float | None = None, live: Mapping[str, int] | None = None,
        per_node: int | None = None) -> Traffic:
    """DGC at ``density`` (default: the options' final one, after warm-up). ``live``: entries
    kept by fixed weight masks, by name; k counts only those, and dense transport sends only
    them (``dgc.hook`` with a sparsifier attached). ``per_node``: ranks per node (default
    all on one), which says which of gtopk's swaps cross nodes."""
    density = options.density if density is None else density
    traffic = Traffic(f"dgc-d{density:g}")
    for bucket in buckets:
        names, shapes = [n for n, _ in bucket], [s for _, s in bucket]
        plan = make_plan(names, shapes, density, max(p, 1), options, live, bool(live))
        traffic.memory_bytes += passes * FP32 * sum(s.numel for s in plan.compressed)
        traffic.collectives += route_collectives(plan, max(p, 1), options, "world",
                                                 per_node or max(p, 1))
    return traffic


def route_collectives(plan, p: int, options: DGCOptions, group: GroupKind,
                      per_node: int | None = None) -> list[Collective]:
    """The collectives ``dgc.transport`` starts for ``plan`` on a group of ``p`` ranks:
    the dense fallback's allreduce, or the dense slots' allreduce beside the pairs'
    allgather, or beside the sparse allreduce's all-to-all and allgather (its regions'
    histogram, once every 64 steps, left out), or gtopk's log2(p) swaps (the dense slots
    in them where the plan says so, or allreduced beside). A swap of a ``"world"`` group
    stays inside a node while the peer's distance divides the ``per_node`` ranks placed on
    each node (default: all ``p``)."""
    from dgc.transport.sparse_allreduce import capacities
    value_bytes = plan.layout.value_dtype.itemsize
    if not plan.sparse:  # the fallback allreduce, in the value dtype
        return [Collective("allreduce", sum(s.live for s in plan.slots) * value_bytes, group)]
    dense_elems = sum(s.live for s in plan.dense)
    out = []
    if dense_elems and not plan.dense_in_swaps:  # sent in the value dtype too
        out.append(Collective("allreduce", dense_elems * value_bytes, group))
    if plan.route == "gtopk":
        carried = dense_elems if plan.dense_in_swaps else 0
        return out + _gtopk_collectives(plan, p, options, group, min(per_node or p, p), carried)
    if plan.route == "allgather":
        return out + [Collective("allgather", plan.layout.nbytes, group)]
    pair = plan.layout.index_dtype.itemsize + value_bytes
    caps = [capacities(s.k, p, options.sparse_capacity) for s in plan.compressed]
    row = codec.aligned(sum(c1 for c1, _ in caps) * pair)
    published = codec.aligned(sum(c2 for _, c2 in caps) * pair)
    return out + [Collective("all_to_all", p * row, group),
                  Collective("allgather", published, group)]


def _gtopk_collectives(plan, p: int, options: DGCOptions, group: GroupKind, r: int,
                       dense_elems: int) -> list[Collective]:
    """gtopk's swaps (``dgc.transport.gtopk``), each carrying the bucket's pairs and its
    ``dense_elems`` dense entries (the first in the value dtype, later ones in float32),
    over ``r`` ranks per node."""
    index, value_bytes = plan.layout.index_dtype.itemsize, plan.layout.value_dtype.itemsize
    part = sum(-(-s.k // r) for s in plan.compressed)  # pairs of one rank's slice
    dense_part = -(-dense_elems // r)
    out, sliced = [], False
    for j in range(p.bit_length() - 1):
        width = value_bytes if j == 0 else FP32
        pair = index + width
        if group != "world" or r % (2 << j) == 0 or r == 1:  # inside a node, or whole sets
            link = group if group != "world" else ("intra" if r % (2 << j) == 0 else "inter")
            out.append(Collective("sendrecv", plan.layout.count * pair + dense_elems * width,
                                  link))
        elif options.gtopk_slices:  # across nodes: each rank swaps its own slice
            out.append(Collective("sendrecv", part * pair + dense_part * FP32, "inter"))
            sliced = True
        else:  # across nodes: a slice per rank, the node allgathers the slices
            whole = -(-plan.layout.count // r) * pair + dense_part * width
            out += [Collective("sendrecv", whole, "inter"),
                    Collective("allgather", whole, "intra")]
    if sliced:  # the node allgathers its final slices, the surviving entries, the dense
        out.append(Collective("allgather", codec.Layout(
            2 * part, torch.float32, plan.layout.index_dtype).nbytes + dense_part * FP32,
            "intra"))
    return out


def masked(buckets: Sequence[Sequence[Param]], live: Mapping[str, int], scheme: str = "masked"
           ) -> Traffic:
    """Allreduce of live entries only; ``live`` counts them per masked parameter (others are
    sent whole). A bucket with nothing live sends nothing."""
    traffic = Traffic(scheme)
    for bucket in buckets:
        elems = sum(live.get(n, numel(s)) for n, s in bucket)
        if elems:
            traffic.collectives.append(Collective("allreduce", elems * FP32))
        # Packing the live entries reads the masked gradients once; unpacking writes them.
        traffic.memory_bytes += 2 * FP32 * sum(numel(s) for n, s in bucket if n in live)
    return traffic


def hierarchical_dense(buckets: Sequence[Sequence[Param]], per_node: int,
                       itemsize: int = FP32) -> Traffic:
    """Dense allreduce the hierarchical way, per bucket: reduce-scatter inside the node,
    allreduce of each shard across nodes, allgather inside the node."""
    traffic = Traffic("hierarchical dense")
    for bucket in buckets:
        total = sum(numel(s) for _, s in bucket) * itemsize
        shard = math.ceil(total / per_node)
        traffic.collectives += [Collective("reduce_scatter", shard * per_node, "intra"),
                                Collective("allreduce", shard, "inter"),
                                Collective("allgather", shard, "intra")]
    return traffic


def hierarchical_dgc(buckets: Sequence[Sequence[Param]], options: DGCOptions, p: int,
                     per_node: int, passes: float, density: float | None = None,
                     live: Mapping[str, int] | None = None) -> Traffic:
    """Hierarchical DGC (``dgc.transport.hierarchical``), exactly as the hook plans it for
    local rank 0: the bucket reduce-scattered inside the node (fp32), the shard's pieces
    planned and exchanged across the p / per_node nodes, the shard allgathered inside the
    node. ``live``: entries kept by fixed masks, by name (k counts live entries per piece,
    the collectives carry whole tensors)."""
    from dgc.plan import Piece, plan_pieces
    from dgc.transport.hierarchical import piece_bounds
    density = options.density if density is None else density
    per_node = max(1, min(p, per_node))
    nodes = max(1, p // per_node)
    traffic = Traffic(f"hierarchical dgc-d{density:g}")
    live = live or {}
    for bucket in buckets:
        pieces, sizes = [], [0] * per_node
        for name, shape in bucket:
            n = numel(shape)
            bounds = piece_bounds(n, per_node)
            for j in range(per_node):
                sizes[j] += bounds[j + 1] - bounds[j]
            mine = bounds[1] - bounds[0]
            kept = round(live.get(name, n) * mine / n) if n else 0
            pieces.append(Piece(name, tuple(shape), mine, kept))
        shard = max(sizes)
        plan = plan_pieces(pieces, density, nodes, options)
        traffic.memory_bytes += passes * FP32 * sum(s.numel for s in plan.compressed)
        traffic.collectives.append(Collective("reduce_scatter", shard * per_node * FP32,
                                              "intra"))
        traffic.collectives += route_collectives(plan, nodes, options, "inter")
        traffic.collectives.append(Collective("allgather", shard * FP32, "intra"))
        # the bucket copied into shard-major order and back
        traffic.memory_bytes += 4 * FP32 * shard * per_node
    return traffic


def hierarchical_sparse_dgc(buckets: Sequence[Sequence[Param]], options: DGCOptions, p: int,
                            per_node: int, passes: float, density: float | None = None,
                            live: Mapping[str, int] | None = None) -> Traffic:
    """Hierarchical DGC with a sparse intra-node stage (``dgc.transport.hierarchical_sparse``),
    as the hook runs it: each bucket planned as flat DGC plans it; the node allgathers its
    ranks' pairs, then each rank allgathers a 1/r slice of the node's merged set over the
    world; the small tensors allreduced over the world. One node, one rank per node or a
    dense fallback plan: flat DGC."""
    density = options.density if density is None else density
    r = max(1, min(p, per_node))
    nodes = max(1, p // r)
    if r == 1 or nodes == 1:
        return dgc(buckets, options, p, passes, density, live, per_node=r)
    traffic = Traffic(f"hierarchical sparse dgc-d{density:g}")
    for bucket in buckets:
        names, shapes = [n for n, _ in bucket], [s for _, s in bucket]
        plan = make_plan(names, shapes, density, p, options, live, bool(live))
        traffic.memory_bytes += passes * FP32 * sum(s.numel for s in plan.compressed)
        if not plan.sparse:
            traffic.collectives += route_collectives(plan, p, options, "world", r)
            continue
        dense_elems = sum(s.live for s in plan.dense)
        if dense_elems:
            traffic.collectives.append(Collective(
                "allreduce", dense_elems * plan.layout.value_dtype.itemsize))
        part = codec.Layout(sum(-(-s.k // r) for s in plan.compressed),
                            plan.layout.value_dtype, plan.layout.index_dtype).nbytes
        traffic.collectives += [Collective("allgather", plan.layout.nbytes, "intra"),
                                Collective("allgather", part)]
    return traffic
