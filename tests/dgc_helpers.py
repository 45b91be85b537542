"""Pieces the distributed DGC tests share: a hook that records what went in and out of
DGC per tensor, the resume experiment, and the one-tensor model the byte counts use."""
from __future__ import annotations

import copy

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


def one_tensor_dgc(numel: int, density: float, exchange: str, **options):
    """A bias-free Linear of ``numel`` weights in one DDP bucket under DGC at ``density`` with
    fp16 values and int32 indices, its learning rate 0: for counting bytes on the wire."""
    model = torch.nn.Linear(numel // 1000, 1000, bias=False)
    ddp = DDP(model, bucket_cap_mb=1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    state = dgc.attach(ddp, opt, density=density, value_dtype="fp16", index_dtype="int32",
                       exchange=exchange, **options)
    return ddp, state
