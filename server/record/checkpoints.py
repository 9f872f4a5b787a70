"""Checkpoints: the global model and the strategy's state after each completed round.

Files are safetensors (no pickle, nothing executes on load), written to a temp
file, fsynced and renamed into place, so a crash leaves either the old file or
the new one, never half of one. The SHA-256 of each file goes to ``run.db``;
loading recomputes it and refuses a file that does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

CHECKPOINT_DIR = "checkpoints"
MODEL_PREFIX = "model/"
STRATEGY_PREFIX = "strategy/"
KEEP_LAST = 3


class CheckpointError(RuntimeError):
    """A checkpoint is missing, altered, or does not fit the run."""


@dataclass(frozen=True)
class Checkpoint:
    """What one checkpoint file holds."""

    server_round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray]
    metadata: dict[str, object]


@dataclass(frozen=True)
class SavedCheckpoint:
    """A checkpoint just written: its file, the file's SHA-256 and the model's hash.

    Unpacks as ``path, sha256`` (what ``run.db``'s checkpoints table holds).
    """

    path: Path
    sha256: str
    model_hash: str  # :func:`model_hash` of the arrays written, for the round row

    def __iter__(self) -> Iterator[Path | str]:
        return iter((self.path, self.sha256))


def checkpoint_path(run_dir: Path, server_round: int) -> Path:
    """``<run_dir>/checkpoints/round-NNNNN.safetensors``."""
    return run_dir / CHECKPOINT_DIR / f"round-{server_round:05d}.safetensors"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_hash(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and bytes, in order.

    Each round row records (and chains) this hash of the round's global model;
    ``fedcoord verify`` and resume recompute it from the checkpoint file.
    """
    digest = hashlib.sha256()
    for name, value in arrays.items():
        digest.update(f"{name}|{value.dtype.str}|{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def checkpoint_file_problem(server_round: int, name: object) -> str | None:
    """Why a checkpoint row's file name is not the file of its round, or None.

    ``run.db`` is read back as untrusted: a name such as ``../../x`` must not make
    verify or resume read a file outside the run's ``checkpoints/`` folder.
    """
    expected = checkpoint_path(Path(), server_round).name
    if name != expected:
        return f"names the file {str(name)[:80]!r}, not {expected!r}"
    return None


def save_checkpoint(
    run_dir: Path,
    server_round: int,
    arrays: Mapping[str, np.ndarray],
    strategy_state: Mapping[str, np.ndarray],
    metadata: Mapping[str, object],
) -> SavedCheckpoint:
    """Write a checkpoint atomically; return its path, its SHA-256 and the model's hash."""
    path = checkpoint_path(run_dir, server_round)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent.is_symlink():  # never save (or prune) in another folder
        raise CheckpointError(f"{path.parent} is a link; checkpoints stay in the run folder")
    tensors = {MODEL_PREFIX + k: np.ascontiguousarray(v) for k, v in arrays.items()}
    tensors.update(
        {STRATEGY_PREFIX + k: np.ascontiguousarray(v) for k, v in strategy_state.items()}
    )
    header = {
        "round": str(server_round),
        "model_keys": json.dumps(list(arrays)),
        "strategy_keys": json.dumps(list(strategy_state)),
        "metadata": json.dumps(dict(metadata), default=str),
        # np.ascontiguousarray makes a 0-d array (BatchNorm's num_batches_tracked) 1-d
        "shapes": json.dumps(
            {MODEL_PREFIX + k: list(np.shape(v)) for k, v in arrays.items()}
            | {STRATEGY_PREFIX + k: list(np.shape(v)) for k, v in strategy_state.items()}
        ),
    }
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(handle)
    try:
        save_file(tensors, temp_name, metadata=header)
        with open(temp_name, "rb") as file:
            os.fsync(file.fileno())
        digest = file_sha256(Path(temp_name))
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return SavedCheckpoint(path, digest, model_hash(arrays))


def load_checkpoint(path: Path, expected_sha256: str) -> Checkpoint:
    """Load a checkpoint after checking its SHA-256.

    Raises
    ------
    CheckpointError
        If the file is missing, its hash differs from ``expected_sha256``, or it
        cannot be parsed.
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is missing")
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise CheckpointError(
            f"checkpoint {path} is altered: sha256 {actual} does not match the "
            f"{expected_sha256} recorded in run.db; refusing to load it"
        )
    try:
        tensors = load_file(str(path))
        header = _read_header(path)
        model_keys = json.loads(header["model_keys"])
        strategy_keys = json.loads(header["strategy_keys"])
        for key, shape in json.loads(header.get("shapes", "{}")).items():
            tensors[key] = tensors[key].reshape(shape)
        return Checkpoint(
            server_round=int(header["round"]),
            arrays={k: tensors[MODEL_PREFIX + k] for k in model_keys},
            strategy_state={k: tensors[STRATEGY_PREFIX + k] for k in strategy_keys},
            metadata=dict(json.loads(header["metadata"])),
        )
    except Exception as error:  # noqa: BLE001 - any parse failure means a bad file
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read: {reason}") from None


def _read_header(path: Path) -> dict[str, str]:
    with open(path, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(size))
    return dict(header.get("__metadata__", {}))


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def files_to_prune(
    rounds_with_accuracy: list[tuple[int, float | None]], keep_last: int = KEEP_LAST
) -> list[int]:
    """Rounds whose checkpoints can go: all but the last ``keep_last`` and the best.

    Parameters
    ----------
    rounds_with_accuracy : list[tuple[int, float | None]]
        ``(round, central accuracy)`` of every checkpoint on record.
    keep_last : int
        How many of the newest checkpoints to keep.
    """
    ordered = sorted(rounds_with_accuracy)
    keep = {r for r, _ in ordered[-keep_last:]}
    scored = [(acc, r) for r, acc in ordered if acc is not None]
    if scored:
        keep.add(max(scored)[1])
    return [r for r, _ in ordered if r not in keep]
