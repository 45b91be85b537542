"""Weight sparsity inside PyTorch Lightning: ``Trainer(callbacks=[SparsityCallback(...)])``.

Lightning runs forward and backward inside ``optimizer.step(closure)``. The sparsifier's
step pre-hook handles that itself (it wraps the closure, see ``sparse_train.sparsifier``), so
this callback only attaches it once the optimizer exists, keeps its masks in Lightning's
checkpoints (masks are the same on every rank, so rank 0's file is enough), hands it to a
``dgc.lightning.DGCStrategy`` if there is one, and logs the density.
"""
from __future__ import annotations

from typing import Any

import torch

try:
    import pytorch_lightning as pl
except ImportError as err:  # the optional extra
    raise ImportError("sparse_train.lightning needs pytorch-lightning: "
                      "pip install 'sparse-comm[lightning]'") from err
from pytorch_lightning.callbacks import Callback

from sparse_comm.schema import build

from .options import SparsityOptions
from .sparsifier import Sparsifier, unwrap


class SparsityCallback(Callback):
    """Sparsify the LightningModule's weights as its one optimizer steps.

    ``method`` and ``options`` are ``SparsityOptions`` fields, as for
    ``sparse_train.attach``; a mistake is one ``ConfigError`` naming the key, raised here.
    ``sparsifier`` is the attached ``sparse_train.Sparsifier`` from ``on_fit_start`` on (for
    ``report()`` and ``sparse_train.export``); it stays readable after ``fit``.
    """

    def __init__(self, method: str, **options: Any) -> None:
        self.options = build(SparsityOptions, {"method": method, **options})
        self.sparsifier: Sparsifier | None = None
        self._restore: dict | None = None  # state to apply at the next on_fit_start

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.options.method)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"SparsityCallback: masks follow one optimizer's steps, "
                             f"configure_optimizers returned {len(trainer.optimizers)}")
        model = trainer.strategy.model  # the DDP-wrapped module while fitting
        weights = self._snapshot(model) if self._restore is not None else {}
        self.sparsifier = Sparsifier(model, trainer.optimizers[0], self.options)
        if self._restore is not None:
            # attach applied step-0 masks to the weights the checkpoint restored; put them
            # back before the checkpoint's own masks are applied
            with torch.no_grad():
                for name, p in self.sparsifier.params.items():
                    p.copy_(weights[name])
            self.sparsifier.load_state_dict(self._restore)
            self._restore = None
        use_sparsifier = getattr(trainer.strategy, "use_sparsifier", None)
        if use_sparsifier is not None:
            use_sparsifier(self.sparsifier)

    def _snapshot(self, model) -> dict[str, torch.Tensor]:
        # every weight: the structured methods also mask layers ``layers`` does not select
        return {name: p.detach().clone() for name, p in unwrap(model).named_parameters()
                if p.dim() >= 2}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        masks = list(self.sparsifier.masks.values())
        # a tensor, so the host waits for it only when a logger writes it
        kept = torch.stack([m.sum() for m in masks]).sum() / sum(m.numel() for m in masks)
        pl_module.log("sparsity/density", kept, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A later fit builds new optimizers: carry the masks over to it.
        self._restore = self.sparsifier.state_dict()
        self.sparsifier.detach()

    def state_dict(self) -> dict[str, Any]:
        if self._restore is not None:
            return self._restore
        return self.sparsifier.state_dict() if self.sparsifier is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore = state_dict
