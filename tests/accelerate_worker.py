"""One rank of tests/test_accelerate.py, started by torchrun: the plain loop and Accelerate.

``python -m torch.distributed.run --nproc-per-node=2 -m tests.accelerate_worker OUT``

Each case trains the same model on the same per-rank batches twice: once in the plain
torchrun + DDP loop, once after ``accelerator.prepare`` with ``dgc.attach`` and
``sparse_train.attach`` handed what ``prepare`` returned. Accumulation runs under
``ddp.no_sync()`` in the plain loop and ``accelerator.accumulate`` in Accelerate. Then the
refusals: ``sync_each_batch=True`` at attach, and at the first step after the hook ran twice
(the plugin changed after attach, and a plain loop without ``no_sync``). Each rank saves its
results to ``OUT/rank<r>.pt``.
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import dgc
import sparse_train
from launch.distenv import exit_process, quiesce
from tests.sparse_helpers import SCHEDULES

STEPS, BUCKET_MB = 10, 0.001
DGC = dict(density=0.05, warmup_epochs=0, min_numel=100)
SGD = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
CASES = {  # name: (DGC?, sparsity method, micro-batches per step)
    "dgc": (True, None, 1),
    "dgc-accumulate": (True, None, 2),
    "iht-accumulate": (False, "iht", 2),
    "dgc+nm": (True, "nm", 1),
}


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(),
                         nn.Linear(48, 4))


def batch(rank: int, i: int):
    g = torch.Generator().manual_seed(1000 * i + rank)
    return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def attach(model, opt, use_dgc: bool, method: str | None):
    sp = sparse_train.attach(model, opt, method=method, **SCHEDULES[method]) if method else None
    return dgc.attach(model, opt, sparsifier=sp, **DGC) if use_dgc else None


def hook_runs(state) -> int:
    return state.compression_stats()["steps"] if state is not None else 0


def plain(rank: int, use_dgc: bool, method: str | None, micro: int) -> tuple[torch.Tensor, int]:
    model = net()
    ddp = DDP(model, bucket_cap_mb=BUCKET_MB)
    opt = torch.optim.SGD(model.parameters(), **SGD)
    state = attach(ddp, opt, use_dgc, method)
    for step in range(STEPS):
        opt.zero_grad()
        for j in range(micro):
            x, y = batch(rank, step * micro + j)
            with ddp.no_sync() if j < micro - 1 else nullcontext():
                (nn.functional.mse_loss(ddp(x), y) / micro).backward()
        opt.step()
    return flat(model), hook_runs(state)


def accelerated(rank: int, use_dgc: bool, method: str | None,
                micro: int) -> tuple[torch.Tensor, int]:
    accelerator = Accelerator(cpu=True, gradient_accumulation_plugin=GradientAccumulationPlugin(
        num_steps=micro))
    raw = net()
    model, opt = accelerator.prepare(raw, torch.optim.SGD(raw.parameters(), **SGD))
    state = attach(model, opt, use_dgc, method)  # the prepared DDP model, AcceleratedOptimizer
    for i in range(STEPS * micro):
        with accelerator.accumulate(model):
            x, y = batch(rank, i)
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            opt.step()
            opt.zero_grad()
    return flat(raw), hook_runs(state)


def refusal(fn) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as err:
        return str(err)
    return "not refused"


def sync_each_batch_at_attach() -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_plugin=GradientAccumulationPlugin(
        num_steps=2, sync_each_batch=True))
    raw = net()
    model, opt = accelerator.prepare(raw, torch.optim.SGD(raw.parameters(), **SGD))
    dgc.attach(model, opt, **DGC)


def sync_each_batch_after_attach(rank: int) -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_plugin=GradientAccumulationPlugin(
        num_steps=1, sync_each_batch=True))
    raw = net()
    model, opt = accelerator.prepare(raw, torch.optim.SGD(raw.parameters(), **SGD))
    dgc.attach(model, opt, **DGC)
    accelerator.gradient_accumulation_steps = 2  # now each micro-batch runs the hook
    for i in range(4):
        with accelerator.accumulate(model):
            x, y = batch(rank, i)
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            opt.step()
            opt.zero_grad()


def two_backward_passes_without_no_sync(rank: int) -> None:
    model = net()
    ddp = DDP(model, bucket_cap_mb=BUCKET_MB)
    opt = torch.optim.SGD(model.parameters(), **SGD)
    dgc.attach(ddp, opt, **DGC)
    for i in range(2):
        nn.functional.mse_loss(ddp(batch(rank, i)[0]), batch(rank, i)[1]).backward()
    opt.step()


def main(out: Path) -> None:
    Accelerator(cpu=True)  # joins the torchrun group (Gloo on CPU)
    rank = dist.get_rank()
    results = {name: (plain(rank, *case), accelerated(rank, *case))
               for name, case in CASES.items()}
    results["refused"] = {
        "sync_each_batch_at_attach": refusal(sync_each_batch_at_attach),
        "sync_each_batch_after_attach": refusal(lambda: sync_each_batch_after_attach(rank)),
        "two_backward_passes": refusal(lambda: two_backward_passes_without_no_sync(rank)),
    }
    torch.save(results, out / f"rank{rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
    quiesce()
    exit_process(0)  # no teardown: a Gloo thread can abort there (launch/distenv.py)
