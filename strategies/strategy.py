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

from collections.abc import Callable, Iterable, Mapping
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.aggregation import (
    Aggregator,
    ClippedMeanAggregator,
    NonFiniteUpdateError,
    make_aggregator,
)
from strategies.aggregation.server_step import (
    apply_update,
    compute_new_global,
    find_non_finite_model,
)
from strategies.protocol import RoundStrategy
from strategies.records import NamedArrays, arrays_to_numpy, numpy_to_arrays
from strategies.replies import (
    ReplyOutcome,
    RoundSummary,
    TrainRound,
    aggregate_evaluate_metrics,
    aggregate_train_metrics,
)
from strategies.sampling import NodeSampler, SamplesNodes
from task import keys

__all__ = [
    "FedCoordStrategy",
    "NamedArrays",
    "OperatorWeights",
    "ReplyOutcome",
    "RoundSummary",
    "WeightFn",
    "aggregate_evaluate_metrics",
    "aggregate_train_metrics",
    "apply_update",
    "arrays_to_numpy",
    "find_non_finite_model",
    "numpy_to_arrays",
    "uniform_weight",
    "weight_by_examples",
]

WeightFn = Callable[[int, int, Mapping[str, float]], float]
"""(node_id, num_examples, metrics) -> aggregation weight."""

OPERATOR_WEIGHTS_KEY = "operator-weights"


def weight_by_examples(node_id: int, num_examples: int, metrics: Mapping[str, float]) -> float:
    """FedAvg weighting: the number of training examples of the reply."""
    del node_id, metrics
    return float(num_examples)


def uniform_weight(node_id: int, num_examples: int, metrics: Mapping[str, float]) -> float:
    """Equal weight for every reply."""
    del node_id, num_examples, metrics
    return 1.0


class OperatorWeights:
    """Weight of a reply: its partition's operator weight, 1.0 where none is set.

    A ``WeightFn`` whose weights the operator may change between rounds.

    Parameters
    ----------
    weights : Mapping[int, float]
        Operator weight by partition id.
    """

    def __init__(self, weights: Mapping[int, float] | None = None) -> None:
        self.weights: dict[int, float] = dict(weights or {})

    def __call__(self, node_id: int, num_examples: int, metrics: Mapping[str, float]) -> float:
        """Return the weight of a reply from its ``partition-id`` metric."""
        del node_id, num_examples
        partition = metrics.get(keys.PARTITION_ID)
        return self.weights.get(int(partition), 1.0) if partition is not None else 1.0


class FedCoordStrategy(SamplesNodes, Strategy, RoundStrategy):
    """Streaming aggregation of validated client updates.

    Parameters
    ----------
    aggregator : str
        Name passed to :func:`strategies.aggregation.streaming.make_aggregator`.
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
        self.sampler = NodeSampler(seed)
        self._aggregator: Aggregator = make_aggregator(aggregator, **self.aggregator_options)
        self._round = TrainRound(0, {})
        # Node id -> partition from the coordinator's roll call; None: no roll call
        self.node_partitions: Mapping[int, int | None] | None = None
        self._fixed_denominator = False
        self._scratch: NamedArrays = {}

    # -------------------------------------------------------- per-reply interface
    def set_node_partitions(self, partitions: Mapping[int, int | None]) -> None:
        """Check each reply's ``partition-id`` against ``partitions`` (kept, not copied)."""
        self.node_partitions = partitions

    def begin_round(
        self,
        server_round: int,
        global_arrays: Mapping[str, np.ndarray],
        *,
        denominator: float | None = None,
    ) -> None:
        """Start folding replies for ``server_round`` relative to ``global_arrays``.

        ``denominator`` (``clipped`` only) fixes the divisor of the sum of clipped
        updates (``ClippedMeanAggregator``): the round then releases a new model
        however many updates come in, none included, and ``min-train-nodes``
        does not apply, since a decision on the count would reveal it.
        """
        self._round = TrainRound(server_round, global_arrays, self.node_partitions)
        options = self._round_options()
        if denominator is not None:
            options["denominator"] = denominator
        self._aggregator = make_aggregator(self.aggregator_name, **options)
        self._fixed_denominator = False
        if denominator is not None and isinstance(self._aggregator, ClippedMeanAggregator):
            self._aggregator.expect(list(self._round.global_arrays.values()))
            self._fixed_denominator = True
        if not hasattr(self._aggregator, "add_difference"):
            self._scratch = reuse_buffers(self._scratch, self._round.global_arrays)

    def _round_options(self) -> dict[str, object]:
        """Aggregator options for this round: a seeded aggregator gets a fresh seed per round."""
        options = dict(self.aggregator_options)
        seed = options.get("seed")
        if isinstance(seed, int):
            options["seed"] = seed * 1_000_003 + self._round.server_round
        return options

    def add_reply(self, reply: Message) -> ReplyOutcome:
        """Validate one training reply and fold its update in, or reject it.

        The streaming aggregators fold ``client - global`` in one blocked pass
        per array that also checks the values (``add_difference``); for the
        others the update is computed into scratch buffers reused for every
        reply, and they copy what they keep.
        """
        fused = getattr(self._aggregator, "add_difference", None)
        outcome, client_arrays = self._round.check(reply, check_finite=fused is None)
        if client_arrays is None:
            return outcome
        names = list(self._round.global_arrays)
        try:
            weight = self.weight_fn(outcome.node_id, outcome.num_examples, outcome.metrics)
            if fused is not None:
                clients = [client_arrays[name] for name in names]
                fused(clients, list(self._round.global_arrays.values()), weight)
            else:
                update = [
                    np.subtract(client_arrays[name], current, out=self._scratch[name])
                    for name, current in self._round.global_arrays.items()
                ]
                self._aggregator.add(update, weight)
        except NonFiniteUpdateError as error:
            reason = f"array {names[error.index]!r} holds NaN or infinite values"
            return self._round.reject(outcome, reason)
        except (ValueError, ArithmeticError, MemoryError) as error:
            # Aggregators check an update (weight, layout) before folding any of it
            return self._round.reject(outcome, f"update could not be aggregated: {error}")
        return outcome

    def end_round(self) -> tuple[NamedArrays | None, RoundSummary]:
        """Close the round: the new global arrays (None if unchanged) and a summary."""
        shortfall = None if self._fixed_denominator else self._round.shortfall(self.min_train_nodes)
        if shortfall is not None:
            return None, self._round.summary(False, shortfall)
        try:
            delta = self._aggregator.result()
        except ValueError as error:  # e.g. krum with fewer than 2f + 3 updates
            reason = f"{self.aggregator_name} could not aggregate: {error}; global model kept"
            return None, self._round.summary(False, reason)
        new_global, problem = compute_new_global(self._round.global_arrays, delta, self.server_lr)
        if new_global is None:
            return None, self._round.summary(False, problem)
        return new_global, self._round.summary(True)

    # ------------------------------------------------------------------- state
    def set_operator_weight(self, partition_id: int, weight: float) -> None:
        """Set a partition's operator weight, used from the next reply on.

        Only the ``weighted`` strategy weighs replies by operator weight; for the
        others the call is logged and has no effect.
        """
        if isinstance(self.weight_fn, OperatorWeights):
            self.weight_fn.weights[int(partition_id)] = float(weight)
        else:
            log(INFO, "operator weights do not apply to aggregator %s", self.aggregator_name)

    def state_dict(self) -> dict[str, np.ndarray]:
        """What must survive a restart: the sampler's state and operator weights."""
        state = self.sampler.state_dict()
        if isinstance(self.weight_fn, OperatorWeights):
            items = sorted(self.weight_fn.weights.items())
            state[OPERATOR_WEIGHTS_KEY] = np.array(items, dtype=np.float64).reshape(-1, 2)
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the state saved by :meth:`state_dict`.

        Raises
        ------
        ValueError
            If ``state`` holds keys this strategy does not save.
        """
        expected = set(self.state_dict())
        unknown = set(state) - expected
        if unknown:
            raise ValueError(f"unexpected strategy state keys: {sorted(unknown)}")
        self.sampler.load_state_dict(state)
        if isinstance(self.weight_fn, OperatorWeights) and OPERATOR_WEIGHTS_KEY in state:
            pairs = np.asarray(state[OPERATOR_WEIGHTS_KEY], dtype=np.float64).reshape(-1, 2)
            self.weight_fn.weights = {int(p): float(w) for p, w in pairs}

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


def reuse_buffers(buffers: NamedArrays, like: Mapping[str, np.ndarray]) -> NamedArrays:
    """Return one writable buffer per array of ``like``, keeping matching old ones."""
    return {
        name: (
            buffers[name]
            if name in buffers
            and buffers[name].shape == array.shape
            and buffers[name].dtype == array.dtype
            else np.empty(array.shape, dtype=array.dtype)
        )
        for name, array in like.items()
    }
