"""Masks agree across 2 real Gloo ranks of a DDP job after every update, for every method."""
import hashlib

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import sparse_train
from tests.distributed import run_ranks
from tests.sparse_helpers import METHODS, SCHEDULES, batches, mlp, train_step

STEPS = 24


def mask_checksum(sparsifier) -> str:
    digest = hashlib.sha256()
    for name, mask in sorted(sparsifier.masks.items()):
        digest.update(name.encode())
        digest.update(mask.numpy().tobytes())
    fixed = sparsifier.fixed_masks() is not None
    return f"{digest.hexdigest()[:16]} fixed={fixed} grads={sparsifier.grad_mask_policy}"


def _run_every_method(rank, world_size):
    checksums = {}
    for method in METHODS:
        model = DistributedDataParallel(mlp(seed=0))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sp = sparse_train.attach(model, opt, method=method, **SCHEDULES[method])
        assert not any(name.startswith("module.") for name in sp.params), sorted(sp.params)
        # Each rank gets its own data and its own global RNG stream: only DDP's gradient
        # averaging and DNS's shared generator can keep the masks in step.
        torch.manual_seed(100 + rank)
        sums = [mask_checksum(sp)]
        for x, y in batches(STEPS, seed=10 + rank):
            train_step(model, opt, x, y)
            sums.append(mask_checksum(sp))
        checksums[method] = sums
    return checksums


@pytest.fixture(scope="module")
def rank_checksums():
    return run_ranks(_run_every_method, 2, timeout=150)


@pytest.mark.parametrize("method", METHODS)
def test_masks_identical_on_two_gloo_ranks_after_every_step(rank_checksums, method):
    rank0, rank1 = (result[method] for result in rank_checksums)
    assert len(rank0) == STEPS + 1
    for step, (a, b) in enumerate(zip(rank0, rank1)):
        assert a == b, f"{method}: masks differ after step {step}: {a} vs {b}"
    assert len({s.split()[0] for s in rank0}) > 1, f"{method}: masks never changed"
