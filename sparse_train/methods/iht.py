"""Iterative hard thresholding (Jin et al. 2016, "Training skinny deep neural networks with
iterative hard thresholding methods"): alternate dense training with sparse training on
the top-k magnitudes.

A cycle is ``dense_steps`` dense steps, then ``sparse_steps`` steps with the largest
``1 - target`` of the weights (per layer or global) kept under a fixed mask. After
``cycles`` cycles the run ends dense (the paper's choice) or stays on the last sparse mask.
Weights pruned in a sparse phase are zero when the next dense phase lifts the mask, and
the sparsifier zeroes their optimizer state on pruning, so they restart from zero.
"""
from __future__ import annotations

from typing import Literal

from torch import Tensor

from .. import masks as rules
from ..options import SparsityOptions, per_layer
from .base import Method, all_kept

Phase = Literal["dense", "sparse"]


def iht_phase(step: int, dense_steps: int, sparse_steps: int, cycles: int, end: Phase
              ) -> tuple[Phase, int]:
    """The phase that ``step`` falls in and the step at which that phase began."""
    period = dense_steps + sparse_steps
    if step < cycles * period:
        cycle_start = step - step % period
        if step - cycle_start < dense_steps:
            return "dense", cycle_start
        return "sparse", cycle_start + dense_steps
    if end == "dense":
        return "dense", cycles * period
    return "sparse", cycles * period - sparse_steps


class IHT(Method):
    def __init__(self, target: float | list[float], scope: str, dense_steps: int,
                 sparse_steps: int, cycles: int, end: Phase, patterns: list[str] = ()):
        self.target, self.scope, self.patterns = target, scope, list(patterns)
        self.phases = (dense_steps, sparse_steps, cycles, end)

    @classmethod
    def from_options(cls, o: SparsityOptions) -> "IHT":
        return cls(o.target, o.scope, o.iht_s1, o.iht_s2, o.iht_cycles, o.iht_end, o.layers)

    def phase(self, step: int) -> tuple[Phase, int]:
        return iht_phase(step, *self.phases)

    def update(self, step: int, weights: dict[str, Tensor], masks: dict[str, Tensor]):
        phase, began = self.phase(step)
        if step != began:
            return None
        if phase == "dense":
            return all_kept(weights)
        sparsity = self.target if not isinstance(self.target, list) else {
            name: per_layer(name, self.target, self.patterns) for name in weights}
        return rules.magnitude_masks(weights, sparsity, self.scope)

    def fixed(self, step: int) -> bool:
        return self.phase(step)[0] == "sparse"
