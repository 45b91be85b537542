"""In-training weight sparsity for plain or DDP models, exported for sparse kernels.

    sparsifier = sparse_train.attach(model, optimizer, method="gmp", target=0.9)
    ...train as usual...
    sparsifier.report()                       # density, N:M compliance, bytes per format
    sparse_train.export(sparsifier, format="csr")

Methods: ``magnitude`` (one-shot), ``gmp`` (gradual, Zhu & Gupta), ``dns`` (dynamic
network surgery), ``iht`` (iterative hard thresholding), ``dsd`` (dense-sparse-dense),
``nm`` (N:M structured, 2:4 by default), ``block``, ``bank`` (bank-balanced), ``nonzero``
(keep a sparse model's zeros) and the channel-removing ``channel`` (filter norms),
``slimming`` (BatchNorm scales under an L1 penalty) and ``group_lasso`` (structured
sparsity learning). Options: :class:`SparsityOptions`. After channel removal,

    small = sparse_train.shrink(model, sparsifier)  # a smaller dense model, same outputs

and ``sparse_train.regularizers`` has the penalty terms for any training loop.

After training, the rest of Deep Compression (Han, Mao & Dally 2016):
``sparse_train.quantize.share_weights`` (trained weight sharing: a k-means codebook per
layer, fine-tuned through the optimizer) and ``sparse_train.codec`` (relative indices and
codebook indices, Huffman-coded, in a file that decodes to the exact weights, with a
storage report per stage and layer).

For a gradient-compression hook, ``Sparsifier.fixed_masks()`` gives the masks by
parameter name when they are settled and identical on every rank, else None, and
``Sparsifier.grad_mask_policy`` says whether gradients at masked positions must be
kept (``"keep"``: DNS while it revises masks) or may be dropped (``"drop"``). See
``sparse_train.sparsifier`` for how masks are applied around optimizer steps.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sparse_comm.schema import build

from . import regularizers
from .export import export
from .formats import NMCompressed, compress_nm, storage_bytes
from .options import SparsityOptions
from .quantize import WeightSharing, share_weights
from .shrink import shrink
from .sparsifier import Sparsifier


def attach(model: nn.Module, optimizer: torch.optim.Optimizer,
           options: SparsityOptions | Mapping[str, Any] | None = None,
           **fields: Any) -> Sparsifier:
    """Sparsify ``model`` (plain, DDP-wrapped or compiled) as ``optimizer`` steps.

    ``optimizer`` may be Accelerate's ``AcceleratedOptimizer`` or Lightning's
    ``LightningOptimizer``: the masks follow the torch optimizer inside. Under Lightning use
    ``sparse_train.lightning.SparsityCallback``, which also checkpoints the masks.

    Options come from ``options`` (a SparsityOptions or a mapping, e.g. the launcher's
    ``sparsity:`` section) overridden by keyword ``fields``; mistakes raise
    ``sparse_comm.schema.ConfigError`` naming the key. The first masks are applied at once.
    """
    if not (options is None or isinstance(options, (SparsityOptions, Mapping))):
        raise TypeError(f"sparse_train.attach: options must be a SparsityOptions or a mapping, "
                        f"got {type(options).__name__} (pass method=... as a keyword)")
    merged = dataclasses.asdict(options) if dataclasses.is_dataclass(options) \
        else dict(options or {})
    merged.update(fields)
    return Sparsifier(model, optimizer, build(SparsityOptions, merged))


__all__ = ["attach", "export", "shrink", "regularizers", "storage_bytes", "compress_nm",
           "NMCompressed", "Sparsifier", "SparsityOptions", "WeightSharing", "share_weights"]
