"""Lightning fits of one process, each run by ``tests/test_lightning.py`` in a process of
its own: a Trainer sets launcher variables (LOCAL_RANK, ...), imports mpi4py and may leave
a process group behind, which other tests in the pytest process must not see.

``python -m tests.lightning_single NAME`` runs the function NAME and prints "ok"."""
import logging
import sys

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dgc.lightning import DGCStrategy
from sparse_train.lightning import SparsityCallback


def second_fit_keeps_structured_masks():
    """``channel`` also masks the layer reading the pruned channels (net.2), which its
    ``layers`` does not select; the second fit must restore that mask too."""

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

        def forward(self, x):  # what the channel tracer follows
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return (self(x) - y).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 8), torch.randn(32, 4)), batch_size=8)
    model, callback = Net(), SparsityCallback("channel", layers=["net.0.weight"], target=0.5)
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    pl.Trainer(max_steps=2, callbacks=[callback], **settings).fit(model, data)
    first = {name: m.clone() for name, m in callback.sparsifier.masks.items()}
    assert set(first) == {"net.0.weight", "net.2.weight"}
    pl.Trainer(max_steps=4, callbacks=[callback], **settings).fit(model, data)
    for name, mask in first.items():
        assert torch.equal(callback.sparsifier.masks[name], mask)
        assert not model.get_parameter(name)[~mask].any()


def strategy_tells_the_hook_the_16_mixed_scale():
    """Under precision="16-mixed" the hook must see Lightning's GradScaler scale, so that
    DGC's memory holds unscaled gradients (scaled ones pass fp16's range on the wire once
    momentum and accumulation have grown them)."""

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return (self(x) - y).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-4, momentum=0.9)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randn(64, 4)), batch_size=8)
    model = Net()
    strategy = DGCStrategy(density=0.05, warmup_epochs=0, min_numel=16, value_dtype="fp16",
                           check_finite=True)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    fp16 = MixedPrecision("16-mixed", "cpu")  # Trainer(precision=...) takes bf16 on CPU
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, plugins=[fp16],
                         max_steps=6, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    assert strategy.dgc_state.grad_scale == trainer.precision_plugin.scaler.get_scale()
    residuals = strategy.dgc_state.state_dict()["accumulation"].values()
    assert max(v.abs().max().item() for v in residuals) < 100  # not x 2**16
    assert all(torch.isfinite(p).all() for p in model.parameters())


if __name__ == "__main__":
    {"second_fit_keeps_structured_masks": second_fit_keeps_structured_masks,
     "strategy_tells_the_hook_the_16_mixed_scale": strategy_tells_the_hook_the_16_mixed_scale,
     }[sys.argv[1]]()
    print("ok")
