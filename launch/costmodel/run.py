"""Step time of a run's model on a cluster, per scheme, and the launcher's ``estimate_run``.

A step is its compute (the counted FLOPs at ``compute_efficiency`` x peak), plus the local
work of compressing (memory passes at the accelerator's memory bandwidth and, for PowerSGD,
its products), plus the communication that cannot hide behind the backward pass:
``max(0, comm - overlap * backward)``. Speedups compare with dense fp32 DDP on the same
cluster at the same world size.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from dgc.codec import INDEX_DTYPES, VALUE_DTYPES
from dgc.options import DGCOptions
from launch.data import data_info
from launch.models import build_model
from sparse_train.masks import nm_compliant
from sparse_train.options import SparsityOptions

from . import traffic as tr
from .collectives import break_even_density, sequence_time
from .compute import ComputeTimes, ModelFlops, compute_times, count_flops
from .hardware import Cluster, HardwareConfig, load_cluster
from .storage import expected_masks, model_storage, model_weight_sharing_rate

if TYPE_CHECKING:
    from launch.config import Config

SparseCompute = Literal["theoretical", "realistic"] | None  # None: dense compute


@dataclass
class Workload:
    """What the cost model needs to know about a run's model and options."""

    params: list[tr.Param]
    buckets: list[list[tr.Param]]
    flops: ModelFlops
    masks: dict[str, Tensor]  # fixed weight masks by parameter name; empty: dense
    dgc: DGCOptions

    @property
    def live(self) -> dict[str, int]:
        return {name: int(mask.sum()) for name, mask in self.masks.items()}

    @property
    def nm_layers(self) -> set[str]:
        """Weights whose mask is 2:4, which sparse tensor cores can run."""
        return {name for name, mask in self.masks.items() if nm_compliant(mask, 2, 4)}


def meta_model(cfg: Config) -> tuple[nn.Module, tuple[int, ...]]:
    """The config's network on the meta device (no memory, no compute), and its input shape."""
    info = data_info(cfg.data)
    with torch.device("meta"):
        model = build_model(cfg.model, info.input_shape, info.num_classes)
    return model, info.input_shape


def workload(cfg: Config, masks: Mapping[str, Tensor] | None = None) -> Workload:
    """The config's model (built on the meta device) with ``masks`` on its weights."""
    model, input_shape = meta_model(cfg)
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    return Workload(params, tr.ddp_buckets(params, cfg.ddp.bucket_cap_mb),
                    count_flops(model, input_shape, cfg.train.batch_size),
                    dict(masks or {}), cfg.dgc or DGCOptions())


def scheme_traffic(work: Workload, scheme: str, p: int, hw: HardwareConfig,
                   powersgd_rank: int = 4, per_node: int = 1) -> tr.Traffic:
    """One of dense, fp16, bf16, powersgd, dgc, masked, hierarchical-dense,
    hierarchical-dgc, hierarchical-sparse-dgc (``per_node`` ranks per node for the last
    three)."""
    if scheme in ("dense", "fp16", "bf16"):
        return tr.dense(work.buckets, tr.FP32 if scheme == "dense" else 2, scheme)
    if scheme == "hierarchical-dense":
        return tr.hierarchical_dense(work.buckets, per_node)
    cluster = load_cluster(hw.preset)
    if scheme in ("dgc", "hierarchical-dgc"):
        return dgc_traffic(work, scheme, cluster, p, hw, per_node)
    if scheme == "hierarchical-sparse-dgc":  # its own allgather across nodes
        options = with_exchange_link(work.dgc, cluster, p)
        return tr.hierarchical_sparse_dgc(work.buckets, options, p, per_node,
                                          hw.selection_passes, live=work.live)
    if scheme == "powersgd":
        return tr.powersgd(work.buckets, powersgd_rank, hw.selection_passes)
    assert scheme == "masked", scheme
    return tr.masked(work.buckets, work.live)


EXCHANGES = ("allgather", "sparse_allreduce", "gtopk")


def dgc_traffic(work: Workload, scheme: str, cluster: Cluster, p: int, hw: HardwareConfig,
                per_node: int, exchange: str | None = None) -> tr.Traffic:
    """Flat (``dgc``) or hierarchical DGC's step with ``exchange`` (default the options';
    ``auto`` as ``resolve_exchange`` settles it)."""
    exchange = exchange or work.dgc.exchange
    if exchange == "auto":
        exchange = resolve_exchange(work, scheme, cluster, p, hw, per_node)
    hierarchical = scheme == "hierarchical-dgc"
    options = with_exchange_link(dataclasses.replace(work.dgc, exchange=exchange), cluster,
                                 cluster.nodes(p) * per_node if hierarchical else p,
                                 inter_only=hierarchical)
    if hierarchical:
        return tr.hierarchical_dgc(work.buckets, options, p, per_node, hw.selection_passes,
                                   live=work.live)
    return tr.dgc(work.buckets, options, p, hw.selection_passes, live=work.live,
                  per_node=per_node)


def resolve_exchange(work: Workload, scheme: str, cluster: Cluster, p: int,
                     hw: HardwareConfig, per_node: int) -> str:
    """The exchange ``auto`` takes for a whole run: the one whose collectives this model
    prices fastest on ``cluster`` (gtopk only where its group is a power of two). The
    library's own ``auto`` prices each bucket on one link (``dgc.plan.route_costs``); the
    launcher fixes the exchange this way instead, so a run does what ``launch.estimate``
    shows."""
    group = cluster.nodes(p) if scheme == "hierarchical-dgc" else p
    best, best_s = "allgather", math.inf
    for exchange in EXCHANGES:
        if exchange == "gtopk" and (group & (group - 1) or group <= 2):
            continue
        traffic = dgc_traffic(work, scheme, cluster, p, hw, per_node, exchange)
        took = sequence_time([(c.kind, c.nbytes, c.group) for c in traffic.collectives],
                             cluster, p, hw.algorithm)
        if took < best_s:
            best, best_s = exchange, took
    return best


TOPOLOGIES = (("flat", "dgc"), ("hierarchical", "hierarchical-dgc"),
              ("hierarchical with intra_node sparse", "hierarchical-sparse-dgc"))
_TOPOLOGY_KEYS = {  # what selects each, as --set arguments
    "flat": "dgc.topology=flat",
    "hierarchical": "dgc.topology=hierarchical dgc.intra_node=dense",
    "hierarchical with intra_node sparse": "dgc.topology=hierarchical dgc.intra_node=sparse",
}


def topology_steps(cfg: Config, p: int, per_node: int) -> dict[str, float]:
    """The modelled step (s) of the run's DGC under each topology (``TOPOLOGIES``' labels)
    on its ``hardware.preset``, at ``p`` ranks of ``per_node`` each; a topology the run's
    options cannot take (the sparse stage beside gtopk or the sparse allreduce, gtopk over
    a group that is not a power of two) is left out."""
    hw = cfg.hardware
    cluster = dataclasses.replace(load_cluster(hw.preset), per_node=per_node)
    work = workload(cfg)
    times = cluster_times(work, cluster, hw)
    steps = {}
    for label, scheme in TOPOLOGIES:
        if scheme == "hierarchical-sparse-dgc":
            if work.dgc.exchange not in ("allgather", "auto"):
                continue
            traffic = tr.hierarchical_sparse_dgc(
                work.buckets, with_exchange_link(work.dgc, cluster, p), p, per_node,
                hw.selection_passes, live=work.live)
        else:
            traffic = dgc_traffic(work, scheme, cluster, p, hw, per_node)
        step = step_estimate(traffic, times, cluster, p, hw).step_s
        if math.isfinite(step):
            steps[label] = step
    return steps


def topology_advice(cfg: Config, p: int, per_node: int | None, margin: float = 1.1
                    ) -> str | None:
    """One line for the run's log when the cost model prices another DGC topology's step
    at least ``margin`` times faster than the configured one on the run's preset; None on
    one node (every topology is flat there), or where the configured one is within it."""
    if per_node is None or p // per_node < 2:
        return None
    mine = {scheme: label for label, scheme in TOPOLOGIES}[run_scheme(cfg)]
    steps = topology_steps(cfg, p, per_node)
    best = min(steps, key=steps.get)
    if mine not in steps or steps[mine] < margin * steps[best]:
        return None
    return (f"dgc.topology: on preset {cfg.hardware.preset!r} at {p} ranks as "
            f"{p // per_node} nodes x {per_node}, the cost model prices {best} DGC's step at "
            f"{steps[best] * 1e3:.3g} ms against {steps[mine] * 1e3:.3g} ms for this run's "
            f"{mine} ({steps[mine] / steps[best]:.1f}x); name your cluster in hardware.preset "
            f"(python -m launch.estimate compares the topologies), or set "
            f"{_TOPOLOGY_KEYS[best]}")


def with_exchange_link(options: DGCOptions, cluster: Cluster, p: int,
                       inter_only: bool = False) -> DGCOptions:
    """DGC's options with the link its exchanges cross on ``cluster`` (its latency and a
    rank's bandwidth there), for ``exchange: auto`` and the dense fallback to price routes
    as this model does; unless the options already name a link."""
    defaults = DGCOptions()
    if (options.exchange_latency_us, options.exchange_gbytes) != (
            defaults.exchange_latency_us, defaults.exchange_gbytes):
        return options
    if cluster.nodes(p) > 1 or inter_only:
        latency, bandwidth = cluster.inter.latency, cluster.inter_bandwidth_per_rank()
    else:
        latency, bandwidth = cluster.intra.latency, cluster.intra.bandwidth
    return dataclasses.replace(options, exchange_latency_us=latency * 1e6,
                               exchange_gbytes=bandwidth / 1e9)


@dataclass(frozen=True)
class StepEstimate:
    scheme: str
    wire_bytes: float  # per rank per step
    comm_s: float
    compute_s: float  # FLOPs and compression work
    step_s: float


def step_estimate(traffic: tr.Traffic, times: ComputeTimes, cluster: Cluster, p: int,
                  hw: HardwareConfig, sparse: SparseCompute = None) -> StepEstimate:
    comm = sequence_time([(c.kind, c.nbytes, c.group) for c in traffic.collectives], cluster,
                         p, hw.algorithm)
    flops_s = {None: times.dense, "theoretical": times.sparse_theoretical,
               "realistic": times.sparse_realistic}[sparse]
    accel = cluster.accelerator
    compress = traffic.memory_bytes / accel.memory_bandwidth
    if traffic.flops:
        compress += traffic.flops / (accel.flops("fp32") * hw.compute_efficiency)
    backward = times.backward * flops_s / times.dense if times.dense else 0.0
    exposed = max(0.0, comm - hw.overlap * backward)
    compute = flops_s + (compress if p > 1 else 0.0)  # one rank has nothing to compress for
    return StepEstimate(traffic.scheme, traffic.wire_bytes(p, cluster.per_node), comm, compute,
                        compute + exposed)


def cluster_times(work: Workload, cluster: Cluster, hw: HardwareConfig,
                  sparse_layers: set[str] | None = None) -> ComputeTimes:
    dtype = hw.compute_dtype or cluster.accelerator.default_dtype
    return compute_times(work.flops, cluster.accelerator, dtype, hw.compute_efficiency,
                         sparse_layers, hw.sparse_realistic_factor)


def run_scheme(cfg: Config) -> str:
    """The scheme a run's config selects: DGC, a torch hook, a mask-aware sparse run, or
    dense."""
    if cfg.dgc is not None:
        if cfg.dgc.topology != "hierarchical":
            return "dgc"
        return "hierarchical-sparse-dgc" if cfg.dgc.intra_node == "sparse" else \
            "hierarchical-dgc"
    if cfg.ddp.comm_hook == "hierarchical":
        return "hierarchical-dense"
    if cfg.ddp.comm_hook != "allreduce":
        return cfg.ddp.comm_hook
    return "masked" if cfg.sparsity is not None else "dense"


def estimate_run(cfg: Config, model: nn.Module, *, world_size: int,
                 comm_bytes_per_step: float | None = None,
                 masks: Mapping[str, Tensor] | None = None) -> dict[str, float]:
    """The ``est/*`` figures of a run, for ``cfg.hardware`` (default: HardwareConfig()).

    ``model`` is the trained (unwrapped) model; its weights' zeros stand for the masks of a
    sparse run unless ``masks`` (e.g. ``sparsifier.masks``) are given. ``world_size`` is
    the run's; the estimate is for ``hardware.world_size`` ranks when set. With
    ``comm_bytes_per_step`` (measured per-rank wire bytes, e.g. ``bytes_sent / steps``) and
    more than one rank, the run's traffic is scaled to match it (``hardware.calibrate``).
    """
    hw = getattr(cfg, "hardware", None) or HardwareConfig()
    cluster = load_cluster(hw.preset)
    p = hw.world_size or world_size
    if masks is None and cfg.sparsity is not None:
        model = getattr(model, "module", model)  # DDP's parameter names carry "module."
        masks = {n: w.detach() != 0 for n, w in model.named_parameters() if w.dim() >= 2}
    work = workload(cfg, masks)
    scheme = run_scheme(cfg)
    out: dict[str, float] = {"est/world_size": float(p)}

    run = scheme_traffic(work, scheme, p, hw, cfg.ddp.powersgd_rank, cluster.per_node)
    if hw.calibrate and comm_bytes_per_step and world_size > 1:
        modelled = scheme_traffic(work, scheme, world_size, hw, cfg.ddp.powersgd_rank,
                                  cluster.per_node).wire_bytes(world_size, cluster.per_node)
        if modelled:
            ratio = comm_bytes_per_step / modelled
            out["est/comm_bytes_measured_over_model"] = ratio
            run = run.scaled(ratio)
    dense_times = cluster_times(work, cluster, hw, sparse_layers=set())
    run_times = cluster_times(work, cluster, hw, sparse_layers=work.nm_layers)
    dense = step_estimate(scheme_traffic(work, "dense", p, hw), dense_times, cluster, p, hw)
    sparse = "realistic" if work.nm_layers else None
    this = step_estimate(run, run_times, cluster, p, hw, sparse)
    every = cluster_times(work, cluster, hw)  # every layer that qualifies, run 2:4
    value_bytes = VALUE_DTYPES[work.dgc.value_dtype].itemsize
    index_bytes = INDEX_DTYPES[work.dgc.index_dtype].itemsize
    out.update({
        "est/comm_bytes_per_step_dense": dense.wire_bytes,
        "est/comm_bytes_per_step": this.wire_bytes,
        "est/comm_time_dense_s": dense.comm_s,
        "est/comm_time_s": this.comm_s,
        "est/step_time_dense_s": dense.step_s,
        "est/step_time_s": this.step_s,
        "est/step_speedup": dense.step_s / this.step_s if this.step_s else 1.0,
        "est/sparse_tc_speedup_theoretical": every.dense / every.sparse_theoretical,
        "est/sparse_tc_speedup_realistic": every.dense / every.sparse_realistic,
        "est/sparse_tc_flops_fraction": every.sparse_flops_fraction,
        # the hook's rule: its fallback allreduce carries the bucket in the value dtype too
        "est/break_even_density": break_even_density(p, value_bytes, index_bytes),
    })
    shapes = {n: shape for n, shape in work.params}
    storage = model_storage(shapes, {n: m for n, m in (masks or {}).items() if n in shapes})
    out.update({f"est/weight_bytes/{fmt}": float(b) for fmt, b in storage.items()})
    kept = {n: (int(masks[n].sum()) if n in (masks or {}) else tr.numel(s), len(s))
            for n, s in work.params if len(s) >= 2}
    out["est/weight_sharing_rate"] = model_weight_sharing_rate(kept)
    return out


@dataclass(frozen=True)
class Variant:
    """A row of the comparison: a scheme on a workload, with dense or 2:4 compute."""

    label: str
    scheme: str
    work: Workload
    sparse: SparseCompute = None


def variants(cfg: Config, powersgd_rank: int = 4) -> list[Variant]:
    """Dense, fp16, PowerSGD, the config's DGC (defaults without a ``dgc:`` section), the
    config's sparsity (if any) and a 2:4 model, all sent mask-aware where masked."""
    model, _ = meta_model(cfg)
    base = workload(cfg)
    o = base.dgc
    dgc_label = f"dgc d={o.density:g} {o.value_dtype}/{o.index_dtype}"

    def exchanged(name: str) -> Workload:
        return dataclasses.replace(base, dgc=dataclasses.replace(o, exchange=name))
    rows = [Variant("dense fp32", "dense", base), Variant("fp16", "fp16", base),
            Variant("hierarchical dense", "hierarchical-dense", base),
            Variant(f"powersgd r={powersgd_rank}", "powersgd", base),
            Variant(f"{dgc_label} {o.exchange}", "dgc", base)]
    rows += [Variant(f"{dgc_label} {name}", "dgc", exchanged(name))
             for name in EXCHANGES if name != o.exchange]
    rows.append(Variant(f"hierarchical {dgc_label} {o.exchange}", "hierarchical-dgc", base))
    rows.append(Variant(f"hierarchical sparse-intra {dgc_label}", "hierarchical-sparse-dgc",
                        base))
    s = cfg.sparsity
    if s is not None and not (s.method == "nm" and (s.n, s.m) == (2, 4)):
        work = dataclasses.replace(base, masks=expected_masks(model, s))
        rows.append(Variant(f"{s.method} masked", "masked", work,
                            "realistic" if work.nm_layers else None))
    nm = dataclasses.replace(base, masks=expected_masks(model, SparsityOptions(
        method="nm", layers=s.layers if s is not None else [])))
    rows += [Variant("2:4 masked, realistic", "masked", nm, "realistic"),
             Variant("2:4 masked, theoretical", "masked", nm, "theoretical")]
    return rows


def compare(cfg: Config, hw: HardwareConfig, world_sizes: list[int], powersgd_rank: int = 4
            ) -> dict[int, list[tuple[str, StepEstimate, float]]]:
    """Per world size: (label, estimate, speedup over dense fp32) for every variant."""
    cluster = load_cluster(hw.preset)
    rows = variants(cfg, powersgd_rank)
    times = {id(v): cluster_times(v.work, cluster, hw, v.work.nm_layers if v.sparse else set())
             for v in rows}
    table = {}
    for p in world_sizes:
        estimates = [(v.label, step_estimate(scheme_traffic(v.work, v.scheme, p, hw,
                                                             powersgd_rank, cluster.per_node),
                                             times[id(v)], cluster, p, hw, v.sparse))
                     for v in rows]
        dense_step = estimates[0][1].step_s
        table[p] = [(label, e, dense_step / e.step_s) for label, e in estimates]
    return table
