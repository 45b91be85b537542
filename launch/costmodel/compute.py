"""Compute time of a training step: FLOPs per layer, and what 2:4 sparse tensor cores save.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` run on the real network built on
the meta device, so counting a 29M-parameter model allocates nothing. The counter sees GEMMs
and convolutions only; elementwise and normalisation layers are memory-bound and left out.

A layer's backward is two GEMMs of its forward's size: the input gradient (dgrad), absent
for the first layer, and the weight gradient (wgrad). With a 2:4-sparse weight, sparse
tensor cores run the forward and dgrad GEMMs (the weight is an operand) at the sparse rate;
wgrad multiplies two dense tensors and stays dense. The theoretical saving is therefore 2x on
two GEMMs of three. The realistic factor is not measured by this project: for large GEMMs it
is torchao's published figure (below), for small ones an assumption; issue 19's GPU run is
where it gets measured.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sparse_train.masks import nm_skip_reason

from .hardware import Accelerator

GEMM_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Smallest multiple (rows, cols) of the sparse operand that torch's 2:4 kernels accept:
# torch/sparse/semi_structured.py (torch 2.13), SparseSemiStructuredTensorCUTLASS.
# _DTYPE_SHAPE_CONSTRAINTS, fields sparse_min_rows and sparse_min_cols; cuSPARSELt accepts a
# superset (16, 16) for fp16/bf16. fp8 runs on cuSPARSELt only: (32, 32).
SPARSE_MIN_SHAPE = {"fp16": (32, 64), "bf16": (32, 64), "tf32": (32, 32), "fp32": (32, 32),
                    "int8": (16, 128), "fp8": (32, 32)}

# Measured fwd+bwd speedup of 2:4-sparse Linear layers over dense when every GEMM dimension
# is large: 1.24x and 1.27x on ViT-L MLP shapes (13008 x 1024 x 4096, fp16, A100), torchao
# sparsity/training README (2024). Below that size the compression and metadata overheads
# dominate and sparse kernels lose (pytorch/pytorch#111339: no speedup for a 4096 x 4096
# weight at batch 1); 0.9 is an assumption in that direction.
REALISTIC_LARGE, REALISTIC_SMALL, LARGE_GEMM_DIM = 1.25, 0.9, 1024


@dataclass(frozen=True)
class LayerFlops:
    """One Linear or convolution: its forward GEMM (rows x out x k) and measured FLOPs."""

    name: str  # the weight's parameter name, e.g. "fc1.weight"
    weight_shape: tuple[int, ...]
    groups: int
    forward: float
    backward: float

    @property
    def out(self) -> int:
        return self.weight_shape[0]

    @property
    def k(self) -> int:
        return math.prod(self.weight_shape[1:])

    @property
    def rows(self) -> int:
        """M of the forward GEMM: batch x output positions."""
        return round(self.forward / (2 * self.out * self.k * self.groups)) if self.forward else 0

    @property
    def wgrad(self) -> float:
        return min(self.forward, self.backward)

    @property
    def dgrad(self) -> float:
        return self.backward - self.wgrad


@dataclass(frozen=True)
class ModelFlops:
    layers: tuple[LayerFlops, ...]
    forward: float  # the whole model's, layers and any other counted op
    backward: float


def count_flops(model: nn.Module, input_shape: tuple[int, ...], batch_size: int) -> ModelFlops:
    """FLOPs of one forward and backward of ``model`` on a batch, per GEMM layer.

    Pass a model on the meta device (nothing is computed) or one whose state may change:
    the forward runs in training mode.
    """
    device = next(model.parameters()).device
    x = torch.zeros(batch_size, *input_shape, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(x)
        forward = _by_module(counter)
        out.float().sum().backward()
        total = _by_module(counter)
    model.zero_grad(set_to_none=True)
    prefix = type(model).__name__
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, GEMM_LAYERS) and name:
            key = f"{prefix}.{name}"
            fwd = forward.get(key, 0.0)
            layers.append(LayerFlops(f"{name}.weight", tuple(module.weight.shape),
                                     getattr(module, "groups", 1), fwd, total.get(key, 0.0) - fwd))
    return ModelFlops(tuple(layers), forward.get("Global", 0.0),
                      total.get("Global", 0.0) - forward.get("Global", 0.0))


def _by_module(counter: FlopCounterMode) -> dict[str, float]:
    return {name: float(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}


def sparse_skip_reason(layer: LayerFlops, dtype: str) -> str | None:
    """Why 2:4 sparse tensor cores cannot run ``layer``'s weight GEMMs in ``dtype``, or None."""
    if layer.groups != 1:
        return f"grouped convolution (groups = {layer.groups})"
    reason = nm_skip_reason(layer.weight_shape, 4)
    if reason is not None:
        return reason
    min_rows, min_cols = SPARSE_MIN_SHAPE[dtype]
    if layer.out % min_rows or layer.k % min_cols:
        return (f"weight matrix {layer.out} x {layer.k} is not a multiple of "
                f"({min_rows}, {min_cols}) for {dtype}")
    return None


def realistic_factor(layer: LayerFlops, configured: float | None = None) -> float:
    """Speedup of the layer's training GEMMs on sparse kernels, as measured (see above)."""
    if configured is not None:
        return configured
    large = min(layer.rows, layer.out, layer.k) >= LARGE_GEMM_DIM
    return REALISTIC_LARGE if large else REALISTIC_SMALL


@dataclass(frozen=True)
class ComputeTimes:
    """Seconds of one step's counted FLOPs: dense, and with 2:4 weights where they apply."""

    forward: float
    backward: float
    sparse_theoretical: float
    sparse_realistic: float
    sparse_flops_fraction: float  # of the step's FLOPs in layers that run sparse

    @property
    def dense(self) -> float:
        return self.forward + self.backward


def compute_times(flops: ModelFlops, accelerator: Accelerator, dtype: str, efficiency: float,
                  sparse_layers: set[str] | None = None,
                  realistic: float | None = None) -> ComputeTimes:
    """Times at ``efficiency`` x peak; ``sparse_layers`` (weight names) run 2:4 where the
    kernels accept them (None: every layer that qualifies, the hypothetical 2:4 model)."""
    peak, sparse_peak = accelerator.flops(dtype), accelerator.flops(dtype, sparse=True)
    assert peak is not None, f"no dense {dtype} rate"
    total = flops.forward + flops.backward
    theoretical = realistic_total = sparse_flops = 0.0
    for layer in flops.layers:
        chosen = sparse_layers is None or layer.name in sparse_layers
        if sparse_peak is None or not chosen or sparse_skip_reason(layer, dtype) is not None:
            continue
        layer_flops = layer.forward + layer.backward
        sparse_flops += layer_flops
        theoretical += (layer.forward + layer.dgrad) * peak / sparse_peak + layer.wgrad
        realistic_total += layer_flops / realistic_factor(layer, realistic)
    rate = peak * efficiency
    forward, backward = flops.forward / rate, flops.backward / rate
    if not sparse_flops:
        return ComputeTimes(forward, backward, forward + backward, forward + backward, 0.0)
    rest = total - sparse_flops
    return ComputeTimes(forward, backward, (rest + theoretical) / rate,
                        (rest + realistic_total) / rate, sparse_flops / total)
