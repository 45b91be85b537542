"""Train a set of configs side by side and tabulate accuracy against communication.

    python benchmarks/accuracy.py --suite dgc --out-dir results/dgc      # the DGC bars
    python benchmarks/accuracy.py --suite dgc --quick                    # a few steps each (CI)

Each entry runs ``torchrun --standalone --nproc-per-node=P -m launch.train`` with its config
and overrides; then ``launch.compare`` draws the accuracy-versus-bytes chart, and a markdown
table (with the steady-state compression ratio read from each run's metrics) is printed and
written to ``OUT_DIR/results.md``.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch.cli import OneLineParser, output_folder  # noqa: E402

# The 4-epoch geometric warm-up (25%, 6.3%, 1.6%, 0.4%) that mnist_lenet300_dgc.yaml shipped
# until the accuracy-per-byte sweep: the suites below were measured with it.
_FOUR_EPOCHS = ["dgc.warmup_epochs=4", "dgc.warmup_densities=null"]
_SPARSE_ALLREDUCE = ["dgc.exchange=sparse_allreduce", "dgc.dense_fallback=false"]
# Overrides that turn a LeNet-5 run into the LeNet-300-100 configs' variant of the same name.
_DGC = ["dgc.density=0.001", "dgc.warmup_epochs=4", "dgc.value_dtype=fp16",
        "dgc.index_dtype=int32"]  # as mnist_lenet300_dgc.yaml
_NM24 = ["sparsity.method=nm", "sparsity.nm_start_step=1955"]  # mnist_lenet300_nm24.yaml
_LENET5_VARIANTS = {
    "dense": ("mnist_lenet5_dense.yaml", []),
    "fp16": ("mnist_lenet5_dense.yaml", ["ddp.comm_hook=fp16"]),
    # one DDP bucket: torch's PowerSGD failed on Gloo with two (see BENCHMARKS.md)
    "powersgd4": ("mnist_lenet5_dense.yaml", ["ddp.comm_hook=powersgd", "ddp.bucket_cap_mb=100"]),
    "dgc": ("mnist_lenet5_dense.yaml", _DGC),
    "nm24": ("mnist_lenet5_dense.yaml", _NM24),
    "dns": ("mnist_lenet5_dns.yaml", []),
    "iht": ("mnist_lenet5_dense.yaml", [  # mnist_lenet300_iht.yaml
        "sparsity.method=iht", "sparsity.target=0.3", "sparsity.iht_s1=391",
        "sparsity.iht_s2=391", "sparsity.iht_cycles=3", "sparsity.iht_end=dense"]),
    "dsd": ("mnist_lenet5_dense.yaml", [  # mnist_lenet300_dsd.yaml
        "sparsity.method=dsd", "sparsity.target=0.3", "sparsity.dsd_dense_steps=1173",
        "sparsity.dsd_sparse_steps=1173"]),
    "gmp90": ("mnist_lenet5_dense.yaml", [  # mnist_lenet300_gmp.yaml
        "sparsity.method=gmp", "sparsity.target=0.9", "sparsity.scope=global",
        "sparsity.start_step=391", "sparsity.end_step=2346", "sparsity.frequency=100"]),
    "dgc-nm24": ("mnist_lenet5_dense.yaml", _DGC + _NM24),
    "dgc-dns": ("mnist_lenet5_dns.yaml", _DGC),
}
_LENET300_VARIANTS = {
    "dense": ("mnist_lenet300_dense.yaml", []),
    "fp16": ("mnist_lenet300_dense.yaml", ["ddp.comm_hook=fp16"]),
    "powersgd4": ("mnist_lenet300_dense.yaml",
                  ["ddp.comm_hook=powersgd", "ddp.bucket_cap_mb=100"]),
    "dgc": ("mnist_lenet300_dgc.yaml", _FOUR_EPOCHS),
    "nm24": ("mnist_lenet300_nm24.yaml", []),
    "dns": ("mnist_lenet300_dns.yaml", []),
    "iht": ("mnist_lenet300_iht.yaml", []),
    "dsd": ("mnist_lenet300_dsd.yaml", []),
    "gmp90": ("mnist_lenet300_gmp.yaml", []),
    "dgc-nm24": ("mnist_lenet300_dgc_nm24.yaml", []),
    "dgc-dns": ("mnist_lenet300_dgc_dns.yaml", []),
}

# LeNet-300-100 with AdamW (lr 1e-3, decoupled decay 1e-4) and DGC's Adam settings of
# mnist_vit_adamw_dgc.yaml (one epoch of dense warm-up, no density warm-up).
_ADAMW = ["train.optimizer=adamw", "train.lr=0.001", "train.weight_decay=0.0001"]
_ADAM_DGC = ["dgc.adam_warmup_steps=391", "dgc.warmup_epochs=0"]

# (name, config, processes, overrides)
SUITES = {
    # The accuracy table of BENCHMARKS.md: every scheme on both nets, 2 processes.
    "table": [(f"{net}-{variant}", f"configs/{config}", 2, overrides)
              for net, variants in (("lenet300", _LENET300_VARIANTS),
                                    ("lenet5", _LENET5_VARIANTS))
              for variant, (config, overrides) in variants.items()],
    "dense": [
        ("dense-p2", "configs/mnist_lenet300_dense.yaml", 2, []),
    ],
    "dgc": [
        ("dense-p2", "configs/mnist_lenet300_dense.yaml", 2, []),
        ("dgc-p2", "configs/mnist_lenet300_dgc.yaml", 2, _FOUR_EPOCHS),
        ("dense-p4", "configs/mnist_lenet300_dense.yaml", 4, []),
        ("dgc-p4", "configs/mnist_lenet300_dgc.yaml", 4, _FOUR_EPOCHS),
    ],
    "sparse-dgc": [
        ("nm24-p2", "configs/mnist_lenet300_nm24.yaml", 2, []),
        ("dgc-nm24-p2", "configs/mnist_lenet300_dgc_nm24.yaml", 2, []),
        ("dgc-dns-p2", "configs/mnist_lenet300_dgc_dns.yaml", 2, []),
    ],
    # DGC with AdamW (issue 18): the ViT at 2 and 4 processes and LeNet-300-100 at 2, both
    # adam_modes beside dense AdamW.
    "adam": [
        ("vit-dense-p2", "configs/mnist_vit_adamw.yaml", 2, []),
        ("vit-dgc-frozen-p2", "configs/mnist_vit_adamw_dgc.yaml", 2, []),
        ("vit-dgc-errorfeedback-p2", "configs/mnist_vit_adamw_dgc.yaml", 2,
         ["dgc.adam_mode=error_feedback"]),
        ("vit-dense-p4", "configs/mnist_vit_adamw.yaml", 4, []),
        ("vit-dgc-frozen-p4", "configs/mnist_vit_adamw_dgc.yaml", 4,
         ["dgc.adam_warmup_steps=196"]),  # one epoch at 4 processes
        ("vit-dgc-errorfeedback-p4", "configs/mnist_vit_adamw_dgc.yaml", 4,
         ["dgc.adam_mode=error_feedback"]),
        ("lenet300-adamw-dense-p2", "configs/mnist_lenet300_dense.yaml", 2, _ADAMW),
        ("lenet300-adamw-dgc-frozen-p2", "configs/mnist_lenet300_dgc.yaml", 2,
         _ADAMW + _ADAM_DGC),
        ("lenet300-adamw-dgc-errorfeedback-p2", "configs/mnist_lenet300_dgc.yaml", 2,
         _ADAMW + _ADAM_DGC + ["dgc.adam_mode=error_feedback"]),
    ],
    # The sparse allreduce (issue 16) at 4 and 8 processes beside dense at the same p.
    "sparse-allreduce": [
        ("dense-p4", "configs/mnist_lenet300_dense.yaml", 4, []),
        # Without the dense fallback: on the default preset's NVLink link the cost model
        # prices LeNet's buckets cheaper as one allreduce than as the two sparse collectives.
        ("dgc-sparse-allreduce-p4", "configs/mnist_lenet300_dgc.yaml", 4,
         _SPARSE_ALLREDUCE + _FOUR_EPOCHS),
        ("dense-p8", "configs/mnist_lenet300_dense.yaml", 8, []),
        ("dgc-sparse-allreduce-p8", "configs/mnist_lenet300_dgc.yaml", 8,
         _SPARSE_ALLREDUCE + _FOUR_EPOCHS),
        ("dgc-hierarchical-p4", "configs/mnist_lenet300_dgc.yaml", 4,
         ["dgc.topology=hierarchical", "dgc.ranks_per_node=2"] + _FOUR_EPOCHS),
        ("dgc-hierarchical-sparse-p4", "configs/mnist_lenet300_dgc.yaml", 4,
         ["dgc.topology=hierarchical", "dgc.ranks_per_node=2", "dgc.intra_node=sparse",
          "dgc.dense_fallback=false"] + _FOUR_EPOCHS),
        ("dgc-gtopk-p4", "configs/mnist_lenet300_dgc.yaml", 4,
         ["dgc.exchange=gtopk"] + _FOUR_EPOCHS),
        ("dgc-gtopk-p8", "configs/mnist_lenet300_dgc.yaml", 8,
         ["dgc.exchange=gtopk"] + _FOUR_EPOCHS),
    ],
    # configs/mnist_lenet300_dgc_sar.yaml (issue 16's accuracy bar at 8 processes) beside
    # dense, three seeds at p = 8 and one at p = 4.
    "sparse-allreduce-tuned": [
        *[(f"dense-p8-s{s}", "configs/mnist_lenet300_dense.yaml", 8, [f"train.seed={s}"])
          for s in range(3)],
        *[(f"dgc-sar-p8-s{s}", "configs/mnist_lenet300_dgc_sar.yaml", 8, [f"train.seed={s}"])
          for s in range(3)],
        ("dense-p4", "configs/mnist_lenet300_dense.yaml", 4, []),
        ("dgc-sar-p4", "configs/mnist_lenet300_dgc_sar.yaml", 4, []),
    ],
    "wide": [
        ("wide-dgc-p2", "configs/synthetic_wide_mlp_dgc.yaml", 2, []),
        ("wide-dgc-p4", "configs/synthetic_wide_mlp_dgc.yaml", 4, []),
    ],
}
QUICK = ["train.max_steps=6", "train.log_every=2", "train.epochs=1"]


def run_one(name: str, config: str, nproc: int, overrides: list[str], out_dir: Path,
            quick: bool, reuse: bool = False) -> Path:
    run_dir = out_dir / name
    if reuse and (run_dir / "summary.json").is_file():
        print(f"{name}: reusing {run_dir}", flush=True)
        return run_dir
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "launch.train", "--config", config,
           "--set", f"out_dir={run_dir}", "--set", f"run_name={name}"]
    for o in overrides + (QUICK if quick else []):
        cmd += ["--set", o]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return run_dir


def commit() -> str:
    """The code the runs measured: HEAD's short hash, marked when the tree differs."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def steady_ratio(run_dir: Path) -> float | None:
    """bytes_dense / bytes_sent over the last logged epoch (after any warm-up)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if "test/accuracy" in r]
    if len(epochs) < 2:
        return None
    (a, b) = epochs[-2:]
    sent = b["comm/bytes_sent_cum"] - a["comm/bytes_sent_cum"]
    dense = b["comm/bytes_dense_cum"] - a["comm/bytes_dense_cum"]
    return dense / sent if sent else None


def main(argv=None) -> int:
    p = OneLineParser(prog="accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="dgc")
    p.add_argument("--out-dir", type=output_folder, default=str(REPO / "results"))
    p.add_argument("--quick", action="store_true", help="a few steps per run (smoke test)")
    p.add_argument("--only", nargs="*", help="run only these entries of the suite")
    p.add_argument("--reuse", action="store_true",
                   help="keep finished runs already in --out-dir instead of training them again")
    args = p.parse_args(argv)
    names = [name for name, *_ in SUITES[args.suite]]
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        p.error(f"--only: {', '.join(unknown)} not in suite {args.suite} "
                f"(it has {', '.join(names)})")
    out_dir = args.out_dir.resolve()
    entries = [e for e in SUITES[args.suite] if not args.only or e[0] in args.only]
    runs = [run_one(name, cfg, nproc, list(ov), out_dir, args.quick, args.reuse)
            for name, cfg, nproc, ov in entries]
    chart = out_dir / f"{args.suite}_accuracy_vs_bytes.png"
    subprocess.run([sys.executable, "-m", "launch.compare", *map(str, runs), "--out", str(chart),
                    "--wandb-mode", "offline"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    lines = [f"Suite `{args.suite}`, {time.strftime('%Y-%m-%d')}, commit {commit()}, "
             f"{platform.machine()} "
             f"{os.cpu_count()} cores, command: `python benchmarks/accuracy.py --suite "
             f"{args.suite}{' --quick' if args.quick else ''}`", "",
             "| run | processes | test acc (%) | weight density | bytes sent / rank | "
             "whole-run ratio | last-epoch ratio | wall time (s) |", "|---|---|---|---|---|---|---|---|"]
    for (name, _, nproc, _), run_dir in zip(entries, runs):
        s = json.loads((run_dir / "summary.json").read_text())
        whole = s["comm_bytes_dense"] / s["comm_bytes_sent"] if s["comm_bytes_sent"] else float("nan")
        steady = steady_ratio(run_dir)
        lines.append(f"| {name} | {nproc} | {100 * s['test_accuracy']:.2f} | "
                     f"{s['weight_density']:.4f} | {s['comm_bytes_sent']:.4g} | {whole:.1f}x | "
                     f"{'n/a' if steady is None else f'{steady:.1f}x'} | {s['wall_time_s']:.0f} |")
    lines += ["", f"Chart: `{chart.relative_to(REPO) if chart.is_relative_to(REPO) else chart}`"]
    text = "\n".join(lines)
    (out_dir / "results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
