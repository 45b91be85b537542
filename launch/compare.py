"""Compare runs: test accuracy against cumulative communication bytes.

    python -m launch.compare runs/dense runs/dgc [...] --out compare.png

Draws one curve per run (log-scaled bytes axis), prints a markdown table (accuracy, bytes,
compression ratio, weight density, wall time) and logs both to wandb.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from launch import tracking
from launch.cli import OneLineParser

COLUMNS = ["run", "test acc (%)", "bytes sent", "compression", "weight density", "wall time (s)"]


def load_run(run_dir: Path) -> dict:
    """A run's summary and its per-epoch (bytes, accuracy) curve."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no summary.json (not a finished run directory)")
    summary = json.loads(summary_path.read_text())
    curve = [(0.0, None)]
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "test/accuracy" in row:
            curve.append((row[tracking.BYTES_AXIS], row["test/accuracy"]))
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    return {"name": summary.get("run_name") or run_dir.name, "summary": summary,
            "curve": [c for c in curve if c[1] is not None], "config": config}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000


def table_rows(runs: list[dict]) -> list[list]:
    rows = []
    for run in runs:
        s = run["summary"]
        ratio = s["comm_bytes_dense"] / s["comm_bytes_sent"] if s.get("comm_bytes_sent") else float("nan")
        rows.append([run["name"], round(100 * s["test_accuracy"], 2), s["comm_bytes_sent"],
                     round(ratio, 1), round(s["weight_density"], 4), round(s["wall_time_s"], 1)])
    return rows


def markdown(rows: list[list]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, acc, sent, ratio, density, wall in rows:
        lines.append(f"| {name} | {acc:.2f} | {human_bytes(sent)} | {ratio:.1f}x | {density:.4f} | {wall:.1f} |")
    return "\n".join(lines)


def _model_of(run: dict) -> str:
    model = run["config"].get("model")
    return model.get("name", "") if isinstance(model, dict) else ""


def plot(runs: list[dict], out: Path) -> None:
    """One panel per model, one curve per run (accuracy at the end of each epoch against
    the bytes sent so far). The accuracy axis starts a little below the worst final
    accuracy, so that the runs can be told apart; early epochs below it are cut off."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({_model_of(r) for r in runs})
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 6.5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    markers = "osD^v<>pPX*h"
    for ax, model in zip(axes[0], models):
        group = [r for r in runs if _model_of(r) == model and r["curve"]]
        finals = [100 * r["curve"][-1][1] for r in group]
        for i, run in enumerate(group):
            xs = [b for b, _ in run["curve"]]
            ys = [100 * a for _, a in run["curve"]]
            ax.plot(xs, ys, color=colors[i % len(colors)], marker=markers[i % len(markers)],
                    markersize=4, linewidth=1.2, label=f"{run['name']} ({ys[-1]:.2f})")
        if finals:
            spread = max(finals) - min(finals)
            ax.set_ylim(max(0.0, min(finals) - max(1.0, spread)),
                        min(100.0, max(finals) + max(0.3, spread / 4)))
        ax.set_xscale("log")
        ax.set_xlabel("cumulative gradient bytes sent per rank")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(model or "accuracy against communication")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2,
                  title="run (final test accuracy, %)", title_fontsize=7)
    fig.suptitle("Test accuracy against gradient bytes sent (left is cheaper)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = OneLineParser(prog="launch.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (with summary.json)")
    p.add_argument("--out", type=Path, default=Path("compare.png"), help="PNG to write")
    p.add_argument("--wandb-mode", choices=["online", "offline", "disabled"], default="online")
    p.add_argument("--wandb-project", default=None,
                   help="default: the first run's wandb.project")
    args = p.parse_args(argv)
    try:
        runs = [load_run(d) for d in args.runs]
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as err:
        print(f"launch.compare: error: {err}", file=sys.stderr)
        return 2
    rows = table_rows(runs)
    plot(runs, args.out)
    print(markdown(rows))
    print(f"\nchart: {args.out}")
    project = args.wandb_project or runs[0]["config"].get("wandb", {}).get("project", "sparse-comm")
    tracker = tracking.start(args.wandb_mode, project, "compare", args.out.parent,
                             {"runs": [r["name"] for r in runs]}, job_type="compare",
                             define_axes=False)
    tracker.log_table("compare/table", COLUMNS, rows)
    tracker.log_image("compare/accuracy_vs_bytes", str(args.out))
    tracker.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
