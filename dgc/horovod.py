"""Deep Gradient Compression over Horovod, in the spirit of ``hvd.DistributedOptimizer``.

    import horovod.torch as hvd
    hvd.init()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = dgc.horovod.DistributedOptimizer(opt, model.named_parameters(), density=0.001)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    ...loss.backward(); opt.step()   # as with Horovod's own optimizer

``opt.step()`` and the wrapped optimizer's own ``step()`` both work: the exchange finishes in
a step pre-hook registered on it. Register this before other step pre-hooks that read
gradients (a sparsifier's: pass it as ``sparsifier=`` or ``use_sparsifier`` later).

Each parameter's gradient is handed over by a post-accumulate-grad hook as soon as backward
produces it, so communication overlaps the rest of backward. The per-tensor math (sparsity
masks, local clipping, momentum correction, accumulation, top-k selection, momentum factor
masking, warm-up) is ``dgc.Compressor``'s, the same code the DDP hook runs; only transport
differs: the packed (index, value) pairs of a compressed tensor go through
``hvd.allgather_async``, a dense tensor (1-D, or under ``min_numel``) through
``hvd.allreduce_async`` (sum, in the value dtype). ``step()`` waits for every handle, sums,
averages, applies the dense tensors' momentum and the local weight-decay momentum, and runs
the wrapped SGD without momentum or weight decay, as ``dgc.attach`` arranges for DDP.

Differences from the DDP hook: tensors are exchanged one by one rather than per bucket, so
a compressed tensor always uses the allgather (no dense fallback; ``exchange`` other than
``allgather`` or ``auto`` is refused: the sparse allreduce and gtopk run their rounds from
the DDP hook's bucket, ``dgc.transport``), and under fixed masks the dense tensors are sent
whole. One backward per ``step()``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import Tensor

from dgc import codec
from dgc.attach import _TAKEN_OVER, _check_still_plain_sgd, _settings, _sgd_momentum
from dgc.compressor import Compressor
from dgc.hook import DGCStats
from dgc.options import DGCOptions
from dgc.wire import account, allgather_bytes, allreduce_bytes
from sparse_comm.schema import ConfigError, build


class DistributedOptimizer:
    """Wrap ``optimizer`` (a ``torch.optim.SGD``) so its gradients are DGC-compressed and
    averaged over Horovod's ranks. ``named_parameters``: the model's, for state keyed by
    name. ``sparsifier``: a ``sparse_train.Sparsifier`` whose hard masks DGC respects.
    ``**options``: the fields of ``dgc.DGCOptions``."""

    def __init__(self, optimizer: torch.optim.Optimizer,
                 named_parameters: Iterable[tuple[str, Tensor]], sparsifier=None, **options):
        import horovod.torch as hvd
        self._hvd = hvd
        opts = build(DGCOptions, options)
        if opts.check_finite:
            raise ConfigError("check_finite", "supported by the DDP hook only, not under Horovod")
        if opts.exchange not in ("auto", "allgather"):
            raise ConfigError("exchange", f"{opts.exchange!r} is supported by the DDP hook "
                                          f"only; under Horovod the pairs are allgathered")
        if opts.topology != "flat":
            raise ConfigError("topology", f"{opts.topology!r} is supported by the DDP hook "
                                          f"only; under Horovod DGC runs flat")
        momentum, nesterov = _sgd_momentum(optimizer)
        named = [(n, p) for n, p in named_parameters if p.requires_grad]
        by_id = {id(p): n for n, p in named}
        weight_decay = {by_id[id(p)]: float(_settings(g)["weight_decay"])
                        for g in optimizer.param_groups for p in g["params"]
                        if id(p) in by_id and _settings(g)["weight_decay"]}
        self.compressor = Compressor(named, world_size=hvd.size(), rank=hvd.rank(),
                                     momentum=momentum, nesterov=nesterov,
                                     weight_decay=weight_decay, **options)
        if sparsifier is not None:
            self.compressor.use_sparsifier(sparsifier)
        self.optimizer = optimizer
        # First among the step pre-hooks: the gradients must be averaged before anything
        # else (a sparsifier's mask, our momentum check) looks at them.
        optimizer.register_step_pre_hook(lambda *_: self.synchronize())
        for group in optimizer.param_groups:
            group[_TAKEN_OVER] = {"momentum": momentum, "nesterov": nesterov,
                                  "weight_decay": _settings(group)["weight_decay"]}
            group.update(momentum=0.0, nesterov=False, weight_decay=0.0)
        optimizer.register_step_pre_hook(_check_still_plain_sgd)
        self._params = dict(named)
        self._pending: dict[str, tuple] = {}
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(n))
                       for n, p in named]
        self.stats = DGCStats()  # this rank's wire bytes, counted like the DDP hook's
        self._nodes = max(1, hvd.size() // hvd.local_size())

    # -- the optimizer interface -----------------------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def set_epoch(self, epoch: float) -> None:
        """Move an epoch-length warm-up to ``epoch``; call it on every rank."""
        self.compressor.set_epoch(epoch)

    def set_total_steps(self, total_steps: int) -> None:
        """The run's length, for ``warmup_fraction``."""
        self.compressor.set_total_steps(total_steps)

    def use_sparsifier(self, sparsifier) -> None:
        self.compressor.use_sparsifier(sparsifier)

    def step(self, closure=None):
        return self.optimizer.step(closure)  # the pre-hook finishes the exchange first

    def state_dict(self) -> dict:
        """DGC's state on this rank (residuals differ per rank); the wrapped optimizer's
        is ``self.optimizer.state_dict()``."""
        return {**self.compressor.state_dict(), "stats": dataclasses.asdict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        self.compressor.load_state_dict(state)
        self.stats = DGCStats(**state["stats"])

    def compression_stats(self) -> dict[str, float]:
        s = self.stats
        return {"steps": s.steps, "density": self.compressor.density,
                "bytes_sent": s.bytes_sent, "bytes_dense": s.bytes_dense,
                "bytes_dense_tensors": s.bytes_dense_tensors,
                "compression_ratio": s.bytes_dense / s.bytes_sent if s.bytes_sent else 1.0}

    # -- communication -----------------------------------------------------------------------
    def _make_hook(self, name: str):
        def hook(param: Tensor) -> None:
            self._start(name, param)
        return hook

    def _start(self, name: str, param: Tensor) -> None:
        hvd, c = self._hvd, self.compressor
        if name in self._pending:
            # Horovod would fail on the repeated tensor name, far from the cause.
            raise RuntimeError(f"dgc.horovod: a second backward reached {name!r} before "
                               f"step(); gradient accumulation is not supported")
        if not param.grad.is_contiguous():  # channels_last: keep to the logical order the
            param.grad = param.grad.contiguous()  # masks and the optimizer index by
        g = param.grad.view(-1)
        masks = c.hard_masks()
        if name in masks:
            c.drop_masked_(name, g, masks[name])
        c.clip_(g)
        value_dtype = codec.VALUE_DTYPES[c.options.value_dtype]
        self.stats.bytes_dense += allreduce_bytes(g.nbytes, c.world_size)
        if not self._pending:
            self.stats.steps += 1
        k = c.sparse_k(param.shape, c.live_count(name, g.numel(), masks))
        if k is not None:
            self.stats.density[name] = k / g.numel()
            indices, values = c.compress(name, g, k)
            layout = codec.Layout(indices.numel(), value_dtype,
                                  codec.INDEX_DTYPES[c.options.index_dtype])
            packed = codec.pack(indices, values, layout)
            account(self.stats, allgather_bytes(packed.nbytes, c.world_size), c.world_size,
                    self._nodes)
            handle = hvd.allgather_async(packed, name=f"dgc.sparse.{name}")
            self._pending[name] = (handle, layout)
        else:
            self.stats.density[name] = 1.0
            dense = codec.to_wire(g, value_dtype)
            wire_bytes = allreduce_bytes(dense.nbytes, c.world_size)
            account(self.stats, wire_bytes, c.world_size, self._nodes)
            self.stats.bytes_dense_tensors += wire_bytes
            handle = hvd.allreduce_async(dense, op=hvd.Sum, name=f"dgc.dense.{name}")
            self._pending[name] = (handle, None)

    def synchronize(self) -> None:
        """Wait for every gradient of this step and turn it into the update SGD applies."""
        hvd, c = self._hvd, self.compressor
        for name, (handle, layout) in self._pending.items():
            received, param = hvd.synchronize(handle), self._params[name]
            g = param.grad.view(-1)
            if layout is not None:
                g.zero_()
                codec.scatter_sum_(g, *codec.unpack(received, layout, c.world_size))
                g.div_(c.world_size)
            else:
                g.copy_(received).div_(c.world_size)
                c.dense_momentum_(name, g)
            update = c.weight_decay_update(name, param)
            if update is not None:
                param.grad.add_(update)
        if self._pending:
            c.end_step()
        self._pending.clear()

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
