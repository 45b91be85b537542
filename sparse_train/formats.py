"""Sparse storage formats: the compressed N:M form and the byte cost of each format.

The compressed N:M form keeps, for each group of ``m`` weights along the input dimension
(see ``sparse_train.masks`` for the layout), exactly ``n`` values and their positions in
the group, ``ceil(log2 m)`` bits each (2 bits per kept value for 2:4, the metadata size
of NVIDIA's sparse tensor cores). Positions are packed little-endian into bytes. It
round-trips exactly, on any device, with no GPU kernel involved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .masks import nm_compliant, nm_matrix, nm_skip_reason, nm_unmatrix


def position_bits(m: int) -> int:
    """Bits needed to name one of ``m`` positions."""
    return max(1, math.ceil(math.log2(m)))


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack non-negative ints below ``2**bits`` into a flat uint8 tensor, little-endian."""
    flat = values.flatten().to(torch.int64)
    assert flat.numel() == 0 or (flat.min() >= 0 and flat.max() < 2 ** bits)
    shifts = torch.arange(bits, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).flatten()
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)])
    weights = 1 << torch.arange(8, device=flat.device)
    return (stream.view(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` values, as int64."""
    shifts = torch.arange(8, device=packed.device)
    stream = ((packed.to(torch.int64)[:, None] >> shifts) & 1).flatten()[:count * bits]
    weights = 1 << torch.arange(bits, device=packed.device)
    return (stream.view(count, bits) * weights).sum(1)


@dataclass(frozen=True)
class NMCompressed:
    """An N:M-sparse weight as ``values`` [rows, groups, n] plus packed positions."""

    values: Tensor
    positions: Tensor  # uint8, position_bits(m) bits per kept value, in ``values`` order
    shape: tuple[int, ...]
    n: int
    m: int

    def to_dense(self) -> Tensor:
        rows, groups, n = self.values.shape
        index = unpack_bits(self.positions, position_bits(self.m), self.values.numel())
        dense = self.values.new_zeros(rows, groups, self.m)
        dense.scatter_(-1, index.view(rows, groups, n).to(self.values.device), self.values)
        return nm_unmatrix(dense.reshape(rows, groups * self.m), self.shape)

    @property
    def nbytes(self) -> int:
        return (self.values.numel() * self.values.element_size()
                + self.positions.numel() * self.positions.element_size())


def compress_nm(weight: Tensor, n: int, m: int) -> NMCompressed:
    """Compress an N:M-compliant weight; raises ValueError if it is not compliant."""
    reason = nm_skip_reason(weight.shape, m)
    if reason is not None:
        raise ValueError(f"cannot store a {tuple(weight.shape)} weight as {n}:{m}: {reason}")
    if not nm_compliant(weight, n, m):
        raise ValueError(f"weight has more than {n} nonzeros in some group of {m}")
    matrix = nm_matrix(weight.detach())
    groups = matrix.reshape(matrix.shape[0], -1, m)
    # Keep the n largest of each group (all its nonzeros, padded with zeros), in position
    # order as sparse kernels expect.
    order = torch.argsort(groups.abs(), dim=-1, descending=True, stable=True)
    index = order[..., :n].sort(dim=-1).values
    values = groups.gather(-1, index).contiguous()
    return NMCompressed(values, pack_bits(index, position_bits(m)), tuple(weight.shape), n, m)


def storage_bytes(weight: Tensor, mask: Tensor | None = None, *, n: int = 2, m: int = 4,
                  block: tuple[int, int] = (4, 4), index_bytes: int = 4
                  ) -> dict[str, int | None]:
    """Bytes to store ``weight * mask`` (or ``weight``'s nonzeros) in each format.

    Formats work on the weight's 2-D matrix (``reshape(out, -1)``; the N:M layout for
    ``"nm"``) with ``index_bytes`` per index (int32, as sparse kernels use; torch's own
    sparse tensors default to int64). ``"bsr"`` stores every ``block`` that holds a nonzero,
    padding the matrix up to whole blocks; ``"ell"`` pads every row to the longest row;
    ``"nm"`` is the compressed N:M form (values plus ``ceil(log2 m)``-bit positions) and is
    None when the weight is not N:M compliant.
    """
    nonzero = (weight != 0) if mask is None else mask.to(torch.bool) & (weight != 0)
    matrix = nonzero.reshape(weight.shape[0], -1)
    rows, cols = matrix.shape
    value_bytes = weight.element_size()
    nnz = int(matrix.sum())
    r, c = block
    padded = torch.zeros(math.ceil(rows / r) * r, math.ceil(cols / c) * c, dtype=torch.bool,
                         device=matrix.device)
    padded[:rows, :cols] = matrix
    blocks = int(padded.view(padded.shape[0] // r, r, -1, c).any(dim=3).any(dim=1).sum())
    kept_per_row = int(matrix.sum(1).max()) if rows else 0
    kept_nm = weight.numel() // m * n
    return {
        "dense": weight.numel() * value_bytes,
        "coo": nnz * (value_bytes + 2 * index_bytes),
        "csr": nnz * (value_bytes + index_bytes) + (rows + 1) * index_bytes,
        "bsr": blocks * (r * c * value_bytes + index_bytes)
               + (padded.shape[0] // r + 1) * index_bytes,
        "ell": rows * kept_per_row * (value_bytes + index_bytes),
        "nm": (kept_nm * value_bytes + math.ceil(kept_nm * position_bits(m) / 8)
               if nm_compliant(nonzero, n, m) else None),
    }
