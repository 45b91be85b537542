"""Where this process sits in the job: rank, world size, local rank, from the launcher's env.

torchrun (and torch.distributed.launch) export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; with none of them set, the job is one process. A partial set is an error.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from launch.schema import ConfigError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_var(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ConfigError("", f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def detect() -> DistEnv:
    present = [v for v in TORCHRUN_VARS if v in os.environ]
    if not present:
        return DistEnv(rank=0, world_size=1, local_rank=0, launcher="single")
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ConfigError("", f"inconsistent launch environment: {', '.join(present)} set but "
                              f"{', '.join(missing)} missing (start with torchrun, or unset them)")
    env = DistEnv(rank=_int_var("RANK"), world_size=_int_var("WORLD_SIZE"),
                  local_rank=_int_var("LOCAL_RANK"), launcher="torchrun")
    if not 0 <= env.rank < env.world_size:
        raise ConfigError("", f"inconsistent launch environment: RANK={env.rank} with "
                              f"WORLD_SIZE={env.world_size}")
    return env


def init(env: DistEnv, timeout_s: float = 600.0) -> torch.device:
    """Start the default process group (NCCL with CUDA, else Gloo) and pick this rank's device."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if env.launcher == "single":
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    return device
