"""What DGC's steady state puts on the wire, split into the pairs and the tensors sent whole.

    python benchmarks/dense_share.py --out-dir results/dense_share

DGC compresses tensors of two or more dimensions; 1-D ones (biases, LayerNorm scales and
shifts) go whole, in the value dtype, in one allreduce per bucket beside the pairs. At
density 0.001 those few thousand entries can outweigh the pairs. Each run trains on
synthetic MNIST-shaped data (the byte counts depend on shapes only): one dense Adam step,
then density 0.001. The per-step figures are differences of the cumulative counters between
two records after that step; "ratio" is what plain DDP would send over what DGC sends.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.accuracy import commit, run_one  # noqa: E402
from launch.cli import OneLineParser, output_folder  # noqa: E402

SHAPES_ONLY = ["data.name=synthetic", "data.synthetic_train_size=5120",
               "data.synthetic_test_size=64", "train.epochs=1", "train.log_every=5",
               "dgc.adam_warmup_steps=1", "dgc.warmup_epochs=0", "wandb.mode=disabled"]
ADAMW = ["train.optimizer=adamw", "train.lr=0.001", "train.weight_decay=0.0001"]
RUNS = [  # name, config, processes, overrides
    ("vit-p2", "configs/mnist_vit_adamw_dgc.yaml", 2, []),
    ("vit-p4", "configs/mnist_vit_adamw_dgc.yaml", 4, []),
    ("lenet300-p2", "configs/mnist_lenet300_dgc.yaml", 2, ADAMW),
]


def per_step(run_dir: Path) -> dict[str, float]:
    """Bytes per step between the last two records (both after the dense Adam step)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["train/step"]: r for r in rows
               if "comm/bytes_dense_tensors_cum" in r and "train/step" in r}
    a, b = (by_step[s] for s in sorted(by_step)[-2:])
    steps = b["train/step"] - a["train/step"]
    return {key: (b[f"comm/{key}_cum"] - a[f"comm/{key}_cum"]) / steps
            for key in ("bytes_sent", "bytes_dense", "bytes_dense_tensors")}


def main(argv=None) -> int:
    p = OneLineParser(prog="dense_share", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=output_folder, default="runs/dense_share")
    p.add_argument("--reuse", action="store_true", help="keep finished runs in --out-dir")
    args = p.parse_args(argv)
    lines = [f"Commit {commit()}. Per rank and step, after the dense Adam step.", "",
             "| run | sent (B) | tensors sent whole (B) | their share | plain DDP (B) | "
             "ratio | ratio without them |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, config, nproc, overrides in RUNS:
        b = per_step(run_one(name, config, nproc, SHAPES_ONLY + overrides, args.out_dir,
                             quick=False, reuse=args.reuse))
        pairs = b["bytes_sent"] - b["bytes_dense_tensors"]
        lines.append(f"| {name} | {b['bytes_sent']:.0f} | {b['bytes_dense_tensors']:.0f} | "
                     f"{b['bytes_dense_tensors'] / b['bytes_sent']:.0%} | "
                     f"{b['bytes_dense']:.0f} | {b['bytes_dense'] / b['bytes_sent']:.0f}x | "
                     f"{b['bytes_dense'] / pairs:.0f}x |")
    table = "\n".join(lines)
    print(table)
    (args.out_dir / "results.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
