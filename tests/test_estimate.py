"""``python -m launch.estimate``: a table per world size, a chart, and one-line errors."""
from __future__ import annotations

import subprocess
import sys

import pytest

from launch import estimate
from launch.config import load_config
from launch.costmodel import HardwareConfig
from tests.launch_helpers import REPO

DGC_CONFIG = str(REPO / "configs/mnist_lenet300_dgc.yaml")


def test_prints_a_table_per_world_size_and_writes_the_chart(tmp_path, capsys):
    out = tmp_path / "charts" / "speedup.png"  # the folder is made
    code = estimate.main(["--config", DGC_CONFIG, "--hardware", "dgx-h100-ndr",
                          "--world-sizes", "1,16", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "### 1 rank " in printed and "### 16 ranks " in printed
    for scheme in ("dense fp32", "fp16", "powersgd r=4", "dgc d=0.001 fp16/int32 auto",
                   "dgc d=0.001 fp16/int32 allgather", "dgc d=0.001 fp16/int32 sparse_allreduce",
                   "dgc d=0.001 fp16/int32 gtopk",
                   "hierarchical dense", "hierarchical dgc d=0.001 fp16/int32 auto",
                   "hierarchical sparse-intra dgc d=0.001 fp16/int32", "2:4 masked, realistic",
                   "2:4 masked, theoretical"):
        assert printed.count(f"| {scheme} |") == 2, scheme
    assert "| dense fp32 | 0 B | 0 |" in printed  # one rank sends nothing
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sparsity_section_adds_its_own_row():
    cfg = load_config(DGC_CONFIG, ["sparsity.method=gmp", "sparsity.target=0.9"])
    results = estimate.compare(cfg, HardwareConfig(), [8])
    rows = {label: e for label, e, _ in results[8]}
    assert rows["gmp masked"].wire_bytes < 0.2 * rows["dense fp32"].wire_bytes


def test_an_unknown_preset_is_one_line_and_status_2(capsys):
    assert estimate.main(["--config", DGC_CONFIG, "--hardware", "dgx-z9000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown hardware preset 'dgx-z9000'" in err


def test_a_non_positive_bandwidth_is_one_line_and_status_2(tmp_path, capsys):
    preset = tmp_path / "slow.yaml"
    preset.write_text("accelerator: h100-sxm\nintra_node_link: nvlink4\n"
                      "inter_node_link: {bandwidth_gbytes: -1, latency_us: 5}\n")
    assert estimate.main(["--config", DGC_CONFIG, "--hardware", str(preset)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bandwidth_gbytes': must be > 0" in err


def test_an_unwritable_chart_is_one_line_and_status_2(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "speedup.png"  # a folder that is a file: refused before work
    with pytest.raises(SystemExit) as exit_:
        estimate.main(["--config", DGC_CONFIG, "--world-sizes", "8", "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and "argument --out: cannot make the folder" in err
    # a folder where the chart should go: found when it is written
    (tmp_path / "taken.png").mkdir()
    assert estimate.main(["--config", DGC_CONFIG, "--world-sizes", "8",
                          "--out", str(tmp_path / "taken.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out: cannot write" in err


@pytest.mark.parametrize("sizes", ["0,8", "8,x", ""])
def test_a_bad_world_size_is_one_line_and_status_2(sizes, capsys):
    with pytest.raises(SystemExit) as info:
        estimate.main(["--config", DGC_CONFIG, "--world-sizes", sizes])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--world-sizes" in err


def test_a_run_is_told_when_the_model_prices_another_topology_faster():
    from launch.costmodel.run import topology_advice, topology_steps
    wide = ["model.name=wide_mlp", "data.name=synthetic", "hardware.preset=dgx-h100-ndr"]
    hier = load_config(DGC_CONFIG, wide + ["dgc.topology=hierarchical"])
    steps = topology_steps(hier, 64, 8)
    assert set(steps) == {"flat", "hierarchical", "hierarchical with intra_node sparse"}
    advice = topology_advice(hier, 64, 8)
    assert advice.startswith("dgc.topology: on preset 'dgx-h100-ndr' at 64 ranks as 8 nodes x 8")
    assert f"{steps['hierarchical'] / steps['flat']:.1f}x" in advice, advice
    assert advice.endswith("set dgc.topology=flat") and "\n" not in advice
    # the fastest topology, one node (every topology is flat there), or a node layout
    # that is not known: nothing to say
    assert topology_advice(load_config(DGC_CONFIG, wide), 64, 8) is None
    assert topology_advice(hier, 8, 8) is None and topology_advice(hier, 64, None) is None
    # the sparse intra-node stage cannot run beside gtopk: not offered
    gtopk = load_config(DGC_CONFIG, wide + ["dgc.exchange=gtopk"])
    assert "hierarchical with intra_node sparse" not in topology_steps(gtopk, 64, 8)


def test_a_reader_that_stops_early_gets_no_traceback():
    # as `python -m launch.estimate ... | head -1`, where head is gone before the table comes
    proc = subprocess.Popen([sys.executable, "-m", "launch.estimate", "--config", DGC_CONFIG,
                             "--world-sizes", "8,64,512"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
