"""The options of ``sparse_train.attach``, which are also the launcher's ``sparsity:`` keys.

Steps count optimizer steps taken since ``attach`` (steps skipped by an AMP grad scaler do
not count). Each knob only matters to the methods named in its comment.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Literal

from sparse_comm.schema import require

Method = Literal["magnitude", "gmp", "dns", "iht", "dsd", "nm", "block", "channel",
                 "slimming", "group_lasso", "bank", "nonzero"]
METHODS: tuple[str, ...] = Method.__args__
GroupKind = Literal["filters", "channels", "shapes"]


def per_layer(name: str, value, patterns: list[str]):
    """``value`` itself, or, for a list, the entry of ``name``'s first matching pattern
    (options such as ``target`` and ``dns_c`` take one value per ``layers`` pattern)."""
    if not isinstance(value, list):
        return value
    for pattern, v in zip(patterns, value):
        if fnmatch.fnmatchcase(name, pattern):
            return v
    raise ValueError(f"{name!r} matches none of the `layers` patterns {patterns}")


@dataclass
class SparsityOptions:
    method: Method = "magnitude"
    # Final fraction of zeros in the selected weights (magnitude, gmp, iht, dsd, bank), of
    # zero blocks (block) or of removed output channels (channel, slimming). nm's sparsity
    # is 1 - n/m, dns's follows from dns_c and group_lasso's from the penalty, so they
    # ignore it. One value, or a list with one value per `layers` pattern (scope "layer"):
    # the per-layer ratios `python -m launch.sensitivity` proposes.
    target: float | list[float] = 0.5
    # Glob patterns over parameter names (as in model.named_parameters() of the unwrapped
    # model), matched against parameters with ndim >= 2. Empty: the weight of every
    # nn.Linear and nn.Conv1d/2d/3d.
    layers: list[str] = field(default_factory=list)
    # One threshold per layer, or one across all selected layers (magnitude, gmp, iht, dsd,
    # block). Global lets over-parameterised layers absorb more of the sparsity.
    scope: Literal["layer", "global"] = "layer"

    # magnitude prunes once at start_step; gmp (and block, channel, slimming, group_lasso,
    # bank with schedule "gmp") follow Zhu & Gupta's cubic schedule from initial_sparsity
    # at start_step to target at end_step, updating the masks every `frequency` steps.
    # Zhu & Gupta prune every 100 to 1000 steps; the low end suits the short runs this is
    # tested on. With schedule "oneshot" those methods prune once, at start_step.
    start_step: int = 0
    end_step: int = 1000
    frequency: int = 100
    initial_sparsity: float = 0.0
    schedule: Literal["oneshot", "gmp"] = "oneshot"

    # N:M: at most n nonzeros in every m consecutive input weights; 2:4 is what sparse
    # tensor cores accelerate. Dense until nm_start_step, then a fixed N:M mask.
    n: int = 2
    m: int = 4
    nm_start_step: int = 0

    # Block: [rows, cols] of each block of weight.reshape(out, -1), scored by block_norm.
    block: list[int] = field(default_factory=lambda: [4, 4])
    block_norm: Literal["l2", "l1"] = "l2"

    # Structured methods remove whole output channels of a layer together with what they
    # feed: the matching input channels of the next layer(s) and the BatchNorm between
    # (found by tracing the model with torch.fx; `shrink` then builds the smaller model).
    # channel (Li et al. 2017) scores a channel by the channel_norm of its filter, divided
    # by the filter's size so that scope "global" compares layers of different fan-in.
    channel_norm: Literal["l1", "l2"] = "l1"
    # slimming (Liu et al. 2017) scores a channel by |gamma| of its BatchNorm, after
    # training with penalty * sum |gamma| added to the loss (the paper: 1e-4 for VGGNet,
    # 1e-5 for ResNet and DenseNet, on CIFAR). group_lasso (Wen et al. 2016) adds penalty * the sum of the
    # L2 norms of the `groups` of every selected weight (filters: weight[k]; channels:
    # weight[:, c]; shapes: weight[:, c, i, j] of a convolution) and removes each group
    # whose RMS value has fallen below group_threshold times the RMS of its weight. The penalty acts until the last
    # pruning step (start_step, or end_step with schedule "gmp"); training then continues
    # without it, as both papers fine-tune the pruned network.
    penalty: float = 1e-4
    groups: list[GroupKind] = field(
        default_factory=lambda: ["filters", "channels", "shapes"])
    group_threshold: float = 0.05

    # bank (Cao et al. 2019, bank-balanced sparsity): every row of the weight (the N:M
    # layout: convolutions channels-last) is cut into banks of bank_size consecutive
    # weights and each bank keeps the same number, the largest bank_size * (1 - target)
    # (rounded, at least one), so parallel units given one bank each do equal work. A
    # layer whose rows are not a multiple of bank_size stays dense (see report()).
    bank_size: int = 4

    # nonzero keeps the zeros the weights hold at start_step, fixed from then on: for
    # training an already-pruned network (a lottery ticket, a loaded sparse checkpoint).

    # DNS (Guo et al. 2016): threshold t = max(mu + dns_c * sigma, 0) from the mean and std
    # of |W| per layer; prune below 0.9 t, splice back above 1.1 t. For Gaussian-like
    # weights dns_c = 0 gives about 50% sparsity and dns_c = 1 about 80%. dns_c is one
    # value for every layer, or a list with one value per `layers` pattern (a parameter
    # takes its first matching pattern's): the paper sets c layer by layer. The paper
    # prunes a trained network, so training is dense until dns_start_step, where mu and
    # sigma are taken. Masks are then revised with probability
    # (1 + dns_gamma * (step - dns_start_step)) ** -dns_power until dns_iter_stop; the
    # defaults halve that probability 10k steps in. Each layer's draw at each step is a
    # hash of (dns_seed, name, step): the same on every rank and after a restart.
    dns_c: float | list[float] = 1.0
    dns_start_step: int = 0
    dns_gamma: float = 1e-4
    dns_power: float = 1.0
    dns_iter_stop: int = 10000
    dns_seed: int = 0
    # mu and sigma over a layer's nonzero weights (the authors' Caffe code) or all of them;
    # they differ once a layer holds exact zeros (a layer pruned earlier, say).
    dns_stats: Literal["nonzero", "all"] = "nonzero"

    # IHT (Jin et al. 2016): iht_cycles x (iht_s1 dense steps, then iht_s2 steps with the
    # top (1 - target) magnitudes fixed), then dense or sparse for the rest of the run.
    # The paper ends dense; the default ends sparse because a sparse model is the goal here.
    iht_s1: int = 500
    iht_s2: int = 500
    iht_cycles: int = 2
    iht_end: Literal["sparse", "dense"] = "sparse"

    # DSD (Han et al. 2017): dense, then sparse at `target`, then dense for the rest of
    # the run with the pruned weights restarting from zero.
    dsd_dense_steps: int = 1000
    dsd_sparse_steps: int = 1000

    def check(self) -> None:
        require(self.method in METHODS, "method",
                f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        targets = self.target if isinstance(self.target, list) else [self.target]
        require(targets and all(0.0 <= t < 1.0 for t in targets), "target",
                f"must be in [0, 1) (a fraction of zeros), got {self.target}")
        if isinstance(self.target, list):
            require(self.layers and len(self.target) == len(self.layers), "target",
                    f"a list needs one value per `layers` pattern ({len(self.layers)} "
                    f"patterns), got {len(self.target)} values")
            require(self.scope == "layer", "scope",
                    "must be 'layer' when target gives one value per layer")
        require(0.0 <= self.initial_sparsity <= min(targets), "initial_sparsity",
                f"must be in [0, target = {min(targets)}], got {self.initial_sparsity}")
        require(all(isinstance(p, str) and p for p in self.layers), "layers",
                "must be non-empty glob patterns")
        require(self.m >= 2, "m", f"must be at least 2, got {self.m}")
        require(1 <= self.n < self.m, "n", f"must satisfy 1 <= n < m = {self.m}, got {self.n}")
        for key in ("start_step", "nm_start_step", "dns_start_step", "iht_s1",
                    "dsd_dense_steps"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("frequency", "iht_s2", "iht_cycles", "dsd_sparse_steps"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        if self.method == "gmp" or (self.schedule == "gmp" and self.method != "magnitude"):
            require(self.end_step >= self.start_step, "end_step",
                    f"must be >= start_step = {self.start_step}, got {self.end_step}")
        require(len(self.block) == 2 and min(self.block) >= 1, "block",
                f"must be two positive ints [rows, cols], got {self.block}")
        require(self.dns_iter_stop >= self.dns_start_step, "dns_iter_stop",
                f"must be >= dns_start_step = {self.dns_start_step}, got {self.dns_iter_stop}")
        if isinstance(self.dns_c, list):
            require(self.layers and len(self.dns_c) == len(self.layers), "dns_c",
                    f"a list needs one value per `layers` pattern ({len(self.layers)} "
                    f"patterns), got {len(self.dns_c)} values")
        for key in ("dns_gamma", "dns_power", "penalty", "group_threshold"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        require(self.bank_size >= 2, "bank_size", f"must be at least 2, got {self.bank_size}")
        require(bool(self.groups), "groups", "must name at least one of filters, channels, "
                                             "shapes")

    def layer_target(self, name: str) -> float:
        """``target`` for the parameter ``name``."""
        return per_layer(name, self.target, self.layers)
