"""FLOPs and CPU inference time of a channel-pruned run, before and after ``shrink``.

    python benchmarks/shrink_speed.py --run runs/NAME [--batch-sizes 1,64,1000] \\
        [--repeats 200] [--threads 1] [--out results/shrink_NAME.json]

Loads the run's final model and sparsifier masks, builds the physically smaller model with
``sparse_train.shrink``, checks that both give the same outputs on the test set (largest
absolute difference of the logits, and both accuracies), counts FLOPs per image with
``torch.utils.flop_counter.FlopCounterMode`` and times forward passes of both models in
one process, alternating dense and shrunk call by call so that both see the same machine
state, reporting medians. The "dense" model is the trained, masked model: the dense
architecture, whose zeros dense kernels still multiply.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparse_train  # noqa: E402
from launch import checkpoint  # noqa: E402
from launch.cli import OneLineParser, existing_dir, integer, integers, output_file  # noqa: E402
from launch.config import config_to_dict, load_config  # noqa: E402
from launch.data import load_datasets  # noqa: E402
from launch.models import build_model  # noqa: E402
from sparse_comm.schema import ConfigError  # noqa: E402


def load_run(run: Path):
    """The run's trained model (eval mode) and a sparsifier holding its final masks;
    ConfigError where the run has no sparsity, FileNotFoundError where no checkpoint."""
    cfg = load_config(None, base=yaml.safe_load((run / "config.yaml").read_text()))
    if cfg.sparsity is None:
        raise ConfigError("", f"{run} has no sparsity to shrink")
    train_set, test_set, info = load_datasets(cfg.data)
    model = build_model(cfg.model, info.input_shape, info.num_classes)
    state = checkpoint.run_state(run)
    model.load_state_dict(state["model"])
    sparsifier = sparse_train.attach(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                     **config_to_dict(cfg.sparsity))
    sparsifier.load_state_dict(state["plugins"]["sparsity"])
    sparsifier.detach()
    return cfg, model.eval(), sparsifier, test_set


def flops_per_image(model, shape) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, *shape))
    return counter.get_total_flops()


@torch.inference_mode()
def compare_outputs(dense, small, test_set) -> dict:
    x, y = test_set.tensors
    worst, correct = 0.0, [0, 0]
    for start in range(0, len(x), 1000):
        a, b = dense(x[start:start + 1000]), small(x[start:start + 1000])
        worst = max(worst, (a - b).abs().max().item())
        correct[0] += int((a.argmax(1) == y[start:start + 1000]).sum())
        correct[1] += int((b.argmax(1) == y[start:start + 1000]).sum())
    return {"max_abs_logit_difference": worst, "dense_accuracy": correct[0] / len(x),
            "shrunk_accuracy": correct[1] / len(x)}


@torch.inference_mode()
def time_pair(dense, small, x, repeats: int) -> tuple[float, float]:
    """Median seconds per forward of each model on ``x``, calls alternating."""
    for _ in range(5):  # warm-up: allocator, lazy kernel selection
        dense(x), small(x)
    times = ([], [])
    for i in range(repeats):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            model = dense if which == 0 else small
            start = time.perf_counter()
            model(x)
            times[which].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def layer_shapes(model) -> dict[str, list[int]]:
    return {name: list(p.shape) for name, p in model.named_parameters() if p.dim() >= 2}


def main(argv=None) -> int:
    p = OneLineParser(prog="shrink_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=existing_dir, required=True)
    p.add_argument("--batch-sizes", type=integers(1), default="1,64,1000")
    p.add_argument("--repeats", type=integer(1), default=200)
    p.add_argument("--threads", type=integer(1), default=1)
    p.add_argument("--out", type=output_file)
    args = p.parse_args(argv)
    if not (args.run / "config.yaml").is_file():
        p.error(f"--run: no config.yaml in {args.run}")
    torch.set_num_threads(args.threads)
    try:
        cfg, dense, sparsifier, test_set = load_run(args.run)
    except (ConfigError, FileNotFoundError) as err:
        p.error(f"--run: {err}")
    except yaml.YAMLError:
        p.error(f"--run: {args.run / 'config.yaml'} is not valid YAML")
    images = len(test_set.tensors[0])
    if max(args.batch_sizes) > images:
        p.error(f"--batch-sizes: at most the test set's {images} images, "
                f"got {max(args.batch_sizes)}")
    small = sparse_train.shrink(dense, sparsifier).eval()
    shape = tuple(test_set.tensors[0].shape[1:])
    result = {
        "run": str(args.run), "model": cfg.model.name, "method": cfg.sparsity.method,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
        "dense_flops": flops_per_image(dense, shape), "shrunk_flops": flops_per_image(small, shape),
        "dense_parameters": sum(p.numel() for p in dense.parameters()),
        "shrunk_parameters": sum(p.numel() for p in small.parameters()),
        "shrunk_shapes": layer_shapes(small), **compare_outputs(dense, small, test_set),
        "timing": []}
    result["flops_removed"] = 1 - result["shrunk_flops"] / result["dense_flops"]
    for batch in args.batch_sizes:
        x = test_set.tensors[0][:batch]
        t_dense, t_small = time_pair(dense, small, x, args.repeats)
        result["timing"].append({"batch": batch, "dense_ms": 1e3 * t_dense,
                                 "shrunk_ms": 1e3 * t_small, "speedup": t_dense / t_small})
    print(f"{result['model']} {result['method']} ({args.run}): FLOPs/image "
          f"{result['dense_flops']:,} -> {result['shrunk_flops']:,} "
          f"({100 * result['flops_removed']:.1f}% removed); parameters "
          f"{result['dense_parameters']:,} -> {result['shrunk_parameters']:,}; max |logit "
          f"difference| {result['max_abs_logit_difference']:.2e}; accuracy "
          f"{100 * result['dense_accuracy']:.2f}% / {100 * result['shrunk_accuracy']:.2f}%")
    print("\n| batch | dense (ms, median) | shrunk (ms, median) | speed-up |\n|---|---|---|---|")
    for row in result["timing"]:
        print(f"| {row['batch']} | {row['dense_ms']:.3f} | {row['shrunk_ms']:.3f} | "
              f"{row['speedup']:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
