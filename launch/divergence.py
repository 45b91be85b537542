"""Watching for a non-finite loss or gradient without a host synchronisation per step.

``train.on_nonfinite: stop`` (the default) notes, on the device, the first step whose loss or
gradient norm is not finite and reads that note only at log and checkpoint steps, agreed
over the ranks there; the launcher then stops with one line naming the step and exit status
3, before any checkpoint could take the non-finite weights. ``skip`` drops such steps (the
same steps on every rank) and counts them; deciding a step's fate needs its flag on the
host and agreed, so skip costs one tiny allreduce and one host read per step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

_NONE = 2 ** 62  # "no bad step yet"


class Diverged(Exception):
    def __init__(self, step: int):
        self.step = step
        super().__init__(f"non-finite loss or gradient at step {step}")


class NonFiniteGuard:
    def __init__(self, mode: str, device: torch.device, gradients: bool = True):
        self.mode, self.gradients = mode, gradients
        self.first_bad = torch.full((), _NONE, dtype=torch.int64, device=device)
        self.skipped = 0

    def _bad(self, loss: Tensor, model: nn.Module) -> Tensor:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = torch.isfinite(loss.detach())
        if grads and self.gradients:
            norms = torch.stack(torch._foreach_norm(grads))
            finite = finite & torch.isfinite(norms).all()
        return finite.logical_not()

    def should_skip(self, step: int, loss: Tensor, model: nn.Module) -> bool:
        """Call after backward, before the optimizer step. Notes a bad step; in skip mode
        returns whether to skip it (agreed over the ranks)."""
        bad = self._bad(loss, model)
        if self.mode == "skip":
            flag = bad.to(torch.int32).reshape(1)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item():
                self.skipped += 1
                return True
            return False
        self.first_bad = torch.where(bad & (self.first_bad == _NONE),
                                     torch.tensor(step, device=bad.device), self.first_bad)
        return False

    def check(self) -> None:
        """Raise Diverged if any rank saw a bad step (stop mode); a collective: call it on
        every rank at the same steps."""
        if self.mode != "stop":
            return
        first = self.first_bad.reshape(1).clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        if first.item() != _NONE:
            raise Diverged(int(first.item()))
