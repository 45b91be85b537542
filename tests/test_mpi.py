"""Launching under MPI and Slurm: env detection, a real 2-process mpirun run, torchrun parity."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from launch import distenv
from launch.checkpoint import read
from sparse_comm.schema import ConfigError
from tests.launch_helpers import REPO, launch_env, read_run, train
from tests.wandb_offline import read_offline_run

LAUNCHER_VARS = (
    *distenv.TORCHRUN.own, *distenv.RENDEZVOUS_VARS, "TORCHELASTIC_RUN_ID",
    *(v for lv in distenv.MPI_LAUNCHERS for v in lv.own),
    *distenv.SLURM.own, *distenv.SLURM_NODELIST_VARS, "SLURM_JOB_ID")

TORCHRUN_1_OF_2 = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
OMPI_1_OF_2 = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
               "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
SLURM_1_OF_4 = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"}


def find_mpirun() -> str | None:
    """The mpirun the `mpi` extra installed beside this Python, else one on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "mpirun"
    return str(beside) if beside.is_file() else shutil.which("mpirun")


MPIRUN = find_mpirun()
needs_mpi = pytest.mark.skipif(
    MPIRUN is None or importlib.util.find_spec("mpi4py") is None,
    reason='mpirun or mpi4py not installed: pip install -e ".[mpi]"')


@pytest.fixture
def environ(monkeypatch):
    """A clean launch environment; returns a function that sets variables in it."""
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)

    def set_vars(**values):
        for key, value in values.items():
            monkeypatch.setenv(key, value)
    return set_vars


# ---- detection from the environment, without starting anything ----

def test_no_launcher_is_one_process(environ):
    env = distenv.detect()
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (0, 1, 0, "single")


def test_torchrun_variables_give_torchrun(environ):
    environ(**TORCHRUN_1_OF_2)
    env = distenv.detect()
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (1, 2, 1, "torchrun")
    assert (env.master_addr, env.master_port) == ("127.0.0.1", 29500)


def test_torchrun_wins_over_mpi_and_slurm_that_agree_without_loading_mpi(environ):
    # A wrapper script that exports RANK=$OMPI_COMM_WORLD_RANK and so on.
    environ(**TORCHRUN_1_OF_2, **OMPI_1_OF_2, **{**SLURM_1_OF_4, "SLURM_NTASKS": "2"})
    assert distenv.detect().launcher == "torchrun"
    assert "mpi4py.MPI" not in sys.modules


def test_torchrun_started_per_node_by_mpirun_owns_its_workers(environ):
    # mpirun -np 2 torchrun --nproc-per-node=2: the MPI rank is the node's, RANK the worker's.
    environ(**{**TORCHRUN_1_OF_2, "RANK": "3", "WORLD_SIZE": "4"}, TORCHELASTIC_RUN_ID="r",
            **{**OMPI_1_OF_2, "OMPI_COMM_WORLD_LOCAL_RANK": "0"})
    env = distenv.detect()
    assert (env.rank, env.world_size, env.launcher) == (3, 4, "torchrun")


@pytest.mark.parametrize("variables, place", [
    (OMPI_1_OF_2, (1, 2, 1)),
    ({"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "0"}, (2, 3, 0)),
    ({"PMI_RANK": "2", "PMI_SIZE": "3"}, (2, 3, 0)),  # srun --mpi=pmi2 sets no local rank
    ({"MV2_COMM_WORLD_RANK": "0", "MV2_COMM_WORLD_SIZE": "2",
      "MV2_COMM_WORLD_LOCAL_RANK": "0", "PMI_RANK": "0", "PMI_SIZE": "2"}, (0, 2, 0)),
])
def test_mpi_launch_variables_are_recognised(variables, place):
    env = distenv.from_environ(variables)
    assert env.launcher == "mpi"
    assert (env.rank, env.world_size, env.local_rank) == place
    assert (env.master_addr, env.master_port) == (None, None)  # rank 0 picks at init


def test_mpirun_inside_a_slurm_allocation_is_mpi():
    # The batch step's variables reach every rank mpirun starts, even partial ones: MPI decides.
    env = distenv.from_environ({**OMPI_1_OF_2, "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                                "MASTER_ADDR": "head", "MASTER_PORT": "7000"})
    assert (env.launcher, env.rank, env.master_addr, env.master_port) == ("mpi", 1, "head", 7000)


def test_slurm_variables_and_rendezvous(environ):
    environ(**SLURM_1_OF_4)
    env = distenv.detect()
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (1, 4, 1, "slurm")
    assert env.master_addr == "gpu07"
    assert env.master_port == 10000 + 4242  # the same on every task of the job
    environ(SLURM_STEP_NODELIST="gpu08", MASTER_PORT="6000")
    assert (distenv.detect().master_addr, distenv.detect().master_port) == ("gpu08", 6000)
    environ(MASTER_ADDR="10.1.2.3")
    assert distenv.detect().master_addr == "10.1.2.3"


@pytest.mark.parametrize("nodelist, host", [
    ("node17", "node17"),
    ("node[01-04,07]", "node01"),
    ("node[07,01-04],gpu1", "node07"),
    ("gpu3,node[1-2]", "gpu3"),
    ("rack[2-3]-node[001-016]", "rack2-node001"),
    ("login-1.cluster", "login-1.cluster"),
])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert distenv.first_host(nodelist) == host


@pytest.mark.parametrize("nodelist", ["", "node[", "node[a-c]", "node[]", ",node1", "n]1"])
def test_malformed_nodelist_is_a_config_error(nodelist):
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        distenv.first_host(nodelist)


@pytest.mark.parametrize("variables, message", [
    ({"RANK": "0"}, "RANK set but WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"),
    ({**TORCHRUN_1_OF_2, "MASTER_PORT": None}, "MASTER_PORT missing"),
    ({**TORCHRUN_1_OF_2, "RANK": "2"}, "RANK=2 with WORLD_SIZE=2"),
    ({**TORCHRUN_1_OF_2, "LOCAL_RANK": "-1"}, "LOCAL_RANK=-1 with RANK=1"),
    ({**TORCHRUN_1_OF_2, "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({**TORCHRUN_1_OF_2, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ({**TORCHRUN_1_OF_2, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2",
      "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
     "torchrun's RANK=1 WORLD_SIZE=2 but Open MPI's OMPI_COMM_WORLD_RANK=0"),
    ({**TORCHRUN_1_OF_2, **SLURM_1_OF_4}, "torchrun's RANK=1 WORLD_SIZE=2 but Slurm's"),
    ({"OMPI_COMM_WORLD_RANK": "1"}, "OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK missing"),
    ({**OMPI_1_OF_2, "OMPI_COMM_WORLD_SIZE": "1"}, "OMPI_COMM_WORLD_RANK=1 with "),
    ({"PMI_SIZE": "2"}, "PMI_SIZE set but PMI_RANK missing"),
    ({**OMPI_1_OF_2, "PMI_RANK": "0", "PMI_SIZE": "2"},
     "Open MPI's OMPI_COMM_WORLD_RANK=1 OMPI_COMM_WORLD_SIZE=2 but MPICH/Intel MPI's PMI_RANK=0"),
    ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, "SLURM_NTASKS missing"),
    ({**SLURM_1_OF_4, "SLURM_PROCID": "4"}, "SLURM_PROCID=4 with SLURM_NTASKS=4"),
    ({**SLURM_1_OF_4, "SLURM_JOB_NODELIST": None}, "SLURM_STEP_NODELIST, SLURM_JOB_NODELIST"),
    ({**SLURM_1_OF_4, "SLURM_JOB_NODELIST": "gpu[07"}, "is not a Slurm host list"),
    ({**SLURM_1_OF_4, "SLURM_JOB_ID": None}, "SLURM_JOB_ID is not set: set MASTER_PORT"),
    ({"MASTER_ADDR": "127.0.0.1"}, "MASTER_ADDR set but no launcher's rank variables"),
])
def test_inconsistent_environment_is_a_one_line_config_error(environ, variables, message):
    environ(**{k: v for k, v in variables.items() if v is not None})
    with pytest.raises(ConfigError) as err:
        distenv.detect()
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert "mpi4py.MPI" not in sys.modules  # rejected before MPI is started


def test_mpi_launch_without_mpi4py_names_the_extra(environ, monkeypatch):
    environ(**OMPI_1_OF_2)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # what a missing package looks like
    with pytest.raises(ConfigError, match=r'install it with: pip install -e "\.\[mpi\]"'):
        distenv.detect()


# ---- real processes ----

def run_command(cmd: list[str], timeout: float, **variables: str) -> subprocess.CompletedProcess:
    """Run ``cmd``; past ``timeout``, SIGTERM first so mpirun can take its ranks down."""
    env = launch_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    for var in LAUNCHER_VARS:
        env.pop(var, None)
    env.update(variables)
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            raise AssertionError(f"{' '.join(cmd)} did not finish within {timeout}s") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def mpirun_train(config: Path, *overrides: str, nproc: int = 2,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    # --bind-to none: Open MPI would otherwise pin each rank, and all its torch threads, to one core.
    cmd = [MPIRUN, "--bind-to", "none", "-np", str(nproc), sys.executable, "-m", "launch.train",
           "--config", str(config)]
    for o in overrides:
        cmd += ["--set", o]
    proc = run_command(cmd, timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


@needs_mpi
def test_two_process_mpirun_run_trains_and_logs(tmp_path):
    out = tmp_path / "run"
    mpirun_train(REPO / "configs/quickstart.yaml", "train.max_steps=20", "train.epochs=1",
                 "train.log_every=5", "wandb.mode=offline", f"out_dir={out}")
    summary, metrics = read_run(out)
    assert summary["world_size"] == 2 and summary["steps"] == 20
    assert summary["comm_bytes_sent"] > 0  # the two ranks did talk through DDP
    assert 0.5 < summary["test_accuracy"] <= 1.0
    assert [m["train/step"] for m in metrics if "train/loss" in m] == [5, 10, 15, 20]
    recorded = read_offline_run(out / "wandb")
    assert recorded["summary"]["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert read(out)[0]["progress"]["step"] == 20


def tensors(state, prefix=""):
    """(path, tensor) for every floating-point tensor nested in dicts and lists."""
    items = state.items() if isinstance(state, dict) else enumerate(state)
    for key, value in items:
        path = f"{prefix}/{key}"
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            yield path, value
        elif isinstance(value, (dict, list, tuple)):
            yield from tensors(value, path)


@needs_mpi
def test_dgc_run_under_mpirun_matches_torchrun(tmp_path):
    config = REPO / "configs/mnist_lenet300_dgc.yaml"
    common = ("train.max_steps=20", "train.epochs=1", "train.seed=3", "wandb.mode=disabled",
              "dgc.warmup_epochs=0", "data.name=synthetic", "data.synthetic_train_size=2048",
              "data.synthetic_test_size=128", "train.batch_size=32")
    train(config, *common, f"out_dir={tmp_path / 'torchrun'}", nproc=2, timeout=300)
    mpirun_train(config, *common, f"out_dir={tmp_path / 'mpirun'}")
    (a, shards_a), (b, shards_b) = read(tmp_path / "torchrun"), read(tmp_path / "mpirun")
    assert a["progress"]["step"] == b["progress"]["step"] == 20
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=1e-5, atol=0, msg=name)
    # The DGC residuals live in the hook: equal ones mean the hook path ran the same way.
    residuals_a = dict(tensors([s["comm"] for s in shards_a]))
    residuals_b = dict(tensors([s["comm"] for s in shards_b]))
    assert residuals_a and residuals_a.keys() == residuals_b.keys()
    for name, tensor in residuals_a.items():
        torch.testing.assert_close(residuals_b[name], tensor, rtol=1e-5, atol=0, msg=name)
    summary_a, _ = read_run(tmp_path / "torchrun")
    summary_b, _ = read_run(tmp_path / "mpirun")
    assert summary_a["comm_bytes_sent"] == summary_b["comm_bytes_sent"]
    assert summary_a["comm_bytes_sent"] < summary_a["comm_bytes_dense"] / 100  # compressed


@needs_mpi
def test_stale_mpi_variables_without_mpirun_exit_2_with_one_line(tmp_path):
    # Plain python in a shell that still holds a finished mpirun job's variables.
    cmd = [sys.executable, "-m", "launch.train", "--config", str(REPO / "configs/quickstart.yaml"),
           "--set", f"out_dir={tmp_path}/r"]
    proc = run_command(cmd, timeout=120, **OMPI_1_OF_2)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "MPI reports rank 0 of 1" in lines[0], proc.stderr
    assert not (tmp_path / "r").exists()


def test_node_layout_reads_nodes_from_local_ranks():
    from launch.distenv import node_layout
    assert node_layout([0, 1, 0, 1]) == (2, 2)
    assert node_layout([0, 1, 2, 3]) == (1, 4)
    assert node_layout([0]) == (1, 1)
    assert node_layout([0, 1, 2, 0, 1]) == (2, None)  # 3 + 2: unequal nodes
    assert node_layout([0, 0, 1, 1]) == (2, None)  # not placed node by node
