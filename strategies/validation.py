"""Checks on one training reply before its update may touch the global model.

Pure numpy, no flwr. ``validate_reply`` returns ``None`` for a valid reply or a
short reason naming what is wrong; it never raises on malformed input, since a
malformed reply is the normal case it exists for. ``RoundReplyTracker`` rejects
a node's second reply in a round and ``RejectionLog`` counts rejections per node.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

# Reasons list at most this many array names, so that a reply with every array
# misnamed still yields a one-line reason.
_MAX_NAMES_IN_REASON = 5


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
) -> str | None:
    """Return None if the reply is valid, else a short reason naming the fault.

    Checks, in order: the array names match ``expected`` exactly; each array is a
    numpy array of the expected shape and dtype; every float value is finite;
    ``num_examples`` is a positive integer; every metric is a finite number.

    Parameters
    ----------
    arrays : Mapping[str, np.ndarray] or None
        The reply's arrays by name; None when the reply carried none.
    num_examples : object
        The reply's ``num-examples``. Accepted: an ``int`` or numpy integer >= 1,
        or a float equal to such an integer (``3.0``; Flower metrics may turn
        counts into floats). Rejected: ``bool``, non-integral or non-finite
        floats, strings, None.
    metrics : Mapping[str, object] or None
        The reply's metrics; None means no metrics. Each value must be an int or
        float (numpy scalars included), finite, and not a ``bool``; lists are
        rejected.
    expected : Mapping[str, ArraySpec]
        Name -> spec of every array the reply must carry, e.g. from
        ``specs_from_arrays(global_arrays)``.
    """
    return (
        find_array_names_problem(arrays, expected)
        or find_array_spec_problem(arrays or {}, expected)
        or find_non_finite_array(arrays or {})
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


def _all_finite(array: np.ndarray) -> bool:
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
        if array.dtype.kind in "fc" and not _all_finite(array):
            return f"array {name!r} holds NaN or infinite values"
    return None


def find_num_examples_problem(num_examples: object) -> str | None:
    """Return a reason unless ``num_examples`` is a positive integer (see ``validate_reply``)."""
    if isinstance(num_examples, bool | np.bool_):
        return f"num-examples must be a positive integer, got a bool ({num_examples!r})"
    if isinstance(num_examples, float | np.floating):
        if not math.isfinite(num_examples) or not float(num_examples).is_integer():
            return f"num-examples must be a positive integer, got {num_examples!r}"
    elif not isinstance(num_examples, int | np.integer):
        return f"num-examples must be a positive integer, got {type(num_examples).__name__}"
    if num_examples < 1:
        return f"num-examples must be a positive integer, got {num_examples!r}"
    return None


def _is_finite_number(value: object) -> bool:
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, int | np.integer):
        return True
    return isinstance(value, float | np.floating) and math.isfinite(value)


def find_metrics_problem(metrics: Mapping[str, object] | None) -> str | None:
    """Return a reason naming the first metric that is not a finite number."""
    for key, value in (metrics or {}).items():
        if not _is_finite_number(value):
            return f"metric {key!r} is not a finite number: {value!r}"
    return None


class RoundReplyTracker:
    """Remembers which nodes replied in one round, to reject a second reply.

    Check every reply, valid or not, before validating it: a node's first reply
    uses up its turn even if it is rejected.

    Parameters
    ----------
    server_round : int
        The round whose replies are tracked; start a new tracker each round.
    """

    def __init__(self, server_round: int) -> None:
        self.server_round = server_round
        self._replied: set[int] = set()

    @property
    def replied_nodes(self) -> frozenset[int]:
        """Node ids that have replied in this round."""
        return frozenset(self._replied)

    def check_duplicate(self, node_id: int) -> str | None:
        """Record a reply from ``node_id``; return a reason if it already replied."""
        if node_id in self._replied:
            return f"duplicate reply from node {node_id} in round {self.server_round}"
        self._replied.add(node_id)
        return None


@dataclass
class RejectionLog:
    """Rejected replies: how many per node, and every reason in arrival order."""

    counts: dict[int, int] = field(default_factory=dict)
    reasons: list[tuple[int, str]] = field(default_factory=list)

    def record(self, node_id: int, reason: str) -> None:
        """Count one rejected reply from ``node_id`` with its reason."""
        self.counts[node_id] = self.counts.get(node_id, 0) + 1
        self.reasons.append((node_id, reason))

    @property
    def total(self) -> int:
        """Number of rejected replies recorded."""
        return len(self.reasons)
