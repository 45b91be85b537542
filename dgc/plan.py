"""What to do with one bucket: which tensors go sparse with which k, and by which route.

A plan depends only on shapes, masks, density, the options and the size of the group that
exchanges, all the same on every rank, so every rank derives the same plan and starts the
same collectives in the same order. The route is the cheapest of the exchanges the options
allow, priced by ``route_costs`` (alpha-beta, with the link the options give; with no
latency that is bytes on the wire per rank).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from dgc import codec, wire
from dgc.options import DGCOptions
from dgc.schedule import sparse_count
from sparse_comm.schema import ConfigError

log = logging.getLogger(__name__)
Route = Literal["allgather", "sparse_allreduce", "gtopk", "dense"]


@dataclass(frozen=True)
class Slot:
    """One tensor's place (or one piece of a tensor, for the hierarchical transport) in
    the buffer that is exchanged. ``k`` is None for a slot that goes dense; ``live`` counts
    the entries that travel when it does (fewer than ``numel`` under a fixed sparsity mask,
    whose live entries go without indices)."""

    name: str
    offset: int
    numel: int
    k: int | None
    live: int

    @property
    def compact(self) -> bool:
        return self.live < self.numel


@dataclass(frozen=True)
class Plan:
    slots: tuple[Slot, ...]
    route: Route
    """How the compressed slots travel: ``allgather``, ``sparse_allreduce`` or ``gtopk`` of
    their pairs (the dense slots allreduced beside), or ``dense``: everything in one
    allreduce (the dense fallback)."""
    layout: codec.Layout
    dense_in_swaps: bool = False
    """gtopk only: the dense slots ride in its swaps instead of an allreduce beside them
    (``dense_rides_swaps``)."""

    @property
    def sparse(self) -> bool:
        return self.route != "dense"

    @property
    def compressed(self) -> list[Slot]:
        return [s for s in self.slots if s.k is not None]

    @property
    def dense(self) -> list[Slot]:
        return [s for s in self.slots if s.k is None]


@dataclass(frozen=True)
class Piece:
    """What the plan needs of a slot: the tensor's ``shape`` (which decides whether it is
    compressed at all), the slot's ``numel`` and its ``live`` (unmasked) entries."""

    name: str
    shape: tuple[int, ...]
    numel: int
    live: int


def make_plan(names: Iterable[str], shapes: Iterable[torch.Size], density: float,
              world_size: int, options: DGCOptions,
              live: Mapping[str, int] | None = None, fixed: bool = False) -> Plan:
    """The plan of a bucket of whole tensors. ``live``: entries left by hard sparsity
    masks, by name (k counts only those); ``fixed``: the masks are settled on every rank,
    so dense transport sends live entries only."""
    live = live or {}
    pieces = [Piece(n, tuple(s), math.prod(s), live.get(n, math.prod(s)))
              for n, s in zip(names, shapes)]
    return plan_pieces(pieces, density, world_size, options, fixed)


def plan_pieces(pieces: Sequence[Piece], density: float, world_size: int,
                options: DGCOptions, fixed: bool = False) -> Plan:
    slots, offset = [], 0
    for p in pieces:
        k = sparse_count(p.shape, p.live, density, options.min_numel)
        slots.append(Slot(p.name, offset, p.numel, k, p.live if fixed else p.numel))
        offset += p.numel
    layout = codec.Layout(sum(s.k for s in slots if s.k is not None),
                          codec.VALUE_DTYPES[options.value_dtype],
                          codec.INDEX_DTYPES[options.index_dtype])
    if layout.index_dtype == torch.int32 and offset >= 2**31:
        raise ConfigError("index_dtype", f"a bucket of {offset} elements needs 'int64'")
    if layout.count == 0:
        return Plan(tuple(slots), "dense", layout)
    costs = route_costs(slots, layout, world_size, options)
    allowed = {"allgather": ("allgather",), "sparse_allreduce": ("sparse_allreduce",),
               "gtopk": ("gtopk",), "auto": ("allgather", "sparse_allreduce", "gtopk")
               }[options.exchange]
    if world_size <= 2:  # one swap moves what the allgather moves, and drops pairs
        allowed = tuple(r for r in allowed if r != "gtopk") or allowed
    routes = list(allowed) + (["dense"] if options.dense_fallback else [])
    route = min(routes, key=lambda r: (costs[r], routes.index(r)))
    return Plan(tuple(slots), route, layout,
                route == "gtopk" and dense_rides_swaps(slots, layout, world_size, options))


def route_costs(slots: Sequence[Slot], layout: codec.Layout, p: int, options: DGCOptions
                ) -> dict[Route, float]:
    """Seconds (alpha-beta, the options' link; bytes per rank with no latency) of each
    route for this bucket on ``p`` ranks. The dense slots' allreduce, beside the sparse
    routes, counts for each, or for gtopk their bytes in its swaps where that is cheaper
    (``dense_rides_swaps``); everything travels in the value dtype but gtopk's sums after
    its first round (float32). gtopk needs a power of two: elsewhere it costs infinity."""
    from dgc.transport.sparse_allreduce import capacities
    alpha, beta = _link(options)
    pair = layout.index_dtype.itemsize + layout.value_dtype.itemsize
    value = layout.value_dtype.itemsize
    beside, carried = _dense_seconds(slots, layout, p, options)
    c1, c2 = capacities(layout.count, p, options.sparse_capacity)
    return {
        "allgather": beside + (p - 1) * alpha + wire.allgather_bytes(layout.nbytes, p) * beta,
        "sparse_allreduce": beside + 2 * (p - 1) * alpha
        + (wire.all_to_all_bytes(p * c1 * pair, p) + wire.allgather_bytes(c2 * pair, p)) * beta,
        "gtopk": min(beside, carried) + gtopk_seconds(layout, p, alpha, beta),
        "dense": _allreduce_seconds(sum(s.live for s in slots) * value, p, alpha, beta),
    }


def dense_rides_swaps(slots: Sequence[Slot], layout: codec.Layout, p: int,
                      options: DGCOptions) -> bool:
    """Whether gtopk should carry the bucket's dense slots in its log2(p) swaps (recursive
    doubling: log2(p) copies of their bytes, no latency of their own) rather than allreduce
    them beside (2(p - 1) latencies in this model's ring, about 2 copies of the bytes): for
    the few kilobytes of biases on a large group it is, as MPI libraries use recursive
    doubling for short allreduces (Thakur, Rabenseifner and Gropp, IJHPCA 2005)."""
    if not any(s.k is None for s in slots):
        return False
    beside, carried = _dense_seconds(slots, layout, p, options)
    return carried < beside


def _link(options: DGCOptions) -> tuple[float, float]:
    """(latency in s, seconds per byte) of the options' exchange link."""
    return options.exchange_latency_us * 1e-6, 1.0 / (options.exchange_gbytes * 1e9)


def _allreduce_seconds(nbytes: float, p: int, alpha: float, beta: float) -> float:
    return 2 * (p - 1) * alpha + wire.allreduce_bytes(nbytes, p) * beta if nbytes else 0.0


def _dense_seconds(slots: Sequence[Slot], layout: codec.Layout, p: int, options: DGCOptions
                   ) -> tuple[float, float]:
    """The dense slots' seconds allreduced beside the pairs, and as extra bytes in gtopk's
    swaps (infinite where gtopk cannot run)."""
    alpha, beta = _link(options)
    numel = sum(s.live for s in slots if s.k is None)
    beside = _allreduce_seconds(numel * layout.value_dtype.itemsize, p, alpha, beta)
    carried = gtopk_seconds(layout, p, alpha, beta, numel) - gtopk_seconds(layout, p, alpha, beta)
    return beside, carried if math.isfinite(carried) else math.inf


def gtopk_seconds(layout: codec.Layout, p: int, alpha: float, beta: float,
                  dense_numel: int = 0) -> float:
    """log2(p) swaps of the bucket's k pairs and ``dense_numel`` dense entries, the first in
    the value dtype, the rest in float32; infinity unless p is a power of two."""
    if p & (p - 1):
        return math.inf
    rounds = p.bit_length() - 1
    index = layout.index_dtype.itemsize
    first = layout.count * (index + layout.value_dtype.itemsize) \
        + dense_numel * layout.value_dtype.itemsize
    later = (layout.count * (index + 4)) + dense_numel * 4
    return rounds * alpha + (first + max(rounds - 1, 0) * later) * beta if rounds else 0.0
