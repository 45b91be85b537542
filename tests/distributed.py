"""Run a function on N real Gloo ranks on loopback, with a hard time limit.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` processes (forked from a
server that has imported torch and the packages once), each of which joins a
Gloo process group and calls ``fn(rank, world_size, *args)``. It returns the list of the
ranks' return values (which must pickle), re-raises the first rank failure with its
traceback text, and kills everything and fails if the ranks do not finish within
``timeout`` seconds, so a hang fails a test instead of stalling CI.
"""
from __future__ import annotations

import datetime
import os
import socket
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

from launch.distenv import quiesce


# The ranks fork from one server process that imported these once and ran no torch op;
# spawning would import torch again in every rank, seconds each on a small CI machine.
PRELOAD = ["torch.nn.parallel", "dgc", "sparse_train", "tests.distributed"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue, collective_timeout, environ):
    os.environ.clear()  # the caller's environment now, not the server's from its start
    os.environ.update(environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      GLOO_SOCKET_IFNAME="lo")
    try:
        import torch
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        try:
            result = fn(rank, world_size, *args)
            quiesce()  # else destroying the group can deadlock (launch/distenv.py)
        finally:
            dist.destroy_process_group()
        queue.put((rank, True, result))
    except BaseException:  # report every failure to the parent, then exit
        queue.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0,
              collective_timeout: float = 60.0):
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(r, world_size, port, fn, args, queue, collective_timeout,
                               dict(os.environ)))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        while len(results) < world_size:
            remaining = (deadline - datetime.datetime.now()).total_seconds()
            if remaining <= 0:
                raise TimeoutError(f"ranks did not finish within {timeout}s "
                                   f"(finished: {sorted(results)})")
            try:
                rank, ok, value = queue.get(timeout=min(remaining, 1.0))
            except Exception:
                dead = [i for i, p in enumerate(procs)
                        if p.exitcode not in (None, 0) and i not in results]
                if dead:
                    raise RuntimeError(f"rank(s) {dead} died without reporting "
                                       f"(exit codes {[procs[i].exitcode for i in dead]})")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world_size)]
