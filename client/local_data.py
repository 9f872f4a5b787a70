"""A node's own data, named by ``data-path`` in its node config.

On a real SuperNode the data usually lives on that machine rather than being a
partition of a public dataset::

    flower-supernode ... --node-config 'data-path="/srv/fl/site-a"'

``data-path`` is a folder holding ``data.npz`` (or the path of an ``.npz`` file)
with two arrays:

- ``x``: images, shape ``(N, C, H, W)`` or ``(N, H, W)`` (one channel); ``uint8``
  in 0..255, or float in [0, 1];
- ``y``: integer class labels, shape ``(N,)``, in ``[0, num_classes)``.

The images must have the shape of the run's ``dataset`` (the model is built for
it: ``digits`` 1x8x8, ``mnist`` / ``fashion-mnist`` 1x28x28, ``cifar10`` 3x32x32,
10 classes each) and are normalised as that dataset is, so every node feeds the
model the same kind of input. ``local-test-fraction`` of the examples is held out
as the node's local test split, chosen by ``seed`` and the node's
``partition-id`` (optional here: a label for ``node-weights``; -1 when absent).

Reading and checking the file needs numpy only (the deploy tool checks a node's
data before it starts); building tensors imports torch.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from task import keys
from task.config import ConfigError, RunConfig

if TYPE_CHECKING:
    from task.datasets import TensorSplit

DATA_FILE_NAME = "data.npz"
NO_PARTITION = -1
FORMAT_HELP = (
    f"expected a folder holding {DATA_FILE_NAME} (or an .npz file) with arrays "
    "x: images (N, C, H, W) or (N, H, W), uint8 0..255 or float 0..1, and "
    "y: integer labels (N,)"
)


@dataclass(frozen=True)
class DatasetFormat:
    """What a node's own images must look like to train the run's model."""

    input_shape: tuple[int, int, int]
    num_classes: int


# The model's input per run-config `dataset` (task.datasets loads the same shapes).
DATASET_FORMATS: dict[str, DatasetFormat] = {
    "digits": DatasetFormat((1, 8, 8), 10),
    "mnist": DatasetFormat((1, 28, 28), 10),
    "fashion-mnist": DatasetFormat((1, 28, 28), 10),
    "cifar10": DatasetFormat((3, 32, 32), 10),
}


class LocalDataError(ConfigError):
    """A node's ``data-path`` is missing or not in the documented format."""


@dataclass(frozen=True)
class LocalArrays:
    """A node's examples as read from disk: images scaled to [0, 1], labels."""

    path: Path
    x: np.ndarray
    y: np.ndarray

    @property
    def num_classes_seen(self) -> int:
        """One more than the largest label."""
        return int(self.y.max()) + 1


def resolve_data_file(data_path: str | os.PathLike[str]) -> Path:
    """The ``.npz`` file a ``data-path`` names: the path itself or ``<folder>/data.npz``."""
    path = Path(data_path).expanduser()
    if not path.is_absolute():
        raise LocalDataError(
            f"data-path {str(data_path)!r} must be an absolute path (the ClientApp runs in "
            "another working directory); " + FORMAT_HELP
        )
    if path.is_dir():
        path = path / DATA_FILE_NAME
    if not path.is_file():
        raise LocalDataError(f"data-path {path}: no such file; {FORMAT_HELP}")
    return path


def read_local_arrays(data_path: str | os.PathLike[str]) -> LocalArrays:
    """Read and check a node's own examples (numpy only).

    Raises
    ------
    LocalDataError
        If the file is missing, unreadable or not in the documented format; the
        message names the file and the expected format.
    """
    path = resolve_data_file(data_path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [name for name in ("x", "y") if name not in archive.files]
            if missing:
                raise LocalDataError(
                    f"data-path {path}: no array {' or '.join(missing)} "
                    f"(found: {', '.join(archive.files) or 'none'}); {FORMAT_HELP}"
                )
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        if isinstance(error, LocalDataError):
            raise
        raise LocalDataError(
            f"data-path {path}: cannot read it as .npz ({error}); {FORMAT_HELP}"
        ) from error
    return LocalArrays(path, _checked_images(path, x), _checked_labels(path, y, len(x)))


def _checked_images(path: Path, x: np.ndarray) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, np.newaxis]
    if x.ndim != 4:
        raise LocalDataError(f"data-path {path}: x has shape {x.shape}; {FORMAT_HELP}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise LocalDataError(f"data-path {path}: x is {x.dtype}; {FORMAT_HELP}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise LocalDataError(f"data-path {path}: x holds NaN or infinite values")
    if x.size and (x.min() < -1e-6 or x.max() > 1 + 1e-6):
        raise LocalDataError(
            f"data-path {path}: float x must lie in [0, 1], found "
            f"[{x.min():.3g}, {x.max():.3g}]; {FORMAT_HELP}"
        )
    return x


def _checked_labels(path: Path, y: np.ndarray, num_images: int) -> np.ndarray:
    if y.ndim != 1 or len(y) != num_images:
        raise LocalDataError(
            f"data-path {path}: y has shape {y.shape}, expected ({num_images},) "
            f"(one label per image); {FORMAT_HELP}"
        )
    if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer):
        raise LocalDataError(f"data-path {path}: y is {y.dtype}; {FORMAT_HELP}")
    if num_images < 2:
        raise LocalDataError(f"data-path {path}: {num_images} example(s); a node needs >= 2")
    if y.min() < 0:
        raise LocalDataError(f"data-path {path}: y holds negative labels")
    return y.astype(np.int64)


def validate_for_dataset(arrays: LocalArrays, dataset: str) -> DatasetFormat:
    """Check that the images and labels fit the model of run-config ``dataset``."""
    expected = DATASET_FORMATS[dataset]
    shape = tuple(arrays.x.shape[1:])
    if shape != expected.input_shape:
        raise LocalDataError(
            f"data-path {arrays.path}: images are {'x'.join(map(str, shape))} (C x H x W) "
            f"but this run trains on dataset={dataset!r}, whose model takes "
            f"{'x'.join(map(str, expected.input_shape))}; convert the images or run with "
            "the matching dataset"
        )
    if arrays.num_classes_seen > expected.num_classes:
        raise LocalDataError(
            f"data-path {arrays.path}: label {arrays.num_classes_seen - 1} is out of range; "
            f"dataset={dataset!r} has {expected.num_classes} classes "
            f"(0..{expected.num_classes - 1})"
        )
    return expected


def local_partition_id(node_config: dict[str, object]) -> int:
    """The optional ``partition-id`` of a node with its own data (-1 when absent)."""
    value = node_config.get(keys.NODE_PARTITION_ID, NO_PARTITION)
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError) as error:
        raise ConfigError(f"partition-id must be an integer, got {value!r}") from error


def normalisation(dataset: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std that ``task.datasets`` applies to images in [0, 1].

    ``digits`` is standardised with its training split's statistics, which
    depend on the seed of the split; the torchvision sets use fixed constants.
    """
    if dataset == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        images = (bunch.data / 16.0).astype(np.float32)
        x_train, _, _, _ = train_test_split(
            images, bunch.target, test_size=0.2, stratify=bunch.target, random_state=seed
        )
        return np.array([x_train.mean()]), np.array([x_train.std()])
    from task.datasets import _VISION_SPECS

    spec = _VISION_SPECS[dataset]
    return np.array(spec.mean), np.array(spec.std)


@lru_cache(maxsize=4)
def _local_splits(
    config: RunConfig, partition_id: int, path: str, stamp: tuple[int, int]
) -> tuple[TensorSplit, TensorSplit]:
    import torch

    from task.datasets import TensorSplit
    from task.partitioning import split_local

    del stamp  # part of the cache key only: a changed file is read again
    arrays = read_local_arrays(path)
    validate_for_dataset(arrays, config.dataset)
    mean, std = normalisation(config.dataset, config.seed)
    x = (arrays.x - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)
    x_tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    y_tensor = torch.from_numpy(arrays.y)
    train, test = split_local(
        np.arange(len(arrays.y)), config.local_test_fraction, config.seed + partition_id
    )
    return (
        TensorSplit(x_tensor[train], y_tensor[train]),
        TensorSplit(x_tensor[test], y_tensor[test]),
    )


def load_local_splits(
    config: RunConfig, data_path: str, partition_id: int
) -> tuple[TensorSplit, TensorSplit, DatasetFormat]:
    """This node's local train and test splits from its ``data-path``, cached per file.

    Raises
    ------
    LocalDataError
        If the data is missing, malformed, or does not fit the run's dataset.
    """
    path = resolve_data_file(data_path)
    stat = path.stat()
    train, test = _local_splits(config, partition_id, str(path), (stat.st_mtime_ns, stat.st_size))
    return train, test, DATASET_FORMATS[config.dataset]
