"""Aggregators of federated model updates: pure numpy, no flwr, no torch.

Every aggregator works on updates (client arrays minus the global arrays)::

    agg = make_aggregator("clipped", clip_norm=1.0)
    for update, weight in replies:
        agg.add(update, weight)
    delta = agg.result()

``base`` holds the interface and the checks every aggregator shares,
``streaming`` the O(model) weighted means, ``clipped`` the clipped mean with
Gaussian noise, ``robust`` the estimators that keep every update,
``factory`` the name -> aggregator map, and ``server_step`` the new global
model from an aggregated update (``global + server_lr * delta``, checked finite).
"""

from strategies.aggregation.base import (
    AGGREGATOR_NAMES,
    Aggregator,
    NDArrays,
    NonFiniteUpdateError,
    check_finite,
    compute_update_norm,
    difference_norm,
)
from strategies.aggregation.clipped import ClippedMeanAggregator
from strategies.aggregation.factory import make_aggregator
from strategies.aggregation.robust import (
    KrumAggregator,
    MedianAggregator,
    TrimmedMeanAggregator,
    compute_krum_scores,
    compute_pairwise_squared_distances,
)
from strategies.aggregation.streaming import WeightedMeanAggregator

__all__ = [
    "AGGREGATOR_NAMES",
    "Aggregator",
    "ClippedMeanAggregator",
    "KrumAggregator",
    "MedianAggregator",
    "NDArrays",
    "NonFiniteUpdateError",
    "TrimmedMeanAggregator",
    "WeightedMeanAggregator",
    "check_finite",
    "compute_krum_scores",
    "compute_pairwise_squared_distances",
    "compute_update_norm",
    "difference_norm",
    "make_aggregator",
]
