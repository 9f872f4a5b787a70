"""FedBuff: asynchronous buffered aggregation, the pure part (numpy, no flwr).

FedBuff (Nguyen et al., AISTATS 2022, https://arxiv.org/abs/2106.06639) keeps K
trainings in flight. Each reply's update is ``client - version it trained
from``; it is weighted down by its staleness (how many versions were published
since that one) and folded into a buffer. Every ``buffer-size`` accepted
updates the buffer becomes a new version::

    version(v + 1) = version(v) + server_lr * sum_i (w_i * s(tau_i) * update_i) / sum_i w_i

with ``w_i`` the strategy's weight (examples for ``fedavg``, 1 for ``mean``, the
operator weight for ``weighted``) and ``s`` the staleness weight. Dividing by
``sum w_i`` rather than ``sum w_i * s(tau_i)`` is what makes a buffer of stale
updates a smaller step, as in the paper (which divides by the buffer size).
``clipped`` clips each update to ``clip-norm`` first, then scales it by
``s(tau)`` (<= 1, so each update still moves the average by at most
``clip-norm / B``) and averages with equal weights.

An update older than ``max-staleness`` versions is rejected, not folded. The
step itself, and the refusal of a version that is not finite, is that of a
synchronous round (:func:`strategies.aggregation.server_step.compute_new_global`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from strategies.aggregation import (
    ClippedMeanAggregator,
    NDArrays,
    WeightedMeanAggregator,
)
from task.config import ASYNC_STRATEGIES, STALENESS_WEIGHTS

__all__ = [
    "ASYNC_STRATEGIES",
    "STALENESS_WEIGHTS",
    "StalenessBuffer",
    "VersionHistory",
    "compute_staleness_weight",
    "find_staleness_problem",
]


def compute_staleness_weight(staleness: int, kind: str, exponent: float = 0.5) -> float:
    """``s(tau)``: 1 for ``constant``; ``1 / (1 + tau) ** exponent`` for ``polynomial``.

    Polynomial staleness weighting of FedBuff (exponent 0.5 in the paper) and of
    FedAsync (Xie et al. 2019, https://arxiv.org/abs/1903.03934).

    Raises
    ------
    ValueError
        For a negative staleness, an unknown kind or a negative exponent.
    """
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if exponent < 0 or not math.isfinite(exponent):
        raise ValueError(f"staleness exponent must be finite and >= 0, got {exponent}")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((1.0 + staleness) ** -exponent)
    raise ValueError(f"unknown staleness weight {kind!r}; valid: {', '.join(STALENESS_WEIGHTS)}")


def find_staleness_problem(trained_from: int, current: int, max_staleness: int) -> str | None:
    """Why an update trained from version ``trained_from`` is refused now, or None."""
    staleness = current - trained_from
    if staleness < 0:
        return f"update claims version {trained_from}, newer than the current {current}"
    if staleness > max_staleness:
        return (
            f"stale update: trained from version {trained_from}, now at version {current} "
            f"(staleness {staleness} > max-staleness={max_staleness})"
        )
    return None


class VersionHistory:
    """The global models that trainings in flight started from.

    A reply's update is ``client - the version it trained from``, so that version
    must be kept until its last training is folded or given up. Versions more
    than ``max_staleness`` behind the newest are dropped (their replies are
    rejected unread), so at most ``min(K, max_staleness + 1)`` models are held
    beside the newest: memory grows with ``min(concurrency, max-staleness + 1)``
    model copies, never with the run's length.

    Parameters
    ----------
    max_staleness : int
        Versions older than ``newest - max_staleness`` are dropped.
    """

    def __init__(self, max_staleness: int) -> None:
        self.max_staleness = max_staleness
        self._models: dict[int, Mapping[str, np.ndarray]] = {}
        self._users: dict[int, int] = {}
        self.newest = -1

    def publish(self, version: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Make ``arrays`` the newest version and drop the ones no longer needed."""
        self._models[version] = arrays
        self.newest = version
        self._prune()

    def checkout(self, version: int) -> Mapping[str, np.ndarray]:
        """Note one more training started from ``version``; return its arrays."""
        self._users[version] = self._users.get(version, 0) + 1
        return self._models[version]

    def get(self, version: int) -> Mapping[str, np.ndarray] | None:
        """The arrays of ``version``, or None if they were dropped."""
        return self._models.get(version)

    def release(self, version: int) -> None:
        """Note one training from ``version`` folded, rejected or given up."""
        left = self._users.get(version, 0) - 1
        if left > 0:
            self._users[version] = left
        else:
            self._users.pop(version, None)
        self._prune()

    @property
    def held(self) -> list[int]:
        """The versions whose models are held, oldest first."""
        return sorted(self._models)

    def _prune(self) -> None:
        oldest_useful = self.newest - self.max_staleness
        for version in list(self._models):
            too_old = version < oldest_useful
            if version != self.newest and (too_old or version not in self._users):
                del self._models[version]


class StalenessBuffer:
    """Folds staleness-weighted updates until ``buffer_size`` are in; one per version.

    Parameters
    ----------
    aggregator : str
        ``fedavg``, ``mean``, ``weighted`` or ``clipped``.
    buffer_size : int
        Accepted updates per new version (B).
    staleness_weight : str
        ``constant`` or ``polynomial``.
    exponent : float
        Exponent of ``polynomial``.
    clip_norm, noise_multiplier : float
        ``clipped`` only.
    seed : int or None
        ``clipped``: seed of this buffer's noise (derive a fresh one per version).
    """

    def __init__(  # noqa: PLR0913
        self,
        aggregator: str,
        buffer_size: int,
        staleness_weight: str = "polynomial",
        exponent: float = 0.5,
        clip_norm: float = 1.0,
        noise_multiplier: float = 0.0,
        seed: int | None = None,
    ) -> None:
        if aggregator not in ASYNC_STRATEGIES:
            raise ValueError(
                f"{aggregator!r} cannot aggregate asynchronously; valid: "
                f"{', '.join(ASYNC_STRATEGIES)}"
            )
        if buffer_size < 1:
            raise ValueError(f"buffer size must be >= 1, got {buffer_size}")
        compute_staleness_weight(0, staleness_weight, exponent)  # checks kind and exponent
        self.aggregator = aggregator
        self.buffer_size = buffer_size
        self.staleness_weight = staleness_weight
        self.exponent = exponent
        self._clipped = (
            ClippedMeanAggregator(clip_norm, noise_multiplier, seed)
            if aggregator == "clipped"
            else None
        )
        self._weighted = WeightedMeanAggregator(use_weights=True)
        self._base_weight = 0.0
        self._scaled_weight = 0.0
        self.stalenesses: list[int] = []

    @property
    def count(self) -> int:
        """Updates folded in so far."""
        return len(self.stalenesses)

    @property
    def full(self) -> bool:
        """Whether ``buffer_size`` updates are in: time to publish a version."""
        return self.count >= self.buffer_size

    def add_difference(
        self,
        clients: Sequence[np.ndarray],
        reference: Sequence[np.ndarray],
        weight: float,
        staleness: int,
    ) -> None:
        """Fold ``s(staleness) * (clients - reference)`` in with the strategy's ``weight``.

        Raises
        ------
        strategies.aggregation.streaming.NonFiniteUpdateError
            If a client array holds NaN or infinities (nothing folded in).
        ValueError
            For a bad weight or arrays that differ in layout (nothing folded in).
        """
        scale = compute_staleness_weight(staleness, self.staleness_weight, self.exponent)
        if self._clipped is not None:
            self._clipped.add_difference(clients, reference, scale=scale)
        else:
            base = 1.0 if self.aggregator == "mean" else float(weight)
            self._weighted.add_difference(clients, reference, base * scale)
            self._base_weight += base
            self._scaled_weight += base * scale
        self.stalenesses.append(staleness)

    def result(self) -> NDArrays:
        """The buffer's aggregated update (the step before ``server_lr``).

        Raises
        ------
        ValueError
            If no update was folded in, or their total weight is 0.
        """
        if self._clipped is not None:
            return self._clipped.result()
        averages = self._weighted.result()
        if self._base_weight <= 0.0:
            raise ValueError("total weight is 0: nothing to average")
        shrink = self._scaled_weight / self._base_weight  # mean staleness weight, in (0, 1]
        return [_scaled(array, shrink) for array in averages]

    def staleness_metrics(self) -> dict[str, float]:
        """``staleness-mean``, ``staleness-max`` and a histogram ``staleness-N`` (counts)."""
        if not self.stalenesses:
            return {}
        metrics = {
            "staleness-mean": float(np.mean(self.stalenesses)),
            "staleness-max": float(max(self.stalenesses)),
        }
        for staleness in sorted(set(self.stalenesses)):
            metrics[f"staleness-{staleness}"] = float(self.stalenesses.count(staleness))
        return metrics


def _scaled(array: np.ndarray, factor: float) -> np.ndarray:
    """``array * factor`` in its dtype; integer counters are left as they are."""
    if array.dtype.kind != "f" or factor == 1.0:
        return array
    return (array * factor).astype(array.dtype, copy=False)
