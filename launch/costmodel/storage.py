"""Bytes to store a model's weights in each sparse format, and masks to expect from a config.

Dense, COO, CSR, BSR, ELL and the compressed N:M form come from
``sparse_train.formats.storage_bytes`` (one definition for the project); CSC and DIA are
added here. ``nm24`` is the 2:4 form: the stored size when the mask is 2:4, otherwise what
pruning the layer to 2:4 would give (half the values plus 2 bits of position each), and the
dense size for a layer whose shape cannot take 2:4.

Before training there are no masks; ``expected_masks`` draws masks with the density and
structure a ``sparsity:`` section leads to, for storage and traffic estimates.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from sparse_train.formats import storage_bytes
from sparse_train.masks import expand_blocks, nm_skip_reason, nm_unmatrix
from sparse_train.methods import build_method
from sparse_train.options import SparsityOptions
from sparse_train.sparsifier import select_weights

FORMATS = ("dense", "coo", "csr", "csc", "bsr", "ell", "dia", "nm24")
VALUE_DTYPES = {4: torch.float32, 2: torch.float16}
_DIAGONAL_CHUNK = 1 << 22  # entries scanned at once when counting diagonals


def csc_bytes(matrix: Tensor, value_bytes: int, index_bytes: int) -> int:
    """CSC of a boolean matrix: a value and a row index per nonzero, cols + 1 pointers."""
    return int(matrix.sum()) * (value_bytes + index_bytes) + (matrix.shape[1] + 1) * index_bytes


def occupied_diagonals(matrix: Tensor) -> int:
    """Diagonals (offsets col - row) of a boolean matrix holding at least one nonzero."""
    rows, cols = matrix.shape
    seen = torch.zeros(rows + cols - 1, dtype=torch.bool, device=matrix.device)
    step = max(1, _DIAGONAL_CHUNK // max(cols, 1))
    for start in range(0, rows, step):
        r, c = matrix[start:start + step].nonzero(as_tuple=True)
        seen[c - (r + start) + rows - 1] = True
    return int(seen.sum())


def dia_bytes(matrix: Tensor, value_bytes: int, index_bytes: int) -> int:
    """DIA as scipy.sparse.dia_matrix stores it (``coo_matrix.todia``): per occupied
    diagonal one offset and a padded row of ``max(col) + 1`` values, where ``max(col)`` is
    the last column holding a nonzero anywhere in the matrix (not always ``cols``)."""
    diagonals = occupied_diagonals(matrix)
    if diagonals == 0:
        return 0
    width = int(matrix.any(dim=0).nonzero().max()) + 1
    return diagonals * (width * value_bytes + index_bytes)


def nm_pattern(shape: tuple[int, ...], n: int = 2, m: int = 4, device=None) -> Tensor:
    """A mask keeping the first ``n`` of every ``m`` weights along the input dimension."""
    rows, cols = shape[0], math.prod(shape[1:])
    group = torch.arange(m, device=device) < n
    return nm_unmatrix(group.repeat(rows, cols // m), shape)


def layer_storage(shape: tuple[int, ...], mask: Tensor | None = None, value_bytes: int = 4,
                  index_bytes: int = 4, block: tuple[int, int] = (4, 4)) -> dict[str, int]:
    """Bytes of one weight (ndim >= 2) of ``shape`` with ``mask`` (None: dense) per format."""
    device = None if mask is None else mask.device
    weight = torch.ones((), dtype=VALUE_DTYPES[value_bytes], device=device).expand(shape)
    sizes = storage_bytes(weight, mask, n=2, m=4, block=block, index_bytes=index_bytes)
    matrix = (weight != 0) if mask is None else mask.to(torch.bool)
    matrix = matrix.reshape(shape[0], -1)
    sizes["csc"] = csc_bytes(matrix, value_bytes, index_bytes)
    sizes["dia"] = dia_bytes(matrix, value_bytes, index_bytes)
    nm = sizes.pop("nm")
    if nm is None:
        if nm_skip_reason(shape, 4) is None:
            nm = storage_bytes(weight, nm_pattern(shape, device=device), n=2, m=4,
                               block=block, index_bytes=index_bytes)["nm"]
        else:
            nm = sizes["dense"]
    sizes["nm24"] = nm
    return {name: sizes[name] for name in FORMATS}


def model_storage(shapes: Mapping[str, tuple[int, ...]], masks: Mapping[str, Tensor],
                  value_bytes: int = 4, index_bytes: int = 4) -> dict[str, int]:
    """Total bytes per format: weights (ndim >= 2) in the format with their masks (missing:
    dense), other parameters (biases, norm scales) stored dense in every format."""
    totals = dict.fromkeys(FORMATS, 0)
    for name, shape in shapes.items():
        if len(shape) >= 2:
            sizes = layer_storage(shape, masks.get(name), value_bytes, index_bytes)
        else:
            sizes = dict.fromkeys(FORMATS, math.prod(shape) * value_bytes)
        for fmt in FORMATS:
            totals[fmt] += sizes[fmt]
    return totals


# Deep Compression's codebook sizes (Han, Mao and Dally, ICLR 2016, Sec. 5): 8 bits (256
# shared values) per convolution, 5 bits (32) per fully connected layer.
CONV_SHARING_BITS, FC_SHARING_BITS = 8, 5


def weight_sharing_rate(n: int, bits: int = 32, clusters: int = 32) -> float:
    """Compression rate of sharing ``clusters`` values among ``n`` weights of ``bits`` bits:
    r = n b / (n log2(k) + k b) (Han, Mao and Dally, "Deep Compression", ICLR 2016, Sec. 3)."""
    return n * bits / (n * math.log2(clusters) + clusters * bits)


def model_weight_sharing_rate(layers: Mapping[str, tuple[int, int]], bits: int = 32) -> float:
    """The paper's rate over a model: one codebook per layer, ``CONV_SHARING_BITS`` for
    convolutions and ``FC_SHARING_BITS`` for fully connected layers, over the weights
    only (biases are not shared). ``layers`` maps each weight's name to (weights kept,
    ndim); a layer with fewer weights than its codebook has entries uses one per weight."""
    dense = shared = 0.0
    for live, ndim in layers.values():
        if live == 0:
            continue
        clusters = min(live, 2 ** (CONV_SHARING_BITS if ndim > 2 else FC_SHARING_BITS))
        dense += live * bits
        shared += live * math.log2(max(clusters, 2)) + clusters * bits
    return dense / shared if shared else 1.0


def dns_density(c: float) -> float:
    """Fraction of Gaussian weights DNS keeps at threshold mean(|w|) + c std(|w|): |w| is
    half-normal with mean s sqrt(2/pi) and std s sqrt(1 - 2/pi)."""
    t = max(math.sqrt(2 / math.pi) + c * math.sqrt(1 - 2 / math.pi), 0.0)
    return math.erfc(t / math.sqrt(2))


def expected_density(options: SparsityOptions, name: str) -> float:
    """Density a selected weight ends its sparse phase with under ``options``."""
    if options.method == "nm":
        return options.n / options.m
    if options.method == "dns":
        c = options.dns_c
        if isinstance(c, list):
            c = next(v for pattern, v in zip(options.layers, c)
                     if fnmatch.fnmatchcase(name, pattern))
        return dns_density(c)
    return 1.0 - options.target


def expected_masks(model: nn.Module, options: SparsityOptions, seed: int = 0
                   ) -> dict[str, Tensor]:
    """Masks with the density and structure ``options`` leads to, for the weights it selects
    (``model`` may be on the meta device; masks are on the CPU). Unstructured patterns are
    drawn at random: the positions do not change storage or traffic, only the counts do."""
    method = build_method(options)
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, param in select_weights(model, options.layers).items():
        shape = tuple(param.shape)
        if method.skip_reason(shape) is not None:
            continue
        density = expected_density(options, name)
        if options.method == "nm":
            masks[name] = nm_pattern(shape, options.n, options.m)
        elif options.method == "block":
            r, c = options.block
            tiles = (shape[0] // r, math.prod(shape[1:]) // c)
            kept = torch.rand(tiles, generator=generator) < density
            masks[name] = expand_blocks(kept, (r, c), torch.Size(shape))
        else:
            masks[name] = torch.rand(shape, generator=generator) < density
    return masks
