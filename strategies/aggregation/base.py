"""Aggregators of federated model updates: pure numpy, no flwr, no torch.

An update is the list of a client's arrays minus the global arrays. Every
aggregator is used the same way::

    agg = make_aggregator("clipped", clip_norm=1.0)
    for update, weight in replies:
        agg.add(update, weight)
    delta = agg.result()

``mean``, ``weighted``, ``fedavg`` and ``clipped`` stream: each update is folded
in place into preallocated accumulators as it arrives, so memory stays O(model)
however many clients reply. ``median``, ``trimmed-mean`` and ``krum`` keep a copy
of every update, which these estimators need.

Conventions shared by every aggregator:

- Inputs are never mutated. ``result()`` returns fresh arrays with each input
  array's shape and dtype, and leaves the aggregator usable (more ``add`` calls
  may follow).
- Float arrays are accumulated in float32 (float16 and float32 inputs) or in
  their own dtype (float64). Float32 accumulation measured 2.8x faster than
  float64 on the streaming path, and its rounding error over n updates is about
  sqrt(n) * 6e-8 (n * 6e-8 at worst) relative to the largest weighted term:
  far below the noise of SGD updates and the float32 storage of the model.
- Integer arrays (BatchNorm's ``num_batches_tracked``) are counters, not trained
  parameters. They are accumulated in float64 (exact up to 2**53) and the result
  is rounded to the nearest integer (ties to even) and cast back to the input's
  integer dtype. They take no part in the clipping norm, the Gaussian noise or
  Krum's distances, which are about parameters.
- ``add`` assumes finite values: ``strategies.validation.validate_reply``
  rejects replies with NaN or infinite values before they reach it. The
  streaming aggregators' ``add_difference`` checks them itself, in the same
  pass as the fold, and raises ``NonFiniteUpdateError`` without folding any.
- ``ValueError`` on no updates, a total weight of 0, a negative or non-finite
  weight, or updates whose array count, shapes or dtypes differ from the first.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from strategies.validation import all_finite

NDArrays = list[np.ndarray]

AGGREGATOR_NAMES: tuple[str, ...] = (
    "mean",
    "weighted",
    "fedavg",
    "clipped",
    "median",
    "trimmed-mean",
    "krum",
)

# Streaming folds work in blocks of this many bytes so that the scratch buffer
# stays in L2 cache: 3.8 ms per weighted fold of 11.2M float32 values, against
# 5.2 ms for one unblocked multiply-then-add.
_FOLD_BLOCK_BYTES = 1 << 20

# The robust aggregators stack the clients' values one block of coordinates at
# a time, so no (clients x model) array is built beside the stored updates.
_STACK_BLOCK_BYTES = 32 << 20


class Aggregator(Protocol):
    """What every aggregator offers."""

    @property
    def count(self) -> int:
        """Number of updates added so far."""
        ...

    def add(self, update: Sequence[np.ndarray], weight: float = 1.0) -> None:
        """Fold in one update (client arrays minus global arrays) with its weight."""
        ...

    def result(self) -> NDArrays:
        """Return the aggregated update, one array per input array."""
        ...


def _to_arrays(update: Sequence[np.ndarray]) -> NDArrays:
    """Return the update as a list of numpy arrays, without copying them."""
    if isinstance(update, np.ndarray):
        raise ValueError("an update is a list of arrays, not a single array")
    arrays = [np.asarray(array) for array in update]
    for index, array in enumerate(arrays):
        if array.dtype.kind not in "fiu":
            raise ValueError(
                f"array {index} has dtype {array.dtype}; only float and integer arrays "
                "can be aggregated"
            )
    return arrays


def _accumulator_dtype(dtype: np.dtype) -> np.dtype:
    """Return the dtype in which values of ``dtype`` are summed (see module doc)."""
    if dtype.kind == "f":
        return np.result_type(dtype, np.float32)
    return np.dtype(np.float64)


def _cast_back(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast accumulated values to ``dtype``, rounding to nearest for integers."""
    if dtype.kind in "iu":
        return np.rint(values).astype(dtype)
    return values.astype(dtype, copy=False)


def _validate_weight(weight: float) -> float:
    """Return ``weight`` as a float, or raise if it is negative or not finite."""
    try:
        value = float(weight)
    except (TypeError, ValueError) as error:
        raise ValueError(f"weight must be a number, got {weight!r}") from error
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"weight must be finite and >= 0, got {weight!r}")
    return value


class NonFiniteUpdateError(ValueError):
    """A client's array holds NaN or infinite values; nothing of it was folded in.

    Attributes
    ----------
    index : int
        Position of the first such array in the update.
    """

    def __init__(self, index: int) -> None:
        super().__init__(f"array {index} holds NaN or infinite values")
        self.index = index


def _blocks(size: int, block: int) -> Iterator[slice]:
    """Consecutive slices of at most ``block`` elements covering ``range(size)``."""
    for start in range(0, size, block):
        yield slice(start, min(start + block, size))


class _UpdateLayout:
    """Shapes and dtypes of the first update, which every later update must match."""

    def __init__(self, arrays: NDArrays) -> None:
        self.shapes = tuple(array.shape for array in arrays)
        self.dtypes = tuple(array.dtype for array in arrays)
        self.is_float = tuple(dtype.kind == "f" for dtype in self.dtypes)

    def validate(self, arrays: NDArrays) -> None:
        """Raise ``ValueError`` unless ``arrays`` matches this layout."""
        if len(arrays) != len(self.shapes):
            raise ValueError(f"update has {len(arrays)} arrays, expected {len(self.shapes)}")
        for index, array in enumerate(arrays):
            if array.shape != self.shapes[index]:
                raise ValueError(
                    f"array {index} has shape {array.shape}, expected {self.shapes[index]}"
                )
            if array.dtype != self.dtypes[index]:
                raise ValueError(
                    f"array {index} has dtype {array.dtype}, expected {self.dtypes[index]}"
                )

    def restore(self, flat_results: NDArrays) -> NDArrays:
        """Reshape flat results and cast them back to the input dtypes."""
        return [
            _cast_back(flat.reshape(shape), dtype)
            for flat, shape, dtype in zip(flat_results, self.shapes, self.dtypes, strict=True)
        ]


class _AggregatorBase:
    """Counts updates and checks each against the layout of the first."""

    def __init__(self) -> None:
        self._layout: _UpdateLayout | None = None
        self._count = 0

    @property
    def count(self) -> int:
        """Number of updates added so far."""
        return self._count

    def _accept(self, update: Sequence[np.ndarray]) -> NDArrays:
        arrays = _to_arrays(update)
        if self._layout is None:
            self._layout = _UpdateLayout(arrays)
        else:
            self._layout.validate(arrays)
        return arrays

    def _require_updates(self) -> _UpdateLayout:
        if self._layout is None or self._count == 0:
            raise ValueError("no updates to aggregate")
        return self._layout


def _sum_of_squares(flat: np.ndarray) -> float:
    """Return the sum of squares of ``flat``, block by block, summed in float64."""
    block = max(1, _FOLD_BLOCK_BYTES // flat.itemsize)
    total = 0.0
    for start in range(0, flat.size, block):
        part = flat[start : start + block]
        if part.dtype.itemsize < 4:
            part = part.astype(np.float32)
        with np.errstate(over="ignore"):
            squares = float(np.dot(part, part))
        if not math.isfinite(squares):  # float32 overflow of huge but finite values
            part = part.astype(np.float64)
            squares = float(np.dot(part, part))
        total += squares
    return total


def compute_update_norm(update: Sequence[np.ndarray]) -> float:
    """Return the L2 norm of an update's float arrays taken together.

    Integer arrays (counters such as ``num_batches_tracked``) are left out.
    Squares are summed by BLAS in float32 within blocks of 1 MiB and in float64
    across blocks: the norm is exact to about 1e-6 relative, so an update whose
    norm is within that of ``clip_norm`` may or may not count as clipped.
    """
    arrays = _to_arrays(update)
    squares = sum(_sum_of_squares(a.reshape(-1)) for a in arrays if a.dtype.kind == "f")
    return math.sqrt(squares)


def _finite_block(difference: np.ndarray, client: np.ndarray) -> bool:
    """Whether ``client`` (a block) is finite, given ``difference = client - reference``.

    One BLAS pass: a sum of squares is finite whenever every value is. When it
    is not (a NaN or infinity, or only huge finite values whose squares or
    difference overflow), the client's values decide, element-wise.
    """
    if math.isfinite(float(np.dot(difference, difference))):
        return True
    return bool(np.isfinite(client).all())


def check_finite(arrays: NDArrays) -> None:
    """Raise :class:`NonFiniteUpdateError` for the first float array with NaN or infinities."""
    for index, array in enumerate(arrays):
        if array.dtype.kind == "f" and not all_finite(array):
            raise NonFiniteUpdateError(index)


def difference_norm(clients: NDArrays, references: NDArrays) -> float:
    """L2 norm of ``clients - references`` over the float arrays, in blocks in cache.

    The same norm as :func:`compute_update_norm` of the difference, without
    materialising it.

    Raises
    ------
    NonFiniteUpdateError
        If a client's float array holds NaN or infinite values.
    """
    squares = 0.0
    for index, (client, reference) in enumerate(zip(clients, references, strict=True)):
        if client.dtype.kind != "f":
            continue
        flat_client, flat_reference = client.reshape(-1), reference.reshape(-1)
        dtype = np.result_type(client.dtype, np.float32)
        scratch = np.empty(min(flat_client.size, _FOLD_BLOCK_BYTES // dtype.itemsize), dtype)
        for part in _blocks(flat_client.size, max(1, scratch.size)):
            difference = scratch[: part.stop - part.start]
            with np.errstate(over="ignore", invalid="ignore"):
                np.subtract(flat_client[part], flat_reference[part], out=difference, dtype=dtype)
            block_squares = _sum_of_squares(difference)
            if not math.isfinite(block_squares) and not np.isfinite(flat_client[part]).all():
                raise NonFiniteUpdateError(index)
            squares += block_squares
    return math.sqrt(squares)


def _require_number(name: str, value: float, *, minimum: float, inclusive: bool = True) -> float:
    """Return ``value`` as a float, or raise unless it is finite and above ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    too_small = number < minimum if inclusive else number <= minimum
    if not math.isfinite(number) or too_small:
        bound = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be finite and {bound} {minimum}, got {value!r}")
    return number


def _require_int(name: str, value: int, *, minimum: int) -> int:
    """Return ``value`` as an int, or raise unless it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _require_seed(seed: int | None) -> int | None:
    if seed is None:
        return None
    return _require_int("seed", seed, minimum=0)
