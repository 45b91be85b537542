"""Find a lottery ticket: iterative magnitude pruning with rewinding.

    python -m launch.lottery --config configs/mnist_lenet300_dense.yaml --rounds 14 \\
        --prune-per-round 0.2 --rewind-step 200 [--nproc 2] [--scope global] \\
        [--out-dir runs/lottery/NAME] [--lock FILE] [--set key=value ...]

Round 0 trains the dense network from an initialisation this tool draws (``train.seed``)
and saves its weights at step S (``--rewind-step``; 0 is the initialisation itself). Each
later round prunes ``--prune-per-round`` of the weights still alive, by magnitude of the
previous round's trained weights (per layer, or over all layers together with ``--scope
global``), resets the survivors to their values at step S and trains again with that mask
fixed (``sparsity.method: nonzero``). Frankle & Carbin (ICLR 2019) reset to the
initialisation (S = 0); Frankle et al. ("Stabilizing the lottery ticket hypothesis", 2019)
and Renda et al. (ICLR 2020) rewind to an early step, which finds tickets where resetting
to the initialisation does not. Every round here runs the config's full training schedule
with fresh optimizer state; Renda et al.'s variant that also rewinds the learning-rate
schedule to step S is not implemented.

After the last round the same mask is trained once more from a fresh random
initialisation (another seed), the control that shows the ticket's weights matter.

Each round is a ``launch.train`` run in ``OUT/roundNN`` (through torchrun when ``--nproc`` >
1; one wandb run each, grouped under the lottery's name). The tool logs per round the
density and final test accuracy to its own wandb run and writes ``OUT/lottery.{json,md,png}``.
Rerunning the command continues: finished rounds are kept.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from launch import checkpoint, tracking
from launch.cli import OneLineParser, lock_file, output_dir
from launch.config import config_to_dict, load_config
from launch.data import data_info
from launch.models import build_model
from launch.sweep import run_one
from sparse_comm.schema import ConfigError
from sparse_train.masks import keep_largest
from sparse_train.sparsifier import select_weights

CONTROL_SEED_OFFSET = 1000  # the control's initialisation: train.seed + this


def density_after(rounds: int, rate: float) -> float:
    """Fraction of weights alive after ``rounds`` rounds pruning ``rate`` of the survivors."""
    return (1.0 - rate) ** rounds


def next_mask(trained: dict[str, torch.Tensor], rounds: int, rate: float, scope: str
              ) -> dict[str, torch.Tensor]:
    """The mask of round ``rounds``: the largest trained magnitudes at its density. The
    previous round's pruned weights are zero, so they rank last and stay pruned."""
    sparsity = 1.0 - density_after(rounds, rate)
    return keep_largest({n: w.abs() for n, w in trained.items()}, sparsity, scope)


def ticket(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict:
    """A state dict: ``weights`` with every masked entry zeroed."""
    return {name: w * masks[name] if name in masks else w.clone()
            for name, w in weights.items()}


class Lottery:
    """The rounds of one lottery search in ``out``; each step is skipped if already done."""

    def __init__(self, args, cfg):
        self.args, self.cfg, self.out = args, cfg, args.out_dir
        self.name = args.name or self.out.name
        info = data_info(cfg.data)
        self.build = lambda: build_model(cfg.model, info.input_shape, info.num_classes)
        self.layers = list(select_weights(self.build(), cfg.sparsity.layers if cfg.sparsity
                                          else []))

    def init_weights(self, seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return self.build().state_dict()

    def train(self, where: Path, sets: list[str]) -> dict:
        """Run launch.train in ``where`` (continuing a stopped run); its summary."""
        where.mkdir(parents=True, exist_ok=True)
        sets = self.args.overrides + sets + [
            f"out_dir={where}", f"run_name={self.name}-{where.name}", f"wandb.group={self.name}"]
        code = run_one(self.args.config, sets, self.args.nproc, where, where / "train.log",
                       self.args.lock)
        if code != 0 or not (where / "summary.json").is_file():
            raise RuntimeError(f"training in {where} failed (exit {code}); see "
                               f"{where / 'train.log'}")
        return json.loads((where / "summary.json").read_text())

    def round0(self) -> tuple[dict, dict]:
        """The dense run; its summary and the weights to rewind to."""
        where, init = self.out / "round00", self.out / "init.pt"
        rewind = self.out / "rewind.pt"
        if not init.is_file():
            checkpoint.save_atomic(self.init_weights(self.cfg.train.seed), init)
        sets = ["sparsity=null", f"train.init_from={init}"]
        if self.args.rewind_step == 0:
            shutil.copyfile(init, rewind)
        elif not rewind.is_file():
            # Stop at step S, keep the weights, then continue the same run to the end.
            self.train(where, sets + [f"train.max_steps={self.args.rewind_step}"])
            state = checkpoint.run_state(where)
            if state["progress"]["step"] < self.args.rewind_step:  # the run ended before it
                shutil.rmtree(where)  # its end is not the step asked for: not a rewind point
                raise ConfigError("--rewind-step", f"{self.args.rewind_step} is past the run's "
                                  f"last step, {state['progress']['step']}")
            checkpoint.save_atomic(state["model"], rewind)
            (where / "summary.json").unlink()
        done, end = where / "summary.json", self.cfg.train.max_steps
        summary = json.loads(done.read_text()) if done.is_file() else \
            self.train(where, sets + [f"train.max_steps={'null' if end is None else end}"])
        return summary, torch.load(rewind, map_location="cpu")

    def sparse_round(self, where: Path, start: dict, masks: dict) -> dict:
        if (where / "summary.json").is_file():
            return json.loads((where / "summary.json").read_text())
        where.mkdir(parents=True, exist_ok=True)
        init = where / "ticket.pt"
        if not init.is_file():
            checkpoint.save_atomic(ticket(start, masks), init)
        patterns = self.cfg.sparsity.layers if self.cfg.sparsity else []
        return self.train(where, ["sparsity=null", "sparsity.method=nonzero",
                                  f"sparsity.layers={json.dumps(patterns)}",
                                  f"train.init_from={init}"])

    def trained(self, where: Path) -> dict[str, torch.Tensor]:
        model = checkpoint.run_state(where)["model"]
        return {name: model[name] for name in self.layers}

    def run(self) -> list[dict]:
        a = self.args
        dense, rewind = self.round0()
        rows = [{"round": 0, "density": 1.0, "test_accuracy": dense["test_accuracy"],
                 "run": str(self.out / "round00")}]
        print(f"round 0: dense, {100 * dense['test_accuracy']:.2f}%", flush=True)
        previous, masks = self.out / "round00", None
        for r in range(1, a.rounds + 1):
            masks = next_mask(self.trained(previous), r, a.prune_per_round, a.scope)
            previous = self.out / f"round{r:02d}"
            summary = self.sparse_round(previous, rewind, masks)
            rows.append({"round": r, "density": _density(masks),
                         "test_accuracy": summary["test_accuracy"], "run": str(previous)})
            print(f"round {r}: {100 * rows[-1]['density']:.2f}% of weights, "
                  f"{100 * summary['test_accuracy']:.2f}%", flush=True)
        if masks is not None and not a.no_control:
            seed = self.cfg.train.seed + CONTROL_SEED_OFFSET
            summary = self.sparse_round(self.out / "control", self.init_weights(seed), masks)
            rows.append({"round": "control", "density": _density(masks),
                         "test_accuracy": summary["test_accuracy"],
                         "run": str(self.out / "control")})
            print(f"control (round {a.rounds}'s mask, random re-initialisation, seed {seed}): "
                  f"{100 * summary['test_accuracy']:.2f}%", flush=True)
        return rows


def _density(masks: dict[str, torch.Tensor]) -> float:
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def markdown(rows: list[dict], title: str) -> str:
    dense = rows[0]["test_accuracy"]
    lines = [title, "", "| round | weights kept | test accuracy (%) | vs dense (points) |",
             "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['round']} | {100 * row['density']:.2f}% | "
                     f"{100 * row['test_accuracy']:.2f} | "
                     f"{100 * (row['test_accuracy'] - dense):+.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tickets = [r for r in rows if r["round"] != "control"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([100 * r["density"] for r in tickets], [100 * r["test_accuracy"] for r in tickets],
            marker="o", label="ticket (rewound weights)")
    for r in rows:
        if r["round"] == "control":
            ax.plot([100 * r["density"]], [100 * r["test_accuracy"]], marker="x",
                    markersize=9, linestyle="none", color="C3",
                    label="same mask, random re-initialisation")
    ax.axhline(100 * rows[0]["test_accuracy"], color="grey", linestyle="--", linewidth=1,
               label="dense")
    ax.set_xscale("log")
    ticks = [t for t in (100, 50, 20, 10, 5, 2, 1, 0.5) if t >= 0.8 * 100 * rows[-1]["density"]]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.set_xlabel("weights kept (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(rows: list[dict], args, cfg) -> None:
    out, name = args.out_dir, args.name or args.out_dir.name
    title = (f"Lottery ticket `{name}`: `{args.config}`, {args.rounds} rounds of "
             f"{args.prune_per_round:g} ({args.scope}), rewound to step {args.rewind_step}")
    text = markdown(rows, title)
    (out / "lottery.md").write_text(text + "\n")
    (out / "lottery.json").write_text(json.dumps(
        {"config": str(args.config), "rounds": args.rounds,
         "prune_per_round": args.prune_per_round, "rewind_step": args.rewind_step,
         "scope": args.scope, "nproc": args.nproc, "overrides": args.overrides,
         "rows": rows}, indent=2) + "\n")
    plot(rows, out / "lottery.png", f"{cfg.model.name}: lottery ticket, rewind to step "
                                    f"{args.rewind_step}")
    tracker = tracking.start(cfg.wandb.mode, cfg.wandb.project, f"{name}-lottery", out,
                             {**config_to_dict(cfg), "lottery": vars(args) | {
                                 "config": str(args.config), "out_dir": str(out),
                                 "lock": str(args.lock)}},
                             group=name, entity=cfg.wandb.entity, job_type="lottery",
                             define_axes=False)
    for row in rows:
        if row["round"] != "control":
            tracker.log({"lottery/round": row["round"], "lottery/density": row["density"],
                         "lottery/test_accuracy": row["test_accuracy"]})
    tracker.log_table("lottery/rounds", ["round", "density", "test_accuracy"],
                      [[str(r["round"]), r["density"], r["test_accuracy"]] for r in rows])
    tracker.log_image("lottery/plot", str(out / "lottery.png"))
    control = [r for r in rows if r["round"] == "control"]
    tracker.summary({"lottery/final_density": rows[-1 - len(control)]["density"],
                     "lottery/final_accuracy": rows[-1 - len(control)]["test_accuracy"],
                     "lottery/dense_accuracy": rows[0]["test_accuracy"],
                     **({"lottery/control_accuracy": control[0]["test_accuracy"]}
                        if control else {})})
    tracker.finish()
    print(text)
    print(f"wrote {out}/lottery.md, .json, .png")


def main(argv=None) -> int:
    p = OneLineParser(prog="launch.lottery", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True, help="the dense run's YAML config")
    p.add_argument("--rounds", type=int, required=True, help="pruning rounds after round 0")
    p.add_argument("--prune-per-round", type=float, default=0.2,
                   help="fraction of the surviving weights each round removes")
    p.add_argument("--rewind-step", type=int, default=0,
                   help="the optimizer step whose weights survivors reset to (0: init)")
    p.add_argument("--scope", choices=["layer", "global"], default="global",
                   help="prune each layer by the rate, or rank all layers together")
    p.add_argument("--nproc", type=int, default=1, help="processes per round (torchrun)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an override applied to every round (repeatable)")
    p.add_argument("--out-dir", type=Path, help="default: runs/lottery/<config name>")
    p.add_argument("--name", help="wandb group of the rounds (default: the out dir's name)")
    p.add_argument("--no-control", action="store_true",
                   help="skip the random re-initialisation control")
    p.add_argument("--lock", type=Path, metavar="FILE",
                   help="hold an flock on FILE during each round (shared machines)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if not 0 < args.prune_per_round < 1:
        p.error(f"--prune-per-round must be in (0, 1), got {args.prune_per_round}")
    if args.rewind_step < 0:
        p.error(f"--rewind-step must be >= 0, got {args.rewind_step}")
    if args.nproc < 1:
        p.error(f"--nproc must be >= 1, got {args.nproc}")
    args.out_dir = args.out_dir or Path("runs/lottery") / args.config.stem
    try:
        cfg = load_config(args.config, args.overrides)
        steps = cfg.train.max_steps or float("inf")
        if args.rewind_step >= steps:
            raise ConfigError("", f"--rewind-step {args.rewind_step} is not before the run's "
                                  f"last step (train.max_steps = {cfg.train.max_steps})")
        lottery = Lottery(args, cfg)
        lock_file(args.lock)
        output_dir(args.out_dir, "--out-dir")
        rows = lottery.run()  # a --rewind-step past the run's end shows only here
    except ConfigError as err:
        print(f"launch.lottery: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"launch.lottery: {err}", file=sys.stderr)
        return 1
    report(rows, args, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
