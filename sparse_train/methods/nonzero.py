"""Keep an already-sparse network's zeros: the mask is where the weights are nonzero at
``start_step``, fixed from then on.

For training a network whose sparsity was decided elsewhere: a lottery ticket (its
surviving weights rewound, the rest zero), a pruned checkpoint loaded for fine-tuning.
"""
from __future__ import annotations

from torch import Tensor

from ..options import SparsityOptions
from .base import Method


class NonZero(Method):
    def __init__(self, options: SparsityOptions):
        self.start = options.start_step

    def update(self, step: int, weights: dict[str, Tensor], masks: dict[str, Tensor]):
        if step != self.start:
            return None
        return {name: w != 0 for name, w in weights.items()}

    def fixed(self, step: int) -> bool:
        return step >= self.start
