"""Trained weight sharing: a k-means codebook per layer whose centroids train with the model.

    sharing = sparse_train.quantize.share_weights(model, bits=5, per_layer_bits={"conv*": 8},
                                                  masks=sparsifier.masks)
    sharing.attach(optimizer)      # from here on each optimizer step trains the centroids
    ...fine-tune as usual...
    sparse_train.codec.encode(model, sharing=sharing).save("model.dcz")

This is the second stage of Deep Compression (Han, Mao & Dally 2016, section 3). Each
selected layer's live (unpruned) weights are clustered by 1-D k-means into ``2 ** bits``
centroids, initialised linearly between the smallest and largest weight (the paper's
best), by density (evenly spaced quantiles) or at random live weights (Forgy). Every
live weight then holds its centroid; pruned weights hold zero.

How the centroids train. In the paper a centroid's gradient is the sum of the gradients
of the weights that share it (its eq. 3), applied as ``C_k <- C_k - lr * grad``. Two
ways give that in torch: make the codebook the parameter and build the weight from it in
the forward (a parametrization), or keep the weights as parameters and tie them around
the optimizer step. This module does the second. A step pre-hook replaces every live
weight's gradient by its cluster's summed gradient (and zeroes pruned ones); a post-hook
sets each centroid to the mean of its cluster's weights and writes the centroids back.
With an elementwise optimizer (SGD with momentum and weight decay, Adam, AdamW) whose
state for these weights starts fresh, which ``attach`` ensures, all weights of a cluster
see the same value, gradient and state, so they move together exactly as the centroid
would under that optimizer with the paper's gradient, and the mean (taken in float64,
exact for equal values) is that common value. Any other optimizer gets the nearest tied
weights instead. Why not a parametrization: it renames ``weight`` (breaking the plain
model's state_dict and checkpoints), and DDP and the optimizer hold the old parameters;
here the model, DDP and the user's optimizer stay as they are, for one scatter-add and
one gather per shared layer per step. The learning rate applies to summed gradients, so
a centroid of n weights moves about n times as far as one weight would: fine-tuning
wants a learning rate well below training's.

Under DDP the hooks see gradients DDP has already averaged, and k-means is a
deterministic function of the weights, which DDP keeps identical; random initialisation
draws from a generator seeded by a hash of (seed, layer name) (``sparse_comm.draws``).
So every rank holds the same codebooks and assignments at every step without
communicating.
"""
from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sparse_comm import draws
from sparse_comm.schema import ConfigError, require

from .sparsifier import select_weights, unwrap

log = logging.getLogger(__name__)

Init = Literal["linear", "density", "random"]
INITS: tuple[str, ...] = Init.__args__
MAX_BITS = 16  # the codec's Huffman tables take alphabets of at most 2 ** 16 symbols


def check_bits(bits: Any, key: str) -> None:
    """ConfigError naming ``key`` unless ``bits`` is an int in [1, MAX_BITS]."""
    require(isinstance(bits, int) and not isinstance(bits, bool) and 1 <= bits <= MAX_BITS,
            key, f"must be an int in [1, {MAX_BITS}], got {bits!r}")


def codebook_problem(name: str, live: int, bits: int) -> str | None:
    """Why a ``bits``-bit codebook cannot serve layer ``name`` with ``live`` live weights."""
    if 2 ** bits > live:
        return (f"{name} has {live} live weights, fewer than the {2 ** bits} centroids of "
                f"a {bits}-bit codebook")
    return None


def init_centroids(values: Tensor, k: int, init: Init, generator: torch.Generator) -> Tensor:
    """``k`` starting centroids (sorted) for the 1-D ``values`` (float64)."""
    if init == "linear":
        return torch.linspace(float(values.min()), float(values.max()), k, dtype=values.dtype)
    if init == "density":  # where evenly spaced levels of the CDF meet it
        ordered = values.sort().values
        levels = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        return ordered[(levels * len(ordered)).long().clamp(max=len(ordered) - 1)]
    chosen = torch.randperm(len(values), generator=generator)[:k]
    return values[chosen].sort().values


def kmeans_1d(values: Tensor, centroids: Tensor, max_iter: int = 100) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on the 1-D ``values`` from ``centroids``: (centroids, cluster of each
    value). Stops when no value changes cluster; an empty cluster keeps its centroid."""
    k = len(centroids)
    clusters = None
    for _ in range(max_iter):
        centroids = centroids.sort().values
        # In 1-D the nearest centroid is found by bisecting the midpoints.
        nearest = torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)
        if clusters is not None and torch.equal(nearest, clusters):
            break
        clusters = nearest
        sums = torch.zeros(k, dtype=values.dtype).index_add_(0, clusters, values)
        counts = torch.bincount(clusters, minlength=k)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids, clusters


class WeightSharing:
    """Codebooks and assignments of the shared layers of a model; see the module docstring.

    Build it with :func:`share_weights`. ``codebooks[name]`` holds the ``2 ** bits[name]``
    centroids of parameter ``name``; ``assignments[name]`` (int32, shaped like the
    weight) the centroid of each weight, -1 where it is pruned.
    """

    def __init__(self, params: dict[str, nn.Parameter], bits: dict[str, int],
                 codebooks: dict[str, Tensor], assignments: dict[str, Tensor], init: Init):
        self.params, self.bits, self.init = params, bits, init
        self.codebooks: dict[str, Tensor] = {}
        self._positions: dict[str, Tensor] = {}  # flat indices of the live weights
        self._clusters: dict[str, Tensor] = {}  # their centroids, in the same order
        self._counts: dict[str, Tensor] = {}
        for name in params:
            self._set(name, codebooks[name], assignments[name])
        self._hooks: list = []

    def _set(self, name: str, codebook: Tensor, assignment: Tensor) -> None:
        p = self.params[name]
        flat = assignment.reshape(-1).to(device=p.device, dtype=torch.int64)
        positions = torch.nonzero(flat >= 0).flatten()
        self._positions[name], self._clusters[name] = positions, flat[positions]
        self._counts[name] = torch.bincount(flat[positions], minlength=len(codebook))
        self.codebooks[name] = codebook.to(device=p.device, dtype=p.dtype).clone()
        self.write_(name)

    @property
    def assignments(self) -> dict[str, Tensor]:
        out = {}
        for name, p in self.params.items():
            flat = torch.full((p.numel(),), -1, dtype=torch.int32, device=p.device)
            flat[self._positions[name]] = self._clusters[name].to(torch.int32)
            out[name] = flat.view(p.shape)
        return out

    @property
    def masks(self) -> dict[str, Tensor]:
        """Which weights are live, by parameter name."""
        return {name: a >= 0 for name, a in self.assignments.items()}

    @torch.no_grad()
    def write_(self, name: str | None = None) -> None:
        """Set the weights from the codebooks (all layers, or ``name``); pruned ones to 0."""
        for n in [name] if name is not None else list(self.params):
            p = self.params[n]
            flat = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            flat[self._positions[n]] = self.codebooks[n][self._clusters[n]]
            p.copy_(flat.view(p.shape))

    # --- training -------------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> WeightSharing:
        """Train the centroids through ``optimizer``'s steps. The optimizer's state for the
        shared weights is dropped: a centroid is a new variable, and tied weights need one
        state per cluster (a momentum buffer left from training differs weight to weight)."""
        shared = set(map(id, self.params.values()))
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in shared:
                    optimizer.state.pop(p, None)
        self._hooks += [optimizer.register_step_pre_hook(self._before_step),
                        optimizer.register_step_post_hook(self._after_step)]
        return self

    def detach(self) -> None:
        """Stop tying the weights; they keep their current (shared) values."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        for name, p in self.params.items():
            if p.grad is None:
                continue
            positions, clusters = self._positions[name], self._clusters[name]
            per_centroid = torch.zeros(len(self.codebooks[name]), dtype=p.grad.dtype,
                                       device=p.grad.device)
            per_centroid.index_add_(0, clusters, p.grad.reshape(-1)[positions])
            tied = torch.zeros(p.numel(), dtype=p.grad.dtype, device=p.grad.device)
            tied[positions] = per_centroid[clusters]
            p.grad.copy_(tied.view(p.grad.shape))

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        for name, p in self.params.items():
            live = p.detach().reshape(-1)[self._positions[name]].double()
            sums = torch.zeros(len(self.codebooks[name]), dtype=torch.float64, device=p.device)
            sums.index_add_(0, self._clusters[name], live)
            counts = self._counts[name]
            mean = (sums / counts.clamp(min=1)).to(p.dtype)
            self.codebooks[name] = torch.where(counts > 0, mean, self.codebooks[name])
            self.write_(name)

    # --- read-outs and checkpoints --------------------------------------------------------

    def report(self) -> dict[str, dict[str, Any]]:
        """Per layer: bits, live weights, centroids holding any weight (with linear
        initialisation those near zero may hold none once pruning has emptied that
        range), and the paper's weight-sharing compression rate
        r = n b / (n log2 k + k b) over the live weights, with b = 32."""
        out = {}
        for name, p in self.params.items():
            n, k, b = len(self._positions[name]), len(self.codebooks[name]), 32
            out[name] = {"bits": self.bits[name], "centroids": k, "live": n,
                         "numel": p.numel(),
                         "used_centroids": int((self._counts[name] > 0).sum()),
                         "rate": n * b / (n * math.log2(k) + k * b) if n else None}
        return out

    def state_dict(self) -> dict[str, Any]:
        assignments = self.assignments
        return {"init": self.init,
                "layers": {name: {"bits": self.bits[name],
                                  "codebook": self.codebooks[name].clone(),
                                  "assignment": assignments[name].clone()}
                           for name in self.params}}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        layers = state["layers"]
        if set(layers) != set(self.params):
            raise ValueError(f"state is for layers {sorted(layers)}, this sharing has "
                             f"{sorted(self.params)}")
        for name, layer in layers.items():
            if tuple(layer["assignment"].shape) != tuple(self.params[name].shape):
                raise ValueError(f"{name}: assignment shaped {tuple(layer['assignment'].shape)}"
                                 f", weight {tuple(self.params[name].shape)}")
        self.init = state["init"]
        for name, layer in layers.items():
            self.bits[name] = layer["bits"]
            self._set(name, layer["codebook"], layer["assignment"])


def resolve_bits(names, bits: int, per_layer_bits: Mapping[str, int] | None
                 ) -> dict[str, tuple[int, str]]:
    """Bits of each layer and the option that set them: its exact name in
    ``per_layer_bits``, else the first glob pattern there that matches it, else ``bits``.
    ConfigError for a bad value or a key that matches no layer."""
    check_bits(bits, "bits")
    per_layer = dict(per_layer_bits or {})
    for key, value in per_layer.items():
        check_bits(value, f"per_layer_bits.{key}")
        if not any(key == name or fnmatch.fnmatchcase(name, key) for name in names):
            raise ConfigError(f"per_layer_bits.{key}", f"matches no shared layer "
                              f"(have: {', '.join(names)})")
    out = {}
    for name in names:
        keys = [key for key in per_layer if key == name] or \
               [key for key in per_layer if fnmatch.fnmatchcase(name, key)]
        out[name] = (per_layer[keys[0]], f"per_layer_bits.{keys[0]}") if keys else (bits, "bits")
    return out


@torch.no_grad()
def share_weights(model: nn.Module, bits: int = 5,
                  per_layer_bits: Mapping[str, int] | None = None, init: Init = "linear", *,
                  masks: Mapping[str, Tensor] | None = None, seed: int = 0,
                  max_iter: int = 100,
                  optimizer: torch.optim.Optimizer | None = None) -> WeightSharing:
    """Cluster each layer's live weights into a ``2 ** bits`` codebook and tie them to it.

    Layers are the keys of ``masks`` (True = live; e.g. a Sparsifier's ``masks``), or the
    weights of every Linear and Conv layer of ``model`` (plain or DDP) with their nonzeros
    live. ``per_layer_bits`` maps parameter names or glob patterns to bits (``bits``
    elsewhere). ``max_iter`` caps Lloyd iterations per layer. With ``optimizer``, the
    sharing is attached to it at once (see :meth:`WeightSharing.attach`).

    Raises ConfigError for bits outside [1, 16], an unknown init or layer, or a codebook
    larger than a layer's live weights.
    """
    require(init in INITS, "init", f"must be one of {', '.join(INITS)}, got {init!r}")
    require(max_iter >= 1, "max_iter", f"must be >= 1, got {max_iter}")
    module = unwrap(model)
    if masks is None:
        params = select_weights(module, [])
        masks = {name: p != 0 for name, p in params.items()}
    else:
        named = dict(module.named_parameters())
        unknown = [name for name in masks if name not in named]
        if unknown:
            raise ConfigError("masks", f"no parameter named {', '.join(unknown)}")
        params = {name: named[name] for name in masks}
        for name, mask in masks.items():
            if mask.numel() != params[name].numel():
                raise ConfigError(f"masks.{name}", f"shape {tuple(mask.shape)} does not fit "
                                                   f"the parameter's {tuple(params[name].shape)}")
    if not params:
        raise ConfigError("masks", "no layer to share weights in")
    layer_bits = resolve_bits(list(params), bits, per_layer_bits)
    codebooks, assignments = {}, {}
    for name, p in params.items():
        mask = masks[name].to(device=p.device, dtype=torch.bool).reshape(p.shape)
        live_values = p.detach()[mask].double()
        b, key = layer_bits[name]
        problem = codebook_problem(name, len(live_values), b)
        if problem:
            raise ConfigError(key, problem)
        # The same draws on every rank, whatever other layers drew (no shared stream).
        generator = torch.Generator().manual_seed(draws.integer(seed, "kmeans-init", name))
        start = init_centroids(live_values.cpu(), 2 ** b, init, generator)
        centroids, clusters = kmeans_1d(live_values.cpu(), start, max_iter)
        assignment = torch.full(p.shape, -1, dtype=torch.int32)
        assignment[mask.cpu()] = clusters.to(torch.int32)
        codebooks[name], assignments[name] = centroids.to(p.dtype), assignment
        log.info("sparse_train: %s shares %d live weights among %d centroids (%s init)",
                 name, len(live_values), 2 ** b, init)
    sharing = WeightSharing(params, {name: b for name, (b, _) in layer_bits.items()},
                            codebooks, assignments, init)
    if optimizer is not None:
        sharing.attach(optimizer)
    return sharing
