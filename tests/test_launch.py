"""The launcher end to end: real torchrun jobs on Gloo, real wandb offline files, real files."""
from __future__ import annotations

import math

import pytest
import torch

from launch.checkpoint import read
from tests.launch_helpers import REPO, read_run, train
from tests.wandb_offline import read_offline_run

QUICK = ["train.max_steps=30", "train.log_every=5", "wandb.mode=offline"]
SYNTHETIC = ["data.name=synthetic", "data.synthetic_train_size=512",
             "data.synthetic_test_size=128", "train.batch_size=32", "train.epochs=3",
             "wandb.mode=disabled", "train.log_every=4"]


def lenet300_gradient_bytes() -> int:
    return (784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10) * 4


# Expected wire bytes are counted here by hand, not with dgc.wire: at p = 2 a ring
# allreduce of S bytes sends 2(p-1)/p * S = S per rank, and a ring allgather of S bytes
# per rank sends (p-1) * S = S (nccl-tests' doc/PERFORMANCE.md). So at p = 2 every
# collective puts exactly the size of the tensor handed to it on the wire.


def test_two_process_mnist_run_writes_summary_and_metrics(tmp_path):
    out = tmp_path / "run"
    train(REPO / "configs/quickstart.yaml", *QUICK, f"out_dir={out}", "train.epochs=1", nproc=2)
    summary, metrics = read_run(out)
    assert summary["world_size"] == 2
    assert summary["steps"] == 30
    assert 0.5 < summary["test_accuracy"] <= 1.0  # 30 steps of SGD already learn MNIST
    for key in ("test_loss", "train_loss", "epochs", "wall_time_s", "weight_density"):
        assert math.isfinite(summary[key]), key
    assert summary["weight_density"] == pytest.approx(1.0)
    # Dense DDP: one allreduce of every gradient byte per step, 2(p-1)/p of it on the wire.
    expected = 30 * lenet300_gradient_bytes()
    assert summary["comm_bytes_sent"] == pytest.approx(expected)
    assert summary["comm_bytes_dense"] == pytest.approx(expected)
    steps = [m for m in metrics if "train/loss" in m]
    assert [m["train/step"] for m in steps] == [5, 10, 15, 20, 25, 30]
    assert steps[-1]["comm/bytes_sent_cum"] == pytest.approx(expected)
    epochs = [m for m in metrics if "test/accuracy" in m]
    assert epochs and epochs[-1]["test/accuracy"] == pytest.approx(summary["test_accuracy"])
    assert (out / "config.yaml").is_file() and read(out)[0]["progress"]["step"] == 30


def test_wandb_offline_run_records_config_history_and_summary(tmp_path):
    out = tmp_path / "run"
    train(REPO / "configs/quickstart.yaml", *QUICK, f"out_dir={out}", "train.epochs=1",
          "wandb.project=readback")
    summary, _ = read_run(out)
    recorded = read_offline_run(out / "wandb")
    assert recorded["config"]["train"]["max_steps"] == 30
    losses = [row["train/loss"] for row in recorded["history"] if "train/loss" in row]
    assert len(losses) == 6
    accuracy_rows = [row for row in recorded["history"] if "test/accuracy" in row]
    assert accuracy_rows[-1]["comm/bytes_sent_cum"] == pytest.approx(summary["comm_bytes_sent"])
    assert recorded["summary"]["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert recorded["summary"]["comm_bytes_sent"] == pytest.approx(summary["comm_bytes_sent"])
    # Accuracy is charted against cumulative bytes.
    assert recorded["metrics"].get("test/*") == "comm/bytes_sent_cum"


def test_a_2_4_run_sends_half_the_dense_bytes(tmp_path):
    # Fixed 2:4 masks from the first step: only the live gradient entries are allreduced.
    out = tmp_path / "run"
    train(REPO / "configs/mnist_lenet300_nm24.yaml", *SYNTHETIC, f"out_dir={out}",
          "sparsity.nm_start_step=0", nproc=2)
    summary, _ = read_run(out)
    live = (784 * 300 + 300 * 100 + 100 * 10) // 2 + 300 + 100 + 10
    assert summary["comm_bytes_sent"] == pytest.approx(24 * 4 * live)
    assert summary["compression_ratio"] == pytest.approx(1.997, abs=1e-3)


def test_torch_hook_baselines_count_their_bytes(tmp_path):
    dense = lenet300_gradient_bytes()
    train(REPO / "configs/mnist_lenet300_dense.yaml", *SYNTHETIC, f"out_dir={tmp_path / 'fp16'}",
          "ddp.comm_hook=fp16", nproc=2)
    summary, _ = read_run(tmp_path / "fp16")
    assert summary["comm_bytes_sent"] == pytest.approx(24 * dense / 2)
    # PowerSGD at rank 4 on one bucket: 10 exact steps, then per step the biases (410) in one
    # allreduce, then the Ps (300x4, 100x4, 10x4) and the Qs (784x4, 300x4, 100x4) in two.
    train(REPO / "configs/mnist_lenet300_dense.yaml", *SYNTHETIC,
          f"out_dir={tmp_path / 'psgd'}", "ddp.comm_hook=powersgd", "ddp.bucket_cap_mb=100",
          "ddp.powersgd_start_iter=10", nproc=2)
    summary, _ = read_run(tmp_path / "psgd")
    compressed = 4 * (410 + 4 * 410 + 4 * 1184)
    assert summary["comm_bytes_sent"] == pytest.approx(10 * dense + 14 * compressed)


def test_a_torch_hook_and_dgc_together_is_a_config_error(tmp_path):
    proc = train(REPO / "configs/mnist_lenet300_dgc.yaml", "ddp.comm_hook=powersgd",
                 f"out_dir={tmp_path / 'r'}", "wandb.mode=disabled", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "launch.train: error: config key 'ddp.comm_hook': 'powersgd' and a dgc: "
        "section both set the "
        "communication hook; keep one"], proc.stderr


@pytest.mark.parametrize("override, message", [
    ("train.lrr=0.1", "config key 'train.lrr': unknown key"),
    ("train.epochs=ten", "config key 'train.epochs': must be int"),
    ("train.lr=-1", "config key 'train.lr': must be > 0"),
    ("wandb.mode=sometimes", "config key 'wandb.mode': must be one of"),
    ("model.name=vgg", "config key 'model.name': must be one of"),
    ("train.batch_size=0", "config key 'train.batch_size': must be >= 1"),
    ("trainlr", "--set expects key=value"),
])
def test_config_errors_are_one_line_with_exit_2(tmp_path, override, message):
    out = tmp_path / "run"
    proc = train(REPO / "configs/quickstart.yaml", override, f"out_dir={out}", check=False,
                 timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # stopped before any training


@pytest.mark.parametrize("overrides, message", [
    (["model.name=lenet5"], "config key 'model.name': lenet5 takes 28x28"),
    (["model.name=vit", "model.patch=3"], "config key 'model.patch': must divide the image"),
    (["model.name=vit", "model.width=8", "model.heads=2", "model.mlp_ratio=0.01"],
     "config key 'model.mlp_ratio': must leave each block's MLP a unit"),
])
def test_a_model_the_data_cannot_feed_is_one_line_with_exit_2(tmp_path, overrides, message):
    proc = train(REPO / "configs/quickstart.yaml", *SYNTHETIC, "data.synthetic_shape=[1,8,8]",
                 *overrides, f"out_dir={tmp_path / 'run'}", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_missing_config_file_and_bad_cli_argument_exit_2(tmp_path):
    proc = train(tmp_path / "nope.yaml", check=False, timeout=120)
    assert proc.returncode == 2 and "config file not found" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = train(REPO / "configs", check=False, timeout=120)  # a directory
    assert proc.returncode == 2 and "is a directory" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = train(REPO / "configs/quickstart.yaml", "data.name=cifar10",
                 f"data.root={tmp_path}", f"data.cache_dir={tmp_path}", "wandb.mode=disabled",
                 f"out_dir={tmp_path / 'r'}", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "config key 'data.name'" in lines[0], proc.stderr
    proc = train(REPO / "configs/quickstart.yaml", extra_args=["--frobnicate"], check=False,
                 timeout=120)
    assert proc.returncode == 2 and "unrecognized arguments: --frobnicate" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# Each case also stands for its dense or DGC-only part: quickstart.yaml is the dense run,
# and DGC's residuals differ per rank, so each rank must get its own back.
RESUME_CASES = {
    "sparsity": ("quickstart.yaml", ["sparsity.method=iht", "sparsity.iht_s1=4",
                                     "sparsity.iht_s2=6", "sparsity.iht_cycles=2"]),
    "dgc+sparsity": ("mnist_lenet300_dgc.yaml", ["dgc.warmup_epochs=1", "sparsity.method=gmp",
                                                 "sparsity.start_step=2", "sparsity.end_step=20",
                                                 "sparsity.frequency=3", "sparsity.target=0.8"]),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_matches_uninterrupted_run(tmp_path, case):
    full, part = tmp_path / "full", tmp_path / "part"
    config, extra = RESUME_CASES[case]
    config = REPO / "configs" / config
    train(config, *SYNTHETIC, *extra, f"out_dir={full}", nproc=2)
    # Stop mid-epoch 2 (8 steps per epoch), then continue to the end from the checkpoint.
    train(config, *SYNTHETIC, *extra, f"out_dir={part}", "train.max_steps=13",
          "train.checkpoint_every=5", nproc=2)
    assert read(part)[0]["progress"]["step"] == 13
    train(None, "train.max_steps=null", nproc=2, extra_args=["--resume", str(part)])
    (a, _), (b, _) = read(full), read(part)
    assert b["progress"]["step"] == a["progress"]["step"] == 24
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=0, msg=name)
    summary_full, _ = read_run(full)
    summary_part, _ = read_run(part)
    assert summary_part["comm_bytes_sent"] == summary_full["comm_bytes_sent"]


def test_dgc_and_sparsity_runs_report_their_bytes_and_density(tmp_path):
    out = tmp_path / "run"
    train(REPO / "configs/mnist_lenet300_dgc.yaml", *SYNTHETIC, f"out_dir={out}",
          "dgc.warmup_epochs=0", "sparsity.method=nm", nproc=2)
    summary, metrics = read_run(out)
    assert summary["weight_density"] == pytest.approx(0.5)  # 2:4 on every weight matrix
    dense = 24 * lenet300_gradient_bytes()
    assert summary["comm_bytes_dense"] == pytest.approx(dense)
    # 2:4 from step 0 and density 0.001 of the live half, k = ceil(0.001 * live): fc1 118
    # of 117,600, fc2 15 of 15,000, fc3 1 of 500 (its 1000 entries reach min_numel). One
    # bucket: 134 (int32 index, fp16 value) pairs = 804 bytes, padded to 808 for the
    # allgather, and the 410 biases in fp16 (820 bytes) for the allreduce.
    assert summary["comm_bytes_sent"] == pytest.approx(24 * (808 + 820))
    common, shards = read(out)
    assert len(shards) == 2 and all("accumulation" in s["comm"] for s in shards)  # per rank
    assert "masks" in str(common["plugins"]["sparsity"].keys())
    epoch_rows = [m for m in metrics if "test/accuracy" in m]
    assert epoch_rows[-1]["sparsity/fc1.weight"] == pytest.approx(0.5)


@pytest.mark.parametrize("override, message", [
    ("dgc.density=2", "config key 'dgc.density': must be in (0, 1]"),
    ("dgc.ranks_per_node=3", "config key 'dgc.ranks_per_node': 3 ranks per node do not "
                             "divide the world size 1"),
    ("sparsity.method=prune", "config key 'sparsity.method': must be one of"),
    ("sparsity.layers=[nothing.*]", "config key 'sparsity.layers[0]'"),
    ("data.cache_dir=/proc/nope", "config key 'data.cache_dir': cannot create"),
])
def test_plugin_option_errors_are_one_line_with_exit_2(tmp_path, override, message):
    proc = train(REPO / "configs/quickstart.yaml", override, f"out_dir={tmp_path / 'r'}",
                 "wandb.mode=disabled", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
