"""Bad input on a benchmark script's command line is one line on stderr and exit status 2,
before any work starts."""
import importlib
import json

import pytest

from tests.launch_helpers import REPO

UNDER_A_FILE = str(REPO / "pyproject.toml" / "x")  # a path whose folder cannot be made
NO_SUCH = "/nonexistent/path"
NOT_A_RUN = str(REPO / "configs")  # a folder without dgc/, config.yaml or checkpoints


def run(script: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """``benchmarks/<script>.py``'s main(argv): its exit status, stdout and stderr."""
    main = importlib.import_module(f"benchmarks.{script}").main
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


CASES = [
    ("accuracy", ["--suite", "nope"], "--suite"),
    ("accuracy", ["--only", "nope"], "--only"),
    ("accuracy", ["--out-dir", UNDER_A_FILE], "--out-dir"),
    ("bench_select", ["--sizes", "0"], "--sizes"),
    ("bench_select", ["--sizes", "1M,x"], "--sizes"),
    ("bench_select", ["--densities", "0"], "--densities"),
    ("bench_select", ["--densities", "0.01,1.5"], "--densities"),
    ("bench_select", ["--repeats", "0"], "--repeats"),
    ("bench_select", ["--warmup", "-1"], "--warmup"),
    ("bench_select", ["--sample-ratio", "0"], "--sample-ratio"),
    ("bench_select", ["--threads", "-1"], "--threads"),
    ("bench_select", ["--device", "nodevice"], "--device"),
    ("bench_select", ["--methods", "read,nope"], "--methods"),
    ("bench_select", ["--json", UNDER_A_FILE], "--json"),
    ("dense_share", ["--out-dir", UNDER_A_FILE], "--out-dir"),
    ("exchange_step", ["--steps", "0"], "--steps"),
    ("exchange_step", ["--repo", NO_SUCH], "--repo"),
    ("exchange_step", ["--repo", NOT_A_RUN], "--repo"),
    ("group_counts", [NO_SUCH], "RUN_DIR"),
    ("group_counts", [NOT_A_RUN], "RUN_DIR"),
    ("hook_overhead", ["--steps", "0"], "--steps"),
    ("hook_overhead", ["--batch", "-1"], "--batch"),
    ("linkbench", ["--world-sizes", "0"], "--world-sizes"),
    ("linkbench", ["--world-sizes", "-8"], "--world-sizes"),
    ("linkbench", ["--world-sizes", "2,x"], "--world-sizes"),
    ("linkbench", ["--ranks-per-node", "0"], "--ranks-per-node"),
    ("linkbench", ["--steps", "0"], "--steps"),
    ("linkbench", ["--warmup", "-1"], "--warmup"),
    ("linkbench", ["--interleave", "21"], "--interleave"),
    ("linkbench", ["--replay", "0"], "--replay"),
    ("linkbench", ["--replay-budget", "0"], "--replay-budget"),
    ("linkbench", ["--timeout", "nan"], "--timeout"),
    ("linkbench", ["--rates", ","], "--rates"),
    ("linkbench", ["--calibrate", "--calibrate-swaps"], "--calibrate"),
    ("linkbench", ["--calibrate-intra"], "--calibrate-intra"),
    ("linkbench", ["--from-json", NO_SUCH], "--from-json"),
    ("linkbench", ["--from-json", str(REPO / "pyproject.toml")], "--from-json"),
    ("linkbench", ["--json", UNDER_A_FILE], "--json"),
    ("linkbench_worker", ["--out", "x.json"], "--model"),
    ("linkbench_worker", ["--calibrate", "0", "--out", "x.json"], "--calibrate"),
    ("linkbench_worker", ["--calibrate", "2", "--calibrate-swaps", "2", "--out", "x.json"],
     "--calibrate"),
    ("linkbench_worker", ["--model", "tiny", "--schemes", "nope", "--out", "x.json"],
     "--schemes"),
    ("linkbench_worker", ["--model", "tiny", "--steps", "0", "--out", "x.json"], "--steps"),
    ("linkbench_worker", ["--model", "tiny", "--interleave", "3", "--steps", "2", "--out",
                          "x.json"], "--interleave"),
    ("linkbench_worker", ["--model", "tiny", "--replay-budget", "-1", "--out", "x.json"],
     "--replay-budget"),
    ("linkbench_worker", ["--model", "tiny", "--batch-size", "0", "--out", "x.json"],
     "--batch-size"),
    ("linkbench_worker", ["--model", "tiny", "--out", UNDER_A_FILE], "--out"),
    ("merge_cost", ["--repo", NO_SUCH], "--repo"),
    ("merge_cost", ["--repo", NOT_A_RUN], "--repo"),
    ("merge_cost", ["--repeats", "0"], "--repeats"),
    ("merge_cost", ["--check", UNDER_A_FILE], "--check"),
    ("merge_cost", ["--check", str(REPO / "pyproject.toml")], "--check"),
    ("pareto", ["--model", "lenet300", "--seeds", "0,x"], "--seeds"),
    ("pareto", ["--model", "lenet300", "--nproc", "0"], "--nproc"),
    ("pareto", ["--model", "lenet300", "--target", "101"], "--target"),
    ("pareto", ["--model", "lenet300", "--only", "nope"], "--only"),
    ("pareto", ["--model", "lenet300", "--only", "fp16", "--out-dir", NO_SUCH], "--only"),
    ("pareto", ["--model", "lenet300", "--lock", UNDER_A_FILE], "--lock"),
    ("pareto", ["--model", "lenet300", "--out-dir", UNDER_A_FILE], "--out-dir"),
    ("scaling_model", ["--world-sizes", "0"], "--world-sizes"),
    ("scaling_model", ["--world-sizes", "-8"], "--world-sizes"),
    ("scaling_model", ["--config", NO_SUCH], "--config"),
    ("scaling_model", ["--config", str(REPO / "configs/mnist_lenet300_dense.yaml")],
     "--config"),
    ("scaling_model", ["--set", "dgc.density=2"], "dgc.density"),
    ("shrink_speed", ["--run", NO_SUCH], "--run"),
    ("shrink_speed", ["--run", NOT_A_RUN], "--run"),
    ("shrink_speed", ["--run", NOT_A_RUN, "--batch-sizes", "1,0"], "--batch-sizes"),
    ("shrink_speed", ["--run", NOT_A_RUN, "--repeats", "0"], "--repeats"),
    ("shrink_speed", ["--run", NOT_A_RUN, "--threads", "0"], "--threads"),
    ("swapprobe", ["--bytes", "0"], "--bytes"),
    ("swapprobe", ["--repeats", "0"], "--repeats"),
    ("swapprobe", ["--json", "x.json"], "--json"),
    ("swapprobe", ["--calibrate", "--json", UNDER_A_FILE], "--json"),
    ("swapprobe", ["--worker", "9", "127.0.0.1"], "--worker"),
    ("time_to_accuracy", [NO_SUCH, "--linkbench", str(REPO / "pyproject.toml")], "sweeps"),
    ("time_to_accuracy", [NOT_A_RUN, "--linkbench", NO_SUCH], "--linkbench"),
    ("time_to_accuracy", [NOT_A_RUN, "--linkbench", str(REPO / "pyproject.toml")],
     "--linkbench"),
    ("time_to_accuracy", [NOT_A_RUN, "--linkbench", str(REPO / "pyproject.toml"), "--target",
                          "0"], "--target"),
    ("validate_costmodel", ["--world-sizes", "1"], "--world-sizes"),
    ("validate_costmodel", ["--world-sizes", "2,x"], "--world-sizes"),
    ("validate_costmodel", ["--repeats", "0"], "--repeats"),
    ("validate_costmodel", ["--json", UNDER_A_FILE], "--json"),
]


@pytest.mark.parametrize("script, argv, names", CASES,
                         ids=[f"{s}-{' '.join(a)}" for s, a, _ in CASES])
def test_bad_input_is_one_line_and_status_2(script, argv, names, capsys):
    code, out, err = run(script, argv, capsys)
    assert code == 2 and out == "", (code, out, err)
    assert err.count("\n") == 1 and err.endswith("\n") and names in err, err
    assert err.startswith(f"{script}: "), err


@pytest.mark.parametrize("text", ['{"world_size": 2}', "[1, 2]", '[{"rate": "100mbit"}]'])
def test_linkbench_from_json_of_other_runs_is_one_line(text, tmp_path, capsys):
    path = tmp_path / "runs.json"
    path.write_text(text)
    code, out, err = run("linkbench", ["--from-json", str(path)], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "--from-json" in err, err


def test_time_to_accuracy_rejects_a_sweep_without_runs(tmp_path, capsys):
    linkbench = tmp_path / "linkbench.json"
    linkbench.write_text(json.dumps([{"world_size": 2, "model": "lenet300", "rate": "100mbit",
                                      "results": [{"scheme": "dense", "bytes_per_step": 1.0,
                                                   "step_median_s": 0.1}]}]))
    code, out, err = run("time_to_accuracy", [str(tmp_path), "--linkbench", str(linkbench)],
                         capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "sweeps" in err, err


def test_the_helpers_take_good_values_and_defaults():
    from launch.cli import integer, integers, positive, real, reals
    assert integer(0)("0") == 0 and integers(2)("2, 4") == [2, 4]
    assert real(0, 100, low_open=True)("100") == 100.0 and positive("1e-3") == 0.001
    assert reals(0, 1, low_open=True)("0.01,1") == [0.01, 1.0]
    args = importlib.import_module("benchmarks.linkbench").parse([])
    assert (args.world_sizes, args.steps, args.replay_budget) == ([2, 4], 20, 30.0)
    quick = importlib.import_module("benchmarks.linkbench").parse(["--quick",
                                                                   "--ranks-per-node", "2"])
    assert quick.world_sizes == [4] and quick.rates == ["100mbit"]
