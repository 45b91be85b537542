"""Pack one rank's selected (index, value) pairs into one byte buffer, and unpack all ranks'.

One allgather per bucket needs one buffer, but values (fp32/fp16/bf16) and indices
(int32/int64) have different dtypes. Both are reinterpreted as bytes, not converted: indices
first, then values, then zero padding to a multiple of 8 bytes. Indices go first because
their element size (4 or 8) is a multiple of the values' (2 or 4), and the padding keeps every
rank's chunk 8-byte aligned inside the gathered buffer, so both parts can be viewed back as
their dtypes in place, with no copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INDEX_DTYPES = {"int32": torch.int32, "int64": torch.int64}
_ALIGN = 8


def to_wire(values: Tensor, dtype: torch.dtype) -> Tensor:
    """``values`` in the wire's ``dtype``, held inside its finite range: an fp32 value past
    fp16's 65504 would travel as inf and leave -inf in the sender's residual, which no later
    step clears. Where the caller keeps the rounding (a compressed tensor's residual), it
    keeps the part clipped off too; a dense tensor's is lost, as its rounding is."""
    if dtype == values.dtype:
        return values
    if dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(values.dtype).max:
        bound = torch.finfo(dtype).max
        values = values.clamp(-bound, bound)
    return values.to(dtype)


@dataclass(frozen=True)
class Layout:
    """Shape of one rank's packed buffer: ``count`` pairs of the given dtypes."""

    count: int
    value_dtype: torch.dtype
    index_dtype: torch.dtype

    @property
    def index_nbytes(self) -> int:
        return self.count * self.index_dtype.itemsize

    @property
    def value_nbytes(self) -> int:
        return self.count * self.value_dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes per rank, padding included: what goes on the wire."""
        return aligned(self.index_nbytes + self.value_nbytes)


def aligned(nbytes: int) -> int:
    """``nbytes`` padded to the 8-byte alignment every packed chunk keeps."""
    return -(-nbytes // _ALIGN) * _ALIGN


def pack(indices: Tensor, values: Tensor, layout: Layout) -> Tensor:
    """One uint8 buffer of ``layout.nbytes`` holding ``indices`` then ``values`` (cast to the
    layout's dtypes)."""
    assert indices.numel() == values.numel() == layout.count, (indices.shape, values.shape)
    out = torch.zeros(layout.nbytes, dtype=torch.uint8, device=values.device)
    out[:layout.index_nbytes].view(layout.index_dtype).copy_(indices)
    end = layout.index_nbytes + layout.value_nbytes
    out[layout.index_nbytes:end].view(layout.value_dtype).copy_(values)
    return out


def pack_rows(indices: Tensor, values: Tensor, layout: Layout) -> Tensor:
    """``rows`` packed buffers one after another (``indices`` and ``values`` shaped [rows,
    layout.count]), as ``unpack`` reads them back: the all-to-all's send buffer, one row
    per destination."""
    rows = indices.shape[0]
    out = torch.zeros(rows, layout.nbytes, dtype=torch.uint8, device=values.device)
    out[:, :layout.index_nbytes].view(layout.index_dtype).copy_(indices)
    end = layout.index_nbytes + layout.value_nbytes
    out[:, layout.index_nbytes:end].view(layout.value_dtype).copy_(values)
    return out.view(-1)


def unpack(gathered: Tensor, layout: Layout, world_size: int, row_nbytes: int | None = None
           ) -> tuple[Tensor, Tensor]:
    """Views ``(indices, values)`` of shape ``[world_size, count]`` into an allgathered buffer
    of ``world_size`` packed chunks, each ``row_nbytes`` long (default ``layout.nbytes``;
    longer when something follows the pairs in each chunk)."""
    rows = gathered.view(world_size, row_nbytes or layout.nbytes)
    end = layout.index_nbytes + layout.value_nbytes
    indices = rows[:, :layout.index_nbytes].view(layout.index_dtype)
    values = rows[:, layout.index_nbytes:end].view(layout.value_dtype)
    return indices, values


def scatter_sum_(out: Tensor, indices: Tensor, values: Tensor, empty: int | None = None
                 ) -> Tensor:
    """Add every rank's values into ``out`` at its indices; returns ``out``.

    One ``index_add_`` per rank, in rank order: within a rank the indices are distinct, so no
    two additions race, and every rank sums the contributions in the same order, giving
    bit-identical results on all ranks even where atomics would reorder them (CUDA).
    ``empty`` (an index past the end of ``out``) marks unused slots. They add -0.0 at index
    0, which changes no value whatever the order, so ``out`` needs no extra entry and the
    shapes stay static.
    """
    for rank_indices, rank_values in zip(indices, values):
        rank_indices, rank_values = rank_indices.long(), rank_values.to(out.dtype)
        if empty is not None:
            unused = rank_indices == empty
            rank_indices = rank_indices.masked_fill(unused, 0)
            rank_values = rank_values.masked_fill(unused, -0.0)
        out.index_add_(0, rank_indices, rank_values)
    return out
