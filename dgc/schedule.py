"""How much to send when: the warm-up density schedule, and k per tensor.

Lin et al. (ICLR 2018, Sec. 3.3, "warm-up training") start with a high density and lower it
exponentially over the first epochs, 25% -> 6.25% -> 1.5625% -> 0.4% -> 0.1%, because early
gradients change fast and a very sparse update lags too far behind them. Their schedule was
made for runs of 90 to 160 epochs. A warm-up here is a length and its stages:

* the length in epochs (``warmup_epochs``), optimizer steps (``warmup_steps``) or as a
  fraction of the run (``warmup_fraction``), so that it can scale with the run;
* stage densities spread evenly over it: the paper's four by name (``"paper"``), an
  explicit list, or ``warmup_stages`` geometric stages ending at the target,
  ``density_i = target ** ((i + 1) / (S + 1))``. With one stage per epoch this is the
  reference implementation's rule (0.251, 0.063, 0.0158, 0.0040 for 0.1% over 4 epochs).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

# Lin et al., Sec. 3.3: the densities of the four warm-up epochs.
PAPER_DENSITIES = (0.25, 0.0625, 0.015625, 0.004)
# Stages of a geometric warm-up whose length is not given in whole epochs: the paper's four.
DEFAULT_STAGES = 4


def stage_densities(target: float, stages: int, explicit: Sequence[float] | str | None = None
                    ) -> tuple[float, ...]:
    """The warm-up's stage densities: ``"paper"``, an explicit list, or ``stages`` geometric
    steps from ``target ** (1 / (stages + 1))`` down towards ``target``."""
    if explicit == "paper":
        return PAPER_DENSITIES
    if explicit is not None:
        return tuple(float(d) for d in explicit)
    return tuple(target ** ((i + 1) / (stages + 1)) for i in range(stages))


def warmup_density(progress: float, target: float, stages: Sequence[float]) -> float:
    """Density at ``progress``, the fraction of the warm-up done (>= 1 once it is over):
    the stage it falls in, each stage an equal share of the warm-up."""
    if progress >= 1 or not stages:
        return target
    return stages[int(max(progress, 0.0) * len(stages))]


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
