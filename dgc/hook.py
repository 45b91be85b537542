"""One DDP bucket's journey through Deep Gradient Compression (Lin et al., ICLR 2018).

``ddp_model.register_comm_hook(state, dgc_hook)`` replaces DDP's averaging allreduce. For each
bucket the hook

1. zeroes gradients that a sparsifier's hard masks prune (``Compressor.drop_masked_``) and
   clips each rank's gradient per tensor (optional, ``memory.clip_``);
2. folds each large tensor's gradient into its momentum ``u`` and accumulation ``v``
   (``memory.accumulate_``), picks the top-k of ``|v|`` (``select.select_topk``) and takes what
   it sends out of ``u`` and ``v`` (``memory.mask_``); small and 1-D tensors go dense;
3. starts at most two collectives, from the hook body, in the same order on every rank:
   an allreduce of the dense tensors and an allgather of one packed buffer of every
   compressed tensor's (index, value) pairs (``codec.pack``); or, when that would move more
   bytes, one allreduce of the whole bucket with the selected values scattered into zeros.
   Under fixed sparsity masks (the same on every rank) dense transport carries only the
   live entries, without indices: a 2:4 model's dense allreduce moves half the bytes;
4. in a future callback (local math only): sums what arrived, divides by the world size,
   applies momentum to the dense tensors (after averaging, so every rank's buffer agrees)
   and adds the locally kept weight-decay momentum.

The result is the full SGD update direction, momentum included, so the optimizer runs plain
SGD (momentum 0, weight decay 0) on it; ``dgc.attach`` arranges that. The per-tensor math is
``dgc.Compressor``'s; this is the only module of ``dgc`` that talks to ``torch.distributed``.
"""

# No ``from __future__ import annotations``: DDP compares dgc_hook's annotations with the
# real ``dist.GradBucket`` and ``Future[Tensor]`` objects, not strings.
import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from dgc import codec, wire
from dgc.compressor import Compressor
from dgc.guards import PER_PARAMETER_HOOK
from dgc.options import DGCOptions
from dgc.schedule import sparse_count
from sparse_comm.schema import ConfigError, build
from sparse_train.live import gather_live, scatter_live_


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
    """One parameter's place in a bucket. ``k`` is None for a tensor that goes dense;
    ``live`` counts the entries that travel when it does (fewer than ``numel`` under a fixed
    sparsity mask, whose live entries go without indices)."""

    name: str
    offset: int
    numel: int
    k: int | None
    live: int

    @property
    def compact(self) -> bool:
        return self.live < self.numel


@dataclass(frozen=True)
class _Plan:
    """What to do with a bucket; depends only on shapes, masks, density and world size, all
    the same on every rank, so every rank derives the same plan and starts the same
    collectives."""

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
              world_size: int, options: DGCOptions,
              live: Mapping[str, int] | None = None, fixed: bool = False) -> _Plan:
    """``live``: entries left by hard sparsity masks, by name (k counts only those);
    ``fixed``: the masks are settled on every rank, so dense transport sends live entries
    only."""
    live = live or {}
    slots, offset = [], 0
    for name, shape in zip(names, shapes):
        numel = math.prod(shape)
        n_live = live.get(name, numel)
        k = sparse_count(shape, n_live, density, options.min_numel)
        slots.append(_Slot(name, offset, numel, k, n_live if fixed else numel))
        offset += numel
    layout = codec.Layout(sum(s.k for s in slots if s.k is not None),
                          codec.VALUE_DTYPES[options.value_dtype],
                          codec.INDEX_DTYPES[options.index_dtype])
    if layout.index_dtype == torch.int32 and offset >= 2**31:
        raise ConfigError("index_dtype", f"a bucket of {offset} elements needs 'int64'")
    dense_numel = sum(s.live for s in slots if s.k is None)
    sparse_bytes = wire.allgather_bytes(layout.nbytes, world_size)
    if dense_numel:
        # the dense tensors travel in the value dtype beside the allgather (_exchange_sparse)
        sparse_bytes += wire.allreduce_bytes(dense_numel * layout.value_dtype.itemsize,
                                             world_size)
    # The fallback allreduce carries the bucket in the value dtype too, so the break-even
    # density of a bucket of compressed tensors is 2 b_v / (p (b_v + b_i)).
    all_live = sum(s.live for s in slots)
    fallback = sparse_bytes > wire.allreduce_bytes(all_live * layout.value_dtype.itemsize,
                                                   world_size)
    sparse = layout.count > 0 and not (options.dense_fallback and fallback)
    return _Plan(tuple(slots), sparse, layout)


class DGCState(Compressor):
    """Everything ``dgc_hook`` keeps between steps on one rank: the per-tensor memory of
    ``dgc.Compressor``, plus the process group, the plans and the byte counters.

    Args:
        process_group: group to communicate over (default: the default group).
        model / named_parameters: where parameter names come from (pass one).
        momentum, nesterov, weight_decay, **options: as for ``dgc.Compressor``.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None, *, model=None,
                 named_parameters: Iterable[tuple[str, Tensor]] | None = None,
                 momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float | Mapping[str, float] = 0.0, **options):
        build(DGCOptions, options)  # option mistakes first, even without a process group
        if (model is None) == (named_parameters is None):
            raise TypeError("DGCState: pass exactly one of model= or named_parameters=")
        if model is not None:
            named_parameters = getattr(model, "module", model).named_parameters()
        named = list(named_parameters)
        super().__init__(named, world_size=dist.get_world_size(process_group),
                         rank=dist.get_rank(process_group), momentum=momentum,
                         nesterov=nesterov, weight_decay=weight_decay, **options)
        self.process_group = process_group
        # id() only names the tensors DDP hands us; state is keyed by name.
        self._names = {id(p): name for name, p in named}
        self.stats = DGCStats()
        self._plans: dict[tuple, _Plan] = {}  # by bucket composition and live counts

    def _plan(self, bucket: dist.GradBucket, flat: Tensor, masks: Mapping[str, Tensor],
              fixed: bool) -> _Plan:
        params = bucket.parameters()
        try:
            names = tuple(self._names[id(p)] for p in params)
        except KeyError:
            raise ValueError("DGCState: DDP has a parameter that is not among the model's "
                             "named_parameters given to DGCState") from None
        live = {n: self.live_count(n, p.numel(), masks) for n, p in zip(names, params)
                if n in masks}
        density = self.density  # the warm-up's few stages give a few plans per bucket
        key = (names, tuple(sorted(live.items())), fixed, density)
        plan = self._plans.get(key)
        if plan is None:
            plan = make_plan(names, (p.shape for p in params), density, self.world_size,
                             self.options, live, fixed)
            self._plans[key] = plan
            self.stats.density.update(
                (s.name, 1.0 if s.k is None else s.k / s.numel) for s in plan.slots)
        return plan

    def state_dict(self) -> dict:
        return {**super().state_dict(), "stats": dataclasses.asdict(self.stats)}

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
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
    if not isinstance(bucket, dist.GradBucket):
        raise TypeError(f"dgc_hook: {PER_PARAMETER_HOOK}")
    flat = bucket.buffer()
    masks = state.hard_masks()
    fixed = bool(masks) and state.masks.fixed()
    plan = state._plan(bucket, flat, masks, fixed)  # every bucket of a step: one density
    if bucket.is_last():
        state.stats.steps += 1
        state.end_step()
    state.stats.bytes_dense += wire.allreduce_bytes(flat.nbytes, state.world_size)
    if state.options.check_finite and not _finite_on_all_ranks(state, flat):
        state.stats.nonfinite_buckets += 1
        return _allreduce(state, flat).then(lambda _: flat.div_(state.world_size))
    for s in plan.slots:
        g = flat.narrow(0, s.offset, s.numel)
        if s.name in masks:
            state.drop_masked_(s.name, g, masks[s.name])
        state.clip_(g)
    sent = [state.compress(s.name, flat.narrow(0, s.offset, s.numel), s.k)
            for s in plan.compressed]
    positions = {s.name: state.masks.positions(s.name, masks[s.name])
                 for s in plan.slots if s.compact}
    if plan.sparse:
        state.stats.sparse_buckets += 1
        summed = _exchange_sparse(state, plan, flat, sent, positions)
    else:
        state.stats.dense_buckets += 1
        summed = _exchange_dense(state, plan, flat, sent, positions)
    return summed.then(lambda _: _finish(state, plan, bucket, flat))


def _live_entries(flat: Tensor, slots: Iterable[_Slot], positions: Mapping[str, Tensor],
                  dtype: torch.dtype) -> Tensor:
    """The entries of ``slots`` that travel, one after another, in ``dtype``."""
    return torch.cat([gather_live(flat.narrow(0, s.offset, s.numel), positions.get(s.name))
                      for s in slots]).to(dtype)


def _put_back_(flat: Tensor, slots: Iterable[_Slot], positions: Mapping[str, Tensor],
               received: Tensor) -> None:
    offset = 0
    for s in slots:
        scatter_live_(flat.narrow(0, s.offset, s.numel), positions.get(s.name),
                      received.narrow(0, offset, s.live))
        offset += s.live


def _exchange_sparse(state: DGCState, plan: _Plan, flat: Tensor,
                     sent: list[tuple[Tensor, Tensor]],
                     positions: Mapping[str, Tensor]) -> torch.futures.Future:
    """Allreduce the dense tensors and allgather the packed pairs; resolves to ``flat``
    holding the sum over ranks."""
    futures = []
    dense_slots = plan.dense
    if dense_slots:
        # Small and 1-D tensors travel in the value dtype too (as torch's fp16 hook does):
        # at 0.1% density their fp32 bytes would otherwise dominate the message.
        dense = _live_entries(flat, dense_slots, positions,
                              codec.VALUE_DTYPES[state.options.value_dtype])
        futures.append(_allreduce(state, dense))
    # Indices count positions in the bucket, so one scatter covers every tensor.
    indices = torch.cat([i + s.offset for s, (i, _) in zip(plan.compressed, sent)])
    packed = codec.pack(indices, torch.cat([v for _, v in sent]), plan.layout)
    gathered = packed.new_empty(state.world_size * packed.numel())
    futures.append(_allgather(state, gathered, packed))

    def unpack(_) -> Tensor:
        flat.zero_()
        codec.scatter_sum_(flat, *codec.unpack(gathered, plan.layout, state.world_size))
        if dense_slots:
            _put_back_(flat, dense_slots, positions, dense)
        return flat

    return torch.futures.collect_all(futures).then(unpack)


def _exchange_dense(state: DGCState, plan: _Plan, flat: Tensor,
                    sent: list[tuple[Tensor, Tensor]],
                    positions: Mapping[str, Tensor]) -> torch.futures.Future:
    """Same sum as ``_exchange_sparse`` by one allreduce of the bucket in the value dtype, the
    compressed tensors reduced to their selected entries (cheaper when the density is
    high). Under fixed masks only the live entries travel."""
    for s, (indices, values) in zip(plan.compressed, sent):
        flat.narrow(0, s.offset, s.numel).zero_().index_copy_(0, indices, values.to(flat.dtype))
    wire_dtype = plan.layout.value_dtype
    if not positions and wire_dtype == flat.dtype:
        return _allreduce(state, flat)
    live = _live_entries(flat, plan.slots, positions, wire_dtype)
    return _allreduce(state, live).then(lambda _: _put_back_(flat, plan.slots, positions, live))


def _finish(state: DGCState, plan: _Plan, bucket: dist.GradBucket, flat: Tensor) -> Tensor:
    """Average, then add the momentum of the dense tensors and of weight decay."""
    flat.div_(state.world_size)
    for s in plan.dense:
        state.dense_momentum_(s.name, flat.narrow(0, s.offset, s.numel))
    if state.weight_decay:
        # gradients() are views into ``flat`` shaped (and strided) like the parameters.
        for s, p, view in zip(plan.slots, bucket.parameters(), bucket.gradients()):
            update = state.weight_decay_update(s.name, p)
            if update is not None:
                view.add_(update)
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
