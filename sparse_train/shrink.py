"""Turn removed channels into a physically smaller dense model.

    small = sparse_train.shrink(model, sparsifier)

Structured pruning (``channel``, ``slimming``, ``group_lasso``) masks whole output channels
and the input columns that read them; dense hardware only runs faster once those rows and
columns are gone. ``shrink`` returns a copy of the model whose Linear, Conv and BatchNorm
layers are rebuilt with the surviving channels only.

A channel is removed when every layer that reads it (``sparse_train.channels``) has all of
its input columns for that channel masked (or zero, without a sparsifier): then nothing
downstream depends on it, and dropping it, its producer row and bias, and its BatchNorm
entries leaves every output unchanged up to float rounding (outputs agree within 1e-5).
A channel whose filter is zero but whose readers still read it is kept: it carries its
bias, which later layers use.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .channels import NORMS, ChannelGroup, NotTraceable, channel_groups


def shrink(model: nn.Module, sparsifier=None) -> nn.Module:
    """A smaller copy of ``model`` (plain or DDP-wrapped) without its removed channels.

    ``sparsifier`` (a ``sparse_train.Sparsifier`` of this model) says which columns are
    masked; without one, zero columns count as masked. Raises ValueError when torch.fx
    cannot trace the model.
    """
    from .sparsifier import Sparsifier, unwrap
    source = unwrap(model)
    if not isinstance(source, nn.Module):
        raise TypeError(f"sparse_train.shrink: expected a torch.nn.Module, "
                        f"got {type(model).__name__}")
    if sparsifier is not None and not isinstance(sparsifier, Sparsifier):
        raise TypeError(f"sparse_train.shrink: expected a Sparsifier or None, "
                        f"got {type(sparsifier).__name__}")
    params = dict(source.named_parameters())
    if sparsifier is not None and any(name not in params or params[name].shape != mask.shape
                                      for name, mask in sparsifier.masks.items()):
        raise ValueError("sparse_train.shrink: the sparsifier's masks are not this model's "
                         "(it was attached to another model)")
    try:
        groups, _ = channel_groups(source)
    except NotTraceable as err:
        raise ValueError(f"shrink traces the model with torch.fx, which failed: {err}") from None
    masks = dict(sparsifier.masks) if sparsifier is not None else {}
    out_keep, in_keep = {}, {}  # module name -> kept output channels / input columns
    norm_keep = {}
    for group in groups.values():
        alive = _read_channels(group, source, masks)
        if bool(alive.all()):
            continue
        index = alive.nonzero().squeeze(1)
        out_keep[group.producer] = index
        for name in group.norms:
            norm_keep[name] = index
        for consumer in group.consumers:
            in_keep[consumer.module] = (index[:, None] * consumer.span
                                        + torch.arange(consumer.span, device=index.device)
                                        ).flatten()
    small = copy.deepcopy(source)
    with torch.no_grad():
        for name in set(out_keep) | set(in_keep):
            _replace(small, name, _sliced(small.get_submodule(name), out_keep.get(name),
                                          in_keep.get(name)))
        for name, index in norm_keep.items():
            _replace(small, name, _sliced_norm(small.get_submodule(name), index))
    return small


def _read_channels(group: ChannelGroup, model: nn.Module, masks: dict[str, Tensor]) -> Tensor:
    """Channels some consumer still reads; at least one (a layer is never removed)."""
    alive = None
    for consumer in group.consumers:
        name = f"{consumer.module}.weight"
        weight = model.get_submodule(consumer.module).weight
        live = masks[name] if name in masks else weight.detach() != 0
        cols = live.transpose(0, 1).flatten(1).any(1).view(group.channels, consumer.span).any(1)
        alive = cols if alive is None else alive | cols
    if not alive.any():
        alive[0] = True
    return alive.cpu()


def _sliced(module: nn.Module, out_index: Tensor | None, in_index: Tensor | None) -> nn.Module:
    weight = module.weight.detach()
    if out_index is not None:
        weight = weight.index_select(0, out_index.to(weight.device))
    if in_index is not None:
        weight = weight.index_select(1, in_index.to(weight.device))
    bias = module.bias
    if bias is not None and out_index is not None:
        bias = bias.detach().index_select(0, out_index.to(bias.device))
    if isinstance(module, nn.Linear):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        new = type(module)(weight.shape[1], weight.shape[0], module.kernel_size,
                           stride=module.stride, padding=module.padding,
                           dilation=module.dilation, bias=bias is not None,
                           padding_mode=module.padding_mode)
    new = new.to(device=weight.device, dtype=weight.dtype)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    new.train(module.training)
    return new


def _sliced_norm(norm: nn.Module, index: Tensor) -> nn.Module:
    assert isinstance(norm, NORMS), type(norm)
    new = type(norm)(len(index), eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                     track_running_stats=norm.track_running_stats)
    ref = norm.weight if norm.affine else norm.running_mean
    if ref is not None:  # else the norm holds no tensor of its own to slice
        new = new.to(device=ref.device, dtype=ref.dtype)
        index = index.to(ref.device)
    for attr in ("weight", "bias", "running_mean", "running_var"):
        value = getattr(norm, attr)
        if value is not None:
            getattr(new, attr).copy_(value.detach().index_select(0, index))
    if norm.num_batches_tracked is not None:
        new.num_batches_tracked.copy_(norm.num_batches_tracked)
    new.train(norm.training)
    return new


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
