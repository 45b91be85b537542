"""What every sparsity method provides to the sparsifier: a rule plus a schedule."""
from __future__ import annotations

import torch
from torch import Tensor, nn


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

    def bind(self, model: nn.Module, selected: dict[str, nn.Parameter]
             ) -> tuple[dict[str, nn.Parameter], dict[str, str]]:
        """The parameters to mask, given the (unwrapped) model and the weights the user
        selected, and why each selected weight left out stays dense. By default: the
        selected weights this method can take. Structured methods also mask the weights
        coupled to the selected ones (the next layer's inputs)."""
        params, skipped = {}, {}
        for name, p in selected.items():
            reason = self.skip_reason(p.shape)
            if reason is None:
                params[name] = p
            else:
                skipped[name] = reason
        return params, skipped

    def regularize(self, step: int) -> None:
        """Add a penalty's gradient to the parameters' gradients before optimizer step
        ``step`` (as if the penalty were part of the loss); most methods have none."""

    def describe(self, masks: dict[str, Tensor]) -> dict:
        """Method-specific figures for ``Sparsifier.report()`` (kept channels, say)."""
        return {}

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
