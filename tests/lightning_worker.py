"""One rank of tests/test_lightning.py, started by torchrun: the plain loop and Lightning.

``python -m torch.distributed.run --nproc-per-node=2 -m tests.lightning_worker PHASE OUT``

* ``fit``: the plain torchrun + DDP loop and a Lightning Trainer on the same data, model and
  settings, for DGC (``DGCStrategy``), each of N:M, IHT and DNS (``SparsityCallback``) and
  N:M under DGC; the Trainers with DGC checkpoint at the end of each epoch;
* ``resume``: new Trainers, in new processes, continuing the DGC and DGC + N:M runs from their
  first epoch's checkpoints.

Each rank saves what it ran to ``OUT/PHASE-rank<r>.pt``: final parameters, SGD momentum
buffers and DGC stats by run, and the Lightning runs' logged metrics (rank 0 only, read back
from ``CSVLogger``).
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import dgc
import sparse_train
from dgc.lightning import DGCStrategy
from launch.distenv import exit_process, quiesce
from sparse_train.lightning import SparsityCallback
from tests.sparse_helpers import SCHEDULES

EPOCHS, BATCH, SAMPLES = 2, 8, 80  # 5 steps per epoch per rank, 10 in all
BUCKET_MB = 0.001  # several buckets, each mixing dense and compressed tensors
DGC = dict(density=0.05, warmup_epochs=1, min_numel=100)  # epoch 0 warms up at a higher density
# With a sparsifier, the warm-up is a fraction of the run's steps (Lightning's estimate of it
# against the plain loop's count) and ends in the first epoch, so resuming restores it too.
DGC_WITH_SPARSITY = dict(density=0.05, warmup_fraction=0.3, min_numel=100)
TOTAL_STEPS = 10
SGD = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
SPARSE_METHODS = ("nm", "iht", "dns")


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(),
                         nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 4))


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(SAMPLES, 16, generator=g), torch.randn(SAMPLES, 4, generator=g))


def dgc_options(method: str | None) -> dict:
    return DGC_WITH_SPARSITY if method else DGC


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def momenta(opt: torch.optim.Optimizer) -> torch.Tensor:
    """SGD's momentum buffers, flat (empty under DGC, which takes momentum over)."""
    return torch.cat([opt.state[p]["momentum_buffer"].reshape(-1)
                      for g in opt.param_groups for p in g["params"]
                      if opt.state.get(p, {}).get("momentum_buffer") is not None] or
                     [torch.zeros(0)])


class Plain(nn.Module):
    """The LightningModule's parameters under the same names (``net.*``): DGC's samples and
    DNS's revisions draw from (seed, rank, name, step)."""

    def __init__(self):
        super().__init__()
        self.net = net()

    def forward(self, x):
        return self.net(x)


def plain_loop(use_dgc: bool, method: str | None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model = Plain()
    ddp = DDP(model, bucket_cap_mb=BUCKET_MB)
    opt = torch.optim.SGD(model.parameters(), **SGD)
    sp = sparse_train.attach(ddp, opt, method=method, **SCHEDULES[method]) if method else None
    state = dgc.attach(ddp, opt, sparsifier=sp, **dgc_options(method)) if use_dgc else None
    if state is not None and method:
        state.set_total_steps(TOTAL_STEPS)
    sampler = DistributedSampler(dataset(), shuffle=True, seed=0)
    loader = DataLoader(dataset(), batch_size=BATCH, sampler=sampler)
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        if state is not None:
            state.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
    return flat(model), momenta(opt), state.compression_stats() if state is not None else {}


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), **SGD)

    def train_dataloader(self):  # Lightning puts a DistributedSampler(shuffle=True, seed=0) in
        return DataLoader(dataset(), batch_size=BATCH, shuffle=True)


def lightning_run(out: Path, name: str, use_dgc: bool, method: str | None,
                  ckpt_dir: Path | None = None, resume: Path | None = None):
    strategy = (DGCStrategy(bucket_cap_mb=BUCKET_MB, **dgc_options(method)) if use_dgc
                else pl.strategies.DDPStrategy(bucket_cap_mb=BUCKET_MB))
    callbacks = [SparsityCallback(method, **SCHEDULES[method])] if method else []
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}",
                                         save_top_k=-1, every_n_epochs=1))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=EPOCHS,
                         callbacks=callbacks, logger=CSVLogger(out, name=name, version=0),
                         log_every_n_steps=1, enable_checkpointing=ckpt_dir is not None,
                         enable_progress_bar=False, enable_model_summary=False)
    module = Module()
    trainer.fit(module, ckpt_path=resume)
    return (flat(module.net), momenta(trainer.optimizers[0]),
            strategy.dgc_state.compression_stats() if use_dgc else {})


def logged(out: Path, name: str) -> list[dict]:
    with open(out / name / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def main(phase: str, out: Path) -> None:
    results = {}
    if phase == "fit":
        for use_dgc, method in [(True, None), *((False, m) for m in SPARSE_METHODS), (True, "nm")]:
            key = "+".join(k for k in ("dgc" if use_dgc else "", method or "") if k)
            ckpt_dir = out / "ckpt" / key if use_dgc else None
            results[key] = {"plain": plain_loop(use_dgc, method),
                            "lightning": lightning_run(out, key, use_dgc, method, ckpt_dir)}
    else:
        for key, method in (("dgc", None), ("dgc+nm", "nm")):
            ckpt = out / "ckpt" / key / "epoch=0.ckpt"
            results[key] = lightning_run(out, f"resumed-{key}", True, method, resume=ckpt)
    if dist.get_rank() == 0:
        results["logged"] = {name.name: logged(out, name.name) for name in out.iterdir()
                             if (name / "version_0" / "metrics.csv").exists()}
    torch.save(results, out / f"{phase}-rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    main(sys.argv[1], Path(sys.argv[2]))
    quiesce()
    exit_process(0)  # no teardown: a Gloo thread can abort there (launch/distenv.py)
