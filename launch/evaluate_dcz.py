"""Decode a Deep Compression file into a fresh model and measure it on its test set.

    python -m launch.evaluate_dcz results/deep_compression/lenet300.dcz

Prints one JSON line: the file's size, the model's dense fp32 size (every parameter,
biases included, 4 bytes each), their ratio, and test accuracy and error. The model and
dataset come from the file's header (written by ``launch.train`` with a ``quantize:``
section); ``--data-root`` / ``--cache-dir`` say where the dataset is on this machine.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from launch.cli import OneLineParser
from launch.data import DataConfig, load_datasets
from launch.models import ModelConfig, build_model
from sparse_comm.schema import ConfigError, build
from sparse_train import codec


def parse_args(argv=None):
    p = OneLineParser(prog="launch.evaluate_dcz", description=__doc__.split("\n\n")[0])
    p.add_argument("file", help="a .dcz file written by launch.train")
    p.add_argument("--data-root", help="local dataset path (see launch.data.DataConfig.root)")
    p.add_argument("--cache-dir", help="where MNIST is cached or fetched to")
    p.add_argument("--batch-size", type=int, default=1000)
    return p.parse_args(argv)


def model_and_data(compressed: codec.CompressedModel, args) -> tuple[torch.nn.Module,
                                                                     DataConfig]:
    """The fresh model the file decodes into, and its dataset's config."""
    meta = compressed.meta
    if "model" not in meta or "data" not in meta or compressed.input_shape is None:
        raise ConfigError("", f"{args.file}: the header names no launcher model and dataset")
    data = dict(meta["data"])
    for key, value in (("root", args.data_root), ("cache_dir", args.cache_dir)):
        if value is not None:
            data[key] = value
    model = build_model(build(ModelConfig, meta["model"]), compressed.input_shape,
                        meta["num_classes"])
    model.load_state_dict(compressed.decode())
    return model, build(DataConfig, data)


@torch.no_grad()
def accuracy(model: torch.nn.Module, dataset, batch_size: int) -> float:
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return correct / len(dataset)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ConfigError("--batch-size", f"must be >= 1, got {args.batch_size}")
        try:
            compressed = codec.load(args.file)
        except (OSError, ValueError) as err:
            raise ConfigError("", f"{args.file}: {err}") from None
        model, data_cfg = model_and_data(compressed, args)
        _, test_set, _ = load_datasets(data_cfg, progress=True)
    except ConfigError as err:
        print(f"launch.evaluate_dcz: error: {err}", file=sys.stderr)
        return 2
    file_bytes = Path(args.file).stat().st_size
    dense = 4 * sum(p.numel() for p in model.parameters())
    acc = accuracy(model, test_set, args.batch_size)
    print(json.dumps({"file": args.file, "model": compressed.model_name,
                      "file_bytes": file_bytes, "dense_fp32_bytes": dense,
                      "ratio": dense / file_bytes, "test_accuracy": acc,
                      "test_error": round(1 - acc, 6), "test_examples": len(test_set)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
