"""``dgc.attach``: put DGC on a DDP model and take momentum and weight decay over from SGD.

DGC's momentum correction needs the momentum inside the hook, before sparsification, and
the reference DGC SGD keeps weight decay out of compression with a momentum of its own. Both
therefore move from the optimizer into ``DGCState``; the optimizer is left running plain SGD
(momentum 0, weight decay 0) on the update the hook returns, and still owns the learning
rate, so LR schedulers work unchanged.
"""
from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from dgc.adam import ADAM_TYPES, FrozenVariance, adam_settings
from dgc.guards import OneBackwardPerStep, unwrap_for_attach
from dgc.hook import DGCState, dgc_hook
from dgc.options import DGCOptions
from sparse_comm.schema import build
from sparse_comm.wrappers import unwrap_model

# Stored in each param group, so a later attach (e.g. after optimizer.load_state_dict of a
# checkpoint saved with DGC attached) finds the settings the group's zeros replaced.
_TAKEN_OVER = "dgc_taken_over"


def attach(ddp_model: DistributedDataParallel, optimizer: torch.optim.Optimizer,
           sparsifier=None, **options) -> DGCState:
    """Register ``dgc_hook`` on ``ddp_model`` and return its state.

    ``sparsifier``: a ``sparse_train.Sparsifier`` on the same model; its hard-masked
    gradients are then never accumulated or selected, and under fixed masks dense transport
    sends only the live entries.

    ``optimizer`` is a ``torch.optim.SGD`` with dampening 0, not maximizing, and one
    momentum and Nesterov setting across its groups (weight decay may differ per group), or
    a ``torch.optim.Adam``/``AdamW`` with one ``betas[0]`` (``adam_mode``, ``dgc.adam``).
    ``options`` are the fields of ``DGCOptions``; a bad one raises ``ConfigError``.

    What Accelerate's ``prepare`` returns is accepted as it is (the DDP model and the
    ``AcceleratedOptimizer``), and so is ``torch.compile`` around or inside the DDP model.
    """
    opts = build(DGCOptions, options)  # report option mistakes before anything else
    ddp_model, optimizer = unwrap_for_attach(ddp_model, optimizer)
    if not isinstance(optimizer, ADAM_TYPES):
        momentum, nesterov = _sgd_momentum(optimizer)
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(f"dgc.attach: expected a DistributedDataParallel model, "
                        f"got {type(ddp_model).__name__}")
    if isinstance(optimizer, ADAM_TYPES):
        return _attach_adam(ddp_model, optimizer, opts, sparsifier, options)
    _check_only_the_models(ddp_model, optimizer)
    state = DGCState(ddp_model.process_group, model=unwrap_model(ddp_model), momentum=momentum,
                     nesterov=nesterov, weight_decay=_weight_decay_by_name(ddp_model, optimizer),
                     **options)
    if sparsifier is not None:
        _check_sparsifier(sparsifier, ddp_model)
        state.use_sparsifier(sparsifier)
    ddp_model.register_comm_hook(state, dgc_hook)
    for group in optimizer.param_groups:
        group[_TAKEN_OVER] = {"momentum": momentum, "nesterov": nesterov,
                              "weight_decay": _settings(group)["weight_decay"]}
        group.update(momentum=0.0, nesterov=False, weight_decay=0.0)
    optimizer.register_step_pre_hook(_check_still_plain_sgd)
    optimizer.register_step_pre_hook(OneBackwardPerStep(state))
    return state


def _attach_adam(ddp_model: DistributedDataParallel, optimizer, opts: DGCOptions,
                 sparsifier, options: dict) -> DGCState:
    """Adam or AdamW (``dgc.adam``): ``frozen_variance`` hands the first moment to DGC after a
    dense warm-up; ``error_feedback`` compresses raw gradients under an untouched Adam."""
    beta1, decoupled = adam_settings(optimizer)
    frozen = opts.adam_mode == "frozen_variance"
    if frozen:  # error_feedback leaves Adam's moments alone
        _check_only_the_models(ddp_model, optimizer)
        _check_contiguous(ddp_model, "with Adam's frozen_variance")
    # Adam's L2 term (not AdamW's decoupled one) gets DGC's local weight-decay momentum once
    # DGC owns the first moment, as with SGD.
    weight_decay = (_weight_decay_by_name(ddp_model, optimizer, key="weight_decay")
                    if frozen and not decoupled else {})
    state = DGCState(ddp_model.process_group, model=unwrap_model(ddp_model), momentum=0.0,
                     nesterov=False, weight_decay=weight_decay, **options)
    if sparsifier is not None:
        _check_sparsifier(sparsifier, ddp_model)
        state.use_sparsifier(sparsifier)
    ddp_model.register_comm_hook(state, dgc_hook)
    if frozen:
        names = {id(p): n for n, p in unwrap_model(ddp_model).named_parameters()}
        state.adam = FrozenVariance(state, optimizer, names, opts.adam_warmup_steps, beta1,
                                    decoupled, opts.adam_variance_refresh,
                                    opts.adam_variance_floor,
                                    opts.adam_selection == "update")
    optimizer.register_step_pre_hook(OneBackwardPerStep(state))
    return state


def _check_only_the_models(ddp_model, optimizer) -> None:
    """The optimizer's parameters are the model's: DGC's hook applies the momentum (and
    Adam's first moment) of what DDP's buckets hold, and the optimizer's own goes to zero."""
    ours = {id(p) for p in unwrap_model(ddp_model).parameters()}
    stray = sum(id(p) not in ours for group in optimizer.param_groups for p in group["params"])
    if stray:
        raise ValueError(f"dgc.attach: the optimizer holds {stray} parameter(s) that are not "
                         f"the DDP model's; DDP does not average them and DGC would drop "
                         f"their momentum: give them an optimizer of their own")


def _check_contiguous(ddp_model, how: str) -> None:
    """DDP's bucket holds a gradient in its parameter's memory order (NHWC for
    channels_last), while Adam's moments index the logical order."""
    for name, p in unwrap_model(ddp_model).named_parameters():
        if p.requires_grad and not p.is_contiguous():
            raise ValueError(f"dgc.attach: parameter {name} is not contiguous (channels_last?); "
                             f"DGC {how} needs the default memory format")


def _check_sparsifier(sparsifier, ddp_model) -> None:
    from sparse_train import Sparsifier
    if not isinstance(sparsifier, Sparsifier):
        raise TypeError(f"dgc.attach: sparsifier must be a sparse_train.Sparsifier, "
                        f"got {type(sparsifier).__name__}")
    params = dict(unwrap_model(ddp_model).named_parameters())
    stray = [n for n, p in sparsifier.params.items() if params.get(n) is not p]
    if stray:
        raise ValueError(f"dgc.attach: the sparsifier masks {', '.join(stray)}, which are "
                         f"not parameters of this model (attach it to the same model)")


def _settings(group: dict) -> dict:
    """The group's own SGD settings, or those an earlier attach took over from it."""
    return group.get(_TAKEN_OVER, group)


def _sgd_momentum(optimizer) -> tuple[float, bool]:
    """The one (momentum, nesterov) of an SGD optimizer, or a one-line error saying why not."""
    if not isinstance(optimizer, torch.optim.SGD):
        raise TypeError(f"dgc.attach: DGC works with torch.optim.SGD, Adam and AdamW (it "
                        f"needs to own the momentum), got {type(optimizer).__name__}")
    settings = set()
    for i, group in enumerate(optimizer.param_groups):
        if group["dampening"] != 0:
            raise ValueError(f"dgc.attach: param group {i} has dampening="
                             f"{group['dampening']}; DGC's momentum correction needs 0")
        if group.get("maximize", False):
            raise ValueError(f"dgc.attach: param group {i} has maximize=True, unsupported")
        if any(optimizer.state.get(p, {}).get("momentum_buffer") is not None
               for p in group["params"]):
            raise ValueError("dgc.attach: the optimizer already holds momentum buffers; "
                             "attach before the first step")
        settings.add((float(_settings(group)["momentum"]), bool(_settings(group)["nesterov"])))
    if len(settings) > 1:
        raise ValueError(f"dgc.attach: param groups differ in (momentum, nesterov) "
                         f"{sorted(settings)}; the DGC hook applies one momentum")
    return settings.pop()


def _weight_decay_by_name(ddp_model, optimizer, key: str | None = None) -> dict[str, float]:
    names = {id(p): n for n, p in unwrap_model(ddp_model).named_parameters()}

    def decay(group) -> float:
        return float(group[key] if key else _settings(group)["weight_decay"])
    return {names[id(p)]: decay(group) for group in optimizer.param_groups
            for p in group["params"] if id(p) in names and decay(group)}


def _check_still_plain_sgd(optimizer, args, kwargs) -> None:
    for group in optimizer.param_groups:
        if group["momentum"] or group["weight_decay"]:
            raise RuntimeError(
                "optimizer momentum/weight_decay is non-zero after dgc.attach (was a non-DGC "
                "optimizer state loaded?); DGC applies them in the hook, so they would count twice")
