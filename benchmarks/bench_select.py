"""Time top-k selection against one read pass over the tensor, side by side.

For each size and density it times, interleaved within every repeat so that load on a
shared machine hits all of them alike: one read pass (``x.sum()``), ``torch.topk`` of
``|x|``, a full ``torch.sort`` of ``|x|``, the naive DGC selection (threshold from a random
1% sample, then ``nonzero``; its count is not exactly k) and ``dgc.select.select_topk``
without and with a ``ThresholdState``. It prints a markdown table of median milliseconds,
elements per second and the ratio to the read pass, and can write the rows as JSON.

    python benchmarks/bench_select.py                       # 1M..64M at 1% and 0.1%
    python benchmarks/bench_select.py --sizes 25M --densities 0.001 --repeats 21 \
        --methods read,topk,naive,select,state              # skip the slow full sort
    python benchmarks/bench_select.py --threads 1 ...       # as under torchrun's default
    python benchmarks/bench_select.py --quick               # seconds, for CI

On a machine with more runnable threads than cores, multi-threaded timings of anything
made of many ops (select_topk runs a few dozen) swing widely: every parallel op waits for
its slowest thread. Compare min columns, or use ``--threads 1``, there.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dgc.select import ThresholdState, select_topk  # noqa: E402
from launch.cli import OneLineParser, integer, output_file, real, reals  # noqa: E402
from sparse_comm import draws  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SUFFIXES = {"K": 10**3, "M": 10**6, "G": 10**9}
# Full sorts are skipped above this size: they take seconds and tell nothing new.
SORT_MAX_NUMEL = 32 * 10**6


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = SUFFIXES.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in SUFFIXES else text
    return int(float(number) * scale)


def sizes(text: str) -> list[int]:
    """``--sizes``: comma-separated element counts >= 1, K/M/G suffixes allowed."""
    problem = argparse.ArgumentTypeError(
        f"expected comma-separated element counts >= 1 (K/M/G allowed), got {text!r}")
    try:
        numels = [parse_size(s) for s in text.split(",")]
    except (ValueError, OverflowError):
        raise problem from None
    if min(numels) < 1:
        raise problem
    return numels


def device(text: str) -> str:
    """``--device``: one this torch can allocate on."""
    try:
        torch.empty(0, device=text)
    except (RuntimeError, AssertionError):
        raise argparse.ArgumentTypeError(f"not a device this torch can use: {text!r}") from None
    return text


def naive_select(x: torch.Tensor, k: int, sample_ratio: float = 0.01) -> torch.Tensor:
    """DGC as first described: a random sample's top quantile as threshold, then nonzero."""
    n = x.numel()
    samples = max(1, int(n * sample_ratio))
    sample = x[torch.randint(n, (samples,), device=x.device)].abs()
    threshold = sample.topk(max(1, int(samples * k / n)), sorted=False).values.min()
    return (x.abs() > threshold).nonzero().view(-1)


# Short names for --methods, and the row label each one prints under.
METHODS = {"read": "read pass (x.sum)", "topk": "torch.topk(|x|)", "sort": "torch.sort(|x|)",
           "naive": "naive sample + nonzero", "select": "select_topk",
           "state": "select_topk + state"}


def methods(x: torch.Tensor, k: int, sample_ratio: float, chosen: list[str]) -> dict:
    state = ThresholdState()
    calls = itertools.count()  # each call its own draw, as the compressor keys them
    table = {
        "read": lambda: x.sum(),
        "topk": lambda: torch.topk(x.abs(), k, sorted=False),
        "sort": lambda: torch.sort(x.abs()),
        "naive": lambda: naive_select(x, k, sample_ratio),
        "select": lambda: select_topk(x, k, sample_ratio),
        "state": lambda: select_topk(x, k, sample_ratio, state=state,
                                     draw=draws.integer(0, 0, "x", next(calls))),
    }
    if x.numel() > SORT_MAX_NUMEL:
        chosen = [m for m in chosen if m != "sort"]
    return {METHODS[m]: table[m] for m in ["read"] + [m for m in chosen if m != "read"]}


def sync(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def time_case(numel: int, density: float, dtype: torch.dtype, device: str, repeats: int,
              warmup: int, sample_ratio: float, chosen: list[str]) -> list[dict]:
    x = torch.randn(numel, device=device).to(dtype)
    k = max(1, round(density * numel))
    table = methods(x, k, sample_ratio, chosen)
    for fn in table.values():
        for _ in range(warmup):
            fn()
    sync(x)
    seconds = {name: [] for name in table}
    for _ in range(repeats):
        for name, fn in table.items():
            start = time.perf_counter()
            fn()
            sync(x)
            seconds[name].append(time.perf_counter() - start)
    read = statistics.median(seconds["read pass (x.sum)"])
    rows = []
    for name, times in seconds.items():
        median = statistics.median(times)
        rows.append({"numel": numel, "density": density, "k": k, "dtype": str(dtype),
                     "method": name, "median_ms": median * 1e3, "min_ms": min(times) * 1e3,
                     "elements_per_s": numel / median, "ratio_to_read": median / read,
                     "repeats": repeats})
    exact = set(torch.topk(x.abs(), k).indices.tolist())
    picked = select_topk(x, k, sample_ratio)[0].tolist()
    rows.append({"numel": numel, "density": density, "k": k, "method": "check",
                 "distinct": len(set(picked)) == k, "equals_topk_set": set(picked) == exact})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| numel | density | k | method | median ms | min ms | elements/s | x read pass |",
             "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["method"] == "check":
            continue
        lines.append(f"| {r['numel']:,} | {r['density']:g} | {r['k']:,} | {r['method']} | "
                     f"{r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['elements_per_s']:.3g} | "
                     f"{r['ratio_to_read']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="bench_select", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=sizes, default="1M,4M,16M,25M,64M",
                        help="comma-separated element counts, K/M/G suffixes allowed")
    parser.add_argument("--densities", type=reals(0, 1, low_open=True), default="0.01,0.001",
                        help="comma-separated k/numel")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", type=device, default="cpu")
    parser.add_argument("--repeats", type=integer(1), default=11)
    parser.add_argument("--warmup", type=integer(0), default=2)
    parser.add_argument("--sample-ratio", type=real(0, 1, low_open=True), default=0.01)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} "
                             "(the read pass always runs: it is the unit)")
    parser.add_argument("--threads", type=integer(0), default=0,
                        help="torch threads (0: default)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repeats: checks the script runs")
    parser.add_argument("--json", type=output_file, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.warmup = [300_000], 3, 1
    chosen = args.methods.split(",")
    if not set(chosen) <= set(METHODS):
        parser.error(f"--methods: unknown {sorted(set(chosen) - set(METHODS))}; "
                     f"choose from {','.join(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device "
          f"{args.device}, {args.dtype}, median of {args.repeats} (interleaved)", flush=True)
    rows = []
    for numel in args.sizes:
        for density in args.densities:
            rows += time_case(numel, density, DTYPES[args.dtype], args.device, args.repeats,
                              args.warmup, args.sample_ratio, chosen)
    print()
    print(markdown(rows))
    checks = [r for r in rows if r["method"] == "check"]
    print()
    for c in checks:
        print(f"check numel={c['numel']:,} k={c['k']:,}: distinct={c['distinct']} "
              f"equals_topk_set={c['equals_topk_set']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if all(c["distinct"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
