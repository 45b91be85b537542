"""Groups a structured run left at zero: filters, input channels and filter shapes.

    python benchmarks/group_counts.py runs/NAME [runs/NAME ...] [--out results/FILE.json]

Reads each run's newest checkpoint (no training, no evaluation) and counts, for every
convolution weight ``W`` shaped ``[out, in, kh, kw]``, the groups of Wen et al. (NIPS 2016,
structured sparsity learning) whose weights are all zero: filters ``W[k]``, input channels
``W[:, c]`` and filter shapes ``W[:, c, i, j]`` (one kernel position across all filters).
Masked weights are exact zeros, so the count needs no threshold. It also says how many zero
shapes lie in input channels that are zero as a whole: such a shape is the consequence of a
removed channel, not a pruned position of a kept one.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import checkpoint  # noqa: E402
from launch.cli import OneLineParser, existing_dir, output_file  # noqa: E402

KINDS = ("filters", "channels", "shapes")


def count(state: dict[str, torch.Tensor]) -> dict:
    layers, totals = {}, {kind: [0, 0] for kind in KINDS}
    shapes_in_zero_channels = 0
    for name, w in state.items():
        if not name.endswith("weight") or w.dim() != 4:
            continue
        zero = w == 0
        groups = {"filters": zero.flatten(1).all(1), "channels": zero.transpose(0, 1).flatten(1).all(1),
                  "shapes": zero.all(0)}
        layers[name] = {kind: f"{int(g.sum())}/{g.numel()}" for kind, g in groups.items()}
        for kind, g in groups.items():
            totals[kind][0] += int(g.sum())
            totals[kind][1] += g.numel()
        shapes_in_zero_channels += int(groups["shapes"][groups["channels"]].sum())
    return {"layers": layers,
            "total": {kind: {"zero": z, "groups": n, "fraction": z / n} for kind, (z, n) in totals.items()},
            "zero_shapes_in_zero_channels": shapes_in_zero_channels}


def main(argv=None) -> int:
    p = OneLineParser(prog="group_counts", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=existing_dir, nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", type=output_file)
    args = p.parse_args(argv)
    try:
        states = [(run, checkpoint.run_state(run)) for run in args.runs]
    except FileNotFoundError as err:
        p.error(f"RUN_DIR: {err}")
    out = {}
    for run, ckpt in states:
        out[str(run)] = {"test_accuracy": ckpt["progress"]["test_accuracy"], **count(ckpt["model"])}
        total = out[str(run)]["total"]
        print(f"{run}: {100 * out[str(run)]['test_accuracy']:.2f}%, "
              + ", ".join(f"{k} {t['zero']}/{t['groups']} ({100 * t['fraction']:.1f}%)"
                          for k, t in total.items())
              + f"; {out[str(run)]['zero_shapes_in_zero_channels']} zero shapes in zero channels")
        for layer, row in out[str(run)]["layers"].items():
            print(f"    {layer}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
