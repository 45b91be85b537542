"""Benchmark scripts keep working: each runs in its quick mode (no timing is asserted)."""
import json
import subprocess
import sys

import pytest

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


LINK_LABELS = ("dense allreduce (fp32)", "torch fp16_compress_hook", "torch PowerSGD, rank 1",
               "torch PowerSGD, rank 4", "DGC 0.1%, fp16 values, int32 indices",
               "DGC 0.1% on a 2:4 model (mask-aware)", "no communication (compute floor)")


def _link_rows(out: str) -> dict[str, list[str]]:
    """Rows of the step table by scheme label, and of the hardware-model table by label."""
    rows: dict[str, list[str]] = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        for label in LINK_LABELS:
            if label in cells:
                rows.setdefault(label, []).append(line)
    return rows


def test_linkbench_quick_on_loopback_times_every_scheme_and_predicts_its_traffic():
    out = _quick("benchmarks/linkbench.py", "--quick", "--no-net")
    rows = _link_rows(out)
    for label in LINK_LABELS:  # a step row for each, a model row for all but no-comm
        assert len(rows.get(label, [])) == (1 if label.startswith("no comm") else 2), out
    for label in LINK_LABELS[:-1]:  # counted and modelled bytes per step agree
        cells = [c.strip() for c in rows[label][1].strip("|").split("|")]
        assert cells[5] == cells[6] and float(cells[5]) > 0, rows[label][1]


def test_linkbench_rejects_a_bad_rate_in_one_line():
    proc = subprocess.run([sys.executable, "benchmarks/linkbench.py", "--rates", "fast"],
                          cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("linkbench: --rates:"), proc.stderr


@pytest.mark.parametrize("args, starts", [
    (["--rate", "fast"], "swapprobe: --rate:"),
    (["--ranks", "3"], "swapprobe: error: argument --ranks"),
    (["--bytes", "1,x"], "swapprobe: error: argument --bytes"),
    (["--from-json", "pyproject.toml"], "swapprobe: --from-json:")])
def test_swapprobe_rejects_bad_input_in_one_line(args, starts):
    proc = subprocess.run([sys.executable, "benchmarks/swapprobe.py", *args],
                          cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(starts), proc.stderr


@pytest.mark.parametrize("exchange, view", [("sparse_allreduce", False), ("gtopk", True)])
def test_exchange_step_quick_times_an_exchange(exchange, view):
    out = _quick("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                 "benchmarks/exchange_step.py", "--quick", "--exchange", exchange,
                 *(["--bucket-view"] if view else []))
    grads = "bucket views" if view else "copied"
    assert f"{exchange}, gradients {grads}: median step " in out, out


def test_merge_cost_quick_times_both_merges_and_checks_its_own_bits(tmp_path):
    saved = tmp_path / "merged.pt"
    first = _quick("benchmarks/merge_cost.py", "--quick", "--check", str(saved))
    assert "gtopk round: median" in first and "node merge" in first, first
    again = _quick("benchmarks/merge_cost.py", "--quick", "--check", str(saved))
    assert "the same bits as" in again, again


def test_swapprobe_fits_back_the_swap_constants_its_rounds_were_made_with(tmp_path):
    from benchmarks import swapprobe
    swaps = len(swapprobe.partners(0, 4))
    assert swaps == 4 and swapprobe.partners(5, 8)[:3] == [4, 7, 1]
    made = {"100mbit": (1000e-6, 1.5), "1gbit": (250e-6, 1.2)}
    rates = {rate: {f"{kind} {n}": [swapprobe.model_time(rate, n, swaps, *constants)] * 3
                    for n in swapprobe.SIZES for kind in ("one way", "swap", "rounds")}
             for rate, constants in made.items()}
    for rate, (fixed, slowdown) in made.items():
        got = swapprobe.fit(rates[rate], rate, swaps)
        assert got == (pytest.approx(fixed), pytest.approx(slowdown))
    path = tmp_path / "swaps.json"
    path.write_text(json.dumps({"world_size": 4, "rates": rates}))
    proc = subprocess.run([sys.executable, "benchmarks/swapprobe.py", "--from-json", str(path)],
                          cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "**100mbit: swap_us 1000, swap_slowdown 1.50**" in proc.stdout
    assert "**1gbit: swap_us 250, swap_slowdown 1.20**" in proc.stdout


def _can_make_namespaces() -> bool:
    from benchmarks import netns
    return netns.need_root() is None


@pytest.mark.skipif(not _can_make_namespaces(), reason="needs root and network namespaces")
def test_linkbench_quick_on_a_shaped_link_probes_swaps_and_leaves_no_namespace_behind(tmp_path):
    """gtopk's row gets a swap probe beside each replay (its swaps at 1 KiB), and its probed
    prediction uses the swap's fixed cost from it; the other rows get none."""
    from benchmarks import netns
    out = _quick("benchmarks/linkbench.py", "--quick", "--schemes", "dense,dgc-gtopk,nocomm",
                 "--json", str(tmp_path / "run.json"))
    assert "**tiny, 100mbit, p = 2**" in out, out
    rows = {r["scheme"]: r for r in json.loads((tmp_path / "run.json").read_text())[0]["results"]}
    gtopk = rows["dgc-gtopk"]
    assert len(gtopk["swap_probe_s"]) == len(gtopk["probe_s"]) == len(gtopk["replay_s"]) >= 2
    assert gtopk["swap_probed_s"] > 0 and rows["dense"]["swap_probe_s"] == []
    assert f"/ swap {gtopk['swap_probed_s'] * 1e6:.0f} |" in out, out
    assert f", a swap {gtopk['swap_probed_s'] * 1e6:.0f} us (preset " in out, out
    mine = [n for n in netns.namespaces() + netns.links() if n.startswith(netns.PREFIX)]
    assert not [n for n in mine if netns._NAME.match(n)
                and not netns._alive(int(netns._NAME.match(n).group(1)))], mine


def test_linkbench_two_node_testbed_runs_the_hierarchical_and_sparse_schemes(tmp_path):
    """Two namespaces of two ranks each (shaped between them) when root allows, loopback
    otherwise: every scheme's collectives are recorded by group and replayed on it. The
    schemes' steps are interleaved (every scheme built at once, blocks taken in turn)."""
    out = _quick("benchmarks/linkbench.py", "--quick", "--ranks-per-node", "2", "--schemes",
                 "dense,hierdense,dgc,dgc-hier,dgc-hier-sparse,dgc-sar,nocomm",
                 "--interleave", "2", "--json", str(tmp_path / "run.json"))
    run = json.loads((tmp_path / "run.json").read_text())
    assert {cell["interleave"] for cell in run} == {2}
    assert all(len(r["step_s"]) == 2 for cell in run for r in cell["results"])
    assert "(2 per node)" in out, out
    for label in ("hierarchical dense allreduce", "hierarchical DGC 0.1%",
                  "hierarchical DGC 0.1%, sparse intra-node stage",
                  "DGC 0.1%, sparse allreduce"):
        assert f"| {label} |" in out, (label, out)
    assert "1 allreduce, 2 allgather, 1 reduce_scatter" in out  # hierarchical DGC's
    assert "sparse intra-node stage | 1 allreduce, 2 allgather |" in out  # and its merge


def test_linkbench_calibration_quick_fits_overhead_and_latency_on_loopback():
    out = _quick("benchmarks/linkbench.py", "--calibrate", "--quick", "--no-net")
    assert "Fit over all rows: **overhead " in out, out
    shapes = [line.split(" | ")[2] for line in out.splitlines() if line.startswith("| loopback")]
    assert shapes == ["allreduce", "allgather", "allreduce + allgather", "3 allreduces"], out


def test_linkbench_swap_calibration_quick_times_gtopks_rounds_and_fits_them(tmp_path):
    """``--calibrate-swaps`` times every size's rounds in the benchmark's own workers and
    renders the same report again from its JSON."""
    out = _quick("benchmarks/linkbench.py", "--calibrate-swaps", "--quick", "--no-net",
                 "--json", str(tmp_path / "swaps.json"))
    assert "**loopback: swap_us " in out, out
    sizes = [line.split(" | ")[1] for line in out.splitlines() if line.startswith("| 2 |")]
    assert sizes == ["1024", "65536", "131072", "262144", "524288"], out
    again = subprocess.run([sys.executable, "benchmarks/linkbench.py", "--calibrate-swaps",
                            "--from-json", str(tmp_path / "swaps.json")], cwd=REPO,
                           env=launch_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == out[out.index("**loopback"):].strip()


@pytest.mark.parametrize("args, message", [
    (["--ranks-per-node", "2"], "one rank per namespace"),
    (["--world-sizes", "3"], "need powers of two")])
def test_linkbench_swap_calibration_rejects_what_it_cannot_time(args, message):
    proc = subprocess.run([sys.executable, "benchmarks/linkbench.py", "--calibrate-swaps",
                           *args], cwd=REPO, env=launch_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_calibration_fit_recovers_the_overhead_and_latency_it_was_made_with():
    sys.path.insert(0, str(REPO))
    from benchmarks import linkbench
    from benchmarks.linkbench_worker import CALIBRATION
    runs = [{"rate": rate, "world_size": p, "calibration": {shape: [0.0] for shape in
                                                           CALIBRATION}}
            for rate in ("100mbit", "1gbit") for p in (2, 4)]
    truth = linkbench.calibration_rows(runs, overhead=0.7e-3, alpha=1.1e-3)
    for run in runs:
        for row in truth:
            if (row["rate"], row["p"]) == (run["rate"], run["world_size"]):
                run["calibration"][row["shape"]] = [row["predicted"]] * 3
    overhead, alpha = linkbench.fit_calibration(runs)
    assert overhead == pytest.approx(0.7e-3) and alpha == pytest.approx(1.1e-3)
