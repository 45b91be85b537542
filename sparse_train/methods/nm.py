"""N:M structured sparsity: dense until ``nm_start_step``, then one fixed N:M mask.

The mask is chosen once, by magnitude within each group, and kept, as NVIDIA's ASP
recipe does (prune a trained or warmed-up network once, then fine-tune with the mask
fixed). Layers whose input dimension is not a multiple of ``m`` stay dense and are
listed by ``Sparsifier.report()``.
"""
from __future__ import annotations

from torch import Tensor

from .. import masks as rules
from ..options import SparsityOptions
from .base import Method


class NM(Method):
    def __init__(self, options: SparsityOptions):
        self.n, self.m, self.start = options.n, options.m, options.nm_start_step

    def skip_reason(self, shape):
        return rules.nm_skip_reason(shape, self.m)

    def update(self, step: int, weights: dict[str, Tensor], masks: dict[str, Tensor]):
        if step != self.start:
            return None
        return {name: rules.nm_mask(w, self.n, self.m) for name, w in weights.items()}

    def fixed(self, step: int) -> bool:
        return step >= self.start
