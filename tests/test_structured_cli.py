"""launch.sensitivity and launch.lottery: one-line errors, and short real runs end to end."""
import json
import subprocess
import sys

import pytest
import torch

from launch import checkpoint, lottery, sensitivity
from tests.launch_helpers import REPO, launch_env, train
from tests.wandb_offline import read_offline_run

TINY = ["data.name=synthetic", "data.synthetic_train_size=256", "data.synthetic_test_size=128",
        "train.batch_size=32", "train.epochs=2", "train.log_every=4"]
LENET300 = REPO / "configs/mnist_lenet300_dense.yaml"


@pytest.mark.parametrize("tool,argv,needle", [
    (sensitivity, ["--config", "c.yaml", "--checkpoint", "r", "--ratios", "0.5,1.2"], "--ratios"),
    (sensitivity, ["--config", "c.yaml", "--checkpoint", "r", "--max-drop", "-1"], "--max-drop"),
    (sensitivity, ["--checkpoint", "r"], "--config"),
    (lottery, ["--config", "c.yaml", "--rounds", "0"], "--rounds"),
    (lottery, ["--config", "c.yaml", "--rounds", "3", "--prune-per-round", "1"],
     "--prune-per-round"),
    (lottery, ["--config", "c.yaml", "--rounds", "3", "--rewind-step", "-5"], "--rewind-step"),
])
def test_bad_arguments_are_one_line_and_exit_status_2(tool, argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        tool.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def run_tool(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module,args,needle", [
    ("launch.sensitivity", ["--checkpoint", "/nonexistent/run"], "--checkpoint"),
    ("launch.sensitivity", ["--checkpoint", "/tmp", "--set", "sparsity.method=nope"],
     "sparsity.method"),
    ("launch.lottery", ["--rounds", "2", "--set", "train.max_steps=5", "--rewind-step", "9"],
     "--rewind-step"),
    ("launch.sensitivity", ["--checkpoint", str(REPO / "README.md")],
     "is not a checkpoint or weights file"),
    ("launch.lottery", ["--rounds", "1", "--out-dir", str(REPO / "README.md" / "lot")],
     "argument --out-dir: cannot make the folder"),
    ("launch.lottery", ["--rounds", "1", "--lock", str(REPO / "configs")],
     "argument --lock: cannot open"),
])
def test_config_mistakes_are_one_line_and_exit_status_2(module, args, needle, tmp_path):
    proc = run_tool(module, "--config", str(LENET300), *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr


def test_proposal_takes_the_largest_ratio_before_the_drop_first_exceeds_the_budget():
    table = {"a": {0.1: 0.98, 0.5: 0.975, 0.9: 0.90},
             "b": {0.1: 0.96, 0.5: 0.98, 0.9: 0.98},  # a dip at 0.1 rules out the rest
             "c": {0.1: 0.979, 0.5: 0.978, 0.9: 0.977}}
    assert sensitivity.propose(0.98, table, max_drop=0.5) == {"a": 0.5, "b": 0.0, "c": 0.9}


def test_sensitivity_scans_every_layer_of_a_trained_run(tmp_path):
    run = tmp_path / "run"
    train(LENET300, *TINY, f"out_dir={run}", "wandb.mode=disabled")
    proc = run_tool("launch.sensitivity", "--config", str(LENET300), "--checkpoint", str(run),
                    "--ratios", "0.3,0.9", "--max-drop", "100", *sum(
                        (["--set", s] for s in TINY), []))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((run / "sensitivity" / "sensitivity.json").read_text())
    assert set(result["accuracy"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert all(set(row) == {"0.3", "0.9"} for row in result["accuracy"].values())
    assert result["proposal"] == {"fc1.weight": 0.9, "fc2.weight": 0.9, "fc3.weight": 0.9}
    assert (run / "sensitivity" / "sensitivity.png").stat().st_size > 0
    assert "target: [0.9, 0.9, 0.9]" in proc.stdout


def test_a_rewind_step_past_the_runs_end_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "lot"  # 16 steps in all
    proc = run_tool("launch.lottery", "--config", str(LENET300), "--rounds", "1",
                    "--rewind-step", "100", "--out-dir", str(out),
                    *sum((["--set", s] for s in TINY + ["wandb.mode=disabled"]), []))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("launch.lottery: error: argument "
                                                    "--rewind-step: 100 is past the run's "
                                                    "last step, 16")
    assert not (out / "rewind.pt").exists() and not (out / "round00").exists()


def test_lottery_rewinds_prunes_and_runs_the_random_reinit_control(tmp_path):
    out = tmp_path / "lot"
    proc = run_tool("launch.lottery", "--config", str(LENET300), "--rounds", "1",
                    "--rewind-step", "3", "--out-dir", str(out),
                    *sum((["--set", s] for s in TINY + ["wandb.mode=offline"]), []))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((out / "lottery.json").read_text())["rows"]
    assert [r["round"] for r in rows] == [0, 1, "control"]
    assert [r["density"] for r in rows] == pytest.approx([1.0, 0.8, 0.8], abs=1e-4)
    dense = json.loads((out / "round00" / "summary.json").read_text())
    assert dense["steps"] == 16  # stopped at the rewind step, then continued to the end

    init, rewind = torch.load(out / "init.pt"), torch.load(out / "rewind.pt")
    ticket = torch.load(out / "round01" / "ticket.pt")
    trained = checkpoint.run_state(out / "round01")["model"]
    assert not torch.equal(rewind["fc1.weight"], init["fc1.weight"])
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        kept = ticket[name] != 0
        assert torch.equal(ticket[name][kept], rewind[name][kept])  # survivors rewound
        assert (trained[name][~kept] == 0).all()  # and the mask held through training

    recorded = read_offline_run(out / "wandb")
    assert [row["lottery/density"] for row in recorded["history"]
            if "lottery/density" in row] == pytest.approx([1.0, 0.8], abs=1e-4)
    assert "lottery/control_accuracy" in recorded["summary"]
    assert (out / "lottery.png").stat().st_size > 0


def test_run_state_reads_sharded_checkpoints_and_single_file_runs_of_before(tmp_path):
    model = torch.nn.Linear(3, 2)
    old = tmp_path / "old"
    old.mkdir()
    torch.save({"model": model.state_dict(), "progress": {"step": 7}}, old / "checkpoint.pt")
    assert checkpoint.run_state(old)["progress"] == {"step": 7}
    fresh = torch.nn.Linear(3, 2)
    checkpoint.load_weights(fresh, old, "train.init_from")
    assert torch.equal(fresh.weight, model.weight)
    with pytest.raises(Exception, match="train.init_from"):
        checkpoint.load_weights(fresh, tmp_path / "empty", "train.init_from")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="no checkpoint under"):
        checkpoint.load_weights(fresh, tmp_path / "empty", "train.init_from")
