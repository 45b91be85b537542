"""Step time of the wide MLP with DGC over each exchange, on loopback: what the exchanges'
own work costs beside the allgather's when the link is not the bottleneck.

    torchrun --standalone --nproc-per-node=2 benchmarks/exchange_step.py --exchange gtopk
    torchrun --standalone --nproc-per-node=2 benchmarks/exchange_step.py --quick   # CI
    torchrun ... benchmarks/exchange_step.py --exchange gtopk --repo /path/to/older/checkout
    torchrun ... benchmarks/exchange_step.py --bucket-view   # the gradients as DDP bucket views
    torchrun --standalone --nproc-per-node=4 benchmarks/exchange_step.py --intra-node sparse

Each rank runs the same batch of 64 through DDP with DGC attached (density 0.001, fp16
values, int32 indices, no warm-up, no dense fallback); rank 0 prints the median of the
timed steps (a barrier before each), the CPU time of all ranks per step (every thread, the
barriers included) and its peak resident memory. ``--repo`` imports
``dgc`` from another checkout, to time two versions side by side with the same script.
``--intra-node dense|sparse`` runs the hierarchical topology with two ranks per node (the
nodes are only names here: every rank is on loopback).
"""
from __future__ import annotations

import os
import resource
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.checkout import checkout, use_checkout  # noqa: E402
from launch.cli import OneLineParser, integer  # noqa: E402


def main(argv=None) -> int:
    p = OneLineParser(prog="exchange_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--exchange", default="allgather",
                   choices=("allgather", "sparse_allreduce", "gtopk"))
    p.add_argument("--steps", type=integer(1), default=15)
    p.add_argument("--quick", action="store_true", help="LeNet-300-100, 2 steps (CI)")
    p.add_argument("--repo", type=checkout, default=REPO)
    p.add_argument("--bucket-view", action="store_true",
                   help="DDP(gradient_as_bucket_view=True), as launch.train builds it")
    p.add_argument("--intra-node", choices=("dense", "sparse"),
                   help="the hierarchical topology, 2 ranks per node, with this intra-node stage")
    args = p.parse_args(argv)
    use_checkout(args.repo)
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dgc
    from launch.distenv import quiesce
    from launch.models import ModelConfig, build_model

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="lenet300" if args.quick else "wide_mlp"),
                        (1, 28, 28), 10)
    steps = 2 if args.quick else args.steps
    ddp = DDP(model, gradient_as_bucket_view=args.bucket_view)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    topology = {} if args.intra_node is None else dict(
        topology="hierarchical", ranks_per_node=2, intra_node=args.intra_node)
    dgc.attach(ddp, opt, density=0.001, value_dtype="fp16", index_dtype="int32",
               warmup_epochs=0, exchange=args.exchange, dense_fallback=False, **topology)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    times = []
    for step in range(steps + 3):  # three untimed: DDP rebuilds its buckets
        dist.barrier()
        if step == 3:
            cpu_start = time.process_time()
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
        if step >= 3:
            times.append(time.perf_counter() - start)
    # CPU seconds of every rank (all its threads) per step: what the ranks' own work costs,
    # less swayed than the wall clock when there are more ranks than cores
    cpu = torch.tensor([time.process_time() - cpu_start])
    dist.all_reduce(cpu)
    if dist.get_rank() == 0:
        grads = "bucket views" if args.bucket_view else "copied"
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        where = "" if args.intra_node is None else f", hierarchical ({args.intra_node} in a node)"
        print(f"{args.exchange}{where}, gradients {grads}: median step "
              f"{statistics.median(times) * 1e3:.1f} ms over {steps}, CPU of all ranks "
              f"{cpu.item() / steps * 1e3:.0f} ms per step, peak RSS {peak:.0f} MiB "
              f"({os.path.dirname(dgc.__file__)})")
    quiesce()  # a hook's callback may still hold a Gloo thread (launch/distenv.py)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    from launch.distenv import exit_process  # main put --repo on the path
    exit_process(code)  # no teardown: Gloo's threads can abort there (launch/distenv.py)
