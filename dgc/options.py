"""The knobs of Deep Gradient Compression, one dataclass shared by attach, DGCState and configs.

The field names are the option names everywhere: ``dgc.attach(model, opt, density=0.01)``,
``dgc.DGCState(model=model, density=0.01)`` and the launcher's ``dgc:`` section all go through
``sparse_comm.schema.build(DGCOptions, ...)``, so a mistake is reported the same way (a one-line
``ConfigError`` naming the key) wherever it is made.

Momentum, Nesterov and weight decay are not options here: they belong to the optimizer and
``attach`` takes them over from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sparse_comm.schema import require


@dataclass
class DGCOptions:
    density: float = 0.001
    """Fraction of each compressed tensor's entries sent per step after warm-up. The paper
    sends 0.1% of the gradient ("99.9% of the gradient exchange ... is redundant")."""

    warmup_epochs: float | None = None
    """Length of the warm-up in epochs (driven by ``set_epoch``); ``0`` disables it. Unset,
    with no other length given, it is one epoch per explicit stage, or the paper's 4."""

    warmup_steps: int | None = None
    """Length of the warm-up in optimizer steps, counted by the hook (resumable), so the
    warm-up can be sized to a run rather than to the paper's 90-epoch ones."""

    warmup_fraction: float | None = None
    """Length of the warm-up as a fraction of the run's optimizer steps; needs the run's
    length (``set_total_steps``, which the launcher calls)."""

    warmup_densities: list[float] | Literal["paper"] | None = None
    """The stage densities, spread evenly over the warm-up: a list, or ``paper`` for the
    paper's 25%, 6.25%, 1.5625%, 0.4% (Sec. 3.3). Unset: ``warmup_stages`` geometric stages
    ending at ``density`` (the reference implementation's rule)."""

    warmup_stages: int | None = None
    """Geometric stages when ``warmup_densities`` is unset; default one per warm-up epoch
    (rounded up), or 4 for a warm-up in steps or as a fraction."""

    momentum_masking: bool = True
    """Zero the momentum at the positions just sent, so a stale momentum does not keep pushing
    an update that has already been applied (paper, Sec. 3.2, "momentum factor masking")."""

    clip_norm: float | None = None
    """Per-tensor L2 clipping of each rank's own gradient before accumulation, at
    ``clip_norm / sqrt(world_size)`` (paper, Sec. 3.2, "local gradient clipping"). Every
    tensor of the bucket is clipped this way, the dense (1-D, small) ones included; the
    reference code clips its dense tensors after averaging instead. ``None`` disables it;
    set it to the global clip norm you would use without DGC."""

    sample_ratio: float = 0.01
    """Fraction of entries sampled to estimate the top-k threshold (paper, Sec. 5: sampling
    0.1% to 1% of the gradient keeps selection cheap)."""

    value_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Dtype of the values on the wire. A selected pair's rounding error stays in the local
    residual, so a narrower dtype delays information rather than losing it; tensors sent
    whole (1-D and small ones, the dense fallback) lose theirs each step."""

    index_dtype: Literal["int32", "int64"] = "int32"
    """Dtype of the indices on the wire; indices count positions within one DDP bucket, so
    int32 is enough for any bucket under 2**31 elements (8 GiB of fp32)."""

    min_numel: int = 1
    """Tensors of 2 or more dims with fewer elements go dense (allreduce); 1-D tensors
    (biases, norm scales) always do, as in the paper. The default compresses every tensor
    of 2+ dims, as the reference implementation does. Measured here: 1024 (this option's
    earlier default) sends ResNet-20's first conv and classifier dense, 34% more bytes per
    step (12.4 against 9.2 kB per rank at p = 4, fp16 values), and LeNet-5's conv1 dense (4.7
    against 3.8 kB at p = 2), for the same accuracy (LeNet-5, 10 epochs, 2 processes: 99.27%
    against 99.28%, one seed each). Raise it where kernel launches per tiny tensor cost
    more time than their bytes."""

    dense_fallback: bool = True
    """Send a bucket by dense allreduce whenever that moves fewer bytes than the sparse
    allgather (break-even density 2*b_v / (p*(b_v + b_i)) for p ranks), e.g. early in warm-up
    or on many ranks. The arithmetic is the same; only the transport changes."""

    check_finite: bool = False
    """Before compressing, agree across ranks whether every gradient in the bucket is finite;
    if not, pass the raw gradients through a plain averaging allreduce and leave the residuals
    untouched, so a GradScaler skips the step without corrupting them. Costs one host sync and
    one 4-byte allreduce per bucket, so it is off unless you train with a loss scaler."""

    topology: Literal["flat", "hierarchical"] = "flat"
    """``flat``: every rank compresses its own gradient and the pairs go to every rank, so
    each rank sends (p - 1) k pairs. ``hierarchical``: dense inside a node, compressed
    across nodes (``dgc.transport.hierarchical``): the node's ranks reduce-scatter each
    bucket, each rank runs DGC on its shard of the node's sum, the shard's pairs go only to
    the ranks holding the same shard on the other nodes, and the node allgathers the
    result; DGC's memory and selection per rank shrink to 1 / ranks_per_node."""

    intra_node: Literal["dense", "sparse"] = "dense"
    """The hierarchical topology's stage inside a node. ``dense``: the reduce-scatter and
    allgather of the fp32 gradient described under ``topology``. ``sparse``
    (``dgc.transport.hierarchical_sparse``): every rank compresses its own gradient as in
    the flat topology, the node merges its ranks' pairs into one set of k per tensor
    (losers go back to their residuals) and each rank allgathers a 1/r slice of it over the
    world: only pairs travel, r times fewer than flat DGC's, and the update sums k entries
    per node instead of per rank. Its exchange is the allgather."""

    ranks_per_node: int | None = None
    """Ranks on each node, placed node by node (ranks 0..r-1 on the first). Default: the
    launcher's local world size (torchrun's ``LOCAL_WORLD_SIZE``; ``launch.distenv`` finds
    it under mpirun, Slurm and horovodrun). Also splits every run's bytes into intra- and
    inter-node ones."""

    adam_mode: Literal["frozen_variance", "error_feedback"] = "frozen_variance"
    """How DGC works with ``torch.optim.Adam``/``AdamW`` (``dgc.adam``): ``frozen_variance``
    averages densely for ``adam_warmup_steps`` while Adam estimates its second moment, then
    freezes it and compresses the first moment with DGC's momentum correction (1-bit Adam's
    scheme); ``error_feedback`` compresses raw gradients with a residual and leaves Adam
    untouched. Ignored with SGD."""

    adam_warmup_steps: int = 1000
    """Dense steps before ``frozen_variance`` freezes Adam's second moment (1-bit Adam warms
    up for 15-25% of BERT pre-training; a few hundred steps settle it on small models)."""

    adam_variance_refresh: int = 0
    """After ``frozen_variance`` freezes, every this many steps the hook also averages the
    gradient densely (one extra allreduce of the bucket) and the frozen second moment takes
    it in with the weight of that many Adam steps, ``1 - b2^interval``, so that it follows
    the gradients' scale as they shrink (0/1 Adam's variance updates, Lu et al. 2022).
    0: frozen for good."""

    adam_selection: Literal["momentum", "update"] = "momentum"
    """What ``frozen_variance`` ranks entries by once the variance is frozen: ``momentum``
    (DGC's rule: the accumulated momentum) or ``update`` (the accumulated momentum over
    Adam's frozen denominator: the step each entry would take; ``dgc.adam``)."""

    adam_variance_floor: float = 0.01
    """The least second moment ``frozen_variance`` divides by, as a fraction of its tensor's
    mean (set at the freeze and at each refresh): keeps an entry that was dead through the
    warm-up (v = 0) from stepping by lr / eps when it comes alive. 0: no floor."""

    exchange: Literal["allgather", "sparse_allreduce", "gtopk", "auto"] = "auto"
    """How the pairs are summed over ranks (``dgc.transport``): ``allgather`` (the paper's;
    each rank sends (p - 1) k pairs in one collective), ``sparse_allreduce`` (split and
    reduce, Ok-Topk's scheme: about (c1 + c2) k (p - 1) / p pairs, whatever p, over p - 1
    messages), ``gtopk`` (recursive doubling with a top-k merge, Shi et al.'s global top-k:
    k log2(p) pairs in log2(p) messages; p a power of two), or ``auto``: per bucket the one
    ``dgc.plan.route_costs`` prices cheapest on the link below, with the dense fallback
    also priced (gtopk not on two ranks, where one swap moves the allgather's bytes and
    drops pairs). Under the hierarchical topology this is its inter-node stage."""

    gtopk_slices: bool = False
    """How ``gtopk``'s rounds across nodes use a node's ranks (``dgc.transport.gtopk``).
    false: each swap is split over them and the node allgathers the slices every round (the
    same result as one rank per node). true: each rank keeps its slice through the rounds
    and the node allgathers once at the end: fewer collectives inside the node, but the
    result is r per-slice selections, not one top k (on MNIST at 8 processes as 4 x 2 it
    ended 0.34 points lower)."""

    sparse_capacity: list[float] = field(default_factory=lambda: [2.0, 1.0])
    """``[c1, c2]``: the sparse allreduce sends at most ``ceil(c1 k / p)`` pairs to each
    region's owner and each owner publishes ``ceil(c2 k / p)`` sums. What does not fit
    stays in the residual."""

    exchange_latency_us: float = 0.0
    """Latency per message of the link the exchanges cross, for ``exchange: auto`` and the
    dense fallback; 0 compares bytes on the wire. The launcher sets it (and the bandwidth)
    from its hardware preset's inter-node link."""

    exchange_gbytes: float = 10.0
    """Bandwidth of that link per rank, GB/s (matters only with a latency)."""

    seed: int = 0
    """Seed of the threshold's samples. Each sample's offset is a hash of (seed, rank,
    parameter name, selection count) (``sparse_comm.draws``), never a stream shared across
    tensors, so a tensor's selection does not depend on which tensors DDP handed the hook
    before it, and a resumed run into a rebuilt DDP model repeats the uninterrupted one.
    The global generator is untouched: DGC does not perturb dropout or data order."""

    def check(self) -> None:
        require(0.0 < self.density <= 1.0, "density", f"must be in (0, 1], got {self.density}")
        require(self.warmup_epochs is None or self.warmup_epochs >= 0, "warmup_epochs",
                f"must be >= 0 or null, got {self.warmup_epochs}")
        require(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps",
                f"must be >= 0 or null, got {self.warmup_steps}")
        require(self.warmup_fraction is None or 0 <= self.warmup_fraction <= 1,
                "warmup_fraction", f"must be in [0, 1] or null, got {self.warmup_fraction}")
        lengths = [k for k in ("warmup_epochs", "warmup_steps", "warmup_fraction")
                   if getattr(self, k) is not None]
        require(len(lengths) <= 1, lengths[-1] if lengths else "",
                f"the warm-up's length is given twice ({' and '.join(lengths)}); keep one")
        if isinstance(self.warmup_densities, list):
            require(self.warmup_densities, "warmup_densities", "must not be empty")
            for i, d in enumerate(self.warmup_densities):
                require(0.0 < d <= 1.0, f"warmup_densities[{i}]",
                        f"must be in (0, 1], got {d}")
        require(self.warmup_stages is None or self.warmup_stages >= 1, "warmup_stages",
                f"must be >= 1 or null, got {self.warmup_stages}")
        require(self.clip_norm is None or self.clip_norm > 0, "clip_norm",
                f"must be > 0 or null, got {self.clip_norm}")
        require(0.0 < self.sample_ratio <= 1.0, "sample_ratio",
                f"must be in (0, 1], got {self.sample_ratio}")
        require(self.min_numel >= 1, "min_numel", f"must be >= 1, got {self.min_numel}")
        require(len(self.sparse_capacity) == 2 and min(self.sparse_capacity) > 0,
                "sparse_capacity", f"must be two factors > 0, got {self.sparse_capacity}")
        require(self.exchange_latency_us >= 0, "exchange_latency_us",
                f"must be >= 0, got {self.exchange_latency_us}")
        require(self.exchange_gbytes > 0, "exchange_gbytes",
                f"must be > 0, got {self.exchange_gbytes}")
        require(self.adam_warmup_steps >= 1, "adam_warmup_steps",
                f"must be >= 1, got {self.adam_warmup_steps}")
        require(self.adam_variance_floor >= 0, "adam_variance_floor",
                f"must be >= 0, got {self.adam_variance_floor}")
        require(self.adam_selection == "momentum" or not self.adam_variance_refresh,
                "adam_selection", "'update' needs adam_variance_refresh: 0 (a refreshed "
                                  "denominator would change under DGC's memory)")
        require(self.adam_variance_refresh >= 0, "adam_variance_refresh",
                f"must be >= 0, got {self.adam_variance_refresh}")
        require(self.intra_node == "dense" or self.exchange in ("allgather", "auto"),
                "exchange", f"{self.exchange!r}: intra_node 'sparse' exchanges across "
                            f"nodes by allgather ('allgather' or 'auto')")
        require(self.ranks_per_node is None or self.ranks_per_node >= 1, "ranks_per_node",
                f"must be >= 1 or null, got {self.ranks_per_node}")
