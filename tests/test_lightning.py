"""PyTorch Lightning on 2 Gloo ranks under torchrun: ``dgc.lightning.DGCStrategy`` and
``sparse_train.lightning.SparsityCallback`` train to the same bits as the plain torchrun +
DDP loop, log through Lightning's logger, and resume from Lightning's checkpoint to the same
bits as an uninterrupted run. The ranks run ``tests/lightning_worker.py``."""
import subprocess
import sys

import pytest
import torch

import pytorch_lightning  # noqa: F401  (the 'lightning' extra; a missing one fails here)
from dgc.lightning import DGCStrategy, rank_state
from sparse_comm.schema import ConfigError
from sparse_train.lightning import SparsityCallback
from tests.launch_helpers import REPO, launch_env


@pytest.mark.parametrize("make,key", [
    (lambda: DGCStrategy(density=0), "density"),
    (lambda: DGCStrategy(densty=0.1), "densty"),  # neither DGC's nor DDP's
    (lambda: DGCStrategy(ddp_comm_hook=print), "ddp_comm_hook"),
    (lambda: SparsityCallback("nm", n=5), "n"),
    (lambda: SparsityCallback("lottery"), "method"),
])
def test_option_mistakes_are_one_line_config_errors_before_training(make, key):
    with pytest.raises(ConfigError) as info:
        make()
    assert info.value.key == key and "\n" not in str(info.value)


def test_dgc_and_ddp_options_go_their_own_ways():
    strategy = DGCStrategy(density=0.01, value_dtype="fp16", find_unused_parameters=True,
                           process_group_backend="gloo")
    assert strategy.dgc_options == {"density": 0.01, "value_dtype": "fp16"}
    assert strategy._ddp_kwargs == {"find_unused_parameters": True,
                                    "gradient_as_bucket_view": True}
    assert DGCStrategy(gradient_as_bucket_view=False)._ddp_kwargs == {
        "gradient_as_bucket_view": False}


def test_resuming_needs_dgc_state_for_every_rank():
    assert rank_state([{"r": 0}, {"r": 1}], 2, 1) == {"r": 1}
    with pytest.raises(ValueError, match="holds no DGC state"):
        rank_state(None, 2, 0)
    with pytest.raises(ValueError, match="DGC state of 2 ranks and this run has 4"):
        rank_state([{}, {}], 4, 3)


def _torchrun(phase: str, out) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "tests.lightning_worker", phase, str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"{phase}-rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning")
    fit = _torchrun("fit", out)
    resume = _torchrun("resume", out)  # new processes, from the first epoch's checkpoint
    return out, fit, resume


def _assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and torch.equal(a, b), (a - b).abs().max()


def test_dgc_strategy_equals_plain_ddp_loop_bitwise_and_the_hook_ran(runs):
    _, fit, _ = runs
    for rank in fit:
        (plain, _, plain_stats), (lit, _, lit_stats) = rank["dgc"]["plain"], rank["dgc"]["lightning"]
        _assert_same_bits(plain, lit)
        assert lit_stats["steps"] == 10
        assert lit_stats["bytes_sent"] == plain_stats["bytes_sent"]
        assert lit_stats["bytes_sent"] < lit_stats["bytes_dense"] / 2  # it compressed


def test_compression_stats_reach_lightnings_logger(runs):
    _, fit, _ = runs
    rows = [r for r in fit[0]["logged"]["dgc"] if r.get("dgc/steps")]
    assert [float(r["dgc/steps"]) for r in rows] == list(range(1, 11))
    assert float(rows[0]["dgc/density"]) > 0.05  # the warm-up epoch
    assert float(rows[-1]["dgc/density"]) == pytest.approx(0.05)  # logged as float32
    assert float(rows[-1]["dgc/compression_ratio"]) > 2


def test_warmup_fraction_is_of_lightnings_planned_steps(runs):
    _, fit, _ = runs  # dgc+nm warms up over 30% of 10 steps (tests/lightning_worker.py)
    density = [float(r["dgc/density"]) for r in fit[0]["logged"]["dgc+nm"] if r.get("dgc/density")]
    # logged after each step: the density of the next one, which is past the warm-up from 3 on
    assert min(density[:2]) > 0.1 and density[2:] == pytest.approx([0.05] * 8)


@pytest.mark.parametrize("method", ["nm", "iht", "dns", "dgc+nm"])
def test_sparsity_callback_equals_plain_ddp_loop_bitwise(runs, method):
    _, fit, _ = runs
    for rank in fit:
        (plain, plain_momenta, _), (lit, lit_momenta, _) = (rank[method]["plain"],
                                                            rank[method]["lightning"])
        _assert_same_bits(plain, lit)
        _assert_same_bits(plain_momenta, lit_momenta)  # none built up at masked weights
    density = [float(r["sparsity/density"]) for r in fit[0]["logged"][method]
               if r.get("sparsity/density")]
    assert len(density) == 10 and density[-1] < 0.6  # the masks were on


@pytest.mark.parametrize("run", ["dgc", "dgc+nm"])
def test_resume_from_lightning_checkpoint_equals_uninterrupted_run_bitwise(runs, run):
    out, fit, resume = runs
    for rank_fit, rank_resume in zip(fit, resume):
        (uninterrupted, _, stats), (resumed, _, resumed_stats) = (rank_fit[run]["lightning"],
                                                                  rank_resume[run])
        _assert_same_bits(uninterrupted, resumed)
        assert resumed_stats["steps"] == stats["steps"] == 10
        assert resumed_stats["bytes_sent"] == stats["bytes_sent"]
    # rank 0 wrote the file; it holds both ranks' residuals, which differ
    states = torch.load(out / "ckpt" / run / "epoch=0.ckpt", weights_only=False)["dgc_states"]
    assert len(states) == 2
    name = next(iter(states[0]["accumulation"]))
    assert not torch.equal(states[0]["accumulation"][name], states[1]["accumulation"][name])


@pytest.mark.parametrize("name", [
    # channel also masks the layer reading the pruned channels, which its layers does not
    # select: a second fit must restore that mask too (it raised KeyError)
    "second_fit_keeps_structured_masks",
    # under 16-mixed, DGC's memory must hold unscaled gradients
    "strategy_tells_the_hook_the_16_mixed_scale"])
def test_a_single_process_fit(name):
    proc = subprocess.run([sys.executable, "-m", "tests.lightning_single", name], cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), \
        proc.stdout[-2000:] + proc.stderr[-3000:]
