"""Saving a run's state and taking it up again, on the same or another number of ranks.

Everything the ranks hold alike (model, optimizer, scheduler, progress, the sparsifier) goes
into the checkpoint's common part; what one rank alone holds (DGC's residuals and momenta, a
PowerSGD error feedback, its RNG states) into its own shard (``launch.checkpoint``).

Resumed on the world size it was saved with, each rank reads back its own shard. On another
world size (q ranks from p):

* data: the epoch's order does not depend on the world size, so the run continues from the
  samples the p ranks had taken (``launch.data.EpochSampler``); the learning-rate schedule
  continues from the same fraction of the run; step-counted schedules (DGC's
  ``warmup_steps``, sparsity schedules) continue from the same optimizer step;
* DGC: each new rank sums the placed residuals and momenta of the old ranks of its residue
  class (rank r mod q), one allreduce gives every rank the total, and ``dgc.reshard`` turns
  it into this rank's state with the pending update kept (the rule is there); memory per
  rank stays one model's worth;
* RNG: ranks below p take their own old states, the others start from the seed;
* what cannot be carried over stops the run with one line (a PowerSGD error feedback,
  whose low-rank factors belong to the old world size).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from launch import checkpoint
from sparse_comm.schema import ConfigError

log = logging.getLogger(__name__)


def save(out_dir: Path, progress: dict, model: nn.Module, optimizer, scheduler,
         plugins: dict, config: dict, meta: dict) -> Path:
    """Write a checkpoint of the run (every rank calls it)."""
    rank0 = dist.get_rank() == 0
    own = {"rng": checkpoint.rng_state(), "comm": plugins["comm"].state_dict()}
    common = None
    if rank0:
        common = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict(), "progress": dict(progress),
                  "plugins": {key: p.state_dict() for key, p in plugins.items()
                              if key != "comm"}, "config": config}
    return checkpoint.save(out_dir, progress["step"], own, common, meta)


def restore(directory: Path, model: nn.Module, optimizer, scheduler, plugins: dict,
            meta: dict, seed: int) -> dict:
    """Load ``directory`` into the run's objects (every rank calls it); returns the progress
    to continue from. ``meta``: this run's layout, as ``save`` records it."""
    manifest = checkpoint.read_manifest(directory)
    common = checkpoint.load_common(directory)
    model.load_state_dict(common["model"])
    optimizer.load_state_dict(common["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    for key, plugin in plugins.items():
        if key != "comm":
            plugin.load_state_dict(common["plugins"][key])
    rank, world = dist.get_rank(), dist.get_world_size()
    progress = dict(common["progress"])
    if manifest["world_size"] == world and _same_layout(manifest, meta):
        own = checkpoint.load_shard(directory, rank)
        plugins["comm"].load_state_dict(own["comm"])
        checkpoint.set_rng_state(own["rng"])
        return progress
    _reshard_comm(directory, manifest, plugins["comm"], model, meta)
    if rank < manifest["world_size"]:
        checkpoint.set_rng_state(checkpoint.load_shard(directory, rank)["rng"])
    else:
        torch.manual_seed(seed + rank)
    log.info("resumed a %d-rank checkpoint on %d ranks: data from sample %d of epoch %d, "
             "DGC's pending update kept", manifest["world_size"], world,
             progress.get("epoch_samples", 0), progress["epoch"])
    return progress


def _same_layout(manifest: dict, meta: dict) -> bool:
    return all(manifest.get(k) == v for k, v in meta.items())


def _reshard_comm(directory: Path, manifest: dict, comm, model: nn.Module, meta: dict) -> None:
    """Give this rank its share of the old ranks' communication state."""
    kind = manifest.get("comm")
    if kind == "powersgd":
        raise ConfigError("", f"cannot resume a {manifest['world_size']}-rank PowerSGD "
                              f"checkpoint on {dist.get_world_size()} ranks: its error "
                              f"feedback belongs to the old world size")
    template = checkpoint.load_shard(directory, 0)["comm"]
    if kind != "dgc":  # byte counters only: rank 0's
        comm.load_state_dict(template)
        return
    from dgc import reshard
    rank, world, old_world = dist.get_rank(), dist.get_world_size(), manifest["world_size"]
    module = getattr(model, "module", model)
    numels = {n: p.numel() for n, p in module.named_parameters()}
    totals: dict = {}
    for old in range(rank, old_world, world):
        reshard.add_placed(totals, checkpoint.load_shard(directory, old)["comm"], numels)
    names = sorted(set(template["momentum"]) | set(template["accumulation"]))
    for name in names:  # the same names, in one order, on every rank
        u, v = totals.get(name) or (torch.zeros(numels[name]), torch.zeros(numels[name]))
        both = torch.stack([u, v])
        dist.all_reduce(both)
        totals[name] = (both[0], both[1])
    old_units = old_world // (manifest.get("ranks_per_node") or 1) \
        if manifest.get("topology") == "hierarchical" else old_world
    new_rpn = meta.get("ranks_per_node") if meta.get("topology") == "hierarchical" else None
    comm.load_state_dict(reshard.new_state(
        {n: totals[n] for n in names}, template, old_world=old_world, old_units=old_units,
        new_rank=rank, new_ranks_per_node=new_rpn))
