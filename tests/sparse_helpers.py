"""Shared fixtures for the sparse_train tests: a tiny MLP, a synthetic task, and every
method's schedule squeezed into a couple of dozen steps so a short run sees all phases."""
import pytest
import torch
from torch import nn

SCHEDULES = {
    "magnitude": dict(target=0.5, start_step=2),
    "gmp": dict(target=0.7, start_step=2, end_step=14, frequency=4),
    "dns": dict(dns_c=0.0, dns_gamma=0.1, dns_iter_stop=16),
    "iht": dict(target=0.5, iht_s1=3, iht_s2=4, iht_cycles=2, iht_end="sparse"),
    "dsd": dict(target=0.5, dsd_dense_steps=4, dsd_sparse_steps=6),
    "nm": dict(nm_start_step=3),
    "block": dict(target=0.5, block=[2, 4], schedule="gmp", end_step=12, frequency=4),
    "bank": dict(target=0.5, bank_size=4, schedule="gmp", end_step=12, frequency=4),
    "channel": dict(target=0.5, start_step=2, schedule="gmp", end_step=12, frequency=4),
    "group_lasso": dict(penalty=0.05, group_threshold=0.6, start_step=4, schedule="gmp",
                        end_step=12, frequency=4),
}
METHODS = list(SCHEDULES)


def mlp(seed: int = 0) -> nn.Module:
    """Layers 16x12, 8x16, 3x8: all N:M-able; the last is not tiled by 2x4 blocks."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                         nn.Linear(8, 3))


def batches(count: int, seed: int = 1, size: int = 32):
    """(x, y) batches of a 3-class task labelled by a fixed random linear map."""
    teacher = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.randn(size, 12, generator=gen)
        out.append((x, (x @ teacher).argmax(1)))
    return out


def train_step(model, optimizer, x, y) -> float:
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run much faster on one thread, above all on a busy shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
