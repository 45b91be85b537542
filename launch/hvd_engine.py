"""``engine: horovod``: gradients go through Horovod instead of a DDP communication hook.

Under ``horovodrun`` the model is not wrapped in DDP. With a ``dgc:`` section the optimizer
is wrapped in ``dgc.horovod.DistributedOptimizer`` (the same DGC math as the DDP hook);
without one, ``HorovodAllreduce`` averages every gradient with ``hvd.allreduce_async``, the
dense baseline. Both hand gradients over from per-parameter hooks as backward produces
them and finish in a step pre-hook on the optimizer, so the training loop is the DDP one.
A Gloo group beside Horovod (``launch.distenv``) carries checkpoints and metrics.
"""
from __future__ import annotations

from torch import Tensor, nn

from dgc.wire import allreduce_bytes
from launch.comm import AllreduceStats, CountsBytes
from sparse_train.live import GradientMasks, gather_live, scatter_live_


class HorovodAllreduce(CountsBytes):
    """Dense averaging of every gradient through Horovod, with its wire bytes counted. Given
    a sparsifier (``use_sparsifier``), gradients of masked weights carry their live entries
    only once the masks are fixed, as the DDP engine's allreduce does."""

    def __init__(self, model: nn.Module, optimizer):
        import horovod.torch as hvd
        self._hvd = hvd
        self.stats = AllreduceStats()
        self.ranks_per_node = hvd.local_size()
        self.masks: GradientMasks | None = None
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._pending: dict[Tensor, tuple[Tensor | None, object]] = {}
        optimizer.register_step_pre_hook(lambda *_: self.synchronize())
        self._hooks = [p.register_post_accumulate_grad_hook(self._start)
                       for p in model.parameters() if p.requires_grad]

    def use_sparsifier(self, sparsifier) -> None:
        self.masks = GradientMasks(sparsifier)

    def _start(self, param: Tensor) -> None:
        positions = (None if self.masks is None
                     else self.masks.live_positions(self._names[id(param)]))
        sent = gather_live(param.grad.reshape(-1), positions)
        size = self._hvd.size()
        self.count_allreduce(sent.nbytes, size)
        self.stats.bytes_dense += allreduce_bytes(param.grad.nbytes, size)
        self.stats.steps += not self._pending
        self._pending[param] = (positions, self._hvd.allreduce_async(sent, op=self._hvd.Average))

    def synchronize(self) -> None:
        for param, (positions, handle) in self._pending.items():
            scatter_live_(param.grad.view(-1), positions, self._hvd.synchronize(handle))
        self._pending.clear()


def broadcast_parameters(model: nn.Module) -> None:
    """Start every rank from rank 0's weights, as DDP's constructor does."""
    import horovod.torch as hvd
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)


def attach_comm(model: nn.Module, optimizer, dgc_options: dict | None):
    """The gradient exchange of ``engine: horovod``; attach it before a sparsifier."""
    if dgc_options is None:
        return HorovodAllreduce(model, optimizer)
    from dgc.horovod import DistributedOptimizer
    return DistributedOptimizer(optimizer, model.named_parameters(), **dgc_options)
