"""Robust aggregators that keep every update: median, trimmed mean, (Multi-)Krum."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial

import numpy as np

from strategies.aggregation.base import (
    _STACK_BLOCK_BYTES,
    NDArrays,
    _accumulator_dtype,
    _AggregatorBase,
    _require_int,
    _require_number,
)


def _column_blocks(
    rows: Sequence[np.ndarray], dtype: np.dtype
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(start, stop, block)``, ``block[i] = rows[i][start:stop]`` in ``dtype``.

    ``block`` is a reused buffer: consume (or overwrite) it before the next step.
    """
    size = rows[0].size
    width = max(1, min(size, _STACK_BLOCK_BYTES // (len(rows) * dtype.itemsize)))
    buffer = np.empty((len(rows), width), dtype=dtype)
    for start in range(0, size, width):
        stop = min(start + width, size)
        block = buffer[:, : stop - start]
        for target, row in zip(block, rows, strict=True):
            target[...] = row[start:stop]
        yield start, stop, block


def _reduce_across_updates(
    rows: Sequence[np.ndarray], reduce_fn: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Apply ``reduce_fn`` over axis 0 of the stacked rows, one block at a time."""
    result = np.empty(rows[0].size, dtype=_accumulator_dtype(rows[0].dtype))
    for start, stop, block in _column_blocks(rows, rows[0].dtype):
        result[start:stop] = reduce_fn(block)
    return result


class _StoredUpdatesAggregator(_AggregatorBase):
    """Keeps a flat, private copy of every update; weights are ignored."""

    def __init__(self) -> None:
        super().__init__()
        self._updates: list[NDArrays] = []

    def add(self, update: Sequence[np.ndarray], weight: float = 1.0) -> None:
        """Store a copy of one update; ``weight`` is ignored."""
        arrays = self._accept(update)
        flat_copies = [np.array(array, order="C", copy=True).reshape(-1) for array in arrays]
        self._updates.append(flat_copies)
        self._count += 1

    def _rows(self, index: int, selected: Sequence[int] | None = None) -> NDArrays:
        chosen = range(len(self._updates)) if selected is None else selected
        return [self._updates[i][index] for i in chosen]

    def _reduce_each_array(
        self, reduce_fn: Callable[[np.ndarray], np.ndarray], selected: Sequence[int] | None = None
    ) -> NDArrays:
        layout = self._require_updates()
        flat_results = [
            _reduce_across_updates(self._rows(index, selected), reduce_fn)
            for index in range(len(layout.shapes))
        ]
        return layout.restore(flat_results)


def _median_of_block(block: np.ndarray) -> np.ndarray:
    """Return the median over axis 0; ``block`` is sorted in place.

    Sorting measured 5x faster than the partition ``np.median`` does along axis 0
    (20 x 400k float32); the mean of the two middle values matches ``np.median``.
    """
    block.sort(axis=0)
    num_updates = block.shape[0]
    middle = block[(num_updates - 1) // 2 : num_updates // 2 + 1]
    return np.mean(middle, axis=0, dtype=_accumulator_dtype(block.dtype))


class MedianAggregator(_StoredUpdatesAggregator):
    """Coordinate-wise median of the updates, unweighted.

    Yin et al. 2018, https://arxiv.org/abs/1803.01498. With an even number of
    updates the median is the mean of the two middle values.
    """

    def result(self) -> NDArrays:
        """Return the coordinate-wise median of the updates added so far."""
        return self._reduce_each_array(_median_of_block)


def _trimmed_mean_of_block(block: np.ndarray, beta: float) -> np.ndarray:
    """Return the mean over axis 0 without the ``int(beta * n)`` lowest and highest values.

    Same cut as ``scipy.stats.trim_mean(block, beta, axis=0)``; Yin et al. 2018,
    https://arxiv.org/abs/1803.01498. ``block`` is sorted in place.
    """
    num_updates = block.shape[0]
    cut = int(beta * num_updates)
    if cut > 0:
        block.sort(axis=0)
        block = block[cut : num_updates - cut]
    return np.mean(block, axis=0, dtype=_accumulator_dtype(block.dtype))


class TrimmedMeanAggregator(_StoredUpdatesAggregator):
    """Coordinate-wise trimmed mean of the updates, unweighted.

    Yin et al. 2018, https://arxiv.org/abs/1803.01498.

    Parameters
    ----------
    beta : float
        Fraction trimmed from each end, in [0, 0.5); as in ``scipy.stats.trim_mean``.
    """

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = _require_number("beta", beta, minimum=0.0)
        if self.beta >= 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta!r}")

    def result(self) -> NDArrays:
        """Return the coordinate-wise trimmed mean of the updates added so far."""
        return self._reduce_each_array(partial(_trimmed_mean_of_block, beta=self.beta))


def compute_pairwise_squared_distances(updates: Sequence[NDArrays]) -> np.ndarray:
    """Return the (n, n) squared L2 distances between updates, over their float arrays.

    Computed in float64 from the Gram matrix, one block of coordinates at a time,
    each block centred first (distances are unchanged, cancellation shrinks).
    """
    num_updates = len(updates)
    distances = np.zeros((num_updates, num_updates))
    for index, first in enumerate(updates[0]):
        if first.dtype.kind != "f":
            continue
        rows = [np.asarray(update[index]).reshape(-1) for update in updates]
        for _, _, block in _column_blocks(rows, np.dtype(np.float64)):
            block -= block.mean(axis=0)
            squared_norms = np.einsum("ij,ij->i", block, block)
            gram = block @ block.T
            distances += squared_norms[:, None] + squared_norms[None, :] - 2.0 * gram
    np.maximum(distances, 0.0, out=distances)
    np.fill_diagonal(distances, 0.0)
    return distances


def compute_krum_scores(distances: np.ndarray, num_malicious: int) -> np.ndarray:
    """Return each update's Krum score: summed squared distance to its n - f - 2 nearest others.

    Blanchard et al. 2017, https://arxiv.org/abs/1703.02757.
    """
    num_updates = distances.shape[0]
    num_neighbours = num_updates - num_malicious - 2
    others = distances[~np.eye(num_updates, dtype=bool)].reshape(num_updates, num_updates - 1)
    nearest = np.partition(others, num_neighbours - 1, axis=1)[:, :num_neighbours]
    return nearest.sum(axis=1)


def _mean_of_block(block: np.ndarray) -> np.ndarray:
    return np.mean(block, axis=0, dtype=_accumulator_dtype(block.dtype))


class KrumAggregator(_StoredUpdatesAggregator):
    """Krum and Multi-Krum (Blanchard et al. 2017, https://arxiv.org/abs/1703.02757).

    Krum returns the update with the lowest score, the summed squared distance
    to its ``n - f - 2`` nearest other updates; Multi-Krum (``num_selected`` m > 1)
    averages, unweighted, the m updates with the lowest scores. Tolerates f
    Byzantine updates when ``n >= 2f + 3``; ``result`` raises ``ValueError``
    otherwise, or when ``m > n - f`` (more updates than are surely honest).

    Parameters
    ----------
    num_malicious : int
        f, the number of Byzantine updates to tolerate, >= 0.
    num_selected : int
        m, the number of updates averaged, >= 1 (1 = Krum).
    """

    def __init__(self, num_malicious: int = 0, num_selected: int = 1) -> None:
        super().__init__()
        self.num_malicious = _require_int("num_malicious", num_malicious, minimum=0)
        self.num_selected = _require_int("num_selected", num_selected, minimum=1)
        self._selected_indices: tuple[int, ...] = ()

    @property
    def selected_indices(self) -> tuple[int, ...]:
        """Indices (order of ``add``) of the updates chosen by the last ``result()``."""
        return self._selected_indices

    def result(self) -> NDArrays:
        """Return the Krum (or Multi-Krum) aggregate of the updates added so far."""
        self._require_updates()
        self._validate_counts()
        distances = compute_pairwise_squared_distances(self._updates)
        scores = compute_krum_scores(distances, self.num_malicious)
        selected = np.argsort(scores, kind="stable")[: self.num_selected]
        self._selected_indices = tuple(int(index) for index in selected)
        return self._reduce_each_array(_mean_of_block, self._selected_indices)

    def _validate_counts(self) -> None:
        num_updates, f = self._count, self.num_malicious
        if num_updates < 2 * f + 3:
            raise ValueError(
                f"krum needs n >= 2f + 3 updates: n={num_updates}, f={f} (needs {2 * f + 3})"
            )
        if self.num_selected > num_updates - f:
            raise ValueError(
                f"krum num_selected={self.num_selected} exceeds n - f = {num_updates - f}"
            )
