"""HF Accelerate on 2 Gloo ranks under torchrun: ``dgc.attach`` and ``sparse_train.attach``
take what ``accelerator.prepare`` returns and train to the same bits as the plain torchrun +
DDP loop, with and without ``accelerator.accumulate``; the accumulation that would run DGC on
a partial sum is refused in one line. The ranks run ``tests/accelerate_worker.py``."""
import subprocess
import sys

import pytest
import torch

import accelerate  # noqa: F401  (the 'accelerate' extra; a missing one fails here)
from tests.accelerate_worker import CASES, STEPS
from tests.launch_helpers import REPO, launch_env


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "tests.accelerate_worker", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_attach_after_prepare_equals_plain_ddp_loop_bitwise(ranks, case):
    use_dgc, _, micro = CASES[case]
    for rank in ranks:
        (plain, plain_runs), (accelerated, accelerated_runs) = rank[case]
        assert torch.equal(plain, accelerated), (plain - accelerated).abs().max()
        # once per optimizer step: accumulation ran the hook on whole steps only
        assert accelerated_runs == plain_runs == (STEPS if use_dgc else 0)


def test_sync_each_batch_is_refused_at_attach_in_one_line(ranks):
    for rank in ranks:
        message = rank["refused"]["sync_each_batch_at_attach"]
        assert message.startswith("dgc.attach: ") and "sync_each_batch=True" in message
        assert "\n" not in message


@pytest.mark.parametrize("case", ["sync_each_batch_after_attach", "two_backward_passes"])
def test_a_second_backward_before_the_step_is_refused_at_the_step(ranks, case):
    for rank in ranks:
        message = rank["refused"][case]
        assert message.startswith("dgc: the DGC hook ran on 2 backward passes"), message
        assert "\n" not in message
