"""Sparsity-inducing penalty terms, to add to a loss in any training loop.

    loss = criterion(model(x), y) + 1e-4 * sparse_train.regularizers.group_lasso(model)

``group_lasso`` is the structured sparsity learning term of Wen et al. (NIPS 2016, "Learning
structured sparsity in deep neural networks", eq. 2 and 3): the sum of the L2 norms of
groups of weights, which drives whole groups to zero together, so that what remains is a
smaller dense layer rather than scattered zeros. Groups of a weight ``W`` shaped
``[out, in, *kernel]`` (or ``[out, in]``):

* ``filters``: ``W[k]``, everything one output channel (filter, neuron) reads;
* ``channels``: ``W[:, c]``, everything that reads input channel ``c``;
* ``shapes``: ``W[:, c, i, j]``, one position of the filter shape across all filters (for
  convolutions only: in a Linear a shape would be a channel).

``batchnorm_l1`` is network slimming's term (Liu et al., ICCV 2017): the L1 norm of the
BatchNorm scales, which pushes unimportant channels' scales to zero.

``sparse_train.attach(method="group_lasso" | "slimming")`` adds the gradients of these same
terms to the parameters' gradients before each optimizer step, which is what adding the
terms to the loss does for any optimizer (it only ever sees ``.grad``), without touching
the training loop, and exactly (not through a gradient compressor).
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .channels import PRODUCERS
from .options import GroupKind

GROUP_KINDS: tuple[str, ...] = GroupKind.__args__


def group_norms(weight: Tensor, kind: GroupKind) -> Tensor | None:
    """The L2 norm of every group of ``kind`` in ``weight``: ``[out]`` for filters,
    ``[in]`` for channels, ``[in, *kernel]`` for shapes; None where the kind does not apply
    (shapes of a Linear weight)."""
    if kind == "filters":
        return torch.linalg.vector_norm(weight.flatten(1), dim=1)
    if kind == "channels":
        return torch.linalg.vector_norm(weight.transpose(0, 1).flatten(1), dim=1)
    assert kind == "shapes", kind
    return torch.linalg.vector_norm(weight, dim=0) if weight.dim() > 2 else None


def group_size(shape: torch.Size, kind: GroupKind) -> int:
    """Weights in one group of ``kind`` of a weight shaped ``shape``."""
    count = shape.numel()
    return {"filters": count // shape[0], "channels": count // shape[1],
            "shapes": shape[0]}[kind]


def expand_groups(keep: Tensor, kind: GroupKind, shape: torch.Size) -> Tensor:
    """A mask of ``shape`` from one flag per group of ``kind`` (as :func:`group_norms`)."""
    if kind == "filters":
        return keep.view(-1, *[1] * (len(shape) - 1)).expand(shape)
    if kind == "channels":
        return keep.view(1, -1, *[1] * (len(shape) - 2)).expand(shape)
    return keep.unsqueeze(0).expand(shape)


def group_lasso(weights: nn.Module | Mapping[str, Tensor],
                groups: Sequence[GroupKind] = GROUP_KINDS,
                layers: Iterable[str] | None = None) -> Tensor:
    """Sum over the weights and the ``groups`` kinds of the L2 norm of every group.

    ``weights`` is a model (its Linear and Conv weights, or the weights whose names match
    the glob patterns ``layers``, as ``attach``'s option) or a mapping of weights by name. Multiply by the strength (Wen et al.'s lambda_g) when
    adding it to the loss.
    """
    chosen = _weights(weights, layers)
    total = None
    for w in chosen.values():
        for kind in groups:
            norms = group_norms(w, kind)
            if norms is not None:
                total = norms.sum() if total is None else total + norms.sum()
    assert total is not None, "group_lasso: no weight to penalise"
    return total


def batchnorm_l1(model: nn.Module, norms: Iterable[str] | None = None) -> Tensor:
    """Sum of ``|gamma|`` over the model's BatchNorm layers that have one (or those named
    in ``norms``)."""
    modules = dict(model.named_modules())
    names = list(norms) if norms is not None else [
        name for name, m in modules.items()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    assert names, "batchnorm_l1: the model has no BatchNorm layer with a scale"
    return sum(modules[name].weight.abs().sum() for name in names)


def _weights(source: nn.Module | Mapping[str, Tensor], layers: Iterable[str] | None
             ) -> dict[str, Tensor]:
    if isinstance(source, Mapping):
        return dict(source)
    if layers is not None:
        patterns = list(layers)
        return {name: p for name, p in source.named_parameters()
                if p.dim() >= 2 and any(fnmatch.fnmatchcase(name, pat) for pat in patterns)}
    return {f"{name}.weight": m.weight for name, m in source.named_modules()
            if isinstance(m, PRODUCERS)}
