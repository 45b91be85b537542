"""Compare runs: accuracy against the bytes they sent, as a Pareto front per scheme.

    python -m launch.compare runs/sweeps/lenet300 runs/dense ... [--target 98.3] \\
        [--out front.png] [--curves curves.png]

Arguments are run directories or directories holding them (a sweep's output). Runs that
differ only by seed, at the same number of processes, form one setting (``launch.pareto``);
each setting is one marker at its mean final test accuracy, with the spread over seeds as
an error bar, against its mean whole-run bytes sent per rank; each scheme's front (no
setting of it both cheaper and more accurate) is joined by a line. Printed: a markdown
table of the settings (front marked) and, with ``--target``, the fewest bytes each scheme
needs to reach that test accuracy, read from the per-epoch curves averaged over seeds.
``--curves`` also draws every run's accuracy against its cumulative bytes. Both charts and
tables go to wandb.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from launch import pareto, tracking
from launch.cli import OneLineParser, png_file, quiet_on_closed_pipe

COLUMNS = ["model", "scheme", "setting", "seeds", "test acc (%)", "spread", "bytes sent",
           "compression", "weight density", "wall time (s)", "front"]


def load_run(run_dir: Path) -> dict:
    """A run's summary, config and per-epoch (bytes, accuracy, step) curve."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no summary.json (not a finished run directory)")
    summary = json.loads(summary_path.read_text())
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("test/accuracy") is not None:
            curve.append((row[tracking.BYTES_AXIS], row["test/accuracy"],
                          row.get(tracking.STEP_AXIS, 0)))
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    return {"name": summary.get("run_name") or run_dir.name, "summary": summary,
            "curve": curve, "config": config or {}}


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories: each path that is one, else every one below it."""
    found = []
    for path in paths:
        if (path / "summary.json").is_file():
            found.append(path)
            continue
        below = sorted(p.parent for p in path.rglob("summary.json")) if path.is_dir() else []
        if not below:
            raise FileNotFoundError(f"{path}: no summary.json (not a finished run directory, "
                                    f"nor a directory holding any)")
        found += below
    return found


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.4g} {unit}"
        n /= 1000


def _mean(runs: list[dict], key: str) -> float | None:
    """The runs' mean of a summary entry; None if a run lacks it."""
    values = [r["summary"].get(key) for r in runs]
    return None if None in values else sum(values) / len(values)


def table_rows(points: list[pareto.SettingPoint]) -> list[list]:
    on_front = {id(p) for members in pareto.fronts(points).values() for p in members}
    rows = []
    for p in points:
        dense = _mean(p.runs, "comm_bytes_dense")
        rows.append([p.model, p.scheme, p.label, len(p.runs), round(p.accuracy, 2),
                     round(p.spread, 2), p.bytes_sent,
                     round(dense / p.bytes_sent, 1) if p.bytes_sent else None,
                     _mean(p.runs, "weight_density"), _mean(p.runs, "wall_time_s"),
                     "yes" if id(p) in on_front else ""])
    return rows


def markdown(rows: list[list]) -> str:
    def maybe(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for model, scheme, label, seeds, acc, spread, sent, ratio, density, wall, on_front in rows:
        lines.append(f"| {model} | {scheme} | {label} | {seeds} | {acc:.2f} | {spread:.2f} | "
                     f"{human_bytes(sent)} | {maybe(ratio, '.1f')}{'x' * (ratio is not None)} | "
                     f"{maybe(density, '.3f')} | {maybe(wall, '.0f')} | {on_front} |")
    return "\n".join(lines)


def target_markdown(points: list[pareto.SettingPoint], target: float) -> str:
    lines = [f"Fewest bytes per rank to reach {target:.2f}% test accuracy (per-epoch curves "
             f"averaged over seeds):", "",
             "| model | scheme | processes | cheapest setting | bytes sent / rank | steps |",
             "|---|---|---|---|---|---|"]
    hits = pareto.cheapest_to_target(points, target)
    for (model, scheme, processes), hit in sorted(hits.items(),
                                                  key=lambda kv: (*kv[0][:2], kv[0][2] or 0)):
        where = f"| {model} | {scheme} | {'-' if processes is None else processes} |"
        if hit is None:
            lines.append(f"{where} not reached | - | - |")
        else:
            point, sent, steps = hit
            lines.append(f"{where} {point.label} | {human_bytes(sent)} | {steps:.0f} |")
    return "\n".join(lines)


_SCHEME_COLORS = {"dense": "black", "fp16": "tab:orange", "bf16": "tab:brown",
                  "PowerSGD": "tab:blue", "DGC": "tab:red"}


def plot_front(points: list[pareto.SettingPoint], out: Path, target: float | None) -> None:
    """One panel per model: a marker per setting (error bar: spread over seeds), each
    scheme's front joined; the accuracy axis spans the settings' means."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({p.model for p in points})
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 6.5), squeeze=False)
    markers = "osD^v<>pPX*h"
    for ax, model in zip(axes[0], models):
        group = [p for p in points if p.model == model]
        schemes = sorted({p.scheme for p in group})
        for scheme in schemes:
            color = _SCHEME_COLORS.get(scheme, "tab:green")
            members = [p for p in group if p.scheme == scheme]
            for i, p in enumerate(members):
                ax.errorbar(p.bytes_sent, p.accuracy, yerr=p.spread, color=color,
                            marker=markers[i % len(markers)], markersize=6, capsize=3,
                            linestyle="none", label=f"{scheme}: {p.label} ({p.accuracy:.2f})")
            for line in pareto.fronts(members).values():  # one per number of processes
                ax.plot([p.bytes_sent for p in line], [p.accuracy for p in line], color=color,
                        linewidth=1.2, alpha=0.8)
        # The axis spans the settings within 3 points of the best; one that fell further (a
        # diverged seed) is pinned to the bottom edge and labelled with its accuracy.
        high = max(p.accuracy for p in group)
        shown = [p.accuracy for p in group if p.accuracy >= high - 3.0]
        low = min(shown)
        pad = max(0.15, (high - low) * 0.15)
        bottom = low - pad
        ax.set_ylim(bottom, high + pad)
        for p in group:
            if p.accuracy < bottom:
                ax.annotate(f"{p.accuracy:.1f}% (off scale)", (p.bytes_sent, bottom),
                            xytext=(4, 6), textcoords="offset points", fontsize=7,
                            color=_SCHEME_COLORS.get(p.scheme, "tab:green"))
        if target is not None:
            ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("whole-run gradient bytes sent per rank")
        ax.set_ylabel("final test accuracy (%), mean over seeds ± std")
        ax.set_title(f"{model}: accuracy against bytes (up and left is better)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_curves(runs: list[dict], out: Path) -> None:
    """One panel per model, one curve per run: accuracy after each epoch against the bytes
    sent so far."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({pareto.model_of(r["config"]) for r in runs})
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 6.5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, model in zip(axes[0], models):
        group = [r for r in runs if pareto.model_of(r["config"]) == model and r["curve"]]
        for i, run in enumerate(group):
            ax.plot([b for b, _, _ in run["curve"]], [100 * a for _, a, _ in run["curve"]],
                    color=colors[i % len(colors)], marker="o", markersize=3, linewidth=1,
                    label=run["name"])
        finals = [100 * r["curve"][-1][1] for r in group]
        if finals:
            ax.set_ylim(min(finals) - 1.0, max(finals) + 0.3)
        ax.set_xscale("log")
        ax.set_xlabel("cumulative gradient bytes sent per rank")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = OneLineParser(prog="launch.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path,
                   help="run directories, or directories holding them (a sweep's)")
    p.add_argument("--out", type=png_file, default=Path("compare.png"),
                   help="PNG of the accuracy-against-bytes front")
    p.add_argument("--curves", type=png_file, help="also draw every run's curve to this PNG")
    p.add_argument("--target", type=float, metavar="ACC",
                   help="test accuracy in %% to report each scheme's fewest bytes to")
    p.add_argument("--wandb-mode", choices=["online", "offline", "disabled"], default="online")
    p.add_argument("--wandb-project", default=None,
                   help="default: the first run's wandb.project")
    args = p.parse_args(argv)
    if args.target is not None and not 0 < args.target <= 100:
        p.error(f"--target is a test accuracy in percent, got {args.target}")
    try:
        runs = [load_run(d) for d in find_runs(args.runs)]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, yaml.YAMLError) as err:
        print(f"launch.compare: error: {err}", file=sys.stderr)
        return 2
    points = pareto.group_settings(runs)
    rows = table_rows(points)
    plot_front(points, args.out, args.target)
    print(markdown(rows))
    if args.target is not None:
        print("\n" + target_markdown(points, args.target))
    print(f"\nchart: {args.out}")
    if args.curves is not None:
        plot_curves(runs, args.curves)
        print(f"curves: {args.curves}")
    project = args.wandb_project or runs[0]["config"].get("wandb", {}).get("project",
                                                                            "sparse-comm")
    tracker = tracking.start(args.wandb_mode, project, "compare", args.out.parent,
                             {"runs": [r["name"] for r in runs], "target": args.target},
                             job_type="compare", define_axes=False)
    tracker.log_table("compare/table", COLUMNS, rows)
    tracker.log_image("compare/accuracy_vs_bytes", str(args.out))
    if args.curves is not None:
        tracker.log_image("compare/curves", str(args.curves))
    tracker.finish()
    return 0


if __name__ == "__main__":
    sys.exit(quiet_on_closed_pipe(main))
