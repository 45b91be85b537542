"""Top-k by magnitude with a sampled threshold: exactly k entries, no host sync on CUDA.

DGC (Lin et al., ICLR 2018, section 3 and appendix) avoids a full top-k over the gradient:
it samples a fraction of the entries, takes the top quantile of the sample as a threshold,
keeps the entries above it, and runs an exact top-k only on those candidates. Here every
tensor size on the CUDA path depends on ``numel`` and ``k`` only (``nonzero_static`` into
buffers sized from the sampling statistics), so the device is never waited on, and the
result always has exactly k entries, so collective sizes are the same on every rank.

Contract of ``select_topk(x, k)``: ``indices`` are k *distinct* valid positions of x and
``values == x[indices]``. The call picks a threshold ``t`` from the sample and every entry
with ``|x| > t`` is a candidate. If at least k entries pass ``t`` and they fit the
candidate buffers (sized ``Z`` standard deviations above the expected count), the result
is exactly the top-k of ``|x|`` (ties broken arbitrarily). If fewer than k pass, all of
them are returned and the remaining slots hold the first entries of x that do not pass
(real entries with ``|x| <= t``); if more than the buffers hold pass, the result is the
top-k of the candidates that came first in x. Either way it is still k distinct positions
with their true values, so a caller can scatter-add ``values`` at ``indices`` and zero a
residual at ``indices`` with no special case. Both misses are rare by construction (about
3e-5 each for a random sample of distinct magnitudes) and ``ThresholdState`` steers later
calls away from them. In fp16 or bf16 many entries can share the threshold's magnitude, and
then fewer than k pass far more often (a quarter of the calls for bf16 at 2**17 entries and
k = 13, measured in review): the memory DGC keeps in the parameters' dtype is fp32 for fp32
parameters, where this does not arise. ``x`` must not contain NaN.

How it finds the candidates in about one pass over x: x is viewed as rows of GROUP entries;
each row's peak ``max |x|`` says whether the row holds a candidate; the rows that do are
listed and gathered, and their entries above ``t`` listed again. On CPU (where a host sync
costs nothing) the lists are ``nonzero`` cut to the buffer size instead of ``nonzero_static``
padded to it: the same entries, without the padding's work.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Rows of 32 entries: reductions over rows this long run near memory speed on CPU (shorter
# rows fall onto a much slower reduction kernel), and a row is two cache lines to gather.
GROUP = 32
GROUP_BITS = 5
assert GROUP == 1 << GROUP_BITS
# The threshold's rank in the sample sits Z standard deviations of the rank statistic
# (about sqrt(rank) for a random sample) above the rank of the k-th largest entry, and the
# candidate buffers Z standard deviations above the expected candidate count.
Z = 4.0
# The sample is made large enough that this many sampled entries are expected above the
# k-th largest |x|; fewer widens the margins above (they scale as 1/sqrt).
MIN_SAMPLE_RANK = 64
# Rows per chunk when CPU computes row peaks: 4 MiB of fp32, small enough to stay in cache
# between writing the magnitudes and reducing them, large enough that the per-chunk Python
# overhead stays small (measured best of 2**13..2**17 rows).
CHUNK_ROWS = 1 << 15
# Rows per chunk when the caller also writes x chunk by chunk (``row_peaks``'s ``prepare``):
# three or four tensors' chunks must then stay in cache together (measured best of
# 2**11..2**15 rows with DGC's momentum and accumulation, one and two processes).
PREPARED_CHUNK_ROWS = 1 << 13
# ThresholdState moves the threshold's rank by at most this many doublings either way.
MAX_RANK_DOUBLINGS = 3.0
# Where a plain torch.topk of |x| is as fast (small tensors) or faster (dense selections).
EXACT_BELOW_NUMEL = 1 << 17
EXACT_ABOVE_DENSITY = 0.1
# Tests set this to run the CUDA code path (static shapes, max and min reductions) on CPU.
_FORCE_CUDA_PATH = False
_SAME_SIZE_INT = {torch.float32: torch.int32, torch.float16: torch.int16,
                  torch.bfloat16: torch.int16, torch.float64: torch.int64}


class ThresholdState:
    """Carries the threshold's calibration for one tensor from call to call.

    The threshold is the ``r``-th largest sampled magnitude, ``r`` chosen so that about
    ``target`` entries of x pass it if the sample is representative. A strided sample of
    structured data can be biased, so the state keeps ``rank_shift``, a number of doublings
    of ``r``, and after each call moves it by ``gain`` times the log2 error of the observed
    candidate count. It is a tensor on the data's device: updating it needs no host sync.
    ``last_candidates`` (a 0-d tensor, capped at the candidate buffer) is there to log.

    Args:
        gain: fraction of the observed error corrected per call; 0.5 halves a persistent
            bias every call while averaging out the sample's call-to-call noise.
    """

    def __init__(self, gain: float = 0.5):
        if not 0.0 <= gain <= 1.0:
            raise ValueError(f"ThresholdState: gain must be in [0, 1], got {gain}")
        self.gain = float(gain)
        self.rank_shift: Tensor | None = None
        # Entries that passed the threshold in the last call (capped at the buffer size).
        self.last_candidates: Tensor | None = None

    def state_dict(self) -> dict:
        return {"gain": self.gain, "rank_shift": self.rank_shift,
                "last_candidates": self.last_candidates}

    def load_state_dict(self, state: dict) -> None:
        self.gain = float(state["gain"])
        self.rank_shift = _clone(state["rank_shift"])
        self.last_candidates = _clone(state["last_candidates"])

    def _shift(self, device: torch.device) -> Tensor:
        if self.rank_shift is None:
            self.rank_shift = torch.zeros((), dtype=torch.float32, device=device)
        elif self.rank_shift.device != device:
            self.rank_shift = self.rank_shift.to(device)
        return self.rank_shift

    def _update(self, candidates: Tensor, target: float) -> None:
        error = candidates.clamp(min=1).float().div(target).log2()
        # Out of place, so a state_dict taken earlier keeps its values.
        self.rank_shift = (self._shift(error.device) - self.gain * error).clamp_(
            -MAX_RANK_DOUBLINGS, MAX_RANK_DOUBLINGS)
        self.last_candidates = candidates


def _clone(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().clone()


@dataclass(frozen=True)
class _Plan:
    """Every size the selection of k from numel uses; all are static per (numel, k)."""
    k: int
    rows: int           # full rows of GROUP entries; the rest (the tail) is scanned whole
    sample_rows: int    # rows in the sample
    row_stride: int     # distance between sampled rows
    rank: int           # the threshold's rank among the sampled magnitudes
    capacity: int       # candidate rows, and candidates, that are kept
    target: float       # expected candidates at the threshold


@functools.lru_cache(maxsize=4096)
def _plan(numel: int, k: int, sample_ratio: float) -> _Plan:
    rows = numel // GROUP
    wanted = max(sample_ratio * numel, MIN_SAMPLE_RANK * numel / k)
    row_stride = max(1, rows // max(1, math.ceil(wanted / GROUP)))
    sample_rows = rows // row_stride
    sampled = sample_rows * GROUP
    # Rank r of the sampled magnitudes is passed by about r * numel / sampled entries, with
    # a relative spread of 1 / sqrt(r) (less the finite-population share: none when the
    # sample is all of x); solve r - z sqrt(r) = k * sampled / numel for r.
    z = Z * math.sqrt(max(0.0, 1 - sampled / numel))
    root = z / 2 + math.sqrt(z * z / 4 + k * sampled / numel)
    rank = min(sampled, math.ceil(root * root) + 1)  # + 1: candidates beat t strictly
    target = rank * numel / sampled
    capacity = min(numel, max(k, math.ceil(target * (1 + z / math.sqrt(rank)))))
    return _Plan(k=k, rows=rows, sample_rows=sample_rows, row_stride=row_stride, rank=rank,
                 capacity=capacity, target=target)


def uses_exact_topk(numel: int, k: int) -> bool:
    """Whether ``select_topk`` runs a plain ``torch.topk`` for this size (it is as fast or
    faster there)."""
    return numel < EXACT_BELOW_NUMEL or k > EXACT_ABOVE_DENSITY * numel


@torch.no_grad()
def select_topk(x: Tensor, k: int, sample_ratio: float = 0.01, *,
                state: ThresholdState | None = None,
                draw: int | None = None,
                peaks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Pick k entries of ``x`` of largest magnitude; see the module docstring for guarantees.

    Args:
        x: 1-D contiguous floating tensor (fp32, fp16 or bf16), free of NaN.
        k: entries to return, ``1 <= k <= x.numel()``.
        sample_ratio: fraction of x sampled for the threshold, in whole rows of GROUP
            entries; raised where needed so that ``MIN_SAMPLE_RANK`` sampled entries are
            expected above the k-th largest.
        state: per-tensor calibration carried across calls; optional.
        draw: a non-negative integer that picks the sample's offset (``draw %
            row_stride``), e.g. ``sparse_comm.draws.integer(seed, rank, name, step)``;
            without it the sample starts at row 0 every call. A plain int, so choosing
            the offset reads nothing from the device.
        peaks: ``row_peaks(x)`` if the caller has it already (it then saves a pass over x).

    Returns:
        ``(indices, values)``: int64 ``[k]`` distinct positions and ``x[indices]`` (signed,
        x's dtype), in no particular order.
    """
    _check(x, k, sample_ratio)
    if uses_exact_topk(x.numel(), k):
        indices = torch.topk(x.abs(), k, sorted=False).indices
        return indices, x.index_select(0, indices)
    plan = _plan(x.numel(), k, sample_ratio)
    threshold = _threshold(_sample(x, plan, draw), plan, state)
    positions, magnitudes, used = _candidates(x, threshold, plan, peaks)
    if state is not None:
        state._update(used.sum(), plan.target)
    best = torch.topk(magnitudes, k, sorted=False).indices
    indices = _fill_empty(positions.index_select(0, best), used.index_select(0, best),
                          x[:k].abs() <= threshold)
    return indices, x.index_select(0, indices)


def _check(x: Tensor, k: int, sample_ratio: float) -> None:
    if x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"select_topk: x must be 1-D and contiguous, got shape "
                         f"{tuple(x.shape)} with strides {x.stride()}")
    if not x.is_floating_point():
        raise ValueError(f"select_topk: x must be floating point, got {x.dtype}")
    if not 1 <= k <= x.numel():
        raise ValueError(f"select_topk: k must be in [1, {x.numel()}], got {k}")
    if not 0.0 < sample_ratio <= 1.0:
        raise ValueError(f"select_topk: sample_ratio must be in (0, 1], got {sample_ratio}")


def _sample(x: Tensor, plan: _Plan, draw: int | None) -> Tensor:
    """Magnitudes of every ``row_stride``-th row of GROUP entries, from the row offset
    ``draw`` picks. Whole rows are read, so the sample touches few cache lines."""
    grid = x[: plan.sample_rows * plan.row_stride * GROUP].view(
        plan.sample_rows, plan.row_stride, GROUP)
    offset = 0 if draw is None else draw % plan.row_stride
    return grid[:, offset].abs()


def _largest(sample: Tensor, count: int) -> Tensor:
    """The ``count`` largest entries of a (rows, GROUP) tensor, unordered. They all lie in
    the ``count`` rows with the largest maxima (a row outside those has ``count`` rows
    above it, each holding an entry at least as large), so only those rows are ranked."""
    if count < sample.shape[0]:
        peaks = sample.view(_SAME_SIZE_INT[sample.dtype]).amax(1)
        sample = sample.index_select(0, peaks.topk(count, sorted=False).indices)
    return sample.view(-1).topk(count, sorted=False).values


def _threshold(sample: Tensor, plan: _Plan, state: ThresholdState | None) -> Tensor:
    """The ``rank``-th largest sampled magnitude (0-d, x's dtype); with a state, the rank is
    moved by ``rank_shift`` doublings, reading the threshold off a power law through the
    ranks ``rank`` and ``2 * rank``, which needs no sort."""
    if state is None or plan.row_stride == 1:
        # A sample of every row is x itself (bar the tail, which is scanned whole): its
        # rank-th largest is the exact threshold, and a calibration shift could only push
        # more candidates than the buffers hold (rank k + 1, capacity k + 1).
        return _largest(sample, plan.rank).min()
    deeper = min(sample.numel(), 2 * plan.rank)
    top = _largest(sample, deeper).float()
    at_rank = top.kthvalue(deeper - plan.rank + 1).values
    if deeper == plan.rank:
        return at_rank.to(sample.dtype)
    # Per doubling of the rank the threshold falls by ``ratio`` (1 for a flat sample).
    doublings = math.log2(deeper / plan.rank)
    ratio = torch.where(at_rank > 0, top.min() / at_rank, 1.0).pow_(1 / doublings)
    shifted = at_rank * ratio.clamp_(0.25, 1.0).pow_(state._shift(sample.device))
    return shifted.to(sample.dtype)


def _candidates(x: Tensor, threshold: Tensor, plan: _Plan, peaks: Tensor | None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Up to ``capacity`` entries with ``|x| > threshold``, then the tail's entries, padded
    to at least k slots: positions (valid even where unused), magnitudes (-inf where unused)
    and a mask of the used slots."""
    body = x[: plan.rows * GROUP].view(plan.rows, GROUP)
    if peaks is None:
        peaks = _row_peaks(body)
    rows = _nonzero(peaks > threshold, plan.capacity)
    # Padding comes last and points past the end, so the real rows come first; clamped,
    # the padding gathers copies of the last row, whose entries only ever land after every
    # real entry, where ``used`` masks them.
    real_entries = (rows < plan.rows).sum() * GROUP
    rows.clamp_(max=plan.rows - 1)
    magnitudes = body.index_select(0, rows).abs_().view(-1)
    slots = _nonzero(magnitudes > threshold, plan.capacity)
    used = slots < real_entries
    slots.clamp_(max=max(0, magnitudes.numel() - 1))
    positions = rows.index_select(0, slots >> GROUP_BITS).mul_(GROUP).add_(slots & GROUP - 1)
    magnitudes = magnitudes.index_select(0, slots).masked_fill_(used.logical_not(), -math.inf)
    tail_start = plan.rows * GROUP
    tail_magnitudes = x[tail_start:].abs()
    tail_used = tail_magnitudes > threshold
    tail_magnitudes.masked_fill_(tail_used.logical_not(), -math.inf)
    # The CPU path's lists are not padded, so they can hold fewer than k slots.
    short = max(0, plan.k - used.numel() - tail_used.numel())
    return (torch.cat([positions, torch.arange(tail_start, x.numel(), device=x.device),
                       positions.new_zeros(short)]),
            torch.cat([magnitudes, tail_magnitudes, magnitudes.new_full((short,), -math.inf)]),
            torch.cat([used, tail_used, used.new_zeros(short)]))


def row_peaks(x: Tensor, prepare: Callable[[slice], None] | None = None) -> Tensor:
    """``max |x|`` of each full row of GROUP entries of 1-D ``x``, for ``select_topk``'s
    ``peaks``.

    ``prepare(part)``, if given, is called on consecutive slices of x that cover all of it
    (the tail after the last full row included), each just before its rows are reduced, so
    the caller can write that part of x while it is in cache: DGC accumulates its residual
    this way, and the selection then reads nothing from memory a second time. On CPU only;
    elsewhere ``prepare`` runs once on the whole of x, then the peaks are reduced."""
    rows = x.numel() // GROUP
    body = x[: rows * GROUP].view(rows, GROUP)
    if prepare is None:
        return _row_peaks(body)
    if x.device.type != "cpu" or _FORCE_CUDA_PATH:
        prepare(slice(0, x.numel()))
        return _row_peaks(body)
    return _row_peaks(body, prepare, PREPARED_CHUNK_ROWS, x.numel())


def _row_peaks(body: Tensor, prepare: Callable[[slice], None] | None = None,
               chunk_rows: int = CHUNK_ROWS, numel: int = 0) -> Tensor:
    """``max |x|`` of each row. On CPU the rows' magnitudes are written chunk by chunk into
    a cache-sized scratch buffer and reduced from there: one pass over memory, where a max
    and a min would take two. The reduction reads the magnitudes as integers (same order
    for non-negative floats), whose max kernel is the faster one. Elsewhere the max and the
    min are reduced separately: two reads of x and no write of its size."""
    if body.device.type != "cpu" or _FORCE_CUDA_PATH:
        return torch.maximum(body.amax(1), body.amin(1).neg_())
    bits = _SAME_SIZE_INT[body.dtype]
    rows = body.shape[0]
    peaks = body.new_empty(rows)
    scratch = body.new_empty(min(rows, chunk_rows), GROUP)
    for start in range(0, rows, chunk_rows):
        stop = min(rows, start + chunk_rows)
        if prepare is not None:  # the last chunk takes the tail too
            prepare(slice(start * GROUP, stop * GROUP if stop < rows else numel))
        part = scratch[: stop - start]
        torch.abs(body[start:stop], out=part)
        torch.amax(part.view(bits), 1, out=peaks[start:stop].view(bits))
    if prepare is not None and rows == 0:
        prepare(slice(0, numel))
    return peaks


def _nonzero(mask: Tensor, size: int) -> Tensor:
    """Positions of the first ``size`` True entries of a 1-D mask. Off CPU it is
    ``nonzero_static``, padded with ``len(mask)`` to exactly ``size`` and free of host
    sync; on CPU, where a sync costs nothing and nonzero_static is the slower kernel, it
    is ``nonzero`` cut to ``size``, unpadded. Callers handle both alike."""
    if mask.device.type == "cpu" and not _FORCE_CUDA_PATH:
        return mask.nonzero().view(-1)[:size]
    return torch.nonzero_static(mask, size=size, fill_value=mask.numel()).view(-1)


def _fill_empty(chosen: Tensor, used: Tensor, fillable: Tensor) -> Tensor:
    """Replace the unused slots of ``chosen``, in order, by positions where ``fillable``
    (entries among the first k that do not pass the threshold, so never chosen already).
    A slot is unused only when every candidate was kept and there are fewer than k, so
    at most that many of the first k are candidates: there are always enough."""
    empty = used.logical_not()
    fill = torch.nonzero_static(fillable, size=fillable.numel(), fill_value=0).view(-1)
    order = empty.cumsum(0).sub_(1).clamp_(min=0)
    return torch.where(empty, fill.index_select(0, order), chosen)
