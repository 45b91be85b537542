"""Refuse, in one line, the setups that would hand DGC anything but one step's whole gradient.

The DGC hook folds what it receives into per-rank momentum and residuals, so unlike an
averaging allreduce it is not linear: it must see each bucket once per optimizer step, with
the gradient of the whole (accumulated) step. Three setups break that, each seen here:

* compiled autograd with ``torch._dynamo.config.optimize_ddp = "python_reducer"``: DDP calls
  comm hooks once per parameter with a ``(grad, param)`` tuple and ignores what they return;
* Accelerate's ``GradientAccumulationPlugin(sync_each_batch=True)``: the hook runs on every
  micro-batch of an accumulation;
* any other loop that runs backward twice through DDP without ``no_sync`` before a step.

The first two are refused at ``dgc.attach`` (and the first again in ``dgc_hook`` itself, for
hooks registered by hand); the third at the first optimizer step after it happens.
"""
from __future__ import annotations

from sparse_comm.wrappers import strip_compile, unwrap_optimizer

PER_PARAMETER_HOOK = (
    "DDP hands comm hooks one (grad, param) tuple per parameter under compiled autograd with "
    "torch._dynamo.config.optimize_ddp='python_reducer'; DGC needs whole buckets: keep "
    "optimize_ddp at its default ('ddp_optimizer') or leave compiled autograd off")


def unwrap_for_attach(model, optimizer):
    """The DDP module and the torch optimizer inside ``torch.compile``'s and Accelerate's
    wrappers, after refusing the setups above that show at attach time."""
    plugin = getattr(getattr(optimizer, "gradient_state", None), "plugin_kwargs", None) or {}
    if plugin.get("sync_each_batch") and plugin.get("num_steps", 1) > 1:
        raise ValueError("dgc.attach: Accelerate's GradientAccumulationPlugin(sync_each_batch="
                         "True) runs the DGC hook on every micro-batch of a partial "
                         "accumulation; drop sync_each_batch (accelerator.accumulate then "
                         "runs DGC once per step, on the whole accumulated gradient)")
    model = strip_compile(model)
    if getattr(model, "_use_python_reducer", False):  # set by DDP's constructor
        raise ValueError(f"dgc.attach: {PER_PARAMETER_HOOK}")
    if _existing_hook(model):  # DDP runs one hook per model
        raise RuntimeError("dgc.attach: this DDP model already has a communication hook "
                           "(DDP runs one per model: attach DGC to a model without one)")
    return model, unwrap_optimizer(optimizer)


def _existing_hook(model) -> bool:
    """Whether DDP already holds a comm hook: a Python one (``register_comm_hook``) or a
    built-in one (``_register_builtin_comm_hook``), which only DDP's logger records."""
    if getattr(model, "_comm_hooks", None):
        return True
    logging_data = getattr(model, "_get_ddp_logging_data", None)
    return callable(logging_data) and bool(logging_data().get("comm_hook"))


class OneBackwardPerStep:
    """Optimizer step pre-hook: refuse a step after the hook ran on more than one backward.

    A second backward without ``no_sync`` hands the hook the first one's averaged update plus
    new gradients, which it would fold into momentum and residuals again. Passes with a
    non-finite bucket are exempt: a loss scaler skips their steps, and the hook (with
    ``check_finite``) left the memory alone. A restored ``state.stats`` (a checkpoint loaded
    after attach) restarts the count. Under ``step(closure)`` the hook runs before the
    closure's backward, so the count is checked one step late; it still counts every pass.
    """

    def __init__(self, state):
        self.state = state
        self._seen = (state.stats, state.stats.steps, state.stats.nonfinite_buckets)

    def __call__(self, optimizer, args, kwargs) -> None:
        stats, steps, nonfinite = self._seen
        now = self.state.stats
        self._seen = (now, now.steps, now.nonfinite_buckets)
        passes = now.steps - steps
        if now is stats and passes > 1 and now.nonfinite_buckets == nonfinite:
            raise RuntimeError(
                f"dgc: the DGC hook ran on {passes} backward passes since the last optimizer "
                f"step; accumulate gradients under ddp.no_sync() (Accelerate: "
                f"accelerator.accumulate without sync_each_batch) so DGC runs once per step, "
                f"or, if a GradScaler skipped a step, attach with check_finite=True")
