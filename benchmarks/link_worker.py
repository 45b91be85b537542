"""One rank of ``benchmarks/link_bench.py``: time training steps of each scheme, then replay
each scheme's collectives alone.

Started once per rank (inside its network namespace) with torchrun-style variables. For
each scheme it builds the model afresh on the same seed, wraps it in DDP with the scheme's
hook, runs ``--warmup`` untimed steps and ``--steps`` timed ones (a barrier before each, so
all ranks start a step together; rank 0's wall time per step), and records the collectives
the hook issued in its last step (kind and bytes, caught at the ``torch.distributed`` call).
Then it replays those collectives back to back, ``--replay`` times, as the measured
communication time of one step. Rank 0 writes everything as JSON to ``--out``.
"""
# No ``from __future__ import annotations``: DDP checks local_hook's annotations.
import argparse
import contextlib
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dgc  # noqa: E402
import sparse_train  # noqa: E402
from launch.comm import (CountingAllreduceState, TorchHookState,  # noqa: E402
                         counted_torch_hook, counting_allreduce_hook)
from launch.models import ModelConfig, build_model  # noqa: E402

MODELS = {  # name -> (ModelConfig, input shape)
    "wide_mlp": (ModelConfig(name="wide_mlp", width=4096, depth=2), (3, 32, 32)),
    "lenet300": (ModelConfig(name="lenet300"), (1, 28, 28)),
    "tiny": (ModelConfig(name="wide_mlp", width=64, depth=1), (1, 8, 8)),  # --quick
}
SCHEMES = ["dense", "fp16", "powersgd1", "powersgd4", "dgc", "dgc-nm24", "nocomm"]
DGC_OPTIONS = dict(density=0.001, value_dtype="fp16", index_dtype="int32", warmup_epochs=0)
# PowerSGD compresses from its third step; the bucket must be one on Gloo (two failed with
# a collective size mismatch, see BENCHMARKS.md).
POWERSGD_START = 2


class _LocalOnly:
    stats = None


def local_hook(state: _LocalOnly, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """No communication at all: each rank keeps its own gradient (the compute floor)."""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def build(scheme: str, model_name: str, seed: int):
    cfg, shape = MODELS[model_name]
    torch.manual_seed(seed)
    model = build_model(cfg, shape, 10)
    single_bucket = scheme.startswith("powersgd")
    ddp = DDP(model, bucket_cap_mb=4096 if single_bucket else 25)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    if scheme == "dense":
        state = CountingAllreduceState()
        ddp.register_comm_hook(state, counting_allreduce_hook)
    elif scheme == "fp16":
        state = TorchHookState("fp16")
        ddp.register_comm_hook(state, counted_torch_hook)
    elif scheme.startswith("powersgd"):
        state = TorchHookState("powersgd", powersgd_rank=int(scheme[len("powersgd"):]),
                               powersgd_start_iter=POWERSGD_START)
        ddp.register_comm_hook(state, counted_torch_hook)
    elif scheme == "dgc":
        state = dgc.attach(ddp, opt, **DGC_OPTIONS)
    elif scheme == "dgc-nm24":
        sparsifier = sparse_train.attach(ddp, opt, method="nm", n=2, m=4)
        state = dgc.attach(ddp, opt, sparsifier=sparsifier, **DGC_OPTIONS)
    elif scheme == "nocomm":
        state = _LocalOnly()
        ddp.register_comm_hook(state, local_hook)
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    return ddp, opt, state


@contextlib.contextmanager
def recording(calls: list):
    """Note (kind, bytes) of every allreduce and allgather started inside the block."""
    all_reduce, gather = dist.all_reduce, dist.all_gather_into_tensor

    def all_reduce_noted(tensor, *args, **kwargs):
        calls.append(("allreduce", tensor.numel(), str(tensor.dtype)))
        return all_reduce(tensor, *args, **kwargs)

    def gather_noted(output, tensor, *args, **kwargs):
        calls.append(("allgather", tensor.numel(), str(tensor.dtype)))
        return gather(output, tensor, *args, **kwargs)

    dist.all_reduce, dist.all_gather_into_tensor = all_reduce_noted, gather_noted
    saved_single = getattr(dist, "all_gather_single", None)
    if saved_single is not None:
        dist.all_gather_single = gather_noted
    try:
        yield calls
    finally:
        dist.all_reduce, dist.all_gather_into_tensor = all_reduce, gather
        if saved_single is not None:
            dist.all_gather_single = saved_single


def replay(calls: list, repeats: int) -> list[float]:
    """Seconds per replay of ``calls`` issued one after another."""
    world = dist.get_world_size()
    tensors = []
    for kind, numel, dtype in calls:
        t = torch.ones(numel, dtype=getattr(torch, dtype.split(".")[-1]))
        out = t.new_empty(world * numel) if kind == "allgather" else None
        tensors.append((kind, t, out))
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        for kind, t, out in tensors:
            if kind == "allreduce":
                dist.all_reduce(t)
            else:
                dist.all_gather_into_tensor(out, t)
        times.append(time.perf_counter() - start)
    return times[1:]  # the first pays for connection set-up


def run_scheme(scheme: str, args) -> dict:
    ddp, opt, state = build(scheme, args.model, args.seed)
    cfg, shape = MODELS[args.model]
    gen = torch.Generator().manual_seed(args.seed + dist.get_rank())
    x = torch.randn(args.batch_size, *shape, generator=gen)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    times, sent, calls = [], [], []
    for step in range(args.warmup + args.steps):
        last = step == args.warmup + args.steps - 1
        before = state.stats.bytes_sent if state.stats is not None else 0.0
        dist.barrier()
        start = time.perf_counter()
        with recording(calls) if last else contextlib.nullcontext():
            opt.zero_grad(set_to_none=True)
            loss_fn(ddp(x), y).backward()
            opt.step()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
            sent.append((state.stats.bytes_sent - before) if state.stats is not None else 0.0)
    replayed = replay(calls, args.replay) if calls else []
    del ddp, opt, state
    return {"scheme": scheme, "step_s": times, "step_median_s": statistics.median(times),
            "bytes_per_step": statistics.median(sent), "collectives": calls,
            "replay_s": replayed,
            "replay_median_s": statistics.median(replayed) if replayed else 0.0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--replay", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    assert args.warmup > POWERSGD_START, "PowerSGD must be compressing in the timed steps"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=900))
    # The per-collective cost of Gloo on this link (alpha of the model): 4-byte allreduces.
    probe = replay([("allreduce", 1, "torch.float32")], 21)
    results = []
    for scheme in args.schemes.split(","):
        results.append(run_scheme(scheme, args))
        if dist.get_rank() == 0:
            r = results[-1]
            print(f"  {args.model} p={dist.get_world_size()} {scheme}: step "
                  f"{r['step_median_s'] * 1e3:.1f} ms, {r['bytes_per_step'] / 1e6:.3f} MB/step, "
                  f"replayed comm {r['replay_median_s'] * 1e3:.1f} ms", flush=True)
    if dist.get_rank() == 0:
        args.out.write_text(json.dumps({"world_size": dist.get_world_size(),
                                        "model": args.model, "results": results,
                                        "probe_allreduce_s": statistics.median(probe)}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
