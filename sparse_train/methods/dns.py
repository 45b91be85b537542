"""Dynamic network surgery (Guo, Yao & Chen, NIPS 2016).

Each layer has a threshold t = max(mu + c * sigma, 0), where mu and sigma are the mean and
(population) standard deviation of |W| over the layer's nonzero weights (the authors'
Caffe layers skip exact zeros; ``dns_stats: all`` takes every weight instead: on a layer
half of whose 400k Gaussian weights are zero, c = 1 gives 0.0700 against 0.0491), and c
may differ from layer to layer. Like the authors' Caffe layers, we compute mu and sigma
once, at the first update, and keep them for the whole run; unlike those layers we leave
biases out of both the statistics and the masks. The paper starts from a trained
reference network, so the first update can wait for ``dns_start_step`` steps of dense
training; from ``dns_start_step = 0`` the statistics are those of the initialisation. An
update prunes where |w| < 0.9 t (the Caffe code uses <=, which differs only on exact ties)
and splices back where |w| > 1.1 t; in between the mask is unchanged, a hysteresis band
that stops weights near the threshold flickering.

Updates happen with probability (1 + gamma * (step - start)) ** -power, drawn once per
layer per step, until ``iter_stop``. Each draw is a hash of (``dns_seed``, layer name,
step) (``sparse_comm.draws``), the same on every rank and after any restart, so masks
agree across a DDP job without touching the global RNG or sharing a stream across layers.

The method is *soft*: the forward uses W * T but the optimizer updates the dense W with
the gradient taken at W * T (straight-through), so pruned weights keep training and can be
spliced back. After ``iter_stop`` the masks no longer change, and the sparsifier treats
them as hard masks.
"""
from __future__ import annotations

import fnmatch

from torch import Tensor

from sparse_comm import draws

from ..options import SparsityOptions
from .base import Method


def dns_threshold(weight: Tensor, c: float, nonzero_only: bool = True) -> float:
    """t = max(mu + c * sigma, 0) for mu, sigma the mean and std of |weight| (over its
    nonzero entries, as the authors' code, unless ``nonzero_only`` is False)."""
    magnitude = weight.detach().abs().double().flatten()
    if nonzero_only and bool((magnitude != 0).any()):
        magnitude = magnitude[magnitude != 0]
    mu, sigma = magnitude.mean(), magnitude.std(unbiased=False)
    return max(float(mu + c * sigma), 0.0)


def surgery(weight: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """Prune below 0.9 * threshold, splice back above 1.1 * threshold, keep the rest."""
    magnitude = weight.detach().abs()
    new = mask.clone()
    new[magnitude < 0.9 * threshold] = False
    new[magnitude > 1.1 * threshold] = True
    return new


def update_probability(step: int, gamma: float, power: float) -> float:
    return (1.0 + gamma * step) ** -power


def layer_c(name: str, c: float | list[float], patterns: list[str]) -> float:
    """The c of parameter ``name``: ``c`` itself, or the entry of its first matching pattern."""
    if not isinstance(c, list):
        return c
    return next(value for pattern, value in zip(patterns, c)
                if fnmatch.fnmatchcase(name, pattern))


class DNS(Method):
    def __init__(self, options: SparsityOptions):
        self.c, self.patterns = options.dns_c, options.layers
        self.gamma, self.power = options.dns_gamma, options.dns_power
        self.start, self.iter_stop = options.dns_start_step, options.dns_iter_stop
        self.seed, self.nonzero_only = options.dns_seed, options.dns_stats == "nonzero"
        self.thresholds: dict[str, float] = {}

    def update(self, step: int, weights: dict[str, Tensor], masks: dict[str, Tensor]):
        if not self.start <= step < self.iter_stop:
            return None
        if not self.thresholds:
            self.thresholds = {name: dns_threshold(w, layer_c(name, self.c, self.patterns),
                                                   self.nonzero_only)
                               for name, w in weights.items()}
        chance = update_probability(step - self.start, self.gamma, self.power)
        new = {}
        for name, w in weights.items():
            if draws.uniform(self.seed, name, step) < chance:
                new[name] = surgery(w, masks[name], self.thresholds[name])
        return new or None

    def soft(self, step: int) -> bool:
        return self.start <= step < self.iter_stop

    def fixed(self, step: int) -> bool:
        return step >= self.iter_stop

    def state_dict(self) -> dict:
        return {"thresholds": dict(self.thresholds)}

    def load_state_dict(self, state: dict) -> None:
        self.thresholds = dict(state["thresholds"])
