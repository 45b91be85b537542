"""Deep Gradient Compression and 2:4 weight sparsity in a PyTorch Lightning job.

    torchrun --standalone --nproc-per-node=2 examples/lightning_dgc.py

Lightning can also start the processes itself: ``python examples/lightning_dgc.py``. On CPU
the ranks talk over Gloo, on GPUs over NCCL. The data is a synthetic 10-class task shaped
like MNIST, so the example runs anywhere; put your own DataLoader in ``train_dataloader``.
Metrics, DGC's ``dgc/*`` counters included, go to wandb (offline by default: sync later with
``wandb sync runs/lightning_dgc/wandb/offline-run-*``).
"""
import argparse

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dgc.lightning import DGCStrategy
from sparse_train.lightning import SparsityCallback


def synthetic_mnist(samples: int = 2048) -> TensorDataset:
    """784-pixel inputs labelled by a fixed random linear teacher."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 784, generator=g)
    return TensorDataset(x, (x @ torch.randn(784, 10, generator=g)).argmax(1))


class LeNet300(pl.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                                 nn.Linear(100, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        # DGC takes SGD's momentum and weight decay over (dgc.attach); any LR schedule works
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)

    def train_dataloader(self):
        return DataLoader(synthetic_mnist(), batch_size=64, shuffle=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", default="runs/lightning_dgc")
    p.add_argument("--wandb", choices=["offline", "online"], default="offline")
    args = p.parse_args()
    sparsity = SparsityCallback("nm", nm_start_step=8)  # 2:4 masks from step 8 on
    trainer = pl.Trainer(
        accelerator="auto", devices=2, max_epochs=args.epochs, log_every_n_steps=4,
        strategy=DGCStrategy(density=0.01, warmup_epochs=1),  # 10% in epoch 0, then 1%
        callbacks=[sparsity], default_root_dir=args.out, enable_progress_bar=False,
        logger=WandbLogger(project="sparse-comm-examples", save_dir=args.out,
                           offline=args.wandb == "offline"))
    trainer.fit(LeNet300())
    if trainer.is_global_zero:
        stats = trainer.strategy.dgc_state.compression_stats()
        print(f"DGC: {stats['steps']} steps, {stats['compression_ratio']:.1f}x fewer bytes "
              f"than allreduce; weights kept: {sparsity.sparsifier.report()['density']:.2f}")


if __name__ == "__main__":
    main()
