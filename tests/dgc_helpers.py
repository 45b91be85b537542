"""Pieces the distributed DGC tests share: a hook that records what went in and out of
DGC per tensor, the resume experiment, and the one-tensor model the byte counts use."""
from __future__ import annotations

import copy
import os

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import dgc
from tests.test_dgc_distributed import _flat, _train


def recording_hook(model: torch.nn.Module, raw: dict, out: dict):
    """A DDP hook around ``dgc.dgc_hook`` that stores each tensor's local gradient in ``raw``
    and its averaged update in ``out``, both flat and keyed by parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    sizes = {n: p.numel() for n, p in model.named_parameters()}

    def hook(state, bucket):
        bucket_names = [names[id(p)] for p in bucket.parameters()]
        raw.update((n, g.detach().clone().reshape(-1))
                   for n, g in zip(bucket_names, bucket.gradients()))

        def keep(fut):
            result = fut.value()
            offset = 0
            for n in bucket_names:
                out[n] = result[offset:offset + sizes[n]].clone()
                offset += sizes[n]
            return result
        return dgc.dgc_hook(state, bucket).then(keep)
    return hook


def corrected_and_applied(model: torch.nn.Module, ddp: DDP, state, rank: int, steps: int,
                          names: list[str], momentum: float = 0.9
                          ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train ``steps`` steps of plain SGD through ``state``'s hook and return, per name of
    ``names`` (sorted: every rank must allreduce in one order), the sum over steps of the
    momentum-corrected gradient sum over ranks, U(t) = m U(t-1) + sum_i g_i(t), and the sum
    of the updates applied, times the world size: the two sides of "nothing is lost"."""
    raw, out = {}, {}
    ddp.register_comm_hook(state, recording_hook(model, raw, out))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    u = {n: torch.zeros(sizes[n]) for n in names}
    total_u = {n: torch.zeros(sizes[n]) for n in names}
    applied = {n: torch.zeros(sizes[n]) for n in names}
    world_size = torch.distributed.get_world_size()
    for step in range(steps):
        raw.clear()
        _train(ddp, opt, 1, rank, start=step)
        for n in names:
            g = raw[n].clone()
            torch.distributed.all_reduce(g)
            u[n].mul_(momentum).add_(g)
            total_u[n] += u[n]
            applied[n] += out[n] * world_size
    return total_u, applied


def nothing_lost(model: torch.nn.Module, ddp: DDP, state, rank: int, steps: int,
                 names: list[str], residuals=None) -> tuple[dict[str, float], bool, dict]:
    """Train as ``corrected_and_applied`` does; return per name the relative error of
    "applied plus every rank's residual equals the corrected gradients", whether all ranks
    hold the same parameters, and the applied sums. ``residuals(state)``: this rank's
    residuals as whole tensors by name (default: its ``accumulation``)."""
    total_u, applied = corrected_and_applied(model, ddp, state, rank, steps, names)
    accumulation = state.state_dict()["accumulation"]
    residuals = residuals(state) if residuals else {n: accumulation[n].clone() for n in names}
    for n in names:
        torch.distributed.all_reduce(residuals[n])
    flat = _flat(model)
    everyone = [torch.empty_like(flat) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(everyone, flat)
    errors = {n: ((applied[n] + residuals[n] - total_u[n]).norm() / total_u[n].norm()).item()
              for n in names}
    return errors, all(torch.equal(everyone[0], e) for e in everyone), applied


def resumed(fresh, rank: int, steps: int, at: int, epochs: bool = False
            ) -> tuple[torch.Tensor, torch.nn.Module, object]:
    """Train ``steps`` steps without a break, then again from ``fresh(0)`` for ``at`` steps,
    through a state_dict round trip into ``fresh(1)`` (other weights, empty state), and on to
    ``steps``. ``fresh(seed)`` returns (model, ddp, optimizer, DGC state); with ``epochs``
    the state is told the epoch (its warm-up moves). Returns the flat uninterrupted
    parameters, the resumed model and its DGC state."""
    def train(ddp, opt, state, n, start=0):
        _train(ddp, opt, n, rank, start=start, state=state if epochs else None)

    model, ddp, opt, state = fresh(0)
    train(ddp, opt, state, steps)
    uninterrupted = _flat(model)
    model, ddp, opt, state = fresh(0)
    train(ddp, opt, state, at)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                           "dgc": state.state_dict()})
    model, ddp, opt, state = fresh(1)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    state.load_state_dict(saved["dgc"])
    train(ddp, opt, state, steps - at, start=at)
    return uninterrupted, model, state


# The wire-byte tests' tensor: k = 25,000 pairs either way; the counts depend on k and p
# only. CI runs 2.5M entries at density 0.01; SPARSE_COMM_WIRE_NUMEL=25000000 gives the
# README's 25M entries at density 0.001, the same counts in eight times the memory and time.
WIRE_K = 25_000
WIRE_NUMEL = int(os.environ.get("SPARSE_COMM_WIRE_NUMEL", 2_500_000))
WIRE_DENSITY = WIRE_K / WIRE_NUMEL


def one_tensor_dgc(numel: int, density: float, exchange: str, **options):
    """A bias-free Linear of ``numel`` weights in one DDP bucket under DGC at ``density`` with
    fp16 values and int32 indices, its learning rate 0: for counting bytes on the wire."""
    model = torch.nn.Linear(numel // 1000, 1000, bias=False)
    ddp = DDP(model, bucket_cap_mb=1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    state = dgc.attach(ddp, opt, density=density, value_dtype="fp16", index_dtype="int32",
                       exchange=exchange, **options)
    return ddp, state
