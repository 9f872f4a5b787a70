"""Asynchronous buffered aggregation (FedBuff) on the coordinator's plumbing: ``mode='async'``.

Synchronous rounds wait for the slowest sampled node. Here ``concurrency`` (K)
trainings stay in flight: each node that replies is given the newest model at
once, its update (``client - the version it trained from``) is weighted by
staleness and folded into a buffer, and every ``buffer-size`` (B) accepted
updates the buffer becomes a new model version (:mod:`strategies.fedbuff`).
``num-server-rounds`` counts versions; version k is recorded as round k (same
run directory, chain, checkpoints and charts).

The loop, each pass:

1. apply the operator's commands (stop ends the run; pause stops new trainings);
2. top up: send the newest version to idle nodes until K are in flight;
3. pull the replies that are in and fold each one (the same trust boundary as a
   synchronous round: :meth:`server.phases.PhaseRunner.dispatch`); publish a
   version when B are in: apply, evaluate centrally, checkpoint, record;
4. give up trainings in flight longer than ``round-timeout`` (the node's failure).

Lifecycle: pause sends no new training; the trainings in flight are still
folded as they arrive (and publish a version if they fill the buffer); then the
run waits, a partly filled buffer kept, until resume or stop. Stop abandons the
trainings in flight and the partly filled buffer. After a crash, resume starts
from the last checkpointed version; the buffer and the trainings that were in
flight are lost (at most B - 1 accepted updates and K trainings of work).

Not in async mode: federated evaluation (nodes are busy training; central
evaluation runs on every version) and bit-for-bit reproducibility (which update
lands in which version depends on arrival times).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from logging import WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from server.coordinator import Coordinator, EvaluateFn
from server.phases import POLL_INTERVAL_S, PhaseResult
from server.record import lifecycle
from server.record.round_result import RoundResult, record_round_result
from server.record.store import RoundRecord, RunStore
from strategies.aggregation import NonFiniteUpdateError
from strategies.aggregation.server_step import compute_new_global
from strategies.fedbuff import StalenessBuffer, VersionHistory, find_staleness_problem
from strategies.protocol import AsyncRounds, RoundStrategy
from strategies.replies import (
    ReplyOutcome,
    RoundReplyTracker,
    aggregate_train_metrics,
    check_train_reply,
)
from strategies.strategy import NamedArrays
from strategies.validation import ArraySpec, specs_from_arrays
from task import keys
from task.config import RunConfig

COMMAND_POLL_S = 0.25
EXPIRE_POLL_S = 1.0
NODE_REFRESH_S = 0.5
# While trainings are in flight, a new node's roll call waits this long, and a node
# that does not answer is asked again at most this many times in all (then it is
# known without a partition).
ASYNC_ROLL_CALL_S = 2.0
ASYNC_ROLL_CALL_ATTEMPTS = 3
# Longest a pull waits for the parts of a listed reply; then the reply counts as failed.
ASYNC_PULL_WAIT_S = 10.0
SAMPLE_ALL = 1e-9  # with minimum=n, NodeSampler.sample draws exactly n nodes


@dataclass
class Training:
    """One training in flight: the node and the version it started from."""

    node_id: int
    version: int
    sent_at: float  # time.monotonic()


@dataclass
class VersionTally:
    """What happened since the last version was published."""

    started_at: float  # time.time()
    trainings: PhaseResult = field(default_factory=lambda: PhaseResult(sampled=0))
    accepted: list[ReplyOutcome] = field(default_factory=list)
    rejected: int = 0


class AsyncCoordinator(Coordinator):
    """Runs versions ``first_round..num-server-rounds`` with FedBuff (same parameters)."""

    strategy: AsyncRounds  # FedBuff folds with the strategy's aggregator, weights and step

    def __init__(
        self,
        grid: Grid,
        strategy: RoundStrategy,
        store: RunStore,
        config: RunConfig,
        evaluate_fn: EvaluateFn,
    ) -> None:
        super().__init__(grid, strategy, store, config, evaluate_fn)
        self.version = 0
        self.arrays: NamedArrays = {}
        self.history = VersionHistory(self.config.max_staleness)
        self.in_flight: dict[str, Training] = {}
        self.trainings_of: dict[int, int] = {}  # node id -> trainings sent to it
        self._specs: dict[str, ArraySpec] = {}
        self._buffer = self._new_buffer(1)
        self._tally = VersionTally(time.time())
        self._node_ids: list[int] = []
        self._next = {"commands": 0.0, "expire": 0.0, "nodes": 0.0}

    # ------------------------------------------------------------------ run
    def run(self, initial_arrays: NamedArrays, first_round: int = 1) -> NamedArrays:
        """Publish versions ``first_round..num-server-rounds``; return the last one."""
        if first_round == 1:
            self._record_initial_evaluation(initial_arrays)
        self.version, self.arrays = first_round - 1, initial_arrays
        self._specs = dict(specs_from_arrays(initial_arrays))
        self.history.publish(self.version, initial_arrays)
        self._start_version()
        while self.version < self.config.num_server_rounds:
            self._apply_commands()
            paused = self.control.state == lifecycle.PAUSED
            if paused and not self.in_flight:
                self.control.between_rounds()  # blocks until resume (or raises on stop)
                continue
            if not paused:
                self._top_up()
            handled = self._collect()
            self._expire()
            if not handled:
                time.sleep(POLL_INTERVAL_S)
        return self.arrays

    def _apply_commands(self) -> None:
        if self._due("commands", COMMAND_POLL_S):
            self.control.apply_pending()

    def _due(self, what: str, interval_s: float) -> bool:
        now = time.monotonic()
        if now < self._next[what]:
            return False
        self._next[what] = now + interval_s
        return True

    # ------------------------------------------------------------ trainings
    def _top_up(self) -> None:
        """Send the newest version to idle nodes until ``concurrency`` trainings are in flight."""
        free = self.config.concurrency - len(self.in_flight)
        if free <= 0:
            return
        busy = {training.node_id for training in self.in_flight.values()}
        # Only nodes the roll call knows: a node's identity is what it answered there
        known = [node_id for node_id in self._available_nodes() if node_id in self.partitions]
        idle = [node_id for node_id in known if node_id not in busy]
        if not idle:
            return
        chosen = self.strategy.sample_nodes(idle, SAMPLE_ALL, min(free, len(idle)), self._node_key)
        messages = [self._train_message(node_id) for node_id in chosen]
        message_ids = list(self.grid.push_messages(messages))
        now = time.monotonic()
        for message_id, node_id in zip(message_ids, chosen, strict=True):
            if not message_id:
                continue
            self.history.checkout(self.version)
            self.in_flight[message_id] = Training(node_id, self.version, now)
            self._tally.trainings.sampled += 1

    def _available_nodes(self) -> list[int]:
        """Registered nodes (refreshed every ``NODE_REFRESH_S``); waits when none is training."""
        if not self.in_flight:
            self._node_ids = self.wait_for_nodes()
            self._next["nodes"] = time.monotonic() + NODE_REFRESH_S
        elif self._due("nodes", NODE_REFRESH_S):
            self._node_ids = list(self.grid.get_node_ids())
        if not self.in_flight:  # nothing waits on it: as long as the nodes need
            self._roll_call(self.version + 1, self._node_ids)
        else:  # short and repeated, so replies in flight are collected meanwhile
            self._roll_call(
                self.version + 1, self._node_ids, ASYNC_ROLL_CALL_S, ASYNC_ROLL_CALL_ATTEMPTS
            )
        return self._node_ids

    def _train_message(self, node_id: int) -> Message:
        """The newest version, with the node's training count (its seed) and the version."""
        count = self.trainings_of.get(node_id, 0) + 1
        self.trainings_of[node_id] = count
        config = self._round_config(count)
        config[keys.MODEL_VERSION] = self.version
        content = RecordDict(
            {keys.ARRAYS: self._serialised(self.arrays), keys.CONFIG: ConfigRecord(config)}
        )
        return Message(content, node_id, "train")

    def _collect(self) -> int:
        """Pull the replies that are in and fold them; return how many were handled."""
        if not self.in_flight:
            return 0
        pending = {message_id: t.node_id for message_id, t in self.in_flight.items()}
        # A reply listed with parts missing (its node died mid-upload) holds up every
        # other reply of the pull until this deadline: bound it, not by round-timeout
        deadline = time.monotonic() + min(self.config.round_timeout, ASYNC_PULL_WAIT_S)
        replies = self.phases.pull(self.version + 1, "train", pending, deadline)
        handled = 0
        for reply in replies:
            training = self.in_flight.pop(reply.metadata.reply_to_message_id, None)
            if training is None:
                continue
            handled += 1
            on_reply = partial(self._fold_training, training)
            self.phases.dispatch(
                self.version + 1, training.node_id, reply, self._tally.trainings, on_reply
            )
            self.history.release(training.version)
            if self._buffer.full:
                self._publish()
                if self.version >= self.config.num_server_rounds:
                    break
        self.phases.report_progress("train", self._buffer.count, self.config.buffer_size)
        return handled

    def _fold_training(self, training: Training, building: int, reply: Message) -> None:
        """Check one reply and fold its staleness-weighted update, or reject it with the reason."""
        node_id = training.node_id
        reference = self.history.get(training.version)
        problem = find_staleness_problem(training.version, self.version, self.config.max_staleness)
        if problem is None and reference is None:
            problem = f"version {training.version} it trained from is no longer held"
        if problem is not None or reference is None:
            outcome = ReplyOutcome(node_id, False, problem or "")
            self._record_outcome(building, outcome, joined=False)
            return
        outcome, client_arrays = check_train_reply(
            reply,
            self._specs,
            RoundReplyTracker(building),
            check_finite=False,
            roll_call=self.partitions,
        )
        if client_arrays is not None:
            self._fold(outcome, client_arrays, reference, self.version - training.version)
        if outcome.accepted:
            self._tally.accepted.append(outcome)
        self._record_outcome(building, outcome, joined=outcome.accepted)

    def _fold(
        self,
        outcome: ReplyOutcome,
        client_arrays: NamedArrays,
        reference: Mapping[str, np.ndarray],
        staleness: int,
    ) -> None:
        names = list(reference)
        try:
            with self._timed_aggregation():
                weight = self.strategy.weight_fn(
                    outcome.node_id, outcome.num_examples, outcome.metrics
                )
                self._buffer.add_difference(
                    [client_arrays[name] for name in names],
                    [reference[name] for name in names],
                    weight,
                    staleness,
                )
        except NonFiniteUpdateError as error:
            outcome.accepted = False
            outcome.reason = f"array {names[error.index]!r} holds NaN or infinite values"
        except (ValueError, ArithmeticError, MemoryError) as error:
            outcome.accepted = False
            outcome.reason = f"update could not be aggregated: {error}"

    def _reject(self, server_round: int, node_id: int, reason: str) -> None:
        self._tally.rejected += 1
        super()._reject(server_round, node_id, reason)

    def _expire(self) -> None:
        """Give up trainings in flight longer than ``round-timeout``: the node's failure."""
        if not self._due("expire", EXPIRE_POLL_S):
            return
        limit = time.monotonic() - self.config.round_timeout
        for message_id, training in list(self.in_flight.items()):
            if training.sent_at < limit:
                del self.in_flight[message_id]
                self.history.release(training.version)
                self._tally.trainings.timed_out.append(training.node_id)
                reason = f"no train reply within round-timeout={self.config.round_timeout}s"
                self.store.record_node_fault(training.node_id, self.version + 1, "failure", reason)

    # -------------------------------------------------------------- versions
    def _new_buffer(self, version: int) -> StalenessBuffer:
        options = self.strategy.aggregator_options
        seed = options.get("seed")
        return StalenessBuffer(
            self.strategy.aggregator_name,
            self.config.buffer_size,
            self.config.staleness_weight,
            self.config.staleness_exponent,
            clip_norm=self.config.clip_norm,
            noise_multiplier=self.config.noise_multiplier,
            seed=seed * 1_000_003 + version if isinstance(seed, int) else None,
        )

    def _start_version(self) -> None:
        self._buffer = self._new_buffer(self.version + 1)
        self._tally = VersionTally(time.time())
        self._aggregation_s = 0.0

    def _publish(self) -> None:
        """Turn the full buffer into the next version: apply, evaluate, checkpoint, record."""
        version = self.version + 1
        with self._timed_aggregation():
            new_arrays, note = self._apply_buffer()
        updated = new_arrays is not None
        if new_arrays is None:
            log(WARNING, "version %s: %s", version, note)
            self.store.add_event("round-kept", f"version {version}: {note}")
        self.arrays = new_arrays if new_arrays is not None else self.arrays
        self.version = version
        self.history.publish(version, self.arrays)
        central_started = time.perf_counter()
        central_loss, central_accuracy = self.evaluate_fn(self.arrays)
        metrics = self._version_metrics(central_loss, central_accuracy)
        metrics["seconds-central-eval"] = time.perf_counter() - central_started
        self._record_version(metrics, updated, note)
        self._start_version()

    def _apply_buffer(self) -> tuple[NamedArrays | None, str]:
        try:
            delta = self._buffer.result()
        except ValueError as error:
            return None, f"{self.strategy.aggregator_name} could not aggregate: {error}"
        return compute_new_global(self.arrays, delta, self.strategy.server_lr)

    def _version_metrics(self, central_loss: float, central_accuracy: float) -> dict[str, float]:
        train = aggregate_train_metrics(self._tally.accepted)
        return {
            **{f"train-{k.removeprefix('train-')}": v for k, v in train.items()},
            "central-loss": central_loss,
            "central-accuracy": central_accuracy,
            **self._buffer.staleness_metrics(),
            "trainings-in-flight": float(len(self.in_flight)),
            "models-held": float(len(self.history.held)),
            "seconds-aggregation": self._aggregation_s,
        }

    def _record_version(self, metrics: dict[str, float], updated: bool, note: str) -> None:
        tally = self._tally
        result = RoundResult(
            server_round=self.version,
            started_at=tally.started_at,
            sampled=tally.trainings.sampled,
            accepted=self._buffer.count,
            rejected=tally.rejected,
            failed=len(tally.trainings.failed) + len(tally.trainings.timed_out),
            updated=updated,
            metrics=metrics,
            arrays=self.arrays,
            strategy_state=self.strategy.state_dict(),
            note=note,
        )
        record_round_result(self.store, self.config, result, self._describe_version)

    def _describe_version(self, record: RoundRecord) -> tuple[str, str]:
        """A recorded version's line in the event log and in the server log."""
        metrics = record.metrics
        staleness = metrics.get("staleness-mean", 0.0), metrics.get("staleness-max", 0.0)
        summary = (
            f"central accuracy {metrics['central-accuracy']:.4f}, "
            f"{record.accepted} accepted (staleness mean {staleness[0]:.1f}, "
            f"max {staleness[1]:.0f}), "
            f"{record.rejected} rejected, {record.failed} failed, {len(self.in_flight)} in flight, "
            f"{record.ended_at - record.started_at:.1f}s"
        )
        return (
            f"version {record.round}: {summary}",
            f"version {record.round}/{self.config.num_server_rounds}: {summary}",
        )
