"""Time to accuracy on the emulated links: the steps each setting of a Pareto sweep needs to
reach a target accuracy, priced at the step times the link benchmark measured.

    python benchmarks/linkbench.py --rates 100mbit,1gbit --world-sizes 2 \\
        --models lenet300,lenet5 --schemes dense,fp16,powersgd1,powersgd2,powersgd4,\\
    dgc@0.25,dgc@0.0625,dgc@0.015625,dgc@0.01,dgc@0.004,dgc@0.003,dgc \\
        --json results/linkbench_tta.json
    python benchmarks/time_to_accuracy.py --linkbench results/linkbench_tta.json \\
        results/pareto/lenet300 results/pareto/lenet5

Each epoch of a setting's seed-averaged curve costs its steps times the step time at that
epoch's bytes per step, interpolated between the link benchmark's measurements of the same
scheme (DGC at each warm-up density; PowerSGD at its ranks and, before it starts, dense), so
a warm-up or PowerSGD's dense start costs what it sends. The target defaults to dense's mean
accuracy less 0.1 points, per model.
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch import compare, pareto  # noqa: E402
from launch.cli import OneLineParser, existing_dir, existing_file, real  # noqa: E402

# Which link-benchmark schemes price which sweep scheme. PowerSGD runs dense allreduce
# before start_powerSGD_iter, so dense's point belongs to its curve too.
FAMILY = {"dense": ("dense",), "fp16": ("fp16",), "PowerSGD": ("dense", "powersgd"),
          "DGC": ("dgc",)}


def measured_times(linkbench: list[dict]) -> dict[tuple[str, str, str], list[tuple[float, float]]]:
    """(model, rate, sweep scheme) -> [(bytes per step, median step seconds)] at p = 2."""
    out: dict[tuple[str, str, str], list[tuple[float, float]]] = defaultdict(list)
    for block in linkbench:
        if block.get("world_size") != 2:
            continue
        for result in block["results"]:
            kind = re.sub(r"^powersgd\d+$", "powersgd", result["scheme"].split("@")[0])
            for scheme, kinds in FAMILY.items():
                if kind in kinds:
                    out[(block["model"], block["rate"], scheme)].append(
                        (result["bytes_per_step"], result["step_median_s"]))
    return out


def main(argv=None) -> int:
    p = OneLineParser(prog="time_to_accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", nargs="+", type=existing_dir,
                   help="a model's pareto.py output directory")
    p.add_argument("--linkbench", type=existing_file, required=True,
                   help="linkbench.py --json output")
    p.add_argument("--target", type=real(0, 100, low_open=True),
                   help="default: dense's mean accuracy - 0.1, per model")
    args = p.parse_args(argv)
    try:
        times = measured_times(json.loads(args.linkbench.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        p.error(f"--linkbench: {args.linkbench} is not linkbench.py --json output "
                f"({type(err).__name__})")
    if not times:
        p.error(f"--linkbench: {args.linkbench} has no step times at 2 processes")
    rates = sorted({rate for _, rate, _ in times}, key=lambda r: compare_rate(r))
    sweeps = []
    for sweep in args.sweeps:
        try:
            points = pareto.group_settings([compare.load_run(r)
                                            for r in compare.find_runs([sweep])])
        except (FileNotFoundError, ValueError, KeyError) as err:
            p.error(f"sweeps: {err}")
        except yaml.YAMLError:
            p.error(f"sweeps: a config.yaml under {sweep} is not valid YAML")
        if args.target is None and not any(pt.scheme == "dense" for pt in points):
            p.error(f"sweeps: {sweep} has no dense run to take the target from; give --target")
        sweeps.append(points)
    for points in sweeps:
        model = points[0].model
        dense = [pt for pt in points if pt.scheme == "dense"]
        target = args.target if args.target is not None else dense[0].accuracy - 0.1
        print(f"\n{model}, target {target:.2f}% (2 processes; seconds = steps to target x "
              f"measured step time at each epoch's bytes per step)\n")
        print("| scheme | setting | test acc (%) | steps to target | "
              + " | ".join(f"time at {r}" for r in rates) + " |")
        print("|---|---|---|---|" + "---|" * len(rates))
        for pt in points:
            cells = []
            hit = None
            for rate in rates:
                measured = times.get((model, rate, pt.scheme))
                if not measured:
                    cells.append("not measured")
                    continue
                hit = pareto.time_to_target(pt, target, measured)
                cells.append("not reached" if hit is None else f"{hit[0]:.0f} s")
            steps = "-" if hit is None else f"{hit[1]:.0f}"
            print(f"| {pt.scheme} | {pt.label} | {pt.accuracy:.2f} ± {pt.spread:.2f} | {steps} | "
                  + " | ".join(cells) + " |")
    return 0


def compare_rate(rate: str) -> float:
    """'100mbit' -> 1e8, for ordering the columns."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale
    return float("inf")


if __name__ == "__main__":
    sys.exit(main())
