"""The launcher's Deep Compression stages end to end: prune, share, fine-tune, encode, and
the file decoded into a fresh model by ``python -m launch.evaluate_dcz``."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sparse_train import codec
from tests.launch_helpers import REPO, launch_env, read_run, train
from tests.wandb_offline import read_offline_run

SYNTHETIC = ["data.name=synthetic", "quantize.bits.fc=5", "data.synthetic_train_size=512",
             "data.synthetic_test_size=200", "train.batch_size=32", "train.epochs=2",
             "sparsity.start_step=2", "sparsity.end_step=10", "sparsity.frequency=2",
             "quantize.epochs=1", "train.log_every=4"]


def evaluate_dcz(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.evaluate_dcz", *args], cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, timeout=120)


def test_a_deep_compression_run_writes_a_file_that_decodes_to_its_accuracy(tmp_path):
    out = tmp_path / "run"
    train(REPO / "configs/mnist_lenet300_deepcompression.yaml", *SYNTHETIC,
          "wandb.mode=offline", f"out_dir={out}", nproc=2)
    summary, metrics = read_run(out)
    size = (out / "model.dcz").stat().st_size
    assert summary["dc/file_bytes"] == size
    assert summary["dc/ratio"] == pytest.approx(4 * 266610 / size)
    stages = ["pruned", "shared", "finetuned", "decoded"]
    for stage in stages:
        assert 0 <= summary[f"dc/{stage}/accuracy"] <= 1
        assert any(f"dc/{stage}/bytes" in row for row in metrics), stage
    # Sizes shrink stage by stage; sharing and fine-tuning leave the sparsity alone.
    sizes = [summary[f"dc/{s}/bytes"] for s in stages]
    assert sizes[0] > sizes[1] == sizes[2] > sizes[3] == size
    assert any("dc/finetune/accuracy" in row for row in metrics)

    compressed = codec.load(out / "model.dcz")
    assert compressed.model_name == "lenet300" and compressed.input_shape == (1, 28, 28)
    bits = {t.name: t.fields.get("bits") for t in compressed.tensors}
    assert bits == {"fc1.weight": 5, "fc1.bias": None, "fc2.weight": 5, "fc2.bias": None,
                    "fc3.weight": 5, "fc3.bias": None}
    report = (out / "storage_report.md").read_text()
    assert "| decoded |" in report and "| fc1.weight | shared |" in report
    assert "| total |  | 266610 |" in report

    proc = evaluate_dcz(str(out / "model.dcz"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["file_bytes"] == size and result["dense_fp32_bytes"] == 4 * 266610
    # The same weights on the same 200 test examples, in other batches.
    assert result["test_accuracy"] == pytest.approx(summary["dc/decoded_accuracy"], abs=0.006)

    recorded = read_offline_run(out / "wandb")
    assert recorded["summary"]["dc/file_bytes"] == size
    assert any("dc/decoded/accuracy" in row for row in recorded["history"])
    assert any("dc/storage/huffman_bytes" in row for row in recorded["history"])


@pytest.mark.parametrize("override, message", [
    ("quantize.bits.fc=0", "config key 'quantize.bits.fc': must be an int in [1, 16], got 0"),
    ("quantize.bits.conv=17",
     "config key 'quantize.bits.conv': must be an int in [1, 16], got 17"),
])
def test_bad_quantize_keys_are_one_line_with_exit_2(tmp_path, override, message):
    proc = train(REPO / "configs/mnist_lenet300_deepcompression.yaml", override,
                 f"out_dir={tmp_path / 'r'}", "wandb.mode=disabled", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_a_codebook_larger_than_a_layers_live_weights_is_one_line_with_exit_2(tmp_path):
    # fc3 of LeNet-300-100 has 1000 weights, fewer than a 10-bit codebook's 1024 centroids.
    proc = train(REPO / "configs/mnist_lenet300_deepcompression.yaml", *SYNTHETIC,
                 "quantize.bits.fc=10", "train.max_steps=2", f"out_dir={tmp_path / 'r'}",
                 "wandb.mode=disabled", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["launch.train: error: config key 'quantize.bits.fc': fc3.weight has "
                      "1000 live weights, fewer than the 1024 centroids of a 10-bit codebook"], \
        proc.stderr
    assert "Traceback" not in proc.stderr


def test_evaluate_dcz_reports_a_bad_file_in_one_line(tmp_path):
    bad = tmp_path / "x.dcz"
    bad.write_bytes(b"not a model")
    for path in (bad, tmp_path / "missing.dcz"):
        proc = evaluate_dcz(str(path))
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("launch.evaluate_dcz: error:"), lines
