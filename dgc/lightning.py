"""Deep Gradient Compression inside PyTorch Lightning: ``Trainer(strategy=DGCStrategy(...))``.

Lightning's own ``DDPStrategy(ddp_comm_hook=...)`` cannot carry DGC: its state needs the
process group, which does not exist when the strategy is built, and the hook is registered
on CUDA only. ``DGCStrategy`` runs ``dgc.attach`` once DDP and the optimizer exist (CPU and
CUDA alike), drives the warm-up with the epoch, and logs ``compression_stats()``.

Checkpoints. DGC's momentum and residuals differ on every rank, and Lightning writes its
checkpoint from rank 0 only. Every rank's state is gathered to rank 0 into the one checkpoint
file, under ``"dgc_states"`` (a list by rank), and on resume each rank takes its own entry.
That keeps a checkpoint one self-contained file, so whatever Lightning or the user does
with it (``ModelCheckpoint`` deleting all but the top k, ``save_last``, ``ckpt_path="last"``,
copying it to another machine or an fsspec store) keeps the DGC state with it; per-rank side
files would be left behind or deleted by none of those, and on nodes without a shared file
system rank 0 could not even see them. The launcher's checkpoints do the same. The price:
rank 0 holds, and the file stores, 8 bytes per parameter and rank (fp32 momentum and
residual; 12 with weight decay), and every rank reads the whole file on resume.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
import torch.distributed as dist

try:
    import pytorch_lightning as pl
except ImportError as err:  # the optional extra
    raise ImportError("dgc.lightning needs pytorch-lightning: "
                      "pip install 'sparse-comm[lightning]'") from err
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import move_data_to_device
from torch.nn.parallel import DistributedDataParallel

import dgc
from dgc.hook import DGCState
from dgc.options import DGCOptions
from sparse_comm.schema import ConfigError, build

CHECKPOINT_KEY = "dgc_states"
_DGC_FIELDS = {f.name for f in dataclasses.fields(DGCOptions)}
_HOOK_ARGS = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")
_OTHER_ARGS = (set(inspect.signature(DDPStrategy.__init__).parameters)
               | set(inspect.signature(DistributedDataParallel.__init__).parameters)) - {
                   "self", "kwargs", "module"}


class DGCStrategy(DDPStrategy):
    """A ``DDPStrategy`` whose gradients travel through ``dgc.dgc_hook``.

    Keyword arguments named like ``DGCOptions`` fields (``density``, ``warmup_epochs``, ...)
    configure DGC; the rest go to ``DDPStrategy`` and ``DistributedDataParallel`` as usual
    (``find_unused_parameters``, ``bucket_cap_mb``, ``process_group_backend``, ...). A
    mistake in either is one ``ConfigError`` naming the key, raised here, before training.
    ``gradient_as_bucket_view`` defaults to True, as in ``launch.train``: the gradients are
    views into DDP's buckets, which the hook writes the update into, so none is copied.

    ``configure_optimizers`` must return one ``torch.optim.SGD`` (any LR scheduler): DGC
    takes its momentum and weight decay over, as ``dgc.attach`` explains. A warm-up in epochs
    follows ``trainer.current_epoch``; in steps, the hook counts them; ``warmup_fraction`` is
    of ``trainer.estimated_stepping_batches``. ``compression_stats()`` is logged as ``dgc/<name>`` through
    the trainer's loggers every ``log_every_n_steps`` (``DGCStatsLogger``, added for you).
    ``dgc_state`` is the attached ``dgc.DGCState`` while fitting.
    """

    def __init__(self, **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in _DGC_FIELDS}
        build(DGCOptions, options)
        for key in _HOOK_ARGS:
            if kwargs.get(key) is not None:
                raise ConfigError(key, "not accepted by DGCStrategy: DGC is its comm hook")
        for key in kwargs:
            if key not in _OTHER_ARGS:
                raise ConfigError(key, "unknown to DGCStrategy: not a DGCOptions field nor an "
                                  "argument of DDPStrategy or DistributedDataParallel")
        kwargs.setdefault("gradient_as_bucket_view", True)  # as launch.train: the same bits
        super().__init__(**kwargs)
        self.dgc_options = options
        self.dgc_state: DGCState | None = None

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)  # wraps the model in DDP and builds the optimizers
        self.dgc_state = None
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if len(self.optimizers) != 1:
            raise ValueError(f"DGCStrategy: configure_optimizers must return one SGD optimizer "
                             f"for DGC to take over, got {len(self.optimizers)}")
        self.dgc_state = dgc.attach(self.model, self.optimizers[0], **self.dgc_options)
        if self.dgc_options.get("warmup_fraction") is not None:
            # the run's length in optimizer steps, as Lightning plans it (loads the data)
            self.dgc_state.set_total_steps(int(trainer.estimated_stepping_batches))
        if not any(isinstance(cb, DGCStatsLogger) for cb in trainer.callbacks):
            trainer.callbacks.append(DGCStatsLogger())

    def use_sparsifier(self, sparsifier) -> None:
        """Respect a ``sparse_train`` sparsifier's masks (``SparsityCallback`` calls this)."""
        self.dgc_state.use_sparsifier(sparsifier)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self.dgc_state is not None:
            self.dgc_state.set_epoch(self.lightning_module.current_epoch)
            scaler = getattr(self.precision_plugin, "scaler", None)  # precision="16-mixed"
            if scaler is not None:  # the hook divides it out (DGCState.grad_scale)
                self.dgc_state.grad_scale = scaler.get_scale()

    # -- checkpoints: every rank's state in rank 0's file (see the module doc) ---------------

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options=None) -> None:
        # Called on every rank; a weights-only checkpoint carries no training state.
        if self.dgc_state is not None and "optimizer_states" in checkpoint:
            checkpoint = {**checkpoint, CHECKPOINT_KEY: self._gather_states()}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def _gather_states(self) -> list[dict] | None:
        own = move_data_to_device(self.dgc_state.state_dict(), torch.device("cpu"))
        if not dist.is_available() or not dist.is_initialized():
            return [own]
        gathered = [None] * self.world_size if self.is_global_zero else None
        dist.gather_object(own, gathered, dst=0)
        return gathered

    def load_optimizer_state_dict(self, checkpoint) -> None:
        super().load_optimizer_state_dict(checkpoint)
        if self.dgc_state is None:
            return
        self.dgc_state.load_state_dict(
            rank_state(checkpoint.get(CHECKPOINT_KEY), self.world_size, self.global_rank))


def rank_state(states: list[dict] | None, world_size: int, rank: int) -> dict:
    """This rank's entry of a checkpoint's ``dgc_states``, or a one-line error saying why not."""
    if states is None:
        raise ValueError("DGCStrategy: the checkpoint holds no DGC state (saved without "
                         "DGCStrategy?); DGC's momentum and residuals cannot be restored")
    if len(states) != world_size:
        raise ValueError(f"DGCStrategy: the checkpoint holds the DGC state of {len(states)} "
                         f"ranks and this run has {world_size}; residuals are per rank, "
                         f"resume with the same number")
    return states[rank]


class DGCStatsLogger(Callback):
    """Logs the strategy's ``compression_stats()`` as ``dgc/<name>``, per step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        state = getattr(trainer.strategy, "dgc_state", None)
        if state is not None:
            pl_module.log_dict({f"dgc/{k}": float(v) for k, v in state.compression_stats().items()},
                               on_step=True, on_epoch=False)
