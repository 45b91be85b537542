"""Which output channels of a model can be removed, and what else each removal touches.

A *channel group* is one layer's output channels (the *producer*: a Linear, or a Conv with
``groups=1``) together with everything indexed by them: the BatchNorm layers that normalise
them and the layers that read them as inputs (the *consumers*). Removing channel ``c``
removes row ``c`` of the producer's weight (and bias), entry ``c`` of each BatchNorm, and
the input columns that carry ``c`` in each consumer: one column of a convolution, or the
``span = H * W`` consecutive columns of a Linear fed by a flattened ``C x H x W`` map
(``flatten`` is channel-major).

The groups are found by tracing the model with ``torch.fx`` and following each producer's
output forward through operations that act on each channel alone (activations, pooling,
dropout, BatchNorm, flattening from dimension 1, a mean over the spatial dimensions). If
every path ends in a consumer, the channels are removable. The trace has no shapes, so the
walk keeps to what it can tell from the layers: a convolution's channels are in dimension
1 of a tensor with as many spatial dimensions as its kernel; a Linear's are in the last
dimension of a tensor of unknown rank (a sequence of tokens, say), which only a Linear reads
as channels, and which nothing may flatten or pool until a BatchNorm1d shows it is 2-D.
Any other use leaves the layer's channels alone: a residual ``add`` (the channels must
match the other branch's), a ``cat``, padding, indexing, the model's output itself. For
ResNet-20 that leaves the channels inside each basic block (conv1 -> bn1 -> conv2), which
is what Li et al. (ICLR 2017, "Pruning filters for efficient ConvNets") prune in ResNets
too.

Everything here is a pure function of the model's structure and of tensors.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardtanh, nn.Dropout, nn.Identity)
MAP_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d,
    nn.Dropout2d)  # per map: over its spatial dimensions, or (Dropout2d) all of it
ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu,
                         torch.sigmoid, torch.tanh, F.dropout}
MAP_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
                 F.avg_pool3d, F.adaptive_avg_pool2d, F.dropout2d}
ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}


@dataclass(frozen=True)
class Consumer:
    module: str  # qualified module name
    span: int  # consecutive input columns per channel


@dataclass(frozen=True)
class ChannelGroup:
    producer: str  # qualified module name
    channels: int
    norms: tuple[str, ...]
    consumers: tuple[Consumer, ...]

    @property
    def weight(self) -> str:
        """The producer's weight, by parameter name (what scores and masks are keyed by)."""
        return f"{self.producer}.weight"

    def weights(self) -> list[str]:
        """Every weight whose mask this group's channels shape."""
        return [self.weight] + [f"{c.module}.weight" for c in self.consumers]


class NotTraceable(Exception):
    """torch.fx could not trace the model; the message says why, in one line."""


def channel_groups(model: nn.Module) -> tuple[dict[str, ChannelGroup], dict[str, str]]:
    """The removable channel groups of ``model``, by producer weight name, and for every
    other Linear / Conv weight the reason its output channels stay (e.g. "they reach an
    add"). Raises NotTraceable when torch.fx cannot trace the model."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as err:  # fx raises many kinds (TraceError, TypeError, ...)
        text = str(err).strip().splitlines()
        raise NotTraceable(f"{type(err).__name__}: {text[0] if text else ''}") from None
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    groups, reasons = {}, {}
    for node in graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(module, PRODUCERS):
            continue
        name = f"{node.target}.weight"
        try:
            if calls[node.target] > 1:
                raise _Stop("the layer is called more than once")
            if getattr(module, "groups", 1) != 1:
                raise _Stop("grouped convolution")
            channels = module.weight.shape[0]
            norms, consumers = [], []
            _follow(node, channels, _produced(module), modules, calls, norms, consumers)
            groups[name] = ChannelGroup(node.target, channels, tuple(norms), tuple(consumers))
        except _Stop as why:
            reasons[name] = f"its output channels stay: {why}"
    return groups, reasons


class _Stop(Exception):
    pass


@dataclass(frozen=True)
class _Where:
    """Where the channels are in a value the walk reached: ``last`` (a Linear's output:
    the last dimension) or dimension 1; ``ndim``, the value's rank where the layers tell
    it; ``flattened``: runs of consecutive features after a flatten from dimension 1."""
    last: bool
    ndim: int | None
    flattened: bool = False


def _produced(module: nn.Module) -> _Where:
    if isinstance(module, nn.Linear):
        return _Where(last=True, ndim=None)
    return _Where(last=False, ndim=len(module.kernel_size) + 2)  # batch, channels, space


def _follow(node: fx.Node, channels: int, where: _Where, modules, calls,
            norms: list[str], consumers: list[Consumer]) -> None:
    """Walk every use of ``node`` (which carries the channels as ``where`` says) down to
    the layers that consume them; raise _Stop at any use that is not per-channel."""
    if not node.users:
        raise _Stop("a value that nothing reads")
    for user in node.users:
        if user.op == "output":
            raise _Stop("they are the model's output")
        if _tensor_inputs(user) != [node]:
            raise _Stop(f"they reach {_describe(user)}, which mixes them with other values")
        module = modules.get(user.target) if user.op == "call_module" else None
        if module is not None and calls[user.target] > 1:
            raise _Stop(f"{user.target} is called more than once")
        if isinstance(module, PRODUCERS):
            consumers.append(_consumer(user.target, module, channels, where))
            continue
        after = _after(user, module, where)
        if after is None:
            raise _Stop(f"they reach {_describe(user)}")
        if isinstance(module, NORMS):
            norms.append(user.target)
        _follow(user, channels, after, modules, calls, norms, consumers)


def _consumer(name: str, module: nn.Module, channels: int, where: _Where) -> Consumer:
    if getattr(module, "groups", 1) != 1:
        raise _Stop(f"they feed the grouped convolution {name}")
    if isinstance(module, nn.Linear):  # it reads the last dimension
        if not (where.last or where.ndim == 2):
            raise _Stop(f"{name} reads the last dimension, not the channels")
        if module.in_features % channels or (not where.flattened
                                             and module.in_features != channels):
            raise _Stop(f"{name} does not read them as whole input features")
        return Consumer(name, module.in_features // channels)
    if where.flattened:
        raise _Stop(f"the convolution {name} reads them flattened")
    if where.last:
        raise _Stop(f"the convolution {name} reads dimension 1, not a Linear's channels")
    return Consumer(name, 1)


def _after(node: fx.Node, module: nn.Module | None, where: _Where) -> _Where | None:
    """Where the channels are after ``node``, or None where it does not act on each
    channel alone."""
    if isinstance(module, NORMS):  # normalises dimension 1
        if where.flattened:
            return None
        if where.last:  # a BatchNorm1d over a Linear's output: only if it is 2-D
            return _Where(False, 2) if isinstance(module, nn.BatchNorm1d) else None
        return where
    if _elementwise(node, module):
        return where
    if _per_map(node, module):  # a map: a channel's spatial dimensions, after dimension 1
        maps = not where.last and not where.flattened and (where.ndim or 0) >= 3
        return where if maps else None
    if node.op == "call_method" and node.target == "mean":
        return _spatial_mean(node, where)
    if _flattens(node, module):
        if where.ndim is None:  # a Linear's output of unknown rank
            return None
        return where if where.ndim == 2 else _Where(False, 2, flattened=True)
    return None


def _elementwise(node: fx.Node, module: nn.Module | None) -> bool:
    if module is not None:
        return isinstance(module, ELEMENTWISE_MODULES)
    if node.op == "call_function":
        return node.target in ELEMENTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in ELEMENTWISE_METHODS


def _per_map(node: fx.Node, module: nn.Module | None) -> bool:
    if module is not None:
        return isinstance(module, MAP_MODULES)
    return node.op == "call_function" and node.target in MAP_FUNCTIONS


def _spatial_mean(node: fx.Node, where: _Where) -> _Where | None:
    """Global average pooling, ``x.mean(dim=(2, 3))``: a mean over spatial dimensions only
    (a negative one counted from the rank the producer gives), which drops them."""
    if where.last or where.flattened or where.ndim is None \
            or node.kwargs.get("keepdim", False) or len(node.args) > 2:
        return None
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    if not all(isinstance(d, int) and -where.ndim <= d < where.ndim for d in dims):
        return None
    dims = {d % where.ndim for d in dims}
    if min(dims) < 2:
        return None
    return _Where(False, where.ndim - len(dims))


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    found = []
    for arg in list(node.args) + list(node.kwargs.values()):
        items = arg if isinstance(arg, (list, tuple)) else [arg]
        found += [a for a in items if isinstance(a, fx.Node)]
    return found


def _flattens(node: fx.Node, module: nn.Module | None) -> bool:
    """Flattening from dimension 1 on: channel c becomes a run of consecutive features."""
    if isinstance(module, nn.Flatten):
        return module.start_dim == 1 and module.end_dim == -1
    if module is not None:
        return False
    if (node.op, node.target) in (("call_function", torch.flatten), ("call_method", "flatten")):
        start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
        end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
        return start == 1 and end == -1
    return False


def _describe(node: fx.Node) -> str:
    if node.op == "call_function":
        if node.target in (operator.add, torch.add, operator.iadd):
            return "an add (a residual connection)"
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


# --- masks from kept channels ------------------------------------------------------------

def kept_channels(group: ChannelGroup, masks: dict[str, Tensor]) -> Tensor:
    """Channels of ``group`` still alive under ``masks``: a producer row with any weight."""
    return masks[group.weight].reshape(group.channels, -1).any(1)


def channel_masks(groups: list[ChannelGroup], keep: dict[str, Tensor],
                  weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Masks of every weight the groups touch, from the kept channels of each group (by
    producer weight name): producer rows and consumer input columns of removed channels
    are False. A weight touched by two groups (a consumer that also produces) gets both."""
    masks = {name: torch.ones_like(weights[name], dtype=torch.bool)
             for group in groups for name in group.weights()}
    for group in groups:
        alive = keep[group.weight]
        rows = masks[group.weight]
        rows &= alive.view(-1, *[1] * (rows.dim() - 1))
        for consumer in group.consumers:
            cols = masks[f"{consumer.module}.weight"]
            cols &= alive.repeat_interleave(consumer.span).view(1, -1, *[1] * (cols.dim() - 2))
    return masks
