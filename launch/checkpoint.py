"""Checkpoints as per-rank shards under an atomic manifest.

A checkpoint is a directory ``OUT_DIR/checkpoints/step-<N>/``:

* ``common.pt``, written by rank 0: what every rank holds alike (model, optimizer, scheduler,
  progress, the sparsifier, the config);
* ``rank-<r>.pt``, written by rank r: what only it holds (its DGC residuals and momenta, a
  PowerSGD error feedback, its RNG states);
* ``manifest.json``, written last by rank 0 once every shard is on disk: world size, layout
  and each file's size and sha256. ``checkpoints/latest`` then names the directory.

Each rank writes and reads back only its own shard, so rank 0's memory for a save does not
grow with the world size (it gathers each shard's name, size and hash, not its contents).
Every file goes to a temporary name, is fsynced and renamed, so a crash in the middle of a
save leaves a directory without a manifest, which loading ignores, and the previous
checkpoint usable. Loading takes the newest directory whose manifest exists and whose files
match it (size and hash), all ranks agreeing, and says which damaged ones it skipped. The
two newest complete checkpoints are kept.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sparse_comm.atomic import replace_atomic

log = logging.getLogger(__name__)

COMMON = "common.pt"
MANIFEST = "manifest.json"
KEEP = 2
_STEP_DIR = re.compile(r"step-(\d+)$")


def root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def shard_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def _write_atomic(path: Path, data: bytes) -> None:
    replace_atomic(path, lambda f: f.write(data))


def _serialise(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _entry(path: Path, data: bytes) -> tuple[str, dict]:
    return path.name, {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

from sparse_comm.schema import ConfigError


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync it, then rename over ``path``."""
    replace_atomic(path, lambda f: torch.save(obj, f))


def save(out_dir: str | Path, step: int, own: dict, common: dict | None,
         meta: dict) -> Path:
    """Write this rank's shard (and, on rank 0, ``common``), then the manifest. Every rank of
    the default group calls it; ``meta`` (world size, layout) goes into the manifest."""
    rank, world = dist.get_rank(), dist.get_world_size()
    directory = root(out_dir) / f"step-{step:08d}"
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    data = _serialise(own)
    _write_atomic(directory / shard_name(rank), data)
    entries.append(_entry(directory / shard_name(rank), data))
    if rank == 0:
        data = _serialise(common)
        _write_atomic(directory / COMMON, data)
        entries.append(_entry(directory / COMMON, data))
    everyone = [None] * world
    dist.all_gather_object(everyone, entries)  # names, sizes and hashes only
    if rank == 0:
        files = dict(e for part in everyone for e in part)
        manifest = {"step": step, "world_size": world, **meta, "files": files}
        _write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
        _write_atomic(root(out_dir) / "latest", directory.name.encode())
        _prune(root(out_dir))
    dist.barrier()
    return directory


def _prune(checkpoints: Path) -> None:
    complete = [d for d in _step_dirs(checkpoints) if (d / MANIFEST).is_file()]
    for old in complete[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    newest = complete[0] if complete else None
    for partial in _step_dirs(checkpoints):  # a crashed save's leftovers, older than the newest
        if not (partial / MANIFEST).is_file() and newest is not None and \
                _step_of(partial) < _step_of(newest):
            shutil.rmtree(partial, ignore_errors=True)


def _step_of(directory: Path) -> int:
    return int(_STEP_DIR.search(directory.name).group(1))


def _step_dirs(checkpoints: Path) -> list[Path]:
    """Step directories, newest first."""
    if not checkpoints.is_dir():
        return []
    found = [d for d in checkpoints.iterdir() if d.is_dir() and _STEP_DIR.search(d.name)]
    return sorted(found, key=_step_of, reverse=True)


def read_manifest(directory: Path) -> dict | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and "files" in manifest else None


def file_ok(directory: Path, name: str, manifest: dict) -> bool:
    """Whether ``name`` is on disk with the size and hash the manifest gives."""
    want = manifest["files"].get(name)
    path = directory / name
    if want is None or not path.is_file() or path.stat().st_size != want["bytes"]:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == want["sha256"]


def _usable_here(directory: Path, rank: int) -> bool:
    manifest = read_manifest(directory)
    if manifest is None:
        return False
    names = [COMMON] + ([shard_name(rank)] if rank < manifest["world_size"] else [])
    return all(file_ok(directory, n, manifest) for n in names)


def latest(out_dir: str | Path) -> Path | None:
    """The newest checkpoint every rank can use (a collective on the default group when it
    is initialised); damaged or partial ones are skipped with a warning."""
    grouped = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if grouped else 0
    for directory in _step_dirs(root(out_dir)):
        ok = torch.tensor([1 if _usable_here(directory, rank) else 0])
        if grouped:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item():
            return directory
        if rank == 0:
            log.warning("checkpoint %s is incomplete or damaged; trying an older one", directory)
    return None


def load_common(directory: Path) -> dict:
    return torch.load(directory / COMMON, map_location="cpu", weights_only=False)


def load_shard(directory: Path, rank: int) -> dict:
    return torch.load(directory / shard_name(rank), map_location="cpu", weights_only=False)


def read(out_dir: str | Path) -> tuple[dict, list[dict]]:
    """The newest complete checkpoint's common part and every rank's shard (for tools and
    tests; training reads its own shard only)."""
    directory = next((d for d in _step_dirs(root(out_dir)) if read_manifest(d)), None)
    if directory is None:
        raise FileNotFoundError(f"no complete checkpoint under {root(out_dir)}")
    world = read_manifest(directory)["world_size"]
    return load_common(directory), [load_shard(directory, r) for r in range(world)]


def load(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def run_state(run_dir: str | Path) -> dict:
    """What a finished or stopped run holds alike on every rank (``model``, ``plugins``,
    ``progress``, ``config``): the common part of its newest complete checkpoint, read
    without a process group, or the single ``checkpoint.pt`` of a run written before
    checkpoints were sharded. FileNotFoundError when there is neither."""
    run_dir = Path(run_dir)
    for directory in _step_dirs(root(run_dir)):
        manifest = read_manifest(directory)
        if manifest is not None and file_ok(directory, COMMON, manifest):
            return load_common(directory)
    if (run_dir / "checkpoint.pt").is_file():
        return load(run_dir / "checkpoint.pt")
    raise FileNotFoundError(f"no complete checkpoint under {root(run_dir)}")


def load_weights(model: torch.nn.Module, path: str | Path, key: str) -> None:
    """Load ``model``'s weights from ``path``: a run directory (its newest complete
    checkpoint, :func:`run_state`), a checkpoint file with a ``model`` entry or a file
    holding a plain state dict. A missing file or weights of another model raise
    ConfigError under config ``key``."""
    path = Path(path)
    if path.is_dir():
        try:
            state = run_state(path)
        except FileNotFoundError:
            raise ConfigError(key, f"no checkpoint under {path}") from None
    elif path.is_file():
        try:
            state = load(path)
        except Exception as err:  # torch.load: pickle, zip or EOF errors, by file
            raise ConfigError(key, f"{path} is not a checkpoint or weights file "
                                   f"({type(err).__name__})") from None
    else:
        raise ConfigError(key, f"no checkpoint or weights file at {path}")
    state = state.get("model", state) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError):
        raise ConfigError(key, f"{path} does not hold weights of this model "
                               f"({type(model).__name__})") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
