"""Magnitude pruning, one-shot or gradual (Zhu & Gupta 2017), unstructured or by blocks.

Covers the ``magnitude``, ``gmp`` and ``block`` methods: the same schedule drives either
rule. Masks only ever grow sparser: a pruned weight is zero, so it ranks last at the next
update and stays pruned.
"""
from __future__ import annotations

from torch import Tensor

from .. import masks as rules
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
    """Keep the largest weights (or blocks) at a sparsity given by a one-shot or cubic schedule."""

    def __init__(self, options: SparsityOptions):
        self.options = options
        self.by_block = options.method == "block"
        self.gradual = options.method == "gmp" or (
            self.by_block and options.block_schedule == "gmp")
        self.start = options.start_step
        self.end = options.end_step if self.gradual else options.start_step

    def skip_reason(self, shape):
        if self.by_block:
            return rules.block_skip_reason(shape, tuple(self.options.block))
        return None

    def is_update_step(self, step: int) -> bool:
        if not self.start <= step <= self.end:
            return False
        return step == self.end or (step - self.start) % self.options.frequency == 0

    def sparsity(self, step: int) -> float:
        o = self.options
        return cubic_sparsity(step, self.start, self.end,
                              o.initial_sparsity if self.gradual else o.target, o.target)

    def update(self, step: int, weights: dict[str, Tensor], masks: dict[str, Tensor]):
        if not self.is_update_step(step):
            return None
        o = self.options
        if self.by_block:
            return rules.block_masks(weights, self.sparsity(step), tuple(o.block),
                                     o.block_norm, o.scope)
        return rules.magnitude_masks(weights, self.sparsity(step), o.scope)

    def fixed(self, step: int) -> bool:
        return step >= self.end
