"""Hardware presets: links, accelerators and clusters read from ``configs/hardware/*.yaml``.

``links.yaml`` and ``accelerators.yaml`` define named parts, each constant with its source in
a comment; every other file there is a cluster preset that names (or defines inline) its
accelerator and its intra- and inter-node links. ``HardwareConfig`` is the run config's
``hardware:`` section: which preset to estimate for, and the knobs of the estimate.
Mistakes raise ``sparse_comm.schema.ConfigError`` naming the key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from sparse_comm.schema import ConfigError, build, require

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "hardware"
PARTS_FILES = ("links.yaml", "accelerators.yaml")
DEFAULT_PRESET = "dgx-a100-hdr"

Dtype = Literal["fp32", "tf32", "bf16", "fp16", "fp8", "int8"]


@dataclass
class Link:
    """One link: bandwidth each way in GB/s (10^9 B/s) and latency per hop in microseconds."""

    bandwidth_gbytes: float = 0.0
    latency_us: float = 0.0
    burst_kbytes: float = 0.0
    """Bytes (10^3) a token-bucket shaper lets a rank send at once after an idle spell
    (``tc qdisc ... tbf burst``): the emulated links of benchmarks/linkbench.py have one,
    a wire has none (0)."""
    overhead_us: float = 0.0
    """Microseconds each collective costs whatever its size and the number of ranks: starting
    it and waking its caller when it completes (LogP's o). 0 on the real links, whose
    latency is taken as the whole fixed cost; on the emulated links it is Gloo's threads
    waking up (fitted by ``benchmarks/linkbench.py --calibrate``)."""
    swap_us: float = 0.0
    """Microseconds a pairwise swap of a small message costs, start to finish (both ranks
    send at once, as gtopk's rounds do). 0: a swap costs what one hop of a collective does,
    ``overhead_us`` plus ``latency_us``. Fitted on the emulated links by
    ``benchmarks/linkbench.py --calibrate-swaps``."""
    swap_slowdown: float = 1.0
    """How many times longer a swap's bytes past the bucket take than their time at the
    rate: 1 on a full-duplex wire, 1.6 and 2.0 on the emulated links (where both directions
    share each rank's shaper with its acknowledgements). Fitted with ``swap_us``, used
    only with it."""

    def check(self) -> None:
        require(self.bandwidth_gbytes > 0, "bandwidth_gbytes",
                f"must be > 0, got {self.bandwidth_gbytes}")
        require(self.latency_us >= 0, "latency_us", f"must be >= 0, got {self.latency_us}")
        require(self.burst_kbytes >= 0, "burst_kbytes", f"must be >= 0, got {self.burst_kbytes}")
        require(self.overhead_us >= 0, "overhead_us", f"must be >= 0, got {self.overhead_us}")
        require(self.swap_us >= 0, "swap_us", f"must be >= 0, got {self.swap_us}")
        require(self.swap_slowdown >= 1, "swap_slowdown",
                f"must be >= 1, got {self.swap_slowdown}")

    @property
    def bandwidth(self) -> float:
        """Bytes per second."""
        return self.bandwidth_gbytes * 1e9

    @property
    def latency(self) -> float:
        """Seconds per hop."""
        return self.latency_us * 1e-6

    @property
    def overhead(self) -> float:
        """Seconds per collective."""
        return self.overhead_us * 1e-6

    @property
    def burst(self) -> float:
        """Bytes."""
        return self.burst_kbytes * 1e3

    @property
    def swap(self) -> tuple[float, float, float]:
        """(seconds, overhead in seconds, slowdown) of a pairwise swap: its own calibration
        where the link has one, else one hop, a collective's overhead and no slowdown."""
        if self.swap_us:
            return self.swap_us * 1e-6, 0.0, self.swap_slowdown
        return self.latency, self.overhead, 1.0


@dataclass
class Rates:
    """Peak TFLOPS (TOPS for int8) per dtype; None where the accelerator has no such path."""

    fp32: float | None = None
    tf32: float | None = None
    bf16: float | None = None
    fp16: float | None = None
    fp8: float | None = None
    int8: float | None = None

    def check(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            require(value is None or value > 0, f.name, f"must be > 0 or absent, got {value}")


@dataclass
class Accelerator:
    default_dtype: Dtype = "bf16"
    memory_bandwidth_gbytes: float = 0.0
    dense_tflops: Rates = field(default_factory=Rates)
    sparse_tflops: Rates = field(default_factory=Rates)  # 2:4 structured sparsity

    def check(self) -> None:
        require(self.memory_bandwidth_gbytes > 0, "memory_bandwidth_gbytes",
                f"must be > 0, got {self.memory_bandwidth_gbytes}")
        require(getattr(self.dense_tflops, self.default_dtype) is not None, "default_dtype",
                f"{self.default_dtype!r} has no dense_tflops rate")

    def flops(self, dtype: str, sparse: bool = False) -> float | None:
        """Peak FLOP/s for ``dtype``, dense or 2:4-sparse; None if there is no such path."""
        tflops = getattr(self.sparse_tflops if sparse else self.dense_tflops, dtype)
        return None if tflops is None else tflops * 1e12

    @property
    def memory_bandwidth(self) -> float:
        return self.memory_bandwidth_gbytes * 1e9


@dataclass
class ClusterSpec:
    """A preset file. Parts are names in links.yaml / accelerators.yaml or inline mappings
    (typed Any here so that an inline part's own error names its key, see ``_part``)."""

    accelerator: Any = ""
    accelerators_per_node: int = 8
    intra_node_link: Any = ""
    inter_node_link: Any = ""
    nics_per_node: int | None = None  # default: one per accelerator
    description: str = ""

    def check(self) -> None:
        for key in ("accelerator", "intra_node_link", "inter_node_link"):
            require(getattr(self, key) != "", key, "is required")
        require(self.accelerators_per_node >= 1, "accelerators_per_node",
                f"must be >= 1, got {self.accelerators_per_node}")
        require(self.nics_per_node is None or self.nics_per_node >= 1, "nics_per_node",
                f"must be >= 1, got {self.nics_per_node}")


@dataclass(frozen=True)
class Cluster:
    """A preset with its parts resolved."""

    name: str
    accelerator: Accelerator
    per_node: int
    intra: Link
    inter: Link
    nics_per_node: int

    def nodes(self, world_size: int) -> int:
        return math.ceil(world_size / self.per_node)

    def inter_bandwidth_per_rank(self) -> float:
        """Inter-node bytes/s one rank gets when every rank of a node sends at once."""
        return self.inter.bandwidth * min(self.nics_per_node, self.per_node) / self.per_node


@dataclass
class HardwareConfig:
    """The run config's ``hardware:`` section: what to estimate the run's cost on."""

    preset: str = DEFAULT_PRESET
    """A preset name (a file in configs/hardware/) or the path of a preset YAML file."""
    world_size: int | None = None
    """Ranks to estimate for; None: the run's own world size."""
    overlap: float = 0.8
    """Fraction of the backward pass that communication can hide behind. DDP starts a
    bucket's allreduce as soon as its gradients are ready, but the last bucket's starts when
    the backward is over, so some communication is always exposed."""
    compute_dtype: Dtype | None = None
    """Dtype the GEMMs run in; None: the accelerator's default (bf16 on GPUs)."""
    compute_efficiency: float = 0.5
    """Achieved fraction of peak FLOP/s. Megatron-LM reaches 52% of an A100's bf16 peak on
    large GEMM-bound models (Narayanan et al. 2021); small layers reach far less."""
    sparse_realistic_factor: float | None = None
    """Measured speedup of a 2:4-sparse layer's training GEMMs over dense; None: by size
    (see costmodel.compute.realistic_factor)."""
    selection_passes: float = 4.0
    """Passes over a compressed gradient, at memory bandwidth, that top-k selection and
    packing cost (accumulate, threshold, gather, scatter)."""
    algorithm: Literal["auto", "ring", "tree", "hierarchical"] = "auto"
    """Collective algorithm; auto takes the fastest, as NCCL's tuner does."""
    calibrate: bool = True
    """Scale the modelled traffic of the run's scheme by measured / modelled bytes at the
    run's world size, so warm-up and implementation details count."""

    def check(self) -> None:
        require(self.world_size is None or self.world_size >= 1, "world_size",
                f"must be >= 1, got {self.world_size}")
        require(0.0 <= self.overlap <= 1.0, "overlap", f"must be in [0, 1], got {self.overlap}")
        require(0.0 < self.compute_efficiency <= 1.0, "compute_efficiency",
                f"must be in (0, 1], got {self.compute_efficiency}")
        require(self.sparse_realistic_factor is None or self.sparse_realistic_factor > 0,
                "sparse_realistic_factor", f"must be > 0, got {self.sparse_realistic_factor}")
        require(self.selection_passes >= 0, "selection_passes",
                f"must be >= 0, got {self.selection_passes}")
        accelerator = load_cluster(self.preset, key="preset").accelerator
        require(self.compute_dtype is None or accelerator.flops(self.compute_dtype) is not None,
                "compute_dtype", f"preset {self.preset!r} has no dense {self.compute_dtype} rate")


def preset_names(directory: Path = PRESET_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml") if p.name not in PARTS_FILES)


def _read(path: Path, key: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise ConfigError(key, f"cannot read {path}: {err.strerror}") from None
    except yaml.YAMLError:
        raise ConfigError(key, f"{path} is not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(key, f"{path}: the top level must be a mapping")
    return data


def _part(value, catalogue: str, cls: type, directory: Path, key: str):
    """A link or accelerator given inline, or by its name in ``catalogue``."""
    if isinstance(value, dict):
        return build(cls, value, key)
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a name or a mapping, got {value!r}")
    parts = _read(directory / catalogue, key)
    if value not in parts:
        raise ConfigError(key, f"unknown name {value!r} (known in {catalogue}: "
                               f"{', '.join(sorted(parts))})")
    return build(cls, parts[value], f"{Path(catalogue).stem}.{value}")


def load_cluster(preset: str, directory: Path = PRESET_DIR, key: str = "hardware") -> Cluster:
    """The cluster ``preset`` names (a preset name or a YAML file's path), resolved; parts
    named in any preset come from ``directory``'s links.yaml and accelerators.yaml."""
    path = Path(preset).expanduser()
    if path.suffix not in (".yaml", ".yml"):
        path = directory / f"{preset}.yaml"
        if preset in (Path(f).stem for f in PARTS_FILES) or not path.is_file():
            raise ConfigError(key, f"unknown hardware preset {preset!r} (known: "
                                   f"{', '.join(preset_names(directory))})")
    spec = build(ClusterSpec, _read(path, key), path.stem)
    return Cluster(
        name=path.stem,
        accelerator=_part(spec.accelerator, "accelerators.yaml", Accelerator, directory,
                          f"{path.stem}.accelerator"),
        per_node=spec.accelerators_per_node,
        intra=_part(spec.intra_node_link, "links.yaml", Link, directory,
                    f"{path.stem}.intra_node_link"),
        inter=_part(spec.inter_node_link, "links.yaml", Link, directory,
                    f"{path.stem}.inter_node_link"),
        nics_per_node=spec.nics_per_node or spec.accelerators_per_node)
