"""Per-layer pruning sensitivity of a trained run, and per-layer ratios for an accuracy budget.

    python -m launch.sensitivity --config configs/mnist_lenet300_dense.yaml \\
        --checkpoint runs/NAME [--ratios 0.1,0.2,...,0.9] [--max-drop 0.5] [--out DIR]

Each prunable layer is pruned alone at each ratio (by magnitude, or by the config's
structured method: ``channel`` / ``slimming`` remove that fraction of the layer's output
channels, ``bank`` / ``block`` prune within banks / by blocks), with every other layer left
as trained, and the network is evaluated without retraining. This is the analysis Han et
al. (NIPS 2015, Fig. 5) and Li et al. (ICLR 2017, Fig. 2) run before choosing per-layer
ratios. The proposal takes, for each layer, the largest ratio on the grid such that no ratio
up to it costs more than ``--max-drop`` accuracy points (the drop threshold T), and prints
it as a ``sparsity:`` section (``target`` a list, one ratio per layer).

Accuracy is measured on MNIST's validation split when the dataset has one (ratios are a
choice, and choices are made on held-out data, not on the test set), else on the test set.
Writes ``OUT/sensitivity.{json,md,png}``; OUT defaults to ``RUN_DIR/sensitivity``.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.utils.data import DataLoader

import sparse_train
from launch import checkpoint
from launch.cli import OneLineParser, output_dir
from launch.config import load_config
from launch.data import data_info, load_splits
from launch.models import build_model
from launch.train import evaluate
from sparse_comm.schema import ConfigError

DEFAULT_RATIOS = [round(0.1 * i, 1) for i in range(1, 10)]
# what "prune this layer alone by ratio r" means for each configured method
SCAN_METHOD = {"channel": "channel", "slimming": "slimming", "group_lasso": "channel",
               "bank": "bank", "block": "block"}
RATIO_OPTIONS = ("channel_norm", "bank_size", "block", "block_norm")


def scan_method(configured: str | None) -> str:
    return SCAN_METHOD.get(configured, "magnitude")


def prunable_layers(model, method: str, options: dict) -> list[str]:
    """The layers a ratio applies to: weights the method sparsifies (channel methods:
    the weights whose output channels it can remove)."""
    probe = sparse_train.attach(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                method=method, target=0.0, **options)
    probe.detach()
    if method in ("channel", "slimming"):
        return [group.weight for group in probe.method.groups]
    return list(probe.params)


def scan(model, loader, device, method: str, options: dict, layers: list[str],
         ratios: list[float], log=print) -> tuple[float, dict[str, dict[float, float]]]:
    """Accuracy of the trained model and of it with each layer alone pruned at each ratio."""
    trained = copy.deepcopy(model.state_dict())
    base, _ = evaluate(model, loader, device)
    table = {}
    for layer in layers:
        table[layer] = {}
        for ratio in ratios:
            model.load_state_dict(trained)
            sp = sparse_train.attach(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                     method=method, target=ratio, layers=[layer],
                                     start_step=0, schedule="oneshot", scope="layer",
                                     **options)
            sp.detach()
            table[layer][ratio], _ = evaluate(model, loader, device)
            log(f"{layer:>24s} @ {ratio:.2f}: {100 * table[layer][ratio]:.2f}%")
    model.load_state_dict(trained)
    return base, table


def propose(base: float, table: dict[str, dict[float, float]], max_drop: float
            ) -> dict[str, float]:
    """Per layer, the largest ratio such that every ratio up to it drops at most
    ``max_drop`` points below ``base`` (0 when even the smallest drops more)."""
    chosen = {}
    for layer, row in table.items():
        chosen[layer] = 0.0
        for ratio in sorted(row):
            if 100 * (base - row[ratio]) > max_drop + 1e-9:  # 1e-9: float noise in points
                break
            chosen[layer] = ratio
    return chosen


def markdown(base: float, table, ratios, proposal, max_drop: float, split: str) -> str:
    head = "| layer | " + " | ".join(f"{r:g}" for r in ratios) + " | proposed |"
    lines = [f"Accuracy ({split} split, %) with one layer pruned at each ratio; "
             f"unpruned: {100 * base:.2f}. Proposed: the largest ratio losing at most "
             f"{max_drop} points.", "", head, "|---" * (len(ratios) + 2) + "|"]
    for layer, row in table.items():
        cells = " | ".join(f"{100 * row[r]:.2f}" for r in ratios)
        lines.append(f"| {layer} | {cells} | {proposal[layer]:g} |")
    return "\n".join(lines)


def plot(base: float, table, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for layer, row in table.items():
        ratios = sorted(row)
        ax.plot(ratios, [100 * row[r] for r in ratios], marker="o", label=layer)
    ax.axhline(100 * base, color="grey", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xlabel("fraction of the layer pruned")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_ratios(text: str) -> list[float]:
    ratios = sorted({float(v) for v in text.split(",") if v.strip()})
    if not ratios or not all(0 < r < 1 for r in ratios):
        raise ValueError(text)
    return ratios


def main(argv=None) -> int:
    p = OneLineParser(prog="launch.sensitivity", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the run's YAML config")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR",
                   help="a run directory (its newest complete checkpoint) or a checkpoint file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--method", choices=["magnitude", "channel", "slimming", "bank", "block"],
                   help="how a layer is pruned (default: from the config's sparsity method)")
    p.add_argument("--ratios", default=",".join(map(str, DEFAULT_RATIOS)),
                   help="comma-separated fractions in (0, 1)")
    p.add_argument("--max-drop", type=float, default=0.5,
                   help="accuracy points a layer may lose at its proposed ratio (T)")
    p.add_argument("--out", type=Path, help="output directory (default RUN_DIR/sensitivity)")
    args = p.parse_args(argv)
    try:
        ratios = parse_ratios(args.ratios)
    except ValueError:
        p.error(f"--ratios takes comma-separated fractions in (0, 1), got {args.ratios!r}")
    if not args.max_drop >= 0:
        p.error(f"--max-drop must be >= 0 accuracy points, got {args.max_drop}")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return _run(args, ratios)
    except ConfigError as err:
        print(f"launch.sensitivity: error: {err}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()


def _run(args, ratios: list[float]) -> int:
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.checkpoint)
    run_dir = run_dir if run_dir.is_dir() else run_dir.parent
    sparsity = cfg.sparsity
    method = args.method or scan_method(sparsity.method if sparsity else None)
    options = {k: getattr(sparsity, k) for k in RATIO_OPTIONS} if sparsity else {}
    layers_option = sparsity.layers if sparsity else []
    info = data_info(cfg.data)
    model = build_model(cfg.model, info.input_shape, info.num_classes)
    checkpoint.load_weights(model, args.checkpoint, "--checkpoint")
    out = output_dir(args.out or run_dir / "sensitivity", "--out")  # before the scan
    splits = load_splits(cfg.data, progress=True)
    split = "val" if "val" in splits else "test"
    loader = DataLoader(splits[split], batch_size=1000)
    try:
        layers = prunable_layers(model, method, dict(options, layers=layers_option))
    except ConfigError as err:
        raise ConfigError(f"sparsity.{err.key}" if err.key else "sparsity", err.problem) from None
    print(f"launch.sensitivity: {cfg.model.name}, {len(layers)} layers x {len(ratios)} ratios, "
          f"pruned by {method}, evaluated on the {split} split", flush=True)
    base, table = scan(model, loader, torch.device("cpu"), method, options, layers, ratios)
    proposal = propose(base, table, args.max_drop)
    text = markdown(base, table, ratios, proposal, args.max_drop, split)
    section = {"sparsity": {"method": method, "layers": list(proposal),
                            "target": list(proposal.values())}}
    (out / "sensitivity.md").write_text(text + "\n")
    (out / "sensitivity.json").write_text(json.dumps({
        "config": str(args.config), "checkpoint": str(args.checkpoint), "method": method,
        "split": split, "unpruned_accuracy": base, "max_drop": args.max_drop,
        "accuracy": {layer: {str(r): a for r, a in row.items()} for layer, row in table.items()},
        "proposal": proposal}, indent=2) + "\n")
    plot(base, table, out / "sensitivity.png",
         f"{cfg.model.name}: each layer pruned alone ({method}, {split} split)")
    print(text)
    print(f"\nproposed ratios (each layer alone loses at most {args.max_drop} points):")
    print(yaml.safe_dump(section, sort_keys=False, default_flow_style=None).rstrip())
    print(f"wrote {out}/sensitivity.md, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
