"""Step time of the wide MLP with DGC over each exchange, on loopback: what the exchanges'
own work costs beside the allgather's when the link is not the bottleneck.

    torchrun --standalone --nproc-per-node=2 benchmarks/exchange_step.py --exchange gtopk
    torchrun --standalone --nproc-per-node=2 benchmarks/exchange_step.py --quick   # CI
    torchrun ... benchmarks/exchange_step.py --exchange gtopk --repo /path/to/older/checkout

Each rank runs the same batch of 64 through DDP with DGC attached (density 0.001, fp16
values, int32 indices, no warm-up, no dense fallback); rank 0 prints the median of the
timed steps (a barrier before each). ``--repo`` imports ``dgc`` from another checkout, to
time two versions side by side with the same script.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--exchange", default="allgather",
                   choices=("allgather", "sparse_allreduce", "gtopk"))
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="LeNet-300-100, 2 steps (CI)")
    p.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = p.parse_args()
    sys.path.insert(0, args.repo)
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dgc
    from launch.models import ModelConfig, build_model

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="lenet300" if args.quick else "wide_mlp"),
                        (1, 28, 28), 10)
    steps = 2 if args.quick else args.steps
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dgc.attach(ddp, opt, density=0.001, value_dtype="fp16", index_dtype="int32",
               warmup_epochs=0, exchange=args.exchange, dense_fallback=False)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    times = []
    for step in range(steps + 3):  # three untimed: DDP rebuilds its buckets
        dist.barrier()
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
        if step >= 3:
            times.append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        print(f"{args.exchange}: median step {statistics.median(times) * 1e3:.1f} ms over "
              f"{steps} ({os.path.dirname(dgc.__file__)})")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
