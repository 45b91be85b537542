"""One DDP bucket's journey through Deep Gradient Compression (Lin et al., ICLR 2018).

``ddp_model.register_comm_hook(state, dgc_hook)`` replaces DDP's averaging allreduce. For each
bucket the hook

1. clips each rank's gradient per tensor (optional, ``memory.clip_``);
2. folds each large tensor's gradient into its momentum ``u`` and accumulation ``v``
   (``memory.accumulate_``), picks the top-k of ``|v|`` (``select.select_topk``) and takes what
   it sends out of ``u`` and ``v`` (``memory.mask_``); small and 1-D tensors go dense;
3. starts at most two collectives, from the hook body, in the same order on every rank:
   an allreduce of the dense tensors and an allgather of one packed buffer of every
   compressed tensor's (index, value) pairs (``codec.pack``); or, when that would move more
   bytes, one allreduce of the whole bucket with the selected values scattered into zeros;
4. in a future callback (local math only): sums what arrived, divides by the world size,
   applies momentum to the dense tensors (after averaging, so every rank's buffer agrees)
   and adds the locally kept weight-decay momentum.

The result is the full SGD update direction, momentum included, so the optimizer runs plain
SGD (momentum 0, weight decay 0) on it; ``dgc.attach`` arranges that. This is the only module
of ``dgc`` that talks to ``torch.distributed``.
"""

# No ``from __future__ import annotations``: DDP compares dgc_hook's annotations with the
# real ``dist.GradBucket`` and ``Future[Tensor]`` objects, not strings.
import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from dgc import codec, memory, wire
from dgc.options import DGCOptions
from dgc.schedule import topk_count, warmup_density
from dgc.select import ThresholdState, select_topk
from launch.schema import ConfigError, build

log = logging.getLogger(__name__)


@dataclass
class DGCStats:
    """Cumulative counters of one rank; bytes are per-rank wire bytes (``dgc.wire``)."""

    steps: int = 0
    bytes_sent: float = 0.0
    """Wire bytes of every tensor this hook handed to a collective."""
    bytes_dense: float = 0.0
    """Wire bytes plain DDP would have sent: one allreduce of each bucket as it is."""
    sparse_buckets: int = 0
    dense_buckets: int = 0
    nonfinite_buckets: int = 0
    density: dict[str, float] = field(default_factory=dict)
    """Current fraction of entries sent per step, per parameter name (1.0 for dense ones)."""


@dataclass(frozen=True)
class _Slot:
    """One parameter's place in a bucket; ``k`` is None for a tensor that goes dense."""

    name: str
    offset: int
    numel: int
    k: int | None


@dataclass(frozen=True)
class _Plan:
    """What to do with a bucket; depends only on shapes, density and world size, so every
    rank derives the same plan and starts the same collectives."""

    slots: tuple[_Slot, ...]
    sparse: bool
    layout: codec.Layout

    @property
    def compressed(self) -> list[_Slot]:
        return [s for s in self.slots if s.k is not None]

    @property
    def dense(self) -> list[_Slot]:
        return [s for s in self.slots if s.k is None]


def make_plan(names: Iterable[str], shapes: Iterable[torch.Size], density: float,
              world_size: int, itemsize: int, options: DGCOptions) -> _Plan:
    slots, offset = [], 0
    for name, shape in zip(names, shapes):
        numel = math.prod(shape)
        compress = len(shape) > 1 and numel >= options.min_numel
        slots.append(_Slot(name, offset, numel, topk_count(numel, density) if compress else None))
        offset += numel
    layout = codec.Layout(sum(s.k for s in slots if s.k is not None),
                          codec.VALUE_DTYPES[options.value_dtype],
                          codec.INDEX_DTYPES[options.index_dtype])
    if layout.index_dtype == torch.int32 and offset >= 2**31:
        raise ConfigError("index_dtype", f"a bucket of {offset} elements needs 'int64'")
    dense_numel = sum(s.numel for s in slots if s.k is None)
    sparse_bytes = wire.allgather_bytes(layout.nbytes, world_size)
    if dense_numel:
        # the dense tensors travel in the value dtype beside the allgather (_exchange_sparse)
        sparse_bytes += wire.allreduce_bytes(dense_numel * layout.value_dtype.itemsize,
                                             world_size)
    fallback = sparse_bytes > wire.allreduce_bytes(offset * itemsize, world_size)
    sparse = layout.count > 0 and not (options.dense_fallback and fallback)
    return _Plan(tuple(slots), sparse, layout)


class DGCState:
    """Everything ``dgc_hook`` keeps between steps on one rank.

    Args:
        process_group: group to communicate over (default: the default group).
        model / named_parameters: where parameter names come from (pass one); state is keyed
            by name, so it survives DDP's bucket rebuild and a restart.
        momentum, nesterov: the SGD momentum the hook applies (``torch.optim.SGD`` semantics,
            dampening 0). The optimizer must then run without momentum.
        weight_decay: a float for all parameters or a mapping name -> float. Weight decay is
            not compressed: ``wd * w`` gets its own momentum on each rank and is added to the
            communicated update, as in the reference DGC SGD.
        **options: the fields of ``dgc.DGCOptions``; a bad one raises ``ConfigError``.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None, *, model=None,
                 named_parameters: Iterable[tuple[str, Tensor]] | None = None,
                 momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float | Mapping[str, float] = 0.0, **options):
        self.options: DGCOptions = build(DGCOptions, options)
        if (model is None) == (named_parameters is None):
            raise TypeError("DGCState: pass exactly one of model= or named_parameters=")
        if model is not None:
            named_parameters = getattr(model, "module", model).named_parameters()
        if momentum < 0 or (nesterov and momentum <= 0):
            raise ValueError(f"DGCState: momentum={momentum}, nesterov={nesterov}: momentum "
                             f"must be >= 0, and > 0 for Nesterov")
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        # id() is used only to name the tensors DDP hands us; state is keyed by name.
        named = list(named_parameters)
        self._names = {id(p): name for name, p in named}
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        if isinstance(weight_decay, Mapping):
            self.weight_decay = {n: float(wd) for n, wd in weight_decay.items() if wd}
        else:
            self.weight_decay = {n: float(weight_decay) for n, _ in named if weight_decay}
        self.epoch = 0.0
        self.stats = DGCStats()
        self._u: dict[str, Tensor] = {}
        self._v: dict[str, Tensor] = {}
        self._wd_u: dict[str, Tensor] = {}
        self._thresholds: dict[str, ThresholdState] = {}
        self._generator: torch.Generator | None = None
        self._pending_generator_state: Tensor | None = None
        self._plans: dict[tuple[str, ...], _Plan] = {}  # by bucket composition

    # -- schedule -----------------------------------------------------------------------
    @property
    def density(self) -> float:
        """Target density of the current epoch (warm-up included)."""
        o = self.options
        return warmup_density(self.epoch, o.density, o.warmup_epochs, o.warmup_densities)

    def set_epoch(self, epoch: float) -> None:
        """Move the warm-up schedule to ``epoch``; call it on every rank, like a sampler's."""
        density = self.density
        self.epoch = float(epoch)
        if self.density != density:
            self._plans.clear()  # plans hold k; fractional epochs must not pile them up

    # -- per-name buffers ---------------------------------------------------------------
    def _buffer(self, store: dict[str, Tensor], name: str, like: Tensor) -> Tensor:
        buf = store.get(name)
        if buf is None:
            buf = store[name] = torch.zeros_like(like)
        elif buf.device != like.device or buf.dtype != like.dtype:
            buf = store[name] = buf.to(like)
        return buf

    def _rng(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.options.seed * 1_000_003 + self.rank)
            if self._pending_generator_state is not None:
                try:
                    self._generator.set_state(self._pending_generator_state)
                except RuntimeError:  # saved on another device type: keep the fresh seed
                    log.warning("DGC: threshold sampler state not restorable on %s", device)
                self._pending_generator_state = None
        return self._generator

    def _plan(self, bucket: dist.GradBucket, flat: Tensor) -> _Plan:
        params = bucket.parameters()
        try:
            names = tuple(self._names[id(p)] for p in params)
        except KeyError:
            raise ValueError("DGCState: DDP has a parameter that is not among the model's "
                             "named_parameters given to DGCState") from None
        plan = self._plans.get(names)
        if plan is None:
            plan = make_plan(names, (p.shape for p in params), self.density, self.world_size,
                             flat.element_size(), self.options)
            self._plans[names] = plan
            self.stats.density.update(
                (s.name, 1.0 if s.k is None else s.k / s.numel) for s in plan.slots)
        return plan

    # -- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's state (residuals differ per rank: save one file per rank). Tensors are
        references, as in ``Optimizer.state_dict``."""
        return {
            "epoch": self.epoch,
            "momentum": dict(self._u),
            "accumulation": dict(self._v),
            "weight_decay_momentum": dict(self._wd_u),
            "thresholds": {n: t.state_dict() for n, t in self._thresholds.items()},
            "generator": (self._generator.get_state() if self._generator is not None
                          else self._pending_generator_state),
            "stats": dataclasses.asdict(self.stats),
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.epoch = float(state["epoch"])
        self._u = {n: t.clone() for n, t in state["momentum"].items()}
        self._v = {n: t.clone() for n, t in state["accumulation"].items()}
        self._wd_u = {n: t.clone() for n, t in state["weight_decay_momentum"].items()}
        self._thresholds = {}
        for name, sd in state["thresholds"].items():
            self._thresholds[name] = ThresholdState()
            self._thresholds[name].load_state_dict(sd)
        self._generator, self._pending_generator_state = None, state["generator"]
        self.stats = DGCStats(**state["stats"])
        self._plans = {}

    def compression_stats(self) -> dict[str, float]:
        s = self.stats
        return {"steps": s.steps, "density": self.density, "bytes_sent": s.bytes_sent,
                "bytes_dense": s.bytes_dense,
                "compression_ratio": s.bytes_dense / s.bytes_sent if s.bytes_sent else 1.0,
                "sparse_buckets": s.sparse_buckets, "dense_buckets": s.dense_buckets,
                "nonfinite_buckets": s.nonfinite_buckets}


def dgc_hook(state: DGCState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: compress, exchange and average one bucket (see module doc)."""
    flat = bucket.buffer()
    plan = state._plan(bucket, flat)
    state.stats.steps += bucket.is_last()
    state.stats.bytes_dense += wire.allreduce_bytes(flat.nbytes, state.world_size)
    if state.options.check_finite and not _finite_on_all_ranks(state, flat):
        state.stats.nonfinite_buckets += 1
        return _allreduce(state, flat).then(lambda _: flat.div_(state.world_size))
    if state.options.clip_norm is not None:
        max_norm = state.options.clip_norm * state.world_size ** -0.5
        for s in plan.slots:
            memory.clip_(flat.narrow(0, s.offset, s.numel), max_norm)
    sent = [_compress(state, s, flat.narrow(0, s.offset, s.numel)) for s in plan.compressed]
    if plan.sparse:
        state.stats.sparse_buckets += 1
        summed = _exchange_sparse(state, plan, flat, sent)
    else:
        state.stats.dense_buckets += 1
        summed = _exchange_dense(state, plan, flat, sent)
    return summed.then(lambda _: _finish(state, plan, bucket, flat))


def _compress(state: DGCState, slot: _Slot, g: Tensor) -> tuple[Tensor, Tensor]:
    """Accumulate ``g`` into the slot's memory and take out the k entries to send."""
    u = state._buffer(state._u, slot.name, g)
    v = state._buffer(state._v, slot.name, g)
    memory.accumulate_(u, v, g, state.momentum, state.nesterov)
    if slot.k >= slot.numel:  # nothing to select: send everything (density 1.0)
        indices, values = torch.arange(slot.numel, device=v.device), v.clone()
    else:
        threshold = state._thresholds.setdefault(slot.name, ThresholdState())
        indices, values = select_topk(v, slot.k, state.options.sample_ratio,
                                      state=threshold, generator=state._rng(v.device))
    values = values.to(codec.VALUE_DTYPES[state.options.value_dtype])
    memory.mask_(u, v, indices, values, state.options.momentum_masking)
    return indices, values


def _exchange_sparse(state: DGCState, plan: _Plan, flat: Tensor,
                     sent: list[tuple[Tensor, Tensor]]) -> torch.futures.Future:
    """Allreduce the dense tensors and allgather the packed pairs; resolves to ``flat``
    holding the sum over ranks."""
    futures = []
    dense_slots = plan.dense
    if dense_slots:
        # Small and 1-D tensors travel in the value dtype too (as torch's fp16 hook does):
        # at 0.1% density their fp32 bytes would otherwise dominate the message.
        wire_dtype = codec.VALUE_DTYPES[state.options.value_dtype]
        dense = torch.cat([flat.narrow(0, s.offset, s.numel) for s in dense_slots]).to(wire_dtype)
        futures.append(_allreduce(state, dense))
    # Indices count positions in the bucket, so one scatter covers every tensor.
    indices = torch.cat([i + s.offset for s, (i, _) in zip(plan.compressed, sent)])
    packed = codec.pack(indices, torch.cat([v for _, v in sent]), plan.layout)
    gathered = packed.new_empty(state.world_size * packed.numel())
    futures.append(_allgather(state, gathered, packed))

    def unpack(_) -> Tensor:
        flat.zero_()
        codec.scatter_sum_(flat, *codec.unpack(gathered, plan.layout, state.world_size))
        offset = 0
        for s in dense_slots:
            flat.narrow(0, s.offset, s.numel).copy_(dense.narrow(0, offset, s.numel))
            offset += s.numel
        return flat

    return torch.futures.collect_all(futures).then(unpack)


def _exchange_dense(state: DGCState, plan: _Plan, flat: Tensor,
                    sent: list[tuple[Tensor, Tensor]]) -> torch.futures.Future:
    """Same sum as ``_exchange_sparse`` by one allreduce of the bucket, the compressed tensors
    reduced to their selected entries (cheaper when the density is high)."""
    for s, (indices, values) in zip(plan.compressed, sent):
        flat.narrow(0, s.offset, s.numel).zero_().index_copy_(0, indices, values.to(flat.dtype))
    return _allreduce(state, flat)


def _finish(state: DGCState, plan: _Plan, bucket: dist.GradBucket, flat: Tensor) -> Tensor:
    """Average, then add the momentum of the dense tensors and of weight decay."""
    flat.div_(state.world_size)
    for s in plan.dense:
        g = flat.narrow(0, s.offset, s.numel)
        u = state._buffer(state._u, s.name, g)
        g.copy_(memory.momentum_step_(u, g, state.momentum, state.nesterov))
    if state.weight_decay:
        # gradients() are views into ``flat`` shaped (and strided) like the parameters.
        for s, p, view in zip(plan.slots, bucket.parameters(), bucket.gradients()):
            wd = state.weight_decay.get(s.name)
            if wd:
                u = state._buffer(state._wd_u, s.name, p)
                view.add_(memory.momentum_step_(u, p.detach() * wd, state.momentum,
                                                state.nesterov))
    return flat


def _finite_on_all_ranks(state: DGCState, flat: Tensor) -> bool:
    bad = torch.isfinite(flat).all().logical_not().to(torch.float32).reshape(1)
    _allreduce(state, bad, op=dist.ReduceOp.MAX).wait()
    return bad.item() == 0  # the one host sync, only with check_finite


def _allreduce(state: DGCState, t: Tensor, op=dist.ReduceOp.SUM) -> torch.futures.Future:
    state.stats.bytes_sent += wire.allreduce_bytes(t.nbytes, state.world_size)
    work = dist.all_reduce(t, op=op, group=state.process_group, async_op=True)
    return work.get_future()


def _allgather(state: DGCState, out: Tensor, t: Tensor) -> torch.futures.Future:
    state.stats.bytes_sent += wire.allgather_bytes(t.nbytes, state.world_size)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, t, group=state.process_group, async_op=True).get_future()
