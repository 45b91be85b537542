"""Pruning to a sparsity that a one-shot or cubic (Zhu & Gupta 2017) schedule sets.

Covers ``magnitude`` and ``gmp`` (unstructured), ``block`` and ``bank``: the same schedule
drives each rule, and the structured methods (``sparse_train.methods.structured``) reuse
it. Masks only ever grow sparser: a pruned weight is zero, so it ranks last at the next
update and stays pruned.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from .. import masks as rules
from ..masks import Sparsity
from ..options import SparsityOptions
from .base import Method


def cubic_sparsity(step: int, start: int, end: int, initial: float, final: float) -> float:
    """Zhu & Gupta's schedule s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3.

    ``start`` is t0 and ``end`` is t0 + n * dt; outside [start, end] the value is held at
    the nearer end. The cubic prunes fast while the network is highly redundant and slows
    down as fewer weights remain.
    """
    if end <= start:
        return final if step >= start else initial
    progress = min(max((step - start) / (end - start), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


class Pruning(Method):
    """Keep the largest weights (blocks, bank entries; subclasses: channels, groups) at a
    sparsity given by a one-shot or cubic schedule."""

    def __init__(self, options: SparsityOptions):
        self.options = options
        self.gradual = options.method == "gmp" or (
            options.method != "magnitude" and options.schedule == "gmp")
        self.start = options.start_step
        self.end = options.end_step if self.gradual else options.start_step

    def skip_reason(self, shape):
        if self.options.method == "block":
            return rules.block_skip_reason(shape, tuple(self.options.block))
        if self.options.method == "bank":
            reason = rules.nm_skip_reason(shape, self.options.bank_size)
            return reason and reason.replace("m =", "bank_size =")
        return None

    def is_update_step(self, step: int) -> bool:
        if not self.start <= step <= self.end:
            return False
        return step == self.end or (step - self.start) % self.options.frequency == 0

    def sparsity(self, step: int, target: float) -> float:
        initial = self.options.initial_sparsity if self.gradual else target
        return cubic_sparsity(step, self.start, self.end, initial, target)

    def levels(self, step: int, names) -> Sparsity:
        """The sparsity at ``step``: one value, or one per name when ``target`` is a list."""
        o = self.options
        if not isinstance(o.target, list):
            return self.sparsity(step, o.target)
        return {name: self.sparsity(step, o.layer_target(name)) for name in names}

    def update(self, step: int, weights: dict[str, Tensor], masks: dict[str, Tensor]):
        if not self.is_update_step(step):
            return None
        return self.prune(self.levels(step, self.ranked(weights)), weights, masks)

    def ranked(self, weights: dict[str, Tensor]) -> list[str]:
        """The weights whose sparsity ``target`` sets: all of them here; the structured
        methods also mask the layers that read a pruned channel, which ``target`` does not
        name."""
        return list(weights)

    def prune(self, sparsity: Sparsity, weights: dict[str, Tensor],
              masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """The masks of this method's rule at ``sparsity``."""
        o = self.options
        if o.method == "block":
            return rules.block_masks(weights, sparsity, tuple(o.block), o.block_norm, o.scope)
        if o.method == "bank":
            return {name: rules.bank_mask(w, _of(sparsity, name), o.bank_size)
                    for name, w in weights.items()}
        return rules.magnitude_masks(weights, sparsity, o.scope)

    def fixed(self, step: int) -> bool:
        return step >= self.end

    def describe(self, masks: dict[str, Tensor]) -> dict:
        if self.options.method != "bank":
            return {}
        size = self.options.bank_size
        kept = {name: rules.bank_counts(mask, size) for name, mask in masks.items()}
        return {"banks": {name: {"bank_size": size, "kept_per_bank": sorted(set(k.flatten()
                                                                                .tolist())),
                                 "balanced": bool((k == k.flatten()[0]).all())}
                          for name, k in kept.items()}}


def _of(sparsity: Sparsity, name: str) -> float:
    return sparsity[name] if isinstance(sparsity, Mapping) else sparsity
