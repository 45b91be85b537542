"""A sparsifier's masks as a gradient exchange sees them: which entries are live, and where.

A communication hook (``dgc_hook``, the launcher's allreduce) asks ``GradientMasks`` once per
bucket. ``hard()`` names the masks whose masked gradients may be dropped: under the
``"drop"`` policy a masked gradient is zeroed before the optimizer step anyway, so DGC must
not accumulate it into its residuals (they would later push a pruned weight). ``fixed()``
says the masks are settled and identical on every rank, so a receiver can put values back
where they belong without indices: the live entries alone go on the wire.

Counts and positions are recomputed only when a mask changes (a new tensor or an in-place
write), so a fixed mask costs one host sync per change, not one per step.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from torch import Tensor

T = TypeVar("T")


class PerMask(Generic[T]):
    """Values made from masks, each made again only when its mask changes: a new tensor, or
    an in-place write (which moves the tensor's ``_version``)."""

    def __init__(self):
        # key -> (mask, its version, value); the mask is held so that an identity check
        # cannot match a recycled id
        self._entries: dict[Hashable, tuple[Tensor, int, T]] = {}

    def get(self, key: Hashable, mask: Tensor, make: Callable[[], T]) -> T:
        """The value under ``key`` for ``mask``; ``make()`` it if ``mask`` is new or changed."""
        entry = self._entries.get(key)
        if entry is None or entry[0] is not mask or entry[1] != mask._version:
            entry = self._entries[key] = (mask, mask._version, make())
        return entry[2]


@dataclass
class _Live:
    count: int
    positions: Tensor | None = None  # flat indices of the live entries, made on first use


class GradientMasks:
    """Read-outs of ``sparsifier`` (a ``sparse_train.Sparsifier``) for one hook."""

    def __init__(self, sparsifier):
        self.sparsifier = sparsifier
        self._live: PerMask[_Live] = PerMask()

    def hard(self) -> dict[str, Tensor]:
        """Masks that drop gradients now, by parameter name; empty while the method needs
        gradients at masked positions (dynamic network surgery splicing)."""
        if self.sparsifier.grad_mask_policy != "drop":
            return {}
        return {name: mask for name, mask in self.sparsifier.masks.items()
                if self.count(name, mask) < mask.numel()}

    def fixed(self) -> bool:
        """Whether the hard masks are settled, so only live entries need to travel."""
        return (self.sparsifier.grad_mask_policy == "drop"
                and self.sparsifier.fixed_masks() is not None)

    def count(self, name: str, mask: Tensor) -> int:
        return self._entry(name, mask).count

    def positions(self, name: str, mask: Tensor) -> Tensor:
        """Flat indices of ``mask``'s live entries, ascending (the order both ends agree on)."""
        entry = self._entry(name, mask)
        if entry.positions is None:
            entry.positions = mask.reshape(-1).nonzero().squeeze(1)
        return entry.positions

    def live_positions(self, name: str) -> Tensor | None:
        """What of ``name``'s flat gradient travels: the positions of its live entries under
        fixed masks; None while all of it does (masks not settled, or ``name`` unmasked)."""
        if not self.fixed():
            return None
        mask = self.sparsifier.masks.get(name)
        if mask is None or self.count(name, mask) == mask.numel():
            return None
        return self.positions(name, mask)

    def _entry(self, name: str, mask: Tensor) -> _Live:
        return self._live.get(name, mask, lambda: _Live(int(mask.sum())))


def gather_live(t: Tensor, positions: Tensor | None) -> Tensor:
    """The live entries of flat ``t`` (all of it when ``positions`` is None)."""
    return t if positions is None else t.index_select(0, positions)


def scatter_live_(t: Tensor, positions: Tensor | None, values: Tensor) -> Tensor:
    """Write ``values`` back to the live entries of flat ``t`` and zero the rest."""
    if positions is None:
        return t.copy_(values)
    return t.zero_().index_copy_(0, positions, values.to(t.dtype))


__all__ = ["GradientMasks", "PerMask", "gather_live", "scatter_live_"]
