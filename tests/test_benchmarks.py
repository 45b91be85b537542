"""Benchmark scripts keep working: each runs in its quick mode (no timing is asserted)."""
import subprocess
import sys

from tests.launch_helpers import REPO, launch_env


def test_hook_overhead_quick_prints_its_table():
    proc = subprocess.run([sys.executable, "benchmarks/hook_overhead.py", "--quick"], cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    row = proc.stdout.strip().splitlines()[-1]
    assert row.startswith("| wide_mlp 256x2") and row.endswith("% |")
