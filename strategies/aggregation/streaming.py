"""Streaming means: updates folded in place as they arrive, O(model) memory."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from strategies.aggregation.base import (
    _FOLD_BLOCK_BYTES,
    NDArrays,
    NonFiniteUpdateError,
    _accumulator_dtype,
    _AggregatorBase,
    _blocks,
    _finite_block,
    _to_arrays,
    _UpdateLayout,
    _validate_weight,
    check_finite,
)


class _StreamingSum:
    """Running sum of scaled updates, folded in place into preallocated accumulators.

    Memory is one accumulator per array plus one scratch block per accumulator
    dtype, whatever the number of updates folded in.
    """

    def __init__(self, layout: _UpdateLayout) -> None:
        self._sums = [
            np.zeros(math.prod(shape), dtype=_accumulator_dtype(dtype))
            for shape, dtype in zip(layout.shapes, layout.dtypes, strict=True)
        ]
        self._scratch: dict[np.dtype, np.ndarray] = {}
        self._spare: NDArrays | None = None  # second accumulators of fold_difference

    def fold(self, arrays: NDArrays, scales: Sequence[float]) -> None:
        """Add ``scales[k] * arrays[k]`` to the k-th accumulator, in place.

        Finite values may still sum past the dtype's range: that gives
        infinities, which the caller's check of the new model catches.
        """
        with np.errstate(over="ignore", invalid="ignore"):
            for total, array, scale in zip(self._sums, arrays, scales, strict=True):
                flat = array.reshape(-1)
                if scale == 1.0:
                    np.add(total, flat, out=total)
                elif scale != 0.0:
                    self._fold_scaled(total, flat, scale)

    def _fold_scaled(self, total: np.ndarray, flat: np.ndarray, scale: float) -> None:
        scratch = self._scratch_for(total.dtype)
        for start in range(0, total.size, scratch.size):
            stop = min(start + scratch.size, total.size)
            scaled = scratch[: stop - start]
            np.multiply(flat[start:stop], scale, out=scaled, dtype=total.dtype)
            np.add(total[start:stop], scaled, out=total[start:stop])

    def fold_difference(
        self, clients: NDArrays, references: NDArrays, relative: float, ratio: float
    ) -> None:
        """Set the sums to ``ratio * sums + relative * (clients - references)``, or raise.

        One blocked pass per array: each block of ``client - reference`` is
        computed into a scratch block in cache, checked for finiteness (float
        arrays), scaled and added. The results go into a second set of
        accumulators, swapped in only when every block was finite, so a
        rejected update leaves the sums exactly as they were.

        Raises
        ------
        NonFiniteUpdateError
            If a client's float array holds NaN or infinite values.
        """
        if self._spare is None:
            self._spare = [np.empty_like(total) for total in self._sums]
        with np.errstate(over="ignore", invalid="ignore"):
            arrays = zip(self._sums, self._spare, clients, references, strict=True)
            for index, (total, out, client, reference) in enumerate(arrays):
                checked = index if client.dtype.kind == "f" else None
                self._fold_blocks(total, out, client, reference, relative, ratio, checked)
        self._sums, self._spare = self._spare, self._sums

    def fold_scaled_difference(
        self, clients: NDArrays, references: NDArrays, scales: Sequence[float]
    ) -> None:
        """Add ``scales[k] * (clients[k] - references[k])`` to the sums, block by block.

        The caller has checked the clients' values (see :func:`difference_norm`).
        """
        with np.errstate(over="ignore", invalid="ignore"):
            for total, client, reference, scale in zip(
                self._sums, clients, references, scales, strict=True
            ):
                self._fold_blocks(total, total, client, reference, scale, 1.0, None)

    def _fold_blocks(  # noqa: PLR0913
        self,
        total: np.ndarray,
        out: np.ndarray,
        client: np.ndarray,
        reference: np.ndarray,
        scale: float,
        ratio: float,
        checked: int | None,
    ) -> None:
        """Set ``out = ratio * total + scale * (client - reference)``, block by block.

        Each block of the difference is computed into a scratch block in cache.
        With ``checked`` (the array's index in the update) each block is checked
        first and :class:`NonFiniteUpdateError` raised for a NaN or infinity.
        ``out`` may be ``total`` (in place).
        """
        flat_client, flat_reference = client.reshape(-1), reference.reshape(-1)
        scratch = self._scratch_for(total.dtype)
        for part in _blocks(total.size, scratch.size):
            difference = scratch[: part.stop - part.start]
            np.subtract(flat_client[part], flat_reference[part], out=difference, dtype=total.dtype)
            if checked is not None and not _finite_block(difference, flat_client[part]):
                raise NonFiniteUpdateError(checked)
            if scale != 1.0:
                np.multiply(difference, scale, out=difference)
            if ratio != 1.0:
                np.multiply(total[part], ratio, out=out[part])
                np.add(out[part], difference, out=out[part])
            else:
                np.add(total[part], difference, out=out[part])

    def _scratch_for(self, dtype: np.dtype) -> np.ndarray:
        if dtype not in self._scratch:
            largest = max(total.size for total in self._sums if total.dtype == dtype)
            size = max(1, min(largest, _FOLD_BLOCK_BYTES // dtype.itemsize))
            self._scratch[dtype] = np.empty(size, dtype=dtype)
        return self._scratch[dtype]

    def scale(self, factor: float) -> None:
        """Multiply every accumulator by ``factor`` in place."""
        for total in self._sums:
            np.multiply(total, factor, out=total, casting="unsafe")

    def averages(self, divisor: float) -> NDArrays:
        """Return each accumulator divided by ``divisor``, flat, in accumulator dtype."""
        return [np.divide(total, divisor) for total in self._sums]


class _StreamingAggregatorBase(_AggregatorBase):
    """Owns the running sum, created from the layout of the first update."""

    def __init__(self) -> None:
        super().__init__()
        self._sum: _StreamingSum | None = None

    def _streaming_sum(self) -> _StreamingSum:
        if self._sum is None:
            self._sum = _StreamingSum(self._require_layout())
        return self._sum

    def _require_layout(self) -> _UpdateLayout:
        if self._layout is None:
            raise ValueError("no updates to aggregate")
        return self._layout


class WeightedMeanAggregator(_StreamingAggregatorBase):
    """Weighted average of updates, streamed: ``sum(w_i * u_i) / sum(w_i)``.

    With ``w_i`` = number of examples this is FedAvg (McMahan et al. 2017,
    https://arxiv.org/abs/1602.05629); with ``w_i`` = the operator's node weight
    it is ``weighted``; with ``use_weights=False`` every weight is 1 (``mean``).

    Weights are normalised in float64 before any float32 arithmetic: each is
    folded in relative to the largest weight so far (a relative weight in
    (0, 1]), and when a larger one arrives the running sum is scaled down by
    the ratio. The float32 products can then never overflow, and weights of
    any scale (1e-300, 1e300, millions of examples) give the right mean; a
    weight below 1e-38 of the largest contributes nothing, as its share would
    round to nothing anyway. Updates of weight 0 are counted but not folded in.

    Parameters
    ----------
    use_weights : bool
        False ignores the ``weight`` passed to ``add`` (unweighted mean).
    """

    def __init__(self, *, use_weights: bool = True) -> None:
        super().__init__()
        self._use_weights = use_weights
        self._reference_weight = 0.0
        self._total_relative_weight = 0.0

    def add(self, update: Sequence[np.ndarray], weight: float = 1.0) -> None:
        """Fold in one update with its weight (ignored when ``use_weights`` is False)."""
        value = _validate_weight(weight) if self._use_weights else 1.0
        arrays = self._accept(update)
        relative = self._relative_weight(value)
        if relative > 0.0:
            self._streaming_sum().fold(arrays, [relative] * len(arrays))
        self._total_relative_weight += relative
        self._count += 1

    def add_difference(
        self, clients: Sequence[np.ndarray], references: Sequence[np.ndarray], weight: float = 1.0
    ) -> None:
        """Fold in the update ``clients - references`` without materialising it.

        The same result as ``add([c - r for c, r in zip(clients, references)], weight)``
        in one blocked pass per array, which also checks the clients' float values.

        Raises
        ------
        NonFiniteUpdateError
            If a client's float array holds NaN or infinite values; the update is
            then not folded in and not counted.
        ValueError
            For a bad weight or arrays that do not match the first update's layout.
        """
        value = _validate_weight(weight) if self._use_weights else 1.0
        arrays = self._accept(clients)
        self._require_layout().validate(_to_arrays(references))
        relative, ratio, reference_weight = self._relative_weight_and_ratio(value)
        if relative > 0.0:
            self._streaming_sum().fold_difference(arrays, list(references), relative, ratio)
            self._total_relative_weight *= ratio
            self._reference_weight = reference_weight
        else:  # weight 0: nothing to fold, but a malformed update is still refused
            check_finite(arrays)
        self._total_relative_weight += relative
        self._count += 1

    def _relative_weight_and_ratio(self, weight: float) -> tuple[float, float, float]:
        """``(weight / largest, old largest / new largest, new largest)``; changes nothing."""
        if weight <= 0.0:
            return 0.0, 1.0, self._reference_weight
        if weight <= self._reference_weight:
            return weight / self._reference_weight, 1.0, self._reference_weight
        has_sum = self._sum is not None and self._total_relative_weight > 0.0
        ratio = self._reference_weight / weight if has_sum else 1.0  # float64, in [0, 1)
        return 1.0, ratio, weight

    def result(self) -> NDArrays:
        """Return the weighted average of the updates added so far."""
        layout = self._require_updates()
        if self._sum is None or self._total_relative_weight <= 0.0:
            raise ValueError("total weight is 0: nothing to average")
        return layout.restore(self._sum.averages(self._total_relative_weight))

    def _relative_weight(self, weight: float) -> float:
        """``weight`` over the largest weight so far, after rescaling to a new largest."""
        relative, ratio, self._reference_weight = self._relative_weight_and_ratio(weight)
        if ratio != 1.0:
            self._streaming_sum().scale(ratio)
            self._total_relative_weight *= ratio
        return relative
