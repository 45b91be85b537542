"""Bind a sparsity method's masks to a model through its optimizer's step hooks.

Between optimizer steps every selected parameter holds ``W * mask``: that is what the
forward sees, what ``model.state_dict()`` saves and what a DDP gradient hook receives
gradients for. Around each ``optimizer.step()``:

* before the update, penalties (slimming, group lasso): first add the penalty's gradient,
  which is what adding the penalty to the loss would do, after DDP has averaged the
  gradients;
* before the update, hard masks: zero the gradient at masked positions, so momentum and Adam
  moments never build up there;
* before the update, soft masks (DNS while it is revising masks): copy the dense W, kept in
  this sparsifier, back into the parameter, so the optimizer updates dense W with the
  gradient taken at ``W * mask`` (straight-through) and pruned weights keep training;
* post-hook: count the step, let the method revise the masks, save dense W aside if the
  method is soft, and write ``W * mask`` into the parameter. When a mask prunes more
  weights, their entries in the optimizer's per-parameter state (momentum buffer, Adam
  moments) are zeroed as well, so a weight unmasked later (IHT, DSD) restarts from zero.

Why not ``torch.nn.utils.parametrize`` or module forward hooks: a parametrization renames
the parameter (``weight`` becomes ``parametrizations.weight.original``), which breaks
``state_dict`` compatibility with the plain model and with checkpoints, and forward hooks
would have to be removed and re-added around every forward and touch the user's modules.
Keeping the masked value in the parameter needs neither, leaves the training loop and
the model's state dict unchanged, and costs one copy of the sparsified weights only for
soft methods.

"Before the update" is the step pre-hook, except for ``optimizer.step(closure)`` (Lightning's
automatic optimization, LBFGS): there forward and backward run inside ``step``, after the
pre-hook, which therefore wraps the closure and does its work when the closure returns.
Done in the pre-hook itself it would find no gradients of this step to mask yet, and a soft
method would run the forward at dense W.

Because masks are computed from weights that DDP keeps identical on every rank, by
deterministic rules (and for DNS a generator seeded the same everywhere), every rank
holds the same masks after every update. Ranks must hold the same weights at ``attach``:
call it after wrapping the model in DDP, which broadcasts rank 0's parameters.
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sparse_comm.schema import ConfigError
from sparse_comm.wrappers import unwrap_model as unwrap
from sparse_comm.wrappers import unwrap_optimizer

from .channels import PRODUCERS
from .formats import storage_bytes
from .live import PerMask
from .masks import nm_compliant
from .methods import build_method
from .options import SparsityOptions

log = logging.getLogger(__name__)

GradMaskPolicy = Literal["keep", "drop"]
PRUNABLE = PRODUCERS  # the layers whose weights are sparsified by default


def select_weights(module: nn.Module, patterns: list[str]) -> dict[str, nn.Parameter]:
    """Parameters to sparsify, by name: ``patterns`` globbed over those with ndim >= 2, or
    the weights of every Linear and Conv layer. Raises ConfigError for a pattern that
    matches nothing."""
    params = dict(module.named_parameters())
    if not patterns:
        def owned_by_prunable(name: str) -> bool:
            owner, _, attr = name.rpartition(".")
            return attr == "weight" and isinstance(module.get_submodule(owner), PRUNABLE)
        return {name: p for name, p in params.items() if owned_by_prunable(name)}
    candidates = {name: p for name, p in params.items() if p.dim() >= 2}
    for i, pattern in enumerate(patterns):
        if not any(fnmatch.fnmatchcase(name, pattern) for name in candidates):
            raise ConfigError(f"layers[{i}]", f"pattern {pattern!r} matches no parameter "
                              f"with ndim >= 2 (have: {', '.join(candidates) or 'none'})")
    return {name: p for name, p in candidates.items()
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)}


class Sparsifier:
    """Masks for the selected weights of ``model``, kept up to date by ``optimizer``'s steps.

    Build it with ``sparse_train.attach``. Read-outs for a gradient-compression hook:

    * ``fixed_masks()``: the boolean masks by parameter name when they are settled and
      known to every rank (N:M from ``nm_start_step``, an IHT or DSD sparse phase, a
      magnitude / gmp / block / bank / structured schedule past its last update, DNS
      after ``dns_iter_stop``), else None (dense phases, a gmp schedule in progress, DNS
      while it revises masks).
      They describe the current step; ask again every step.
    * ``grad_mask_policy``: ``"keep"`` while gradients at masked positions are needed
      (DNS before ``dns_iter_stop``: splicing needs the pruned weights to keep training),
      ``"drop"`` when they may be discarded (hard masks: the pre-hook zeroes them anyway).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 options: SparsityOptions):
        module = unwrap(model)
        if not isinstance(module, nn.Module):
            raise TypeError(f"sparse_train.attach: expected a torch.nn.Module, "
                            f"got {type(model).__name__}")
        # Accelerate's and Lightning's optimizer wrappers never run torch's step hooks
        optimizer = unwrap_optimizer(optimizer)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"sparse_train.attach: expected a torch optimizer, "
                            f"got {type(optimizer).__name__}")
        self.options = options
        self.method = build_method(options)
        self.optimizer = optimizer
        selected = select_weights(module, options.layers)
        self.params, self.skipped = self.method.bind(module, selected)
        for name, reason in self.skipped.items():
            log.info("sparse_train: %s stays dense: %s", name, reason)
        if not self.params:
            why = "; ".join(f"{name}: {why}" for name, why in self.skipped.items())
            raise ConfigError("layers", f"no selected layer can take method "
                              f"{options.method!r}: " + (why or "the model has no weight "
                                                         "matrix or filter to prune"))
        self.masks: dict[str, Tensor] = {
            name: torch.ones_like(p, dtype=torch.bool) for name, p in self.params.items()}
        self._dense: dict[str, Tensor] = {}
        self._multipliers: PerMask[Tensor] = PerMask()  # by (name, dtype)
        self.step = 0
        self._refresh()
        self._hooks = [optimizer.register_step_pre_hook(self._before_step),
                       optimizer.register_step_post_hook(self._after_step)]

    # --- the optimizer step ---------------------------------------------------------------

    def _before_step(self, optimizer, args, kwargs):
        # args[0] is the optimizer itself; a closure comes next or as a keyword
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._prepare_update()
            return None

        def closure_then_prepare():
            result = closure()
            self._prepare_update()
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_prepare}
        return (args[0], closure_then_prepare, *args[2:]), kwargs

    @torch.no_grad()
    def _prepare_update(self) -> None:
        """Penalty gradients, then masked gradients (hard masks) or dense weights (soft),
        for the coming update."""
        self.method.regularize(self.step)
        for name, p in self.params.items():
            if name in self._dense:
                p.copy_(self._dense[name])
            elif p.grad is not None:
                self.mask_(name, p.grad)

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        self.step += 1
        self._refresh()

    @torch.no_grad()
    def _refresh(self) -> None:
        """Let the method revise the masks at ``self.step`` and write ``W * mask``."""
        weights = {name: p.detach() for name, p in self.params.items()}
        was_soft = bool(self._dense)
        new = self.method.update(self.step, weights, self.masks) or {}
        pruned = {name for name, mask in new.items() if (self.masks[name] & ~mask).any()}
        self.masks.update(new)
        if self.method.soft(self.step):
            for name, w in weights.items():
                self._save_dense(name, w)
            pruned = set()  # dense W keeps training, optimizer state and all
        elif was_soft:
            self._dense = {}
            pruned = set(self.params)
        for name, p in self.params.items():
            self.mask_(name, p)
        self._mask_optimizer_state(pruned)
        if new:
            log.debug("sparse_train: step %d revised masks of %s", self.step, sorted(new))

    def _save_dense(self, name: str, weight: Tensor) -> None:
        if name in self._dense:
            self._dense[name].copy_(weight)
        else:
            self._dense[name] = weight.clone()

    def _mask_optimizer_state(self, names) -> None:
        for name in names:
            p = self.params[name]
            for value in self.optimizer.state.get(p, {}).values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    self.mask_(name, value)

    def mask_(self, name: str, t: Tensor) -> Tensor:
        """Zero ``t`` (shaped like parameter ``name``, or flat) where ``name``'s mask prunes;
        returns ``t``."""
        return t.mul_(self.multiplier(name, t.dtype).view(t.shape))

    def multiplier(self, name: str, dtype: torch.dtype) -> Tensor:
        """``name``'s mask as a factor for tensors of ``dtype``: on CPU a 0/1 tensor of that
        dtype, made once per mask change, because there a multiply by a bool tensor goes
        through a dtype conversion about 7x slower than the multiply itself (torch 2.13,
        16.8M fp32 entries: 68 ms against 9.5 ms), and three of them a step dominated the
        step of a 2:4 model. Elsewhere the bool mask itself (converted inside the kernel)."""
        mask = self.masks[name]
        if mask.device.type != "cpu":
            return mask
        return self._multipliers.get((name, dtype), mask, lambda: mask.to(dtype))

    # --- read-outs ------------------------------------------------------------------------

    @property
    def grad_mask_policy(self) -> GradMaskPolicy:
        return "keep" if self.method.soft(self.step) else "drop"

    def fixed_masks(self) -> dict[str, Tensor] | None:
        if not self.method.fixed(self.step):
            return None
        return dict(self.masks)

    def masked_weights(self) -> dict[str, Tensor]:
        """``W * mask`` of every sparsified layer (what the forward uses)."""
        return {name: p.detach() for name, p in self.params.items()}

    def report(self) -> dict[str, Any]:
        """Density, N:M compliance and storage cost per layer, and the layers left dense.

        ``at_floor`` marks a layer down to its last weight (its last block, for block
        sparsity): the mask rules never prune a layer away entirely, so a target that
        would has been held there (``floor`` says so in words)."""
        o = self.options
        unit = o.block[0] * o.block[1] if o.method == "block" else 1
        layers = {}
        for name, p in self.params.items():
            mask = self.masks[name]
            layers[name] = {
                "shape": list(p.shape),
                "density": mask.float().mean().item(),
                "at_floor": int(mask.sum()) == unit,
                "nm_compliant": nm_compliant(mask, o.n, o.m),
                "bytes": storage_bytes(p.detach(), mask, n=o.n, m=o.m, block=tuple(o.block)),
            }
        kept = sum(int(mask.sum()) for mask in self.masks.values())
        total = sum(mask.numel() for mask in self.masks.values())
        return {"method": o.method, "step": self.step,
                "floor": "every layer keeps at least one weight (one block for block "
                         "sparsity), whatever the target",
                "density": kept / total if total else 1.0,
                "layers": layers, "skipped": dict(self.skipped),
                **self.method.describe(self.masks)}

    # --- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.options.method, "step": self.step,
                "masks": {name: m.clone() for name, m in self.masks.items()},
                "dense": {name: w.clone() for name, w in self._dense.items()},
                "method_state": self.method.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["method"] != self.options.method:
            raise ValueError(f"checkpoint is for method {state['method']!r}, "
                             f"this sparsifier runs {self.options.method!r}")
        if set(state["masks"]) != set(self.params):
            raise ValueError("checkpoint masks are for layers "
                             f"{sorted(state['masks'])}, this sparsifier has "
                             f"{sorted(self.params)}")
        self.step = state["step"]
        self.method.load_state_dict(state["method_state"])
        for name, p in self.params.items():
            self.masks[name] = state["masks"][name].to(device=p.device, dtype=torch.bool)
        self._dense = {name: w.to(self.params[name].device).clone()
                       for name, w in state["dense"].items()}
        for name, p in self.params.items():
            if name in self._dense:
                p.copy_(self._dense[name])
            self.mask_(name, p)
        self._mask_optimizer_state(() if self._dense else self.params)

    def detach(self) -> None:
        """Stop maintaining the masks; parameters keep their current ``W * mask``."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._dense = {}
