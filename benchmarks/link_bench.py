"""Step time of every gradient-exchange scheme on real sockets through a real bandwidth limit.

    sudo python benchmarks/link_bench.py                        # 100 Mbit/s and 1 Gbit/s, p = 2, 4
    sudo python benchmarks/link_bench.py --rates 100mbit --world-sizes 2 --models lenet300
    python benchmarks/link_bench.py --quick                     # loopback, tiny model (CI)

For each (model, rate, p) it builds a testbed (``benchmarks/netns.py``: one network namespace
per rank on a bridge, every rank's egress shaped by tc to ``rate``), starts one
``benchmarks/link_worker.py`` per rank inside its namespace with Gloo bound to the veth, and
prints one table: median step time of dense allreduce, torch's fp16 and PowerSGD hooks, DGC,
DGC on a 2:4 model (mask-aware) and no communication at all (the compute floor); the bytes
each rank sent per step; and the communication time of one step, measured by replaying the
step's collectives alone, against the cost model's prediction (``launch.costmodel``: ring
allreduce 2(p-1)*alpha + 2(p-1)/p * S/B, allgather (p-1)*alpha + (p-1)/p * S_total/B, with B the
shaped rate and alpha from a 4-byte allreduce measured on the same testbed).

``--write`` replaces the "Link benchmark" section of BENCHMARKS.md with the tables.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import netns  # noqa: E402
from launch.costmodel.collectives import allgather, ring_allreduce  # noqa: E402

SECTION = "## Link benchmark"
LABELS = {"dense": "dense allreduce (fp32)", "fp16": "torch fp16_compress_hook",
          "powersgd1": "torch PowerSGD, rank 1", "powersgd4": "torch PowerSGD, rank 4",
          "dgc": "DGC 0.1%, fp16 values, int32 indices",
          "dgc-nm24": "DGC 0.1% on a 2:4 model (mask-aware)",
          "nocomm": "no communication (compute floor)"}
BYTES = {"torch.float32": 4, "torch.float16": 2, "torch.bfloat16": 2, "torch.uint8": 1}


def predicted_comm_s(collectives, p: int, alpha: float, bandwidth: float) -> float:
    total = 0.0
    for kind, numel, dtype in collectives:
        nbytes = numel * BYTES[dtype]
        total += (ring_allreduce(nbytes, p, alpha, bandwidth) if kind == "allreduce"
                  else allgather(p * nbytes, p, alpha, bandwidth))
    return total


def run_workers(model: str, p: int, args, testbed: netns.Testbed | None) -> dict:
    out = Path(tempfile.mkdtemp(prefix="link_bench_")) / "result.json"
    port = 29500 + os.getpid() % 1000
    procs = []
    for rank in range(p):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(p), LOCAL_RANK=str(rank),
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   MASTER_ADDR=testbed.address(0) if testbed else "127.0.0.1",
                   GLOO_SOCKET_IFNAME=testbed.device(rank) if testbed else "lo",
                   PYTHONPATH=str(REPO))
        cmd = [sys.executable, str(REPO / "benchmarks/link_worker.py"), "--model", model,
               "--schemes", args.schemes, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--replay", str(args.replay), "--out", str(out)]
        prefix = testbed.exec_prefix(rank) if testbed else []
        procs.append(subprocess.Popen(prefix + cmd, env=env, cwd=REPO,
                                      stdout=None if rank == 0 else subprocess.DEVNULL))
    deadline = time.monotonic() + args.timeout
    try:
        for proc in procs:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            if rc != 0:
                raise RuntimeError(f"a rank exited with status {rc}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return json.loads(out.read_text())


def table(run: dict, rate: str | None) -> tuple[list[str], dict]:
    p, rows = run["world_size"], {r["scheme"]: r for r in run["results"]}
    alpha = run["probe_allreduce_s"] / (2 * (p - 1))
    bandwidth = netns.parse_rate(rate) / 8 if rate else None
    dense = rows.get("dense", {}).get("step_median_s")
    floor = rows.get("nocomm", {}).get("step_median_s")
    lines = [f"**{run['model']}, {rate or 'loopback'}, p = {p}** (alpha = "
             f"{alpha * 1e6:.0f} us per hop from a 4-byte allreduce)", "",
             "| scheme | step (ms, median) | vs dense | vs compute floor | MB sent / rank / step "
             "| comm measured (ms) | comm predicted (ms) | error |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for scheme, r in rows.items():
        step = r["step_median_s"]
        measured = r["replay_median_s"]
        predicted = (predicted_comm_s(r["collectives"], p, alpha, bandwidth)
                     if bandwidth and r["collectives"] else None)
        r["predicted_comm_s"] = predicted
        error = (f"{100 * (predicted - measured) / measured:+.0f}%"
                 if predicted is not None and measured else "")
        lines.append(
            f"| {LABELS.get(scheme, scheme)} | {step * 1e3:.1f} | "
            f"{dense / step:.2f}x | {step / floor:.2f}x | {r['bytes_per_step'] / 1e6:.4g} | "
            f"{measured * 1e3:.1f} | "
            f"{'' if predicted is None else f'{predicted * 1e3:.1f}'} | {error} |"
            if dense and floor else f"| {scheme} | {step * 1e3:.1f} | | | | | | |")
    return lines, rows


def goals(rows: dict) -> list[str]:
    """The issue's goals for the communication-bound model at 100 Mbit/s."""
    step = {s: r["step_median_s"] for s, r in rows.items()}
    if not {"dense", "dgc", "powersgd4", "nocomm"} <= set(step):
        return []
    checks = [("DGC >= 10x faster per step than dense", step["dense"] / step["dgc"], 10, ">="),
              ("DGC >= 2x faster than PowerSGD rank 4", step["powersgd4"] / step["dgc"], 2, ">="),
              ("DGC within 1.3x of the compute floor", step["dgc"] / step["nocomm"], 1.3, "<=")]
    return [f"- {what}: {value:.2f}x, "
            f"{'met' if (value >= bar if op == '>=' else value <= bar) else 'not met'}"
            for what, value, bar, op in checks]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="100mbit,1gbit", help="tc rates, comma-separated")
    p.add_argument("--world-sizes", default="2,4")
    p.add_argument("--models", default="wide_mlp,lenet300")
    p.add_argument("--schemes", default="dense,fp16,powersgd1,powersgd4,dgc,dgc-nm24,nocomm")
    p.add_argument("--steps", type=int, default=20, help="timed steps per scheme (>= 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--replay", type=int, default=5, help="replays of one step's collectives")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per (model, rate, p)")
    p.add_argument("--quick", action="store_true",
                   help="loopback, no shaping, tiny model, a few steps: checks the script runs")
    p.add_argument("--write", action="store_true", help="put the tables into BENCHMARKS.md")
    p.add_argument("--json", type=Path, help="also write every measurement here")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.rates, args.world_sizes = "tiny", "", "2"
        args.steps, args.warmup, args.replay = 2, 3, 1
    else:
        why = netns.need_root()
        if why:
            print(f"link_bench: {why}; run as root, or use --quick", file=sys.stderr)
            return 2
        for rate in args.rates.split(","):
            try:
                netns.parse_rate(rate)
            except ValueError as err:
                print(f"link_bench: --rates: {err}", file=sys.stderr)
                return 2
    # Leave no namespace behind on Ctrl-C or kill: turn SIGTERM into an exception too.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    started = datetime.datetime.now()
    out, everything = [], []
    for model in args.models.split(","):
        for rate in [r for r in args.rates.split(",") if r] or [None]:
            for world_size in map(int, args.world_sizes.split(",")):
                print(f"[{time.strftime('%H:%M:%S')}] {model}, {rate or 'loopback'}, "
                      f"p={world_size}", flush=True)
                if rate is None:
                    run = run_workers(model, world_size, args, None)
                else:
                    with netns.Testbed(world_size, rate) as testbed:
                        run = run_workers(model, world_size, args, testbed)
                lines, rows = table(run, rate)
                if model == "wide_mlp" and rate == "100mbit":
                    lines += [""] + goals(rows)
                print("\n".join(lines) + "\n", flush=True)
                out += lines + [""]
                everything.append({**run, "rate": rate})
    if args.json:
        args.json.write_text(json.dumps(everything))
    if args.write:
        write_section(out, args, started)
    return 0


def write_section(lines: list[str], args, started: datetime.datetime) -> None:
    load = os.getloadavg()
    command = ("sudo python benchmarks/link_bench.py --rates " + args.rates + " --world-sizes "
               + args.world_sizes + " --models " + args.models + f" --steps {args.steps} --write")
    head = [SECTION, "",
            f"`{command}`, {started:%Y-%m-%d %H:%M} to {datetime.datetime.now():%H:%M}, "
            f"{platform.node() or 'this machine'}: {os.cpu_count()} cores, Linux "
            f"{platform.release()}, Python {platform.python_version()}, torch "
            f"{__import__('torch').__version__}; load average at the end "
            f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}. Medians of {args.steps} timed steps "
            f"after {args.warmup} warm-up steps; all ranks share this machine's cores.", ""]
    path = REPO / "BENCHMARKS.md"
    text = path.read_text()
    start = text.find(SECTION)
    end = text.find("\n## ", start + 1) if start >= 0 else -1
    body = "\n".join(head + lines).rstrip() + "\n"
    if start < 0:
        text = text.rstrip() + "\n\n" + body
    else:
        text = text[:start] + body + ("\n" + text[end + 1:] if end >= 0 else "")
    path.write_text(text)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("link_bench: interrupted; namespaces removed", file=sys.stderr)
        sys.exit(130)
