"""DGC with torch.compile on real Gloo ranks: compiled inside or around DDP it trains to the
same bits as uncompiled (with aot_eager; to 1e-6 with inductor's own kernels), with state
under the uncompiled parameter names; compiled
autograd's per-parameter hook form (``optimize_ddp="python_reducer"``) is refused in one
line, at ``dgc.attach`` and in ``dgc_hook`` for a hook registered by hand."""
import os

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import dgc
from tests.distributed import run_ranks

OPTIONS = dict(density=0.05, warmup_epochs=0, min_numel=100)
# aot_eager traces forward and backward as inductor does, without inductor's C++ kernel
# builds; SPARSE_COMM_COMPILE_BACKEND=inductor runs the same checks with inductor.
BACKEND = os.environ.get("SPARSE_COMM_COMPILE_BACKEND", "aot_eager")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(),
                         nn.Linear(48, 4))


def _step(run, opt, rank: int, i: int) -> None:
    g = torch.Generator().manual_seed(1000 * i + rank)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
    opt.zero_grad()
    nn.functional.mse_loss(run(x), y).backward()
    opt.step()


def _train(rank: int, wrap: str, backend: str):
    # Default buckets: dynamo's DDPOptimizer asserts buckets of at least DDP's first (1 MiB).
    torch._dynamo.reset()
    model = _model()
    if wrap == "compile inside DDP":
        ddp = run = DDP(torch.compile(model, backend=backend))
    elif wrap == "compile around DDP":
        ddp = DDP(model)
        run = torch.compile(ddp, backend=backend)
    else:
        ddp = run = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state = dgc.attach(run if wrap == "compile around DDP" else ddp, opt, **OPTIONS)
    for i in range(6):
        _step(run, opt, rank, i)
    # numpy, not a tensor: run_ranks' queue would share a tensor's memory with a dying process
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    return params, sorted(state.state_dict()["momentum"]), state.compression_stats()["steps"]


def _refusals(rank: int) -> dict[str, str]:
    out = {}
    torch._dynamo.reset()
    torch._dynamo.config.optimize_ddp = "python_reducer"
    model = _model()
    ddp = DDP(model)
    try:
        dgc.attach(ddp, torch.optim.SGD(model.parameters(), lr=0.1), **OPTIONS)
    except ValueError as err:
        out["attach"] = str(err)
    ddp.register_comm_hook(dgc.DGCState(model=ddp, **OPTIONS), dgc.dgc_hook)
    from torch._dynamo import compiled_autograd
    try:
        with compiled_autograd._enable(torch.compile(backend="eager")):
            torch.compile(ddp, backend="eager")(torch.randn(4, 16)).sum().backward()
    except TypeError as err:
        out["hook"] = str(err)
    return out


def _compile_ranks(rank, world_size, backend):
    runs = {wrap: _train(rank, wrap, backend)
            for wrap in ("eager", "compile inside DDP", "compile around DDP")}
    return runs, _refusals(rank)


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_compile_ranks, 2, BACKEND, timeout=300)


@pytest.mark.parametrize("wrap", ["compile inside DDP", "compile around DDP"])
def test_compiled_model_with_the_dgc_hook_equals_eager_bitwise(ranks, wrap):
    for runs, _ in ranks:
        (eager, eager_names, _), (compiled, names, hook_runs) = runs["eager"], runs[wrap]
        if BACKEND == "aot_eager":  # eager's kernels: the same bits
            assert eager.tobytes() == compiled.tobytes(), abs(eager - compiled).max()
        else:  # inductor fuses kernels, which may round differently
            assert abs(eager - compiled).max() < 1e-6
        assert names == eager_names and not any("_orig_mod" in n for n in names)
        assert hook_runs == 6


@pytest.mark.parametrize("where", ["attach", "hook"])
def test_per_parameter_hook_form_is_refused_in_one_line_naming_the_setting(ranks, where):
    for _, refused in ranks:
        message = refused[where]
        assert "optimize_ddp='python_reducer'" in message and "\n" not in message
