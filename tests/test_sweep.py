"""launch.sweep: the grid, one run at a time, resumable, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch.sweep import Setting, parse_grid, settings, split_values
from tests.launch_helpers import REPO, launch_env

TINY = ["data.name=synthetic", "data.synthetic_train_size=256", "data.synthetic_test_size=64",
        "train.batch_size=32", "train.epochs=2", "wandb.mode=disabled", "train.log_every=4"]


def sweep(tmp_path, *args, timeout=300):
    cmd = [sys.executable, "-m", "launch.sweep", "--config", str(REPO / "configs/quickstart.yaml"),
           "--out-dir", str(tmp_path / "sw"), *args]
    for o in TINY:
        cmd += ["--set", o]
    return subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_values_split_on_commas_outside_brackets_and_the_grid_is_a_product():
    assert split_values("[0.01,0.005],paper, 3") == ["[0.01,0.005]", "paper", "3"]
    grid = parse_grid(["dgc.warmup_densities=[0.01,0.005],paper", "train.lr=0.1,0.2"])
    points = settings(grid)
    assert len(points) == 4
    assert points[0].sets() == ["dgc.warmup_densities=[0.01,0.005]", "train.lr=0.1"]
    assert points[0].name == "warmup_densities=0.01,0.005_lr=0.1"
    assert settings([]) == [Setting(())]


def test_a_sweep_runs_each_setting_and_seed_once_and_resumes(tmp_path):
    proc = sweep(tmp_path, "--grid", "train.lr=0.05,0.1", "--seeds", "0,1")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "sw"
    summaries = sorted(out.glob("*/seed*/summary.json"))
    assert len(summaries) == 4
    table = json.loads((out / "sweep.json").read_text())["rows"]
    assert [(r["setting"], r["seeds"]) for r in table] == [("lr=0.05", 2), ("lr=0.1", 2)]
    assert "| lr=0.05 | 2 |" in (out / "sweep.md").read_text()
    # finished runs are kept; a run that stopped part-way continues from its checkpoint
    kept = out / "lr=0.1" / "seed0" / "summary.json"
    before = kept.stat().st_mtime_ns
    partial = out / "lr=0.05" / "seed1"
    steps = json.loads((partial / "summary.json").read_text())["steps"]
    (partial / "summary.json").unlink()
    proc = sweep(tmp_path, "--grid", "train.lr=0.05,0.1", "--seeds", "0,1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("done before, kept") == 3
    assert kept.stat().st_mtime_ns == before
    assert json.loads((partial / "summary.json").read_text())["steps"] == steps
    assert "resumed" in (partial / "train.log").read_text()


@pytest.mark.parametrize("args,message", [
    (["--grid", "train.lrr=0.1,0.2"], "config key 'train.lrr': unknown key"),
    (["--grid", "train.lr=-1"], "config key 'train.lr': must be > 0"),
    (["--grid", "train.lr"], "--grid expects KEY=V1,V2"),
    (["--seeds", "a,b"], "--seeds expects comma-separated integers"),
    (["--grid", "train.seed=1,2"], "config key 'train.seed': is set by the sweep"),
    (["--lock", str(REPO / "configs")], "argument --lock: cannot open"),
    (["--out-dir", str(REPO / "README.md")], "argument --out-dir: cannot make the folder"),
    (["--name", "a/b"], "--name must be a non-empty name without '/'"),  # it names the runs
    (["--seeds", "0,0"], "--seeds names a seed twice"),  # one run counted as two seeds
])
def test_a_bad_grid_is_one_line_and_exit_2_before_any_run(tmp_path, args, message):
    proc = sweep(tmp_path, *args, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not list((tmp_path / "sw").glob("*/seed*"))
