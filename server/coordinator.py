"""The coordinator: drives rounds on the Grid itself and records them in the run store.

Flower's ``Strategy.start()`` sends a round's messages and blocks until every
reply is in. The coordinator instead pushes messages, pulls replies with a
short poll interval and folds each one into the strategy as it arrives, so a
round closes as soon as its replies are in, or at ``round-timeout`` with what
arrived.

Replies come from untrusted nodes. The strategy checks each one
(``strategies.replies``); anything that still goes wrong while reading,
validating, recording or folding ONE reply is caught where the reply is handed
over (:meth:`server.phases.PhaseRunner.dispatch`), recorded as that reply's
rejection with the exception named, and counted against its node: the round
and the run go on. A new global model that is not finite is never
checkpointed or sent.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, ConfigRecordValues, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from server.control import ControlChannel
from server.phases import PhaseRunner
from server.record.round_result import (
    RoundResult,
    record_initial_evaluation,
    record_round_result,
)
from server.record.runs import ROLL_CALL_REFUSED, ROLL_CALL_TRANSFERRED
from server.record.store import RoundRecord, RunStore
from strategies.accountant import EPSILON_METRIC
from strategies.accounted import accounted
from strategies.protocol import AccountedRounds, RoundStrategy
from strategies.records import pack_arrays
from strategies.replies import ReplyOutcome, check_evaluate_reply
from strategies.strategy import (
    NamedArrays,
    aggregate_evaluate_metrics,
    find_non_finite_model,
)
from strategies.validation import find_partition_id_problem
from task import keys
from task.config import RunConfig
from task.text import escape_unprintable

EvaluateFn = Callable[[NamedArrays], tuple[float, float]]
"""Central evaluation: global arrays -> (loss, accuracy)."""

NODE_POLL_INTERVAL_S = 0.5
NODE_SETTLE_S = 1.0


class NodeShortageError(RuntimeError):
    """Fewer nodes than ``min-train-nodes`` registered within the wait limit."""


def recorded_partitions(store: RunStore) -> dict[int, int | None]:
    """Node id -> the partition the run's node rows record for it (a resumed run's roll call)."""
    partitions: dict[int, int | None] = {}
    for row in store.nodes():
        node_id, partition = row["node_id"], row["partition_id"]
        if isinstance(node_id, int | str) and str(node_id).isdigit():
            partitions[int(node_id)] = partition if isinstance(partition, int) else None
    return partitions


class Coordinator:
    """Owns the round loop of one run.

    Parameters
    ----------
    grid : Grid
        Flower's Grid for this run.
    strategy : RoundStrategy
        Folds replies into the new global model; wrapped with sampling and
        privacy accounting unless it already is (``strategies.accounted``).
    store : RunStore
        The run's store; every completed round is written to it.
    config : RunConfig
        The parsed run configuration.
    evaluate_fn : EvaluateFn
        Central evaluation of the global arrays on the held-out test set.
    """

    def __init__(
        self,
        grid: Grid,
        strategy: RoundStrategy,
        store: RunStore,
        config: RunConfig,
        evaluate_fn: EvaluateFn,
    ) -> None:
        self.grid = grid
        self.strategy: AccountedRounds = accounted(strategy, config)  # sampling and accounting
        self.store = store
        self.config = config
        self.evaluate_fn = evaluate_fn
        self._aggregation_s = 0.0
        self._record_cache: tuple[NamedArrays, ArrayRecord] | None = None
        self.operator_weights = dict(config.node_weights)
        self.control = ControlChannel(store, self._set_operator_weight)
        self.phases = PhaseRunner(grid, store, self.control, config.round_timeout, self._reject)
        # Node id -> partition id from the roll call (None: asked, no valid answer);
        # the strategy checks each reply's partition-id against it
        # Kept for the whole run, also for nodes that left, and taken back from the run's
        # node rows on resume: a node's identity never changes by leaving and returning
        self.partitions: dict[int, int | None] = recorded_partitions(store)
        # Node id -> roll calls it did not answer, while it is not known
        self._roll_call_asked: dict[int, int] = {}
        self.strategy.set_node_partitions(self.partitions)

    # ------------------------------------------------------------------ run
    def run(self, initial_arrays: NamedArrays, first_round: int = 1) -> NamedArrays:
        """Run rounds ``first_round..num-server-rounds`` and return the final arrays."""
        arrays = initial_arrays
        if first_round == 1:
            self._record_initial_evaluation(arrays)
        for server_round in range(first_round, self.config.num_server_rounds + 1):
            self.control.between_rounds()
            arrays = self.run_round(server_round, arrays)
        return arrays

    def run_round(self, server_round: int, arrays: NamedArrays) -> NamedArrays:
        """Run one round in four phases and return the (possibly unchanged) global arrays."""
        started = time.time()
        self._aggregation_s = 0.0
        # 1. Sample nodes and send them the global model
        node_ids = self.wait_for_nodes()
        self.strategy.check_budget(server_round, len(node_ids))  # may end the run
        self._roll_call(server_round, node_ids)
        sampled = self.strategy.sample_train_nodes(node_ids, self._node_key)
        self.strategy.begin_round(server_round, arrays)
        # 2. Fold replies in the sample's order as they come, until all are in or
        #    the deadline passes
        train_started = time.perf_counter()
        content = self._model_content(server_round, arrays)
        train = self.phases.run(server_round, "train", sampled, content, self._fold_reply)
        train_s = time.perf_counter() - train_started
        with self._timed_aggregation():
            new_arrays, summary = self.strategy.end_round()
        problem = find_non_finite_model(new_arrays) if new_arrays is not None else None
        if problem is not None:  # whatever the strategy: never checkpoint or send it
            new_arrays, summary = None, dataclasses.replace(summary, updated=False, reason=problem)
        if new_arrays is None:
            log(WARNING, "round %s: %s", server_round, summary.reason)
            self.store.add_event("round-kept", f"round {server_round}: {summary.reason}")
        arrays = new_arrays if new_arrays is not None else arrays
        # 3. Evaluate centrally and on the clients' local test splits
        central_started = time.perf_counter()
        central_loss, central_accuracy = self.evaluate_fn(arrays)
        federated_started = time.perf_counter()
        federated = self._evaluate_federated(
            server_round, arrays, self._evaluation_nodes(server_round, node_ids)
        )
        federated_s = time.perf_counter() - federated_started
        # 4. Record the round
        metrics = {
            **{f"train-{k.removeprefix('train-')}": v for k, v in summary.metrics.items()},
            "central-loss": central_loss,
            "central-accuracy": central_accuracy,
            **federated,
            "seconds-train-phase": train_s,
            "seconds-aggregation": self._aggregation_s,
            "seconds-central-eval": federated_started - central_started,
            "seconds-federated-eval": federated_s,
            "replies-held": train.most_held,  # most held at once to keep the fold order
            EPSILON_METRIC: self.strategy.epsilon,  # after this round; inf without noise
        }
        result = RoundResult(
            server_round=server_round,
            started_at=started,
            sampled=len(sampled),
            accepted=summary.accepted,
            rejected=summary.rejected,
            failed=len(train.failed) + len(train.timed_out),
            updated=summary.updated,
            metrics=metrics,
            arrays=arrays,
            strategy_state=self.strategy.state_dict(),
            note=summary.reason,
        )
        train_loss = summary.metrics.get(keys.TRAIN_LOSS, float("nan"))
        record_round_result(
            self.store, self.config, result, partial(self._describe_round, train_loss)
        )
        return arrays

    def _describe_round(self, train_loss: float, record: RoundRecord) -> tuple[str, str]:
        """A recorded round's line in the event log and in the server log."""
        tail = (
            f"central accuracy {record.metrics['central-accuracy']:.4f}, "
            f"{record.accepted}/{record.sampled} accepted, {record.rejected} rejected, "
            f"{record.failed} failed, {record.ended_at - record.started_at:.1f}s"
        )
        return (
            f"round {record.round}: {tail}",
            f"round {record.round}/{self.config.num_server_rounds}: "
            f"train loss {train_loss:.4f}, {tail}",
        )

    # ---------------------------------------------------------------- phases
    def wait_for_nodes(self) -> list[int]:
        """Return the registered node ids once at least ``min-train-nodes`` are in.

        Never waits forever: after ``node-wait-timeout`` seconds it raises.
        """
        deadline = time.monotonic() + self.config.node_wait_timeout
        node_ids = list(self.grid.get_node_ids())
        while len(node_ids) < self.config.min_train_nodes:
            if time.monotonic() > deadline:
                raise NodeShortageError(
                    f"only {len(node_ids)} node(s) registered after "
                    f"{self.config.node_wait_timeout:.0f}s; min-train-nodes is "
                    f"{self.config.min_train_nodes}: start more SuperNodes, lower "
                    "min-train-nodes or raise node-wait-timeout"
                )
            self.phases.report_progress(
                "waiting-for-nodes", len(node_ids), self.config.min_train_nodes
            )
            self.control.check_stop()
            time.sleep(NODE_POLL_INTERVAL_S)
            node_ids = list(self.grid.get_node_ids())
        return node_ids

    def _model_content(self, server_round: int, arrays: NamedArrays) -> RecordDict:
        """A train or evaluate message's content: the global model and the round config."""
        return RecordDict(
            {
                keys.ARRAYS: self._serialised(arrays),
                keys.CONFIG: ConfigRecord(self._round_config(server_round)),
            }
        )

    @contextmanager
    def _timed_aggregation(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._aggregation_s += time.perf_counter() - started

    def _fold_reply(self, server_round: int, reply: Message) -> None:
        with self._timed_aggregation():
            outcome = self.strategy.add_reply(reply)
        self._record_outcome(server_round, outcome, joined=outcome.accepted)

    def _record_outcome(self, server_round: int, outcome: ReplyOutcome, joined: bool) -> None:
        """Record what a checked reply said about its node, and its rejection if rejected."""
        partition = outcome.partition_id
        self.store.record_node_reply(
            outcome.node_id,
            partition_id=partition,
            num_examples=outcome.num_examples if joined else None,
            device=outcome.info.get(keys.DEVICE),
            weight=self._weight_of(partition),
            joined=joined,
        )
        if not outcome.accepted:
            self._reject(server_round, outcome.node_id, outcome.reason)

    def _reject(self, server_round: int, node_id: int, reason: str) -> None:
        reason = escape_unprintable(reason)  # a node's text, e.g. in numpy's error message
        self.store.record_node_fault(node_id, server_round, "rejected", reason)
        log(WARNING, "round %s: reply from node %s rejected: %s", server_round, node_id, reason)

    def _evaluation_nodes(self, server_round: int, node_ids: list[int]) -> list[int]:
        """The nodes asked for federated evaluation in this round (maybe none).

        None when the round is not due (``evaluate-every``), evaluation is off
        (``fraction-evaluate=0`` or ``local-test-fraction=0``) or fewer than
        ``min-evaluate-nodes`` are available. All available nodes are asked at
        ``fraction-evaluate=1`` without drawing from the run's generator, so the
        training samples stay those of a run that evaluates everywhere.
        """
        if not self.config.evaluates_in_round(server_round):
            return []
        if len(node_ids) < self.config.min_evaluate_nodes:
            self.store.add_event(
                "evaluate-skipped",
                f"round {server_round}: {len(node_ids)} node(s) available, "
                f"min-evaluate-nodes is {self.config.min_evaluate_nodes}",
            )
            return []
        if self.config.fraction_evaluate >= 1.0:
            return sorted(node_ids, key=self._node_key)
        return self.strategy.sample_nodes(
            node_ids, self.config.fraction_evaluate, self.config.min_evaluate_nodes, self._node_key
        )

    def _node_key(self, node_id: int) -> tuple[int, int, int]:
        """Nodes in partition order, those without a known partition after, by id."""
        partition = self.partitions.get(node_id)
        return (0, partition, node_id) if partition is not None else (1, 0, node_id)

    def _roll_call(
        self,
        server_round: int,
        node_ids: list[int],
        timeout_s: float | None = None,
        attempts: int = 1,
    ) -> None:
        """Ask each node not yet known for its partition id (a ``query`` message).

        Simulated nodes get new random ids in every run, so sampling and folding
        by node id would differ between two runs of one configuration; by
        partition id they do not. The partition a node gives here is its identity
        for the rest of the run: its weight, its place in the sample and fold
        order, and the partition its train replies must agree with (see
        :func:`strategies.replies.check_train_reply`). Nodes that left are
        forgotten; no step here is O(nodes) per round but the node list's
        bookkeeping.

        A node is known once it answered, or once it was asked ``attempts`` times
        (each phase ends at ``timeout_s``, default ``round-timeout``) without an
        answer; until then it is asked again at each roll call. A node known
        without a partition (-1: its own data; an invalid answer, recorded as a
        rejected reply; no answer) is weighed with the default weight 1.0 and
        ordered after the others, by id. A partition already held by another
        present node is refused, so no reply can borrow another node's weight.
        """
        present = set(node_ids)
        unknown = [node_id for node_id in node_ids if node_id not in self.partitions]
        if not unknown:
            return
        answered: dict[int, int | None] = {}

        def learn(round_: int, reply: Message) -> None:
            node_id = reply.metadata.src_node_id
            record = reply.content.metric_records.get(keys.METRICS)
            value = dict(record).get(keys.PARTITION_ID) if record is not None else None
            problem = (
                "carries no partition-id" if value is None else find_partition_id_problem(value)
            )
            answered[node_id] = None
            if problem is not None:
                self._reject(round_, node_id, f"query reply: {problem}")
            elif isinstance(value, int | float) and value >= 0:  # -1: own data, no partition
                self._claim_partition(round_, node_id, int(value), answered, present)

        content = RecordDict({keys.CONFIG: ConfigRecord(self._round_config(server_round))})
        started = time.perf_counter()
        self.phases.run(server_round, "query", sorted(unknown), content, learn, timeout_s)
        self.partitions.update(answered)
        for node_id in unknown:
            if node_id not in answered:
                self._roll_call_asked[node_id] = self._roll_call_asked.get(node_id, 0) + 1
                if self._roll_call_asked[node_id] >= attempts:
                    self.partitions[node_id] = None
        gave = sum(answered.get(node_id) is not None for node_id in unknown)
        self.store.add_event(
            "roll-call",
            f"round {server_round}: {gave}/{len(unknown)} new node(s) gave their partition "
            f"in {time.perf_counter() - started:.1f}s",
        )

    def _claim_partition(
        self,
        server_round: int,
        node_id: int,
        partition: int,
        answered: dict[int, int | None],
        present: set[int],
    ) -> None:
        """Record ``partition`` as ``node_id``'s, unless another present node holds it.

        A partition held by a node that has left (a SuperNode restarted under a new
        id) passes to the new node, and the old record keeps no partition: if the
        old node comes back it takes part without one. Both are events.
        """
        holders = {**self.partitions, **answered}
        holder = next((n for n, p in holders.items() if p == partition and n != node_id), None)
        if holder is not None and holder not in present:
            self.partitions[holder] = None
            self.store.add_event(
                ROLL_CALL_TRANSFERRED,
                f"round {server_round}: partition {partition} passes from node {holder}, "
                f"which left, to node {node_id}",
            )
            holder = None
        if holder is None:
            answered[node_id] = partition
            return
        detail = (
            f"partition-id {partition} is already node {holder}'s; this node takes part "
            "without a partition (check the nodes' --partition-id)"
        )
        self._reject(server_round, node_id, f"query reply: {detail}")
        self.store.add_event(ROLL_CALL_REFUSED, f"round {server_round}: node {node_id}: {detail}")

    def _evaluate_federated(
        self, server_round: int, arrays: NamedArrays, node_ids: Iterable[int]
    ) -> dict[str, float]:
        """Evaluate the global model on the given nodes' local test splits.

        Each reply is checked (``check_evaluate_reply``); the federated metrics
        are the example-weighted means of the accepted ones only. No nodes, no
        metrics (and no messages).
        """
        node_ids = list(node_ids)
        if not node_ids:
            return {}
        collected: list[Mapping[str, float]] = []

        def keep(round_: int, reply: Message) -> None:
            outcome = check_evaluate_reply(reply)
            outcome.partition_id = self.partitions.get(outcome.node_id)  # the record, not a claim
            if outcome.accepted:
                collected.append(outcome.metrics)
            self._record_outcome(round_, outcome, joined=False)

        content = self._model_content(server_round, arrays)
        self.phases.run(server_round, "evaluate", node_ids, content, keep)
        averaged = aggregate_evaluate_metrics(collected)
        result = {}
        if keys.EVAL_LOSS in averaged:
            result["federated-loss"] = averaged[keys.EVAL_LOSS]
        if keys.EVAL_ACCURACY in averaged:
            result["federated-accuracy"] = averaged[keys.EVAL_ACCURACY]
        return result

    def _record_initial_evaluation(self, arrays: NamedArrays) -> None:
        loss, accuracy = self.evaluate_fn(arrays)
        record_initial_evaluation(self.store, arrays, loss, accuracy)
        log(
            INFO,
            "round 0/%d: central accuracy %.4f (initial model)",
            self.config.num_server_rounds,
            accuracy,
        )

    def _round_config(self, server_round: int) -> dict[str, ConfigRecordValues]:
        config: dict[str, ConfigRecordValues] = {keys.SERVER_ROUND: server_round}
        if self.config.proximal_mu > 0:
            config[keys.PROXIMAL_MU] = self.config.proximal_mu
        return config

    def _serialised(self, arrays: NamedArrays) -> ArrayRecord:
        """The ArrayRecord of ``arrays``, serialised once and reused.

        The same global model goes out twice: to evaluation after the round that
        made it, and to training in the next round. It goes out packed (two
        arrays instead of one per tensor: see ``strategies.records``).
        """
        if self._record_cache is None or self._record_cache[0] is not arrays:
            self._record_cache = (arrays, pack_arrays(arrays))
        return self._record_cache[1]

    def _weight_of(self, partition: int | None) -> float | None:
        return None if partition is None else self.operator_weights.get(int(partition), 1.0)

    def _set_operator_weight(self, partition_id: int, weight: float) -> None:
        """Apply an operator weight from the next round on (``weighted`` uses it)."""
        self.operator_weights[partition_id] = weight
        self.strategy.set_operator_weight(partition_id, weight)
