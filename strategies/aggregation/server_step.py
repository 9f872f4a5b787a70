"""The server step: a new global model from an aggregated update, checked finite.

Pure numpy, no flwr. Every new global model is made here:
``FedCoordStrategy.end_round`` (a synchronous round), FedBuff's buffer in
``server.async_rounds`` (an asynchronous version) and ``FlowerStrategyAdapter``
(a ``server-lr`` other than 1 on a Flower strategy's aggregate).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from strategies.validation import find_non_finite_array

NamedArrays = dict[str, np.ndarray]


def compute_new_global(
    global_arrays: Mapping[str, np.ndarray], delta: list[np.ndarray], server_lr: float
) -> tuple[NamedArrays | None, str]:
    """Return ``global + server_lr * delta`` and ``""``, or None and why it is refused.

    A new model that is not finite (:func:`find_non_finite_model`) is refused:
    the caller keeps the previous one, with the reason.
    """
    new_global = apply_update(global_arrays, delta, server_lr)
    problem = find_non_finite_model(new_global)
    return (None, problem) if problem is not None else (new_global, "")


def apply_update(
    global_arrays: Mapping[str, np.ndarray], delta: list[np.ndarray], server_lr: float
) -> NamedArrays:
    """Return ``global + server_lr * delta`` per array, keeping each dtype.

    An overflow gives infinities, not a warning: callers check the new model
    (:func:`find_non_finite_model`).
    """
    new_global: NamedArrays = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for (name, current), step in zip(global_arrays.items(), delta, strict=True):
            if np.issubdtype(current.dtype, np.integer):
                new_global[name] = current + np.round(server_lr * step).astype(current.dtype)
            else:
                new_global[name] = (current + server_lr * step).astype(current.dtype, copy=False)
    return new_global


def find_non_finite_model(arrays: Mapping[str, np.ndarray]) -> str | None:
    """Return why a new global model must not be accepted, or None if it is finite.

    A model that is not finite is never checkpointed or sent: the round keeps
    the previous one with this reason.
    """
    problem = find_non_finite_array(arrays)
    if problem is None:
        return None
    return f"new global model is not finite ({problem.removeprefix('array ')}): global model kept"
