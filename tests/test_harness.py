import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_ranks


def _allreduce_rank(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom")
    return rank


def test_run_ranks_returns_each_rank_result():
    assert run_ranks(_allreduce_rank, 2) == [3.0, 3.0]


def test_run_ranks_reports_rank_failure():
    with pytest.raises(RuntimeError, match="rank 1 failed"):
        run_ranks(_fail_on_rank_one, 2, collective_timeout=10)


def _environ_rank(rank, world_size):
    import os
    return os.environ.get("SPARSE_COMM_TEST_PROBE")


def test_ranks_see_the_callers_environment_at_the_call(monkeypatch):
    # the ranks fork from a server started at the first call: they must not see its copy
    for value in ("2", "4"):
        monkeypatch.setenv("SPARSE_COMM_TEST_PROBE", value)
        assert run_ranks(_environ_rank, 2) == [value, value]
