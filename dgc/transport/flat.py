"""The flat topology: every rank compresses its own gradient of the whole bucket.

Each compressed tensor goes through this rank's DGC memory and selection
(``Compressor.compress``); the exchange sums every rank's pairs and dense tensors over all
ranks; the sum is divided by the world size and the dense tensors get their momentum after
averaging, so every rank's momentum buffer agrees.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from dgc.plan import Plan
from dgc.transport.exchange import exchange


def run(state, bucket: dist.GradBucket, flat: Tensor, masks: Mapping[str, Tensor],
        fixed: bool) -> torch.futures.Future:
    plan = state.bucket_plan(bucket, masks, fixed)
    sent = [state.compress(s.name, flat.narrow(0, s.offset, s.numel), s.k)
            for s in plan.compressed]
    positions = {s.name: state.masks.positions(s.name, masks[s.name])
                 for s in plan.slots if s.compact}
    state.count_bucket(plan)
    key = ("world", tuple(s.name for s in plan.slots))
    summed = exchange(state.world, plan, flat, sent, positions, state, key)
    return summed.then(lambda _: average_(state, plan, flat, state.world_size))


def average_(state, plan: Plan, buffer: Tensor, world_size: int) -> Tensor:
    """Divide the sum in ``buffer`` by the world size and turn its dense slots into their
    momentum update; returns ``buffer``."""
    buffer.div_(world_size)
    for s in plan.dense:
        state.dense_momentum_(s.name, buffer.narrow(0, s.offset, s.numel))
    return buffer
