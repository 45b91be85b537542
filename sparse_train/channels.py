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
every path ends in a consumer, the channels are removable. Any other use leaves the
layer's channels alone: a residual ``add`` (the channels must match the other branch's),
a ``cat``, padding, indexing, the model's output itself. For ResNet-20 that leaves the
channels inside each basic block (conv1 -> bn1 -> conv2), which is what Li et al. (ICLR
2017, "Pruning filters for efficient ConvNets") prune in ResNets too.

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
PER_CHANNEL_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardtanh, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Identity)
PER_CHANNEL_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, torch.sigmoid,
    torch.tanh, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
    F.avg_pool3d, F.adaptive_avg_pool2d, F.dropout, F.dropout2d}
PER_CHANNEL_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}


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
            _follow(node, channels, False, modules, calls, norms, consumers)
            groups[name] = ChannelGroup(node.target, channels, tuple(norms), tuple(consumers))
        except _Stop as why:
            reasons[name] = f"its output channels stay: {why}"
    return groups, reasons


class _Stop(Exception):
    pass


def _follow(node: fx.Node, channels: int, flattened: bool, modules, calls,
            norms: list[str], consumers: list[Consumer]) -> None:
    """Walk every use of ``node`` (which carries the channels in dimension 1) down to the
    layers that consume them; raise _Stop at any use that is not per-channel."""
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
            consumers.append(_consumer(user.target, module, channels, flattened))
        elif isinstance(module, NORMS) and not flattened:
            norms.append(user.target)
            _follow(user, channels, flattened, modules, calls, norms, consumers)
        elif _keeps_channels(user, module):
            _follow(user, channels, flattened, modules, calls, norms, consumers)
        elif _flattens(user, module):
            _follow(user, channels, True, modules, calls, norms, consumers)
        else:
            raise _Stop(f"they reach {_describe(user)}")


def _consumer(name: str, module: nn.Module, channels: int, flattened: bool) -> Consumer:
    if getattr(module, "groups", 1) != 1:
        raise _Stop(f"they feed the grouped convolution {name}")
    if isinstance(module, nn.Linear):
        if module.in_features % channels or (not flattened and module.in_features != channels):
            raise _Stop(f"{name} does not read them as whole input features")
        return Consumer(name, module.in_features // channels)
    if flattened:
        raise _Stop(f"the convolution {name} reads them flattened")
    return Consumer(name, 1)


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    found = []
    for arg in list(node.args) + list(node.kwargs.values()):
        items = arg if isinstance(arg, (list, tuple)) else [arg]
        found += [a for a in items if isinstance(a, fx.Node)]
    return found


def _keeps_channels(node: fx.Node, module: nn.Module | None) -> bool:
    if module is not None:
        return isinstance(module, PER_CHANNEL_MODULES)
    if node.op == "call_function":
        return node.target in PER_CHANNEL_FUNCTIONS
    if node.op == "call_method":
        if node.target in PER_CHANNEL_METHODS:
            return True
        if node.target == "mean":  # global average pooling: x.mean(dim=(2, 3))
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            dims = dims if isinstance(dims, (list, tuple)) else [dims]
            return all(isinstance(d, int) and (d >= 2 or d < -1) for d in dims) \
                and not node.kwargs.get("keepdim", False)
    return False


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
