"""Run a grid of settings over several seeds, one run at a time, and tabulate them.

    python -m launch.sweep --config configs/mnist_lenet300_dgc.yaml \\
        --grid dgc.warmup_epochs=1,4 --grid dgc.warmup_densities=[0.01],paper \\
        --seeds 0,1,2 --nproc 2 [--out-dir runs/sweeps/NAME] [--set key=value ...] [--lock F]

Every combination of the ``--grid`` values (their Cartesian product) is trained once per
seed with ``launch.train`` (through torchrun when ``--nproc`` > 1), one run after another:
on a small machine two runs at once only slow each other down. Runs land in
``OUT_DIR/<setting>/seed<S>`` and share one wandb group (the sweep's name), so the
dashboard groups them. A run whose ``summary.json`` exists is not run again, and one that
stopped part-way continues from its checkpoint, so rerunning the command resumes the sweep.
At the end ``OUT_DIR/sweep.md`` and ``sweep.json`` hold, per setting, the mean and spread of
the final test accuracy and the bytes sent per rank; ``python -m launch.compare OUT_DIR``
draws the accuracy-against-bytes front.

A grid key must be a config key (checked before anything runs: a bad one is one line and
exit status 2). Values are YAML, separated by commas outside brackets, so
``dgc.warmup_densities=[0.01,0.005],paper`` is two values.
"""
from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launch.cli import OneLineParser, lock_file, output_dir
from launch.config import load_config
from launch.pareto import spread
from sparse_comm.schema import ConfigError


@dataclass(frozen=True)
class Setting:
    """One point of the grid: its overrides, in grid order, and a directory-safe name."""

    overrides: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        if not self.overrides:
            return "base"
        parts = [f"{key.split('.')[-1]}={value}" for key, value in self.overrides]
        return re.sub(r"[^A-Za-z0-9_.,=+-]", "", "_".join(parts))

    def sets(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.overrides]


def split_values(text: str) -> list[str]:
    """Comma-separated values, commas inside brackets or braces kept: ``[1,2],3`` is two."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    values.append(current)
    return [v.strip() for v in values]


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError("", f"--grid expects KEY=V1,V2,..., got {item!r}")
        values = split_values(values)
        if any(not v for v in values):
            raise ConfigError(key.strip(), f"--grid has an empty value in {item!r}")
        grid.append((key.strip(), values))
    return grid


def settings(grid: list[tuple[str, list[str]]]) -> list[Setting]:
    keys = [key for key, _ in grid]
    return [Setting(tuple(zip(keys, combo)))
            for combo in itertools.product(*(values for _, values in grid))]


# keys the sweep sets for every run, and the flags that choose them
OWN_KEYS = {"train.seed": "--seeds", "out_dir": "--out-dir", "run_name": "--name",
            "wandb.group": "--name"}


def check(config: Path, base_sets: list[str], points: list[Setting]) -> None:
    """Build every setting's config once, so a bad key or value stops the sweep before
    it trains anything."""
    keys = [item.partition("=")[0].strip() for item in base_sets]
    keys += [key for point in points[:1] for key, _ in point.overrides]
    for key in keys:
        if key in OWN_KEYS:
            raise ConfigError(key, f"is set by the sweep for each run; use {OWN_KEYS[key]}")
    for point in points:
        load_config(config, base_sets + point.sets())


def run_dir(out_dir: Path, point: Setting, seed: int) -> Path:
    return out_dir / point.name / f"seed{seed}"


def train_command(config: Path, sets: list[str], nproc: int, resume: Path | None) -> list[str]:
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "launch.train"]
    else:
        cmd = [sys.executable, "-m", "launch.train"]
    cmd += ["--config", str(config)]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_one(config: Path, sets: list[str], nproc: int, where: Path, log: Path,
            lock: Path | None = None) -> int:
    resume = where if (where / "checkpoints").is_dir() else None
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    with open(log, "a") as out, _held(lock):
        return subprocess.run(train_command(config, sets, nproc, resume), env=env,
                              stdout=out, stderr=subprocess.STDOUT).returncode


@contextlib.contextmanager
def _held(lock: Path | None):
    """An exclusive ``flock`` on ``lock`` for the duration (nothing without one), so that
    sweeps and benchmarks sharing a machine run one heavy job at a time."""
    if lock is None:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def summarise(out_dir: Path, points: list[Setting], seeds: list[int]) -> list[dict]:
    rows = []
    for point in points:
        finished = [json.loads(p.read_text()) for seed in seeds
                    if (p := run_dir(out_dir, point, seed) / "summary.json").is_file()]
        if not finished:
            continue
        acc = [100 * s["test_accuracy"] for s in finished]
        sent = [s["comm_bytes_sent"] for s in finished]
        rows.append({"setting": point.name, "overrides": dict(point.overrides),
                     "seeds": len(finished), "accuracy_mean": statistics.fmean(acc),
                     "accuracy_std": spread(acc),
                     "accuracies": acc, "bytes_sent_mean": statistics.fmean(sent),
                     "wall_time_mean": statistics.fmean(s["wall_time_s"] for s in finished)})
    return rows


def markdown(rows: list[dict], title: str) -> str:
    lines = [title, "", "| setting | seeds | test acc (%) mean ± std | per seed | bytes sent / rank "
             "| wall time (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        per_seed = ", ".join(f"{a:.2f}" for a in r["accuracies"])
        lines.append(f"| {r['setting']} | {r['seeds']} | {r['accuracy_mean']:.2f} ± "
                     f"{r['accuracy_std']:.2f} | {per_seed} | {r['bytes_sent_mean']:.4g} | "
                     f"{r['wall_time_mean']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = OneLineParser(prog="launch.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True, help="the base YAML config")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a config key and its values (repeatable; the product is run)")
    p.add_argument("--seeds", default="0", help="comma-separated train.seed values")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an override applied to every run (repeatable)")
    p.add_argument("--out-dir", type=Path, help="default: runs/sweeps/<config name>")
    p.add_argument("--name", help="the sweep's wandb group (default: the out dir's name)")
    p.add_argument("--lock", type=Path, metavar="FILE",
                   help="hold an flock on FILE during each run (one heavy job at a time on "
                        "a shared machine)")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in split_values(args.seeds)]
    except ValueError:
        p.error(f"--seeds expects comma-separated integers, got {args.seeds!r}")
    if len(set(seeds)) != len(seeds):  # one run would count as two seeds
        p.error(f"--seeds names a seed twice: {args.seeds!r}")
    if args.nproc < 1:
        p.error(f"--nproc must be >= 1, got {args.nproc}")
    out_dir = args.out_dir or Path("runs/sweeps") / args.config.stem
    name = args.name or out_dir.name
    if not name or "/" in name:  # it names every run
        p.error(f"--name must be a non-empty name without '/', got {name!r}")
    try:
        points = settings(parse_grid(args.grid))
        check(args.config, args.overrides, points)
        lock_file(args.lock)
        output_dir(out_dir, "--out-dir")
    except ConfigError as err:
        print(f"launch.sweep: error: {err}", file=sys.stderr)
        return 2
    jobs = [(point, seed) for point in points for seed in seeds]
    failed = []
    for i, (point, seed) in enumerate(jobs, 1):
        where = run_dir(out_dir, point, seed)
        label = f"[{i}/{len(jobs)}] {point.name} seed {seed}"
        if (where / "summary.json").is_file():
            print(f"{label}: done before, kept", flush=True)
            continue
        where.mkdir(parents=True, exist_ok=True)
        sets = args.overrides + point.sets() + [
            f"train.seed={seed}", f"out_dir={where}", f"run_name={name}-{point.name}-s{seed}",
            f"wandb.group={name}"]
        started = time.perf_counter()
        code = run_one(args.config, sets, args.nproc, where, where / "train.log", args.lock)
        if code != 0 or not (where / "summary.json").is_file():
            failed.append(label)
            print(f"{label}: FAILED (exit {code}), see {where / 'train.log'}", flush=True)
            continue
        s = json.loads((where / "summary.json").read_text())
        print(f"{label}: {100 * s['test_accuracy']:.2f}%, {s['comm_bytes_sent']:.4g} B/rank, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    rows = summarise(out_dir, points, seeds)
    (out_dir / "sweep.json").write_text(json.dumps(
        {"config": str(args.config), "grid": args.grid, "seeds": seeds, "nproc": args.nproc,
         "overrides": args.overrides, "rows": rows}, indent=2) + "\n")
    text = markdown(rows, f"Sweep `{name}`: `{args.config}`, {args.nproc} processes, seeds "
                          f"{','.join(map(str, seeds))}")
    (out_dir / "sweep.md").write_text(text + "\n")
    print(text)
    if failed:
        print(f"launch.sweep: {len(failed)} run(s) failed: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
