"""See through the wrappers that frameworks put around a user's model and optimizer.

``dgc.attach`` and ``sparse_train.attach`` need three things from what a user holds: the
DistributedDataParallel module (for its comm hook), the user's own module (parameter names,
which key every piece of state and must match an unwrapped model's checkpoint) and the torch
optimizer (whose step hooks they register). Frameworks wrap each of them:

* ``torch.compile`` returns an ``OptimizedModule`` holding the original as ``_orig_mod``; its
  parameter names gain an ``_orig_mod.`` prefix, which would rename all state;
* DDP and DataParallel hold the module as ``.module``;
* Accelerate's ``AcceleratedOptimizer`` holds the torch optimizer as ``.optimizer``. It never
  runs ``torch.optim.Optimizer.__init__``, so step hooks registered on it never fire, and its
  ``step`` calls the inner optimizer's only when gradients are synchronised: hooks belong on
  the inner optimizer;
* Lightning's ``LightningOptimizer`` holds it as ``._optimizer``.

A wrapper class is looked up only if its framework is already imported: a wrapped object
cannot exist otherwise, and the libraries must not pull those frameworks in.
"""
from __future__ import annotations

import sys

from torch import nn

_DATA_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def _loaded_class(module: str, name: str) -> type | None:
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def _is(obj, module: str, name: str) -> bool:
    cls = _loaded_class(module, name)
    return cls is not None and isinstance(obj, cls)


def strip_compile(model: nn.Module) -> nn.Module:
    """``model`` without ``torch.compile``'s wrappers on the outside."""
    while _is(model, "torch._dynamo.eval_frame", "OptimizedModule"):
        model = model._orig_mod
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's own module inside any nesting of compile, DDP and DataParallel wrappers."""
    model = strip_compile(model)
    while isinstance(model, _DATA_PARALLEL):
        model = strip_compile(model.module)
    return model


def unwrap_optimizer(optimizer):
    """The torch optimizer inside Accelerate's or Lightning's wrapper (or ``optimizer``)."""
    while True:
        if _is(optimizer, "accelerate.optimizer", "AcceleratedOptimizer"):
            optimizer = optimizer.optimizer
        elif (_is(optimizer, "pytorch_lightning.core.optimizer", "LightningOptimizer")
              or _is(optimizer, "lightning.pytorch.core.optimizer", "LightningOptimizer")):
            optimizer = optimizer._optimizer
        else:
            return optimizer
