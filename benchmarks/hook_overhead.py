"""DGC's compression and decompression time per step, as a fraction of backward time.

    python benchmarks/hook_overhead.py                 # the 29.4M-parameter wide MLP
    python benchmarks/hook_overhead.py --quick         # a small MLP, a few steps (CI)

One process (a world of one, so the collectives themselves cost next to nothing): the
backward pass of the same model is timed with a hook that returns the gradients untouched
(no communication at all) and with the DGC hook at density 0.001 (fp16 values, int32
indices, warm-up over); the difference is the time DGC spends clipping, accumulating,
selecting, packing, unpacking and applying momentum. Medians over the steps.
"""
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import dgc
from launch.cli import OneLineParser, integer
from launch.distenv import exit_process, quiesce
from launch.models import ModelConfig, build_model


def passthrough_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def backward_times(model_cfg, input_shape, batch, steps, use_dgc) -> list[float]:
    torch.manual_seed(0)
    model = build_model(model_cfg, input_shape, 10)
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if use_dgc:
        dgc.attach(ddp, opt, density=0.001, value_dtype="fp16", index_dtype="int32",
                   warmup_epochs=0)
    else:
        ddp.register_comm_hook(None, passthrough_hook)
    x, y = torch.randn(batch, *input_shape), torch.randint(0, 10, (batch,))
    times = []
    for step in range(steps + 2):  # two warm-up steps (DDP rebuilds buckets after the first)
        loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss.backward()
        elapsed = time.perf_counter() - start
        opt.step()
        if step >= 2:
            times.append(elapsed)
    return times


def main(argv=None) -> int:
    p = OneLineParser(prog="hook_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=integer(1), default=15)
    p.add_argument("--batch", type=integer(1), default=64)
    args = p.parse_args(argv)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if args.quick:
        cfg, shape, steps = ModelConfig(name="wide_mlp", width=256, depth=2), (1, 28, 28), 3
    else:
        cfg, shape, steps = ModelConfig(name="wide_mlp", width=4096, depth=2), (3, 32, 32), args.steps
    params = sum(p.numel() for p in build_model(cfg, shape, 10).parameters())
    # Interleave the two so drift on a shared machine hits both alike.
    dense, compressed = [], []
    for _ in range(2):
        dense += backward_times(cfg, shape, args.batch, steps, use_dgc=False)
        compressed += backward_times(cfg, shape, args.batch, steps, use_dgc=True)
    d, c = statistics.median(dense), statistics.median(compressed)
    print(f"| model | parameters | backward, no-communication hook (ms) | backward, DGC hook (ms) | "
          f"DGC overhead (ms) | overhead / backward |\n|---|---|---|---|---|---|\n"
          f"| {cfg.name} {cfg.width}x{cfg.depth} on {shape} | {params / 1e6:.1f}M | {1e3 * d:.1f} | "
          f"{1e3 * c:.1f} | {1e3 * (c - d):.1f} | {(c - d) / d:.1%} |")
    quiesce()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_process(main())  # no teardown: Gloo's threads can abort there (launch/distenv.py)
