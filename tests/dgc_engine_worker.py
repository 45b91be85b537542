"""Train a small model for a few steps with DGC (or, with ``--comm allreduce``, the plain
averaging) on one engine, for tests/test_horovod.py.

    torchrun --standalone --nproc-per-node=2 tests/dgc_engine_worker.py --engine ddp --out A
    horovodrun -np 2 --gloo -H localhost:2 python tests/dgc_engine_worker.py --engine horovod --out B

Both start from the same weights and feed each rank the same batches, so the parameters
after ``--steps`` steps must agree: the DGC math is shared, only the transport differs.
Rank 0 writes the final parameters and its byte counts with ``torch.save``.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dgc  # noqa: E402
import dgc.horovod  # noqa: E402  (imports Horovod only when used)
import sparse_train  # noqa: E402
from launch.distenv import exit_process, quiesce  # noqa: E402

DGC = dict(density=0.01, warmup_epochs=0, value_dtype="fp16", min_numel=256,
           dense_fallback=False, clip_norm=5.0)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(),
                         nn.Linear(48, 10))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--engine", choices=["ddp", "horovod"], required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sparsity", default=None, help="a sparse_train method, e.g. nm")
    p.add_argument("--comm", choices=["dgc", "allreduce"], default="dgc")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    if args.engine == "ddp":
        import datetime

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        rank, size = dist.get_rank(), dist.get_world_size()
        wrapped = torch.nn.parallel.DistributedDataParallel(net)
        sp = sparse_train.attach(wrapped, opt, method=args.sparsity) if args.sparsity else None
        if args.comm == "dgc":
            state = dgc.attach(wrapped, opt, sparsifier=sp, **DGC)
        else:
            from launch.comm import CountingAllreduceState, counting_allreduce_hook
            state = CountingAllreduceState(sparsifier=sp, model=wrapped if sp else None)
            wrapped.register_comm_hook(state, counting_allreduce_hook)
        step_opt, stats = opt, state.stats
    else:
        import horovod.torch as hvd
        hvd.init()
        rank, size = hvd.rank(), hvd.size()
        wrapped = net
        if args.comm == "dgc":
            sp = sparse_train.attach(net, opt, method=args.sparsity) if args.sparsity else None
            step_opt = dgc.horovod.DistributedOptimizer(opt, net.named_parameters(),
                                                        sparsifier=sp, **DGC)
            stats = step_opt.stats
        else:  # as the launcher does: the exchange first, so it averages before masking
            from launch.hvd_engine import HorovodAllreduce
            state = HorovodAllreduce(net, opt)
            if args.sparsity:
                state.use_sparsifier(sparse_train.attach(net, opt, method=args.sparsity))
            step_opt, stats = opt, state.stats
        hvd.broadcast_parameters(net.state_dict(), root_rank=0)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(args.steps):
        x = torch.randn(16, 32, generator=gen)
        y = torch.randint(0, 10, (16,), generator=gen)
        step_opt.zero_grad()
        nn.functional.cross_entropy(wrapped(x), y).backward()
        step_opt.step()
    if rank == 0:
        torch.save({"params": {n: t.detach().clone() for n, t in net.named_parameters()},
                    "bytes_sent": stats.bytes_sent, "bytes_dense": stats.bytes_dense,
                    "world_size": size}, args.out)
    if args.engine == "ddp":
        quiesce()
    return 0


if __name__ == "__main__":
    exit_process(main())  # no teardown: a Gloo thread can abort there (launch/distenv.py)
