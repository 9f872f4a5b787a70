"""Flower's built-in strategies, driven reply by reply by the coordinator.

``FlowerStrategyAdapter`` offers the coordinator's interface
(``strategies.protocol.RoundStrategy``) around any Flower ``Strategy``:

- every reply is validated exactly as ``FedCoordStrategy`` validates it
  (``strategies.replies.TrainRound``), so one malformed reply is rejected
  instead of ending the run with ``InconsistentMessageReplies``;
- only accepted replies reach the Flower strategy, as fresh messages holding
  the arrays (in the global model's order) and the metrics all of them share,
  so Flower's in-place edits (FedMedian pops arrays, the DP wrappers replace
  them) never touch the coordinator's messages;
- ``configure_train`` is never called: it would sample nodes with
  ``strategy_utils.sample_nodes``, which waits forever for absent nodes. What
  it records is set here instead (FedOpt's ``current_arrays`` as numpy, FedAvgM's
  and the DP wrappers' as an ArrayRecord);
- the aggregate is checked against the global model (names, shapes, finite
  values) and cast back to its dtypes (FedAdam's step returns float64); when
  the round keeps the global model, the strategy's state (server moments,
  momentum, clipping norm) is restored to what it was before the round.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.app.exception import AppExitException
from flwr.common.logger import log
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping as DPServerSideAdaptiveClipping,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping as DPServerSideFixedClipping,
)
from flwr.serverapp.strategy import FedAvgM, Strategy
from flwr.serverapp.strategy.dp_adaptive_clipping import DifferentialPrivacyAdaptiveBase
from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase
from flwr.serverapp.strategy.fedopt import FedOpt

from strategies.aggregation.server_step import compute_new_global, find_non_finite_model
from strategies.protocol import RoundStrategy
from strategies.records import NamedArrays, arrays_to_numpy, is_packed, numpy_to_arrays
from strategies.replies import ReplyOutcome, RoundSummary, TrainRound
from strategies.sampling import NodeSampler, SamplesNodes
from task import keys

_DP_WRAPPERS = (DifferentialPrivacyFixedClippingBase, DifferentialPrivacyAdaptiveBase)
DP_NORM_KEY = "dp/clipping-norm"
# A metric of 1 in every reply handed to Flower's strategy: FedAvg(weighted_by_key=it)
# averages with equal weights, the sensitivity clip-norm / n that the DP wrappers'
# noise is calibrated to (Flower's own accounted mode requires equal weights too).
UNIT_WEIGHT_KEY = "fedcoord.unit-weight"


class FlowerStrategyAdapter(SamplesNodes, RoundStrategy):
    """Runs a Flower built-in strategy under the coordinator.

    Parameters
    ----------
    strategy : Strategy
        The Flower strategy whose ``aggregate_train`` computes the new model.
    name : str
        The strategy's run-config name, for logs and reasons.
    server_lr : float
        Step size on ``aggregate - global``. Pass 1.0 for strategies that apply
        a server step of their own (FedOpt family, FedAvgM).
    min_train_nodes : int
        Fewest accepted updates for a round to change the global model.
    seed : int
        Seeds node sampling.
    """

    def __init__(
        self,
        strategy: Strategy,
        name: str,
        server_lr: float = 1.0,
        min_train_nodes: int = 2,
        seed: int = 42,
    ) -> None:
        self.strategy = strategy
        self.name = name
        self.server_lr = server_lr
        self.min_train_nodes = min_train_nodes
        self.sampler = NodeSampler(seed)
        self._round = TrainRound(0, {})
        # Node id -> partition from the coordinator's roll call; None: no roll call
        self.node_partitions: Mapping[int, int | None] | None = None
        self._accepted: list[tuple[Message, ArrayRecord]] = []

    def set_node_partitions(self, partitions: Mapping[int, int | None]) -> None:
        """Check each reply's ``partition-id`` against ``partitions`` (kept, not copied)."""
        self.node_partitions = partitions

    def begin_round(self, server_round: int, global_arrays: Mapping[str, np.ndarray]) -> None:
        """Start collecting replies for ``server_round`` relative to ``global_arrays``."""
        self._round = TrainRound(server_round, global_arrays, self.node_partitions)
        self._accepted = []
        prepare_flower_round(self.strategy, self._round.global_arrays)

    def add_reply(self, reply: Message) -> ReplyOutcome:
        """Validate one training reply and keep it if accepted."""
        outcome, arrays = self._round.check(reply)
        if arrays is None:
            return outcome
        record = reply.content.array_records[keys.ARRAYS]
        names = self._round.global_arrays
        try:
            if is_packed(record):  # Flower's strategies read named records
                ordered = numpy_to_arrays({name: arrays[name] for name in names})
            else:
                ordered = ArrayRecord({name: record[name] for name in names})
        except (ValueError, TypeError, MemoryError) as error:
            return self._round.reject(outcome, f"update could not be kept: {error}")
        self._accepted.append((reply, ordered))
        return outcome

    def end_round(self) -> tuple[NamedArrays | None, RoundSummary]:
        """Aggregate the accepted replies with the Flower strategy."""
        shortfall = self._round.shortfall(self.min_train_nodes)
        if shortfall is not None:
            return None, self._round.summary(False, shortfall)
        replies = self._flower_replies()
        set_num_sampled_clients(self.strategy, len(replies))
        # Server moments, momentum and clipping norm as they were, in case the round is kept
        saved_state = flower_state_dict(self.strategy)
        try:
            record, _ = self.strategy.aggregate_train(self._round.server_round, replies)
        except (AppExitException, ValueError, ArithmeticError) as error:
            return self._keep(f"{type(error).__name__}: {error}", saved_state)
        if record is None:
            return self._keep("it returned no arrays", saved_state)
        aggregate, problem = conform_to_global(record, self._round.global_arrays)
        if aggregate is None:
            return self._keep(problem, saved_state)
        new_global, problem = self._step(aggregate)
        if new_global is None:
            return self._keep(problem, saved_state)
        return new_global, self._round.summary(True)

    def _keep(
        self, problem: str, saved_state: Mapping[str, np.ndarray]
    ) -> tuple[None, RoundSummary]:
        """Keep the global model and restore the strategy's state from before the round."""
        load_flower_state_dict(self.strategy, saved_state)
        reason = f"{self.name} could not aggregate: {problem.removesuffix(': global model kept')}"
        reason += "; global model kept"
        log(WARNING, "round %s: %s", self._round.server_round, reason)
        return None, self._round.summary(False, reason)

    def _flower_replies(self) -> list[Message]:
        """Fresh messages with the accepted arrays and the metrics every reply carries."""
        outcomes = self._round.accepted
        shared = set.intersection(*(set(o.metrics) for o in outcomes))
        messages = []
        for (reply, arrays), outcome in zip(self._accepted, outcomes, strict=True):
            metrics: dict[str, int | float | list[int] | list[float]] = {
                k: v for k, v in outcome.metrics.items() if k in shared
            }
            metrics[keys.NUM_EXAMPLES] = outcome.num_examples
            metrics[UNIT_WEIGHT_KEY] = 1
            content = RecordDict({keys.ARRAYS: arrays, keys.METRICS: MetricRecord(metrics)})
            # Keep the reply's metadata (node id, round): the public constructors
            # would need the ServerApp's TaskIdentity or make a reply to the reply.
            metadata = copy.copy(reply.metadata)
            messages.append(Message(content=content, metadata=metadata))  # type: ignore[call-overload]
        return messages

    def _step(self, aggregate: NamedArrays) -> tuple[NamedArrays | None, str]:
        """The new model: the aggregate itself at ``server-lr`` 1 (already checked finite)."""
        if self.server_lr == 1.0:
            return aggregate, ""
        current = self._round.global_arrays
        delta = [aggregate[name] - array for name, array in current.items()]
        return compute_new_global(current, delta, self.server_lr)

    def privacy_layer(self) -> Strategy | None:
        """The Flower DP wrapper this adapter runs (fixed or adaptive clipping), or None."""
        return dp_layer(self.strategy)

    def set_operator_weight(self, partition_id: int, weight: float) -> None:
        """Operator weights do not apply to Flower's strategies: log and ignore."""
        log(
            INFO,
            "operator weight %s for partition %s ignored: %s does not use operator weights",
            weight,
            partition_id,
            self.name,
        )

    def state_dict(self) -> dict[str, np.ndarray]:
        """What must survive a restart: sampler state and the Flower strategy's state."""
        return {**self.sampler.state_dict(), **flower_state_dict(self.strategy)}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the state saved by :meth:`state_dict`.

        Raises
        ------
        ValueError
            If ``state`` holds keys this strategy does not use.
        """
        self.sampler.load_state_dict(state)
        used = set(self.sampler.state_dict()) | load_flower_state_dict(self.strategy, state)
        unknown = set(state) - used
        if unknown:
            raise ValueError(f"unexpected strategy state keys for {self.name}: {sorted(unknown)}")


# ---------------------------------------------------------------------------
# What configure_train would have recorded, and the state to checkpoint
# ---------------------------------------------------------------------------


def strategy_layers(strategy: Strategy) -> Iterator[Strategy]:
    """Yield ``strategy`` and, for a DP wrapper, the strategies it wraps."""
    layer: Strategy | None = strategy
    while layer is not None:
        yield layer
        layer = layer.strategy if isinstance(layer, _DP_WRAPPERS) else None


def prepare_flower_round(strategy: Strategy, global_arrays: NamedArrays) -> None:
    """Record the global arrays where the strategy's ``configure_train`` would."""
    for layer in strategy_layers(strategy):
        if isinstance(layer, FedOpt):
            layer.current_arrays = dict(global_arrays)
        elif isinstance(layer, FedAvgM | DPServerSideFixedClipping | DPServerSideAdaptiveClipping):
            layer.current_arrays = numpy_to_arrays(global_arrays)


def dp_layer(strategy: Strategy) -> Strategy | None:
    """The DP wrapper among the strategy's layers (fixed or adaptive clipping), or None."""
    layers = (layer for layer in strategy_layers(strategy) if isinstance(layer, _DP_WRAPPERS))
    return next(layers, None)


def set_num_sampled_clients(strategy: Strategy, count: int) -> None:
    """Tell DP wrappers how many updates are averaged: their noise std is clip / count."""
    for layer in strategy_layers(strategy):
        if isinstance(layer, _DP_WRAPPERS):
            layer.num_sampled_clients = count


def conform_to_global(
    record: ArrayRecord, global_arrays: NamedArrays
) -> tuple[NamedArrays | None, str]:
    """Return the aggregate in the global model's order and dtypes, or a problem.

    Integer arrays are rounded to the nearest integer before the cast.
    """
    arrays = arrays_to_numpy(record)
    if set(arrays) != set(global_arrays):
        return None, "its arrays are not named like the model's"
    result: NamedArrays = {}
    for name, current in global_arrays.items():
        value = arrays[name]
        if value.shape != current.shape:
            return None, f"array {name!r} has shape {value.shape}, expected {current.shape}"
        if current.dtype.kind in "iu" and value.dtype.kind == "f":
            value = np.rint(value)
        result[name] = value.astype(current.dtype, copy=False)
    problem = find_non_finite_model(result)
    return (None, problem) if problem else (result, "")


def _named(prefix: str, arrays: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    return {f"{prefix}/{name}": np.array(a) for name, a in (arrays or {}).items()}


def _unnamed(prefix: str, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    start = len(prefix) + 1
    return {key[start:]: np.array(v) for key, v in state.items() if key.startswith(prefix + "/")}


def flower_state_dict(strategy: Strategy) -> dict[str, np.ndarray]:
    """Server optimiser moments, momentum and adaptive clipping norm, as arrays."""
    state: dict[str, np.ndarray] = {}
    for layer in strategy_layers(strategy):
        if isinstance(layer, FedOpt):
            state |= _named("fedopt/m_t", layer.m_t) | _named("fedopt/v_t", layer.v_t)
        elif isinstance(layer, FedAvgM) and layer.momentum_vector is not None:
            momentum = {f"{i:04d}": v for i, v in enumerate(layer.momentum_vector)}
            state |= _named("fedavgm/momentum", momentum)
        elif isinstance(layer, DifferentialPrivacyAdaptiveBase):
            state[DP_NORM_KEY] = np.array([layer.clipping_norm], dtype=np.float64)
    return state


def load_flower_state_dict(strategy: Strategy, state: Mapping[str, np.ndarray]) -> set[str]:
    """Restore what :func:`flower_state_dict` saved; return the keys it used."""
    used: set[str] = set()
    for layer in strategy_layers(strategy):
        if isinstance(layer, FedOpt):
            layer.m_t = _unnamed("fedopt/m_t", state) or None
            layer.v_t = _unnamed("fedopt/v_t", state) or None
            used |= {key for key in state if key.startswith(("fedopt/m_t/", "fedopt/v_t/"))}
        elif isinstance(layer, FedAvgM):
            momentum = _unnamed("fedavgm/momentum", state)
            layer.momentum_vector = [momentum[k] for k in sorted(momentum)] or None
            used |= {key for key in state if key.startswith("fedavgm/momentum/")}
        elif isinstance(layer, DifferentialPrivacyAdaptiveBase) and DP_NORM_KEY in state:
            layer.clipping_norm = float(np.asarray(state[DP_NORM_KEY]).reshape(-1)[0])
            used.add(DP_NORM_KEY)
    return used
