"""Structured pruning: remove whole output channels, or whole groups of weights.

* ``channel`` (Li et al., ICLR 2017, "Pruning filters for efficient ConvNets"): a channel's
  score is the L1 (or L2) norm of its filter; the lowest-scoring channels go.
* ``slimming`` (Liu et al., ICCV 2017, "Learning efficient convolutional networks through
  network slimming"): train with an L1 penalty on the BatchNorm scales gamma, then remove
  the channels with the smallest |gamma| (the paper takes one threshold over all layers:
  ``scope: global``). The authors' PyTorch code applies the penalty the way this module
  does, as ``s * sign(gamma)`` added to gamma's gradient between backward and the step
  (``updateBN`` in Eric-mingjie/network-slimming, ``main.py``).
* ``group_lasso`` (Wen et al., NIPS 2016, structured sparsity learning): train with a
  group-lasso penalty over filters, channels and filter shapes, then remove the groups
  it has driven to (near) zero.

Removing channel ``c`` masks row ``c`` of its layer and the input columns of ``c`` in the
layers that read it (``sparse_train.channels``), so that ``sparse_train.shrink`` can build
the smaller dense model with the same outputs. Masks are functions of the weights and
BatchNorm scales, which DDP keeps identical on every rank; the penalties' gradients are
functions of them too, added after DDP's averaging, so every rank adds the same.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .. import masks as rules
from .. import regularizers
from ..channels import ChannelGroup, NotTraceable, channel_groups, channel_masks, kept_channels
from ..masks import Sparsity
from ..options import SparsityOptions
from .gmp import Pruning

log = logging.getLogger(__name__)


class _Coupled(Pruning):
    """Pruning whose masks follow the channel groups of the selected layers."""

    # whether the model must trace: only channel groups can be scored by channel / slimming
    needs_groups = True

    def __init__(self, options: SparsityOptions):
        super().__init__(options)
        self.model: nn.Module | None = None
        self.groups: list[ChannelGroup] = []

    def bind(self, model, selected):
        self.model = model
        try:
            groups, reasons = channel_groups(model)
        except NotTraceable as err:
            if self.needs_groups:
                from sparse_comm.schema import ConfigError
                raise ConfigError("method", f"{self.options.method!r} finds coupled channels "
                                            f"by tracing the model with torch.fx, which "
                                            f"failed: {err}") from None
            log.info("sparse_train: no channel coupling (torch.fx: %s)", err)
            groups, reasons = {}, {}
        self.groups = [g for name, g in groups.items() if name in selected
                       and self.group_reason(g) is None]
        params = dict(model.named_parameters())
        bound = self.own_weights(selected)
        self.own_weights_ = set(bound)
        for group in self.groups:
            bound.update({name: params[name] for name in group.weights()})
        heads = {group.weight for group in self.groups}
        self.kept_whole = {
            name: reasons.get(name) or self.group_reason(groups.get(name))
            or "not the weight of a Linear or Conv layer"
            for name in selected if name not in heads and name not in self.own_weights_}
        return bound, {name: why for name, why in self.kept_whole.items() if name not in bound}

    def own_weights(self, selected: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
        """Selected weights masked whether or not they head a channel group."""
        return {}

    def group_reason(self, group: ChannelGroup | None) -> str | None:
        return None

    def ranked(self, weights):
        heads = {group.weight for group in self.groups} | self.own_weights_
        return [name for name in weights if name in heads]

    def describe(self, masks):
        channels = {}
        for group in self.groups:
            kept = int(kept_channels(group, masks).sum())
            channels[group.producer] = {"channels": group.channels, "kept": kept}
        # selected layers whose output channels no rule removes, and why
        return {"channels": channels, "layers_kept_whole": dict(self.kept_whole)}


class ChannelPruning(_Coupled):
    """``channel`` and ``slimming``: keep the highest-scoring channels of each group."""

    def group_reason(self, group):
        if self.options.method != "slimming" or group is None:
            return None
        if not group.norms:
            return "no BatchNorm normalises its output channels (slimming ranks channels " \
                   "by BatchNorm scale)"
        if any(self.model.get_submodule(name).weight is None for name in group.norms):
            return "its BatchNorm has no scale (affine=False), and slimming ranks channels " \
                   "by BatchNorm scale"
        return None

    def scores(self, group: ChannelGroup, weights: dict[str, Tensor]) -> Tensor:
        if self.options.method == "slimming":
            return self._norm(group).weight.detach().abs()
        rows = weights[group.weight].detach().reshape(group.channels, -1)
        if self.options.channel_norm == "l1":
            return rows.abs().mean(1)
        return rows.pow(2).mean(1).sqrt()

    def _norm(self, group: ChannelGroup) -> nn.Module:
        return self.model.get_submodule(group.norms[0])

    def prune(self, sparsity: Sparsity, weights, masks):
        scores = {}
        for group in self.groups:
            score = self.scores(group, weights).clone()
            score[~kept_channels(group, masks)] = -1.0  # removed channels stay removed
            scores[group.weight] = score
        keep = rules.keep_largest(scores, sparsity, self.options.scope)
        return channel_masks(self.groups, keep, weights)

    def regularize(self, step: int) -> None:
        if self.options.method != "slimming" or step >= self.end or not self.options.penalty:
            return
        norms = [name for group in self.groups for name in group.norms]
        gammas = [self.model.get_submodule(name).weight for name in norms]
        with torch.enable_grad():
            term = self.options.penalty * regularizers.batchnorm_l1(self.model, norms)
            _add_grads(gammas, torch.autograd.grad(term, gammas))


class GroupLasso(_Coupled):
    """``group_lasso``: the penalty until the last pruning step, and at each pruning step
    the groups whose RMS value is below ``group_threshold`` times the weight's own RMS
    removed (each weight keeps its largest group of each kind). Relative, because a group
    the penalty has driven to zero sits orders of magnitude below the live ones whatever
    the layer's scale, while absolute weight scales differ from layer to layer. A removed filter takes its channel out of the layers
    it feeds, and a channel no layer reads any more takes its filter out."""

    needs_groups = False

    def own_weights(self, selected):
        self.selected = dict(selected)
        return dict(selected)

    def regularize(self, step: int) -> None:
        if step >= self.end or not self.options.penalty:
            return
        weights = list(self.selected.values())
        with torch.enable_grad():
            term = self.options.penalty * regularizers.group_lasso(
                self.selected, self.options.groups)
            _add_grads(weights, torch.autograd.grad(term, weights))

    def prune(self, sparsity, weights, masks):
        new = {name: mask.clone() for name, mask in masks.items()}
        for name in self.selected:
            w = weights[name].detach()
            for kind in self.options.groups:
                norms = regularizers.group_norms(w, kind)
                if norms is None:
                    continue
                rms = norms / regularizers.group_size(w.shape, kind) ** 0.5
                alive = rms >= self.options.group_threshold * w.pow(2).mean().sqrt()
                alive.view(-1)[rms.flatten().argmax()] = True  # never a layer away
                new[name] &= regularizers.expand_groups(alive, kind, w.shape)
        return self.couple(new)

    def couple(self, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        keep = {}
        for group in self.groups:
            produced = kept_channels(group, masks)
            read = torch.zeros_like(produced)
            for consumer in group.consumers:
                cols = masks[f"{consumer.module}.weight"].transpose(0, 1).flatten(1).any(1)
                read |= cols.view(group.channels, consumer.span).any(1)
            keep[group.weight] = produced & read
            if not keep[group.weight].any():  # would cut the network: leave it as it is
                keep[group.weight] = torch.ones_like(produced)
        coupled = channel_masks(self.groups, keep, masks)
        return {name: mask & coupled[name] if name in coupled else mask
                for name, mask in masks.items()}

    def describe(self, masks):
        zeroed = {}
        for name in self.selected:
            row = {}
            for kind in regularizers.GROUP_KINDS:
                alive = regularizers.group_norms(masks[name].float(), kind)
                if alive is not None:
                    row[f"{kind}_removed"] = float((alive == 0).float().mean())
            zeroed[name] = row
        return {**super().describe(masks), "groups_removed": zeroed}


def _add_grads(params: list[nn.Parameter], grads: tuple[Tensor, ...]) -> None:
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.detach().clone()
        else:
            p.grad.add_(g)
