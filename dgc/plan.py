"""What to do with one bucket: which tensors go sparse with which k, and by which route.

A plan depends only on shapes, masks, density and the size of the group that exchanges,
all the same on every rank, so every rank derives the same plan and starts the same
collectives in the same order.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from dgc import codec, wire
from dgc.options import DGCOptions
from dgc.schedule import sparse_count
from sparse_comm.schema import ConfigError


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
    sparse: bool
    """Pairs plus a dense allreduce of the dense slots; else one allreduce of everything
    (the dense fallback), whichever moves fewer bytes."""
    layout: codec.Layout

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
    dense_numel = sum(s.live for s in slots if s.k is None)
    sparse_bytes = wire.allgather_bytes(layout.nbytes, world_size)
    if dense_numel:
        # the dense slots travel in the value dtype beside the allgather
        sparse_bytes += wire.allreduce_bytes(dense_numel * layout.value_dtype.itemsize,
                                             world_size)
    # The fallback allreduce carries everything in the value dtype too, so the break-even
    # density of a bucket of compressed tensors is 2 b_v / (p (b_v + b_i)).
    all_live = sum(s.live for s in slots)
    fallback = sparse_bytes > wire.allreduce_bytes(all_live * layout.value_dtype.itemsize,
                                                   world_size)
    sparse = layout.count > 0 and not (options.dense_fallback and fallback)
    return Plan(tuple(slots), sparse, layout)
