"""DGC for Adam and AdamW: which moment is compressed, and when.

Adam divides its first moment by the square root of its second, which is not linear in the
gradient, so error feedback on raw gradients hands Adam gradients whose squares no longer
estimate its variance: an entry sent rarely arrives carrying many steps' worth at once. On
BERT that diverges (1-bit Adam, Tang et al., ICML 2021, Sec. 3). Two modes:

``frozen_variance`` (1-bit Adam's scheme, Tang et al. 2021; 0/1 Adam, Lu et al. 2022): for
``adam_warmup_steps`` steps the hook averages gradients densely and the optimizer runs its
own Adam, estimating the second moment. Then the second moment (and its bias correction)
is frozen and the first moment is what DGC compresses. Adam's ``m <- b1 m + (1 - b1) g`` is
``(1 - b1)`` times the heavy-ball momentum ``u <- b1 u + g`` that DGC's momentum correction
keeps, so DGC runs with momentum ``b1`` (accumulation, selection, momentum masking as for
SGD), each rank's ``u`` starting from the warm-up's ``m / (1 - b1)``, and the step becomes

    p <- p - lr / (1 - b1^t) * (1 - b1) d / (sqrt(v / (1 - b2^T)) + eps)

with ``d`` the averaged compressed momentum, ``v`` and ``T`` the second moment and step
count frozen at the end of the warm-up. One safeguard is this project's, not 1-bit Adam's:
``v`` is floored at ``VARIANCE_FLOOR`` times its tensor's mean. An entry whose gradient was
exactly zero through the warm-up (a dead ReLU unit) has ``v = 0``, and if it comes alive
later its steps would be divided by ``eps`` alone (a 1e-8 denominator: seen to blow a
small MLP up within three steps); with the floor it moves like an entry of typical scale. AdamW's decoupled decay ``p <- p (1 - lr wd)`` is
applied beside it; Adam's L2 term gets DGC's local weight-decay momentum, as with SGD. With
nothing dropped (density 1.0) this is Adam with a frozen variance exactly. Cost: the
warm-up's traffic is dense, and a variance frozen for good does not follow a later change
of the gradients' scale (a learning-rate restart, new data).

``adam_variance_refresh = I`` lets the frozen variance follow: every ``I`` steps after the
freeze the hook also averages the gradient densely (one extra allreduce per bucket; 0/1
Adam, Lu et al. 2022, likewise updates its variance only at chosen steps with a
full-precision gradient), and the variance takes it in as ``I`` Adam steps would have:

    v <- c v + (1 - c) g^2,   c = b2^I,   and its bias correction 1 - b2^T <- 1 - c b2^T

so the estimate keeps Adam's own memory of about ``1 / (1 - b2)`` steps, sampled every
``I``. The momentum path is untouched; the extra traffic is one dense gradient per ``I``
steps.

``adam_selection = "update"`` ranks entries by the step Adam would take with them rather
than by momentum. With the variance frozen, Adam's step is ``(1 - b1) d / D`` with ``D`` a
fixed per-entry denominator, so dividing each rank's gradient by ``D`` before DGC (the hook
does, before its memory) changes nothing that is summed (momentum correction and
accumulation are linear; with nothing dropped the update is the same) but makes the top-k
pick the entries whose accumulated steps are largest. By raw momentum, the default, an entry
that Adam scales up (small variance) waits behind entries that Adam scales down. The
optimizer's step then skips the division. Not with ``adam_variance_refresh`` (``D`` would
change under the memory).

``error_feedback``: top-k of the gradient with a residual (DGC with no momentum), the
optimizer untouched: Adam sees the averaged sparse gradient. Nothing to configure, but the
second moment then comes from sparse, bursty gradients, the failure above.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

ADAM_TYPES = (torch.optim.Adam, torch.optim.AdamW)
VARIANCE_FLOOR = 0.01  # of the tensor's mean frozen variance


def adam_settings(optimizer: torch.optim.Optimizer) -> tuple[float, bool]:
    """(b1, decoupled weight decay) of an Adam or AdamW optimizer, or a one-line error."""
    beta1 = set()
    for i, group in enumerate(optimizer.param_groups):
        if group.get("maximize", False):
            raise ValueError(f"dgc.attach: param group {i} has maximize=True, unsupported")
        if any(optimizer.state.get(p, {}).get("exp_avg") is not None for p in group["params"]):
            raise ValueError("dgc.attach: the optimizer already holds Adam moments; attach "
                             "before the first step")
        beta1.add(float(group["betas"][0]))
    if len(beta1) > 1:
        raise ValueError(f"dgc.attach: param groups differ in betas[0] {sorted(beta1)}; "
                         f"DGC's momentum correction uses one")
    decoupled = isinstance(optimizer, torch.optim.AdamW) or any(
        g.get("decoupled_weight_decay", False) for g in optimizer.param_groups)
    return beta1.pop(), decoupled


class FrozenVariance:
    """Drives ``state`` (a ``dgc.DGCState``) and ``optimizer`` through the warm-up and the
    frozen phase; its state is saved with the DGC state's."""

    def __init__(self, state, optimizer: torch.optim.Optimizer, names: dict[int, str],
                 warmup_steps: int, beta1: float, decoupled: bool, refresh: int = 0,
                 floor: float = VARIANCE_FLOOR, by_update: bool = False):
        self.state, self.optimizer, self.names = state, optimizer, names
        self.warmup_steps, self.beta1, self.decoupled = warmup_steps, beta1, decoupled
        self.refresh, self.floor_fraction, self.by_update = refresh, floor, by_update
        self._denoms: dict[str, Tensor] = {}  # the frozen denominators by name
        self._where = {names[id(p)]: (p, group) for group in optimizer.param_groups
                       for p in group["params"]}
        # this step's densely averaged gradients by name, and the allreduces bringing them
        # (set by the hook on a refresh step, read and cleared before the optimizer's step)
        self.refreshed: dict[str, Tensor] = {}
        self.pending: list[torch.futures.Future] = []
        self.steps = 0
        self.bias2: dict[str, float] = {}  # 1 - b2^T per parameter, T the warm-up's steps
        self.floor: dict[str, float] = {}  # the least frozen variance per parameter
        self.frozen = False
        self._apply_phase()
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)

    def _apply_phase(self) -> None:
        # While Adam estimates its variance, the hook only averages (dense, no memory).
        self.state.passthrough = not self.frozen
        self.state.momentum = self.beta1 if self.frozen else 0.0

    def refresh_due(self) -> bool:
        """Whether the coming step also averages the gradient densely for the variance."""
        return (self.frozen and self.refresh > 0
                and (self.steps + 1 - self.warmup_steps) % self.refresh == 0)

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self.frozen:
            return
        self.steps += 1
        if self.steps >= self.warmup_steps:
            self._freeze()

    @torch.no_grad()
    def _freeze(self) -> None:
        for group in self.optimizer.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                st = self.optimizer.state.get(p)
                if not st:
                    continue
                name = self.names[id(p)]
                self.bias2[name] = 1.0 - beta2 ** float(st["step"])
                self.floor[name] = self.floor_fraction * float(_variance(st, group).mean())
                seed = st["exp_avg"] / (1.0 - self.beta1)
                if self.by_update:
                    seed = seed / self._denominator(name)
                self.state.seed_momentum(name, seed)
        self.frozen = True
        self._apply_phase()

    @property
    def preconditions(self) -> bool:
        """Whether the hook divides gradients by the frozen denominators now."""
        return self.by_update and self.frozen

    def precondition_(self, name: str, g: Tensor) -> Tensor:
        """Divide flat gradient ``g`` of ``name`` by its frozen denominator, in place."""
        return g.div_(self._denominator(name).view_as(g))

    def _denominator(self, name: str) -> Tensor:
        """Adam's ``sqrt(v / (1 - b2^T)) + eps`` from the frozen variance (floored), kept
        until a refresh changes the variance."""
        denom = self._denoms.get(name)
        if denom is None:
            p, group = self._where[name]
            denom = self._denoms[name] = (
                _variance(self.optimizer.state[p], group).clamp(min=self.floor[name]).sqrt_()
                .div_(math.sqrt(self.bias2[name])).add_(group["eps"]))
        return denom

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        """In the frozen phase: apply Adam's update from the hook's averaged momentum ``d``
        (in ``.grad``) and the frozen variance, then clear ``.grad`` so that the optimizer's
        own step leaves the parameter alone."""
        if not self.frozen:
            return
        self.steps += 1
        for future in self.pending:
            future.wait()
        refreshed, self.refreshed, self.pending = self.refreshed, {}, []
        bias1 = 1.0 - self.beta1 ** self.steps
        for group in optimizer.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = optimizer.state[p]
                st["step"] += 1
                name = self.names[id(p)]
                if self.by_update:  # .grad holds d / D already
                    torch.mul(p.grad, self._denominator(name), out=st["exp_avg"])
                    st["exp_avg"].mul_(1.0 - self.beta1)
                else:
                    st["exp_avg"].copy_(p.grad).mul_(1.0 - self.beta1)
                    if name in refreshed:
                        self._take_in(name, refreshed[name].view_as(p), st, group)
                if self.decoupled and wd:
                    p.mul_(1.0 - lr * wd)
                if self.by_update:
                    p.add_(p.grad, alpha=-lr * (1.0 - self.beta1) / bias1)
                else:
                    p.addcdiv_(st["exp_avg"], self._denominator(name), value=-lr / bias1)
                p.grad = None

    def _take_in(self, name: str, g: Tensor, st: dict, group: dict) -> None:
        """The variance's update from a refresh step's averaged gradient ``g`` (module doc)."""
        c = group["betas"][1] ** self.refresh
        st["exp_avg_sq"].mul_(c).addcmul_(g, g, value=1.0 - c)
        if group.get("amsgrad"):
            torch.maximum(st["max_exp_avg_sq"], st["exp_avg_sq"], out=st["max_exp_avg_sq"])
        self.bias2[name] = 1.0 - c * (1.0 - self.bias2[name])
        self.floor[name] = self.floor_fraction * float(_variance(st, group).mean())
        self._denoms.pop(name, None)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "bias2": dict(self.bias2), "floor": dict(self.floor),
                "frozen": self.frozen}

    def load_state_dict(self, saved: dict) -> None:
        self.steps, self.frozen = int(saved["steps"]), bool(saved["frozen"])
        self.bias2, self.floor = dict(saved["bias2"]), dict(saved["floor"])
        self._denoms = {}
        self._apply_phase()


def _variance(st: dict, group: dict) -> Tensor:
    """The second moment Adam divides by: AMSGrad's running maximum, or the plain one."""
    return st["max_exp_avg_sq"] if group.get("amsgrad") else st["exp_avg_sq"]


def seed_tensor(seed: Tensor, piece: tuple[int, int] | None) -> Tensor:
    """A seeded momentum, cut to the piece a rank holds (hierarchical DGC)."""
    flat = seed.reshape(-1)
    return flat if piece is None else flat.narrow(0, *piece)
