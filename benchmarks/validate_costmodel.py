"""Check the cost model against Gloo collectives measured between local processes.

Until the link benchmark (network namespaces with shaped links) exists, this is what the
model is validated against: Gloo over TCP on loopback, between 2 (and 4) processes of this
machine. For each world size it

1. times allreduce at several sizes (by default the fastest of the repeats, the least
   disturbed on a shared host) and fits alpha and beta of the ring model
   2(p-1) alpha + 2(p-1)/p S beta by least squares on relative error;
2. with that fit predicts allgather at several sizes, and the collectives one step of
   LeNet-300-100 runs under dense DDP and under DGC (as ``launch.costmodel.traffic`` lists
   them), replays those collectives and times them;
3. runs three real DDP steps of LeNet-300-100 with the project's hooks (the counting allreduce, and DGC after
   warm-up) and compares the wire bytes they count with the model's.

It prints markdown tables of predicted against measured with the relative error per row.
Loopback is one host's memory bus, not a network, and the machine may be shared: read the
fit as this machine's, not as a hardware constant.

    python benchmarks/validate_costmodel.py                  # 2 and 4 ranks, ~1 minute
    python benchmarks/validate_costmodel.py --quick          # 2 ranks, few sizes (CI)
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dgc.options import DGCOptions  # noqa: E402
from launch.cli import OneLineParser, integer, integers, output_file  # noqa: E402
from launch.costmodel import traffic as tr  # noqa: E402
from launch.costmodel.collectives import collective_time  # noqa: E402
from launch.costmodel.hardware import Accelerator, Cluster, Link, Rates  # noqa: E402
from launch.models import MLP  # noqa: E402
from tests.distributed import run_ranks  # noqa: E402

ALLREDUCE_BYTES = [2**k for k in (10, 12, 14, 16, 18, 20, 22)]
ALLGATHER_BYTES = [2**k for k in (10, 13, 16, 19, 21)]
QUICK_ALLREDUCE, QUICK_ALLGATHER = [2**k for k in (10, 14, 18, 20)], [2**k for k in (10, 16)]
DGC_CASES = {"dgc d=0.001 fp32/int32": dict(density=0.001),
             "dgc d=0.001 fp16/int32": dict(density=0.001, value_dtype="fp16"),
             "dgc d=0.01 fp32/int32": dict(density=0.01)}
BUCKET_CAP_MB = 25.0


def lenet300() -> torch.nn.Module:
    return MLP(784, [300, 100], 10)


def step_traffic(p: int) -> dict[str, tr.Traffic]:
    params = [(n, tuple(w.shape)) for n, w in lenet300().named_parameters()]
    buckets = tr.ddp_buckets(params, BUCKET_CAP_MB)
    cases = {"dense step": tr.dense(buckets)}
    for name, options in DGC_CASES.items():
        cases[name] = tr.dgc(buckets, DGCOptions(**options), p, passes=0)
    return cases


# --- on every rank ------------------------------------------------------------------------

def _timed(fn, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Minimum and median seconds of ``fn``, every call started together after a barrier."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times)}


def _allgather(out: torch.Tensor, mine: torch.Tensor) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine)


def _replay(collectives: list[tr.Collective], p: int):
    buffers = []
    for c in collectives:
        if c.kind == "allreduce":
            buffers.append(("allreduce", torch.zeros(max(1, int(c.nbytes) // 4)), None))
        else:
            mine = torch.zeros(int(c.nbytes), dtype=torch.uint8)
            buffers.append(("allgather", mine, mine.new_empty(p * mine.numel())))

    def run():
        for kind, t, out in buffers:
            if kind == "allreduce":
                dist.all_reduce(t)
            else:
                _allgather(out, t)
    return run


def _counted_bytes(p: int, case: str) -> float:
    """Per-rank wire bytes per step that the project's hooks count on a real DDP model."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dgc
    from launch.comm import CountingAllreduceState, counting_allreduce_hook
    torch.manual_seed(0)
    model = DDP(lenet300(), bucket_cap_mb=BUCKET_CAP_MB)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if case == "dense step":
        state = CountingAllreduceState()
        model.register_comm_hook(state, counting_allreduce_hook)
    else:
        state = dgc.attach(model, optimizer, warmup_epochs=0, **DGC_CASES[case])
    steps = 3
    for _ in range(steps):
        x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return state.stats.bytes_sent / steps


def _measure(rank: int, p: int, allreduce_sizes, allgather_sizes, repeats: int) -> dict:
    out = {"allreduce": {}, "allgather": {}, "steps": {}, "counted": {}}
    for nbytes in allreduce_sizes:
        t = torch.zeros(nbytes // 4)
        out["allreduce"][nbytes] = _timed(lambda: dist.all_reduce(t), repeats)
    for nbytes in allgather_sizes:
        mine = torch.zeros(nbytes, dtype=torch.uint8)
        gathered = mine.new_empty(p * nbytes)
        out["allgather"][nbytes] = _timed(
            lambda: _allgather(gathered, mine), repeats)
    for name, traffic in step_traffic(p).items():
        out["steps"][name] = _timed(_replay(traffic.collectives, p), repeats)
        out["counted"][name] = _counted_bytes(p, name)
    return out


# --- fitting and reporting ----------------------------------------------------------------

def fit_alpha_beta(p: int, sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least squares of 2(p-1) alpha + 2(p-1)/p S beta = T, each row divided by T so that
    small and large messages weigh alike. Returns (alpha s, beta s/byte)."""
    a = np.array([[2 * (p - 1), 2 * (p - 1) / p * s] for s in sizes]) / np.array(seconds)[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(a, np.ones(len(sizes)), rcond=None)
    return max(float(alpha), 0.0), float(beta)


def loopback_cluster(alpha: float, beta: float) -> Cluster:
    link = Link(bandwidth_gbytes=1e-9 / beta, latency_us=alpha * 1e6)
    cpu = Accelerator("fp32", 1.0, Rates(fp32=0.06), Rates())
    return Cluster("fitted-loopback", cpu, 1 << 20, link, link, 1)


def rows_for(p: int, measured: dict, statistic: str = "min"
             ) -> tuple[list[dict], tuple[float, float]]:
    sizes = sorted(measured["allreduce"])
    alpha, beta = fit_alpha_beta(p, sizes, [measured["allreduce"][s][statistic] for s in sizes])
    cluster = loopback_cluster(alpha, beta)
    rows = []

    def add(what: str, size: str, timing: dict[str, float], predicted: float):
        seconds = timing[statistic]
        rows.append({"p": p, "what": what, "size": size, "measured_ms": seconds * 1e3,
                     "predicted_ms": predicted * 1e3,
                     "rel_error": (predicted - seconds) / seconds})

    for kind in ("allreduce", "allgather"):
        for nbytes, seconds in sorted(measured[kind].items()):
            label = kind + (" (fit)" if kind == "allreduce" else "")
            size = f"{nbytes:,} B" + (" per rank" if kind == "allgather" else "")
            add(label, size, seconds, collective_time(kind, nbytes, cluster, p, "ring"))
    for name, traffic in step_traffic(p).items():
        predicted = sum(collective_time(c.kind, c.nbytes, cluster, p, "ring")
                        for c in traffic.collectives)
        kinds = ", ".join(f"{c.kind} {int(c.nbytes):,} B" for c in traffic.collectives)
        add(f"LeNet-300 {name}", kinds, measured["steps"][name], predicted)
    for name, traffic in step_traffic(p).items():
        modelled, counted = traffic.wire_bytes(p), measured["counted"][name]
        rows.append({"p": p, "what": f"bytes/step, {name}", "size": "wire bytes per rank",
                     "measured_bytes": counted, "predicted_bytes": modelled,
                     "rel_error": (modelled - counted) / counted})
    return rows, (alpha, beta)


def markdown(rows: list[dict], fits: dict[int, tuple[float, float]]) -> str:
    lines = ["Fitted on allreduce: " + "; ".join(
        f"p={p}: alpha = {a * 1e6:.1f} us, bandwidth = {1e-9 / b:.3g} GB/s"
        for p, (a, b) in fits.items()), "",
        "| p | what | size | measured | predicted | rel. error |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        if "measured_ms" in r:
            m, q = f"{r['measured_ms']:.3f} ms", f"{r['predicted_ms']:.3f} ms"
        else:
            m, q = f"{r['measured_bytes']:,.0f} B", f"{r['predicted_bytes']:,.0f} B"
        lines.append(f"| {r['p']} | {r['what']} | {r['size']} | {m} | {q} | "
                     f"{r['rel_error']:+.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="validate_costmodel", description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=integers(2), default="2,4",
                        help="comma-separated process counts")
    parser.add_argument("--repeats", type=integer(1), default=15)
    parser.add_argument("--statistic", choices=("min", "median"), default="min",
                        help="a collective's time over repeats: min (default) is the least "
                             "disturbed run on a shared host, median includes the disturbance")
    parser.add_argument("--quick", action="store_true", help="2 ranks, few sizes and repeats")
    parser.add_argument("--json", type=output_file, help="also write the rows and fits here")
    args = parser.parse_args(argv)
    sizes = args.world_sizes
    allreduce, allgather = ALLREDUCE_BYTES, ALLGATHER_BYTES
    if args.quick:
        sizes, args.repeats, allreduce, allgather = [2], 5, QUICK_ALLREDUCE, QUICK_ALLGATHER
    rows, fits, raw = [], {}, {}
    for p in sizes:
        raw[p] = run_ranks(_measure, p, allreduce, allgather, args.repeats, timeout=600)[0]
        p_rows, fits[p] = rows_for(p, raw[p], args.statistic)
        rows += p_rows
    print(markdown(rows, fits))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "measured_on_rank0": raw, "fits": {
            p: {"alpha_s": a, "beta_s_per_byte": b} for p, (a, b) in fits.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
