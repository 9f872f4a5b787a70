"""Checks on one training reply before its update may touch the global model.

Pure numpy, no flwr. ``validate_reply`` returns ``None`` for a valid reply or a
short reason naming what is wrong; it never raises on malformed input, since a
malformed reply is the normal case it exists for.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from task import keys

# Reasons list at most this many array names, so that a reply with every array
# misnamed still yields a one-line reason.
_MAX_NAMES_IN_REASON = 5
# The largest count kept exact as a float64 and in SQLite's int64 columns.
MAX_NUM_EXAMPLES = 2**53
# Partition ids are in [-1, 2^31); -1 labels a node with its own data and no partition.
NO_PARTITION = -1
MAX_PARTITION_ID = 2**31 - 1
# A reply carries at most this many metrics, each named in at most this many characters.
MAX_METRICS = 64
MAX_METRIC_NAME = 100
# Characters a metric name may use: those MLflow, TensorBoard and CSV take as they are
METRIC_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-/ ]+")
# The range each known metric must lie in (bounds included).
METRIC_RANGES: dict[str, tuple[float, float]] = {
    keys.TRAIN_LOSS: (0.0, math.inf),
    keys.EVAL_LOSS: (0.0, math.inf),
    keys.TRAIN_ACCURACY: (0.0, 1.0),
    keys.EVAL_ACCURACY: (0.0, 1.0),
    keys.TRAIN_SECONDS: (0.0, math.inf),
}
# Metrics every evaluate reply must carry.
EVALUATE_METRICS = (keys.NUM_EXAMPLES, keys.EVAL_LOSS, keys.EVAL_ACCURACY)


@dataclass(frozen=True)
class ArraySpec:
    """Shape and dtype a reply's array must have."""

    shape: tuple[int, ...]
    dtype: np.dtype


def specs_from_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, ArraySpec]:
    """Return the spec of each array, e.g. of the global model sent to the clients."""
    return {
        name: ArraySpec(tuple(array.shape), np.dtype(array.dtype)) for name, array in arrays.items()
    }


def ordered_arrays(
    arrays: Mapping[str, np.ndarray], expected: Mapping[str, ArraySpec]
) -> list[np.ndarray]:
    """Return a validated reply's arrays as a list in the order of ``expected``.

    Replies are matched by name, not by order: use this to build the update list
    that aggregators take.
    """
    return [arrays[name] for name in expected]


def validate_reply(
    arrays: Mapping[str, np.ndarray] | None,
    num_examples: object,
    metrics: Mapping[str, object] | None,
    expected: Mapping[str, ArraySpec],
    *,
    check_finite: bool = True,
) -> str | None:
    """Return None if the reply is valid, else a short reason naming the fault.

    Checks, in order: the array names match ``expected`` exactly; each array is a
    numpy array of the expected shape and dtype; every float value is finite;
    ``num_examples`` is a positive integer that a count can hold; every metric
    is a finite number of its kind (``partition-id`` an integer in [-1, 2^31)).

    Parameters
    ----------
    arrays : Mapping[str, np.ndarray] or None
        The reply's arrays by name; None when the reply carried none.
    num_examples : object
        The reply's ``num-examples``. Accepted: an ``int`` or numpy integer in
        [1, 2^53], or a float equal to such an integer (``3.0``; Flower metrics
        may turn counts into floats). Rejected: ``bool``, non-integral or
        non-finite floats, larger counts, strings, lists, None.
    metrics : Mapping[str, object] or None
        The reply's metrics; None means no metrics. See :func:`find_metrics_problem`.
    expected : Mapping[str, ArraySpec]
        Name -> spec of every array the reply must carry, e.g. from
        ``specs_from_arrays(global_arrays)``.
    check_finite : bool
        False leaves the finiteness of the values to the caller, which checks
        them while it folds the update in (``add_difference`` of the streaming
        aggregators).
    """
    return (
        find_array_names_problem(arrays, expected)
        or find_array_spec_problem(arrays or {}, expected)
        or (find_non_finite_array(arrays or {}) if check_finite else None)
        or find_num_examples_problem(num_examples)
        or find_metrics_problem(metrics)
    )


def _quoted_names(names: Iterable[str]) -> str:
    ordered = sorted(names)
    shown = ", ".join(repr(name) for name in ordered[:_MAX_NAMES_IN_REASON])
    hidden = len(ordered) - _MAX_NAMES_IN_REASON
    return f"{shown} and {hidden} more" if hidden > 0 else shown


def find_array_names_problem(
    arrays: Mapping[str, np.ndarray] | None, expected: Mapping[str, ArraySpec]
) -> str | None:
    """Return a reason if arrays are absent, missing, extra or misnamed."""
    if arrays is None:
        return "reply carries no arrays"
    missing = set(expected) - set(arrays)
    extra = set(arrays) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing arrays: {_quoted_names(missing)}")
    if extra:
        problems.append(f"unexpected arrays: {_quoted_names(extra)}")
    return "; ".join(problems) or None


def find_array_spec_problem(
    arrays: Mapping[str, np.ndarray], expected: Mapping[str, ArraySpec]
) -> str | None:
    """Return a reason if an array is not a numpy array of the expected shape and dtype."""
    for name, spec in expected.items():
        if name not in arrays:
            continue  # reported by find_array_names_problem
        array = arrays[name]
        if not isinstance(array, np.ndarray):
            return f"array {name!r} is a {type(array).__name__}, not a numpy array"
        if tuple(array.shape) != tuple(spec.shape):
            return f"array {name!r} has shape {array.shape}, expected {tuple(spec.shape)}"
        if array.dtype != spec.dtype:
            return f"array {name!r} has dtype {array.dtype}, expected {np.dtype(spec.dtype)}"
    return None


def all_finite(array: np.ndarray) -> bool:
    """Return whether every value of a float or complex array is finite."""
    if array.dtype in (np.float32, np.float64):
        # Fast path (one BLAS pass, no temporary): a sum of squares is finite
        # whenever every value is, since squares are >= 0 and cannot cancel an
        # infinity. It can also overflow for huge finite values, so a non-finite
        # result is confirmed element-wise.
        flat = array.reshape(-1)
        with np.errstate(over="ignore"):
            sum_of_squares = float(np.dot(flat, flat))
        if math.isfinite(sum_of_squares):
            return True
    return bool(np.isfinite(array).all())


def find_non_finite_array(arrays: Mapping[str, np.ndarray]) -> str | None:
    """Return a reason naming the first array holding a NaN or infinite value."""
    for name, array in arrays.items():
        if array.dtype.kind in "fc" and not all_finite(array):
            return f"array {name!r} holds NaN or infinite values"
    return None


def find_integer_problem(name: str, value: object, minimum: int, maximum: int) -> str | None:
    """Return a reason unless ``value`` is an integer in ``[minimum, maximum]``.

    Accepted: an ``int`` or numpy integer, or a finite float equal to one
    (``3.0``: Flower metrics may turn counts into floats). Rejected: ``bool``,
    non-integral or non-finite floats, lists, strings, None, and integers out of
    range (``num-examples 1e+19 exceeds 9007199254740992``).
    """
    if isinstance(value, np.generic):
        value = value.item()  # plain Python scalars: exact comparisons, short reprs
    if isinstance(value, bool):
        return f"{name} must be an integer, got a bool ({value!r})"
    if isinstance(value, float):
        if not math.isfinite(value) or not float(value).is_integer():
            return f"{name} must be an integer, got {value!r}"
    elif not isinstance(value, int):
        return f"{name} must be an integer, got {type(value).__name__}"
    if value < minimum:
        return f"{name} must be >= {minimum}, got {value!r}"
    if value > maximum:
        return f"{name} {value!r} exceeds {maximum}"
    return None


def find_num_examples_problem(num_examples: object, minimum: int = 1) -> str | None:
    """Return a reason unless ``num_examples`` is an integer in ``[minimum, 2^53]``."""
    return find_integer_problem(keys.NUM_EXAMPLES, num_examples, minimum, MAX_NUM_EXAMPLES)


def find_partition_id_problem(partition_id: object) -> str | None:
    """Return a reason unless ``partition_id`` is None (absent) or an integer in [-1, 2^31)."""
    if partition_id is None:
        return None
    return find_integer_problem(keys.PARTITION_ID, partition_id, NO_PARTITION, MAX_PARTITION_ID)


def _is_finite_number(value: object) -> bool:
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, int | np.integer):
        return True
    return isinstance(value, float | np.floating) and math.isfinite(value)


def find_metrics_problem(metrics: Mapping[str, object] | None) -> str | None:
    """Return a reason naming the first metric that is not a number of its kind.

    Every metric is a finite int or float scalar (not a bool, list or string);
    the known ones lie in their range (``METRIC_RANGES``: losses >= 0,
    accuracies in [0, 1]), ``partition-id`` in [-1, 2^31) (:func:`find_partition_id_problem`).
    A reply carries at most ``MAX_METRICS`` metrics with names of at most
    ``MAX_METRIC_NAME`` characters from ``METRIC_NAME_PATTERN``. ``num-examples``
    is checked on its own.
    """
    metrics = metrics or {}
    if len(metrics) > MAX_METRICS:
        return f"reply carries {len(metrics)} metrics, more than {MAX_METRICS}"
    for key, value in metrics.items():
        if not isinstance(key, str) or len(key) > MAX_METRIC_NAME:
            return f"metric name {key!r:.{MAX_METRIC_NAME}} is not a short string"
        if not METRIC_NAME_PATTERN.fullmatch(key):
            return (
                f"metric name {key!r:.{MAX_METRIC_NAME}} uses characters other than "
                "letters, digits, '_', '-', '.', '/' and spaces"
            )
        if key == keys.NUM_EXAMPLES:
            continue
        if not _is_finite_number(value):
            return f"metric {key!r} is not a finite number: {value!r:.100}"
        if key == keys.PARTITION_ID:
            problem = find_partition_id_problem(value)
            if problem is not None:
                return problem
        low, high = METRIC_RANGES.get(key, (-math.inf, math.inf))
        if not low <= value <= high:  # type: ignore[operator]
            return f"metric {key!r} {value!r} is outside [{low:g}, {high:g}]"
    return None


def find_evaluate_problem(metrics: Mapping[str, object] | None) -> str | None:
    """Return None if an evaluate reply's metrics are usable, else a short reason.

    The reply must carry ``num-examples`` (an integer >= 0), ``eval-loss`` (finite,
    >= 0) and ``eval-accuracy`` (in [0, 1]); every metric is checked as by
    :func:`find_metrics_problem`.
    """
    if metrics is None:
        return "evaluate reply carries no metrics"
    missing = [key for key in EVALUATE_METRICS if key not in metrics]
    if missing:
        return f"evaluate reply lacks {', '.join(missing)}"
    return find_num_examples_problem(metrics[keys.NUM_EXAMPLES], minimum=0) or (
        find_metrics_problem(metrics)
    )
