"""Tests of task.datasets on files the tests write (nothing is downloaded)."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from torchvision.datasets import MNIST

from task.datasets import (
    CIFAR10_FILES,
    DATASET_NAMES,
    IDX_FILES,
    NO_DOWNLOAD_ENV,
    DatasetUnavailableError,
    load_dataset,
)

NUM_TRAIN, NUM_TEST = 12, 5
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format: magic 0x0000 08 <ndim>, big-endian dims."""
    header = struct.pack(">I", 0x0800 + array.ndim)
    header += b"".join(struct.pack(">I", size) for size in array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_mnist_like(seed: int) -> dict[str, np.ndarray]:
    """Images and labels for the four IDX files; image i of train is all i * 20."""
    rng = np.random.default_rng(seed)
    train_images = np.stack([np.full((28, 28), i * 20, np.uint8) for i in range(NUM_TRAIN)])
    return {
        "train-images-idx3-ubyte": train_images,
        "train-labels-idx1-ubyte": np.arange(NUM_TRAIN, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (NUM_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, NUM_TEST, dtype=np.uint8),
    }


def write_idx_files(folder: Path, arrays: dict[str, np.ndarray], gzipped: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        if gzipped:
            (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
        else:
            (folder / name).write_bytes(idx_bytes(array))


@pytest.fixture(autouse=True)
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach the network, whatever a test asks for."""
    monkeypatch.setenv(NO_DOWNLOAD_ENV, "1")


@pytest.mark.parametrize("gzipped", [False, True])
def test_mnist_from_files_in_torchvision_layout(tmp_path: Path, gzipped: bool) -> None:
    # Prepare
    arrays = make_mnist_like(seed=0)
    write_idx_files(tmp_path / "MNIST" / "raw", arrays, gzipped)

    # Execute
    splits = load_dataset("mnist", tmp_path, seed=0, download=False)

    # Assert
    assert splits.name == "mnist" and splits.num_classes == 10
    assert splits.input_shape == (1, 28, 28)
    assert splits.train.x.shape == (NUM_TRAIN, 1, 28, 28) and len(splits.train) == NUM_TRAIN
    assert splits.test.x.shape == (NUM_TEST, 1, 28, 28) and len(splits.test) == NUM_TEST
    assert splits.train.x.dtype == torch.float32 and splits.train.y.dtype == torch.int64
    assert splits.train.y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert splits.test.y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    expected_first_pixels = (np.arange(NUM_TRAIN) * 20 / 255.0 - MNIST_MEAN) / MNIST_STD
    np.testing.assert_allclose(splits.train.x[:, 0, 0, 0].numpy(), expected_first_pixels, 1e-5)
    assert torch.all(splits.train.x == splits.train.x[:, :1, :1, :1])


def test_fashion_mnist_from_system_copy(tmp_path: Path) -> None:
    # Prepare: the Debian package layout, four .gz files in one folder
    system_dir = tmp_path / "usr-share-datasets-fashion-mnist"
    arrays = make_mnist_like(seed=1)
    write_idx_files(system_dir, arrays, gzipped=True)
    data_dir = tmp_path / "data"

    # Execute
    splits = load_dataset(
        "fashion-mnist", data_dir, seed=0, download=False, system_dirs=(system_dir,)
    )

    # Assert
    assert splits.train.x.shape == (NUM_TRAIN, 1, 28, 28)
    assert splits.test.y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    raw_dir = data_dir / "FashionMNIST" / "raw"
    assert sorted(path.name for path in raw_dir.iterdir()) == sorted(IDX_FILES)
    assert (raw_dir / "t10k-images-idx3-ubyte").read_bytes() == idx_bytes(
        arrays["t10k-images-idx3-ubyte"]
    )


def test_missing_files_raise_clear_error(tmp_path: Path) -> None:
    # Execute
    with pytest.raises(DatasetUnavailableError) as error:
        load_dataset("fashion-mnist", tmp_path, seed=0, download=False, system_dirs=())

    # Assert
    message = str(error.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message
    assert all(name in message for name in IDX_FILES)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "download" in message


def test_no_download_env_wins_over_download_true(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    def fail_download(self: MNIST) -> None:
        raise AssertionError("download must not be tried")

    monkeypatch.setattr(MNIST, "download", fail_download)

    # Execute / Assert
    with pytest.raises(DatasetUnavailableError, match="download disabled"):
        load_dataset("mnist", tmp_path, seed=0, download=True)


def test_failed_download_raises_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: downloads allowed, but the (patched) network is unreachable
    monkeypatch.delenv(NO_DOWNLOAD_ENV)
    calls = []

    def unreachable(self: MNIST) -> None:
        calls.append(self.raw_folder)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(MNIST, "download", unreachable)

    # Execute
    with pytest.raises(DatasetUnavailableError) as error:
        load_dataset("mnist", tmp_path, seed=0, download=True)

    # Assert
    assert calls == [str(tmp_path / "MNIST" / "raw")]
    assert "download failed" in str(error.value)
    assert str(tmp_path / "MNIST" / "raw") in str(error.value)


def write_cifar_batches(folder: Path, per_batch: int) -> dict[str, np.ndarray]:
    """Write CIFAR-10's python pickle batches; every image's channel c is all 50 * c."""
    folder.mkdir(parents=True)
    labels = {}
    for index, name in enumerate(CIFAR10_FILES[:-1]):
        rows = np.concatenate(
            [np.full((per_batch, 1024), 50 * channel, np.uint8) for channel in range(3)], axis=1
        )
        labels[name] = (np.arange(per_batch) + index) % 10
        batch = {"data": rows, "labels": labels[name].tolist(), "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": [f"class-{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return labels


def test_cifar10_shapes_and_normalisation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: torchvision checks the original files' MD5s; accept any existing file.
    labels = write_cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=4)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file())

    # Execute
    splits = load_dataset("cifar10", tmp_path, seed=0, download=False)

    # Assert
    assert splits.input_shape == (3, 32, 32) and splits.num_classes == 10
    assert splits.train.x.shape == (20, 3, 32, 32) and splits.test.x.shape == (4, 3, 32, 32)
    assert splits.test.y.tolist() == labels["test_batch"].tolist()
    expected = (np.array([0, 50, 100]) / 255.0 - np.array([0.4914, 0.4822, 0.4465])) / np.array(
        [0.2470, 0.2435, 0.2616]
    )
    np.testing.assert_allclose(splits.train.x[0, :, 5, 7].numpy(), expected, rtol=1e-5)


def test_cifar10_files_failing_md5_check_raise_clear_error(tmp_path: Path) -> None:
    # Prepare: the real integrity check rejects files that are not the originals
    write_cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=2)

    # Execute
    with pytest.raises(DatasetUnavailableError) as error:
        load_dataset("cifar10", tmp_path, seed=0, download=False)

    # Assert
    assert "corrupted" in str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in str(error.value)


def test_digits_offline_split() -> None:
    # Execute
    splits = load_dataset("digits", "/nonexistent", seed=3)
    again = load_dataset("digits", "/nonexistent", seed=3)
    other = load_dataset("digits", "/nonexistent", seed=4)

    # Assert
    assert splits.num_classes == 10 and splits.input_shape == (1, 8, 8)
    assert splits.train.x.shape == (1437, 1, 8, 8) and splits.test.x.shape == (360, 1, 8, 8)
    assert sorted(torch.unique(splits.test.y).tolist()) == list(range(10))
    assert abs(splits.train.x.mean().item()) < 1e-4
    assert abs(splits.train.x.std().item() - 1.0) < 1e-3
    assert torch.equal(splits.train.x, again.train.x) and torch.equal(splits.test.y, again.test.y)
    assert not torch.equal(splits.train.y, other.train.y)


def test_unknown_dataset_lists_valid_names(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(ValueError) as error:
        load_dataset("imagenet", tmp_path, seed=0)
    assert all(name in str(error.value) for name in DATASET_NAMES)


def test_truncated_idx_file_raises_clear_error(tmp_path: Path) -> None:
    # Prepare
    raw_dir = tmp_path / "MNIST" / "raw"
    write_idx_files(raw_dir, make_mnist_like(seed=2), gzipped=False)
    images = raw_dir / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])

    # Execute / Assert
    with pytest.raises(DatasetUnavailableError, match="corrupted"):
        load_dataset("mnist", tmp_path, seed=0, download=False)
