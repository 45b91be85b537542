"""One rank's DGC memory and selection, per tensor, with no communication.

``Compressor`` owns what Deep Gradient Compression keeps between steps for each parameter,
keyed by name: the momentum ``u``, the accumulated update ``v`` (Lin et al., ICLR 2018,
Sec. 3.2), the weight-decay momentum, the sampled-threshold state and the count of
selections made (which, with the seed, rank and name, picks each sample: no random stream
is shared across tensors), plus the warm-up schedule. Its per-tensor methods are the whole algorithm on one
rank; a transport (``dgc.hook`` for DDP, ``dgc.horovod`` for Horovod) only decides which
tensors go sparse, moves what ``compress`` returns, and sums it.

With a sparsifier attached (``use_sparsifier``), gradients at hard-masked positions are
dropped before they reach ``u`` and ``v``, so a pruned weight is never selected and never
pushed by an old residual; k counts the live entries only.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from dgc import codec, memory
from dgc.options import DGCOptions
from dgc.schedule import DEFAULT_STAGES, PAPER_DENSITIES, sparse_count, stage_densities, \
    warmup_density
from dgc.select import ThresholdState, row_peaks, select_topk, uses_exact_topk
from sparse_comm import draws
from sparse_comm.schema import build
from sparse_train.live import PerMask


class Compressor:
    """Per-parameter DGC state of one rank.

    Args:
        named_parameters: the model's parameters; state is keyed by these names, so it
            survives a bucket rebuild and a restart.
        world_size, rank: where this rank sits (the rank keys the threshold's samples;
            the world size scales local clipping).
        momentum, nesterov: the SGD momentum applied here (``torch.optim.SGD`` semantics,
            dampening 0); the optimizer must then run without momentum.
        weight_decay: a float for all parameters or a mapping name -> float. Weight decay is
            not compressed: ``wd * w`` gets its own momentum on each rank and is added to the
            communicated update, as in the reference DGC SGD.
        **options: the fields of ``dgc.DGCOptions``; a bad one raises ``ConfigError``.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, Tensor]], *, world_size: int,
                 rank: int, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float | Mapping[str, float] = 0.0, **options):
        self.options: DGCOptions = build(DGCOptions, options)
        if momentum < 0 or (nesterov and momentum <= 0):
            raise ValueError(f"DGC: momentum={momentum}, nesterov={nesterov}: momentum "
                             f"must be >= 0, and > 0 for Nesterov")
        named = list(named_parameters)
        self.world_size, self.rank = int(world_size), int(rank)
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        if isinstance(weight_decay, Mapping):
            self.weight_decay = {n: float(wd) for n, wd in weight_decay.items() if wd}
        else:
            self.weight_decay = {n: float(weight_decay) for n, _ in named if weight_decay}
        self.epoch = 0.0
        self.step = 0  # optimizer steps whose gradients went through here (end_step)
        self.total_steps: int | None = None  # the run's length, for warmup_fraction
        self.masks = None  # a sparse_train.live.GradientMasks once use_sparsifier is called
        self._u: dict[str, Tensor] = {}
        self._v: dict[str, Tensor] = {}
        self._wd_u: dict[str, Tensor] = {}
        self._thresholds: dict[str, ThresholdState] = {}
        self._masked_with: PerMask[None] = PerMask()  # masks the memories were cut to
        self._selections: dict[str, int] = {}  # sampled selections made, per name
        self._pieces: dict[str, tuple[int, int]] = {}  # name -> (start, numel) held here
        # names whose u is the momentum of the averaged gradient (dense tensors): the same
        # on every rank, unlike a compressed tensor's local momentum
        self._global_u: set[str] = set()
        self._seeds: dict[str, Tensor] = {}  # momenta to start from (seed_momentum)
        # per name, the last selection's positions and the momentum masking zeroed there
        self._masked_u: dict[str, tuple[Tensor, Tensor]] = {}
        self._piece_counts: PerMask[int] = PerMask()

    # -- schedule -----------------------------------------------------------------------
    @property
    def density(self) -> float:
        """Target density of the current step (warm-up included)."""
        o = self.options
        progress, default_stages = self._warmup_progress()
        stages = stage_densities(o.density, o.warmup_stages or default_stages,
                                 o.warmup_densities)
        return warmup_density(progress, o.density, stages)

    def _warmup_progress(self) -> tuple[float, int]:
        """The fraction of the warm-up done (>= 1 after it), and the number of geometric
        stages its length implies by default."""
        o = self.options
        if o.warmup_steps is not None:
            return (self.step / o.warmup_steps if o.warmup_steps else 1.0), DEFAULT_STAGES
        if o.warmup_fraction is not None:
            if self.total_steps is None:
                raise RuntimeError("DGC: warmup_fraction needs the run's length; call "
                                   "set_total_steps(n) first (the launcher does)")
            length = o.warmup_fraction * self.total_steps
            return (self.step / length if length else 1.0), DEFAULT_STAGES
        epochs = o.warmup_epochs
        if epochs is None:  # one epoch per explicit stage, else the paper's four
            explicit = o.warmup_densities
            epochs = len(explicit) if isinstance(explicit, list) else len(PAPER_DENSITIES)
        return (self.epoch / epochs if epochs else 1.0), max(1, math.ceil(epochs))

    def set_epoch(self, epoch: float) -> None:
        """Move an epoch-length warm-up to ``epoch``; call it on every rank, like a sampler's."""
        self.epoch = float(epoch)

    def set_total_steps(self, total_steps: int) -> None:
        """The run's length in optimizer steps, which ``warmup_fraction`` is a fraction of."""
        self.total_steps = int(total_steps)

    def end_step(self) -> None:
        """Called by the transport once a step's gradients are all through: moves a
        warm-up counted in steps."""
        self.step += 1

    def sparse_k(self, shape: torch.Size, live: int) -> int | None:
        """Entries to send this step from a tensor of ``shape`` with ``live`` unmasked
        entries, or None when it goes dense (``dgc.schedule.sparse_count``)."""
        return sparse_count(shape, live, self.density, self.options.min_numel)

    # -- masks from a sparsifier ----------------------------------------------------------
    def use_sparsifier(self, sparsifier) -> None:
        """Respect ``sparsifier``'s hard masks (a ``sparse_train.Sparsifier``; the same on
        every rank): masked gradients are never accumulated or selected."""
        from sparse_train.live import GradientMasks
        self.masks = GradientMasks(sparsifier)

    def hard_masks(self) -> dict[str, Tensor]:
        """The masks that drop gradients this step, by name (empty without a sparsifier)."""
        return self.masks.hard() if self.masks is not None else {}

    def live_count(self, name: str, numel: int, masks: Mapping[str, Tensor]) -> int:
        mask = masks.get(name)
        return numel if mask is None else self.masks.count(name, mask)

    def piece_live_count(self, name: str, start: int, numel: int,
                         masks: Mapping[str, Tensor]) -> int:
        """Unmasked entries of ``name``'s flat entries ``[start, start + numel)``."""
        mask = masks.get(name)
        if mask is None:
            return numel
        return self._piece_counts.get((name, start, numel), mask, lambda: int(
            mask.reshape(-1).narrow(0, start, numel).sum()))

    def set_piece(self, name: str, start: int, numel: int) -> None:
        """This rank's memory of ``name`` covers only its flat entries ``[start, start +
        numel)`` (the hierarchical topology's piece of the tensor)."""
        self._pieces[name] = (start, numel)

    # -- one tensor's step -----------------------------------------------------------------
    def clip_(self, g: Tensor) -> Tensor:
        """Local gradient clipping at ``clip_norm / sqrt(world_size)`` (paper, Sec. 3.2)."""
        if self.options.clip_norm is not None:
            memory.clip_(g, self.options.clip_norm * self.world_size ** -0.5)
        return g

    def drop_masked_(self, name: str, g: Tensor, mask: Tensor) -> Tensor:
        """Zero flat gradient ``g`` where ``mask`` (the sparsifier's mask of ``name``)
        prunes, so it never reaches the residuals; returns ``g``."""
        sparsifier = self.masks.sparsifier
        sparsifier.mask_(name, g)
        # A newly pruned entry may still hold momentum and residual from before; with g
        # zeroed there from now on, they stay zero until the mask changes again.
        self._masked_with.get(name, mask, lambda: self._mask_memories(name))
        return g

    def _mask_memories(self, name: str) -> None:
        sparsifier = self.masks.sparsifier
        for store in (self._u, self._v):
            if name not in store:
                continue
            if name in self._pieces:
                start, numel = self._pieces[name]
                factor = sparsifier.multiplier(name, store[name].dtype).reshape(-1)
                store[name].mul_(factor.narrow(0, start, numel))
            else:
                sparsifier.mask_(name, store[name])

    def compress(self, name: str, g: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Fold flat gradient ``g`` into ``name``'s memory and take out the ``k`` entries to
        send: (positions in ``g``, values in the wire dtype). ``k`` is below ``g.numel()``
        (``sparse_k`` sends a tensor dense otherwise)."""
        assert 1 <= k < g.numel(), (name, k, g.numel())
        self._global_u.discard(name)
        u = self._buffer(self._u, name, g)
        v = self._buffer(self._v, name, g)
        peaks = None
        if uses_exact_topk(g.numel(), k):
            memory.accumulate_(u, v, g, self.momentum, self.nesterov)
        else:
            # Accumulate chunk by chunk while the selection reduces each chunk's row
            # peaks, so v comes from memory once for both.
            peaks = row_peaks(v, lambda part: memory.accumulate_(
                u[part], v[part], g[part], self.momentum, self.nesterov))
        step = self._selections.get(name, 0)
        self._selections[name] = step + 1
        threshold = self._thresholds.setdefault(name, ThresholdState())
        indices, values = select_topk(
            v, k, self.options.sample_ratio, state=threshold, peaks=peaks,
            draw=draws.integer(self.options.seed, self.rank, name, step))
        values = codec.to_wire(values, codec.VALUE_DTYPES[self.options.value_dtype])
        if self.options.momentum_masking:  # kept in case an exchange gives entries back
            self._masked_u[name] = (indices, u.index_select(0, indices))
        memory.mask_(u, v, indices, values, self.options.momentum_masking)
        return indices, values

    def give_back(self, name: str, indices: Tensor, values: Tensor, chosen: Tensor) -> None:
        """Undo ``compress`` for the entries of its ``(indices, values)`` that ``chosen`` (a
        bool mask over them) marks as not applied by the exchange: their values go back into
        the residual ``v`` and the momentum masking zeroed is restored, as if never picked."""
        picked = indices[chosen]
        v = self._v[name]
        v.index_add_(0, picked, values[chosen].to(v.dtype))
        saved = self._masked_u.get(name)
        if saved is not None:
            self._u[name].index_copy_(0, picked, saved[1][chosen])

    def add_to_residual(self, name: str, positions: Tensor, values: Tensor) -> None:
        """Add ``values`` into ``name``'s residual at ``positions`` (an exchange's rounding
        error, kept rather than lost)."""
        self._v[name].index_add_(0, positions, values.to(self._v[name].dtype))

    def dense_momentum_(self, name: str, g: Tensor) -> Tensor:
        """Turn the averaged gradient ``g`` of a dense tensor into its update, in place.
        Momentum comes after averaging, so every rank's buffer agrees."""
        u = self._buffer(self._u, name, g)
        self._global_u.add(name)
        return g.copy_(memory.momentum_step_(u, g, self.momentum, self.nesterov))

    def weight_decay_update(self, name: str, param: Tensor) -> Tensor | None:
        """This step's weight-decay term of ``name`` with its own momentum, or None."""
        wd = self.weight_decay.get(name)
        if not wd:
            return None
        u = self._buffer(self._wd_u, name, param)
        return memory.momentum_step_(u, param.detach() * wd, self.momentum, self.nesterov)

    # -- buffers ----------------------------------------------------------------------------
    def seed_momentum(self, name: str, value: Tensor) -> None:
        """Start ``name``'s momentum ``u`` at ``value`` (the whole tensor; a rank holding a
        piece takes its piece) when it is next used: Adam's frozen-variance mode hands over
        the warm-up's first moment this way."""
        self._seeds[name] = value.detach().reshape(-1).clone()
        self._u.pop(name, None)

    def _buffer(self, store: dict[str, Tensor], name: str, like: Tensor) -> Tensor:
        buf = store.get(name)
        if buf is None and store is self._u and name in self._seeds:
            seed = self._seeds.pop(name)
            piece = self._pieces.get(name)
            part = seed if piece is None else seed.narrow(0, *piece)
            buf = store[name] = part.to(like, copy=True)
        if buf is None:
            buf = store[name] = torch.zeros_like(like)
        elif buf.device != like.device or buf.dtype != like.dtype:
            buf = store[name] = buf.to(like)
        return buf

    # -- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's state (residuals differ per rank: save one file per rank). Tensors are
        references, as in ``Optimizer.state_dict``."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "momentum": dict(self._u),
            "accumulation": dict(self._v),
            "weight_decay_momentum": dict(self._wd_u),
            "thresholds": {n: t.state_dict() for n, t in self._thresholds.items()},
            "selections": dict(self._selections),
            "global_momentum": sorted(self._global_u),
            "pieces": dict(self._pieces),
            "seeds": dict(self._seeds),
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.set_epoch(float(state["epoch"]))
        self.step = int(state["step"])
        self._u = {n: t.clone() for n, t in state["momentum"].items()}
        self._v = {n: t.clone() for n, t in state["accumulation"].items()}
        self._wd_u = {n: t.clone() for n, t in state["weight_decay_momentum"].items()}
        self._thresholds = {}
        for name, sd in state["thresholds"].items():
            self._thresholds[name] = ThresholdState()
            self._thresholds[name].load_state_dict(sd)
        self._masked_with = PerMask()
        self._piece_counts = PerMask()
        self._selections = dict(state["selections"])
        self._global_u = set(state.get("global_momentum", ()))
        self._pieces = dict(state.get("pieces", {}))
        self._seeds = {n: t.clone() for n, t in state.get("seeds", {}).items()}
