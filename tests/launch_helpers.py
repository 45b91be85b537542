"""Run the launcher as users do: ``torchrun ... -m launch.train`` in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launch_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", **extra)
    env.pop("WANDB_API_KEY", None)
    return env


def train(config: str | Path | None, *overrides: str, nproc: int = 1, extra_args=(),
          timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run launch.train; ``nproc > 1`` goes through torchrun with a standalone rendezvous."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "launch.train"]
    else:
        cmd = [sys.executable, "-m", "launch.train"]
    if config is not None:
        cmd += ["--config", str(config)]
    for o in overrides:
        cmd += ["--set", o]
    cmd += list(extra_args)
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def read_run(out_dir: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((out_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, metrics
