"""What a run would cost on a cluster: communication, compute, storage and step time.

    from launch.costmodel import HardwareConfig, estimate_run
    figures = estimate_run(cfg, model, world_size=8, comm_bytes_per_step=bytes_sent / steps)

Modules, one concern each: ``hardware`` (presets from configs/hardware/, the ``hardware:``
config section), ``collectives`` (alpha-beta time of ring, tree and hierarchical
collectives), ``traffic`` (what dense, fp16, PowerSGD, DGC and mask-aware schemes send per
DDP bucket), ``compute`` (FLOPs per layer and 2:4 sparse tensor cores), ``storage`` (bytes
per sparse format) and ``run`` (step time, speedups, ``estimate_run``). The command line
is ``python -m launch.estimate``.
"""
from .hardware import HardwareConfig, load_cluster, preset_names
from .run import estimate_run

__all__ = ["HardwareConfig", "estimate_run", "load_cluster", "preset_names"]
