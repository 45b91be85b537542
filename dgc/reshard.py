"""DGC's state for a job restarted on another number of ranks, its pending update kept.

A unit of DGC, a rank in the flat topology or a node in the hierarchical one, holds
residuals ``v`` and local momenta ``u``; what is still to be applied is the sum over units
of ``v``, divided by the world size p (every unit's sends are summed and divided by p). A
job resumed on q ranks must keep that:

    sum over new units of v' / q  ==  sum over old units of v / p.

**The rule.** Let T be the sum over the old ranks of their ``v``, each placed where it
belongs (the whole tensor in the flat topology; the rank's piece of its node's tensor in the
hierarchical one, every position of a node held by exactly one of its ranks, so T is the
sum over old units of the unit's tensor). Every new flat rank takes ``v' = T / p``; every
new node of r ranks takes ``r T / p``, cut into its ranks' pieces. Then the new pending
update is ``q (T / p) / q`` or ``(q / r) (r T / p) / q``, both ``T / p``. The local momentum
``u`` enters ``v`` linearly (``m u`` each step), so it moves by the same rule and its
contribution to later steps is kept too. A global momentum (a dense tensor's, applied
after averaging, the same on every unit) becomes the mean over units, ``T / units``. The
weight-decay momentum is the same on every rank and is copied from old rank 0, as are the
warm-up position (epoch, step) and the byte counters. The threshold calibration belongs to
one rank's sample and restarts (it re-settles in a few steps); the selection counters only
key each sample's offset and are kept.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from dgc.transport.hierarchical import piece_bounds


def placed(state: Mapping, numels: Mapping[str, int]) -> dict[str, tuple[Tensor, Tensor]]:
    """(u, v) of every tensor in one old rank's ``state``, as whole flat tensors: a piece
    (hierarchical) at its place, zeros elsewhere."""
    pieces = state.get("pieces", {})
    out = {}
    for name in set(state["momentum"]) | set(state["accumulation"]):
        both = []
        for key in ("momentum", "accumulation"):
            t = state[key].get(name)
            full = torch.zeros(numels[name], dtype=torch.float32)
            if t is not None:
                start, count = pieces.get(name, (0, t.numel()))
                full[start:start + count] = t.reshape(-1).float()
            both.append(full)
        out[name] = (both[0], both[1])
    return out


def add_placed(totals: dict[str, tuple[Tensor, Tensor]], state: Mapping,
               numels: Mapping[str, int]) -> None:
    """Add one old rank's placed (u, v) into ``totals``."""
    for name, (u, v) in placed(state, numels).items():
        if name in totals:
            totals[name][0].add_(u)
            totals[name][1].add_(v)
        else:
            totals[name] = (u, v)


def new_state(totals: Mapping[str, tuple[Tensor, Tensor]], template: Mapping, *,
              old_world: int, old_units: int, new_rank: int,
              new_ranks_per_node: int | None) -> dict:
    """The state dict of new rank ``new_rank`` from the old ranks' summed (u, v) ``totals``
    and ``template``, old rank 0's state (weight-decay momentum, counters, warm-up
    position). ``new_ranks_per_node``: None for the flat topology, else the hierarchical
    one's ranks per node."""
    global_u = set(template.get("global_momentum", ()))
    share = 1 if new_ranks_per_node is None else new_ranks_per_node
    pieces = {}
    momentum, accumulation = {}, {}
    for name, (u_total, v_total) in totals.items():
        v = v_total * (share / old_world)
        u = u_total / old_units if name in global_u else u_total * (share / old_world)
        if new_ranks_per_node is not None:
            bounds = piece_bounds(v.numel(), new_ranks_per_node)
            j = new_rank % new_ranks_per_node
            pieces[name] = (bounds[j], bounds[j + 1] - bounds[j])
            u, v = u[bounds[j]:bounds[j + 1]].clone(), v[bounds[j]:bounds[j + 1]].clone()
        else:
            u, v = u.reshape(-1), v.reshape(-1)
        momentum[name], accumulation[name] = u, v
    return {**template, "momentum": momentum, "accumulation": accumulation,
            "thresholds": {}, "pieces": pieces, "global_momentum": sorted(global_u),
            "regions": {}}  # the sparse allreduce's, one per rank of the old world
