"""Pairwise swaps on the emulated links: one message one way against the same message both
ways at once, gtopk's rounds back to back, and the fit of a swap's own cost-model constants.

    sudo python benchmarks/swapprobe.py --rate 100mbit --bytes 115000
    sudo python benchmarks/swapprobe.py --calibrate --ranks 4 --repeats 101 \
        --json results/swap_calibration.json
    python benchmarks/swapprobe.py --from-json results/swap_calibration.json

gtopk's rounds are pairwise swaps: both ranks send at once, over one TCP connection. On the
emulated links (``benchmarks/netns.py``: each rank's egress shaped by tbf) the link
benchmark measured them slower than their bytes at the shaped rate. On a testbed of
``--ranks`` namespaces, one rank each, this probe times three shapes per size, each after
the link benchmark's idle spell and a barrier, as its replays are: a Gloo send from every
even rank to the next odd one ("one way"), a swap of the same size with that rank
(``batch_isend_irecv`` both ways, "swap"), and "rounds": the recursive doubling of two
buckets, one swap per round with rank XOR 1, 2, ..., back to back.

``--calibrate`` times every size at 100 Mbit/s and 1 Gbit/s, the shapes in turn with each
other, and fits per rate the two constants a link preset gives its swaps
(``configs/hardware/links.yaml``): ``swap_us``, the fixed cost of a swap, and
``swap_slowdown``, the factor on the time of its bytes past the shaper's bucket, by least
squares on the relative error of the rounds' mean times. The link benchmark's rows are not
part of the fit. Needs root (``--from-json`` does not). The presets' constants now come
from ``linkbench.py --calibrate-swaps``, which times the same rounds in the link
benchmark's own workers, where they ran faster than in this probe's processes
(BENCHMARKS.md, "Swaps timed in the link benchmark's own workers").
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import netns  # noqa: E402
from benchmarks.linkbench_worker import (IDLE_S, SWAP_BUCKETS as BUCKETS,  # noqa: E402
                                         SWAP_BYTES as SIZES, partners)
from launch.cli import OneLineParser, existing_file, integer, integers, output_file  # noqa: E402

PORT = 29533
PRESETS = {"100mbit": "netns-100mbit", "1gbit": "netns-1gbit"}


def worker(rank: int, world_size: int, master: str, sizes: list[int], repeats: int) -> None:
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{PORT}", rank=rank,
                            world_size=world_size)
    peer = rank ^ 1

    def one_way(out, into) -> None:  # the even ranks send, the odd ones receive
        if rank % 2 == 0:
            dist.send(out, peer)
        else:
            dist.recv(into, peer)

    def swap(out, into, with_rank: int = peer) -> None:
        for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, out, with_rank),
                                            dist.P2POp(dist.irecv, into, with_rank)]):
            work.wait()

    def rounds(out, into) -> None:  # back to back: only the first follows the idle spell
        for other in partners(rank, world_size):
            swap(out, into, other)

    shapes = [(kind, step, size) for size in sizes
              for kind, step in (("one way", one_way), ("swap", swap), ("rounds", rounds))]
    buffers = {size: (torch.zeros(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8))
               for size in sizes}
    times = {f"{kind} {size}": [] for kind, _, size in shapes}
    for repeat in range(repeats + 1):  # the first pass warms the connections up, uncounted
        for kind, step, size in shapes:
            time.sleep(IDLE_S)  # the link benchmark's idle spell: the shaper's bucket refills
            dist.barrier()
            start = time.perf_counter()
            step(*buffers[size])
            if repeat:
                times[f"{kind} {size}"].append(time.perf_counter() - start)
    if rank == 1:
        print(json.dumps(times), flush=True)
    dist.destroy_process_group()


def measure(rate: str, sizes: list[int], repeats: int, world_size: int) -> dict:
    """{"one way N" | "swap N" | "rounds N": [seconds, ...]} (rank 1's) on a fresh testbed
    of ``world_size`` namespaces."""
    with netns.Testbed(world_size, rate) as testbed:
        procs = [subprocess.Popen(
            testbed.exec_prefix(rank) + [
                sys.executable, __file__, "--bytes", ",".join(map(str, sizes)), "--repeats",
                str(repeats), "--ranks", str(world_size), "--worker", str(rank),
                testbed.address(0)],
            env={**os.environ, "GLOO_SOCKET_IFNAME": testbed.device(rank),
                 "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE, text=True) for rank in range(world_size)]
        lines = [proc.communicate(timeout=1800)[0] for proc in procs]
    return json.loads(lines[1].strip().splitlines()[-1])


@functools.cache
def _link(rate: str):
    from launch.costmodel.hardware import load_cluster
    return load_cluster(PRESETS[rate]).inter


def rounds_time(link, nbytes: int, swaps: int, fixed: float, slowdown: float) -> float:
    """The cost model's seconds for ``swaps`` swaps of ``nbytes`` back to back after an idle
    spell, on ``link`` (a ``Link``) with these swap constants."""
    from launch.costmodel.collectives import token_bucket_time
    return token_bucket_time([(1, nbytes)] * swaps, fixed, link.bandwidth, link.burst, 0.0,
                             slowdown)


def model_time(rate: str, nbytes: int, swaps: int, fixed: float, slowdown: float) -> float:
    """``rounds_time`` on the preset of ``rate``."""
    return rounds_time(_link(rate), nbytes, swaps, fixed, slowdown)


def fit_rounds(link, rows: list[tuple[int, int, float]]) -> tuple[float, float]:
    """(swap_us in seconds, swap_slowdown) for ``link`` from ``rows`` of (bytes per swap,
    swaps, mean seconds of the rounds): least squares on the relative error, on a grid of
    50 us to 3 ms and 1 to 3."""

    def loss(fixed: float, slowdown: float) -> float:
        return sum((rounds_time(link, n, swaps, fixed, slowdown) / measured - 1) ** 2
                   for n, swaps, measured in rows)

    grid = [(us * 1e-6, 1 + i / 50) for us in range(50, 3001, 25) for i in range(101)]
    return min(grid, key=lambda point: loss(*point))


def fit(times: dict, rate: str, swaps: int) -> tuple[float, float]:
    """(swap_us in seconds, swap_slowdown) of one rate's ``times``: ``fit_rounds`` on the
    mean of every size's rounds (see the module doc)."""
    return fit_rounds(_link(rate), [(int(key.split()[-1]), swaps, statistics.fmean(values))
                                    for key, values in times.items()
                                    if key.startswith("rounds ")])


def report(run: dict) -> list[str]:
    p = run["world_size"]
    swaps = len(partners(0, p))
    lines = [f"{p} ranks, one per namespace; \"rounds\": {swaps} swaps back to back (the "
             f"recursive doubling of {BUCKETS} buckets), after an idle spell.", ""]
    for rate, times in run["rates"].items():
        fixed, slowdown = fit(times, rate, swaps)
        lines += [f"**{rate}: swap_us {fixed * 1e6:.0f}, swap_slowdown {slowdown:.2f}**", "",
                  "| bytes | one way (ms, mean) | swap (ms, mean) | swap / one way | "
                  "rounds (ms, mean) | model (ms) | error |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for key in times:
            if not key.startswith("rounds "):
                continue
            n = int(key.split()[-1])
            one, both, seq = (statistics.fmean(times[f"{kind} {n}"])
                              for kind in ("one way", "swap", "rounds"))
            model = model_time(rate, n, swaps, fixed, slowdown)
            lines.append(f"| {n} | {one * 1e3:.2f} | {both * 1e3:.2f} | {both / one:.2f}x | "
                         f"{seq * 1e3:.2f} | {model * 1e3:.2f} | "
                         f"{(model / seq - 1) * 100:+.0f}% |")
        lines.append("")
    return lines


def main(argv=None) -> int:
    p = OneLineParser(prog="swapprobe", description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", default="100mbit", help="tc rate of each rank's egress")
    p.add_argument("--bytes", type=integers(1), default=[115_000],
                   help="message size(s), comma-separated")
    p.add_argument("--repeats", type=integer(1), default=40)
    p.add_argument("--ranks", type=int, default=2, choices=(2, 4, 8),
                   help="namespaces, one rank each (a power of two)")
    p.add_argument("--calibrate", action="store_true",
                   help=f"time {','.join(map(str, SIZES))} bytes at 100mbit and 1gbit and fit "
                        "swap_us and swap_slowdown")
    p.add_argument("--json", type=output_file, help="with --calibrate: write the times here")
    p.add_argument("--from-json", type=existing_file, help="report a calibration's times again")
    p.add_argument("--worker", nargs=2, metavar=("RANK", "MASTER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        rank = args.worker[0]
        if not (rank.isdigit() and int(rank) < args.ranks):
            p.error(f"--worker: RANK must be 0 to {args.ranks - 1}, got {rank!r}")
        worker(int(rank), args.ranks, args.worker[1], args.bytes, args.repeats)
        return 0
    if args.json and not args.calibrate:
        p.error("--json: writes the times of --calibrate only")
    if args.from_json:
        try:
            lines = report(json.loads(args.from_json.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"swapprobe: --from-json: not a calibration's times: {err!r}",
                  file=sys.stderr)
            return 2
        print("\n".join(lines))
        return 0
    try:
        rate_bits = netns.parse_rate(args.rate)
    except ValueError as err:
        print(f"swapprobe: --rate: {err}", file=sys.stderr)
        return 2
    why = netns.need_root()
    if why:
        print(f"swapprobe: {why}", file=sys.stderr)
        return 2
    if args.calibrate:
        runs = {"world_size": args.ranks, "rates": {}}
        for rate in PRESETS:
            print(f"[{time.strftime('%H:%M:%S')}] swaps at {rate}, {args.ranks} ranks, "
                  f"{len(SIZES)} sizes x {args.repeats}", flush=True)
            runs["rates"][rate] = measure(rate, list(SIZES), args.repeats, args.ranks)
        if args.json:
            args.json.write_text(json.dumps(runs))
        print("\n".join(report(runs)))
        return 0
    times = measure(args.rate, args.bytes, args.repeats, args.ranks)
    swaps = len(partners(0, args.ranks))
    for n in args.bytes:
        one, both = (statistics.median(times[f"{kind} {n}"]) * 1e3 for kind in ("one way", "swap"))
        at_rate = n / (rate_bits / 8 * 1448 / 1514) * 1e3
        print(f"{args.rate}, {n} bytes, median of {args.repeats}: one way {one:.2f} ms, swap "
              f"{both:.2f} ms ({both / one:.2f}x); the bytes at the TCP payload rate "
              f"{at_rate:.2f} ms; {swaps} swaps in rounds: mean "
              f"{statistics.fmean(times[f'rounds {n}']) * 1e3:.2f} ms, median "
              f"{statistics.median(times[f'rounds {n}']) * 1e3:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
