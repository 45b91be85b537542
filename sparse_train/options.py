"""The options of ``sparse_train.attach``, which are also the launcher's ``sparsity:`` keys.

Steps count optimizer steps taken since ``attach`` (steps skipped by an AMP grad scaler do
not count). Each knob only matters to the methods named in its comment.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sparse_comm.schema import require

Method = Literal["magnitude", "gmp", "dns", "iht", "dsd", "nm", "block"]
METHODS: tuple[str, ...] = Method.__args__


@dataclass
class SparsityOptions:
    method: Method = "magnitude"
    # Final fraction of zeros in the selected weights (magnitude, gmp, iht, dsd, block: for
    # block it is the fraction of zero blocks). nm's sparsity is 1 - n/m and dns's follows
    # from dns_c, so they ignore it.
    target: float = 0.5
    # Glob patterns over parameter names (as in model.named_parameters() of the unwrapped
    # model), matched against parameters with ndim >= 2. Empty: the weight of every
    # nn.Linear and nn.Conv1d/2d/3d.
    layers: list[str] = field(default_factory=list)
    # One threshold per layer, or one across all selected layers (magnitude, gmp, iht, dsd,
    # block). Global lets over-parameterised layers absorb more of the sparsity.
    scope: Literal["layer", "global"] = "layer"

    # magnitude prunes once at start_step; gmp (and block with block_schedule "gmp") follow
    # Zhu & Gupta's cubic schedule from initial_sparsity at start_step to target at
    # end_step, updating the masks every `frequency` steps. Zhu & Gupta prune every 100
    # to 1000 steps; the low end suits the short runs this is tested on.
    start_step: int = 0
    end_step: int = 1000
    frequency: int = 100
    initial_sparsity: float = 0.0

    # N:M: at most n nonzeros in every m consecutive input weights; 2:4 is what sparse
    # tensor cores accelerate. Dense until nm_start_step, then a fixed N:M mask.
    n: int = 2
    m: int = 4
    nm_start_step: int = 0

    # Block: [rows, cols] of each block of weight.reshape(out, -1), scored by block_norm.
    block: list[int] = field(default_factory=lambda: [4, 4])
    block_norm: Literal["l2", "l1"] = "l2"
    block_schedule: Literal["oneshot", "gmp"] = "oneshot"

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
        require(0.0 <= self.target < 1.0, "target",
                f"must be in [0, 1) (a fraction of zeros), got {self.target}")
        require(0.0 <= self.initial_sparsity <= self.target, "initial_sparsity",
                f"must be in [0, target = {self.target}], got {self.initial_sparsity}")
        require(all(isinstance(p, str) and p for p in self.layers), "layers",
                "must be non-empty glob patterns")
        require(self.m >= 2, "m", f"must be at least 2, got {self.m}")
        require(1 <= self.n < self.m, "n", f"must satisfy 1 <= n < m = {self.m}, got {self.n}")
        for key in ("start_step", "nm_start_step", "dns_start_step", "iht_s1",
                    "dsd_dense_steps"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("frequency", "iht_s2", "iht_cycles", "dsd_sparse_steps"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
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
        for key in ("dns_gamma", "dns_power"):
            require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
