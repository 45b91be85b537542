"""launch.compare: the accuracy-versus-bytes chart, the markdown table, the wandb log."""
from __future__ import annotations

import json
import subprocess
import sys

from launch.compare import COLUMNS
from tests.launch_helpers import REPO, launch_env
from tests.wandb_offline import read_offline_run


def fake_run(path, name, accuracies, bytes_per_epoch, density=1.0):
    """A run directory as launch.train writes it (the compare tool reads only these files)."""
    path.mkdir(parents=True)
    rows = [{"train/step": 10 * (i + 1), "test/accuracy": acc,
             "comm/bytes_sent_cum": bytes_per_epoch * (i + 1)} for i, acc in enumerate(accuracies)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    total = bytes_per_epoch * len(accuracies)
    (path / "summary.json").write_text(json.dumps({
        "run_name": name, "test_accuracy": accuracies[-1], "comm_bytes_sent": total,
        "comm_bytes_dense": 2.0 * bytes_per_epoch * len(accuracies) * (1 if density == 1 else 500),
        "weight_density": density, "wall_time_s": 12.5}))
    (path / "config.yaml").write_text("wandb:\n  project: compare-test\n")


def test_compare_writes_png_table_and_wandb(tmp_path):
    fake_run(tmp_path / "a", "dense", [0.95, 0.97, 0.98], 1e9)
    fake_run(tmp_path / "b", "dgc", [0.94, 0.97, 0.979], 4e6, density=0.5)
    out = tmp_path / "cmp" / "chart.png"
    proc = subprocess.run([sys.executable, "-m", "launch.compare", str(tmp_path / "a"),
                           str(tmp_path / "b"), "--out", str(out), "--wandb-mode", "offline"],
                          cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| run | test acc (%) | bytes sent | compression")
    assert table[2] == "| dense | 98.00 | 3 GB | 2.0x | 1.0000 | 12.5 |"
    assert table[3] == "| dgc | 97.90 | 12 MB | 1000.0x | 0.5000 | 12.5 |"
    recorded = read_offline_run(out.parent / "wandb")
    logged = {key: value for row in recorded["history"] for key, value in row.items()}
    assert (logged["compare/table/nrows"], logged["compare/table/ncols"]) == (2, len(COLUMNS))
    assert logged["compare/accuracy_vs_bytes/_type"] == "image-file"


def test_compare_rejects_a_directory_that_is_not_a_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch.compare", str(tmp_path)], cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("no summary.json (not a finished run directory)")
    assert len(proc.stderr.strip().splitlines()) == 1
