"""DGC's exchanges against PowerSGD at scale, as the hardware cost model sees them.

    python benchmarks/scaling_model.py --config configs/synthetic_wide_mlp_dgc.yaml
    python benchmarks/scaling_model.py --set dgc.gtopk_slices=true

For every cluster preset in configs/hardware/ and world sizes 8 to 1024 (8 ranks per node),
the modelled step of dense DDP, PowerSGD rank 4 and DGC with each exchange (allgather,
sparse_allreduce, auto; flat and hierarchical, the latter with its dense and its sparse
intra-node stage), as speedup over dense, and the two checks the issues ask of the model:
hierarchical DGC at least 5x faster than flat DGC at 1024 ranks and never slower (issue 15;
against flat DGC with ``auto`` and with the allgather), DGC with ``auto`` at least as fast as PowerSGD rank 4 at every
size (issue 16). The numbers are ``launch.estimate``'s, one column per row of its table.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch.cli import OneLineParser, existing_file, integers  # noqa: E402
from launch.config import load_config  # noqa: E402
from launch.costmodel.run import compare  # noqa: E402
from sparse_comm.schema import ConfigError, build  # noqa: E402

CLUSTERS = ["a100-pcie-25gbe", "h100-pcie-100gbe", "dgx-a100-hdr", "dgx-h100-ndr", "h200-ndr"]
SIZES = [8, 16, 32, 64, 128, 256, 512, 1024]


def main(argv=None) -> int:
    p = OneLineParser(prog="scaling_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=existing_file,
                   default=str(REPO / "configs/synthetic_wide_mlp_dgc.yaml"))
    p.add_argument("--world-sizes", type=integers(1), default=",".join(map(str, SIZES)))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override, e.g. dgc.gtopk_slices=true (repeatable)")
    args = p.parse_args(argv)
    sizes = args.world_sizes
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as err:
        p.error(str(err))
    if cfg.dgc is None:
        p.error(f"--config: {args.config} has no dgc section to scale")
    for preset in CLUSTERS:
        hw = build(type(cfg.hardware), {**vars(cfg.hardware), "preset": preset}, "hardware")
        table = compare(cfg, hw, sizes)
        labels = [label for label, _, _ in table[sizes[0]]]
        pick = {"powersgd r=4": "PowerSGD r4"}
        for label in labels:
            if "sparse-intra" in label:
                pick[label] = "hier sparse-intra"
            elif label.startswith("dgc") or label.startswith("hierarchical dgc"):
                pick[label] = (("hier " if label.startswith("hier") else "flat ")
                               + label.rsplit(" ", 1)[-1])
        print(f"\n{preset}: speedup over dense DDP (modelled step in ms)\n")
        print("| ranks | " + " | ".join(pick.values()) + " |")
        print("|---|" + "---|" * len(pick))
        never_slower = {"hier auto": True, "hier sparse-intra": True}
        auto_ok = True
        for n in sizes:
            rows = {label: (e.step_s, s) for label, e, s in table[n]}
            cells = [f"{rows[l][1]:.2f}x ({rows[l][0] * 1e3:.3g})" for l in pick]
            print(f"| {n} | " + " | ".join(cells) + " |")
            step = {short: rows[label][0] for label, short in pick.items()}
            for hier in never_slower:
                never_slower[hier] &= step[hier] <= step["flat auto"] * (1 + 1e-9)
            auto_ok &= step["flat auto"] <= step["PowerSGD r4"] * (1 + 1e-9)
        ratios = ", ".join(f"{flat} / {hier} {step[flat] / step[hier]:.2f}x"
                           for hier in never_slower for flat in ("flat auto", "flat allgather"))
        print("\nnever slower than flat auto: " + ", ".join(
            f"{hier} {'yes' if ok else 'NO'}" for hier, ok in never_slower.items())
            + f"; at {sizes[-1]} ranks (bar 5x): {ratios}; DGC auto at least as fast as "
              f"PowerSGD r4 everywhere: {'yes' if auto_ok else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
