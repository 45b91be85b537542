"""launch.compare and launch.pareto: settings over seeds, the front per scheme, bytes to a
target accuracy, the charts, the tables and the wandb log."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from launch import compare, pareto
from launch.compare import COLUMNS, load_run
from tests.launch_helpers import REPO, launch_env
from tests.wandb_offline import read_offline_run


def fake_run(path, accuracies, bytes_per_epoch, *, seed=0, hook="allreduce", dgc=None,
             rank=4, steps_per_epoch=10, dense_per_epoch=None, world_size=2):
    """A run directory as launch.train writes it (compare reads only these files)."""
    path.mkdir(parents=True)
    rows = [{"train/step": steps_per_epoch * (i + 1), "test/accuracy": acc,
             "comm/bytes_sent_cum": bytes_per_epoch * (i + 1)} for i, acc in enumerate(accuracies)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    epochs = len(accuracies)
    (path / "summary.json").write_text(json.dumps({
        "run_name": path.name, "test_accuracy": accuracies[-1],
        "comm_bytes_sent": bytes_per_epoch * epochs,
        "comm_bytes_dense": (dense_per_epoch or bytes_per_epoch) * epochs,
        "weight_density": 1.0, "wall_time_s": 12.5, "world_size": world_size}))
    config = {"model": {"name": "lenet300"}, "train": {"seed": seed},
              "ddp": {"comm_hook": hook, "powersgd_rank": rank},
              "wandb": {"project": "compare-test"}, "run_name": path.name,
              "out_dir": str(path)}
    if dgc is not None:
        config["dgc"] = dgc
    (path / "config.yaml").write_text(yaml.safe_dump(config))


def test_settings_average_seeds_and_the_front_keeps_the_non_dominated(tmp_path):
    fake_run(tmp_path / "d0", [0.95, 0.980], 1e9, seed=0)
    fake_run(tmp_path / "d1", [0.95, 0.984], 1e9, seed=1)
    fake_run(tmp_path / "p1", [0.93, 0.970], 1e7, hook="powersgd", rank=1)
    fake_run(tmp_path / "p2", [0.94, 0.960], 2e7, hook="powersgd", rank=2)  # dominated
    fake_run(tmp_path / "p4", [0.96, 0.981], 4e7, hook="powersgd", rank=4)
    runs = [load_run(p) for p in sorted(tmp_path.iterdir())]
    points = pareto.group_settings(runs)
    dense = next(p for p in points if p.scheme == "dense")
    assert len(dense.runs) == 2
    assert dense.accuracy == pytest.approx(98.2) and dense.spread == pytest.approx(0.2828, 1e-3)
    psgd = [p for p in points if p.scheme == "PowerSGD"]
    assert sorted(p.label for p in psgd) == ["powersgd_rank=1", "powersgd_rank=2",
                                             "powersgd_rank=4"]
    assert [p.label for p in pareto.front(psgd)] == ["powersgd_rank=1", "powersgd_rank=4"]


def test_runs_at_other_process_counts_are_other_settings_not_seeds(tmp_path):
    """The number of processes is not in config.yaml (torchrun sets it): two runs of one
    config at 4 and 8 processes are two markers, labelled by it."""
    fake_run(tmp_path / "p4", [0.95, 0.984], 1e9, world_size=4)
    fake_run(tmp_path / "p8s0", [0.95, 0.980], 1e9, world_size=8)
    fake_run(tmp_path / "p8s1", [0.95, 0.982], 1e9, seed=1, world_size=8)
    points = pareto.group_settings([load_run(p) for p in sorted(tmp_path.iterdir())])
    assert sorted((p.label, len(p.runs)) for p in points) == [("processes=4", 1),
                                                               ("processes=8", 2)]
    eight = next(p for p in points if p.label == "processes=8")
    assert eight.accuracy == pytest.approx(98.1)
    # the p = 4 run is cheaper-or-equal and more accurate, but another batch: both fronts
    assert sorted(f[-1] for f in pareto.fronts(points)) == [4, 8]
    assert all(len(members) == 1 for members in pareto.fronts(points).values())


def test_fewest_bytes_to_a_target_come_from_the_mean_per_epoch_curve(tmp_path):
    # seed means per epoch: 95.5, 97.5, 98.5 -> 98.0 first reached at epoch 3
    fake_run(tmp_path / "a0", [0.95, 0.97, 0.98], 1e6, seed=0, dgc={"density": 0.001})
    fake_run(tmp_path / "a1", [0.96, 0.98, 0.99], 1e6, seed=1, dgc={"density": 0.001})
    # a costlier setting that gets there sooner in bytes: 97.5 then 98.2 at 3e6
    fake_run(tmp_path / "b0", [0.975, 0.982], 3e6, dgc={"density": 0.01})
    points = pareto.group_settings([load_run(p) for p in sorted(tmp_path.iterdir())])
    cheapest = pareto.cheapest_to_target(points, 98.0)[("lenet300", "DGC", 2)]
    assert cheapest[0].label == "dgc.density=0.001" or cheapest[0].label == "density=0.001"
    assert cheapest[1:] == (pytest.approx(3e6), pytest.approx(30))
    assert pareto.cheapest_to_target(points, 99.5)[("lenet300", "DGC", 2)] is None


def test_fewest_bytes_to_a_target_are_per_number_of_processes(tmp_path):
    # the p = 4 setting reaches 98% with fewer bytes, but p = 8 needs its own answer
    fake_run(tmp_path / "p4", [0.97, 0.985], 1e6, world_size=4, dgc={"density": 0.001})
    fake_run(tmp_path / "p8a", [0.97, 0.982], 4e6, world_size=8, dgc={"density": 0.001})
    fake_run(tmp_path / "p8b", [0.95, 0.975], 2e6, world_size=8, dgc={"density": 0.0001})
    points = pareto.group_settings([load_run(p) for p in sorted(tmp_path.iterdir())])
    hits = pareto.cheapest_to_target(points, 98.0)
    assert sorted(hits) == [("lenet300", "DGC", 4), ("lenet300", "DGC", 8)]
    assert hits[("lenet300", "DGC", 4)][1] == pytest.approx(2e6)
    assert hits[("lenet300", "DGC", 8)][1] == pytest.approx(8e6)
    table = compare.target_markdown(points, 98.0)
    assert "| lenet300 | DGC | 4 |" in table and "| lenet300 | DGC | 8 |" in table


def test_time_to_target_prices_each_epoch_at_its_own_bytes_per_step(tmp_path):
    # measured: 0 B/step -> 1 s, 1000 B/step -> 3 s; in between it is linear, beyond it flat
    measured = [(1000.0, 3.0), (0.0, 1.0)]
    assert pareto.step_time(measured, 500.0) == pytest.approx(2.0)
    assert pareto.step_time(measured, 5000.0) == 3.0
    # 10 steps per epoch at 500 B/step (2 s each): accuracy 97, 98, 99
    fake_run(tmp_path / "r", [0.97, 0.98, 0.99], 5000.0)
    point = pareto.group_settings([load_run(tmp_path / "r")])[0]
    assert pareto.time_to_target(point, 98.0, measured) == (pytest.approx(40.0), 20)
    assert pareto.time_to_target(point, 99.5, measured) is None


def test_compare_writes_the_front_chart_tables_and_wandb(tmp_path):
    fake_run(tmp_path / "sweep" / "dense" / "seed0", [0.95, 0.97, 0.98], 1e9)
    fake_run(tmp_path / "sweep" / "dense" / "seed1", [0.95, 0.97, 0.982], 1e9, seed=1)
    fake_run(tmp_path / "dgc", [0.94, 0.97, 0.979], 4e6, dgc={"density": 0.001},
             dense_per_epoch=4e9)
    out, curves = tmp_path / "cmp" / "front.png", tmp_path / "cmp" / "curves.png"
    proc = subprocess.run([sys.executable, "-m", "launch.compare", str(tmp_path / "sweep"),
                           str(tmp_path / "dgc"), "--out", str(out), "--curves", str(curves),
                           "--target", "97.85", "--wandb-mode", "offline"],
                          cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for png in (out, curves):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = [line for line in proc.stdout.splitlines() if line.startswith("| lenet300")]
    assert table[0] == ("| lenet300 | DGC | DGC | 1 | 97.90 | 0.00 | 12 MB | 1000.0x | 1.000 | 12 "
                        "| yes |")
    assert table[1] == ("| lenet300 | dense | dense | 2 | 98.10 | 0.14 | 3 GB | 1.0x | 1.000 | 12 "
                        "| yes |")
    assert "| lenet300 | DGC | 2 | DGC | 12 MB | 30 |" in proc.stdout
    assert "| lenet300 | dense | 2 | dense | 3 GB | 30 |" in proc.stdout
    recorded = read_offline_run(out.parent / "wandb")
    logged = {key: value for row in recorded["history"] for key, value in row.items()}
    assert (logged["compare/table/nrows"], logged["compare/table/ncols"]) == (2, len(COLUMNS))
    assert logged["compare/accuracy_vs_bytes/_type"] == "image-file"


def test_compare_rejects_a_directory_that_holds_no_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch.compare", str(tmp_path)], cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no summary.json" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flag, name, message", [
    ("--out", "front", "a chart is a PNG, name it *.png"),  # matplotlib adds .png itself
    ("--curves", "curves.jpg", "a chart is a PNG, name it *.png"),
    ("--out", "a-file/front.png", "cannot make the folder"),
])
def test_compare_refuses_a_chart_path_it_could_not_write_or_report(tmp_path, flag, name,
                                                                   message):
    (tmp_path / "a-file").write_text("")
    proc = subprocess.run([sys.executable, "-m", "launch.compare", str(tmp_path), flag,
                           str(tmp_path / name)], cwd=REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"argument {flag}" in lines[0] and message in lines[0], lines
