"""Mask rules: which weights to keep, as pure functions of the weights.

Every function here takes tensors and returns boolean masks (True = keep) of the same
shape; none holds state, draws random numbers or talks to other ranks, so masks computed
from identical weights are identical everywhere. *When* a rule is applied, and at what
sparsity, is the business of ``sparse_train.methods``.

Layouts
-------
N:M groups follow NVIDIA's convention for sparse tensor cores: at most ``n`` nonzeros in
every ``m`` consecutive weights along the GEMM reduction (input) dimension. For a Linear
weight ``[out, in]`` that is along each row. For a convolution ``[K, C, *kernel]`` the
groups run along the input channels ``C`` at each kernel position, i.e. along the rows of
the channels-last matrix ``weight.permute(0, 2, ..., 1).reshape(K, -1)`` (``[K, R*S*C]``,
the KRSC layout that cuDNN / TensorRT sparse convolutions consume). This is what NVIDIA's
ASP does (apex ``apex/contrib/sparsity/sparse_masklib.py``, ``create_mask``: a ``(K, C, R,
S)`` weight is permuted so that ``C`` is innermost before the 1-D pattern is applied).
A layer qualifies when ``C % m == 0``; others are left dense by the caller, never padded.

Blocks tile the ``[out, in * prod(kernel)]`` matrix ``weight.reshape(out, -1)``, the
layout torch's BSR tensors and im2col convolutions use.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Scope = Literal["layer", "global"]


def keep_largest(scores: dict[str, Tensor], sparsity: float, scope: Scope = "layer"
                 ) -> dict[str, Tensor]:
    """Keep the largest scores, pruning ``round(sparsity * count)`` entries, but never a
    layer's last one.

    With ``scope="layer"`` each tensor loses that fraction of its own entries; with
    ``"global"`` the fraction is taken over all entries together, so layers with small
    scores lose more. Either way every tensor keeps at least its largest entry (as
    torch.ao.pruning keeps at least one block): a layer pruned away entirely would cut the
    network. Ties are broken by position (a stable sort), which makes the choice a
    function of the scores alone.
    """
    assert scope in ("layer", "global"), scope
    if scope == "layer":
        return {name: _keep_top(s.flatten(), max(1, s.numel() - round(sparsity * s.numel())))
                .view(s.shape) for name, s in scores.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = _keep_top(flat, flat.numel() - round(sparsity * flat.numel()))
    sizes = [s.numel() for s in scores.values()]
    masks = {}
    for (name, s), part in zip(scores.items(), keep.split(sizes)):
        if not part.any():
            part = _keep_top(s.flatten(), 1)
        masks[name] = part.view(s.shape)
    return masks


def _keep_top(scores: Tensor, count: int) -> Tensor:
    order = torch.argsort(scores, descending=True, stable=True)
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[order[:count]] = True
    return keep


def magnitude_masks(weights: dict[str, Tensor], sparsity: float, scope: Scope = "layer"
                    ) -> dict[str, Tensor]:
    """Unstructured magnitude pruning: keep the largest ``|w|``."""
    return keep_largest({name: w.detach().abs() for name, w in weights.items()},
                        sparsity, scope)


# --- N:M --------------------------------------------------------------------------------

def nm_matrix(weight: Tensor) -> Tensor:
    """The 2-D view whose rows are cut into N:M groups (see the module docstring)."""
    if weight.dim() == 2:
        return weight
    assert weight.dim() >= 3, "N:M needs a Linear or convolution weight"
    channels_last = weight.movedim(1, -1)
    return channels_last.reshape(weight.shape[0], -1)


def nm_unmatrix(matrix: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`nm_matrix` for a weight of ``shape``."""
    if len(shape) == 2:
        return matrix.reshape(shape)
    channels_last = (shape[0], *shape[2:], shape[1])
    return matrix.reshape(channels_last).movedim(-1, 1).contiguous()


def nm_skip_reason(shape: torch.Size | tuple[int, ...], m: int) -> str | None:
    """Why a weight of ``shape`` cannot take an N:M mask, or None if it can."""
    if len(shape) < 2:
        return "N:M needs a weight with an input dimension (ndim >= 2)"
    if shape[1] % m:
        axis = "in_features" if len(shape) == 2 else "input channels"
        return f"{axis} = {shape[1]} is not a multiple of m = {m}"
    return None


def _groups(weight: Tensor, m: int) -> Tensor:
    matrix = nm_matrix(weight)
    return matrix.reshape(matrix.shape[0], matrix.shape[1] // m, m)


def nm_mask(weight: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` largest ``|w|`` of every group of ``m`` along the input dimension."""
    assert nm_skip_reason(weight.shape, m) is None, nm_skip_reason(weight.shape, m)
    groups = _groups(weight.detach().abs(), m)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return nm_unmatrix(keep.reshape(groups.shape[0], -1), weight.shape)


def nm_compliant(weight: Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` along the input dimension has at most ``n`` nonzeros."""
    if nm_skip_reason(weight.shape, m) is not None:
        return False
    return bool(((_groups(weight, m) != 0).sum(-1) <= n).all())


# --- blocks -----------------------------------------------------------------------------

def block_skip_reason(shape: torch.Size | tuple[int, ...], block: tuple[int, int]
                      ) -> str | None:
    """Why a weight of ``shape`` cannot be tiled by ``block``, or None if it can."""
    if len(shape) < 2:
        return "block sparsity needs a weight with ndim >= 2"
    rows, cols = shape[0], math.prod(shape[1:])
    r, c = block
    if rows % r or cols % c:
        return f"matrix {rows}x{cols} is not tiled by {r}x{c} blocks"
    return None


def block_scores(weight: Tensor, block: tuple[int, int], norm: str = "l2") -> Tensor:
    """The L2 or L1 norm of every ``r x c`` block of ``weight.reshape(out, -1)``."""
    assert block_skip_reason(weight.shape, block) is None
    r, c = block
    matrix = weight.detach().reshape(weight.shape[0], -1)
    tiles = matrix.reshape(matrix.shape[0] // r, r, matrix.shape[1] // c, c)
    if norm == "l1":
        return tiles.abs().sum(dim=(1, 3))
    assert norm == "l2", norm
    return tiles.pow(2).sum(dim=(1, 3)).sqrt()


def expand_blocks(block_mask: Tensor, block: tuple[int, int], shape: torch.Size) -> Tensor:
    """Element mask of ``shape`` from a mask with one entry per block."""
    r, c = block
    matrix = block_mask.repeat_interleave(r, dim=0).repeat_interleave(c, dim=1)
    return matrix.reshape(shape)


def block_masks(weights: dict[str, Tensor], sparsity: float, block: tuple[int, int],
                norm: str = "l2", scope: Scope = "layer") -> dict[str, Tensor]:
    """Prune whole blocks with the smallest norm; ``sparsity`` is the fraction of blocks."""
    scores = {name: block_scores(w, block, norm) for name, w in weights.items()}
    kept = keep_largest(scores, sparsity, scope)
    return {name: expand_blocks(kept[name], block, w.shape) for name, w in weights.items()}

