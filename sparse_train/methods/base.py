"""What every sparsity method provides to the sparsifier: a rule plus a schedule."""
from __future__ import annotations

import torch
from torch import Tensor


class Method:
    """A mask rule (from ``sparse_train.masks``) and the schedule that says when to use it.

    The sparsifier calls :meth:`update` at attach (step 0) and after every optimizer step,
    with ``step`` the number of optimizer steps taken so far. ``weights`` are the values the
    rule should look at (the dense weights for a soft method) and ``masks`` the current
    masks. Whatever a method returns must depend only on these arguments and on state it
    serialises, so that every rank of a DDP job computes the same masks.
    """

    def skip_reason(self, shape: torch.Size) -> str | None:
        """Why a weight of ``shape`` must stay dense under this method, or None."""
        return None

    def update(self, step: int, weights: dict[str, Tensor], masks: dict[str, Tensor]
               ) -> dict[str, Tensor] | None:
        """New masks for the layers that change at ``step``; None when none change."""
        raise NotImplementedError

    def soft(self, step: int) -> bool:
        """Whether masked weights keep training (forward with W*mask, update dense W)."""
        return False

    def fixed(self, step: int) -> bool:
        """Whether the masks in force at ``step`` are settled (see Sparsifier.fixed_masks)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def all_kept(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Masks that keep everything, for dense phases."""
    return {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
