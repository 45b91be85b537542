"""Step time of every gradient-exchange scheme on real sockets through a real bandwidth
limit, and the hardware cost model checked against the measured communication time.

    sudo python benchmarks/linkbench.py --write               # 100 Mbit/s and 1 Gbit/s, p = 2, 4
    sudo python benchmarks/linkbench.py --rates 100mbit --world-sizes 2 --models lenet300
    sudo python benchmarks/linkbench.py --calibrate --write   # fit the links' alpha and overhead
    sudo python benchmarks/linkbench.py --calibrate-swaps --world-sizes 4 --replay 101  # gtopk
    python benchmarks/linkbench.py --quick                    # CI: a few steps, tiny model

For each (model, rate, p) it builds a testbed (``benchmarks/netns.py``: one network
namespace per rank on a bridge, every rank's egress shaped by tc's tbf to ``rate``), starts
``python -m benchmarks.linkbench_worker`` in each namespace with Gloo bound to the veth, and
prints two tables.

* Step time: the median of ``--steps`` timed steps of dense allreduce, torch's fp16 and
  PowerSGD hooks, DGC, DGC on a 2:4 model (mask-aware) and no communication at all (the
  compute floor), with the bytes each rank sent per step as the hooks count them.
* Hardware model: the communication time of one step, measured by replaying exactly the
  collectives the scheme's hook issued (median of the replays), against
  ``launch.costmodel``'s prediction for the same scheme: its own traffic model of the
  scheme (``costmodel.traffic``) on the link preset of the rate (``configs/hardware/
  netns-100mbit.yaml``, ``netns-1gbit.yaml``), once with the preset's latency and once with
  the latency probed on this testbed by 1 KiB collectives timed alongside the replays (and,
  for gtopk's swaps, a swap's fixed cost probed by the row's own swaps at 1 KiB).

``--calibrate`` measures no model: it times 1 KiB allreduces and allgathers, alone and back to
back, and fits the two constants of the testbed's preset that are not the wire's, a latency
per hop and an overhead per collective, by least squares. ``--calibrate-swaps`` likewise
times gtopk's rounds of swaps (1 KiB to 512 KiB) and fits a preset's two swap constants.
The rows of the link benchmark are not part of either fit, so they check the model out of
sample.

Without root, or with ``--no-net``, the ranks talk over loopback without shaping.
``--write`` replaces the "Link benchmark" section of BENCHMARKS.md with the tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import netns  # noqa: E402
from benchmarks.linkbench_worker import (CALIBRATION, DGC_OPTIONS,  # noqa: E402
                                         GTOPK_BESIDE_OPTIONS, GTOPK_OPTIONS,
                                         INTRA_CALIBRATION, MODELS, ONE_BUCKET_MB,
                                         POWERSGD_START, PROBE, SCHEMES, SWAP_BYTES,
                                         parse_scheme, partners)
from benchmarks.swapprobe import fit_rounds, rounds_time  # noqa: E402
from dgc.options import DGCOptions  # noqa: E402
from launch.cli import (OneLineParser, existing_file, integer, integers,  # noqa: E402
                        output_file, positive)
from launch.costmodel import traffic as tr  # noqa: E402
from launch.costmodel.collectives import (ring_hops, sequence_time,  # noqa: E402
                                          token_bucket_time)
from launch.costmodel.hardware import Cluster, load_cluster  # noqa: E402
from launch.costmodel.storage import expected_masks  # noqa: E402
from launch.models import build_model  # noqa: E402
from sparse_train.options import SparsityOptions  # noqa: E402

SECTION = "## Link benchmark"
CALIBRATION_SECTION = "## Link calibration"
LABELS = {"dense": "dense allreduce (fp32)", "fp16": "torch fp16_compress_hook",
          "powersgd1": "torch PowerSGD, rank 1", "powersgd4": "torch PowerSGD, rank 4",
          "dgc": "DGC 0.1%, fp16 values, int32 indices",
          "dgc-nm24": "DGC 0.1% on a 2:4 model (mask-aware)",
          "dgc-sar": "DGC 0.1%, sparse allreduce",
          "dgc-gtopk": "DGC 0.1%, gtopk", "dgc-gtopk-slices": "DGC 0.1%, gtopk in slices",
          "dgc-gtopk-beside": "DGC 0.1%, gtopk, dense slots allreduced beside",
          "dgc-hier": "hierarchical DGC 0.1%",
          "dgc-hier-sparse": "hierarchical DGC 0.1%, sparse intra-node stage",
          "hierdense": "hierarchical dense allreduce",
          "nocomm": "no communication (compute floor)"}
PRESETS = {"100mbit": "netns-100mbit", "1gbit": "netns-1gbit", None: "cpu-loopback"}
BAR = 0.25  # issue 5: predicted and measured communication time within 25%


def comm_measured(r: dict) -> float:
    """The exchange time the model is checked against: the mean of the replays. The model
    predicts an expected time (a run's communication is the sum over its steps), and on
    this testbed a small exchange's time is bimodal (threads awake or woken), which makes
    the median of a few dozen replays jump between the modes."""
    return statistics.fmean(r["replay_s"]) if r.get("replay_s") else 0.0


def probe_measured(r: dict) -> float:
    return statistics.fmean(r["probe_s"])


class UsageError(Exception):
    pass


# --- running the ranks --------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scheme_args(model: str, args) -> list[str]:
    return ["--model", model, "--schemes", args.schemes, "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--replay", str(args.replay),
            "--replay-budget", str(args.replay_budget), "--interleave", str(args.interleave)]


def run_workers(worker: list[str], p: int, args, testbed: netns.Testbed | None) -> dict:
    """Run ``linkbench_worker`` with the arguments ``worker`` on ``p`` ranks; rank 0's JSON."""
    out = Path(tempfile.mkdtemp(prefix="linkbench_")) / "result.json"
    worker = worker + ["--out", str(out)]
    port = 29500 if testbed else _free_port()  # each testbed has its own port space
    procs = []
    try:
        for rank in range(p):
            per_node = testbed.ranks_per_node if testbed else args.ranks_per_node
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(p),
                       LOCAL_RANK=str(rank % per_node), LOCAL_WORLD_SIZE=str(per_node),
                       MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       MASTER_ADDR=testbed.address(0) if testbed else "127.0.0.1",
                       GLOO_SOCKET_IFNAME=testbed.device(rank) if testbed else "lo",
                       PYTHONPATH=str(REPO))
            prefix = testbed.exec_prefix(rank) if testbed else []
            procs.append(subprocess.Popen(
                prefix + [sys.executable, "-m", "benchmarks.linkbench_worker"] + worker,
                env=env, cwd=REPO, stdout=None if rank == 0 else subprocess.DEVNULL,
                stderr=None if rank == 0 else subprocess.DEVNULL))
        deadline = time.monotonic() + args.timeout
        for proc in procs:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            if rc != 0:
                raise RuntimeError(f"a rank exited with status {rc}")
    finally:
        for proc in procs:  # before the namespaces go: a namespace outlives its processes
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return json.loads(out.read_text())


def run_on(rate: str | None, p: int, worker: list[str], args) -> dict:
    """``run_workers`` on a testbed at ``rate``, or on loopback for None."""
    if rate is None:
        return run_workers(worker, p, args, None)
    with netns.Testbed(p, rate, ranks_per_node=args.ranks_per_node,
                       idle_slow_start=not args.no_idle_slow_start) as testbed:
        return run_workers(worker, p, args, testbed)


# --- the cost model's view ----------------------------------------------------------------

def modelled_traffic(model: str, scheme: str, p: int, per_node: int = 1
                     ) -> tr.Traffic | None:
    """What ``launch.costmodel.traffic`` says the scheme sends per step on this model."""
    if scheme == "nocomm":
        return None
    cfg, shape = MODELS[model]
    with torch.device("meta"):
        net = build_model(cfg, shape, 10)
    params = [(n, tuple(w.shape)) for n, w in net.named_parameters()]
    buckets = tr.ddp_buckets(params, ONE_BUCKET_MB if scheme.startswith("powersgd") else 25)
    if scheme in ("dense", "fp16"):
        return tr.dense(buckets, tr.FP32 if scheme == "dense" else 2, scheme)
    if scheme == "hierdense":
        return tr.hierarchical_dense(buckets, per_node)
    options = DGCOptions(**DGC_OPTIONS, exchange="allgather")
    if scheme == "dgc-hier":
        return tr.hierarchical_dgc(buckets, options, p, per_node, passes=0)
    if scheme == "dgc-hier-sparse":
        options = DGCOptions(**DGC_OPTIONS, dense_fallback=False)
        return tr.hierarchical_sparse_dgc(buckets, options, p, per_node, passes=0)
    if scheme == "dgc-sar":
        options = DGCOptions(**DGC_OPTIONS, exchange="sparse_allreduce")
    if scheme == "dgc-gtopk":
        options = DGCOptions(**GTOPK_OPTIONS)
    if scheme == "dgc-gtopk-slices":
        options = DGCOptions(**GTOPK_OPTIONS, gtopk_slices=True)
    if scheme == "dgc-gtopk-beside":
        options = DGCOptions(**GTOPK_BESIDE_OPTIONS)
    kind, parameter = parse_scheme(scheme)
    if kind == "powersgd":
        return tr.powersgd(buckets, int(parameter), passes=0)
    live = None
    if scheme == "dgc-nm24":
        masks = expected_masks(net, SparsityOptions(method="nm", n=2, m=4))
        live = {name: int(mask.sum()) for name, mask in masks.items()}
    return tr.dgc(buckets, options, p, passes=0, live=live,
                  density=parameter if kind == "dgc" else None, per_node=per_node)


def with_link(cluster: Cluster, **fields) -> Cluster:
    """``cluster`` with ``fields`` of its (one, flat) link replaced."""
    link = dataclasses.replace(cluster.inter, **fields)
    return dataclasses.replace(cluster, intra=link, inter=link)


def _collectives(calls: list) -> list[tuple]:
    """(kind, nbytes, group) for the cost model of the worker's (kind, numel, dtype[,
    group]) calls."""
    return [(kind, numel * getattr(torch, dtype.split(".")[-1]).itemsize,
             group[0] if group else "world") for kind, numel, dtype, *group in calls]


def probed_alpha(probe_s: float, cluster: Cluster, p: int) -> float:
    """Latency per hop from the probe (a 1 KiB allreduce then a 1 KiB allgather): its time
    less the two collectives' overhead and the transfer time (none: 1 KiB fits in the
    bucket), over its hops."""
    link = cluster.inter
    hops = [ring_hops(kind, nbytes, p) for kind, nbytes, _ in _collectives(PROBE)]
    wire = token_bucket_time(hops, 0.0, link.bandwidth, link.burst)
    return max(0.0, probe_s - len(hops) * link.overhead - wire) / sum(h for h, _ in hops)


def probed_swap(r: dict, cluster: Cluster) -> float:
    """A swap's fixed cost from the swap probe (the row's swaps at 1 KiB each, timed beside
    its replays): the probe's time less its bytes' (none past the bucket), over its swaps."""
    link = cluster.inter
    swaps = sum(call[0] == "sendrecv" for call in r["collectives"])
    wire = rounds_time(link, SWAP_BYTES[0], swaps, 0.0, link.swap_slowdown)
    return max(0.0, statistics.fmean(r["swap_probe_s"]) - wire) / swaps


def preset_of(rate: str | None, per_node: int):
    """The testbed's cluster preset: one rank per namespace, or two-node namespaces."""
    return load_cluster(PRESETS[rate] if per_node == 1 or rate is None
                        else f"netns2n-{rate}")


def predictions(run: dict, rate: str | None) -> None:
    """Add the model's bytes and times to every row of ``run``."""
    p, per_node = run["world_size"], run.get("ranks_per_node", 1)
    preset = preset_of(rate, per_node)
    run["preset"], run["alpha_preset_s"] = preset.name, preset.inter.latency
    run["overhead_preset_s"] = preset.inter.overhead
    for r in run["results"]:
        traffic = modelled_traffic(run["model"], r["scheme"], p, per_node)
        if traffic is None:
            continue
        calls = [(c.kind, c.nbytes, c.group) for c in traffic.collectives]
        r["model_bytes"] = traffic.wire_bytes(p, per_node)
        r["model_collectives"] = calls
        r["predicted_preset_s"] = sequence_time(calls, preset, p, "ring")
        if per_node == 1:  # a probe of the one link class there is
            r["alpha_probed_s"] = probed_alpha(probe_measured(r), preset, p)
            probed = {"latency_us": r["alpha_probed_s"] * 1e6}
            if r.get("swap_probe_s") and preset.inter.swap_us:
                r["swap_probed_s"] = probed_swap(r, preset)
                probed["swap_us"] = r["swap_probed_s"] * 1e6
            r["predicted_probed_s"] = sequence_time(calls, with_link(preset, **probed), p, "ring")


# --- calibration: the testbed's latency and overhead -----------------------------------------

def calibration_rows(runs: list[dict], overhead: float = 0.0, alpha: float = 0.0) -> list[dict]:
    """Per (run, shape of CALIBRATION): its collectives, hops, measured mean and the model's
    time with this ``overhead`` per collective and ``alpha`` per hop."""
    rows = []
    for run in runs:
        p, preset = run["world_size"], preset_of(run["rate"], run.get("ranks_per_node", 1))
        link = with_link(preset, latency_us=alpha * 1e6, overhead_us=overhead * 1e6)
        for shape, calls in CALIBRATION.items():
            collectives = _collectives(calls)
            rows.append({"rate": run["rate"], "p": p, "shape": shape, "n": len(calls),
                         "hops": sum(ring_hops(kind, nbytes, p)[0]
                                     for kind, nbytes, _ in collectives),
                         "measured": statistics.fmean(run["calibration"][shape]),
                         "count": len(run["calibration"][shape]),
                         "predicted": sequence_time(collectives, link, p, "ring")})
    return rows


def fit_calibration(runs: list[dict]) -> tuple[float, float]:
    """(overhead per collective, latency per hop) in seconds that fit the calibration runs
    best, by least squares on relative error. The model's time of a shape is n * overhead +
    hops * alpha + its transfer time, which the shapes' 1 KiB messages keep independent of
    the two (they fit in the bucket)."""
    rows = calibration_rows(runs)  # with overhead and alpha 0: the transfer time alone
    a = np.array([[r["n"] / r["measured"], r["hops"] / r["measured"]] for r in rows])
    b = np.array([1 - r["predicted"] / r["measured"] for r in rows])
    overhead, alpha = np.linalg.lstsq(a, b, rcond=None)[0]
    return max(0.0, float(overhead)), max(0.0, float(alpha))


def calibration_report(runs: list[dict]) -> list[str]:
    overhead, alpha = fit_calibration(runs)
    lines = [f"Fit over all rows: **overhead {overhead * 1e6:.0f} us per collective, latency "
             f"{alpha * 1e6:.0f} us per hop** (least squares on relative error).", ""]
    for rate in dict.fromkeys(run["rate"] for run in runs):
        o, a = fit_calibration([run for run in runs if run["rate"] == rate])
        lines.append(f"- {rate or 'loopback'} alone: overhead {o * 1e6:.0f} us, latency "
                     f"{a * 1e6:.0f} us")
    lines += ["", "| link | p | collectives (1 KiB each) | hops | measured (ms, mean) "
              "| fitted model (ms) | error |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in calibration_rows(runs, overhead, alpha):
        lines.append(f"| {r['rate'] or 'loopback'} | {r['p']} | {r['shape']} | {r['hops']} | "
                     f"{_ms(r['measured'])} ({r['count']}) | {_ms(r['predicted'])} | "
                     f"{_error(r['predicted'], r['measured'])} |")
    return lines


# Ways to model the emulated links, from the plain Ethernet presets to the one used above:
# each row of the summary adds one of the corrections the link benchmark led to.
WIRE_PRESETS = {"100mbit": "cpu-100mbit", "1gbit": "cpu-1gbe"}
VARIANTS = {
    "Ethernet preset (cpu-100mbit, cpu-1gbe): line rate, assumed latency, no bucket":
        lambda run, r: load_cluster(WIRE_PRESETS[run["rate"]]),
    "netns preset, but no overhead per collective (latency per hop only)":
        lambda run, r: with_link(load_cluster(PRESETS[run["rate"]]), overhead_us=0.0),
    "netns preset: TCP payload rate, tbf's bucket, calibrated latency and overhead":
        lambda run, r: load_cluster(PRESETS[run["rate"]]),
    "netns preset, probed latency, but no bucket":
        lambda run, r: _probed_link(run, r, burst_kbytes=0.0),
    "netns preset, probed latency, but line rate":
        lambda run, r: _probed_link(run, r, bandwidth_gbytes=netns.parse_rate(run["rate"]) / 8e9),
    "netns preset, probed latency (the last column above)": lambda run, r: _probed_link(run, r),
}


def _probed_link(run: dict, r: dict, **fields) -> Cluster:
    """The rate's preset with the latency probed beside row ``r``'s replays (and a swap's
    fixed cost, where its swaps were probed), and ``fields``."""
    if "swap_probed_s" in r:
        fields["swap_us"] = r["swap_probed_s"] * 1e6
    return with_link(load_cluster(PRESETS[run["rate"]]), latency_us=r["alpha_probed_s"] * 1e6,
                     **fields)


def variant_table(runs: list[dict]) -> list[str]:
    """How many rows each way of modelling the links predicts within the bar."""
    lines = ["| model of the links | rows within 25% | median abs. error | largest abs. error |",
             "|---|---:|---:|---:|"]
    for name, cluster_of in VARIANTS.items():
        errors = [abs(sequence_time(r["model_collectives"], cluster_of(run, r),
                                    run["world_size"], "ring") / comm_measured(r) - 1)
                  for run in runs if run["rate"] and run.get("ranks_per_node", 1) == 1
                  for r in run["results"] if "model_collectives" in r and comm_measured(r)]
        if errors:
            lines.append(f"| {name} | {sum(e <= BAR for e in errors)} of {len(errors)} | "
                         f"{statistics.median(errors):.0%} | {max(errors):.0%} |")
    return lines


# --- tables -------------------------------------------------------------------------------

def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.1f}" if seconds >= 0.01 \
        else f"{seconds * 1e3:.2f}"


def _error(predicted: float | None, measured: float) -> str:
    if predicted is None or not measured:
        return ""
    e = (predicted - measured) / measured
    return f"{e:+.0%}" + ("" if abs(e) <= BAR else " ✗")


def step_table(run: dict) -> list[str]:
    rows = {r["scheme"]: r for r in run["results"]}
    dense = rows.get("dense", {}).get("step_median_s")
    floor = rows.get("nocomm", {}).get("step_median_s")
    nodes = run.get("ranks_per_node", 1) > 1  # the two-node testbed: bytes by link class
    lines = [f"**{run['model']}, {run['rate'] or 'loopback'}, p = {run['world_size']}"
             + (f" as {run['world_size'] // run['ranks_per_node']} nodes x "
                f"{run['ranks_per_node']}" if nodes else "") + "** "
             f"(load average {run['load'][0]:.1f} before, {run['load'][1]:.1f} after)", "",
             "| scheme | step (ms, median) | speedup over dense | x compute floor "
             "| MB sent / rank / step |" + (" of which between nodes |" if nodes else "")
             + " comm, replayed (ms) |",
             "|---|---:|---:|---:|---:|" + ("---:|" if nodes else "") + "---:|"]
    for scheme, r in rows.items():
        step = r["step_median_s"]
        lines.append(f"| {LABELS.get(scheme, scheme)} | {_ms(step)} | "
                     f"{f'{dense / step:.2f}x' if dense else ''} | "
                     f"{f'{step / floor:.2f}x' if floor else ''} | "
                     f"{r['bytes_per_step'] / 1e6:.4g} | "
                     + (f"{r.get('bytes_inter_per_step', 0.0) / 1e6:.4g} | " if nodes else "")
                     + f"{_ms(r['replay_median_s'])} |")
    return lines


def goals(run: dict) -> list[str]:
    """Issue 6's goals for the communication-bound model at 100 Mbit/s."""
    step = {r["scheme"]: r["step_median_s"] for r in run["results"]}
    if not {"dense", "dgc", "powersgd4", "nocomm"} <= set(step):
        return []
    checks = [("DGC >= 10x faster per step than dense", step["dense"] / step["dgc"], 10, 1),
              ("DGC >= 2x faster than PowerSGD rank 4", step["powersgd4"] / step["dgc"], 2, 1),
              ("DGC within 1.3x of the compute floor", step["dgc"] / step["nocomm"], 1.3, -1)]
    return [f"- {what}: {value:.2f}x, {'met' if sign * (value - bar) >= 0 else 'not met'}"
            for what, value, bar, sign in checks]


MODEL_HEADER = ["| model | link | p | scheme | collectives | MB / rank / step: counted "
                "| modelled | comm measured (ms, mean) | predicted, preset alpha (ms) | error "
                "| probed alpha (us) | predicted, probed (ms) | error | step - floor (ms) |",
                "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]


def model_rows(run: dict) -> list[str]:
    rows = {r["scheme"]: r for r in run["results"]}
    floor = rows.get("nocomm", {}).get("step_median_s")
    lines = []
    for scheme, r in rows.items():
        if "model_bytes" not in r:
            continue
        kinds = [call[0] for call in r["collectives"]]
        calls = ", ".join(f"{kinds.count(k)} {k}" for k in
                          ("allreduce", "allgather", "reduce_scatter", "all_to_all", "sendrecv")
                          if k in kinds)
        measured = comm_measured(r)
        lines.append(
            f"| {run['model']} | {run['rate'] or 'loopback'} | {run['world_size']} | "
            f"{LABELS.get(scheme, scheme)} | {calls} | {r['bytes_per_step'] / 1e6:.4g} | "
            f"{r['model_bytes'] / 1e6:.4g} | {_ms(measured)} ({len(r['replay_s'])}) | "
            f"{_ms(r['predicted_preset_s'])} | {_error(r['predicted_preset_s'], measured)} | "
            + (f"{_probed(r)} | {_ms(r['predicted_probed_s'])} | "
               f"{_error(r['predicted_probed_s'], measured)} | " if "alpha_probed_s" in r
               else " |  |  | ") +
            f"{_ms(r['step_median_s'] - floor) if floor else ''} |")
    return lines


def _probed(r: dict) -> str:
    """The probed alpha in us, and a swap's probed fixed cost after it where there is one."""
    alpha = f"{r['alpha_probed_s'] * 1e6:.0f}"
    return alpha + (f" / swap {r['swap_probed_s'] * 1e6:.0f}" if "swap_probed_s" in r else "")


def model_note(run: dict) -> str:
    alphas = [r["alpha_probed_s"] * 1e6 for r in run["results"] if "alpha_probed_s" in r]
    probed = (f"; probed alpha {min(alphas):.0f} to {max(alphas):.0f} us per hop" if alphas
              else "")
    swaps = [r["swap_probed_s"] * 1e6 for r in run["results"] if "swap_probed_s" in r]
    if swaps:
        spread = (f"{min(swaps):.0f}" if len(swaps) == 1
                  else f"{min(swaps):.0f} to {max(swaps):.0f}")
        probed += (f", a swap {spread} us (preset "
                   f"{preset_of(run['rate'], 1).inter.swap_us:.0f} us)")
    return (f"{run['model']}, {run['rate'] or 'loopback'}, p = {run['world_size']} "
            f"({run.get('ranks_per_node', 1)} per node): preset {run['preset']} (alpha "
            f"{run['alpha_preset_s'] * 1e6:.0f} us, overhead {run['overhead_preset_s'] * 1e6:.0f}"
            f" us per collective){probed}")


def hierarchical_goals(run: dict) -> list[str]:
    """Issue 15's bars on the two-node testbed: hierarchical DGC's step against flat DGC's
    and hierarchical dense's, and its bytes between nodes against flat DGC's over the ranks
    per node, plus the tensors DGC sends whole (an upper bound of their share)."""
    rows = {r["scheme"]: r for r in run["results"]}
    per_node = run.get("ranks_per_node", 1)
    if per_node == 1 or not {"dgc", "dgc-hier", "hierdense"} <= set(rows):
        return []
    step = {scheme: r["step_median_s"] for scheme, r in rows.items()}
    hier, flat = rows["dgc-hier"], rows["dgc"]
    bound = flat["bytes_inter_per_step"] / per_node + hier["bytes_whole_per_step"]
    checks = [("hierarchical DGC's step faster than flat DGC's", step["dgc"] / step["dgc-hier"]),
              ("hierarchical DGC's step faster than hierarchical dense's",
               step["hierdense"] / step["dgc-hier"])]
    if "dgc-hier-sparse" in step:
        checks += [("hierarchical DGC, sparse intra-node stage, faster than flat DGC's",
                    step["dgc"] / step["dgc-hier-sparse"]),
                   ("hierarchical DGC, sparse intra-node stage, faster than hierarchical "
                    "dense's", step["hierdense"] / step["dgc-hier-sparse"])]
    lines = [f"- {what}: {value:.2f}x, {'met' if value > 1 else 'not met'}"
             for what, value in checks]
    lines.append(f"- bytes between nodes per rank and step: hierarchical DGC "
                 f"{hier['bytes_inter_per_step'] / 1e3:.4g} kB, flat DGC "
                 f"{flat['bytes_inter_per_step'] / 1e3:.4g} kB; bound (flat / {per_node} + "
                 f"{hier['bytes_whole_per_step'] / 1e3:.4g} kB of tensors sent whole) "
                 f"{bound / 1e3:.4g} kB: "
                 f"{'met' if hier['bytes_inter_per_step'] <= bound else 'not met'}")
    if "dgc-hier-sparse" in rows:
        sparse = rows["dgc-hier-sparse"]
        bound = flat["bytes_inter_per_step"] / per_node + sparse["bytes_whole_per_step"]
        lines.append(f"- the same with the sparse intra-node stage: "
                     f"{sparse['bytes_inter_per_step'] / 1e3:.4g} kB against the bound "
                     f"{bound / 1e3:.4g} kB: "
                     f"{'met' if sparse['bytes_inter_per_step'] <= bound else 'not met'}")
    return lines


def report(run: dict) -> list[str]:
    lines = step_table(run)
    if run["model"] == "wide_mlp" and run["rate"] == "100mbit":
        lines += [""] + (hierarchical_goals(run) if run.get("ranks_per_node", 1) > 1
                         else goals(run))
    return lines + ["", model_note(run), ""] + MODEL_HEADER + model_rows(run)


# --- main ---------------------------------------------------------------------------------

def parse(argv) -> argparse.Namespace:
    p = OneLineParser(prog="linkbench", description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="100mbit,1gbit", help="tc rates, comma-separated")
    p.add_argument("--world-sizes", type=integers(2), default="2,4")
    p.add_argument("--ranks-per-node", type=integer(1), default=1,
                   help="ranks sharing each namespace (a node): 2 gives the two-node "
                        "testbed of the hierarchical schemes")
    p.add_argument("--no-idle-slow-start", action="store_true",
                   help="TCP keeps a connection's congestion window over idle spells "
                        "(net.ipv4.tcp_slow_start_after_idle=0 in every namespace)")
    p.add_argument("--models", default="lenet300,wide_mlp")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--steps", type=integer(1), default=20, help="timed steps per scheme")
    p.add_argument("--interleave", type=integer(1), default=1, metavar="BLOCKS",
                   help="build all schemes of a (model, rate, p) at once and time their steps "
                        "in this many blocks taken in turn, so that the machine's drift falls "
                        "on every scheme alike (memory: every scheme's model at once)")
    p.add_argument("--warmup", type=integer(0), default=2,
                   help="untimed steps first (PowerSGD: at least until it compresses)")
    p.add_argument("--replay", type=integer(1), default=201,
                   help="most replays of a step's collectives")
    p.add_argument("--replay-budget", type=positive, default=30.0,
                   help="seconds of replays per scheme (at least 3 replays)")
    p.add_argument("--timeout", type=positive, default=5400, help="seconds per (model, rate, p)")
    p.add_argument("--calibrate", action="store_true",
                   help="measure no model: time 1 KiB collectives alone and back to back, "
                        "--replay rounds, and fit the links' overhead and latency")
    p.add_argument("--calibrate-intra", action="store_true",
                   help="measure no model: on the two-node testbed (--ranks-per-node), time "
                        "the node groups' reduce-scatters and allgathers of 1 KiB to 64 MiB and "
                        "fit the intra-node link's bandwidth")
    p.add_argument("--calibrate-swaps", action="store_true",
                   help="measure no model: time gtopk's rounds (recursive doubling of two "
                        "buckets, 1 KiB to 512 KiB a swap) in the benchmark's own workers and "
                        "fit each rate's swap_us and swap_slowdown")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, a few steps, p = 2: checks that the script runs")
    p.add_argument("--no-net", action="store_true",
                   help="loopback without namespaces or shaping (the default without root)")
    p.add_argument("--write", action="store_true",
                   help="replace the Link benchmark section of BENCHMARKS.md with the tables")
    p.add_argument("--json", type=output_file, help="also write every measurement here")
    p.add_argument("--from-json", type=existing_file,
                   help="measure nothing: print the tables of an earlier --json file, with "
                        "the cost model as it is now")
    args = p.parse_args(argv)
    if args.quick:  # two nodes of the testbed
        args.models, args.steps, args.warmup = "tiny", 2, 1
        args.world_sizes = [2 * args.ranks_per_node]
        args.replay, args.replay_budget, args.rates = 2, 1.0, "100mbit"
    for model in args.models.split(","):
        if model not in MODELS:
            raise UsageError(f"--models: unknown model {model!r} (known: {', '.join(MODELS)})")
    for scheme in args.schemes.split(","):
        try:
            parse_scheme(scheme)
        except ValueError as err:
            raise UsageError(f"--schemes: {err}") from None
    if args.calibrate + args.calibrate_intra + args.calibrate_swaps > 1:
        raise UsageError("--calibrate, --calibrate-intra and --calibrate-swaps exclude each "
                         "other")
    if args.interleave > args.steps:
        raise UsageError(f"--interleave must be between 1 and --steps ({args.steps}), "
                         f"got {args.interleave}")
    if any(p % args.ranks_per_node for p in args.world_sizes):
        raise UsageError(f"--ranks-per-node {args.ranks_per_node} must divide every world "
                         f"size")
    if args.calibrate_intra and args.ranks_per_node < 2:
        raise UsageError("--calibrate-intra needs --ranks-per-node 2 or more")
    if args.calibrate_swaps and args.ranks_per_node != 1:
        raise UsageError("--calibrate-swaps times one rank per namespace: drop "
                         "--ranks-per-node")
    if args.calibrate_swaps and any(p & (p - 1) for p in args.world_sizes):
        raise UsageError(f"--calibrate-swaps: gtopk's rounds need powers of two, got "
                         f"--world-sizes {','.join(map(str, args.world_sizes))}")
    args.rates = [r for r in args.rates.split(",") if r]
    if not args.rates:
        raise UsageError("--rates: no rate given")
    for rate in args.rates:
        try:
            netns.parse_rate(rate)
        except ValueError as err:
            raise UsageError(f"--rates: {err}") from None
        if rate not in PRESETS:
            raise UsageError(f"--rates: no link preset for {rate!r} in configs/hardware "
                             f"(have {', '.join(r for r in PRESETS if r)})")
    if args.from_json:
        args.measured = measured(args.from_json, "calibration" if args.calibrate
                                 or args.calibrate_swaps else "results")
    return args


def measured(path: Path, key: str) -> list[dict]:
    """The runs of an earlier ``--json`` file, each holding ``key``; UsageError if not."""
    try:
        runs = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"--from-json: cannot read {path} as JSON ({err})") from None
    if not (runs and isinstance(runs, list)
            and all(isinstance(run, dict) and key in run for run in runs)):
        raise UsageError(f"--from-json: {path} holds no runs with {key!r} (the --json of "
                         f"this mode)")
    return runs


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv=None) -> int:
    try:
        args = parse(argv)
    except UsageError as err:
        print(f"linkbench: {err}", file=sys.stderr)
        return 2
    if args.from_json and args.calibrate:
        write_calibration(args.measured, args.write)
        return 0
    if args.from_json and args.calibrate_swaps:
        print("\n".join(swap_report(args.measured)))
        return 0
    if args.from_json:
        runs = args.measured
        for run in runs:
            predictions(run, run["rate"])
            print("\n".join(report(run)) + "\n")
        print("\n".join(variant_table(runs)))
        if args.write:
            write_section(runs, rerendered(args.from_json, (REPO / "BENCHMARKS.md").read_text()))
        return 0
    why = netns.need_root()
    if args.no_net or (args.quick and why):
        args.rates = [None]
    elif why:
        print(f"linkbench: {why}; run as root, or use --quick or --no-net", file=sys.stderr)
        return 2
    # Ctrl-C, kill and a closed terminal all unwind through the testbed's cleanup.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    if args.rates != [None]:
        stale = netns.sweep()
        if stale:
            print(f"removed {len(stale)} namespaces and links of a killed run", flush=True)
    started = datetime.datetime.now()
    if args.calibrate:
        return calibrate(args, argv, started)
    if args.calibrate_intra:
        return calibrate_intra(args, argv, started)
    if args.calibrate_swaps:
        return calibrate_swaps(args, argv, started)
    runs = []
    for model in args.models.split(","):
        for rate in args.rates:
            for world_size in args.world_sizes:
                print(f"[{time.strftime('%H:%M:%S')}] {model}, {rate or 'loopback'}, "
                      f"p={world_size}", flush=True)
                before = os.getloadavg()[0]
                run = run_on(rate, world_size, scheme_args(model, args), args)
                run.update(rate=rate, load=(before, os.getloadavg()[0]),
                           ranks_per_node=args.ranks_per_node)
                predictions(run, rate)
                runs.append(run)
                print("\n".join(report(run)) + "\n", flush=True)
    print("\n".join(variant_table(runs)))
    if args.json:
        args.json.write_text(json.dumps(runs))
    if args.write:
        write_section(runs, measured_by(argv if argv is not None else sys.argv[1:], args,
                                        started))
    return 0


def calibrate(args, argv, started: datetime.datetime) -> int:
    runs = _calibration_runs(args, argv, started, "--calibrate", "calibration",
                             "Each shape timed")
    write_calibration(runs, args.write)
    return 0


def _calibration_runs(args, argv, started: datetime.datetime, option: str, label: str,
                      timed: str) -> list[dict]:
    """The workers' ``option`` on every (rate, world size), each run labelled with how it
    was measured, and written to ``--json``."""
    runs = []
    for rate in args.rates:
        for world_size in args.world_sizes:
            print(f"[{time.strftime('%H:%M:%S')}] {label}, {rate or 'loopback'}, "
                  f"p={world_size}", flush=True)
            run = run_on(rate, world_size, [option, str(args.replay)], args)
            runs.append(dict(run, rate=rate, ranks_per_node=args.ranks_per_node))
    header = (f"{ran(argv if argv is not None else sys.argv[1:], started)} {timed} "
              f"{args.replay} times in turn with the others, after an idle spell and a barrier, "
              f"as the replays of the link benchmark are.")
    for run in runs:
        run["measured_by"] = header
    if args.json:
        args.json.write_text(json.dumps(runs))
    return runs


# The large-message regime of the intra-node fit: the wide MLP's buckets inside a node.
LARGE_MESSAGE_BYTES = 8e6


def intra_rows(run: dict, per_node: int, fit: tuple[float, float] = (0.0, math.inf)
               ) -> list[dict]:
    """Per shape of INTRA_CALIBRATION: the bytes a rank sends, its median time, and the
    time of ``fit`` = (seconds per collective, bandwidth)."""
    rows = []
    for shape, ((kind, numel, dtype, _),) in INTRA_CALIBRATION.items():
        hops, chunk = ring_hops(kind, numel * 4, per_node)
        times = run["calibration"][shape]
        rows.append({"shape": shape, "sent": hops * chunk, "count": len(times),
                     "measured": statistics.median(times),
                     "fitted": fit[0] + hops * chunk / fit[1]})
    return rows


def fit_intra(rows: list[dict]) -> tuple[float, float]:
    """(seconds per collective, bytes/s) fitting ``t = c + sent / B`` by least squares on
    relative error."""
    a = np.array([[1 / r["measured"], r["sent"] / r["measured"]] for r in rows])
    c, inverse = np.linalg.lstsq(a, np.ones(len(rows)), rcond=None)[0]
    return max(0.0, float(c)), 1.0 / float(inverse)


def calibrate_intra(args, argv, started: datetime.datetime) -> int:
    """Time the node groups' collectives on the two-node testbed and fit their link."""
    rate, p = args.rates[0], 2 * args.ranks_per_node
    print(f"[{time.strftime('%H:%M:%S')}] intra-node calibration, p={p} as 2 nodes x "
          f"{args.ranks_per_node}", flush=True)
    run = run_on(rate, p, ["--calibrate-intra", str(args.replay)], args)
    rows = intra_rows(run, args.ranks_per_node)
    fit = fit_intra(rows)
    large = fit_intra([r for r in rows if r["sent"] >= LARGE_MESSAGE_BYTES])
    run.update(measured_by=f"{ran(argv if argv is not None else sys.argv[1:], started)}",
               fit={"per_collective_s": fit[0], "bandwidth_bytes_s": fit[1]},
               fit_large={"per_collective_s": large[0], "bandwidth_bytes_s": large[1]})
    if args.json:
        args.json.write_text(json.dumps(run))
    lines = [f"Fit: **{fit[0] * 1e6:.0f} us per collective, {fit[1] / 1e9:.3f} GB/s** "
             f"(t = c + bytes sent per rank / B, least squares on relative error); over the "
             f"messages of {LARGE_MESSAGE_BYTES / 1e6:.0f} MB or more: {large[0] * 1e6:.0f} us, "
             f"{large[1] / 1e9:.3f} GB/s.", "",
             "| collective (per node group) | MB sent / rank | measured (ms, median) "
             "| fitted (ms) | error |", "|---|---:|---:|---:|---:|"]
    for r in intra_rows(run, args.ranks_per_node, fit):
        lines.append(f"| {r['shape']} | {r['sent'] / 1e6:.3g} | {_ms(r['measured'])} "
                     f"({r['count']}) | {_ms(r['fitted'])} | "
                     f"{_error(r['fitted'], r['measured'])} |")
    print("\n".join(lines))
    return 0


def calibrate_swaps(args, argv, started: datetime.datetime) -> int:
    """Time gtopk's rounds on each testbed in the link benchmark's own workers, as its
    replays are timed, and fit each rate's swap constants (``swapprobe.fit_rounds``)."""
    runs = _calibration_runs(args, argv, started, "--calibrate-swaps", "swap calibration",
                             "Each size's rounds timed")
    print("\n".join(swap_report(runs)))
    return 0


def swap_rows(runs: list[dict]) -> list[dict]:
    """Per (rate, p, size) of ``--calibrate-swaps`` runs: how many swaps the two buckets'
    rounds make, the bytes of each, and the rounds' measured mean, median and count."""
    rows = []
    for run in runs:
        p = run["world_size"]
        for shape, times in run["calibration"].items():
            rows.append({"rate": run["rate"], "p": p, "bytes": int(shape.split()[-1]),
                         "swaps": len(partners(0, p)), "mean": statistics.fmean(times),
                         "median": statistics.median(times), "count": len(times)})
    return rows


def swap_report(runs: list[dict]) -> list[str]:
    """Each rate's fitted swap constants, and every size's rounds against the model with
    them and with the constants its preset has now."""
    lines, every = [], swap_rows(runs)
    for rate in dict.fromkeys(run["rate"] for run in runs):
        link = preset_of(rate, 1).inter
        rows = [r for r in every if r["rate"] == rate]
        fixed, slowdown = fit_rounds(link, [(r["bytes"], r["swaps"], r["mean"]) for r in rows])
        alpha, overhead, slower = link.swap  # what the model prices a swap by today
        lines += [f"**{rate or 'loopback'}: swap_us {fixed * 1e6:.0f}, swap_slowdown "
                  f"{slowdown:.2f}** (the preset `{PRESETS[rate]}` now: swap_us "
                  f"{link.swap_us:.0f}, swap_slowdown {link.swap_slowdown:.2f})", "",
                  "| p | bytes a swap | swaps | measured (ms, mean) | median | fitted (ms) "
                  "| error | with the preset's constants (ms) | error |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            fitted = rounds_time(link, r["bytes"], r["swaps"], fixed, slowdown)
            preset = token_bucket_time([(1, r["bytes"])] * r["swaps"], alpha, link.bandwidth,
                                       link.burst, overhead, slower)
            lines.append(f"| {r['p']} | {r['bytes']} | {r['swaps']} | {_ms(r['mean'])} "
                         f"({r['count']}) | {_ms(r['median'])} | {_ms(fitted)} | "
                         f"{_error(fitted, r['mean'])} | {_ms(preset)} | "
                         f"{_error(preset, r['mean'])} |")
        lines.append("")
    return lines


def write_calibration(runs: list[dict], write: bool) -> None:
    """Print the calibration's fit and table; with ``write``, also into BENCHMARKS.md."""
    lines = calibration_report(runs)
    print("\n".join(lines))
    if write:
        replace_section(CALIBRATION_SECTION, [CALIBRATION_SECTION, "",
                                              runs[0]["measured_by"], ""] + lines)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    return (f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def ran(argv: list[str], started: datetime.datetime) -> str:
    """The command line of this run, when and where it ran."""
    command = " ".join(["python", "benchmarks/linkbench.py", *argv])
    return (f"`{command}` (as root), {started:%Y-%m-%d %H:%M} to "
            f"{datetime.datetime.now():%H:%M}, on {machine()}.")


def measured_by(argv: list[str], args, started: datetime.datetime) -> str:
    blocks = (f", taken in {args.interleave} blocks in turn with the other schemes'"
              if args.interleave > 1 else "")
    return (f"{ran(argv, started)} Medians of {args.steps} timed "
            f"steps{blocks} after {args.warmup} warm-up steps (PowerSGD: until it compresses, "
            f"{POWERSGD_START + 1} at least). All ranks share this "
            f"machine's cores; the load average before and after each block is in its title. "
            f"Inputs are synthetic (random tensors of the datasets' shapes, batch 64 per rank).")


def rerendered(source: Path, text: str) -> str:
    """The header of a section re-rendered from ``source``: the measuring run's own header
    where BENCHMARKS.md still has it."""
    start = text.find(SECTION)
    old = text[start:].split("\n\n")[1] if start >= 0 else ""
    if "benchmarks/linkbench.py" not in old:
        old = f"Measured earlier into `{source}`."
    return (old.split(" Tables re-rendered")[0] + f" Tables re-rendered from those measurements "
            f"by `python benchmarks/linkbench.py --from-json {source} --write` on "
            f"{datetime.date.today()}, with the cost model as it is in this tree.")


def write_section(runs: list[dict], header: str) -> None:
    body = [SECTION, "", header, ""]
    for run in runs:
        body += step_table(run) + [""]
        if run["model"] == "wide_mlp" and run["rate"] == "100mbit":
            body += goals(run) + [""]
    body += ["### Hardware model against the shaped links", ""]
    body += [f"- {model_note(run)}" for run in runs] + [""]
    body += MODEL_HEADER + [line for run in runs for line in model_rows(run)] + [""]
    body += variant_table(runs)
    replace_section(SECTION, body)


def replace_section(title: str, body: list[str]) -> None:
    """Put ``body`` (which starts with ``title``) in BENCHMARKS.md in place of the section
    ``title``, or at the end."""
    path = REPO / "BENCHMARKS.md"
    text = path.read_text()
    start = text.find(title)
    end = text.find("\n## ", start + 1) if start >= 0 else -1
    section = "\n".join(body).rstrip() + "\n"
    if start < 0:
        text = text.rstrip() + "\n\n" + section
    else:
        text = text[:start] + section + ("\n" + text[end + 1:] if end >= 0 else "")
    path.write_text(text)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as err:
        print(f"linkbench: interrupted ({err or 'SIGINT'}); namespaces removed",
              file=sys.stderr)
        sys.exit(130)
