"""One rank of ``benchmarks/linkbench.py``: time training steps of each scheme, then replay
the scheme's collectives alone.

Started once per rank (inside its network namespace) as ``python -m
benchmarks.linkbench_worker`` with torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, ...).
For each scheme it builds the model afresh on the same
seed, wraps it in DDP with the scheme's hook, runs ``--warmup`` untimed steps and
``--steps`` timed ones (a barrier before each, so all ranks start a step together; rank 0's
wall time per step; with ``--interleave BLOCKS`` every scheme is built first and their
timed steps come in blocks taken in turn, so a drift of the machine falls on all of them
alike), and notes the collectives the hook issued in its last step (kind,
size, dtype, caught at the ``torch.distributed`` call). It then replays exactly those
collectives back to back, after an idle spell and a barrier each time, as the measured
communication time of one step. Each replay is paired with a latency probe, a 1 KiB
allreduce and a 1 KiB allgather (all latency: they fit in the shaper's burst and every hop
of Gloo's rings carries data), timed the same way just before it, so that the alpha of the
cost model is measured under the same load as the row it predicts; a scheme that swaps
(gtopk) gets a swap probe too, its own swaps at 1 KiB, timed between the two. Rank 0 writes
everything as JSON to ``--out``. With ``--calibrate ROUNDS`` it times only the small
collectives of ``CALIBRATION``, for ``linkbench.py --calibrate`` (``--calibrate-intra`` and
``--calibrate-swaps`` likewise, for the options of the same names).
"""
# No ``from __future__ import annotations``: DDP checks local_hook's annotations.
import contextlib
import datetime
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import dgc
import sparse_train
from launch.cli import OneLineParser, integer, output_file, positive
from launch.comm import (CountingAllreduceState, HierarchicalAllreduceState, TorchHookState,
                         counted_torch_hook, counting_allreduce_hook,
                         hierarchical_allreduce_hook)
from launch.costmodel.hardware import load_cluster
from launch.distenv import exit_process, quiesce
from launch.models import ModelConfig, build_model

MODELS = {  # name -> (ModelConfig, input shape); inputs are synthetic, 10 classes
    "wide_mlp": (ModelConfig(name="wide_mlp", width=4096, depth=2), (3, 32, 32)),
    "lenet300": (ModelConfig(name="lenet300"), (1, 28, 28)),
    "lenet5": (ModelConfig(name="lenet5"), (1, 28, 28)),
    "tiny": (ModelConfig(name="wide_mlp", width=64, depth=1), (1, 8, 8)),  # --quick
}
SCHEMES = ["dense", "fp16", "powersgd1", "powersgd4", "dgc", "dgc-nm24", "nocomm"]
# Beyond those, any "powersgdR" (rank R) and "dgc@D" (DGC at density D, e.g. a warm-up's),
# and: "dgc-sar" (DGC with the sparse allreduce), "dgc-gtopk" (with recursive doubling;
# "dgc-gtopk-slices" with gtopk_slices over LOCAL_WORLD_SIZE ranks per node;
# "dgc-gtopk-beside" with the dense slots allreduced beside the swaps, as on a link of no
# latency),
# "dgc-hier" (hierarchical DGC), "dgc-hier-sparse" (its sparse intra-node stage) and
# "hierdense" (dense allreduce the hierarchical way), the last four over LOCAL_WORLD_SIZE
# ranks per node.
NAMED = ("dense", "fp16", "dgc-nm24", "nocomm", "dgc-sar", "dgc-gtopk", "dgc-gtopk-slices",
         "dgc-gtopk-beside", "dgc-hier", "dgc-hier-sparse", "hierdense")
DGC_OPTIONS = dict(density=0.001, value_dtype="fp16", index_dtype="int32", warmup_epochs=0)
# gtopk is told the testbed's link, as launch.train tells DGC the link of its
# hardware.preset: the calibrated per-hop latency of the netns presets, with which gtopk
# carries the dense slots in its swaps (dgc.plan.dense_rides_swaps).
GTOPK_OPTIONS = dict(DGC_OPTIONS, exchange="gtopk",
                     exchange_latency_us=load_cluster("netns-100mbit").inter.latency * 1e6)
GTOPK_BESIDE_OPTIONS = dict(GTOPK_OPTIONS, exchange_latency_us=0.0)  # "dgc-gtopk-beside"
# torch's PowerSGD allreduces plainly until this iteration, so warm-up must pass it.
POWERSGD_START = 2
# On Gloo, PowerSGD needs one bucket: with two it failed here with a collective size
# mismatch (its Q allreduce is started from a future callback, see ../shared/STYLE.md).
ONE_BUCKET_MB = 4096
# Calibration of the testbed (``linkbench.py --calibrate``): 1 KiB collectives alone and
# back to back, whose times separate a per-collective overhead from a per-hop latency.
_AR, _AG = ("allreduce", 256, "torch.float32"), ("allgather", 256, "torch.float32")
CALIBRATION = {"allreduce": [_AR], "allgather": [_AG], "allreduce + allgather": [_AR, _AG],
               "3 allreduces": [_AR] * 3}
PROBE = CALIBRATION["allreduce + allgather"]  # timed beside every replay
# The two-node testbed's intra-node link (``linkbench.py --calibrate-intra``): each node's
# ranks reduce-scatter, then allgather, fp32 buffers of these sizes (the reduced tensor, and
# one rank's share), both nodes at once, as the hierarchical schemes' inner stages run.
INTRA_KIB = (1, 1024, 4096, 16384, 65536)
INTRA_CALIBRATION = {f"{kind} {kib} KiB": [(kind, kib * 256, "torch.float32", "intra")]
                     for kind in ("reduce_scatter", "allgather") for kib in INTRA_KIB}
# Idle time before each replay so that the shaper's bucket is full, as after a backward
# pass: at least burst / rate (1.25 ms on the testbed, benchmarks/netns.py).
IDLE_S = 0.005
# gtopk's rounds (``linkbench.py --calibrate-swaps``, ``swapprobe.py``): the recursive
# doubling of this many buckets, one after another, of each of these message sizes.
SWAP_BYTES = (1024, 65536, 131072, 262144, 524288)
SWAP_BUCKETS = 2


def partners(rank: int, world_size: int) -> list[int]:
    """The peers of ``rank`` in gtopk's recursive doubling, round by round, for
    ``SWAP_BUCKETS`` buckets one after another."""
    rounds = world_size.bit_length() - 1
    return [rank ^ (1 << i) for i in range(rounds)] * SWAP_BUCKETS


def swap_calibration(rank: int, world_size: int) -> dict[str, list[tuple]]:
    """"rounds N": gtopk's swaps of N bytes as this rank's collectives, one shape per size of
    ``SWAP_BYTES``, recorded as the link benchmark records gtopk's (``sendrecv`` to a peer)."""
    return {f"rounds {n}": [("sendrecv", n, "torch.uint8", "world", peer)
                            for peer in partners(rank, world_size)] for n in SWAP_BYTES}


class _LocalOnly:
    stats = None


def local_hook(state: _LocalOnly, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """No communication at all: each rank keeps its own gradient (the compute floor)."""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def parse_scheme(scheme: str) -> tuple[str, float | None]:
    """(kind, parameter): PowerSGD's rank, DGC's density, else None. ValueError if unknown."""
    if scheme in NAMED:
        return scheme, None
    if scheme == "dgc":
        return "dgc", DGC_OPTIONS["density"]
    if scheme.startswith("powersgd") and scheme[len("powersgd"):].isdigit():
        return "powersgd", int(scheme[len("powersgd"):])
    if scheme.startswith("dgc@"):
        try:
            density = float(scheme[len("dgc@"):])
        except ValueError:
            density = -1.0
        if 0 < density <= 1:
            return "dgc", density
    raise ValueError(f"unknown scheme {scheme!r} (known: {', '.join(SCHEMES)}, "
                     f"powersgdR, dgc@DENSITY)")


def build(scheme: str, model_name: str, seed: int):
    cfg, shape = MODELS[model_name]
    torch.manual_seed(seed)
    model = build_model(cfg, shape, 10)
    ddp = DDP(model, bucket_cap_mb=ONE_BUCKET_MB if scheme.startswith("powersgd") else 25)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    if scheme == "dense":
        state = CountingAllreduceState()
        ddp.register_comm_hook(state, counting_allreduce_hook)
    elif scheme == "fp16":
        state = TorchHookState("fp16")
        ddp.register_comm_hook(state, counted_torch_hook)
    elif scheme.startswith("powersgd"):
        state = TorchHookState("powersgd", powersgd_rank=int(parse_scheme(scheme)[1]),
                               powersgd_start_iter=POWERSGD_START)
        ddp.register_comm_hook(state, counted_torch_hook)
    elif parse_scheme(scheme)[0] == "dgc":
        state = dgc.attach(ddp, opt, exchange="allgather",
                           **{**DGC_OPTIONS, "density": parse_scheme(scheme)[1]})
    elif scheme == "dgc-nm24":
        sparsifier = sparse_train.attach(ddp, opt, method="nm", n=2, m=4)
        state = dgc.attach(ddp, opt, sparsifier=sparsifier, exchange="allgather",
                           **DGC_OPTIONS)
    elif scheme == "dgc-sar":
        state = dgc.attach(ddp, opt, exchange="sparse_allreduce", **DGC_OPTIONS)
    elif scheme == "dgc-gtopk":
        state = dgc.attach(ddp, opt, ranks_per_node=int(os.environ["LOCAL_WORLD_SIZE"]),
                           **GTOPK_OPTIONS)
    elif scheme == "dgc-gtopk-beside":
        state = dgc.attach(ddp, opt, ranks_per_node=int(os.environ["LOCAL_WORLD_SIZE"]),
                           **GTOPK_BESIDE_OPTIONS)
    elif scheme == "dgc-gtopk-slices":
        state = dgc.attach(ddp, opt, gtopk_slices=True,
                           ranks_per_node=int(os.environ["LOCAL_WORLD_SIZE"]), **GTOPK_OPTIONS)
    elif scheme == "dgc-hier":
        state = dgc.attach(ddp, opt, topology="hierarchical", exchange="allgather",
                           ranks_per_node=int(os.environ["LOCAL_WORLD_SIZE"]), **DGC_OPTIONS)
    elif scheme == "dgc-hier-sparse":
        state = dgc.attach(ddp, opt, topology="hierarchical", intra_node="sparse",
                           dense_fallback=False,
                           ranks_per_node=int(os.environ["LOCAL_WORLD_SIZE"]), **DGC_OPTIONS)
    elif scheme == "hierdense":
        state = HierarchicalAllreduceState(int(os.environ["LOCAL_WORLD_SIZE"]))
        ddp.register_comm_hook(state, hierarchical_allreduce_hook)
    elif scheme == "nocomm":
        state = _LocalOnly()
        ddp.register_comm_hook(state, local_hook)
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    return ddp, opt, state


def _gather_fn():
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@contextlib.contextmanager
def recording(calls: list):
    """Note (kind, numel, dtype, group) of every collective started in the block: group
    "world", or "intra"/"inter" for the node groups of the hierarchical schemes; and
    ("sendrecv", numel, dtype, link, peer) of every pairwise swap (gtopk's rounds), link
    "intra" or "inter" as the peer is on this rank's node or not."""
    kinds = {"all_reduce": "allreduce", "all_gather_into_tensor": "allgather",
             "all_gather_single": "allgather", "all_to_all_single": "all_to_all",
             "reduce_scatter_single": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter"}
    saved = {name: getattr(dist, name) for name in kinds if hasattr(dist, name)}

    def noting(name):
        kind = kinds[name]
        tensor_arg = 0 if kind == "allreduce" else 1

        def call(*args, **kwargs):
            tensor = args[tensor_arg] if len(args) > tensor_arg else kwargs.get(
                "tensor" if kind == "allreduce" else "input_tensor",
                kwargs.get("input"))
            calls.append((kind, tensor.numel(), str(tensor.dtype),
                          _group_kind(kwargs.get("group"))))
            return saved[name](*args, **kwargs)
        return call

    swap = dist.batch_isend_irecv

    def swapping(ops):
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        for op in ops:
            if op.op == dist.isend:
                same = op.peer // local == dist.get_rank() // local
                calls.append(("sendrecv", op.tensor.numel(), str(op.tensor.dtype),
                              "intra" if same else "inter", op.peer))
        return swap(ops)

    for name in saved:
        setattr(dist, name, noting(name))
    dist.batch_isend_irecv = swapping
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
        dist.batch_isend_irecv = swap


def _group_kind(group) -> str:
    if group is None or dist.get_world_size(group) == dist.get_world_size():
        return "world"
    ranks = dist.get_process_group_ranks(group)
    return "intra" if ranks == list(range(ranks[0], ranks[0] + len(ranks))) else "inter"


_NODE_GROUPS: dict[str, object] = {}


def node_groups() -> dict[str, object]:
    """This rank's intra- and inter-node process groups for replays (LOCAL_WORLD_SIZE ranks
    per node); made once, by every rank."""
    if not _NODE_GROUPS:
        world, local = dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        nodes = world // local
        _NODE_GROUPS["intra"], _ = dist.new_subgroups_by_enumeration(
            [list(range(n * local, (n + 1) * local)) for n in range(nodes)])
        _NODE_GROUPS["inter"], _ = dist.new_subgroups_by_enumeration(
            [list(range(j, world, local)) for j in range(local)])
        _NODE_GROUPS["world"] = None
    return _NODE_GROUPS


def _buffers(calls: list) -> list:
    out = []
    for kind, numel, dtype, *group in calls:
        t = torch.ones(numel, dtype=getattr(torch, dtype.split(".")[-1]))
        if kind == "sendrecv":  # over the default group, to the recorded peer
            out.append((kind, t, torch.empty_like(t), group[1]))
            continue
        pg = node_groups()[group[0] if group else "world"]
        size = dist.get_world_size(pg)
        result = {"allgather": lambda: t.new_empty(size * numel),
                  "reduce_scatter": lambda: t.new_empty(numel // size),
                  "all_to_all": lambda: torch.empty_like(t)}.get(kind, lambda: None)()
        out.append((kind, t, result, pg))
    return out


def _run(buffers: list) -> None:
    gather = _gather_fn()
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    for kind, t, out, pg in buffers:
        if kind == "allreduce":
            dist.all_reduce(t, group=pg)
        elif kind == "allgather":
            gather(out, t, group=pg)
        elif kind == "reduce_scatter":
            scatter(out, t, group=pg)
        elif kind == "sendrecv":  # pg: the peer
            for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, t, pg),
                                                dist.P2POp(dist.irecv, out, pg)]):
                work.wait()
        else:
            dist.all_to_all_single(out, t, group=pg)


def _timed(buffers: list) -> float:
    time.sleep(IDLE_S)
    dist.barrier()
    start = time.perf_counter()
    _run(buffers)
    return time.perf_counter() - start


def swap_probe(calls: list) -> list:
    """The swaps of ``calls`` (gtopk's rounds), same peers and order, at 1 KiB each: their
    fixed cost alone, since 1 KiB fits in the shaper's burst. Empty if ``calls`` swap none."""
    return [("sendrecv", SWAP_BYTES[0], "torch.uint8", "world", group[1])
            for kind, _, _, *group in calls if kind == "sendrecv"]


def replay(calls: list, max_repeats: int, budget_s: float, min_repeats: int = 3
           ) -> tuple[list[float], list[float], list[float]]:
    """Seconds of each replay of ``calls``, of the latency probe timed before it and, where
    ``calls`` hold swaps, of their ``swap_probe`` timed between the two; as many as fit in
    ``budget_s`` (the same count on every rank)."""
    buffers = _buffers(calls)
    probe, swaps = _buffers(PROBE), _buffers(swap_probe(calls))
    _run(probe)
    _run(swaps)
    first = torch.tensor([_timed(buffers)], dtype=torch.float64)  # pays for set-up, untimed
    dist.all_reduce(first, op=dist.ReduceOp.MAX)
    repeats = int(min(max_repeats, max(min_repeats, budget_s // max(first.item(), 1e-6))))
    probes, swap_probes, times = [], [], []
    for _ in range(repeats):
        probes.append(_timed(probe))
        if swaps:
            swap_probes.append(_timed(swaps))
        times.append(_timed(buffers))
    return times, probes, swap_probes


def calibrate(rounds: int, calibration: dict = CALIBRATION) -> dict[str, list[float]]:
    """Seconds of each shape of ``calibration``, timed in turn for ``rounds`` rounds so that
    a drift of the machine touches every shape alike."""
    shapes = {name: _buffers(calls) for name, calls in calibration.items()}
    for buffers in shapes.values():
        _run(buffers)
    times = {name: [] for name in shapes}
    for _ in range(rounds):
        for name, buffers in shapes.items():
            times[name].append(_timed(buffers))
    return times


class _Scheme:
    """One scheme's model, hook and inputs, and what its steps measured so far."""

    def __init__(self, scheme: str, args):
        self.scheme = scheme
        self.ddp, self.opt, self.state = build(scheme, args.model, args.seed)
        _, shape = MODELS[args.model]
        gen = torch.Generator().manual_seed(args.seed + dist.get_rank())
        self.x = torch.randn(args.batch_size, *shape, generator=gen)
        self.y = torch.randint(0, 10, (args.batch_size,), generator=gen)
        self.loss_fn = nn.CrossEntropyLoss()
        self.warmup = max(args.warmup, POWERSGD_START + 1) if scheme.startswith("powersgd") \
            else args.warmup
        self.times, self.sent, self.inter, self.whole, self.calls = [], [], [], [], []

    def step(self, timed: bool, record: bool) -> None:
        before = _counted(self.state)
        dist.barrier()
        start = time.perf_counter()
        with recording(self.calls) if record else contextlib.nullcontext():
            self.opt.zero_grad(set_to_none=True)
            self.loss_fn(self.ddp(self.x), self.y).backward()
            self.opt.step()
        elapsed = time.perf_counter() - start
        if timed:
            self.times.append(elapsed)
            after = _counted(self.state)
            self.sent.append(after[0] - before[0])
            self.inter.append(after[1] - before[1])
            self.whole.append(after[2] - before[2])

    def result(self, args) -> dict:
        del self.ddp, self.opt, self.state
        calls = self.calls
        replayed, probes, swap_probes = (replay(calls, args.replay, args.replay_budget)
                                         if calls else ([], [], []))
        times, sent = self.times, self.sent
        return {"scheme": self.scheme, "warmup": self.warmup, "step_s": times,
                "step_median_s": statistics.median(times),
                "bytes_per_step": statistics.median(sent), "bytes_min": min(sent),
                "bytes_max": max(sent), "bytes_inter_per_step": statistics.median(self.inter),
                "bytes_whole_per_step": statistics.median(self.whole),
                "collectives": calls, "replay_s": replayed,
                "replay_median_s": statistics.median(replayed) if replayed else 0.0,
                "probe_s": probes, "probe_median_s": statistics.median(probes) if probes else None,
                "swap_probe_s": swap_probes}


def run_schemes(schemes: list[str], args) -> list[dict]:
    """``schemes`` built at once, each warmed up, then their timed steps in
    ``args.interleave`` blocks taken in turn (scheme after scheme, block after block): a
    drift of the machine's speed over the run falls on every scheme alike. Each scheme's
    last step is recorded; the replays follow, scheme by scheme. One scheme: its steps,
    then its replays."""
    runs = [_Scheme(scheme, args) for scheme in schemes]
    for run in runs:
        for _ in range(run.warmup):
            run.step(timed=False, record=False)
    blocks = args.interleave
    bounds = [args.steps * b // blocks for b in range(blocks + 1)]
    for block in range(blocks):
        for run in runs:
            for step in range(bounds[block], bounds[block + 1]):
                run.step(timed=True, record=step == args.steps - 1)
    return [run.result(args) for run in runs]


def _report(model: str, r: dict) -> None:
    if dist.get_rank() == 0:
        print(f"  [{time.strftime('%H:%M:%S')}] {model} p={dist.get_world_size()} "
              f"{r['scheme']}: step {r['step_median_s'] * 1e3:.1f} ms, "
              f"{r['bytes_per_step'] / 1e6:.4g} MB/step, replayed comm "
              f"{r['replay_median_s'] * 1e3:.1f} ms ({len(r['replay_s'])} replays, probe "
              f"{(r['probe_median_s'] or 0) * 1e3:.2f} ms)", flush=True)


def _counted(state) -> tuple[float, float, float]:
    """(bytes sent, of which between nodes, of which DGC's tensors sent whole) so far by
    this rank, as the scheme counts them."""
    stats = getattr(state, "stats", None)
    if stats is None:
        return 0.0, 0.0, 0.0
    return (stats.bytes_sent, getattr(stats, "bytes_inter", 0.0),
            getattr(stats, "bytes_dense_tensors", 0.0))


def main(argv=None) -> int:
    p = OneLineParser(prog="linkbench_worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS))
    p.add_argument("--calibrate", type=integer(1), metavar="ROUNDS",
                   help="time the small collectives of CALIBRATION, no model")
    p.add_argument("--calibrate-intra", type=integer(1), metavar="ROUNDS",
                   help="time the node groups' collectives of INTRA_CALIBRATION, no model")
    p.add_argument("--calibrate-swaps", type=integer(1), metavar="ROUNDS",
                   help="time gtopk's rounds of swap_calibration, no model")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--steps", type=integer(1), default=20)
    p.add_argument("--warmup", type=integer(0), default=2)
    p.add_argument("--interleave", type=integer(1), default=1, metavar="BLOCKS",
                   help="build every scheme at once and take their timed steps in this "
                        "many blocks in turn (1: scheme after scheme)")
    p.add_argument("--replay", type=integer(1), default=21,
                   help="most replays of a step's collectives")
    p.add_argument("--replay-budget", type=positive, default=30.0,
                   help="seconds of replays per scheme (at least 3 replays)")
    p.add_argument("--batch-size", type=integer(1), default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=output_file, required=True)
    args = p.parse_args(argv)
    if args.model is None and not (args.calibrate or args.calibrate_intra
                                   or args.calibrate_swaps):
        p.error("--model is required unless --calibrate, --calibrate-intra or "
                "--calibrate-swaps")
    if sum(rounds is not None for rounds in (args.calibrate, args.calibrate_intra,
                                             args.calibrate_swaps)) > 1:
        p.error("--calibrate, --calibrate-intra and --calibrate-swaps exclude each other")
    for scheme in args.schemes.split(","):
        try:
            parse_scheme(scheme)
        except ValueError as err:
            p.error(f"--schemes: {err}")
    if args.interleave > args.steps:
        p.error(f"--interleave must be between 1 and --steps ({args.steps}), "
                f"got {args.interleave}")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=1800))
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.calibrate:
        out = {"world_size": world, "calibration": calibrate(args.calibrate)}
    elif args.calibrate_intra:
        out = {"world_size": world,
               "calibration": calibrate(args.calibrate_intra, INTRA_CALIBRATION)}
    elif args.calibrate_swaps:
        out = {"world_size": world,
               "calibration": calibrate(args.calibrate_swaps, swap_calibration(rank, world))}
    else:
        schemes = args.schemes.split(",")
        together = [schemes] if args.interleave > 1 else [[scheme] for scheme in schemes]
        results = []
        for group in together:
            results += run_schemes(group, args)
            for r in results[-len(group):]:
                _report(args.model, r)
        out = {"world_size": world, "model": args.model, "results": results,
               "interleave": args.interleave}
    if rank == 0:
        args.out.write_text(json.dumps(out))
    dist.barrier()
    quiesce()
    dist.destroy_process_group()
    return 0

if __name__ == "__main__":
    exit_process(main())  # no teardown: Gloo's threads can abort there (launch/distenv.py)
