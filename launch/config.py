"""The experiment configuration: a typed tree loaded from YAML plus ``--set`` overrides.

A config file may name a ``base:`` file (relative to itself) whose values it overrides, so
experiments are small deltas on a shared baseline. ``dgc:``, ``sparsity:`` and ``quantize:``
sections are off when absent or null; giving any key of them (in YAML or with ``--set``)
turns them on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dgc.options import DGCOptions
from launch.costmodel.hardware import HardwareConfig
from launch.data import DataConfig
from launch.deep_compression import QuantizeConfig
from launch.models import ModelConfig
from sparse_comm.schema import ConfigError, build, require, to_dict
from sparse_train.options import SparsityOptions


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int | None = None  # a cap on optimizer steps, for quick runs
    seed: int = 0
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    eps: float = 1e-8  # adamw
    weight_decay: float = 0.0  # sgd: L2 in the gradient; adamw: decoupled
    batch_size: int = 64  # per process, per micro-step
    grad_accum_steps: int = 1  # micro-steps per optimizer step (DDP no_sync on all but the last)
    amp: Literal["none", "bf16", "fp16"] = "none"  # autocast; fp16 adds a GradScaler
    clip_grad_norm: float | None = None  # global L2 norm; with DGC, its local clipping
    lr_schedule: Literal["constant", "cosine", "step"] = "cosine"
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # epoch fractions, "step"
    lr_warmup_epochs: float = 0.0
    log_every: int = 20  # steps between metric records
    checkpoint_every: int | None = None  # steps; a checkpoint is also written every epoch
    # A non-finite loss or gradient: "stop" (exit status 3 with one line, no checkpoint of
    # the non-finite weights; read at log and checkpoint steps, no host sync per step) or
    # "skip" the step on every rank and count it (one host sync per step; with DGC it turns
    # dgc.check_finite on so that residuals stay finite).
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # Start from the model weights of this run directory (its newest checkpoint) or file
    # (a checkpoint or a plain state dict) instead of the seeded initialisation: a lottery
    # ticket, a pruned model.
    init_from: str | None = None

    def check(self):
        require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        require(self.max_steps is None or self.max_steps >= 1, "max_steps",
                f"must be >= 1 or null, got {self.max_steps}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                f"must be two numbers in [0, 1), got {self.betas}")
        require(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        require(self.grad_accum_steps >= 1, "grad_accum_steps",
                f"must be >= 1, got {self.grad_accum_steps}")
        require(self.clip_grad_norm is None or self.clip_grad_norm > 0, "clip_grad_norm",
                f"must be > 0 or null, got {self.clip_grad_norm}")
        require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        require(self.checkpoint_every is None or self.checkpoint_every >= 1, "checkpoint_every",
                f"must be >= 1 or null, got {self.checkpoint_every}")
        require(self.lr_warmup_epochs >= 0, "lr_warmup_epochs",
                f"must be >= 0, got {self.lr_warmup_epochs}")
        require(all(0 < m < 1 for m in self.lr_milestones), "lr_milestones",
                f"must be fractions of the run in (0, 1), got {self.lr_milestones}")


@dataclass
class WandbConfig:
    # "online" falls back to offline when no credentials are found.
    mode: Literal["online", "offline", "disabled"] = "online"
    project: str = "sparse-comm"
    group: str | None = None
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class DDPConfig:
    bucket_cap_mb: float = 25.0
    static_graph: bool = False
    find_unused_parameters: bool = False
    # The gradients are views into DDP's buckets, which the hooks write the averaged update
    # into: no copy of the gradient per step, and on CPU no fresh gradient tensors to
    # allocate after zero_grad(set_to_none=True) (BENCHMARKS.md, "Gradients as bucket
    # views").
    gradient_as_bucket_view: bool = True
    # The baselines DGC is measured against: torch's own hooks, bytes counted like ours.
    # "allreduce" is DDP's averaging allreduce; a `dgc:` section replaces the hook.
    comm_hook: Literal["allreduce", "fp16", "bf16", "powersgd", "hierarchical"] = "allreduce"
    powersgd_rank: int = 4  # PowerSGD's matrix_approximation_rank (Vogels et al. 2019)
    # Dense steps before PowerSGD starts compressing; torch's docs suggest about 10% of
    # training so the sensitive first steps see exact gradients.
    powersgd_start_iter: int = 10

    def check(self):
        require(self.bucket_cap_mb > 0, "bucket_cap_mb", f"must be > 0, got {self.bucket_cap_mb}")
        require(self.powersgd_rank >= 1, "powersgd_rank",
                f"must be >= 1, got {self.powersgd_rank}")
        # torch's PowerSGD (with error feedback) can compress only from DDP's third step.
        require(self.powersgd_start_iter >= 2, "powersgd_start_iter",
                f"must be >= 2, got {self.powersgd_start_iter}")


@dataclass
class Config:
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)  # for the est/* figures
    dgc: DGCOptions | None = None
    sparsity: SparsityOptions | None = None
    # Deep Compression after training: weight sharing, fine-tuning, encoding
    # (launch/deep_compression.py).
    quantize: QuantizeConfig | None = None
    # "ddp": gradients through a DDP communication hook (torchrun, mpirun, srun); "horovod":
    # through Horovod under horovodrun (launch/hvd_engine.py).
    engine: Literal["ddp", "horovod"] = "ddp"
    run_name: str | None = None  # default: <config name>-<timestamp>
    out_dir: str | None = None  # default: runs/<run_name>

    def check(self):
        if self.engine == "horovod" and self.ddp.comm_hook != "allreduce":
            raise ConfigError("ddp.comm_hook", f"{self.ddp.comm_hook!r} is a DDP hook; "
                                               f"engine 'horovod' does not use DDP")
        if self.engine == "horovod" and self.train.grad_accum_steps > 1:
            raise ConfigError("train.grad_accum_steps", "engine 'horovod' averages every "
                                                        "backward; use engine: ddp")
        if self.dgc is not None and self.train.clip_grad_norm and self.dgc.clip_norm:
            raise ConfigError("train.clip_grad_norm", "with DGC it sets dgc.clip_norm "
                                                      "(local clipping); set one of them")
        if self.dgc is not None and self.ddp.comm_hook != "allreduce":
            raise ConfigError("ddp.comm_hook", f"{self.ddp.comm_hook!r} and a dgc: section "
                                               f"both set the communication hook; keep one")
        if self.run_name is not None:
            require(self.run_name and "/" not in self.run_name, "run_name",
                    f"must be a non-empty name without '/', got {self.run_name!r}")


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if path in seen:
        raise ConfigError("base", f"circular base chain through {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError("", f"{path} is a directory; --config takes a YAML file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError("", f"cannot read config file {path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError("", f"{path}{where} is not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: the top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError("base", f"must be a file name, got {base!r}")
    return merge(read_yaml((path.parent / base).resolve(), seen + (path,)), data)


def merge(base: dict, override: dict) -> dict:
    """Deep-merge ``override`` into a copy of ``base``; a null in override switches a section off."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("", f"--set expects key=value, got {assignment!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is a value, not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Read ``path`` (or start from ``base``), apply overrides, and return a checked Config."""
    data = dict(base or {})
    if path is not None:
        data = merge(data, read_yaml(Path(path).resolve()))
    for assignment in overrides:
        apply_override(data, assignment)
    return build(Config, data)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return to_dict(cfg)
