"""Datasets as normalised in-memory tensors, loaded offline when the files are there.

``digits`` ships with scikit-learn and always works offline. MNIST,
Fashion-MNIST and CIFAR-10 are read through torchvision from ``data_dir``; the
raw arrays are turned into tensors at once (no per-example PIL transform).
When files are missing they are downloaded by torchvision if allowed, and
Fashion-MNIST is also taken from the Debian ``dataset-fashion-mnist`` package
when it is installed. Nothing is cached here: callers cache.
"""

import gzip
import os
import pickle
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torchvision.datasets import CIFAR10, MNIST, FashionMNIST, VisionDataset

from task.names import DATASET_NAMES

# Set to "1" to never download, whatever ``download`` says.
NO_DOWNLOAD_ENV = "FEDCOORD_NO_DOWNLOAD"

# Where `apt-get install dataset-fashion-mnist` puts the four *-ubyte.gz files.
FASHION_MNIST_SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)

IDX_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR10_FILES: tuple[str, ...] = (
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
    "batches.meta",
)


# What torchvision raises for missing, truncated or malformed files.
_LOAD_ERRORS = (OSError, RuntimeError, ValueError, TypeError, EOFError, pickle.UnpicklingError)


class DatasetUnavailableError(RuntimeError):
    """The dataset's files are not on disk and could not be fetched."""


@dataclass(frozen=True)
class TensorSplit:
    """Examples of one split, held in memory.

    Attributes
    ----------
    x : torch.Tensor
        ``float32`` inputs, shape ``(N, C, H, W)``, normalised.
    y : torch.Tensor
        ``int64`` class labels, shape ``(N,)``.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's train and test splits with what a model needs to know."""

    train: TensorSplit
    test: TensorSplit
    num_classes: int
    input_shape: tuple[int, int, int]
    name: str


@dataclass(frozen=True)
class _VisionSpec:
    """How to find, fetch and normalise one torchvision dataset."""

    dataset_cls: type[VisionDataset]
    folder: str
    files: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    how_to_get: str


_VISION_SPECS: dict[str, _VisionSpec] = {
    "mnist": _VisionSpec(
        MNIST,
        "MNIST/raw",
        IDX_FILES,
        mean=(0.1307,),
        std=(0.3081,),
        num_classes=10,
        how_to_get="run once with download enabled where the internet is reachable, "
        "or copy the four MNIST files (*-ubyte or *-ubyte.gz) there",
    ),
    "fashion-mnist": _VisionSpec(
        FashionMNIST,
        "FashionMNIST/raw",
        IDX_FILES,
        mean=(0.2860,),
        std=(0.3530,),
        num_classes=10,
        how_to_get="run `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, found "
        "automatically), run once with download enabled where the internet is reachable, "
        "or copy the four Fashion-MNIST files (*-ubyte or *-ubyte.gz) there",
    ),
    "cifar10": _VisionSpec(
        CIFAR10,
        "cifar-10-batches-py",
        CIFAR10_FILES,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        num_classes=10,
        how_to_get="run once with download enabled where the internet is reachable, "
        "or unpack cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) "
        "into the data directory",
    ),
}


def load_dataset(
    name: str,
    data_dir: str | Path,
    seed: int,
    download: bool = True,
    *,
    system_dirs: Sequence[Path] = FASHION_MNIST_SYSTEM_DIRS,
) -> DatasetSplits:
    """Load a dataset's train and test splits as normalised tensors.

    Parameters
    ----------
    name : str
        One of :data:`DATASET_NAMES`.
    data_dir : str | Path
        Absolute folder holding torchvision's layout (``MNIST/raw``,
        ``FashionMNIST/raw``, ``cifar-10-batches-py``); unused by ``digits``.
    seed : int
        Seed of the ``digits`` train/test split (the others have official splits).
    download : bool
        Whether missing files may be downloaded; the environment variable
        ``FEDCOORD_NO_DOWNLOAD=1`` forbids it as well.
    system_dirs : Sequence[Path]
        Folders searched for Fashion-MNIST's ``*-ubyte.gz`` files when they are
        not in ``data_dir``.

    Returns
    -------
    DatasetSplits
        Train and test tensors, class count and input shape.

    Raises
    ------
    ValueError
        If ``name`` is unknown.
    DatasetUnavailableError
        If the files are missing and cannot be fetched; the message names the
        files, their folder and how to get them.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"Unknown dataset {name!r}; valid: {', '.join(DATASET_NAMES)}")
    if name == "digits":
        return load_digits_splits(seed)
    spec = _VISION_SPECS[name]
    root = Path(data_dir).expanduser().resolve()
    extra_dirs = tuple(system_dirs) if name == "fashion-mnist" else ()
    train = _open_vision(spec, root, True, download, extra_dirs)
    test = _open_vision(spec, root, False, download, extra_dirs)
    train_split = _to_split(train, spec)
    channels, height, width = train_split.x.shape[1:]
    return DatasetSplits(
        train=train_split,
        test=_to_split(test, spec),
        num_classes=spec.num_classes,
        input_shape=(channels, height, width),
        name=name,
    )


def load_digits_splits(seed: int, test_fraction: float = 0.2) -> DatasetSplits:
    """Load scikit-learn's 8x8 digits, stratified split, standardised on train.

    Pixels are scaled to ``[0, 1]`` (divided by 16), then standardised with the
    training split's mean and standard deviation.

    Parameters
    ----------
    seed : int
        ``random_state`` of the stratified split.
    test_fraction : float
        Share of the 1,797 examples held out for testing.

    Returns
    -------
    DatasetSplits
        1x8x8 inputs, 10 classes; 1,437 train and 360 test examples by default.
    """
    bunch = load_digits()
    images = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    mean, std = float(x_train.mean()), float(x_train.std())
    return DatasetSplits(
        train=TensorSplit(torch.from_numpy((x_train - mean) / std), torch.from_numpy(y_train)),
        test=TensorSplit(torch.from_numpy((x_test - mean) / std), torch.from_numpy(y_test)),
        num_classes=10,
        input_shape=(1, 8, 8),
        name="digits",
    )


def download_allowed(download: bool) -> bool:
    """Return whether a download may be tried (``download`` and not ``FEDCOORD_NO_DOWNLOAD``)."""
    return download and os.environ.get(NO_DOWNLOAD_ENV, "") != "1"


def _open_vision(
    spec: _VisionSpec, root: Path, train: bool, download: bool, extra_dirs: Sequence[Path]
) -> VisionDataset:
    """Open one split from disk, staging or downloading the files if needed."""
    if spec.files == IDX_FILES:
        _stage_idx_files(root / spec.folder, extra_dirs)
    try:
        return spec.dataset_cls(str(root), train=train, download=False)
    except _LOAD_ERRORS as missing:
        if not download_allowed(download):
            reason = f"download disabled: download=False or {NO_DOWNLOAD_ENV}=1"
            raise _unavailable(spec, root, reason=reason) from missing
    try:
        return spec.dataset_cls(str(root), train=train, download=True)
    except _LOAD_ERRORS as failure:
        raise _unavailable(spec, root, reason=f"download failed: {failure}") from failure


def _unavailable(spec: _VisionSpec, root: Path, reason: str) -> DatasetUnavailableError:
    folder = root / spec.folder
    missing = [name for name in spec.files if not (folder / name).is_file()]
    state = (
        f"missing: {', '.join(missing)}"
        if missing
        else "the files are there but corrupted or truncated"
    )
    return DatasetUnavailableError(
        f"Cannot load the dataset files from {folder} ({state}; {reason}). "
        f"Needed: {', '.join(spec.files)} in {folder}. To get them: {spec.how_to_get}."
    )


def _stage_idx_files(raw_dir: Path, extra_dirs: Sequence[Path]) -> None:
    """Put missing IDX files into ``raw_dir``, decompressing ``.gz`` copies.

    Sources, in order: a ``.gz`` beside the wanted file in ``raw_dir``, then each
    folder of ``extra_dirs`` (plain or ``.gz``). Files are written through a
    temporary name and renamed, so concurrent loaders never read half a file.
    """
    for file_name in IDX_FILES:
        target = raw_dir / file_name
        if target.is_file():
            continue
        source = _find_source(file_name, (raw_dir, *extra_dirs))
        if source is not None:
            _copy_atomically(source, target)


def _find_source(file_name: str, folders: Sequence[Path]) -> Path | None:
    for folder in folders:
        for candidate in (folder / f"{file_name}.gz", folder / file_name):
            if candidate.is_file():
                return candidate
    return None


def _copy_atomically(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if source.suffix == ".gz" else open
    handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with opener(source, "rb") as reader, os.fdopen(handle, "wb") as writer:
            shutil.copyfileobj(reader, writer, length=1 << 20)
        os.chmod(temp_name, 0o644)  # mkstemp creates 0600; others may share data_dir
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _to_split(dataset: VisionDataset, spec: _VisionSpec) -> TensorSplit:
    """Turn torchvision's raw ``data``/``targets`` into a normalised TensorSplit."""
    images = torch.as_tensor(dataset.data)
    # MNIST-like data is N x H x W; CIFAR's is N x H x W x C.
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    x = ((images.to(torch.float32) / 255.0 - mean) / std).contiguous()
    y = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.int64)
    return TensorSplit(x=x, y=y)
