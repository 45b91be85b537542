"""One message one way against the same message both ways at once, between two namespaces.

    sudo python benchmarks/swapprobe.py --rate 100mbit --bytes 115000

gtopk's rounds are pairwise swaps: both ranks send at once, over one TCP connection. On the
emulated links (``benchmarks/netns.py``: each rank's egress shaped by tbf) the link
benchmark measured those swaps slower than their bytes at the shaped rate. This probe
times, on a two-rank testbed, a Gloo send from rank 0 to rank 1 alone and a swap of the
same size (``batch_isend_irecv`` both ways), each the median of ``--repeats`` after a
barrier and an idle spell, as the link benchmark's replays are. Needs root.
"""
from __future__ import annotations

import argparse
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

PORT = 29533


def worker(rank: int, master: str, nbytes: int, repeats: int) -> None:
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{PORT}", rank=rank,
                            world_size=2)
    out = torch.zeros(nbytes, dtype=torch.uint8)
    into = torch.empty_like(out)
    peer = 1 - rank

    def one_way() -> None:
        if rank == 0:
            dist.send(out, peer)
        else:
            dist.recv(into, peer)

    def swap() -> None:
        for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, out, peer),
                                            dist.P2POp(dist.irecv, into, peer)]):
            work.wait()

    medians = {}
    for name, step in (("one way", one_way), ("swap", swap)) * 2:  # the second pass counts
        times = []
        for _ in range(repeats):
            dist.barrier()
            time.sleep(0.05)  # an idle spell: the shaper's bucket refills
            dist.barrier()
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        medians[name] = statistics.median(times) * 1e3
    if rank == 1:
        print(json.dumps(medians), flush=True)
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", default="100mbit", help="tc rate of each rank's egress")
    p.add_argument("--bytes", type=int, default=115_000, help="message size")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--worker", nargs=2, metavar=("RANK", "MASTER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(int(args.worker[0]), args.worker[1], args.bytes, args.repeats)
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
    with netns.Testbed(2, args.rate) as testbed:
        procs = [subprocess.Popen(
            testbed.exec_prefix(rank) + [
                sys.executable, __file__, "--bytes", str(args.bytes), "--repeats",
                str(args.repeats), "--worker", str(rank), testbed.address(0)],
            env={**os.environ, "GLOO_SOCKET_IFNAME": testbed.device(rank),
                 "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE, text=True) for rank in range(2)]
        lines = [proc.communicate(timeout=600)[0] for proc in procs]
    medians = json.loads(lines[1].strip().splitlines()[-1])
    at_rate = args.bytes / (rate_bits / 8 * 1448 / 1514) * 1e3
    print(f"{args.rate}, {args.bytes} bytes, median of {args.repeats}: one way "
          f"{medians['one way']:.2f} ms, swap {medians['swap']:.2f} ms "
          f"({medians['swap'] / medians['one way']:.2f}x); the bytes at the TCP payload "
          f"rate {at_rate:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
