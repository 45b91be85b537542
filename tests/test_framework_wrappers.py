"""Seeing through framework wrappers (``sparse_comm.wrappers``) and DGC's one-backward-per-step
guard (``dgc.guards``), without processes."""
import pytest
import torch
from torch import nn

import sparse_train
from dgc.guards import OneBackwardPerStep
from dgc.hook import DGCStats
from sparse_comm.wrappers import strip_compile, unwrap_model, unwrap_optimizer
from tests.sparse_helpers import batches, mlp, one_thread, train_step  # noqa: F401


@pytest.fixture
def accelerated():
    """Wrap an optimizer as ``accelerator.prepare`` does, then forget Accelerate's globals."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    accelerator = Accelerator(cpu=True)  # one process: prepare wraps the optimizer only
    yield accelerator.prepare_optimizer
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_models_are_unwrapped_from_compile_and_data_parallel_in_any_nesting():
    model = mlp()
    assert unwrap_model(torch.compile(nn.DataParallel(torch.compile(model)))) is model
    assert strip_compile(torch.compile(model)) is model and strip_compile(model) is model


def test_optimizers_are_unwrapped_from_accelerate_and_lightning(accelerated):
    from pytorch_lightning.core.optimizer import LightningOptimizer
    opt = torch.optim.SGD(mlp().parameters(), lr=0.1)
    assert unwrap_optimizer(accelerated(opt)) is opt
    assert unwrap_optimizer(LightningOptimizer(accelerated(opt))) is opt
    assert unwrap_optimizer(opt) is opt


def test_sparsifier_on_a_compiled_model_and_accelerated_optimizer_keeps_names_and_steps(
        accelerated):
    model = mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = sparse_train.attach(torch.compile(model), accelerated(inner), method="nm",
                             nm_start_step=1)
    assert sorted(sp.params) == ["0.weight", "2.weight", "4.weight"]  # no "_orig_mod."
    assert sp.optimizer is inner
    for x, y in batches(2):
        train_step(model, accelerated(inner), x, y)  # AcceleratedOptimizer.step -> hooks
    assert sp.step == 2 and sp.report()["density"] == 0.5


def _guard_after(passes: int, nonfinite: int = 0, restored: bool = False):
    state = type("State", (), {"stats": DGCStats()})()
    guard = OneBackwardPerStep(state)
    if restored:
        state.stats = DGCStats(steps=7)
    state.stats.steps += passes
    state.stats.nonfinite_buckets += nonfinite
    guard(None, (), {})


def test_guard_refuses_a_step_after_two_backward_passes_in_one_line():
    with pytest.raises(RuntimeError, match="^dgc: the DGC hook ran on 2 backward passes") as e:
        _guard_after(2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", [dict(passes=0), dict(passes=1),
                                  dict(passes=2, nonfinite=1),  # a loss scaler skipped a step
                                  dict(passes=2, restored=True)])  # a checkpoint was loaded
def test_guard_lets_one_pass_skipped_steps_and_restored_state_through(case):
    _guard_after(**case)
