"""make_aggregator: an aggregator by name, its options checked."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from strategies.aggregation.base import AGGREGATOR_NAMES, Aggregator
from strategies.aggregation.clipped import ClippedMeanAggregator
from strategies.aggregation.robust import KrumAggregator, MedianAggregator, TrimmedMeanAggregator
from strategies.aggregation.streaming import WeightedMeanAggregator

_FACTORIES: dict[str, Callable[..., Aggregator]] = {
    "mean": partial(WeightedMeanAggregator, use_weights=False),
    "weighted": partial(WeightedMeanAggregator, use_weights=True),
    "fedavg": partial(WeightedMeanAggregator, use_weights=True),
    "clipped": ClippedMeanAggregator,
    "median": MedianAggregator,
    "trimmed-mean": TrimmedMeanAggregator,
    "krum": KrumAggregator,
}

_OPTIONS: dict[str, frozenset[str]] = {
    "mean": frozenset(),
    "weighted": frozenset(),
    "fedavg": frozenset(),
    "clipped": frozenset({"clip_norm", "noise_multiplier", "seed", "denominator"}),
    "median": frozenset(),
    "trimmed-mean": frozenset({"beta"}),
    "krum": frozenset({"num_malicious", "num_selected"}),
}


def make_aggregator(name: str, **options: Any) -> Aggregator:
    """Return a fresh aggregator for one round.

    Parameters
    ----------
    name : str
        One of ``AGGREGATOR_NAMES``.
    **options
        ``clipped``: ``clip_norm`` (> 0, default 1.0), ``noise_multiplier``
        (>= 0, default 0.0), ``seed`` (int or None), ``denominator`` (> 0 or
        None). ``trimmed-mean``: ``beta`` (in [0, 0.5), default 0.1). ``krum``:
        ``num_malicious`` (default 0), ``num_selected`` (default 1). The others
        take none.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the valid ones), an option the
        aggregator does not take, or an option value out of range.
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown aggregator {name!r}; valid names: {', '.join(AGGREGATOR_NAMES)}")
    unknown = sorted(set(options) - _OPTIONS[name])
    if unknown:
        accepted = ", ".join(sorted(_OPTIONS[name])) or "none"
        raise ValueError(
            f"aggregator {name!r} takes no option(s) {', '.join(unknown)}; accepted: {accepted}"
        )
    return _FACTORIES[name](**options)
