"""One DDP bucket's journey through Deep Gradient Compression (Lin et al., ICLR 2018).

``ddp_model.register_comm_hook(state, dgc_hook)`` replaces DDP's averaging allreduce. For each
bucket the hook

1. zeroes gradients that a sparsifier's hard masks prune (``Compressor.drop_masked_``) and
   clips each rank's gradient per tensor (optional, ``memory.clip_``);
2. hands the bucket to its topology (``dgc.transport``): ``flat`` folds each large
   tensor's gradient into its momentum ``u`` and accumulation ``v``, picks the top-k of
   ``|v|`` and exchanges the pairs over all ranks; ``hierarchical`` does that on each
   rank's shard of its node's sum, exchanging across nodes only. Small and 1-D tensors go
   dense. Collectives start from the hook body, in the same order on every rank;
3. in a future callback (local math only): adds the locally kept weight-decay momentum to
   the averaged update.

Under a GradScaler (``DGCState.grad_scale``) all of this runs on the unscaled gradient.

Under Adam's ``frozen_variance`` (``dgc.adam``) the hook only averages while Adam estimates
its variance, and on a variance refresh step it also starts a dense average of the bucket
for the optimizer, before step 2's collectives.

The result is the full SGD update direction, momentum included, so the optimizer runs plain
SGD (momentum 0, weight decay 0) on it; ``dgc.attach`` arranges that. The per-tensor math is
``dgc.Compressor``'s; the collectives are ``dgc.collectives``'.
"""

# No ``from __future__ import annotations``: DDP compares dgc_hook's annotations with the
# real ``dist.GradBucket`` and ``Future[Tensor]`` objects, not strings.
import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from dgc import wire
from dgc.collectives import Group, node_groups
from dgc.compressor import Compressor
from dgc.guards import PER_PARAMETER_HOOK
from dgc.options import DGCOptions
from dgc.plan import Piece, Plan, make_plan, plan_pieces
from dgc.transport import sparse_allreduce, topology
from dgc.transport.hierarchical import Shards, cut
from sparse_comm.schema import ConfigError, build


@dataclass
class DGCStats:
    """Cumulative counters of one rank; bytes are per-rank wire bytes (``dgc.wire``)."""

    steps: int = 0
    bytes_sent: float = 0.0
    """Wire bytes of every tensor this hook handed to a collective."""
    bytes_intra: float = 0.0
    """The part of ``bytes_sent`` on links inside a node."""
    bytes_inter: float = 0.0
    """The part of ``bytes_sent`` on links between nodes."""
    bytes_dense: float = 0.0
    """Wire bytes plain DDP would have sent: one allreduce of each bucket as it is."""
    bytes_dense_tensors: float = 0.0
    """The part of ``bytes_sent`` that carried the tensors a compressed bucket sends whole
    beside its pairs (1-D and small ones: ``dgc.plan``'s dense slots). Under Horovod, where
    each tensor is its own message, every tensor sent whole (all of them while the density
    warm-up sends everything)."""
    sparse_buckets: int = 0
    dense_buckets: int = 0
    nonfinite_buckets: int = 0
    density: dict[str, float] = field(default_factory=dict)
    """Current fraction of entries sent per step, per parameter name (1.0 for dense ones)."""


@dataclass(frozen=True)
class _Entry:
    name: str
    offset: int
    numel: int
    shape: tuple[int, ...]


class DGCState(Compressor):
    """Everything ``dgc_hook`` keeps between steps on one rank: the per-tensor memory of
    ``dgc.Compressor``, plus the process groups, the plans and the byte counters.

    Args:
        process_group: group to communicate over (default: the default group; the
            hierarchical topology needs the default group).
        model / named_parameters: where parameter names come from (pass one).
        momentum, nesterov, weight_decay, **options: as for ``dgc.Compressor``; options
            include ``topology`` and ``ranks_per_node`` (``dgc.DGCOptions``).
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None, *, model=None,
                 named_parameters: Iterable[tuple[str, Tensor]] | None = None,
                 momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float | Mapping[str, float] = 0.0, **options):
        opts = build(DGCOptions, options)  # option mistakes first, even without a group
        if (model is None) == (named_parameters is None):
            raise TypeError("DGCState: pass exactly one of model= or named_parameters=")
        if model is not None:
            named_parameters = getattr(model, "module", model).named_parameters()
        named = list(named_parameters)
        world_size, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        super().__init__(named, world_size=world_size, rank=rank, momentum=momentum,
                         nesterov=nesterov, weight_decay=weight_decay, **options)
        self.process_group = process_group
        # id() only names the tensors DDP hands us; state is keyed by name.
        self._names = {id(p): name for name, p in named}
        self.stats = DGCStats()
        self.ranks_per_node = _ranks_per_node(
            opts, world_size, process_group is None or process_group == dist.group.WORLD)
        nodes = world_size // self.ranks_per_node
        self.world = Group(process_group, world_size, "world", self, nodes)
        if opts.topology == "hierarchical":
            if process_group is not None and process_group != dist.group.WORLD:
                raise ConfigError("topology", "'hierarchical' runs on the default process "
                                              "group")
            self.intra, self.inter = node_groups(self, self.ranks_per_node, nodes)
        exchanged = nodes if opts.topology == "hierarchical" else world_size
        if opts.exchange == "gtopk" and exchanged & (exchanged - 1):
            raise ConfigError("exchange", f"'gtopk' needs a power of two ranks to exchange "
                                          f"over, got {exchanged}")
        if (opts.topology == "flat" and opts.exchange in ("gtopk", "auto") and nodes > 1
                and self.ranks_per_node > 1 and not world_size & (world_size - 1)
                and (process_group is None or process_group == dist.group.WORLD)):
            # gtopk's rounds across nodes split each swap over the node's ranks
            self.world.intra, _ = node_groups(self, self.ranks_per_node, nodes)
        self._run = topology(opts)
        # Set by an Adam controller (dgc.adam) while it lets Adam estimate its variance: the
        # hook then only averages, densely, and DGC's memory is untouched.
        self.passthrough = False
        self.adam = None
        # The loss scale the gradients arrive with (a GradScaler's; set by the training
        # loop before each backward). The hook divides it out first, so momentum, residuals,
        # clipping and the wire all see unscaled gradients (a change of scale touches no
        # memory, and fp16 values do not overflow at a scale of 2**16), and multiplies the
        # update by it again last, for the scaler to unscale. A power of two, as a
        # GradScaler's always is, leaves the bits as they would be without it.
        self.grad_scale = 1.0
        self._entries: dict[tuple[int, ...], tuple[_Entry, ...]] = {}
        self._shards: dict[tuple[str, ...], Shards] = {}
        self._plans: dict[tuple, Plan] = {}  # by bucket composition, live counts, density
        # the sparse allreduce's regions per tensor name: (boundaries, step set)
        self._regions: dict[str, tuple[list[int], int]] = {}

    def use_sparsifier(self, sparsifier) -> None:
        # DDP's bucket holds a gradient in its parameter's memory order (NHWC for
        # channels_last); the masks index the logical order.
        for name, p in sparsifier.params.items():
            if not p.is_contiguous():
                raise ValueError(f"dgc: the sparsifier masks {name}, which is not contiguous "
                                 f"(channels_last?); DGC with a sparsifier needs the default "
                                 f"memory format")
        super().use_sparsifier(sparsifier)

    # -- what the topologies ask ----------------------------------------------------------
    def entries(self, bucket: dist.GradBucket) -> tuple[_Entry, ...]:
        """The bucket's tensors: name, offset in its flat buffer, numel, shape."""
        params = bucket.parameters()
        key = tuple(id(p) for p in params)
        found = self._entries.get(key)
        if found is None:
            try:
                names = [self._names[id(p)] for p in params]
            except KeyError:
                raise ValueError("DGCState: DDP has a parameter that is not among the "
                                 "model's named_parameters given to DGCState") from None
            offsets = [0]
            for p in params:
                offsets.append(offsets[-1] + p.numel())
            found = self._entries[key] = tuple(
                _Entry(n, o, p.numel(), tuple(p.shape)) for n, o, p in zip(names, offsets, params))
        return found

    def bucket_plan(self, bucket: dist.GradBucket, masks: Mapping[str, Tensor],
                    fixed: bool) -> Plan:
        """The flat topology's plan: whole tensors over the world."""
        entries = self.entries(bucket)
        live = {e.name: self.live_count(e.name, e.numel, masks) for e in entries
                if e.name in masks}
        density = self.density  # the warm-up's few stages give a few plans per bucket
        key = (tuple(e.name for e in entries), tuple(sorted(live.items())), fixed, density)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = make_plan(
                [e.name for e in entries], [e.shape for e in entries], density,
                self.world_size, self.options, live, fixed)
        return plan

    def shards_of(self, bucket: dist.GradBucket, device: torch.device) -> Shards:
        """How the hierarchical topology cuts this bucket, seen from this rank."""
        entries = self.entries(bucket)
        key = tuple(e.name for e in entries)
        shards = self._shards.get(key)
        if shards is None or shards.dest.device != device:
            shards = self._shards[key] = cut(key, [e.numel for e in entries],
                                             self.ranks_per_node,
                                             self.rank % self.ranks_per_node, device)
            for piece in shards.pieces:
                self.set_piece(piece.name, piece.start, piece.numel)
        return shards

    def shard_plan(self, bucket: dist.GradBucket, shards: Shards,
                   masks: Mapping[str, Tensor]) -> Plan:
        """The hierarchical topology's plan: this rank's pieces over the inter-node group."""
        shapes = {e.name: e.shape for e in self.entries(bucket)}
        pieces = [Piece(p.name, shapes[p.name], p.numel,
                        self.piece_live_count(p.name, p.start, p.numel, masks))
                  for p in shards.pieces]
        density = self.density
        key = (tuple((p.name, p.live) for p in pieces), density, "shard")
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = plan_pieces(pieces, density, self.inter.size,
                                                  self.options)
        return plan

    def regions(self, group: Group, slots, index_lists: list[Tensor]) -> list[list[int]]:
        """The sparse allreduce's region boundaries of each of ``slots`` (by tensor name):
        set at a tensor's first step and every ``REBALANCE_STEPS`` steps from where
        ``index_lists`` fall (one collective for the bucket; the same steps on every rank
        whatever the bucket's layout), kept in between."""
        stale = [j for j, s in enumerate(slots)
                 if s.name not in self._regions or self._regions[s.name][0][-1] != s.numel
                 or len(self._regions[s.name][0]) != group.size + 1  # another world size
                 or self.step - self._regions[s.name][1] >= sparse_allreduce.REBALANCE_STEPS]
        if stale:
            fresh = sparse_allreduce.rebalanced([index_lists[j] for j in stale],
                                                [slots[j].numel for j in stale], group.size,
                                                group)
            for j, bounds in zip(stale, fresh):
                self._regions[slots[j].name] = (bounds, self.step)
        return [self._regions[s.name][0] for s in slots]

    def count_bucket(self, plan: Plan) -> None:
        if plan.sparse:
            self.stats.sparse_buckets += 1
        else:
            self.stats.dense_buckets += 1
        self.stats.density.update(
            (s.name, 1.0 if s.k is None else s.k / s.numel) for s in plan.slots)

    # -- checkpoints and read-outs -----------------------------------------------------------
    def state_dict(self) -> dict:
        state = {**super().state_dict(), "stats": dataclasses.asdict(self.stats),
                 "regions": dict(self._regions)}
        if self.adam is not None:
            state["adam"] = self.adam.state_dict()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.stats = DGCStats(**state["stats"])
        self._plans = {}
        self._regions = {name: (list(bounds), step)
                         for name, (bounds, step) in state.get("regions", {}).items()}
        if self.adam is not None and "adam" in state:
            self.adam.load_state_dict(state["adam"])

    def compression_stats(self) -> dict[str, float]:
        s = self.stats
        return {"steps": s.steps, "density": self.density, "bytes_sent": s.bytes_sent,
                "bytes_intra_node": s.bytes_intra, "bytes_inter_node": s.bytes_inter,
                "bytes_dense": s.bytes_dense, "bytes_dense_tensors": s.bytes_dense_tensors,
                "compression_ratio": s.bytes_dense / s.bytes_sent if s.bytes_sent else 1.0,
                "sparse_buckets": s.sparse_buckets, "dense_buckets": s.dense_buckets,
                "nonfinite_buckets": s.nonfinite_buckets}


def _ranks_per_node(options: DGCOptions, world_size: int, whole_world: bool) -> int:
    r = options.ranks_per_node
    if r is None:  # the launcher's count is of the job's ranks, not of a subgroup's
        r = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) if whole_world else 1
    if r < 1:
        raise ConfigError("ranks_per_node", f"must be at least 1, got {r}")
    if world_size % r:
        raise ConfigError("ranks_per_node", f"{r} ranks per node do not divide the world "
                                            f"size {world_size} into whole nodes")
    return r


def dgc_hook(state: DGCState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: compress, exchange and average one bucket (see module doc)."""
    if not isinstance(bucket, dist.GradBucket):
        raise TypeError(f"dgc_hook: {PER_PARAMETER_HOOK}")
    flat = bucket.buffer()
    masks = state.hard_masks()
    fixed = bool(masks) and state.masks.fixed()
    state.stats.bytes_dense += wire.allreduce_bytes(flat.nbytes, state.world_size)
    if state.passthrough:  # Adam estimating its variance (dgc.adam): plain averaging
        _end_of_step(state, bucket)
        return state.world.allreduce(flat).then(lambda _: flat.div_(state.world_size))
    if state.options.check_finite and not _finite_on_all_ranks(state, flat):
        state.stats.nonfinite_buckets += 1
        _end_of_step(state, bucket)
        return state.world.allreduce(flat).then(lambda _: flat.div_(state.world_size))
    scale = state.grad_scale
    if scale != 1.0:
        flat.div_(scale)
    for e in state.entries(bucket):
        g = flat.narrow(0, e.offset, e.numel)
        if e.name in masks:
            state.drop_masked_(e.name, g, masks[e.name])
        state.clip_(g)
    if state.adam is not None:
        if state.adam.refresh_due():
            _average_for_variance(state, bucket, flat)
        if state.adam.preconditions:  # rank entries by Adam's step (dgc.adam)
            for e in state.entries(bucket):
                state.adam.precondition_(e.name, flat.narrow(0, e.offset, e.numel))
    averaged = state._run(state, bucket, flat, masks, fixed)
    _end_of_step(state, bucket)  # after the plans read this step's density
    return averaged.then(lambda _: _finish(state, bucket, flat, scale))


def _end_of_step(state: DGCState, bucket: dist.GradBucket) -> None:
    if bucket.is_last():
        state.stats.steps += 1
        state.end_step()


def _average_for_variance(state: DGCState, bucket: dist.GradBucket, flat: Tensor) -> None:
    """A refresh step of Adam's frozen variance (``dgc.adam``): the gradient also averaged
    densely, unscaled; the optimizer's step waits for it."""
    averaged = flat.div(state.world_size)  # flat is unscaled by now
    state.adam.pending.append(state.world.allreduce(averaged))
    for e in state.entries(bucket):
        state.adam.refreshed[e.name] = averaged.narrow(0, e.offset, e.numel)


def _finish(state: DGCState, bucket: dist.GradBucket, flat: Tensor, scale: float) -> Tensor:
    """The averaged update with each tensor's weight-decay term, in the loss scale the
    gradients came in."""
    _add_weight_decay(state, bucket, flat)
    return flat.mul_(scale) if scale != 1.0 else flat


def _add_weight_decay(state: DGCState, bucket: dist.GradBucket, flat: Tensor) -> Tensor:
    """Add each tensor's weight-decay term, with its own momentum, to the update."""
    if state.weight_decay:
        precondition = state.adam is not None and state.adam.preconditions
        # gradients() are views into ``flat`` shaped (and strided) like the parameters.
        for e, p, view in zip(state.entries(bucket), bucket.parameters(), bucket.gradients()):
            update = state.weight_decay_update(e.name, p)
            if update is not None and precondition:
                update = state.adam.precondition_(e.name, update.clone())
            if update is not None:
                view.add_(update)
    return flat


def _finite_on_all_ranks(state: DGCState, flat: Tensor) -> bool:
    bad = torch.isfinite(flat).all().logical_not().to(torch.float32).reshape(1)
    state.world.allreduce(bad, op=dist.ReduceOp.MAX).wait()
    return bad.item() == 0  # the one host sync, only with check_finite
