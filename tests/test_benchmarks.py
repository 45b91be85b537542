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


def _quick(*args, timeout=300) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_bench_select_quick_prints_every_method():
    out = _quick("benchmarks/bench_select.py", "--quick")
    methods = {line.split(" | ")[3] for line in out.splitlines() if line.startswith("| ")}
    for method in ("read pass (x.sum)", "torch.topk(|x|)", "torch.sort(|x|)"):
        assert method in methods, sorted(methods)
    assert any("select_topk" in m for m in methods), sorted(methods)


def test_validate_costmodel_quick_prints_predicted_and_measured():
    out = _quick("benchmarks/validate_costmodel.py", "--quick")
    assert "| p | what | size | measured | predicted | rel. error |" in out, out
    assert "| 2 | bytes/step, dense step | wire bytes per rank |" in out, out


def test_accuracy_suite_quick_writes_its_table(tmp_path):
    out = _quick("benchmarks/accuracy.py", "--suite", "sparse-dgc", "--quick",
                 "--only", "dgc-nm24-p2", "--out-dir", str(tmp_path))
    assert "| dgc-nm24-p2 | 2 |" in out
    assert (tmp_path / "results.md").is_file()
    assert (tmp_path / "sparse-dgc_accuracy_vs_bytes.png").stat().st_size > 0


def test_link_bench_quick_prints_a_table_per_scheme():
    out = _quick("benchmarks/link_bench.py", "--quick")
    for label in ("dense allreduce (fp32)", "torch fp16_compress_hook", "torch PowerSGD, rank 4",
                  "DGC 0.1%, fp16 values, int32 indices", "DGC 0.1% on a 2:4 model (mask-aware)",
                  "no communication (compute floor)"):
        assert f"| {label} |" in out, out
