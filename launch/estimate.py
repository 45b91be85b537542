"""Estimate, before renting a cluster, what gradient compression and weight sparsity save.

    python -m launch.estimate --config configs/mnist_lenet300_dgc.yaml --hardware dgx-a100-hdr \\
        --world-sizes 8,64,512 --out speedup.png

For each world size it prints a markdown table of every scheme (dense fp32, fp16, PowerSGD,
the config's DGC, the config's sparsity and a 2:4 model, the sparse ones sent mask-aware):
per-rank bytes per step, communication, compute and step time, and speedup over dense DDP.
Nothing is trained: the model is built on the meta device and its FLOPs counted. ``--out``
draws speedup against world size. Presets live in configs/hardware/ (``--hardware`` also
takes a YAML file's path).
"""
from __future__ import annotations

import sys

from dgc.codec import INDEX_DTYPES, VALUE_DTYPES
from launch.cli import OneLineParser, integer, integers, output_file, quiet_on_closed_pipe
from launch.config import load_config
from launch.costmodel.collectives import break_even_density
from launch.costmodel.hardware import HardwareConfig, load_cluster, preset_names
from launch.costmodel.run import cluster_times, compare, meta_model, workload
from launch.costmodel.storage import FORMATS, expected_masks, model_storage
from sparse_comm.schema import ConfigError, build, to_dict

PROG = "launch.estimate"


def parse_args(argv=None):
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML experiment config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--hardware", metavar="PRESET",
                   help=f"cluster preset or YAML path (default: the config's hardware.preset); "
                        f"known: {', '.join(preset_names())}")
    p.add_argument("--world-sizes", type=integers(1), default="8,64,512",
                   metavar="N,N,...", help="ranks to estimate for (default 8,64,512)")
    p.add_argument("--powersgd-rank", type=integer(1), default=4,
                   help="PowerSGD rank (default 4)")
    p.add_argument("--out", type=output_file, metavar="PNG",
                   help="write speedup against world size here")
    args = p.parse_args(argv)
    return args


def human(n: float, unit: str = "B") -> str:
    for prefix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.3g} {prefix}{unit}"
        n /= 1000


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.4g}"


def model_summary(cfg, hw: HardwareConfig) -> str:
    """Parameters, FLOPs, dense and 2:4 compute, and storage per format."""
    cluster = load_cluster(hw.preset)
    model, _ = meta_model(cfg)
    work = workload(cfg)
    times = cluster_times(work, cluster, hw)
    dtype = hw.compute_dtype or cluster.accelerator.default_dtype
    params = sum(p.numel() for p in model.parameters())
    masks = expected_masks(model, cfg.sparsity) if cfg.sparsity is not None else {}
    storage = model_storage({n: tuple(p.shape) for n, p in model.named_parameters()}, masks)
    lines = [
        f"## {cfg.model.name} on {cluster.name}: {cluster.per_node} x accelerator per node, "
        f"{dtype} at {hw.compute_efficiency:g} of peak",
        "",
        f"- parameters: {params:,}; FLOPs per step (batch {cfg.train.batch_size}): "
        f"{human(work.flops.forward, 'FLOP')} forward, {human(work.flops.backward, 'FLOP')} "
        f"backward; dense compute {ms(times.dense)} ms",
        f"- 2:4 sparse tensor cores: {times.sparse_flops_fraction:.0%} of FLOPs in layers they "
        f"accept; compute speedup {times.dense / times.sparse_theoretical:.2f}x theoretical, "
        f"{times.dense / times.sparse_realistic:.2f}x realistic",
        "- weight storage" + (f" ({cfg.sparsity.method}, expected masks)" if masks else "")
        + ": " + ", ".join(f"{fmt} {human(storage[fmt])}" for fmt in FORMATS),
    ]
    return "\n".join(lines)


def table(p: int, rows, break_even: float) -> str:
    lines = [f"### {p} rank{'s' if p > 1 else ''} (DGC break-even density {break_even:.3g})",
             "", "| scheme | bytes/step | comm (ms) | compute (ms) | step (ms) | speedup |",
             "|---|---|---|---|---|---|"]
    for label, e, speedup in rows:
        lines.append(f"| {label} | {human(e.wire_bytes)} | {ms(e.comm_s)} | {ms(e.compute_s)} "
                     f"| {ms(e.step_s)} | {speedup:.2f}x |")
    return "\n".join(lines)


def plot(results: dict, out: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, _, _) in enumerate(results[sizes[0]]):
        ax.plot(sizes, [results[p][i][2] for p in sizes], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("world size (ranks)")
    ax.set_ylabel("step speedup over dense fp32 DDP")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        section = to_dict(getattr(cfg, "hardware", None) or HardwareConfig())
        if args.hardware is not None:
            section["preset"] = args.hardware
        hw = build(HardwareConfig, section, "hardware")
        results = compare(cfg, hw, args.world_sizes, args.powersgd_rank)
        summary = model_summary(cfg, hw)
    except (ConfigError, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    o = cfg.dgc
    value_bytes = VALUE_DTYPES[o.value_dtype if o else "fp32"].itemsize
    index_bytes = INDEX_DTYPES[o.index_dtype if o else "int32"].itemsize
    print(summary)
    for p, rows in results.items():
        print()
        print(table(p, rows, break_even_density(p, value_bytes, index_bytes)))
    if args.out:
        try:
            plot(results, args.out, f"{cfg.model.name} on {load_cluster(hw.preset).name}")
        except OSError as err:
            print(f"{PROG}: error: --out: cannot write {args.out}: {err.strerror}",
                  file=sys.stderr)
            return 2
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(quiet_on_closed_pipe(main))
