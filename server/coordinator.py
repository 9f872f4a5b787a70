"""The coordinator: drives rounds on the Grid itself and records them in the run store.

Flower's ``Strategy.start()`` sends a round's messages and blocks until every
reply is in. The coordinator instead pushes messages, pulls replies with a
short poll interval and folds each one into the strategy as it arrives, so a
round closes as soon as its replies are in, or at ``round-timeout`` with what
arrived.

Replies come from untrusted nodes. The strategy checks each one
(``strategies.replies``); here, anything that still goes wrong while reading,
validating, recording or folding ONE reply is caught where the reply is handed
over (:meth:`Coordinator._dispatch`), recorded as that reply's rejection with
the exception named, and counted against its node: the round and the run go
on. A new global model that is not finite is never checkpointed or sent.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from server.control import ControlChannel
from server.object_pull import pull_deadline
from server.record.checkpoints import checkpoint_path, files_to_prune, model_hash, save_checkpoint
from server.record.store import RoundRecord, RunStore
from server.reply_order import ReplyOrder
from strategies.accounted import EPSILON_METRIC, accounted
from strategies.records import pack_arrays
from strategies.replies import ReplyOutcome, check_evaluate_reply, unreadable
from strategies.strategy import (
    FedCoordStrategy,
    NamedArrays,
    aggregate_evaluate_metrics,
    find_non_finite_model,
)
from strategies.validation import find_partition_id_problem
from task import keys
from task.config import RunConfig

EvaluateFn = Callable[[NamedArrays], tuple[float, float]]
"""Central evaluation: global arrays -> (loss, accuracy)."""

POLL_INTERVAL_S = 0.05
NODE_POLL_INTERVAL_S = 0.5
NODE_SETTLE_S = 1.0


class NodeShortageError(RuntimeError):
    """Fewer nodes than ``min-train-nodes`` registered within the wait limit."""


@dataclass
class PhaseResult:
    """Replies gathered in one phase (train or evaluate) of a round."""

    sampled: int
    received: int = 0  # replies handed over; each is dropped once handled (streaming)
    failed: dict[int, str] = field(default_factory=dict)
    timed_out: list[int] = field(default_factory=list)
    most_held: int = 0  # most replies held at once to keep the fold order


def summarize_error(code: int, reason: str, limit: int = 300) -> str:
    """One readable line from an error reply: the ClientApp's own message if present.

    Ray wraps a ClientApp's exception in several layers of actor reprs; the
    useful part is the text after the last ``Message:``.
    """
    marker = "Message:"
    text = reason.rsplit(marker, 1)[1] if marker in reason else reason
    lines = [line.strip(" '>\n") for line in text.splitlines() if line.strip(" '>")]
    summary = lines[0] if marker in reason and lines else (lines[-1] if lines else reason)
    return f"error reply (code {code}): {summary}"[:limit]


class Coordinator:
    """Owns the round loop of one run.

    Parameters
    ----------
    grid : Grid
        Flower's Grid for this run.
    strategy : FedCoordStrategy
        Folds replies into the new global model.
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
        strategy: FedCoordStrategy,
        store: RunStore,
        config: RunConfig,
        evaluate_fn: EvaluateFn,
    ) -> None:
        self.grid = grid
        self.strategy = accounted(strategy, config)  # sampling and privacy accounting
        self.store = store
        self.config = config
        self.evaluate_fn = evaluate_fn
        self._last_progress: tuple[str, int, int] = ("", 0, 0)
        self._aggregation_s = 0.0
        self._record_cache: tuple[NamedArrays, ArrayRecord] | None = None
        self._last_pull_error = ""
        self.operator_weights = dict(config.node_weights)
        self.control = ControlChannel(store, self._set_operator_weight)
        # Node id -> partition id from the roll call (None: asked, no valid answer);
        # the aggregating strategy (inside the accounting wrapper) checks each
        # reply's partition-id against it
        self.partitions: dict[int, int | None] = {}
        self.strategy.strategy.node_partitions = self.partitions

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
        train = self._run_phase(server_round, "train", sampled, content, self._fold_reply)
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
        checkpoint = save_checkpoint(
            self.store.run_dir,
            server_round,
            arrays,
            self.strategy.state_dict(),
            {
                "central-accuracy": central_accuracy,
                "model": self.config.model,
                "dataset": self.config.dataset,
                "strategy": self.config.strategy,
            },
        )
        ended = time.time()
        self.store.record_round(
            RoundRecord(
                round=server_round,
                started_at=started,
                ended_at=ended,
                sampled=len(sampled),
                accepted=summary.accepted,
                rejected=summary.rejected,
                failed=len(train.failed) + len(train.timed_out),
                updated=summary.updated,
                metrics=metrics,
                model_hash=model_hash(arrays),
                note=summary.reason,
            ),
            checkpoint=checkpoint,
        )
        self._prune_checkpoints()
        self.store.add_event(
            "round",
            f"round {server_round}: central accuracy {central_accuracy:.4f}, "
            f"{summary.accepted}/{len(sampled)} accepted, {summary.rejected} rejected, "
            f"{len(train.failed) + len(train.timed_out)} failed, {ended - started:.1f}s",
        )
        log(
            INFO,
            "round %d/%d: train loss %.4f, central accuracy %.4f, %d/%d accepted, "
            "%d rejected, %d failed, %.1fs",
            server_round,
            self.config.num_server_rounds,
            summary.metrics.get(keys.TRAIN_LOSS, float("nan")),
            central_accuracy,
            summary.accepted,
            len(sampled),
            summary.rejected,
            len(train.failed) + len(train.timed_out),
            ended - started,
        )
        return arrays

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
            self._report_progress("waiting-for-nodes", len(node_ids), self.config.min_train_nodes)
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

    def _run_phase(
        self,
        server_round: int,
        message_type: str,
        node_ids: list[int],
        content: RecordDict,
        on_reply: Callable[[int, Message], None],
    ) -> PhaseResult:
        """Push one message per node, then pull and hand over replies until done.

        Replies are handed over in the order of ``node_ids`` (see
        :mod:`server.reply_order`), so that a round folds the same updates in
        the same order whatever order they arrive in.
        """
        messages = [Message(content, node_id, message_type) for node_id in node_ids]
        message_ids = list(self.grid.push_messages(messages))
        pending = {mid: nid for mid, nid in zip(message_ids, node_ids, strict=True) if mid}
        result = PhaseResult(sampled=len(node_ids))
        order: ReplyOrder[Message] = ReplyOrder(pending.values())
        deadline = time.monotonic() + self.config.round_timeout
        while pending and time.monotonic() < deadline:
            replies = self._pull(server_round, message_type, pending, deadline)
            for reply in replies:
                node_id = pending.pop(reply.metadata.reply_to_message_id, None)
                if node_id is None:
                    continue
                for due_node, due_reply in order.arrive(node_id, reply):
                    self._dispatch(server_round, due_node, due_reply, result, on_reply)
            self._report_progress(message_type, len(node_ids) - len(pending), len(node_ids))
            self.control.check_stop()
            if pending:
                time.sleep(POLL_INTERVAL_S)
        for due_node, due_reply in order.drain():
            self._dispatch(server_round, due_node, due_reply, result, on_reply)
        result.most_held = order.most_held
        result.timed_out = sorted(pending.values())
        for node_id in result.timed_out:
            reason = f"no {message_type} reply within round-timeout={self.config.round_timeout}s"
            self.store.record_node_fault(node_id, server_round, "failure", reason)
        return result

    def _pull(
        self, server_round: int, message_type: str, pending: dict[str, int], deadline: float
    ) -> list[Message]:
        """Pull the replies that are in; a pull that raises loses that poll, not the run.

        Flower's Grid builds every pulled reply before returning any, so one reply
        it cannot build fails the whole pull. Such a failure is logged and
        recorded once, the poll retried; the nodes whose replies stay unreadable
        close at ``round-timeout``, counted as failed.
        """
        try:
            with pull_deadline(deadline):
                return list(self.grid.pull_messages(list(pending)))
        except Exception as error:  # noqa: BLE001 - a node's reply must not end the run
            reason = f"{message_type} {unreadable(error)}"
            if self._last_pull_error != reason:
                self._last_pull_error = reason
                self.store.add_event("reply-unreadable", f"round {server_round}: {reason}")
                log(WARNING, "round %s: %s", server_round, reason)
            return []

    def _dispatch(
        self,
        server_round: int,
        node_id: int,
        reply: Message,
        result: PhaseResult,
        on_reply: Callable[[int, Message], None],
    ) -> None:
        """Route a reply: error replies count as failures of the node they answer.

        The trust boundary of one reply: whatever ``on_reply`` raises becomes the
        rejection of that reply, recorded with its reason and counted against
        the node; the round goes on.
        """
        if reply.has_error():
            reason = summarize_error(reply.error.code, reply.error.reason)
            result.failed[node_id] = reason
            self.store.record_node_fault(node_id, server_round, "failure", reason)
            log(WARNING, "round %s: node %s failed: %s", server_round, node_id, reason)
            return
        result.received += 1
        try:
            on_reply(server_round, reply)
        except Exception as error:  # noqa: BLE001 - the trust boundary: one reply, never the run
            self._reject(
                server_round, node_id, f"{reply.metadata.message_type} {unreadable(error)}"
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

    def _roll_call(self, server_round: int, node_ids: list[int]) -> None:
        """Ask each node not asked before for its partition id (a ``query`` message).

        Simulated nodes get new random ids in every run, so sampling and folding
        by node id would differ between two runs of one configuration; by
        partition id they do not. Each node is asked once, when it is first
        seen (nodes that left are forgotten): no step here is O(nodes) per round
        but the bookkeeping of the node list. A node that gives no valid answer
        within ``round-timeout`` is ordered after the others, by id, and an
        invalid answer is recorded as a rejected reply. (The roll call is each
        simulated node's first message, so it carries the ClientApp's start-up:
        a shorter deadline would leave nodes unknown on a loaded machine.)
        """
        present = set(node_ids)
        for gone in [node_id for node_id in self.partitions if node_id not in present]:
            del self.partitions[gone]
        unknown = [node_id for node_id in node_ids if node_id not in self.partitions]
        if not unknown:
            return
        self.partitions.update(dict.fromkeys(unknown))

        def learn(round_: int, reply: Message) -> None:
            node_id = reply.metadata.src_node_id
            record = reply.content.metric_records.get(keys.METRICS)
            value = dict(record).get(keys.PARTITION_ID) if record is not None else None
            problem = (
                "carries no partition-id" if value is None else find_partition_id_problem(value)
            )
            if problem is not None:
                self._reject(round_, node_id, f"query reply: {problem}")
            elif int(value) >= 0:  # type: ignore[call-overload] # -1: own data, no partition
                self.partitions[node_id] = int(value)  # type: ignore[call-overload]

        content = RecordDict({keys.CONFIG: ConfigRecord(self._round_config(server_round))})
        started = time.perf_counter()
        self._run_phase(server_round, "query", sorted(unknown), content, learn)
        answered = sum(self.partitions[node_id] is not None for node_id in unknown)
        self.store.add_event(
            "roll-call",
            f"round {server_round}: {answered}/{len(unknown)} new node(s) gave their partition "
            f"in {time.perf_counter() - started:.1f}s",
        )

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
        collected: list[dict[str, float]] = []

        def keep(round_: int, reply: Message) -> None:
            outcome = check_evaluate_reply(reply)
            if outcome.accepted:
                collected.append(outcome.metrics)
            self._record_outcome(round_, outcome, joined=False)

        content = self._model_content(server_round, arrays)
        self._run_phase(server_round, "evaluate", node_ids, content, keep)
        averaged = aggregate_evaluate_metrics(collected)
        result = {}
        if keys.EVAL_LOSS in averaged:
            result["federated-loss"] = averaged[keys.EVAL_LOSS]
        if keys.EVAL_ACCURACY in averaged:
            result["federated-accuracy"] = averaged[keys.EVAL_ACCURACY]
        return result

    def _record_initial_evaluation(self, arrays: NamedArrays) -> None:
        loss, accuracy = self.evaluate_fn(arrays)
        now = time.time()
        self.store.record_round(
            RoundRecord(
                round=0,
                started_at=now,
                ended_at=now,
                sampled=0,
                accepted=0,
                rejected=0,
                failed=0,
                updated=False,
                metrics={"central-loss": loss, "central-accuracy": accuracy},
                model_hash=model_hash(arrays),
                note="initial model",
            )
        )
        log(
            INFO,
            "round 0/%d: central accuracy %.4f (initial model)",
            self.config.num_server_rounds,
            accuracy,
        )

    def _round_config(self, server_round: int) -> dict[str, int | float | str | bool]:
        config: dict[str, int | float | str | bool] = {keys.SERVER_ROUND: server_round}
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

    def _prune_checkpoints(self) -> None:
        """Delete checkpoint files beyond the last few and the best."""
        rows = self.store.checkpoints()
        scored = [(int(r["round"]), r["central_accuracy"]) for r in rows]  # type: ignore[call-overload]
        for server_round in files_to_prune(scored):  # type: ignore[arg-type]
            checkpoint_path(self.store.run_dir, server_round).unlink(missing_ok=True)
            self.store.forget_checkpoint(server_round)

    def _report_progress(self, phase: str, received: int, expected: int) -> None:
        progress = (phase, received, expected)
        if progress != self._last_progress:
            self.store.set_progress(phase, received, expected)
            self._last_progress = progress
