"""The Flower Strategy that applies our aggregators to client updates.

It works in two ways:

- as a drop-in Flower ``Strategy`` (``configure_train`` / ``aggregate_train`` /
  ``configure_evaluate`` / ``aggregate_evaluate``), so ``Strategy.start()`` runs it;
- reply by reply (``begin_round`` / ``add_reply`` / ``end_round``), so a
  coordinator folds each update in as it arrives and can close a round at its
  deadline.

Either way the new global model is ``global + server_lr * aggregate(updates)``,
where each update is ``client arrays - global arrays``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.aggregators import make_aggregator
from strategies.validation import ArraySpec, specs_from_arrays, validate_reply
from task import keys

NamedArrays = dict[str, np.ndarray]
WeightFn = Callable[[int, int, Mapping[str, float]], float]
"""(node_id, num_examples, metrics) -> aggregation weight."""


def arrays_to_numpy(record: ArrayRecord) -> NamedArrays:
    """Deserialise an ArrayRecord into named numpy arrays."""
    return {name: array.numpy() for name, array in record.items()}


def numpy_to_arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Serialise named numpy arrays into an ArrayRecord, keeping their order."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


@dataclass
class ReplyOutcome:
    """What happened to one reply: accepted, or rejected with a reason."""

    node_id: int
    accepted: bool
    reason: str = ""
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)


@dataclass
class RoundSummary:
    """Outcome of one aggregation round."""

    server_round: int
    accepted: int
    rejected: int
    updated: bool
    reason: str
    metrics: dict[str, float]


def weight_by_examples(node_id: int, num_examples: int, metrics: Mapping[str, float]) -> float:
    """FedAvg weighting: the number of training examples of the reply."""
    del node_id, metrics
    return float(num_examples)


def uniform_weight(node_id: int, num_examples: int, metrics: Mapping[str, float]) -> float:
    """Equal weight for every reply."""
    del node_id, num_examples, metrics
    return 1.0


class FedCoordStrategy(Strategy):
    """Streaming aggregation of validated client updates.

    Parameters
    ----------
    aggregator : str
        Name passed to :func:`strategies.aggregators.make_aggregator`.
    aggregator_options : Mapping[str, object]
        Keyword options for the aggregator (``clip_norm``, ``beta``, ...).
    weight_fn : WeightFn
        Weight of one reply given ``(node_id, num_examples, metrics)``.
    server_lr : float
        Step size applied to the aggregated update.
    fraction_train : float
        Share of available nodes sampled for training in ``configure_train``.
    min_train_nodes : int
        Fewest accepted updates for a round to change the global model.
    seed : int
        Seeds node sampling.
    """

    def __init__(  # noqa: PLR0913
        self,
        aggregator: str = "fedavg",
        aggregator_options: Mapping[str, object] | None = None,
        weight_fn: WeightFn = weight_by_examples,
        server_lr: float = 1.0,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        seed: int = 42,
    ) -> None:
        self.aggregator_name = aggregator
        self.aggregator_options = dict(aggregator_options or {})
        self.weight_fn = weight_fn
        self.server_lr = server_lr
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.rng = random.Random(seed)
        make_aggregator(aggregator, **self.aggregator_options)  # fail early on bad options
        self._round = 0
        self._global: NamedArrays = {}
        self._specs: dict[str, ArraySpec] = {}
        self._aggregator = make_aggregator(aggregator, **self.aggregator_options)
        self._replied: set[int] = set()
        self._outcomes: list[ReplyOutcome] = []

    # ------------------------------------------------------------------ sampling
    def sample_nodes(self, node_ids: Iterable[int], fraction: float, minimum: int) -> list[int]:
        """Sample ``fraction`` of ``node_ids`` (at least ``minimum``), reproducibly."""
        available = sorted(node_ids)
        count = min(len(available), max(minimum, math.ceil(fraction * len(available))))
        return sorted(self.rng.sample(available, count))

    # -------------------------------------------------------- per-reply interface
    def begin_round(self, server_round: int, global_arrays: Mapping[str, np.ndarray]) -> None:
        """Start folding replies for ``server_round`` relative to ``global_arrays``."""
        self._round = server_round
        self._global = dict(global_arrays)
        self._specs = specs_from_arrays(self._global)
        self._aggregator = make_aggregator(self.aggregator_name, **self._round_options())
        self._replied = set()
        self._outcomes = []

    def _round_options(self) -> dict[str, object]:
        """Aggregator options for this round: a seeded aggregator gets a fresh seed per round."""
        options = dict(self.aggregator_options)
        seed = options.get("seed")
        if isinstance(seed, int):
            options["seed"] = seed * 1_000_003 + self._round
        return options

    def add_reply(self, reply: Message) -> ReplyOutcome:
        """Validate one training reply and fold its update in, or reject it."""
        node_id = reply.metadata.src_node_id
        outcome = self._validate(reply)
        self._outcomes.append(outcome)
        if not outcome.accepted:
            return outcome
        client_arrays = arrays_to_numpy(reply.content.array_records[keys.ARRAYS])
        update = [client_arrays[name] - self._global[name] for name in self._global]
        weight = self.weight_fn(node_id, outcome.num_examples, outcome.metrics)
        self._aggregator.add(update, weight)
        return outcome

    def end_round(self) -> tuple[NamedArrays | None, RoundSummary]:
        """Close the round: the new global arrays (None if unchanged) and a summary."""
        accepted = [o for o in self._outcomes if o.accepted]
        rejected = len(self._outcomes) - len(accepted)
        metrics = aggregate_train_metrics(accepted)
        if len(accepted) < self.min_train_nodes:
            reason = (
                f"only {len(accepted)} accepted update(s), fewer than "
                f"min-train-nodes={self.min_train_nodes}: global model kept"
            )
            return None, RoundSummary(self._round, len(accepted), rejected, False, reason, metrics)
        delta = self._aggregator.result()
        new_global = apply_update(self._global, delta, self.server_lr)
        summary = RoundSummary(self._round, len(accepted), rejected, True, "", metrics)
        return new_global, summary

    def _validate(self, reply: Message) -> ReplyOutcome:
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            error = reply.error
            return ReplyOutcome(node_id, False, f"error reply: {error.code} {error.reason}")
        if node_id in self._replied:
            return ReplyOutcome(
                node_id, False, f"duplicate reply from node {node_id} in round {self._round}"
            )
        self._replied.add(node_id)
        content = reply.content
        metrics_record = content.metric_records.get(keys.METRICS)
        array_record = content.array_records.get(keys.ARRAYS)
        metrics = dict(metrics_record) if metrics_record is not None else None
        num_examples = metrics.get(keys.NUM_EXAMPLES) if metrics else None
        arrays = arrays_to_numpy(array_record) if array_record is not None else None
        reason = validate_reply(arrays, num_examples, metrics, self._specs)
        info_record = content.config_records.get(keys.INFO)
        info = {k: str(v) for k, v in info_record.items()} if info_record else {}
        if reason is not None:
            return ReplyOutcome(node_id, False, reason, info=info)
        float_metrics = {k: float(v) for k, v in (metrics or {}).items()}  # type: ignore[arg-type]
        return ReplyOutcome(node_id, True, "", int(num_examples), float_metrics, info)  # type: ignore[arg-type]

    # ---------------------------------------------------------- Flower hooks
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and build one train message each; remember the global arrays."""
        self.begin_round(server_round, arrays_to_numpy(arrays))
        return self._messages(server_round, arrays, config, grid, "train")

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fold every reply in and return the new global arrays and train metrics."""
        for reply in replies:
            self.add_reply(reply)
        new_global, summary = self.end_round()
        log(
            INFO,
            "round %s: %s accepted, %s rejected %s",
            server_round,
            summary.accepted,
            summary.rejected,
            summary.reason,
        )
        record = numpy_to_arrays(new_global) if new_global is not None else None
        return record, MetricRecord(summary.metrics)  # type: ignore[arg-type]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model to every available node for federated evaluation."""
        return self._messages(server_round, arrays, config, grid, "evaluate", fraction=1.0)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted average of the clients' evaluation metrics."""
        del server_round
        metrics = [dict(r.content[keys.METRICS]) for r in replies if not r.has_error()]
        result = aggregate_evaluate_metrics(metrics)  # type: ignore[arg-type]
        return MetricRecord(result) if result else None  # type: ignore[arg-type]

    def summary(self) -> None:
        """Log the strategy's settings."""
        log(
            INFO,
            "FedCoordStrategy: aggregator=%s options=%s server-lr=%s",
            self.aggregator_name,
            self.aggregator_options,
            self.server_lr,
        )

    def _messages(  # noqa: PLR0913
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        message_type: str,
        fraction: float | None = None,
    ) -> list[Message]:
        fraction = self.fraction_train if fraction is None else fraction
        node_ids = self.sample_nodes(grid.get_node_ids(), fraction, self.min_train_nodes)
        round_config = ConfigRecord({**dict(config), keys.SERVER_ROUND: server_round})
        content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: round_config})
        return [Message(content, node_id, message_type) for node_id in node_ids]


def apply_update(
    global_arrays: Mapping[str, np.ndarray], delta: list[np.ndarray], server_lr: float
) -> NamedArrays:
    """Return ``global + server_lr * delta`` per array, keeping each dtype."""
    new_global: NamedArrays = {}
    for (name, current), step in zip(global_arrays.items(), delta, strict=True):
        if np.issubdtype(current.dtype, np.integer):
            new_global[name] = current + np.round(server_lr * step).astype(current.dtype)
        else:
            new_global[name] = (current + server_lr * step).astype(current.dtype, copy=False)
    return new_global


def aggregate_train_metrics(outcomes: list[ReplyOutcome]) -> dict[str, float]:
    """Example-weighted mean of accepted replies' numeric metrics, plus totals."""
    total = sum(o.num_examples for o in outcomes)
    if not outcomes or total <= 0:
        return {}
    names = set.intersection(*(set(o.metrics) for o in outcomes))
    names -= {keys.NUM_EXAMPLES, keys.PARTITION_ID}
    result = {
        name: sum(o.metrics[name] * o.num_examples for o in outcomes) / total for name in names
    }
    result[keys.NUM_EXAMPLES] = float(total)
    return result


def aggregate_evaluate_metrics(metrics: list[Mapping[str, float]]) -> dict[str, float]:
    """Example-weighted mean of evaluation metrics."""
    usable = [m for m in metrics if m.get(keys.NUM_EXAMPLES, 0) > 0]
    total = sum(m[keys.NUM_EXAMPLES] for m in usable)
    if not usable:
        return {}
    names = set.intersection(*(set(m) for m in usable)) - {keys.NUM_EXAMPLES, keys.PARTITION_ID}
    result = {name: sum(m[name] * m[keys.NUM_EXAMPLES] for m in usable) / total for name in names}
    result[keys.NUM_EXAMPLES] = float(total)
    return result
