"""Where this process sits in the job (rank, world size, local rank) and how the ranks meet.

Launchers, in order of precedence:

- torchrun (and torch.distributed.launch): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
  MASTER_PORT; the process group starts from those (``env://``).
- MPI (``mpirun``/``mpiexec`` of Open MPI, MPICH, Intel MPI or MVAPICH): recognised by the
  variables the launcher exports; rank, world size and local rank are then read from mpi4py,
  and rank 0 opens the rendezvous store on a free port (or MASTER_PORT) and broadcasts its
  address over MPI.
- Slurm (``srun``): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the store is on MASTER_ADDR or
  the first host of the step's node list, port MASTER_PORT or one derived from the job id.
- none of them: one process.

A partial set of a launcher's variables, a rank outside the world, or torchrun's variables
contradicting MPI's or Slurm's is a ConfigError (one line, exit 2 in the CLI).
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from sparse_comm.schema import ConfigError

RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT")
MPI_EXTRA = 'pip install -e ".[mpi]"'


@dataclass(frozen=True)
class LauncherVars:
    """The variables through which one launcher tells a process its place."""
    name: str
    start: str  # the command that sets them
    rank: str
    size: str
    local_rank: str
    local_rank_required: bool = True  # srun --mpi=pmi2 sets PMI_RANK but no MPI_LOCALRANKID
    also_required: tuple[str, ...] = ()

    @property
    def own(self) -> tuple[str, ...]:
        return (self.rank, self.size, self.local_rank)


TORCHRUN = LauncherVars("torchrun", "torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                        also_required=RENDEZVOUS_VARS)
MPI_LAUNCHERS = (
    LauncherVars("Open MPI", "mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                 "OMPI_COMM_WORLD_LOCAL_RANK"),
    LauncherVars("MPICH/Intel MPI", "mpiexec", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID",
                 local_rank_required=False),
    LauncherVars("MVAPICH", "mpirun", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE",
                 "MV2_COMM_WORLD_LOCAL_RANK"),
)
SLURM = LauncherVars("Slurm", "srun", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
HOROVOD = LauncherVars("horovod", "horovodrun", "HOROVOD_RANK", "HOROVOD_SIZE",
                       "HOROVOD_LOCAL_RANK")
# The step's own list first: a step may run on a subset of the job's nodes.
SLURM_NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun", "mpi", "slurm" or "single"
    # Where rank 0's store listens; None under MPI means: 127.0.0.1 or rank 0's host, free port.
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _inconsistent(problem: str) -> ConfigError:
    return ConfigError("", f"inconsistent launch environment: {problem}")


def _int_var(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ConfigError("", f"environment variable {name}={environ[name]!r} is not an integer"
                          ) from None


def _port_var(environ: Mapping[str, str]) -> int | None:
    if "MASTER_PORT" not in environ:
        return None
    port = _int_var(environ, "MASTER_PORT")
    if not 0 < port < 65536:
        raise ConfigError("", f"environment variable MASTER_PORT={port} is not a TCP port")
    return port


def _placement(environ: Mapping[str, str], lv: LauncherVars) -> DistEnv | None:
    """The place ``lv``'s variables give this process, None when none of them is set."""
    present = [v for v in lv.own if v in environ]
    if not present:
        return None
    required = (lv.rank, lv.size) + ((lv.local_rank,) if lv.local_rank_required else ())
    missing = [v for v in required + lv.also_required if v not in environ]
    if missing:
        raise _inconsistent(f"{', '.join(present)} set but {', '.join(missing)} missing "
                            f"(start with {lv.start}, or unset them)")
    rank, size = _int_var(environ, lv.rank), _int_var(environ, lv.size)
    if not 0 <= rank < size:
        raise _inconsistent(f"{lv.rank}={rank} with {lv.size}={size}")
    local_rank = _int_var(environ, lv.local_rank) if lv.local_rank in environ else 0
    if not 0 <= local_rank <= rank:
        raise _inconsistent(f"{lv.local_rank}={local_rank} with {lv.rank}={rank}")
    return DistEnv(rank, size, local_rank, launcher=lv.name)


def _agree(a: DistEnv, b: DistEnv) -> bool:
    return (a.rank, a.world_size) == (b.rank, b.world_size)


def _describe(env: DistEnv) -> str:
    lv = next(v for v in (TORCHRUN, SLURM, HOROVOD, *MPI_LAUNCHERS) if v.name == env.launcher)
    return f"{env.launcher}'s {lv.rank}={env.rank} {lv.size}={env.world_size}"


def _mpi_placement(environ: Mapping[str, str]) -> DistEnv | None:
    found = [p for p in (_placement(environ, lv) for lv in MPI_LAUNCHERS) if p is not None]
    for other in found[1:]:
        if not _agree(found[0], other):
            raise _inconsistent(f"{_describe(found[0])} but {_describe(other)}")
    return found[0] if found else None


def first_host(nodelist: str, var: str = "SLURM_JOB_NODELIST") -> str:
    """The first host of a Slurm host list: ``node[01-04,07],gpu1`` -> ``node01``."""
    malformed = ConfigError("", f"environment variable {var}={nodelist!r} is not a Slurm "
                                f"host list")
    host, rest = [], nodelist.strip()
    while rest and rest[0] != ",":
        if rest[0] == "[":
            close = rest.find("]")
            if close < 0 or not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", rest[1:close]):
                raise malformed
            host.append(re.match(r"\d+", rest[1:]).group())  # keeps zero padding: 01, not 1
            rest = rest[close + 1:]
        else:
            plain = re.match(r"[^\[\],]+", rest)
            if plain is None:
                raise malformed
            host.append(plain.group())
            rest = rest[plain.end():]
    if not host:
        raise ConfigError("", f"environment variable {var}={nodelist!r} names no host")
    return "".join(host)


def _slurm_rendezvous(environ: Mapping[str, str], env: DistEnv) -> DistEnv:
    addr = environ.get("MASTER_ADDR")
    if addr is None:
        var = next((v for v in SLURM_NODELIST_VARS if v in environ), None)
        if var is None:
            raise _inconsistent(f"Slurm's {SLURM.rank} is set but none of "
                                f"{', '.join(SLURM_NODELIST_VARS)} (or MASTER_ADDR) is")
        addr = first_host(environ[var], var)
    port = _port_var(environ)
    if port is None:
        if "SLURM_JOB_ID" not in environ:
            raise _inconsistent("Slurm's SLURM_JOB_ID is not set: set MASTER_PORT")
        # Below Linux's ephemeral range (32768-60999), so no outgoing socket already holds it;
        # every task of the job computes the same port without talking to the others.
        port = 10000 + _int_var(environ, "SLURM_JOB_ID") % 20000
    return dataclasses.replace(env, master_addr=addr, master_port=port)


def from_environ(environ: Mapping[str, str]) -> DistEnv:
    """This process's place as the launcher variables in ``environ`` state it.

    Under MPI the result is the environment's claim; ``detect`` replaces it with what the MPI
    library itself reports.
    """
    torchrun = _placement(environ, TORCHRUN)
    if torchrun is not None:
        # torchrun started inside an mpirun/srun task (one agent per node) owns its workers'
        # places; otherwise its variables must say what MPI's and Slurm's say.
        if "TORCHELASTIC_RUN_ID" not in environ:
            for other in (_mpi_placement(environ), _placement(environ, SLURM)):
                if other is not None and not _agree(torchrun, other):
                    raise _inconsistent(f"{_describe(torchrun)} but {_describe(other)} (unset "
                                        f"RANK, WORLD_SIZE and LOCAL_RANK, or launch with "
                                        f"torchrun alone)")
        return dataclasses.replace(torchrun, master_addr=environ["MASTER_ADDR"],
                                   master_port=_port_var(environ))
    horovod = _placement(environ, HOROVOD)
    if horovod is not None:  # horovodrun, with Gloo or MPI underneath: its variables rule
        return horovod
    mpi = _mpi_placement(environ)
    if mpi is not None:
        # Slurm's variables are not read: under mpirun in a batch script they describe the
        # batch step (task 0), not this rank.
        return dataclasses.replace(mpi, launcher="mpi", master_addr=environ.get("MASTER_ADDR"),
                                   master_port=_port_var(environ))
    slurm = _placement(environ, SLURM)
    if slurm is not None:
        return _slurm_rendezvous(environ, dataclasses.replace(slurm, launcher="slurm"))
    stray = [v for v in RENDEZVOUS_VARS if v in environ]
    if stray:
        raise _inconsistent(f"{', '.join(stray)} set but no launcher's rank variables "
                            f"(start with torchrun, mpirun or srun, or unset them)")
    return DistEnv(rank=0, world_size=1, local_rank=0, launcher="single")


def _mpi_world():
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("", f"launched by MPI but mpi4py cannot be imported ({reason}); "
                              f"install it with: {MPI_EXTRA}") from None
    return MPI


def _ask_mpi(claimed: DistEnv) -> DistEnv:
    MPI = _mpi_world()
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank = node.Get_rank()
    node.Free()
    if (rank, size) != (claimed.rank, claimed.world_size):
        # e.g. MPI variables left over from another job in a shell that ran plain python.
        raise _inconsistent(f"the MPI environment variables say rank {claimed.rank} of "
                            f"{claimed.world_size} but MPI reports rank {rank} of {size}")
    return dataclasses.replace(claimed, rank=rank, world_size=size, local_rank=local_rank)


def detect() -> DistEnv:
    env = from_environ(os.environ)
    return _ask_mpi(env) if env.launcher == "mpi" else env


def _mpi_store(env: DistEnv, timeout: datetime.timedelta) -> dist.Store:
    """Rank 0 listens (on a port the OS picks, unless MASTER_PORT) and tells the others."""
    world = _mpi_world().COMM_WORLD
    hosts = set(world.allgather(socket.gethostname()))
    if env.rank == 0:
        host = env.master_addr or ("127.0.0.1" if len(hosts) == 1 else socket.getfqdn())
        store = dist.TCPStore(host, env.master_port or 0, env.world_size, is_master=True,
                              timeout=timeout, wait_for_workers=False)
        world.bcast((host, store.port), root=0)
        return store
    host, port = world.bcast(None, root=0)
    return dist.TCPStore(host, port, env.world_size, is_master=False, timeout=timeout)


def _horovod_store(env: DistEnv, timeout: datetime.timedelta) -> dist.Store:
    """Under horovodrun, Horovod carries the gradients (``engine: horovod``); a Gloo group
    beside it carries the launcher's own bookkeeping (checkpoints, metrics). Rank 0 listens
    and tells the others through Horovod."""
    try:
        import horovod.torch as hvd
    except ImportError:
        raise ConfigError("", "launched by horovodrun but horovod.torch cannot be imported; "
                              "install it with: bash scripts/install_horovod.sh") from None
    hvd.init()
    if env.rank == 0:
        host = os.environ.get("HOROVOD_HOSTNAME", "127.0.0.1")
        host = "127.0.0.1" if host == "localhost" else host
        store = dist.TCPStore(host, 0, env.world_size, is_master=True, timeout=timeout,
                              wait_for_workers=False)
        hvd.broadcast_object((host, store.port), root_rank=0, name="launch.rendezvous")
        return store
    # The name must match rank 0's: Horovod's default is the object's type name.
    host, port = hvd.broadcast_object(None, root_rank=0, name="launch.rendezvous")
    return dist.TCPStore(host, port, env.world_size, is_master=False, timeout=timeout)


def _torchrun_store(env: DistEnv, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's store, its keys prefixed by the restart count. Workers restarted by
    ``--max-restarts`` find the agent's store still holding the previous attempt's keys,
    and Gloo (torch 2.13) would connect its mesh to the dead attempt's ports; a fresh
    prefix per attempt gives each attempt its own keys."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                          is_master=not agent and env.rank == 0, timeout=timeout,
                          wait_for_workers=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"sparse-comm/attempt-{attempt}", store)


def init(env: DistEnv, timeout_s: float = 600.0) -> torch.device:
    """Start the default process group (NCCL with CUDA, else Gloo) and pick this rank's device."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if env.launcher == "torchrun":
        dist.init_process_group(backend, store=_torchrun_store(env, timeout), rank=env.rank,
                                world_size=env.world_size, timeout=timeout)
        return device
    if env.launcher == "single":
        store = dist.HashStore()
    elif env.launcher == "mpi":
        store = _mpi_store(env, timeout)
    elif env.launcher == "horovod":
        store = _horovod_store(env, timeout)
    else:
        store = dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                              is_master=env.rank == 0, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size,
                            timeout=timeout)
    return device


def node_layout(local_ranks: list[int]) -> tuple[int, int | None]:
    """(nodes, ranks per node) from every rank's local rank, in rank order: a node starts
    wherever a local rank is 0. The ranks per node are None unless every node has the same
    number of ranks, placed node by node (local rank = rank mod ranks per node), which the
    hierarchical topology needs."""
    nodes = max(1, sum(1 for r in local_ranks if r == 0))
    size = len(local_ranks)
    if size % nodes:
        return nodes, None
    per_node = size // nodes
    if any(r != i % per_node for i, r in enumerate(local_ranks)):
        return nodes, None
    return nodes, per_node


def quiesce() -> None:
    """Let the process group's threads finish with Python before the group is torn down.

    A communication hook's future completes on a Gloo worker thread, which then takes the
    GIL to drop the hook's Python callback. Two endings go wrong if that thread is still
    waiting for the GIL (seen under load on 2 cores, 1 run in 20 to 40):
    - the main thread destroys the group while holding the GIL: the destructor joins the
      worker thread, which waits for the GIL: a deadlock (a ``DistributedDataParallel``
      freed after ``destroy_process_group`` drops the last reference this way);
    - the interpreter is finalising: the thread is unwound by ``pthread_exit`` and the C++
      runtime aborts ("terminate called without an active exception", exit -6; the same
      teardown race as pytorch/pytorch#179291).
    Call it once the last collective has been waited for (DDP waits for its hooks' futures
    before backward returns): the pause releases the GIL and so hands it to a thread still
    holding a callback. It starts no collective, so a rank may call it while another has
    failed."""
    if dist.is_initialized():
        time.sleep(0.2)


def exit_process(code: int) -> None:
    """End a rank's process with ``code`` once its work and output are done, skipping the
    interpreter's teardown (where a Gloo thread can still abort: see ``quiesce``)."""
    import logging
    import sys

    logging.shutdown()
    mpi = sys.modules.get("mpi4py.MPI")  # mpirun reports a rank that skips MPI_Finalize
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say
            pass
    os._exit(code)
