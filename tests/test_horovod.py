"""DGC under Horovod: the same math as the DDP hook, through hvd.allgather/allreduce.

Runs whenever ``horovod.torch`` imports (``bash scripts/install_horovod.sh`` builds it;
``.ci/run`` does so from a wheel cache) and says why when it skips. Each test trains the
same model from the same weights on the same per-rank batches with 2 processes, once under
torchrun with ``dgc.attach`` (the DDP hook) and once under ``horovodrun --gloo`` with
``dgc.horovod.DistributedOptimizer``, and compares the parameters after 20 steps.
"""
import importlib.util
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from tests.launch_helpers import REPO, launch_env

WORKER = REPO / "tests/dgc_engine_worker.py"


def find_horovodrun() -> str | None:
    beside = Path(sysconfig.get_path("scripts")) / "horovodrun"
    return str(beside) if beside.is_file() else shutil.which("horovodrun")


HOROVODRUN = find_horovodrun()
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("horovod") is None or HOROVODRUN is None,
    reason="Horovod is not installed: bash scripts/install_horovod.sh (builds 0.28.1, ~5 min)")


def _run(cmd, timeout=240) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _train_both(tmp_path, *extra) -> tuple[dict, dict]:
    ddp, hvd = tmp_path / "ddp.pt", tmp_path / "hvd.pt"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
          str(WORKER), "--engine", "ddp", "--out", str(ddp), *extra])
    _run([HOROVODRUN, "-np", "2", "--gloo", "-H", "localhost:2", sys.executable, str(WORKER),
          "--engine", "horovod", "--out", str(hvd), *extra])
    return torch.load(ddp), torch.load(hvd)


def _assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        scale = a[name].abs().max().clamp_min(1e-12)
        rel = float((a[name] - b[name]).abs().max() / scale)
        assert rel < 1e-5, f"{name}: relative difference {rel:.2e}"


def test_horovod_and_ddp_hook_give_the_same_parameters_after_20_steps(tmp_path):
    ddp, hvd = _train_both(tmp_path)
    assert ddp["world_size"] == hvd["world_size"] == 2
    _assert_same_params(ddp["params"], hvd["params"])
    # Per tensor or per bucket, the same pairs and dense values cross the wire; packing per
    # tensor pads each of the 3 compressed tensors to 8 bytes instead of each bucket.
    assert ddp["bytes_sent"] <= hvd["bytes_sent"] <= ddp["bytes_sent"] + 20 * 3 * 7


def test_horovod_with_a_2_4_sparsifier_matches_the_ddp_hook(tmp_path):
    ddp, hvd = _train_both(tmp_path, "--sparsity", "nm")
    _assert_same_params(ddp["params"], hvd["params"])
    # both kept the 2:4 pattern: half of every weight row group is zero
    for name, w in hvd["params"].items():
        if w.dim() == 2:
            assert float((w == 0).float().mean()) >= 0.5, name


def test_horovod_allreduce_sends_only_live_entries_of_a_2_4_model_like_ddp(tmp_path):
    """Without DGC, engine: horovod averages per tensor; under fixed 2:4 masks it sends the
    live half of each masked gradient, the same bytes as the DDP engine's allreduce, and
    trains to the same parameters."""
    ddp, hvd = _train_both(tmp_path, "--comm", "allreduce", "--sparsity", "nm")
    _assert_same_params(ddp["params"], hvd["params"])
    assert hvd["bytes_sent"] == ddp["bytes_sent"]
    weights = sum(w.numel() for w in hvd["params"].values() if w.dim() == 2)
    biases = sum(b.numel() for b in hvd["params"].values() if b.dim() == 1)
    # 2 ranks: an allreduce sends 2(p-1)/p = 1 times its fp32 bytes, over 20 steps
    assert hvd["bytes_sent"] == 20 * 4 * (weights // 2 + biases)
    assert hvd["bytes_dense"] == 20 * 4 * (weights + biases)


def test_launcher_trains_logs_and_checkpoints_under_horovodrun(tmp_path):
    from launch.checkpoint import read
    from tests.launch_helpers import read_run
    from tests.wandb_offline import read_offline_run
    out = tmp_path / "run"
    cmd = [HOROVODRUN, "-np", "2", "--gloo", "-H", "localhost:2", sys.executable, "-m",
           "launch.train", "--config", str(REPO / "configs/mnist_lenet300_dgc.yaml")]
    for o in ("engine=horovod", "data.name=synthetic", "data.synthetic_train_size=512",
              "data.synthetic_test_size=128", "train.batch_size=32", "train.epochs=2",
              "dgc.warmup_epochs=0", "sparsity.method=nm", "wandb.mode=offline",
              f"out_dir={out}"):
        cmd += ["--set", o]
    _run(cmd, timeout=300)
    summary, metrics = read_run(out)
    assert summary["world_size"] == 2 and summary["steps"] == 16
    assert summary["weight_density"] == pytest.approx(0.5)  # 2:4 kept under Horovod
    assert summary["comm_bytes_sent"] < summary["comm_bytes_dense"] / 100
    _, shards = read(out)
    assert len(shards) == 2 and all("accumulation" in s["comm"] for s in shards)  # per rank
    history = read_offline_run(out / "wandb")
    assert history["summary"]["test_accuracy"] == pytest.approx(summary["test_accuracy"])


def test_engine_horovod_outside_horovodrun_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launch.train", "--config", str(REPO / "configs/quickstart.yaml"),
         "--set", "engine=horovod", "--set", "wandb.mode=disabled",
         "--set", f"out_dir={tmp_path / 'r'}"],
        cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "launch.train: error: config key 'engine': 'horovod' needs horovodrun; this is a "
        "single launch (use engine: ddp)"], proc.stderr


def _rank_stderr(output: str) -> list[str]:
    """Lines the ranks wrote to stderr (horovodrun prefixes them with ``[rank]<stderr>:``)."""
    return [line.split(":", 1)[1] for line in output.splitlines() if "]<stderr>:" in line]


def test_dgc_option_the_horovod_path_lacks_is_one_line_per_node(tmp_path):
    cmd = [HOROVODRUN, "-np", "2", "--gloo", "-H", "localhost:2", sys.executable, "-m",
           "launch.train", "--config", str(REPO / "configs/mnist_lenet300_dgc.yaml")]
    for o in ("engine=horovod", "dgc.check_finite=true", "data.name=synthetic",
              "wandb.mode=disabled", f"out_dir={tmp_path / 'r'}"):
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          timeout=120)
    lines = _rank_stderr(proc.stdout + proc.stderr)
    error = ("launch.train: error: config key 'dgc.check_finite': supported by the DDP hook "
             "only, not under Horovod")
    assert lines.count(error) == 1, lines  # both ranks on one node: local rank 0 says it
    assert not any("Traceback" in line for line in lines), lines


def test_an_exchange_other_than_the_allgather_is_refused_under_horovod():
    import dgc.horovod
    from sparse_comm.schema import ConfigError
    net = torch.nn.Linear(4, 4)
    for exchange in ("gtopk", "sparse_allreduce"):
        with pytest.raises(ConfigError, match="under Horovod the pairs are allgathered"):
            dgc.horovod.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1),
                                             net.named_parameters(), exchange=exchange)


SECOND_BACKWARD = """
import torch, horovod.torch as hvd, dgc.horovod
hvd.init()
net = torch.nn.Linear(32, 32)
opt = dgc.horovod.DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1),
                                       net.named_parameters(), density=0.1, min_numel=16)
net(torch.ones(2, 32)).sum().backward()
try:
    net(torch.ones(2, 32)).sum().backward()
except RuntimeError as err:
    print("refused:", err)
opt.step()  # the first backward's exchange still completes
"""


def test_a_second_backward_before_step_is_refused_by_name(tmp_path):
    proc = subprocess.run([HOROVODRUN, "-np", "2", "--gloo", "-H", "localhost:2",
                           sys.executable, "-c", SECOND_BACKWARD],
                          cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    refused = [line for line in proc.stdout.splitlines() if "refused:" in line]
    assert len(refused) == 2, proc.stdout[-3000:]
    assert all("a second backward reached '" in line and "before step()" in line
               for line in refused), refused


CHANNELS_LAST = """
import torch, horovod.torch as hvd, dgc.horovod
hvd.init()
trained = []
for channels_last in (False, True):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 6 * 6, 2))
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = dgc.horovod.DistributedOptimizer(
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net.named_parameters(),
        density=0.1, warmup_epochs=0, min_numel=16)
    for step in range(3):
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(10 * step + hvd.rank()))
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    trained.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
print("largest difference:", (trained[0] - trained[1]).abs().max().item())
"""


def test_a_channels_last_model_trains_as_the_contiguous_one_under_horovod():
    """A channels_last gradient is not a flat view; it used to fail inside backward."""
    proc = subprocess.run([HOROVODRUN, "-np", "2", "--gloo", "-H", "localhost:2",
                           sys.executable, "-c", CHANNELS_LAST],
                          cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = [float(line.rsplit(":", 1)[1]) for line in proc.stdout.splitlines()
             if "largest difference:" in line]
    assert len(found) == 2 and max(found) < 1e-6, proc.stdout[-3000:]
