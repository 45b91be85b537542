"""How much to send when: the warm-up density schedule.

Lin et al. (ICLR 2018, Sec. 3.3, "warm-up training") start with a high density and lower it
exponentially over the first epochs, 25% -> 6.25% -> 1.5625% -> 0.4% -> 0.1%, because early
gradients change fast and a very sparse update lags too far behind them. The geometric
sequence that ends at the target after ``warmup_epochs`` steps of equal ratio reproduces it:
``density(e) = target ** ((e + 1) / (warmup_epochs + 1))`` (0.251, 0.063, 0.0158, 0.0040,
then 0.001 for target 0.001 and 4 warm-up epochs).
"""
from __future__ import annotations

import math
from collections.abc import Sequence


def warmup_density(epoch: float, target: float, warmup_epochs: float,
                   explicit: Sequence[float] | None = None) -> float:
    """Density to use during ``epoch`` (0-based; fractional epochs interpolate geometrically).

    ``explicit``, when given, lists the density of each warm-up epoch and replaces the
    geometric schedule; epochs past its end use ``target``.
    """
    if explicit is not None:
        e = int(epoch)
        return float(explicit[e]) if 0 <= e < len(explicit) else target
    if epoch >= warmup_epochs:
        return target
    return target ** ((max(epoch, 0.0) + 1.0) / (warmup_epochs + 1.0))


def topk_count(numel: int, density: float) -> int:
    """Entries to send from a tensor of ``numel`` elements: ``ceil(numel * density)``, as
    the reference implementation computes it (``dgc/compression.py``), at least one and at
    most all. (``round`` would differ on 12 of ResNet-20's 20 compressed tensors at 0.1%.)"""
    return max(1, min(numel, math.ceil(numel * density)))


def sparse_count(shape: Sequence[int], live: int, density: float, min_numel: int
                 ) -> int | None:
    """k for a tensor of ``shape`` with ``live`` unmasked entries, or None when it goes
    dense: 1-D tensors and those under ``min_numel`` entries (as in the paper), and any
    tensor whose k would be every live entry (density 1.0). Sending all of a tensor as
    (index, value) pairs would cost more than a dense allreduce and, with momentum
    masking, zero its momentum every step; the dense path applies the momentum after
    averaging instead, which is exactly SGD with momentum."""
    if len(shape) < 2 or math.prod(shape) < min_numel:
        return None
    k = topk_count(live, density)
    return None if k >= live else k
