"""Deep Compression after training: share weights, fine-tune the centroids, encode, report.

With a ``quantize:`` section, ``launch.train`` calls :func:`compress` once its training
loop has ended; that training (with any ``sparsity:`` method) is the pruning stage. Then,
as in Han, Mao & Dally (2016):

1. pruned: the trained model is evaluated as it is;
2. shared: each pruned layer's live weights are clustered into a codebook
   (``sparse_train.quantize``; ``bits.conv`` bits for convolutions, ``bits.fc`` for the
   rest) and the model evaluated with every weight at its centroid;
3. fine-tuned: ``epochs`` epochs more with the same optimizer, learning rate ``lr``
   (cosine decay to 0), training the centroids;
4. encoded: ``sparse_train.codec`` encodes the model; every rank decodes the bytes into
   a fresh model, which is evaluated, and rank 0 writes ``OUT_DIR/model.dcz`` and
   ``OUT_DIR/storage_report.md``.

Each stage's test accuracy, bytes and ratio to the dense fp32 size are logged
(``dc/<stage>/...``), the storage report goes to wandb as a table, and all of it into
the run's summary. Every rank runs every stage: k-means and the codec are deterministic,
so ranks agree without exchanging anything but DDP's gradients.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from launch.models import build_model
from sparse_comm.schema import ConfigError, require, to_dict
from sparse_train import codec
from sparse_train.quantize import INITS, check_bits, codebook_problem, share_weights
from sparse_train.sparsifier import select_weights, unwrap

log = logging.getLogger(__name__)

LayerType = Literal["conv", "fc"]


@dataclasses.dataclass
class LayerTypeBits:
    """A width per layer type: ``conv`` for weights of more than 2 dims, ``fc`` for the rest.
    The defaults are the paper's (AlexNet, VGG-16): 8 bits for conv layers, 5 for fc."""

    conv: int = 8
    fc: int = 5

    def check(self) -> None:
        check_bits(self.conv, "conv")
        check_bits(self.fc, "fc")


@dataclasses.dataclass
class QuantizeConfig:
    bits: LayerTypeBits = dataclasses.field(default_factory=LayerTypeBits)  # codebook: 2**bits
    index_bits: LayerTypeBits = dataclasses.field(default_factory=LayerTypeBits)
    init: Literal["linear", "density", "random"] = "linear"  # the paper found linear best
    kmeans_iters: int = 100
    epochs: int = 1  # fine-tuning epochs after sharing; 0 skips fine-tuning
    max_steps: int | None = None  # a cap on fine-tuning steps, for quick runs
    # Gradients of centroids are sums over their weights (the paper's eq. 3), so this is
    # far below a training learning rate.
    lr: float = 1e-4
    codebook_dtype: Literal["float32", "float16"] = "float32"

    def check(self) -> None:
        require(self.init in INITS, "init", f"must be one of {', '.join(INITS)}")
        require(self.kmeans_iters >= 1, "kmeans_iters", f"must be >= 1, got {self.kmeans_iters}")
        require(self.epochs >= 0, "epochs", f"must be >= 0, got {self.epochs}")
        require(self.max_steps is None or self.max_steps >= 1, "max_steps",
                f"must be >= 1 or null, got {self.max_steps}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")


def layer_type(weight: torch.Tensor) -> LayerType:
    return "conv" if weight.dim() > 2 else "fc"


def live_masks(model: nn.Module, sparsifier) -> dict[str, torch.Tensor]:
    """The pruned layers and which of their weights live: the sparsifier's, or every Linear
    and Conv weight's nonzeros when training ran without one."""
    if sparsifier is not None:
        return {name: mask.clone() for name, mask in sparsifier.masks.items()}
    return {name: p.detach() != 0 for name, p in select_weights(unwrap(model), []).items()}


def checked_bits(q: QuantizeConfig, model: nn.Module, masks) -> dict[str, int]:
    """Codebook bits per pruned layer by its type; ConfigError naming ``quantize.bits.<type>``
    when a codebook would be larger than the layer's live weights."""
    params = dict(unwrap(model).named_parameters())
    bits = {}
    for name, mask in masks.items():
        kind = layer_type(params[name])
        bits[name] = getattr(q.bits, kind)
        problem = codebook_problem(name, int(mask.sum()), bits[name])
        if problem:
            raise ConfigError(f"quantize.bits.{kind}", problem)
    return bits


def compress(cfg, ddp: nn.Module, optimizer: torch.optim.Optimizer, plugins: dict,
             train_loader, sampler, evaluate: Callable[[nn.Module], tuple[float, float]],
             writer, input_shape: tuple[int, ...], num_classes: int) -> dict:
    """Run the Deep Compression stages on the trained ``ddp`` model; returns summary keys.

    ``evaluate(model)`` gives (test accuracy, test loss) over the whole test set (all
    ranks call it); ``writer`` is the run's RunWriter (records on rank 0 only).
    """
    q: QuantizeConfig = cfg.quantize
    model = unwrap(ddp)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    sparsifier = plugins.get("sparsity")
    masks = live_masks(model, sparsifier)
    bits = checked_bits(q, model, masks)
    if sparsifier is not None:
        sparsifier.detach()  # the masks are fixed from here on; the sharing keeps them
    accuracy = {"pruned": evaluate(ddp)[0]}

    sharing = share_weights(model, per_layer_bits=bits, init=q.init, masks=masks,
                            seed=cfg.train.seed, max_iter=q.kmeans_iters)
    accuracy["shared"] = evaluate(ddp)[0]
    sharing.attach(optimizer)
    _fine_tune(cfg, ddp, optimizer, train_loader, sampler, evaluate, writer)
    sharing.detach()
    accuracy["finetuned"] = evaluate(ddp)[0]

    index_bits = {name: getattr(q.index_bits, layer_type(p))
                  for name, p in model.named_parameters() if name in masks}
    compressed = codec.encode(
        model, sharing=sharing, index_bits=index_bits, codebook_dtype=q.codebook_dtype,
        model_name=cfg.model.name, input_shape=input_shape,
        meta={"model": to_dict(cfg.model), "data": to_dict(cfg.data),
              "num_classes": num_classes, "run_name": cfg.run_name})
    data = compressed.to_bytes()
    decoded = build_model(cfg.model, input_shape, num_classes)
    decoded.load_state_dict(codec.CompressedModel.from_bytes(data).decode())
    accuracy["decoded"] = evaluate(decoded.to(next(model.parameters()).device))[0]

    report = compressed.storage_report()
    sizes = {"pruned": report.total("pruned"), "shared": report.total("shared"),
             "finetuned": report.total("shared"), "decoded": len(data)}
    dense = report.total("dense")
    summary = {"dc/dense_bytes": dense, "dc/file_bytes": len(data),
               "dc/ratio": dense / len(data), "dc/decoded_accuracy": accuracy["decoded"]}
    for stage, acc in accuracy.items():
        row = {f"dc/{stage}/accuracy": acc, f"dc/{stage}/bytes": sizes[stage],
               f"dc/{stage}/ratio": dense / sizes[stage]}
        writer.record(row)
        summary.update(row)
    if rank0:
        out_dir = Path(cfg.out_dir)
        compressed.save(out_dir / "model.dcz")
        (out_dir / "storage_report.md").write_text(
            stage_table(accuracy, sizes, dense) + "\n" + report.markdown())
        writer.tracker.log_table("dc/storage_report", *report.rows())
        writer.tracker.log(report.metrics("dc/storage/"))
        log.info("deep compression: %d bytes (%.1fx smaller than dense fp32), decoded "
                 "test accuracy %.4f; report in %s", len(data), dense / len(data),
                 accuracy["decoded"], out_dir / "storage_report.md")
    return summary


def stage_table(accuracy: dict[str, float], sizes: dict[str, int], dense: int) -> str:
    lines = ["| stage | test accuracy (%) | bytes | vs dense fp32 |", "|---|---|---|---|"]
    for stage, acc in accuracy.items():
        lines.append(f"| {stage} | {100 * acc:.2f} | {sizes[stage]} | "
                     f"{dense / sizes[stage]:.1f}x |")
    return "\n".join(lines) + "\n"


def _fine_tune(cfg, ddp, optimizer, loader, sampler, evaluate, writer) -> None:
    """``quantize.epochs`` epochs of the training step at a cosine-decayed ``quantize.lr``."""
    q = cfg.quantize
    total = q.epochs * len(loader)
    if q.max_steps is not None:
        total = min(total, q.max_steps)
    step = 0
    for epoch in range(q.epochs):
        if step >= total:
            break
        sampler.set_epoch(cfg.train.epochs + epoch)  # orders not seen in training
        for x, y in loader:
            for group in optimizer.param_groups:
                group["lr"] = q.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            device = next(ddp.parameters()).device
            loss = F.cross_entropy(ddp(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step >= total:
                break
        acc, test_loss = evaluate(ddp)
        writer.record({"dc/finetune/epoch": epoch + 1, "dc/finetune/accuracy": acc,
                       "dc/finetune/test_loss": test_loss, "dc/finetune/steps": step})
        log.info("deep compression: fine-tuning epoch %d, test accuracy %.4f", epoch + 1, acc)
