"""Accuracy per byte: every scheme at its best settings, several seeds, one front per model.

    python benchmarks/pareto.py --model lenet300 --seeds 0,1,2 --out-dir results/pareto
    python benchmarks/pareto.py --model lenet5 --seeds 0,1,2 --out-dir results/pareto

Runs, through ``launch.sweep`` (2 processes, one run at a time, resumable), dense DDP, torch's
fp16 hook, PowerSGD at ranks 1, 2 and 4 with ``start_powerSGD_iter`` at 10 and at one epoch
(391 steps), and DGC at 0.1% with the warm-ups below, all with the same seeds; then
``launch.compare`` draws the front (``OUT_DIR/<model>/front.png``) and reports each scheme's
fewest bytes to ``--target`` (default: dense's mean accuracy less 0.1 points).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch.cli import OneLineParser, integer, integers, lock_file, output_dir, real  # noqa: E402
from sparse_comm.schema import ConfigError  # noqa: E402

# (sweep name, config, --set overrides, --grid arguments)
def sweeps(model: str) -> list[tuple[str, str, list[str], list[str]]]:
    dense = f"configs/mnist_{model}_dense.yaml"
    dgc = f"configs/mnist_{model}_dgc.yaml"
    psgd = ["ddp.comm_hook=powersgd", "ddp.bucket_cap_mb=100"]  # one bucket on Gloo
    one_stage = ["dgc.warmup_epochs=null"]
    return [
        ("dense", dense, [], []),
        ("fp16", dense, ["ddp.comm_hook=fp16"], []),
        ("powersgd", dense, psgd, ["ddp.powersgd_rank=1,2,4", "ddp.powersgd_start_iter=10,391"]),
        # the reference implementation's 4 geometric epochs (the configs' old default)
        ("dgc-paper", dgc, ["dgc.warmup_epochs=4", "dgc.warmup_densities=null"], []),
        ("dgc-1epoch", dgc, one_stage, ["dgc.warmup_densities=[0.01],[0.003]"]),
        ("dgc-halfepoch", dgc, one_stage + ["dgc.warmup_densities=[0.01]",
                                            "dgc.warmup_fraction=0.05"], []),
        ("dgc-none", dgc, ["dgc.warmup_epochs=0"], []),
    ]


def main(argv=None) -> int:
    p = OneLineParser(prog="pareto", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["lenet300", "lenet5"], required=True)
    p.add_argument("--seeds", type=integers(0), default="0,1,2")
    p.add_argument("--nproc", type=integer(1), default=2)
    p.add_argument("--out-dir", type=Path, default=REPO / "results" / "pareto")
    p.add_argument("--only", nargs="*", help="run only these sweeps")
    p.add_argument("--target", type=real(0, 100, low_open=True),
                   help="default: dense's mean accuracy - 0.1")
    p.add_argument("--lock", type=Path, help="passed to launch.sweep")
    args = p.parse_args(argv)
    root = args.out_dir / args.model
    names = [name for name, *_ in sweeps(args.model)]
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        p.error(f"--only: no sweeps {', '.join(unknown)} (have {', '.join(names)})")
    dense = root / "dense" / "sweep.json"
    if args.target is None and args.only and "dense" not in args.only and not dense.is_file():
        p.error(f"--only without dense needs --target, or a finished dense sweep ({dense})")
    try:
        lock_file(args.lock)
        output_dir(root, "--out-dir")
    except ConfigError as err:
        p.error(str(err))
    seeds = ",".join(map(str, args.seeds))
    for name, config, sets, grid in sweeps(args.model):
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, "-m", "launch.sweep", "--config", config, "--seeds", seeds,
               "--nproc", str(args.nproc), "--out-dir", str(root / name),
               "--name", f"pareto-{args.model}", "--set", "wandb.mode=offline"]
        for s in sets:
            cmd += ["--set", s]
        for g in grid:
            cmd += ["--grid", g]
        if args.lock:
            cmd += ["--lock", str(args.lock)]
        print(" ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
    target = (args.target if args.target is not None
              else json.loads(dense.read_text())["rows"][0]["accuracy_mean"] - 0.1)
    shown = subprocess.run([sys.executable, "-m", "launch.compare", str(root), "--target",
                            f"{target:.2f}", "--out", str(root / "front.png"), "--curves",
                            str(root / "curves.png"), "--wandb-mode", "offline"], cwd=REPO,
                           check=True, capture_output=True, text=True).stdout
    (root / "front.md").write_text(shown)
    print(shown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
