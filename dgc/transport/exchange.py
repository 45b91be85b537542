"""The exchange a plan's route names: the one small interface the sparse routes share.

``exchange(group, plan, flat, sent, positions, state, key)`` starts the collectives that
sum every rank's selected pairs (``sent``, per compressed slot) and dense slots of
``flat`` over ``group``, and returns a future of ``flat`` holding that sum. ``state`` and
``key`` (the bucket's layout) carry what a route keeps between steps: the sparse
allreduce's regions, and the residuals it and gtopk give back to.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from dgc.collectives import Group
from dgc.plan import Plan
from dgc.transport import allgather, gtopk, sparse_allreduce


def exchange(group: Group, plan: Plan, flat: Tensor, sent: allgather.Pairs,
             positions: Mapping[str, Tensor], state, key: tuple) -> torch.futures.Future:
    if plan.route == "sparse_allreduce":
        return sparse_allreduce.exchange(group, plan, flat, sent, positions, state, key)
    if plan.route == "gtopk":
        return gtopk.exchange(group, plan, flat, sent, positions, state)
    return allgather.exchange(group, plan, flat, sent, positions)
